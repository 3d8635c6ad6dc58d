"""Warm runners (backends/docker/) against the real Docker engine: a task run by exec in a
reused container must see and report what a container of its own would give it."""

import os
import uuid
from pathlib import Path

import pytest

from snakemake_executor_plugin_crank.backends.docker import DockerBackend, DockerOptions
from snakemake_executor_plugin_crank.backends.docker.scratch import empty as _empty
from snakemake_executor_plugin_crank.task import Resources, State, TaskSpec

from conftest import BUSYBOX, BASH, copy_workflow, containers_of, snakemake, wait_for

pytestmark = pytest.mark.docker


def _task(tmp_path, name, script, image=BUSYBOX, **resources):
    return TaskSpec(name=name, label=f"rule {name}", job_id=name, attempt=1, image=image,
                    script=script, workdir=str(tmp_path), env={"TMPDIR": "/tmp", "X": "1"},
                    resources=Resources(**resources), log_dir=str(tmp_path / "logs"))


def _run(backend, task):
    handle = backend.submit(task)
    wait_for(lambda: backend.poll([handle])[handle] is State.FINISHED, 60, f"{task.name} to end",
             interval=0.05)
    result = backend.result(handle, task)
    backend.release([handle])
    return handle, result


@pytest.fixture
def both(docker_api, tmp_path):
    """A cold and a warm backend on the same workdir."""
    run = uuid.uuid4().hex
    cold = DockerBackend(run, str(tmp_path))
    warm = DockerBackend(run, str(tmp_path), DockerOptions(warm=True))
    yield cold, warm
    warm.close()
    cold.close()
    assert docker_api.containers(all=True, filters={"label": f"crank.run={run}"}) == []


@pytest.mark.parametrize("image", [BUSYBOX, BASH])
def test_same_exit_code_logs_and_environment_as_a_container_of_its_own(both, tmp_path, image):
    cold, warm = both
    script = ("echo out; echo err >&2; printf 'no newline' >&2; env | sort | grep -v '^HOSTNAME='; "
              "id; pwd; ls -A /tmp /dev/shm | grep -v '^$' | grep -v \"$(basename $PWD)\"; exit 7")
    outputs = {}
    for kind, backend in (("cold", cold), ("warm", warm)):
        task = _task(tmp_path, f"same-{kind}", script, image=image)
        handle, result = _run(backend, task)
        assert handle.startswith("warm:") == (kind == "warm")
        assert (result.ok, result.exit_code, result.reason) == (False, 7, None)
        assert result.stderr_tail == "err\nno newline"
        logs = tmp_path / "logs"
        outputs[kind] = (logs / f"{task.name}.stdout").read_text()
        assert (logs / f"{task.name}.stderr").read_text() == "err\nno newline"
        assert result.log_files == (str(logs / f"{task.name}.stdout"), str(logs / f"{task.name}.stderr"))
    assert outputs["warm"] == outputs["cold"]


def test_each_task_gets_an_empty_private_tmp_and_no_leftover_process(both, tmp_path):
    _, warm = both
    first = _task(tmp_path, "first", "touch /tmp/a /dev/shm/b; mkdir -p /tmp/d/e; "
                  "chmod 500 /tmp/d; (sleep 300 &); echo started")
    _, result = _run(warm, first)
    assert result.ok, result
    runners = len(warm.warm.containers.by_id)
    wait_for(lambda: sum(map(len, warm.warm.containers.idle.values())) == 1, 30, "the runner to be idle again")
    second = _task(tmp_path, "second", "ls -A /tmp /dev/shm | grep -v '^$'; ps -o args | grep -c '^sleep 30[0]' || true")
    _, result = _run(warm, second)
    assert result.ok, result
    listing = (tmp_path / "logs" / "second.stdout").read_text().split("\n")
    # /tmp holds only the directory on the way to the mounted workdir; no 'sleep 300' left
    assert listing[:4] == ["/dev/shm:", "/tmp:", str(tmp_path).split("/")[2], "0"]
    assert len(warm.warm.containers.by_id) == runners  # the runner was reused


def test_a_task_that_changes_the_container_file_system_is_not_followed_in_it(both, tmp_path):
    _, warm = both
    _, result = _run(warm, _task(tmp_path, "writer", "echo x > /etc/crank-was-here"))
    assert result.ok
    wait_for(lambda: warm.warm.stats.reasons.get("its file system changed"), 30, "the runner's removal")
    _, result = _run(warm, _task(tmp_path, "reader", "test ! -e /etc/crank-was-here"))
    assert result.ok, result


def test_out_of_memory_is_reported_like_a_container_of_its_own(both, tmp_path):
    cold, warm = both
    script = "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo ${#x}"
    results = [_run(b, _task(tmp_path, f"oom-{i}", script, mem_mb=20))[1] for i, b in enumerate(both)]
    assert results[1].exit_code == results[0].exit_code == 137
    assert results[1].reason == results[0].reason
    assert "out of memory" in results[1].reason and not results[1].ok


def test_stop_kills_the_task_and_keeps_its_logs(both, tmp_path):
    _, warm = both
    task = _task(tmp_path, "long", "echo started >&2; sleep 600")
    handle = warm.submit(task)

    def scratch():  # the exec writes its logs in the runner's scratch directory first
        job = warm.warm.jobs[handle]
        return job.runner and Path(job.runner.logs, "long.stderr")

    wait_for(lambda: warm.poll([handle])[handle] is State.RUNNING
             and scratch() and scratch().exists() and scratch().read_text(), 60, "the task to start")
    warm.stop(handle)
    wait_for(lambda: warm.poll([handle])[handle] is State.FINISHED, 60, "the task to end")
    result = warm.result(handle, task)
    assert (result.ok, result.exit_code, result.stderr_tail) == (False, 137, "started")
    assert (tmp_path / "logs" / "long.stderr").read_text() == "started\n"


def test_cancel_removes_the_runner(both, docker_api, tmp_path):
    _, warm = both
    task = _task(tmp_path, "canceled", "sleep 600")
    handle = warm.submit(task)
    wait_for(lambda: warm.poll([handle])[handle] is State.RUNNING, 60, "the task to start")
    warm.cancel([handle])
    assert containers_of(docker_api, tmp_path) == []


def test_the_opt_out_runs_one_container_per_job(docker_api, tmp_path):
    workdir = copy_workflow("failing", tmp_path / "wf")
    done = snakemake(workdir, "greedy", "--max-threads", "1", "--crank-docker-warm", "no")
    assert done.returncode == 0, done.stderr
    assert (workdir / "greedy.txt").read_text() == "1\n"


def test_emptying_keeps_the_way_to_mounts_and_nothing_else(tmp_path):
    root = tmp_path / "tmp"
    (root / "a" / "wd").mkdir(parents=True)
    (root / "a" / "stray").write_text("x")
    (root / "b" / "c").mkdir(parents=True)
    (root / "b" / "c" / "f").write_text("x")
    os.chmod(root / "b" / "c", 0o500)
    (root / ".hidden").write_text("x")
    os.symlink("/etc", root / "link")
    _empty(str(root), ["a/wd"])
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == ["a", "a/wd"]
    assert (root.stat().st_mode & 0o7777) == 0o1777


# ---------------------------------------------------------------- faults of the warm path


@pytest.fixture
def events_refused(docker_api, tmp_path):
    """A warm backend whose engine refuses the event stream (a fault proxy in front of
    the real engine): every end must be found by the safety net's checks."""
    from faultproxy import FaultProxy

    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        pytest.skip("the fault proxy needs the engine on a Unix socket")
    engine = host[len("unix://"):]
    run = uuid.uuid4().hex
    with FaultProxy(str(tmp_path / "p.sock"), engine) as proxy:
        proxy.set_rule(lambda method, path: "refuse" if path.startswith("/events") else "pass")
        backend = DockerBackend(run, str(tmp_path), DockerOptions(base_url=proxy.url, warm=True))
        backend.warm.watcher.check_interval = backend.warm.watcher.check_age = 0.2
        try:
            yield backend, proxy
        finally:
            backend.close()
    assert docker_api.containers(all=True, filters={"label": f"crank.run={run}"}) == []


def test_an_end_the_event_stream_never_brings_is_found_by_the_checks(events_refused, tmp_path):
    backend, proxy = events_refused
    task = _task(tmp_path, "unseen", "echo out; echo err >&2; exit 3")
    handle, result = _run(backend, task)
    assert handle.startswith("warm:")
    assert (result.ok, result.exit_code, result.stderr_tail) == (False, 3, "err")
    assert (tmp_path / "logs" / "unseen.stdout").read_text() == "out\n"
    assert proxy.actions("refuse") and not backend.warm.watcher.stream_ok


@pytest.mark.parametrize("events", ["stream", "checks"])
def test_a_runner_killed_under_its_task_ends_the_task_at_once_as_interrupted(docker_api, tmp_path, events, request):
    if events == "stream":
        backend = DockerBackend(uuid.uuid4().hex, str(tmp_path), DockerOptions(warm=True))
        request.addfinalizer(backend.close)
    else:
        backend, _ = request.getfixturevalue("events_refused")
    task = _task(tmp_path, "victim", "echo started >&2; sleep 600")
    handle = backend.submit(task)
    wait_for(lambda: backend.poll([handle])[handle] is State.RUNNING, 60, "the task to start")
    runner = backend.warm.jobs[handle].runner
    docker_api.kill(runner.id)  # not crank: as an engine stopping or someone killing it
    # not the task's doing: the status rounds run it again once (test_runner.py)
    wait_for(lambda: backend.poll([handle])[handle] is State.INTERRUPTED, 30, "the task to end")
    result = backend.result(handle, task)
    assert not result.ok
    assert "its container stopped while the task ran" in result.reason
    backend.release([handle])
    wait_for(lambda: runner.id not in backend.warm.containers.by_id, 30, "the dead runner's removal")


HARD_KILLED = """
import os, sys, time, uuid
from snakemake_executor_plugin_crank.backends.docker import DockerBackend, DockerOptions
from snakemake_executor_plugin_crank.task import Resources, TaskSpec
workdir = sys.argv[1]
backend = DockerBackend(uuid.uuid4().hex, workdir, DockerOptions(warm=True))
task = TaskSpec(name="held", label="rule held", job_id="1", attempt=1, image=sys.argv[2],
                script="sleep 600", workdir=workdir, env={}, resources=Resources(),
                log_dir=os.path.join(workdir, "logs"))
backend.submit(task)
deadline = time.monotonic() + 60
while time.monotonic() < deadline and not backend.warm.busy:
    time.sleep(0.05)
print(backend.warm.containers.root, flush=True)
os._exit(9)  # killed hard: no clean-up at all
"""


def test_a_run_killed_hard_leaves_nothing_after_the_next_start(docker_api, tmp_path):
    import subprocess
    import sys

    workdir = tmp_path / "wd"
    workdir.mkdir()
    done = subprocess.run([sys.executable, "-c", HARD_KILLED, str(workdir), BUSYBOX],
                          capture_output=True, text=True, timeout=120)
    root = Path(done.stdout.strip())
    assert root.name.startswith("crank-warm-") and root.is_dir(), done.stderr
    assert containers_of(docker_api, workdir)
    # a directory of a run in another workdir is not this run's to remove
    other = tmp_path / "other"
    other.mkdir()
    elsewhere = DockerBackend(uuid.uuid4().hex, str(other), DockerOptions(warm=True))
    try:
        elsewhere.warm.containers.make_root()
        backend = DockerBackend(uuid.uuid4().hex, str(workdir), DockerOptions(warm=True))
        try:
            assert backend.gather_orphans(live_runs=(), dead_runs=()) == (1, 0)
            assert not root.exists()
            assert Path(elsewhere.warm.containers.root).is_dir()
            assert containers_of(docker_api, workdir) == []
        finally:
            backend.close()
    finally:
        elsewhere.close()
    assert not Path(elsewhere.warm.containers.root).exists()
