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


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A private Docker engine (tests/faultproxy.py) for one test module: tests that restart
    an engine or leave it in a bad state never wait on, nor disturb, the shared one."""
    from faultproxy import PrivateEngine

    engine = PrivateEngine(str(tmp_path_factory.mktemp("eng", numbered=True)))
    engine.start()
    try:
        engine.load_images()
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def api(engine):
    """A client of the private engine; the test's containers are removed after it."""
    client = docker.APIClient(base_url=engine.url, timeout=30)
    yield client
    for row in client.containers(all=True):
        client.remove_container(row["Id"], force=True)
    client.close()


def copy_workflow(name: str, dest: Path) -> Path:
    shutil.copytree(WORKFLOWS / name, dest)
    return dest


def snakemake_command(*args: str) -> list:
    """The real snakemake CLI with the crank executor on the shared Docker engine."""
    return [
        sys.executable, "-m", "snakemake", "--executor", "crank", "--jobs", "4",
        "--crank-default-image", BUSYBOX, "--seconds-between-status-checks", "1",
        *args,
    ]


def snakemake(workdir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real snakemake CLI with the crank executor in ``workdir``."""
    return subprocess.run(
        snakemake_command(*args), cwd=workdir, capture_output=True, text=True, timeout=timeout,
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


class TesServer:
    """The Funnel TES server scripts/setup.sh starts, with the S3 store its tasks use."""

    def __init__(self, url: str, s3: S3Server):
        self.url = url
        self.s3 = s3

    def prefix(self, name: str) -> str:
        """A storage prefix of its own for one test."""
        return f"s3://{self.s3.bucket}/tests/{name}"

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.s3.env(), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def tes(s3) -> TesServer:
    """Funnel, or a skip saying loudly what is missing (setup.sh writes tes.env only when it
    started one)."""
    import urllib.request

    state = Path(os.environ.get("CRANK_TEST_STATE") or Path.home() / ".cache" / "crank-test")
    env_file = state / "tes.env"
    if not env_file.is_file():
        pytest.skip(
            f"TES TESTS SKIPPED: no Funnel ({env_file} missing): put a funnel v0.11.12 binary on PATH "
            "or in CRANK_FUNNEL and run scripts/setup.sh",
        )
    url = env_file.read_text().strip().removeprefix("export ").partition("=")[2]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        opener.open(f"{url}/healthz", timeout=5).read()
    except OSError as e:
        pytest.fail(f"Funnel at {url} does not answer ({e}); run scripts/setup.sh", pytrace=False)
    return TesServer(url, s3)
