"""End-to-end tests of the Docker backend against the real Docker engine."""

import os
import signal
import subprocess
import sys
import uuid
from typing import Optional

import pytest
from snakemake.common.tests import TestWorkflowsLocalStorageBase
from snakemake.settings import types as settings

from snakemake_executor_plugin_crank import ExecutorSettings
from snakemake_executor_plugin_crank.backends.docker import DockerBackend
from snakemake_executor_plugin_crank.task import Resources, State, TaskSpec

from conftest import BUSYBOX, containers_of, copy_workflow, snakemake, wait_for
from expectations import assert_exact_outputs, exact_workdir, read

pytestmark = pytest.mark.docker


class TestSnakemakeBaseOnDocker(TestWorkflowsLocalStorageBase):
    """Snakemake's own plugin test cases (simple and groups)."""

    __test__ = True

    def get_executor(self) -> str:
        return "crank"

    def get_executor_settings(self) -> Optional[ExecutorSettings]:
        return ExecutorSettings(default_image=BUSYBOX)

    def get_assume_shared_fs(self) -> bool:
        return False

    def get_remote_execution_settings(self) -> settings.RemoteExecutionSettings:
        return settings.RemoteExecutionSettings(seconds_between_status_checks=1)

    @pytest.fixture(autouse=True)
    def _engine(self, docker_api):
        pass



def test_exact_outputs_across_rules(docker_api, tmp_path):
    workdir, args = exact_workdir(tmp_path)
    done = snakemake(workdir, *args)
    assert done.returncode == 0, done.stderr
    assert_exact_outputs(workdir, f"{os.getuid()}:{os.getgid()}")
    assert containers_of(docker_api, workdir) == []

    again = snakemake(workdir, *args)
    assert again.returncode == 0 and "Nothing to be done" in again.stderr


def test_failing_rule_reports_exit_code_and_stderr(docker_api, tmp_path):
    workdir = copy_workflow("failing", tmp_path / "wf")
    done = snakemake(workdir, "fails")
    assert done.returncode != 0
    assert "rule fails (job" in done.stderr
    assert "exit code 3" in done.stderr
    assert "first-err\nthe real problem" in done.stderr
    assert "Traceback" not in done.stderr
    (stderr_log,) = (workdir / ".snakemake" / "crank" / "logs").glob("*/fails-*.stderr")
    assert read(stderr_log) == "first-err\nthe real problem\n"
    assert read(stderr_log.with_suffix(".stdout")) == "to-stdout\n"
    assert str(stderr_log) in done.stderr  # passed to Snakemake as an aux log
    assert not (workdir / "never.txt").exists()  # the half-written output was removed
    assert containers_of(docker_api, workdir) == []


def test_group_stops_at_its_first_failing_job(docker_api, tmp_path):
    workdir = copy_workflow("failing", tmp_path / "wf")
    done = snakemake(workdir, "chain/second.txt")
    assert done.returncode != 0
    assert "rule chain_first (job" in done.stderr and "exit code 5" in done.stderr
    assert "first of the group fails" in done.stderr
    logs = workdir / ".snakemake" / "crank" / "logs"
    assert [p.name for p in logs.glob("*/chain_*.stderr")] == [
        next(logs.glob("*/chain_first-*.stderr")).name
    ]  # the second job never started
    assert not (workdir / "chain" / "second.txt").exists()


def test_busybox_sh_fails_a_pipeline_whose_first_stage_fails(docker_api, tmp_path):
    workdir = copy_workflow("failing", tmp_path / "wf")
    done = snakemake(workdir, "pipefail")
    assert done.returncode != 0
    assert "rule pipefail (job" in done.stderr and "exit code 1" in done.stderr
    assert not (workdir / "pipefail.txt").exists()


def test_out_of_memory_is_reported_with_the_limit(docker_api, tmp_path):
    workdir = copy_workflow("failing", tmp_path / "wf")
    done = snakemake(workdir, "oom")
    assert done.returncode != 0
    assert "killed: out of memory (limit 20 MB)" in done.stderr
    assert not (workdir / "oom.txt").exists()


# The wall time on Docker (a job past its runtime is killed, reported with the limit and its
# stderr's tail, and leaves no container): test_runner.py, whose run through the fault proxy
# also has the engine refuse the first two kills.


def test_unknown_image_is_one_clear_line(docker_api, tmp_path):
    workdir = copy_workflow("failing", tmp_path / "wf")
    done = snakemake(workdir, "badimage", "--crank-docker-pull", "never")
    assert done.returncode != 0
    assert "image 'crank-test/does-not-exist:1' is not on the Docker engine" in done.stderr
    assert "Traceback" not in done.stderr


def test_invalid_resource_is_one_clear_line(docker_api, tmp_path):
    workdir = copy_workflow("failing", tmp_path / "wf")
    done = snakemake(workdir, "badresource")
    assert done.returncode != 0
    assert "rule badresource: resource gpu='many' is not a number" in done.stderr
    assert "Traceback" not in done.stderr


def test_threads_above_host_run_with_its_cpus_and_memory_above_fails_unless_clamping(docker_api, tmp_path):
    workdir = copy_workflow("failing", tmp_path / "wf")
    info = docker_api.info()
    cpus = info["NCPU"]
    done = snakemake(workdir, "greedy", "--max-threads", "64")
    assert done.returncode == 0, done.stderr
    warning = f"rule greedy asks for 64 CPUs (threads), more than the {cpus} the backend has"
    assert done.stderr.count(warning) == 1
    assert read(workdir / "greedy.txt") == f"{cpus}\n"

    (workdir / "greedy.txt").unlink()
    too_much = info["MemTotal"] // 1_000_000 + 1000
    done = snakemake(workdir, "greedy", "--set-resources", f"greedy:mem_mb={too_much}")
    assert done.returncode != 0
    assert f"rule greedy asks for mem_mb={too_much} but the backend offers at most" in done.stderr
    assert "--crank-clamp-resources" in done.stderr

    done = snakemake(
        workdir, "greedy", "--set-resources", f"greedy:mem_mb={too_much}", "--crank-clamp-resources"
    )
    assert done.returncode == 0, done.stderr
    assert f"mem_mb={too_much} lowered to" in done.stderr


def test_unreachable_engine_is_one_clear_line(tmp_path):
    workdir = copy_workflow("failing", tmp_path / "wf")
    done = snakemake(workdir, "fails", "--crank-docker-url", f"unix://{tmp_path}/no.sock")
    assert done.returncode != 0
    assert "cannot reach the Docker engine at unix://" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--crank-backend", "tes"], "--crank-backend tes needs --crank-tes-url and --crank-storage-prefix"),
        (["--crank-docker-host-config", "{shm"], "--crank-docker-host-config is not valid JSON"),
    ],
)
def test_bad_settings_are_one_clear_line(tmp_path, args, expected):
    workdir = copy_workflow("failing", tmp_path / "wf")
    done = snakemake(workdir, "fails", *args)
    assert done.returncode != 0
    assert expected in done.stderr
    assert "Traceback" not in done.stderr


def test_ctrl_c_removes_every_container_of_the_run(docker_api, tmp_path):
    workdir = copy_workflow("cancel", tmp_path / "wf")
    command = [sys.executable, "-m", "snakemake", "--executor", "crank", "--jobs", "2",
               "--crank-default-image", BUSYBOX]
    proc = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    try:
        wait_for(
            lambda: len([c for c in containers_of(docker_api, workdir) if c["State"] == "running"]) == 2,
            timeout=60, what="two running containers",
        )
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert containers_of(docker_api, workdir) == []
    assert not list(workdir.glob("slow*.txt"))


def test_containers_of_a_crashed_run_are_removed_at_start(docker_api, tmp_path):
    workdir = copy_workflow("failing", tmp_path / "wf")
    mine = docker_api.create_container(
        BUSYBOX, "sleep 600",
        labels={"crank.run": "crashed", "crank.workdir": str(workdir)})["Id"]
    other = docker_api.create_container(
        BUSYBOX, "sleep 600",
        labels={"crank.run": "crashed", "crank.workdir": str(tmp_path / "other")})["Id"]
    try:
        done = snakemake(workdir, "greedy", "--max-threads", "1")
        assert done.returncode == 0, done.stderr
        assert "removed 1 container(s) left by an earlier run" in done.stderr
        ids = {c["Id"] for c in docker_api.containers(all=True)}
        assert mine not in ids and other in ids  # another workdir's run is left alone
    finally:
        docker_api.remove_container(other, force=True)


def test_one_status_request_per_round_for_all_tasks(docker_api, tmp_path):
    backend = DockerBackend(uuid.uuid4().hex, str(tmp_path))
    requests = []
    backend.api.hooks["response"].append(lambda response, **kw: requests.append(response.url))
    tasks = [
        TaskSpec(name=f"sleep-{i}", label="rule sleep", job_id=str(i), attempt=1, image=BUSYBOX,
                 script="sleep 600", workdir=str(tmp_path), resources=Resources(),
                 log_dir=str(tmp_path / "logs"))
        for i in range(10)
    ]
    try:
        handles = [backend.submit(t) for t in tasks]
        requests.clear()
        states = backend.poll(handles)
        assert len(requests) == 1
        assert set(states.values()) <= {State.RUNNING, State.QUEUED}
    finally:
        backend.close()
    assert docker_api.containers(all=True, filters={"label": f"crank.run={backend.run_id}"}) == []


def test_a_local_engine_is_proven_to_share_and_binds(docker_api, tmp_path):
    """auto on the local engine: the workdir and an input outside it are proven shared, so the
    job runs on the client's files themselves (a file it writes undeclared is there after,
    which copying would not bring back)."""
    outside = tmp_path / "ref" / "ref.txt"
    outside.parent.mkdir()
    outside.write_text("reference\n")
    workdir = tmp_path / "wf"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(f"""
rule copy:
    input: "{outside}"
    output: "out.txt"
    shell: "cat {{input}} > {{output}}; echo undeclared > side.txt"
""")
    done = snakemake(workdir)
    assert done.returncode == 0, done.stderr
    assert "does not see this machine's" not in done.stderr
    assert (workdir / "out.txt").read_text() == "reference\n"
    assert (workdir / "side.txt").read_text() == "undeclared\n"
