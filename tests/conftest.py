"""Helpers shared by the end-to-end tests. They need the real services (the Docker engine and
test images of scripts/setup.sh; SeaweedFS and Funnel from tests/services.py, started when a
test first needs them); they never replace them with fakes."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import docker
import pytest
import requests
import services

from snakemake_executor_plugin_crank.adapter.jobs import snakemake_version
from snakemake_executor_plugin_crank.rounds import Rounds

# A shell that starts the suite in the background without job control ignores SIGINT for
# it, every Snakemake it starts would inherit that, and the tests' Ctrl-C would do nothing:
# a handled signal is reset to the default in a child, an ignored one is not.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

WORKFLOWS = Path(__file__).parent / "workflows"
BUSYBOX = "crank-test/busybox:1"
BASH = "crank-test/bash:1"
SNAKEMAKE_IMAGE = f"crank-test/snakemake:{snakemake_version()}"
# with the S3 storage plugin: Snakemake inside stores a run: rule's outputs itself
SNAKEMAKE_S3_IMAGE = f"crank-test/snakemake-s3:{snakemake_version()}"


@pytest.fixture(scope="session")
def docker_api():
    client = docker.from_env()
    try:
        client.ping()
    except docker.errors.DockerException as e:
        pytest.fail(f"no Docker engine ({e}); run scripts/setup.sh first", pytrace=False)
    for image in (BUSYBOX, BASH, SNAKEMAKE_IMAGE, SNAKEMAKE_S3_IMAGE):
        try:
            client.api.inspect_image(image)
        except docker.errors.ImageNotFound:
            pytest.fail(f"no test image {image}; run scripts/setup.sh first", pytrace=False)
    yield client.api
    client.close()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A private Docker engine (tests/services.py) for one test module: tests that restart
    an engine or leave it in a bad state never wait on, nor disturb, the shared one."""
    with services.PrivateEngine(str(tmp_path_factory.mktemp("eng", numbered=True))).running() as engine:
        yield engine


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


def rounds_until_ended(backend, task, deadline_s: float, adopted=None):
    """The status rounds over one task on a real backend (``adopted``: a dead run's task it
    takes over), a round a second until the task ends: its outcome, and the seconds from
    the rounds' start to that end."""
    rounds = Rounds(backend)
    began = time.monotonic()
    chain = rounds.start([task], adopted=adopted)
    ended = {}
    wait_for(lambda: ended.update(rounds.step([chain]).ended) or chain in ended, deadline_s,
             "the task to end", interval=1)
    took = time.monotonic() - began
    rounds.release(chain)
    return ended[chain], took


# ---------------------------------------------------------------- object storage (staging)


def ctrl_c(proc: subprocess.Popen, timeout: float = 60) -> tuple:
    """Send SIGINT to a running crank, as Ctrl-C does: (seconds until it exited, its stderr).
    A process still running after ``timeout`` is killed, its stderr's end printed."""
    interrupted = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        print(proc.communicate()[1][-5000:])
        raise
    return time.monotonic() - interrupted, stderr


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


KEPT = []  # the servers this session uses (services.Kept)


def say(config, line: str) -> None:
    """One line on the terminal, also from a worker of a parallel run (whose own terminal
    output nobody sees)."""
    reporter = None if is_worker(config) else config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\n{line}", red=True)
    else:
        sys.__stderr__.write(f"\n{line}\n")
        sys.__stderr__.flush()


@pytest.fixture(autouse=True)
def _servers_alive(request):
    """A server that died during a test (Funnel has crashed so) is started again for the
    next one, with one line saying so, instead of failing every later test."""
    for kept in KEPT:
        try:
            line = kept.revive()
        except services.ServiceError as e:
            line = f"{kept.name} had stopped answering and could not be started again: {e}"
        if line:
            say(request.config, line)


@pytest.fixture(scope="session")
def s3():
    """SeaweedFS, reused when it already answers, else started for this session and stopped after."""
    try:
        with services.seaweedfs(stop=not PARALLEL) as kept:
            KEPT.append(kept)
            yield S3Server(kept.values)
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


LOUD_SKIPS = []  # why tests of a missing service were skipped, repeated in the terminal summary


def tes_skipped(reason) -> str:
    return (f"TES TESTS SKIPPED: no Funnel ({reason}): put a funnel {services.FUNNEL_VERSION} "
            "binary on PATH or in CRANK_FUNNEL")


@pytest.fixture(scope="session")
def tes(s3):
    """Funnel, reused when it already answers, else started for this session and stopped after;
    or a skip saying loudly what is missing."""
    try:
        with services.funnel(s3.values, stop=not PARALLEL) as kept:
            KEPT.append(kept)
            yield TesServer(kept.url, s3)
    except services.Unavailable as e:
        LOUD_SKIPS.append(tes_skipped(e))
        pytest.skip(LOUD_SKIPS[0])
    except services.ServiceError as e:
        pytest.fail(f"Funnel: {e}", pytrace=False)


CHROMIUM = "chromium"
BROWSER_SKIPPED = ("BROWSER TEST SKIPPED: no chromium on PATH (scripts/setup.sh installs Debian's "
                   "chromium; apt-get install chromium)")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, or a skip saying loudly that it is missing."""
    path = shutil.which(CHROMIUM)
    if path is None:
        LOUD_SKIPS.append(BROWSER_SKIPPED)
        pytest.skip(BROWSER_SKIPPED)
    return path


def slurm_skipped(reason) -> str:
    return f"FUNNEL-ON-SLURM TESTS SKIPPED: {reason}"


@pytest.fixture(scope="session")
def tes_slurm(s3):
    """A one-node Slurm and a Funnel whose tasks it runs (``.slurm``: the cluster), reused
    when they answer, else started for this session and stopped after; or a loud skip when
    Slurm or Funnel is not installed."""
    try:
        with services.funnel_on_slurm(s3.values, stop=not PARALLEL) as kept:
            KEPT.append(kept)
            server = TesServer(kept.url, s3)
            server.slurm = kept.slurm
            yield server
    except services.Unavailable as e:
        LOUD_SKIPS.append(slurm_skipped(e))
        pytest.skip(LOUD_SKIPS[-1])
    except services.ServiceError as e:
        pytest.fail(f"Funnel on Slurm: {e}", pytrace=False)


@pytest.fixture
def aws_env(tes, monkeypatch):
    """The store's credentials in this process's environment, for tests that drive the TES
    backend in-process."""
    for key, value in tes.s3.env().items():
        monkeypatch.setenv(key, value)
    return tes


# ---------------------------------------------------------------- crank on a backend


class Crank:
    """crank on one backend through the real snakemake CLI, as a user runs it; and what it
    left on that backend for a workdir."""

    backend = ""

    def command(self, workdir: Path, *args: str) -> list:
        raise NotImplementedError

    def env(self) -> dict:
        return {**os.environ, "PYTHONUNBUFFERED": "1"}

    def run(self, workdir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(workdir, *args), cwd=workdir, capture_output=True,
                              text=True, timeout=timeout, env=self.env(), stdin=subprocess.DEVNULL)

    def start(self, workdir: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(self.command(workdir, *args), cwd=workdir, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env or self.env(),
                                stdin=subprocess.DEVNULL)

    def live(self, workdir: Path) -> list:
        """The containers or tasks of the workdir that have not ended (or not been removed)."""
        raise NotImplementedError

    def running(self, workdir: Path) -> list:
        """Those of them that run."""
        raise NotImplementedError


class OnDocker(Crank):
    backend = "docker"

    def __init__(self, api):
        self.api = api

    def command(self, workdir: Path, *args: str) -> list:
        return snakemake_command(*args)

    def live(self, workdir: Path) -> list:
        return containers_of(self.api, workdir)

    def running(self, workdir: Path) -> list:
        return [c for c in containers_of(self.api, workdir) if c["State"] == "running"]


class OnDockerCopying(OnDocker):
    """crank on the shared engine, made to copy each job's files as for an engine on
    another machine."""

    backend = "docker-copy"

    def command(self, workdir: Path, *args: str) -> list:
        return snakemake_command("--crank-docker-files", "copy", *args)


class OnTes(Crank):
    backend = "tes"

    def __init__(self, tes: TesServer):
        self.tes = tes

    def command(self, workdir: Path, *args: str) -> list:
        return tes_command(self.tes, workdir, *args)

    def env(self) -> dict:
        return self.tes.env()

    def live(self, workdir: Path) -> list:
        return live_tasks(self.tes, workdir)

    def running(self, workdir: Path) -> list:
        return running_tasks(self.tes, workdir)


@pytest.fixture(params=[pytest.param("docker", marks=pytest.mark.docker),
                        pytest.param("tes", marks=pytest.mark.tes)])
def crank(request) -> Crank:
    """crank on each backend in turn (the marks select them: ``-m "not tes"``)."""
    if request.param == "docker":
        return OnDocker(request.getfixturevalue("docker_api"))
    return OnTes(request.getfixturevalue("tes"))


def tes_run(tes: TesServer, workdir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return OnTes(tes).run(workdir, *args, timeout=timeout)


def tes_start(tes: TesServer, workdir: Path, *args: str) -> subprocess.Popen:
    return OnTes(tes).start(workdir, *args)


def tes_command(tes: TesServer, workdir: Path, *args: str) -> list:
    """The real snakemake CLI with crank on Funnel, a storage prefix of this test's own
    (named after the workdir's parent); a later --crank-tes-url in ``args`` wins."""
    return [
        sys.executable, "-m", "snakemake", "--executor", "crank", "--jobs", "4",
        "--crank-backend", "tes", "--crank-tes-url", tes.url,
        "--crank-storage-prefix", tes.prefix(workdir.parent.name),
        "--crank-default-image", BUSYBOX, "--seconds-between-status-checks", "1", *args,
    ]


NON_TERMINAL = {"UNKNOWN", "QUEUED", "INITIALIZING", "RUNNING", "PAUSED"}


def tasks_of(tes: TesServer, workdir: Path) -> list:
    """Every task of the workdir on the server (BASIC view)."""
    from snakemake_executor_plugin_crank.backends.tes.tasks import TAG_WORKDIR, workdir_tag

    answer = requests.get(f"{tes.url}/v1/tasks", params={
        "tag_key": TAG_WORKDIR, "tag_value": workdir_tag(str(workdir)), "view": "BASIC",
        "page_size": 2047}, timeout=30)
    answer.raise_for_status()
    return answer.json().get("tasks") or []


def live_tasks(tes: TesServer, workdir: Path) -> list:
    return [t for t in tasks_of(tes, workdir) if t.get("state") in NON_TERMINAL]


def running_tasks(tes: TesServer, workdir: Path) -> list:
    return [t for t in tasks_of(tes, workdir) if t["state"] == "RUNNING"]


def proxy_to(tes: TesServer, **kwargs):
    """The fault proxy on a free loopback port in front of Funnel."""
    from faultproxy import FaultProxy

    host, port = tes.url.rsplit("//", 1)[1].split(":")
    return FaultProxy(("127.0.0.1", 0), (host, int(port)), **kwargs)


def slow_workflow(tmp_path: Path, seconds: int) -> Path:
    """A one-job workflow whose job sleeps ``seconds``, with a storage prefix of its own."""
    workdir = tmp_path / uuid.uuid4().hex / "wf"
    workdir.mkdir(parents=True)
    (workdir / "Snakefile").write_text(
        f'rule slow:\n    output: "slow.txt"\n    shell: "sleep {seconds}; echo done > {{output}}"\n'
    )
    return workdir


def status_request(method: str, path: str) -> bool:
    """A request of a status round: a task list, or one task by id when few are watched."""
    return method == "GET" and (path == "/tasks" or path.startswith("/tasks/"))


# ---------------------------------------------------------------- parallel runs (pytest -n N)

# In a worker of a parallel run: the servers are the whole run's, started and stopped by the
# controller; a worker may start one again that died, never stops one.
PARALLEL = bool(os.environ.get("PYTEST_XDIST_WORKER"))
STARTED_BY_CONTROLLER = []  # services.Kept


def is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config):
    """The controller of a parallel run starts the servers before its workers start, so
    that no two workers start one at once and none stops one that another still uses."""
    if is_worker(config) or not getattr(config.option, "numprocesses", None):
        return
    try:
        with contextlib.ExitStack() as stack:
            s3 = stack.enter_context(services.seaweedfs(stop=False))
            STARTED_BY_CONTROLLER.append(s3)
            try:
                STARTED_BY_CONTROLLER.append(stack.enter_context(services.funnel(s3.values, stop=False)))
            except services.Unavailable as e:
                LOUD_SKIPS.append(tes_skipped(e))
            try:
                STARTED_BY_CONTROLLER.append(
                    stack.enter_context(services.funnel_on_slurm(s3.values, stop=False)))
            except services.Unavailable as e:
                LOUD_SKIPS.append(slurm_skipped(e))
            if not shutil.which(CHROMIUM):
                LOUD_SKIPS.append(BROWSER_SKIPPED)
    except services.ServiceError as e:
        raise pytest.UsageError(f"a test server did not start: {e}") from None


def pytest_unconfigure(config):
    """The controller stops what the run started, workers' restarts included (pid files)."""
    for kept in reversed(STARTED_BY_CONTROLLER):
        if kept.started:
            kept.stop_recorded()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The slowest tests first, so that a parallel run does not end waiting for one of them;
    the tests of a module with a private Docker engine in one worker (one engine per module)."""
    for item in items:
        if "engine" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_terminal_summary(terminalreporter):
    for line in dict.fromkeys(LOUD_SKIPS):
        terminalreporter.write_line(line, yellow=True, bold=True)
