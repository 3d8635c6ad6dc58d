"""Runs that outlive their client (docs/reliability.md, "A run that dies"): a run killed
while its jobs run leaves its tasks running; the next run adopts every task that does the
work one of its jobs asks for (no new task or container), reports it as if it had
submitted it, and cancels the rest. Counted on the engine and on the TES server."""

import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from snakemake_executor_plugin_crank.backends.docker import DockerBackend
from snakemake_executor_plugin_crank.backends.docker.engine import DockerOptions
from snakemake_executor_plugin_crank.backends.tes.backend import TesOptions
from snakemake_executor_plugin_crank.backends.tes.opening import open_tes_backend
from snakemake_executor_plugin_crank.task import Resources, State, TaskSpec

from conftest import BASH, BUSYBOX, OnTes, rounds_until_ended, tasks_of, wait_for

# long: 25 s; quick ends while no crank runs; bad fails meanwhile; edited is changed
# between the runs (its new version is short). (An adopted task's wall time: below, on
# the backends themselves, where it can be seconds rather than Snakemake's whole minutes.)
SNAKEFILE = """
rule all:
    input: "long0.txt", "long1.txt", "quick.txt", "bad.txt", "edited.txt"

rule long:
    output: "long{i}.txt"
    log: "logs/long{i}.log"
    shell: "echo start > {log}; sleep 25; echo long {wildcards.i} > {output}; echo end >> {log}"

rule quick:
    output: "quick.txt"
    log: "logs/quick.log"
    shell: "echo start > {log}; sleep 8; echo quick > {output}; echo end >> {log}"

rule bad:
    output: "bad.txt"
    log: "logs/bad.log"
    shell: "echo start > {log}; sleep 8; echo broken >> {log}; exit 3"

rule edited:
    output: "edited.txt"
    log: "logs/edited.log"
    shell: "echo start > {log}; sleep 60; echo old > {output}"
"""
EDITED = 'shell: "echo start > {log}; sleep 60; echo old > {output}"'
EDIT = 'shell: "echo new > {output}; echo start > {log}"'


def workflow(tmp_path: Path) -> Path:
    workdir = tmp_path / uuid.uuid4().hex / "wf"
    workdir.mkdir(parents=True)
    (workdir / "Snakefile").write_text(SNAKEFILE)
    return workdir


def kill_hard(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL: no clean-up at all
    proc.wait()


def all_started(workdir: Path) -> bool:
    names = ("long0", "long1", "quick", "bad", "edited")
    return all((workdir / "logs" / f"{n}.log").exists() for n in names)


def check_rerun(workdir: Path, done: subprocess.CompletedProcess) -> None:
    """What every backend must show after the rerun."""
    assert done.returncode != 0, done.stderr[-3000:]  # rule bad failed, with --keep-going
    assert done.stderr.count("adopts the") == 4, done.stderr[-5000:]
    for i in (0, 1):
        assert (workdir / f"long{i}.txt").read_text() == f"long {i}\n"
        assert (workdir / "logs" / f"long{i}.log").read_text() == "start\nend\n"
    assert (workdir / "quick.txt").read_text() == "quick\n"
    assert (workdir / "logs" / "quick.log").read_text() == "start\nend\n"
    assert (workdir / "edited.txt").read_text() == "new\n"  # not the old task's "old"
    assert not (workdir / "bad.txt").exists()
    assert (workdir / "logs" / "bad.log").read_text() == "start\nbroken\n"
    assert "rule bad" in done.stderr and "exit code 3" in done.stderr, done.stderr[-5000:]


# ---------------------------------------------------------------- Docker


class Creations:
    """Containers created and execs started for the workdir's tasks while it is open: a
    live event stream (the engine keeps only its last 256 events for a later query)."""

    def __init__(self, docker_api, workdir: Path):
        self.api = docker_api
        self.labels = {"crank.workdir": str(workdir)}
        self.stream = docker_api.events(decode=True, filters={
            "type": "container", "label": f"crank.workdir={workdir}"})
        self.made = []
        self.fenced = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            for event in self.stream:
                attributes = (event.get("Actor") or {}).get("Attributes", {})
                if "crank.fence" in attributes:
                    self.fenced.set()
                    continue
                if "crank.probe" in attributes:  # crank's look at what the engine sees, never started
                    continue
                action = event.get("Action", "")
                if action == "create" or action.startswith("exec_create"):
                    self.made.append(action)
        except Exception:  # noqa: BLE001 - closed
            pass

    def close(self):
        """Everything up to now: a container of the test's own, whose event comes last."""
        fence = self.api.create_container(BUSYBOX, "true", labels={**self.labels, "crank.fence": "1"})
        try:
            assert self.fenced.wait(30), "the fence's event never came"
        finally:
            self.api.remove_container(fence["Id"], force=True)
            self.stream.close()
            self.thread.join(10)
        return self.made


@pytest.mark.slow
def test_a_killed_run_is_adopted_by_the_next(crank, tmp_path):
    workdir = workflow(tmp_path)
    docker = crank.backend == "docker"
    first = crank.start(workdir, "--jobs", "5")
    try:
        if docker:  # the logs are written in place
            wait_for(lambda: all_started(workdir), 90, "every job to start")
        else:
            wait_for(lambda: len(crank.running(workdir)) == 5, 120, "every task to run")
    finally:
        kill_hard(first)
    before = {t["id"] for t in tasks_of(crank.tes, workdir)} if not docker else set()
    # --unlock adopts nothing and cancels nothing
    unlock = crank.run(workdir, "--unlock")
    assert unlock.returncode == 0, unlock.stderr[-3000:]
    if docker:
        assert len(crank.running(workdir)) == 5
        wait_for(lambda: (workdir / "logs" / "bad.log").read_text() == "start\nbroken\n", 60,
                 "rule bad to fail while no crank runs")
    else:
        assert len(before) == 5

        def ended(rule):
            return [t for t in tasks_of(crank.tes, workdir) if t["tags"]["crank-rule"] == f"rule {rule}"
                    and t["state"] in ("COMPLETE", "EXECUTOR_ERROR")]

        wait_for(lambda: ended("quick") and ended("bad"), 90, "quick and bad to end while no crank runs")
    if not docker:
        assert not [t for t in tasks_of(crank.tes, workdir) if t["state"] in ("CANCELED", "CANCELING")]
    (workdir / "Snakefile").write_text(SNAKEFILE.replace(EDITED, EDIT))
    creations = Creations(crank.api, workdir) if docker else None
    done = crank.run(workdir, "--jobs", "5", "--rerun-incomplete", "--keep-going", timeout=240)
    made = creations.close() if docker else None
    check_rerun(workdir, done)
    if docker:
        # one task for the edited rule (an exec, in a runner made for it): nothing else again
        execs = [e for e in made if e.startswith("exec_create")]
        assert len(execs) == 1 and "echo new > edited.txt" in execs[0], made
        assert made.count("create") <= 1, made
        assert crank.live(workdir) == []
        assert not list((workdir / ".snakemake" / "crank" / "runs").iterdir())
        return
    after = {t["id"]: t for t in tasks_of(crank.tes, workdir)}
    new = set(after) - before
    assert len(new) == 1 and after[new.pop()]["tags"]["crank-rule"] == "rule edited"
    [old_edited] = [t for i, t in after.items() if i in before and t["tags"]["crank-rule"] == "rule edited"]
    assert old_edited["state"] in ("CANCELED", "CANCELING")


def open_backend(where: str, workdir: Path, request):
    """A backend of a run of its own at ``workdir``, opened as crank opens it."""
    run_id = uuid.uuid4().hex
    if where == "tes":
        tes = request.getfixturevalue("aws_env")
        return open_tes_backend(run_id, str(workdir), TesOptions(url=tes.url, storage_prefix=tes.prefix(workdir.name)))
    request.getfixturevalue("docker_api")
    return DockerBackend(run_id, str(workdir), DockerOptions(network="none", warm=where == "docker-warm"))


@pytest.mark.parametrize("where", [pytest.param("docker-warm", marks=pytest.mark.docker),
                                   pytest.param("docker-cold", marks=pytest.mark.docker),
                                   pytest.param("tes", marks=pytest.mark.tes)])
def test_an_adopted_tasks_wall_time_counts_from_its_start_not_from_the_adoption(where, tmp_path, request):
    """A task with a 12 s runtime runs 8 s, its run dies (leaving it running), the next run
    adopts it: it is stopped about 4 s into the adoption, with the wall time as the reason;
    counted from the adoption it would run 12 s more."""
    workdir = tmp_path / uuid.uuid4().hex
    workdir.mkdir()
    task = TaskSpec(name="timed", label="rule timed", job_id="1", attempt=1, image=BUSYBOX,
                    script="echo started >&2; sleep 300", workdir=str(workdir),
                    resources=Resources(runtime_s=12), log_dir=str(workdir / "logs"))
    first = open_backend(where, workdir, request)
    try:
        handle = first.submit(task)
        wait_for(lambda: first.poll([handle])[handle] is State.RUNNING, 120, "the task to run")
        running = time.monotonic()
        wait_for(lambda: time.monotonic() - running >= 8, 30, "the task to run 8 s")  # the scenario
    finally:
        first.close(detach=True)  # as a run that dies: its task goes on
    second = open_backend(where, workdir, request)
    try:
        second.gather_orphans(live_runs=(), dead_runs=(first.run_id,))
        adopted = second.adopt(task)
        assert adopted is not None and adopted.ran_s is not None and adopted.ran_s >= 7, adopted
        outcome, took = rounds_until_ended(second, task, 60, adopted=adopted)
    finally:
        second.close()
    assert not outcome.ok and "wall time exceeded (runtime limit 12 s)" in outcome.message, outcome.message
    assert took < 9, f"stopped {took:.1f} s into the adoption"


DETACHED = 'rule a:\n    output: "a.txt"\n    shell: "echo started > started; sleep 20; echo a > {output}"\n'


def detach_then_adopt(crank, workdir: Path, started, *extra: str, watch=None):
    """Start the one 20 s job with --crank-detach, Ctrl-C it once it runs, adopt it in a
    rerun; ``watch``: made before the rerun, closed after it (what it returns is returned)."""
    (workdir / "Snakefile").write_text(DETACHED)
    first = crank.start(workdir, *extra, "--crank-detach")
    try:
        wait_for(started, 90, "the job to start")
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=60)
    finally:
        first.kill()
    assert "left running (--crank-detach)" in stderr, stderr[-3000:]
    watching = watch() if watch else None
    done = crank.run(workdir, *extra, "--rerun-incomplete", timeout=240)
    seen = watching.close() if watching else None
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rule a (job 0) adopts the" in done.stderr, done.stderr[-3000:]
    assert (workdir / "a.txt").read_text() == "a\n"
    return seen


@pytest.mark.slow
def test_a_detached_run_is_adopted_by_the_next(crank, tmp_path):
    """On Docker in a container of its own (no warm runner): adopted by its labels."""
    workdir = tmp_path / "wf"
    workdir.mkdir()
    if crank.backend == "docker":
        made = detach_then_adopt(crank, workdir, lambda: (workdir / "started").exists(),
                                 "--crank-docker-warm", "no", watch=lambda: Creations(crank.api, workdir))
        assert made == []  # no container made again
        assert crank.live(workdir) == []
        return
    detach_then_adopt(crank, workdir, lambda: crank.running(workdir))
    [task] = tasks_of(crank.tes, workdir)  # the same task, adopted: no second one
    assert task["state"] == "COMPLETE"


STALE = """
rule copy:
    input: "in.txt", "plain.txt"
    output: "out.txt"
    {container}
    shell: "cat {{input}} > {{output}}; echo started > started; if grep -q old {{input[0]}}; then sleep 60; fi"
"""
# the first run's task (input "old") runs until the rerun cancels it, however slow the machine;
# the rerun's (input "new") ends at once


def test_what_changed_behind_a_link_or_under_a_tag_is_not_adopted(crank, tmp_path, docker_api):
    """Killed while it runs; then the content behind the input's link is rewritten, another
    input rewritten keeping its size and mtime (``cp -p``), and on Docker the rule's image tag
    moved to another image: the rerun does the work anew, as the local executor would, and
    the old task is canceled."""
    workdir = tmp_path / uuid.uuid4().hex / "wf"
    (workdir / "data").mkdir(parents=True)
    (workdir / "data" / "real.txt").write_text("old\n")
    (workdir / "plain.txt").write_text("AAAA\n")
    (workdir / "in.txt").symlink_to("data/real.txt")
    docker = crank.backend == "docker"
    tag = f"crank-test/retag-{uuid.uuid4().hex[:12]}:1"
    if docker:
        docker_api.tag(BUSYBOX, tag)
    (workdir / "Snakefile").write_text(STALE.format(container=f'container: "{tag}"' if docker else ""))
    try:
        first = crank.start(workdir)
        try:
            wait_for(lambda: (workdir / "started").exists() if docker else crank.running(workdir), 90,
                     "the job to run")
        finally:
            kill_hard(first)
        assert crank.run(workdir, "--unlock").returncode == 0
        (workdir / "data" / "real.txt").write_text("new\n")
        kept = (workdir / "plain.txt").stat()
        (workdir / "plain.txt").write_text("BBBB\n")
        os.utime(workdir / "plain.txt", ns=(kept.st_atime_ns, kept.st_mtime_ns))
        if docker:
            bash = docker_api.inspect_image(BASH)["Id"]
            docker_api.tag(bash, tag)  # the same tag, another image
        done = crank.run(workdir, "--rerun-incomplete", timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "adopts the" not in done.stderr, done.stderr[-3000:]
        assert (workdir / "out.txt").read_text() == "new\nBBBB\n"
        if docker:
            assert crank.live(workdir) == []
        else:
            assert sorted(t["state"] for t in tasks_of(crank.tes, workdir)) in (
                ["CANCELED", "COMPLETE"], ["CANCELING", "COMPLETE"])
    finally:
        if docker:
            docker_api.remove_image(tag, force=True)


@pytest.mark.tes
def test_a_rerun_with_another_storage_prefix_does_the_work_anew(tes, tmp_path):
    """The killed run's task leaves its results under its own prefix: a rerun told another
    one runs the job again rather than adopt a task whose results it would look for
    elsewhere (once: "exit code 0; the task came back without its exit code")."""
    workdir = tmp_path / uuid.uuid4().hex / "wf"
    workdir.mkdir(parents=True)
    (workdir / "in.txt").write_text("in\n")
    (workdir / "plain.txt").write_text("plain\n")
    # the same command both times: it runs long enough for the rerun to find it running
    (workdir / "Snakefile").write_text(STALE.format(container="").replace(
        "if grep -q old {input[0]}; then sleep 60; fi", "sleep 20"))
    crank = OnTes(tes)
    first = crank.start(workdir)
    try:
        wait_for(lambda: crank.running(workdir), 90, "the task to run")
    finally:
        kill_hard(first)
    assert crank.run(workdir, "--unlock").returncode == 0
    elsewhere = tes.prefix(f"{workdir.parent.name}-moved")
    done = crank.run(workdir, "--rerun-incomplete", "--crank-storage-prefix", elsewhere, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "adopts the" not in done.stderr, done.stderr[-3000:]
    assert (workdir / "out.txt").read_text() == "in\nplain\n"
    assert sorted(t["state"] for t in tasks_of(tes, workdir)) in (["CANCELED", "COMPLETE"], ["CANCELING", "COMPLETE"])
