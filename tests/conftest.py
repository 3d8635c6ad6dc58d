"""Helpers shared by the end-to-end tests. They need the real services (the Docker engine and
test images of scripts/setup.sh; SeaweedFS and Funnel from tests/services.py, started when a
test first needs them); they never replace them with fakes."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest
import services

from snakemake_executor_plugin_crank.adapter.jobs import snakemake_version

# A shell that starts the suite in the background without job control ignores SIGINT for
# it, every Snakemake it starts would inherit that, and the tests' Ctrl-C would do nothing:
# a handled signal is reset to the default in a child, an ignored one is not.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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
    """A private Docker engine (tests/services.py) for one test module: tests that restart
    an engine or leave it in a bad state never wait on, nor disturb, the shared one."""
    engine = services.PrivateEngine(str(tmp_path_factory.mktemp("eng", numbered=True)))
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
    """The SeaweedFS S3 server of tests/services.py, as described by its environment."""

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
def s3():
    """SeaweedFS, reused when it already answers, else started for this session and stopped after."""
    try:
        with services.seaweedfs() as values:
            yield S3Server(values)
    except services.ServiceError as e:
        pytest.fail(f"SeaweedFS: {e}", pytrace=False)


class TesServer:
    """The Funnel TES server of tests/services.py, with the S3 store its tasks use."""

    def __init__(self, url: str, s3: S3Server):
        self.url = url
        self.s3 = s3

    def prefix(self, name: str) -> str:
        """A storage prefix of its own for one test."""
        return f"s3://{self.s3.bucket}/tests/{name}"

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.s3.env(), "PYTHONUNBUFFERED": "1"}


TES_SKIPPED = []  # the reason, repeated in the terminal summary


@pytest.fixture(scope="session")
def tes(s3):
    """Funnel, reused when it already answers, else started for this session and stopped after;
    or a skip saying loudly what is missing."""
    try:
        with services.funnel(s3.values) as url:
            yield TesServer(url, s3)
    except services.Unavailable as e:
        TES_SKIPPED.append(f"TES TESTS SKIPPED: no Funnel ({e}): put a funnel "
                           f"{services.FUNNEL_VERSION} binary on PATH or in CRANK_FUNNEL")
        pytest.skip(TES_SKIPPED[0])
    except services.ServiceError as e:
        pytest.fail(f"Funnel: {e}", pytrace=False)


def pytest_terminal_summary(terminalreporter):
    for line in TES_SKIPPED[:1]:
        terminalreporter.write_line(line, yellow=True, bold=True)
