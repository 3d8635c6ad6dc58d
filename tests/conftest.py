"""Helpers shared by the end-to-end tests. They need the real services that
scripts/setup.sh starts; they never replace them with fakes."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest

from snakemake_executor_plugin_crank.adapter.jobs import snakemake_version

WORKFLOWS = Path(__file__).parent / "workflows"
BUSYBOX = "crank-test/busybox:1"
BASH = "crank-test/bash:1"
SNAKEMAKE_IMAGE = f"crank-test/snakemake:{snakemake_version()}"


@pytest.fixture(scope="session")
def docker_api():
    client = docker.from_env()
    try:
        client.ping()
    except docker.errors.DockerException as e:
        pytest.fail(f"no Docker engine ({e}); run scripts/setup.sh first", pytrace=False)
    for image in (BUSYBOX, BASH, SNAKEMAKE_IMAGE):
        client.api.inspect_image(image)
    yield client.api
    client.close()


def copy_workflow(name: str, dest: Path) -> Path:
    shutil.copytree(WORKFLOWS / name, dest)
    return dest


def snakemake(workdir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real snakemake CLI with the crank executor in ``workdir``."""
    command = [
        sys.executable, "-m", "snakemake", "--executor", "crank", "--jobs", "4",
        "--crank-default-image", BUSYBOX, "--seconds-between-status-checks", "1",
        *args,
    ]
    return subprocess.run(
        command, cwd=workdir, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL,
    )


def containers_of(api, workdir: Path):
    return api.containers(all=True, filters={"label": f"crank.workdir={workdir}"})


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
