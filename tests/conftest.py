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


# ---------------------------------------------------------------- object storage (staging)


class S3Server:
    """The SeaweedFS S3 server scripts/setup.sh starts, as described by its s3.env."""

    def __init__(self, values: dict[str, str]):
        self.values = values
        self.endpoint = values["AWS_ENDPOINT_URL"]
        self.bucket = values["CRANK_TEST_BUCKET"]
        self.metrics_url = values.get("CRANK_TEST_S3_METRICS")

    def env(self) -> dict[str, str]:
        """The AWS_* variables a client needs."""
        return {k: v for k, v in self.values.items() if k.startswith("AWS_")}

    def requests(self, *types: str) -> int:
        """Requests of these types (PUT, POST, GET, ...) the server counted for the bucket."""
        import re
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        text = opener.open(self.metrics_url, timeout=10).read().decode()
        total = 0
        for line in text.splitlines():
            m = re.match(r'SeaweedFS_s3_request_total\{(.*)\} (\S+)$', line)
            if m:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
                if labels.get("bucket") == self.bucket and labels.get("type") in types:
                    total += int(float(m.group(2)))
        return total

    def in_flight(self) -> int:
        """Requests the S3 gateway is handling right now."""
        import re
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        text = opener.open(self.metrics_url, timeout=10).read().decode()
        return sum(int(float(v)) for v in re.findall(r'^SeaweedFS_s3_in_flight_requests\{[^}]*\} (\S+)$', text, re.M))


@pytest.fixture(scope="session")
def s3() -> S3Server:
    state = Path(os.environ.get("CRANK_TEST_STATE") or Path.home() / ".cache" / "crank-test")
    env_file = state / "s3.env"
    if not env_file.is_file():
        pytest.fail(f"no {env_file}: run scripts/setup.sh first (it starts the S3 server)", pytrace=False)
    values = {}
    for line in env_file.read_text().split("\n"):
        line = line.strip().removeprefix("export ").strip()
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return S3Server(values)
