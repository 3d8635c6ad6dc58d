"""A Docker engine that cannot see the workdir (issue 33): one that stands for another
machine, in its own mount and network namespaces with a /tmp of its own. crank must never
run a job on that machine's files, and must say why the job did not run."""

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Optional

import pytest
from snakemake.common.tests import TestWorkflowsLocalStorageBase
from snakemake.settings import types as settings

import services
from conftest import BUSYBOX, snakemake_command, wait_for
from snakemake_executor_plugin_crank import ExecutorSettings

pytestmark = pytest.mark.docker

SNAKEFILE = """
rule copy:
    input: "in.txt"
    output: "out.txt"
    shell: "cat {input} > {output}"
"""


@pytest.fixture(scope="module")
def foreign(docker_api):
    if not shutil.which("unshare") or not shutil.which("nsenter"):
        pytest.skip("no unshare or nsenter (util-linux)")
    root = f"/run/crank-f-{uuid.uuid4().hex[:8]}"
    try:
        with services.ForeignEngine(root).running() as engine:
            yield engine
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_on(engine, workdir, *args):
    import subprocess

    return subprocess.run(snakemake_command("--crank-docker-url", engine.url, "--crank-docker-network", "none",
                                            *args), cwd=workdir, capture_output=True, text=True, timeout=300)


def foreign_docker(engine, *args) -> list:
    return subprocess.run(["docker", "-H", engine.url, *args], capture_output=True, text=True,
                          check=True).stdout.split()


def workflow(tmp_path):
    workdir = tmp_path / uuid.uuid4().hex / "wf"
    workdir.mkdir(parents=True)
    (workdir / "Snakefile").write_text(SNAKEFILE)
    (workdir / "in.txt").write_text("the client's input\n")
    return workdir


@pytest.mark.parametrize("warm", ["yes", "no"])
def test_a_workdir_the_engine_does_not_have_is_copied(foreign, tmp_path, warm):
    workdir = workflow(tmp_path)
    done = run_on(foreign, workdir, "--crank-docker-warm", warm)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (workdir / "out.txt").read_text() == "the client's input\n"
    assert f"the Docker engine at {foreign.url} does not see this machine's {workdir}" in done.stderr
    assert foreign.run_there(f"[ -e {workdir} ] && echo there || echo none") == "none\n"


@pytest.mark.parametrize("files", ["auto", "copy"])
def test_the_same_path_on_the_engines_host_is_left_alone(foreign, tmp_path, files):
    """The engine's host has a directory at the workdir's path with other files: the job reads
    the client's in.txt, and that host's directory is as it was."""
    workdir = workflow(tmp_path)
    foreign.run_there(f"mkdir -p {workdir} && echo 'input on the engine host' > {workdir}/in.txt")
    done = run_on(foreign, workdir, "--crank-docker-files", files)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (workdir / "out.txt").read_text() == "the client's input\n"
    assert foreign.run_there(f"ls -A {workdir}; cat {workdir}/in.txt") == "in.txt\ninput on the engine host\n"


def test_bind_where_the_engine_does_not_see_the_workdir_stops_at_start(foreign, tmp_path):
    workdir = workflow(tmp_path)
    foreign.run_there(f"mkdir -p {workdir} && echo 'input on the engine host' > {workdir}/in.txt")
    done = run_on(foreign, workdir, "--crank-docker-files", "bind")
    assert done.returncode != 0 and not (workdir / "out.txt").exists()
    assert "Traceback" not in done.stderr
    assert (f"the Docker engine at {foreign.url} does not see this machine's {workdir} (a file crank "
            "wrote there is missing on the engine's side)") in done.stderr, done.stderr[-3000:]
    assert "rule copy:" not in done.stdout + done.stderr  # stopped before any job
    assert foreign.run_there(f"ls -A {workdir}; cat {workdir}/in.txt") == "in.txt\ninput on the engine host\n"


@pytest.mark.parametrize("files", ["auto", "bind"])
def test_an_input_outside_the_workdir_is_proven_too(foreign, tmp_path, files):
    """The workdir is on a file system both machines see, an input outside it is not: the
    engine's host has another file at its path."""
    shared = Path(foreign.root) / f"wf-{uuid.uuid4().hex[:8]}"
    shared.mkdir()
    outside = tmp_path / uuid.uuid4().hex / "ref.txt"
    outside.parent.mkdir(parents=True)
    outside.write_text("the client's reference\n")
    foreign.run_there(f"mkdir -p {outside.parent} && echo 'reference on the engine host' > {outside}")
    (shared / "Snakefile").write_text(f"""
rule copy:
    input: "{outside}"
    output: "out.txt"
    shell: "cat {{input}} > {{output}}"
""")
    try:
        done = run_on(foreign, shared, "--crank-docker-files", files)
        if files == "bind":
            assert done.returncode != 0 and not (shared / "out.txt").exists()
            assert "Traceback" not in done.stderr
            assert (f"the Docker engine at {foreign.url} does not see this machine's {outside} "
                    "(it has another file there, or none)") in done.stderr, done.stderr[-3000:]
        else:
            assert done.returncode == 0, done.stderr[-3000:]
            assert (shared / "out.txt").read_text() == "the client's reference\n"
        assert foreign.run_there(f"cat {outside}") == "reference on the engine host\n"
    finally:
        shutil.rmtree(shared, ignore_errors=True)


class TestSnakemakeBaseOnAnotherMachine(TestWorkflowsLocalStorageBase):
    """Snakemake's own plugin test cases (simple and groups) on an engine that does not see
    the workdir: every file copied."""

    __test__ = True

    def get_executor(self) -> str:
        return "crank"

    def get_executor_settings(self) -> Optional[ExecutorSettings]:
        return ExecutorSettings(default_image=BUSYBOX, docker_url=self.url, docker_network="none")

    def get_assume_shared_fs(self) -> bool:
        return False

    def get_remote_execution_settings(self) -> settings.RemoteExecutionSettings:
        return settings.RemoteExecutionSettings(seconds_between_status_checks=1)

    @pytest.fixture(autouse=True)
    def _engine(self, foreign):
        self.url = foreign.url


@pytest.mark.parametrize("warm", ["yes", "no"])
def test_an_input_is_sent_to_the_engine_once_for_every_job_that_reads_it(foreign, tmp_path, warm):
    """Copied jobs find the input they share in the engine's copy of the workdir, sent there
    once: every job sees the change time it got when it arrived, in warm runners (which run
    one job after another, each with an empty /tmp) and in containers of their own alike."""
    workdir = Path(foreign.root) / f"wf-{uuid.uuid4().hex[:8]}"  # not under /tmp, which runners empty
    workdir.mkdir()
    (workdir / "shared.txt").write_text("shared\n")
    (workdir / "Snakefile").write_text("""
rule all:
    input: expand("out{i}.txt", i=range(6))

rule read:
    input: "shared.txt"
    output: "out{i}.txt"
    shell: "ls -A /tmp > {output}; touch /tmp/left-by-{wildcards.i}; cat {input} >> {output}; hostname >> {output}; stat -c %z {input} >> {output}"
""")
    try:
        done = run_on(foreign, workdir, "--crank-docker-files", "copy", "--crank-docker-warm", warm, "--jobs", "2")
        assert done.returncode == 0, done.stderr[-3000:]
        seen = [(workdir / f"out{i}.txt").read_text().splitlines() for i in range(6)]
        assert all(lines[0] == "shared" for lines in seen), seen  # /tmp was empty
        assert len({arrived for _, _, arrived in seen}) == 1, seen
        if warm == "yes":
            assert len({runner for _, runner, _ in seen}) < 6, seen  # a runner ran more than one job
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_retry_finds_neither_what_its_failed_attempt_made_nor_a_volume_left(foreign, tmp_path):
    """The engine's copy of the workdir keeps what jobs leave there, as the local workdir
    does, but a job's products are gone when it starts again; the copy goes with the run."""
    workdir = workflow(tmp_path)
    (workdir / "Snakefile").write_text("""
rule grow:
    output: "grown.txt"
    shell: "echo once >> {output}; [ -e attempted ] || {{ touch attempted; exit 1; }}"
""")
    done = run_on(foreign, workdir, "--crank-docker-files", "copy", "--retries", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (workdir / "grown.txt").read_text() == "once\n"
    assert not (workdir / "attempted").exists()  # undeclared: it stays on the engine
    left = foreign_docker(foreign, "volume", "ls", "-q")
    assert not [v for v in left if v.startswith("crank-files-")], left


def test_a_detached_copied_job_is_adopted_and_the_copy_of_the_workdir_goes_after(foreign, tmp_path):
    """A job whose files are copied, left running by a run stopped with --crank-detach, is
    adopted by the next run, which brings its output back, then removes the engine's copy of
    the workdir that the first run left (the adopted container used it)."""
    workdir = workflow(tmp_path)
    (workdir / "Snakefile").write_text(
        'rule a:\n    input: "in.txt"\n    output: "a.txt"\n    shell: "sleep 6; cat {input} > {output}"\n')
    args = ("--crank-docker-url", foreign.url, "--crank-docker-network", "none", "--crank-docker-warm", "no")
    running = ("ps", "-q", "--filter", "status=running", "--filter", f"label=crank.workdir={workdir}",
               "--filter", "label=crank.key")  # the job's container, not the one that holds its files
    first = subprocess.Popen(snakemake_command(*args, "--crank-detach"), cwd=workdir, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: foreign_docker(foreign, *running), 90, "the job to start")
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=60)
    finally:
        first.kill()
    assert "left running (--crank-detach)" in stderr, stderr[-3000:]
    assert [v for v in foreign_docker(foreign, "volume", "ls", "-q") if v.startswith("crank-files-")]
    done = run_on(foreign, workdir, *args[4:], "--rerun-incomplete")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rule a (job 0) adopts the" in done.stderr, done.stderr[-3000:]
    assert (workdir / "a.txt").read_text() == "the client's input\n"
    assert not [v for v in foreign_docker(foreign, "volume", "ls", "-q") if v.startswith("crank-files-")]
    assert not foreign_docker(foreign, "ps", "-aq", "--filter", f"label=crank.workdir={workdir}")


def test_what_a_job_reads_outside_the_workdir_is_proven_file_by_file(foreign, tmp_path):
    """A directory input outside the workdir whose own time is the same on both machines, with
    another file inside on the engine's host: auto copies (the job reads the client's file);
    bind refuses."""
    shared = Path(foreign.root) / f"wf-{uuid.uuid4().hex[:8]}"
    shared.mkdir()
    refs = tmp_path / uuid.uuid4().hex / "refs"
    refs.mkdir(parents=True)
    (refs / "f").write_text("the client's reference\n")
    stamp = "@1700000000.123456789"
    subprocess.run(["touch", "-d", stamp, str(refs)], check=True)
    foreign.run_there(f"mkdir -p {refs} && echo 'reference on the engine host' > {refs}/f && touch -d {stamp} {refs}")
    (shared / "Snakefile").write_text(f"""
rule copy:
    input: "{refs}"
    output: "out.txt"
    shell: "cat {{input}}/f > {{output}}"
""")
    try:
        refused = run_on(foreign, shared, "--crank-docker-files", "bind")
        assert refused.returncode != 0 and "does not see this machine's" in refused.stderr, refused.stderr[-3000:]
        done = run_on(foreign, shared)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (shared / "out.txt").read_text() == "the client's reference\n"
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_a_file_system_mounted_inside_the_workdir_only_here_is_not_bound(foreign, tmp_path):
    """The workdir is seen by both machines, but data/ inside it is a mount this machine alone
    has: the engine's host has other files there, which the job must neither read nor write."""
    shared = Path(foreign.root) / f"wf-{uuid.uuid4().hex[:8]}"
    (shared / "data").mkdir(parents=True)
    foreign.run_there(f"echo 'data on the engine host' > {shared}/data/in.txt")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "in.txt").write_text("the client's data\n")
    (shared / "Snakefile").write_text("""
rule copy:
    input: "data/in.txt"
    output: "out.txt"
    shell: "cat {input} > {output}; echo junk > data/junk.txt"
""")
    subprocess.run(["mount", "--bind", str(mine), str(shared / "data")], check=True)
    try:
        done = run_on(foreign, shared)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (shared / "out.txt").read_text() == "the client's data\n"
        assert f"does not see this machine's {shared}" in done.stderr
    finally:
        subprocess.run(["umount", str(shared / "data")], check=True)
        assert foreign.run_there(f"ls -A {shared}/data; cat {shared}/data/in.txt") == "in.txt\ndata on the engine host\n"
        shutil.rmtree(shared, ignore_errors=True)


UPDATED = """
rule grow:
    output: update("p.txt"), update(directory("d")), "done.txt"
    shell: "n=$(cat attempts 2>/dev/null || echo 0); n=$((n + 1)); echo $n > attempts; "
           "echo attempt$n >> {output[0]}; touch {output[1]}/junk$n; [ $n -ge 2 ]; touch {output[2]}"
"""


def test_a_retry_of_a_job_that_updates_its_outputs_starts_from_what_the_local_executor_has(foreign, tmp_path):
    """Its failed attempt's writes to its update() outputs are gone from the engine's copy of
    the workdir when it runs again, as on this machine."""
    seen = {}
    for where in ("local", "crank"):
        workdir = workflow(tmp_path)
        (workdir / "Snakefile").write_text(UPDATED)
        (workdir / "p.txt").write_text("start\n")
        (workdir / "d").mkdir()
        (workdir / "d" / "x").write_text("x\n")
        if where == "local":
            done = subprocess.run([sys.executable, "-m", "snakemake", "--jobs", "1", "--retries", "1"], cwd=workdir,
                                  capture_output=True, text=True, timeout=300)
        else:
            done = run_on(foreign, workdir, "--crank-docker-files", "copy", "--retries", "1")
        assert done.returncode == 0, done.stderr[-3000:]
        seen[where] = ((workdir / "p.txt").read_text(), sorted(p.name for p in (workdir / "d").iterdir()))
    assert seen["crank"] == seen["local"], seen


def test_a_script_too_long_for_an_argument_is_copied_in_too(foreign, tmp_path):
    workdir = workflow(tmp_path)
    (workdir / "Snakefile").write_text(f'rule long:\n    output: "out.txt"\n    shell: ": {"x" * 70000}; echo ok > {{output}}"\n')
    done = run_on(foreign, workdir, "--crank-docker-warm", "no")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (workdir / "out.txt").read_text() == "ok\n"


def test_old_outputs_are_removed_when_an_earlier_attempt_left_the_holder(docker_api, tmp_path):
    """The container that removes a job's old outputs from the engine's copy of the workdir,
    made by an attempt whose answer was lost, is replaced; and nothing stays after."""
    from snakemake_executor_plugin_crank.backends.docker.mirror import Mirror
    from snakemake_executor_plugin_crank.task import Output, TaskSpec

    task = TaskSpec(name="t", label="rule t", job_id="1", attempt=2, image=BUSYBOX, script="true",
                    workdir=str(tmp_path), outputs=(Output(str(tmp_path / "out.txt")),))
    mirror = Mirror(docker_api, uuid.uuid4().hex, str(tmp_path))
    name = f"crank-{mirror.run_id[:8]}-files"
    left = docker_api.create_container(BUSYBOX, command=["true"], name=name)["Id"]
    try:
        mirror.made.add(str(tmp_path / "out.txt"))  # an earlier attempt made it
        mirror.done(mirror.claim(task, []), True)
        assert mirror.holder != left and docker_api.inspect_container(mirror.holder)["State"]["Running"]
    finally:
        mirror.close()
    assert not docker_api.volumes(filters={"name": mirror.volume}).get("Volumes")
    assert not docker_api.containers(all=True, filters={"name": name})
