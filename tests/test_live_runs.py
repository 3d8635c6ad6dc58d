"""Two crank runs in one workdir, as Snakemake allows when their outputs differ: the second
run's start-up leaves the first run's containers (Docker) and tasks (TES) alone; what a
dead run left is still removed (docs/reliability.md, promise 9)."""

import contextlib
import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import docker.errors
import pytest

from snakemake_executor_plugin_crank import runs

from conftest import BUSYBOX, OnDocker, containers_of, snakemake, tasks_of, wait_for

# rule a runs until the test creates "go" in the workdir (at most two minutes)
SNAKEFILE = """
rule a:
    output: "a.txt"
    shell: "i=0; while [ ! -e go ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; echo a > {output}"

rule b:
    output: "b.txt"
    shell: "echo b > {output}"
"""


def workflow(tmp_path: Path) -> Path:
    workdir = tmp_path / uuid.uuid4().hex / "wf"
    workdir.mkdir(parents=True)
    (workdir / "Snakefile").write_text(SNAKEFILE)
    return workdir


def run_files(workdir: Path):
    directory = workdir / runs.RUNS_DIR
    return sorted(p for p in directory.iterdir() if not p.name.startswith(".")) if directory.is_dir() else []


def the_run_of(proc: subprocess.Popen, workdir: Path) -> str:
    """The id of the run of ``proc``, from its run file, checked."""
    [path] = run_files(workdir)
    owner = json.loads(path.read_text())
    assert owner == {"pid": proc.pid, "host": socket.gethostname(),
                     "started": runs.process_start(proc.pid)}
    return path.name


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


def long_script(workdir: Path, run_id: str) -> Path:
    """A script the run wrote for a command too long for a container's argv, as it would."""
    path = workdir / ".snakemake" / "crank" / "scripts" / run_id / "a.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("echo a\n")
    return path


def half_download(workdir: Path, run_id: str) -> Path:
    """A product the run was downloading on TES when it died, as it would leave it."""
    path = workdir / ".snakemake" / "crank" / "tmp" / run_id / "0-1" / ".a.txt.crank-0123.part"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("a")
    return path


def identity(found: dict) -> str:
    """A container's or a task's id."""
    return found.get("Id") or found["id"]


def start_run_a(crank, workdir: Path, *args: str):
    """Run a, once its container or task runs: its process, its run id, and what runs it."""
    first = crank.start(workdir, "a.txt", *args)
    try:
        run_a = wait_for(lambda: run_files(workdir) and the_run_of(first, workdir), 60, "run a's file")
        [running] = wait_for(lambda: crank.running(workdir), 90, "run a's task running")
    except BaseException:
        first.kill()
        raise
    return first, run_a, running


def let_a_finish(crank, docker_api, running: dict, workdir: Path) -> None:
    """Create "go" in the workdir, where rule a's job looks for it: on TES no filesystem is
    shared with the task, so through the container Funnel runs its first executor in
    (named after the task)."""
    if crank.backend == "docker":
        (workdir / "go").touch()
        return
    exec_id = docker_api.exec_create(f"{running['id']}-0", ["touch", str(workdir / "go")])["Id"]
    docker_api.exec_start(exec_id)
    assert docker_api.exec_inspect(exec_id)["ExitCode"] == 0


def rerun_a(crank, docker_api, running: dict, workdir: Path, *args: str, env=None) -> str:
    """Run a again once run a was killed (``running``: what ran it), letting a finish once the
    rerun has begun: the rerun's stderr, checked to have succeeded."""
    second = crank.start(workdir, "a.txt", "--rerun-incomplete", *args, env=env)
    try:
        wait_for(lambda: len(run_files(workdir)) == 2, 60, "the rerun's file")
        let_a_finish(crank, docker_api, running, workdir)
        return finish(second)
    finally:
        second.kill()


def test_a_second_run_in_the_workdir_leaves_the_first_running(crank, docker_api, tmp_path):
    workdir = workflow(tmp_path)
    first, run_a, running = start_run_a(crank, workdir)
    try:
        script, partial = long_script(workdir, run_a), half_download(workdir, run_a)
        second = crank.run(workdir, "b.txt")
        assert second.returncode == 0, second.stderr[-3000:]
        assert "left by an earlier run" not in second.stderr
        assert [identity(r) for r in crank.running(workdir)] == [identity(running)]
        assert script.exists() and partial.exists()
        let_a_finish(crank, docker_api, running, workdir)
        finish(first)
    finally:
        first.kill()
    assert (workdir / "a.txt").read_text() == "a\n"
    assert (workdir / "b.txt").read_text() == "b\n"
    if crank.backend == "tes":
        assert len(tasks_of(crank.tes, workdir)) == 2
    assert run_files(workdir) == []  # each run removed its own at the end


def test_what_a_killed_run_left_is_removed(crank, tmp_path):
    workdir = workflow(tmp_path)
    first, run_a, running = start_run_a(crank, workdir)
    first.kill()  # SIGKILL: no clean-up, the run file stays
    first.wait()
    if crank.backend == "tes":
        assert running["tags"]["crank-run"] == run_a
    script, partial = long_script(workdir, run_a), half_download(workdir, run_a)
    second = crank.run(workdir, "b.txt")
    assert second.returncode == 0, second.stderr[-3000:]
    what = "container" if crank.backend == "docker" else "task"
    assert f"removed 1 {what}(s) left by an earlier run" in second.stderr
    assert crank.live(workdir) == []
    if crank.backend == "docker":
        assert crank.api.containers(all=True, filters={"label": f"crank.run={run_a}"}) == []
        assert not script.parent.exists()
    else:
        states = {t["id"]: t["state"] for t in tasks_of(crank.tes, workdir)}
        assert states[running["id"]] in ("CANCELED", "CANCELING")
        assert not partial.parent.parent.exists()
    assert run_files(workdir) == []


# ---------------------------------------------------------------- the run file itself


def test_a_run_file_names_a_live_run_only_while_its_process_runs(tmp_path):
    path = runs.record(str(tmp_path), "mine")
    assert runs.live_runs(str(tmp_path)) == {"mine"}
    owner = json.loads(Path(path).read_text())
    directory = Path(path).parent
    # the same pid, started at another time: the pid was reused, that run is dead
    (directory / "reused").write_text(json.dumps({**owner, "started": owner["started"] + 1}))
    (directory / "elsewhere").write_text(json.dumps({**owner, "host": "another-host"}))
    # another host's run whose lease lapsed: dead, whatever its host (a container's new name)
    (directory / "lapsed").write_text(json.dumps({**owner, "host": "another-host"}))
    lapsed = time.time() - runs.LEASE_S - 60
    os.utime(directory / "lapsed", (lapsed, lapsed))
    (directory / "garbage").write_text("{")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (directory / "dead").write_text(json.dumps({**owner, "pid": dead.pid}))
    assert runs.survey(str(tmp_path)) == ({"mine", "elsewhere"}, {"reused", "dead", "lapsed"})
    # a dead run's file stays for the run that adopts its tasks; garbage goes
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")) == [
        "dead", "elsewhere", "lapsed", "mine", "reused"]
    runs.forget_run(str(tmp_path), "dead")
    runs.forget_run(str(tmp_path), "reused")
    runs.forget_run(str(tmp_path), "lapsed")
    runs.forget(path)
    assert runs.live_runs(str(tmp_path)) == {"elsewhere"}


def test_a_live_run_renews_its_lease(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "RENEW_S", 0.05)
    path = runs.record(str(tmp_path), "mine")
    try:
        long_ago = time.time() - 3600
        os.utime(path, (long_ago, long_ago))
        wait_for(lambda: os.stat(path).st_mtime > long_ago + 3000, 10, "the lease to be renewed")
    finally:
        runs.forget(path)
    assert not os.path.exists(path)


def test_a_killed_run_of_another_host_is_dead_once_its_lease_lapsed(crank, docker_api, tmp_path):
    """Snakemake in a container has a new host name each time: the rerun cannot check the
    killed run's process, but its lease lapsed, so it adopts the task (no second writer of
    a.txt) and removes the dead run's file."""
    workdir = workflow(tmp_path)
    # on Docker a container of its own: a warm runner runs before its job does
    cold = ("--crank-docker-warm", "no") if crank.backend == "docker" else ()
    first, run_a, running = start_run_a(crank, workdir, *cold)
    first.kill()
    first.wait()
    path = workdir / runs.RUNS_DIR / run_a
    path.write_text(json.dumps({**json.loads(path.read_text()), "host": "a-container-gone"}))
    lapsed = time.time() - runs.LEASE_S - 60
    os.utime(path, (lapsed, lapsed))
    assert crank.run(workdir, "--unlock").returncode == 0
    stderr = rerun_a(crank, docker_api, running, workdir, *cold)
    assert "adopts the" in stderr, stderr[-3000:]
    assert (workdir / "a.txt").read_text() == "a\n"
    if crank.backend == "tes":
        assert len(tasks_of(crank.tes, workdir)) == 1
    assert run_files(workdir) == []


SLOW_TO_DESCRIBE = """
import time
from snakemake_executor_plugin_crank.adapter import jobs

described = jobs.tasks_for


def tasks_for(*args, **kwargs):
    time.sleep(2)  # meanwhile Snakemake's status thread runs its rounds, ten a second
    return described(*args, **kwargs)


jobs.tasks_for = tasks_for
"""


@pytest.mark.docker
def test_a_job_slow_to_describe_still_adopts_what_a_killed_run_left(docker_api, tmp_path):
    """The status rounds run in Snakemake's own thread while a job is handed over: one that
    counted the job as handed over before its adoption canceled the task it was to adopt
    (a rerun on a busy machine did the work anew now and then)."""
    crank = OnDocker(docker_api)
    workdir = workflow(tmp_path)
    first, _, running = start_run_a(crank, workdir, "--crank-docker-warm", "no")
    first.kill()
    first.wait()
    assert crank.run(workdir, "--unlock").returncode == 0
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_TO_DESCRIBE)
    env = {**crank.env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(slow), os.environ.get("PYTHONPATH")]))}
    stderr = rerun_a(crank, docker_api, running, workdir, "--crank-docker-warm", "no", env=env)
    assert "adopts the" in stderr and "removed 1 container" not in stderr, stderr[-3000:]
    assert (workdir / "a.txt").read_text() == "a\n"


@pytest.mark.docker
def test_a_container_of_another_directory_at_the_same_path_is_left_alone(docker_api, tmp_path):
    """A shared engine, two machines running in the same path: the other one's container
    survives this run's start, with one line; a crashed run's of this directory does not."""
    workdir = workflow(tmp_path)
    labels = {"crank.workdir": str(workdir), "crank.run": "crashed", "crank.job": "1"}
    made = [docker_api.create_container(BUSYBOX, ["sleep", "600"], labels={**labels, **extra})["Id"]
            for extra in ({}, {"crank.origin": "another-machine"})]
    for container in made:
        docker_api.start(container)
    ours, theirs = made
    try:
        done = snakemake(workdir, "b.txt")
        assert done.returncode == 0, done.stderr[-3000:]
        said = [line for line in done.stderr.splitlines() if "come from another directory at this path" in line]
        assert len(said) == 1 and "1 container(s)" in said[0], done.stderr[-3000:]
        assert docker_api.inspect_container(theirs)["State"]["Running"]
        assert [c["Id"] for c in containers_of(docker_api, workdir)] == [theirs]
    finally:
        for container in made:
            with contextlib.suppress(docker.errors.NotFound):
                docker_api.remove_container(container, force=True)
