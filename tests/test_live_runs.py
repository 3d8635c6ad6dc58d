"""Two crank runs in one workdir, as Snakemake allows when their outputs differ: the second
run's start-up leaves the first run's containers (Docker) and tasks (TES) alone; what a
dead run left is still removed (docs/reliability.md, promise 9)."""

import json
import os
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from snakemake_executor_plugin_crank import runs

from conftest import snakemake, snakemake_command, wait_for
from test_tes import running_tasks, start_crank, tasks_of

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


# ---------------------------------------------------------------- Docker


def start_snakemake(workdir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        snakemake_command(*args), cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL,
    )


def running_containers(api, run_id: str):
    return api.containers(filters={"label": f"crank.run={run_id}", "status": "running"})


def start_run_a(docker_api, workdir: Path):
    """Run a, once its container runs: its process and its run id."""
    first = start_snakemake(workdir, "a.txt")
    try:
        run_a = wait_for(lambda: run_files(workdir) and the_run_of(first, workdir), 60, "run a's file")
        wait_for(lambda: running_containers(docker_api, run_a), 60, "run a's container running")
    except BaseException:
        first.kill()
        raise
    return first, run_a


def long_script(workdir: Path, run_id: str) -> Path:
    """A script the run wrote for a command too long for a container's argv, as it would."""
    path = workdir / ".snakemake" / "crank" / "scripts" / run_id / "a.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("echo a\n")
    return path


@pytest.mark.docker
def test_a_second_run_in_the_workdir_leaves_the_first_running_docker(docker_api, tmp_path):
    workdir = workflow(tmp_path)
    first, run_a = start_run_a(docker_api, workdir)
    try:
        script = long_script(workdir, run_a)
        second = snakemake(workdir, "b.txt")
        assert second.returncode == 0, second.stderr[-3000:]
        assert "left by an earlier run" not in second.stderr
        assert running_containers(docker_api, run_a)
        assert script.exists()
        (workdir / "go").touch()
        finish(first)
    finally:
        first.kill()
    assert (workdir / "a.txt").read_text() == "a\n"
    assert (workdir / "b.txt").read_text() == "b\n"
    assert run_files(workdir) == []  # each run removed its own at the end


@pytest.mark.docker
def test_the_containers_of_a_killed_run_are_removed_docker(docker_api, tmp_path):
    workdir = workflow(tmp_path)
    first, run_a = start_run_a(docker_api, workdir)
    first.kill()  # SIGKILL: no clean-up, the run file stays
    first.wait()
    script = long_script(workdir, run_a)
    second = snakemake(workdir, "b.txt")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "removed 1 container(s) left by an earlier run" in second.stderr
    assert docker_api.containers(all=True, filters={"label": f"crank.run={run_a}"}) == []
    assert run_files(workdir) == []
    assert not script.parent.exists()


# ---------------------------------------------------------------- TES


def let_task_finish(docker_api, task_id: str, workdir: Path) -> None:
    """Create "go" in the task's workdir: no filesystem is shared with a TES task, so through
    the container Funnel runs its first executor in (named after the task)."""
    exec_id = docker_api.exec_create(f"{task_id}-0", ["touch", str(workdir / "go")])["Id"]
    docker_api.exec_start(exec_id)
    assert docker_api.exec_inspect(exec_id)["ExitCode"] == 0


@pytest.mark.tes
def test_a_second_run_in_the_workdir_leaves_the_first_running_tes(tes, docker_api, tmp_path):
    workdir = workflow(tmp_path)
    first = start_crank(tes, workdir, "a.txt")
    try:
        [task_a] = wait_for(lambda: running_tasks(tes, workdir), 90, "run a's task running")
        done = start_crank(tes, workdir, "b.txt")
        finish(done)
        assert [t["id"] for t in running_tasks(tes, workdir)] == [task_a["id"]]
        let_task_finish(docker_api, task_a["id"], workdir)
        finish(first)
    finally:
        first.kill()
    assert (workdir / "a.txt").read_text() == "a\n"
    assert (workdir / "b.txt").read_text() == "b\n"
    assert len(tasks_of(tes, workdir)) == 2
    assert run_files(workdir) == []


@pytest.mark.tes
def test_the_tasks_of_a_killed_run_are_canceled_tes(tes, tmp_path):
    workdir = workflow(tmp_path)
    first = start_crank(tes, workdir, "a.txt")
    try:
        [task_a] = wait_for(lambda: running_tasks(tes, workdir), 90, "run a's task running")
        assert task_a["tags"]["crank-run"] == the_run_of(first, workdir)
    finally:
        first.kill()
        first.wait()
    stderr = finish(start_crank(tes, workdir, "b.txt"))
    assert "removed 1 task(s) left by an earlier run" in stderr
    states = {t["id"]: t["state"] for t in tasks_of(tes, workdir)}
    assert states[task_a["id"]] in ("CANCELED", "CANCELING")
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
    (directory / "garbage").write_text("{")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (directory / "dead").write_text(json.dumps({**owner, "pid": dead.pid}))
    assert runs.survey(str(tmp_path)) == ({"mine", "elsewhere"}, {"reused", "dead"})
    # a dead run's file stays for the run that adopts its tasks; garbage goes
    assert sorted(p.name for p in directory.iterdir()) == ["dead", "elsewhere", "mine", "reused"]
    runs.forget_run(str(tmp_path), "dead")
    runs.forget_run(str(tmp_path), "reused")
    runs.forget(path)
    assert runs.live_runs(str(tmp_path)) == {"elsewhere"}
