"""End-to-end tests of the TES backend against the real Funnel server and SeaweedFS that
tests/services.py starts (skipped, with one line saying why, where there is no Funnel)."""

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Optional

import pytest
import requests
from snakemake.common.tests import TestWorkflowsLocalStorageBase
from snakemake.settings import types as settings
from tes import Task as TesTask

from snakemake_executor_plugin_crank import ExecutorSettings, runs
from snakemake_executor_plugin_crank.backends.tes import layout, tails
from snakemake_executor_plugin_crank.backends.tes.backend import TesOptions
from snakemake_executor_plugin_crank.backends.tes.tasks import (
    STATES, TAG_ORIGIN, TAG_RUN, TAG_WORKDIR, task_body, to_tes_task, workdir_tag,
)
from snakemake_executor_plugin_crank.backends.tes.http import Session, redact
# the settings' factory: the backend with its HTTP session and Stagers
from snakemake_executor_plugin_crank.backends.tes.opening import open_tes_backend as TesBackend
from snakemake_executor_plugin_crank.errors import CrankError
from snakemake_executor_plugin_crank.staging.cas import file_key
from snakemake_executor_plugin_crank.staging.staged import Staged
from snakemake_executor_plugin_crank.staging.store import Store
from snakemake_executor_plugin_crank.task import Input, Kind, Output, Resources, State, TaskSpec

from conftest import (
    BASH, BUSYBOX, NON_TERMINAL, copy_workflow, live_tasks, proxy_to, running_tasks, slow_workflow,
    status_request, tasks_of, tes_command, tes_run, tes_start, wait_for,
)
from expectations import (
    assert_exact_outputs,
    assert_rulekinds_outputs,
    exact_workdir,
    read,
    rulekinds_workdir,
)

pytestmark = pytest.mark.tes

# ---------------------------------------------------------------- Snakemake's own cases


class TestSnakemakeBaseOnTes(TestWorkflowsLocalStorageBase):
    """Snakemake's own plugin test cases (simple and groups), on Funnel."""

    __test__ = True

    def get_executor(self) -> str:
        return "crank"

    def get_executor_settings(self) -> Optional[ExecutorSettings]:
        return ExecutorSettings(
            backend="tes", tes_url=self._tes.url, storage_prefix=self._tes.prefix("base"),
            default_image=BUSYBOX,
        )

    def get_assume_shared_fs(self) -> bool:
        return False

    def get_remote_execution_settings(self) -> settings.RemoteExecutionSettings:
        return settings.RemoteExecutionSettings(seconds_between_status_checks=1)

    @pytest.fixture(autouse=True)
    def _server(self, aws_env):
        self._tes = aws_env


# ---------------------------------------------------------------- whole workflows


def test_exact_outputs_across_rules(tes, tmp_path):
    workdir, args = exact_workdir(tmp_path)
    done = tes_run(tes, workdir, *args)
    assert done.returncode == 0, done.stderr
    # Funnel runs containers as root (no user option); the files arrive as the caller's
    assert_exact_outputs(workdir, "0:0")
    assert live_tasks(tes, workdir) == []

    again = tes_run(tes, workdir, *args)
    assert again.returncode == 0 and "Nothing to be done" in again.stderr


def test_paths_that_are_string_prefixes_of_each_other(tes, tmp_path):
    workdir = copy_workflow("tes_prefixes", tmp_path / "wf")
    (workdir / "a.txt").write_text("plain\n")
    (workdir / "a.txt.gz").write_text("not really gzip\n")
    (workdir / "in").write_text("in\n")
    (workdir / "indir" / "deep").mkdir(parents=True)
    (workdir / "indir" / "x").write_text("x\n")
    (workdir / "indir" / "deep" / "y").write_text("y\n")
    odd = Path(f"/tmpcrank-{uuid.uuid4().hex[:8]}")  # string-extends Funnel's own /tmp
    odd.mkdir()
    try:
        (odd / "in.txt").write_text("odd in\n")
        done = tes_run(tes, workdir, "--config", f"odd={odd}")
        assert done.returncode == 0, done.stderr
        assert read(workdir / "out") == "plain\nin\n"
        assert read(workdir / "outdir" / "gz") == "not really gzip\n"
        assert read(workdir / "outdir" / "sub" / "from-indir") == "x\ny\n"
        assert (workdir / "outdir" / "empty").is_dir()  # an empty directory comes back too
        assert read(odd / "copy.txt") == "odd in\nplain\n"
    finally:
        shutil.rmtree(odd)


def test_every_rule_kind_runs_with_exact_outputs(tes, tmp_path):
    workdir, args = rulekinds_workdir(tmp_path)
    done = tes_run(tes, workdir, *args, timeout=600)
    assert done.returncode == 0, done.stderr
    assert_rulekinds_outputs(workdir)
    assert live_tasks(tes, workdir) == []


def test_failing_rule_reports_exit_code_and_stderr(tes, tmp_path):
    workdir = copy_workflow("failing", tmp_path / "wf")
    done = tes_run(tes, workdir, "fails")
    assert done.returncode != 0
    assert "rule fails (job" in done.stderr
    assert "exit code 3" in done.stderr
    assert "first-err\nthe real problem" in done.stderr
    assert "Traceback" not in done.stderr
    (stderr_log,) = (workdir / ".snakemake" / "crank" / "logs").glob("*/fails-*.stderr")
    assert read(stderr_log) == "first-err\nthe real problem\n"
    assert read(stderr_log.with_suffix(".stdout")) == "to-stdout\n"
    assert str(stderr_log) in done.stderr
    assert not (workdir / "never.txt").exists()


def test_unknown_image_fails_with_the_tes_state(tes, tmp_path):
    workdir = copy_workflow("failing", tmp_path / "wf")
    done = tes_run(tes, workdir, "badimage")
    assert done.returncode != 0
    assert "rule badimage (job" in done.stderr
    assert "TES state EXECUTOR_ERROR" in done.stderr
    assert "Traceback" not in done.stderr


def test_ctrl_c_leaves_no_live_task(tes, tmp_path):
    workdir = copy_workflow("cancel", tmp_path / "wf")
    command = [sys.executable, "-m", "snakemake", "--executor", "crank", "--jobs", "2",
               "--crank-backend", "tes", "--crank-tes-url", tes.url,
               "--crank-storage-prefix", tes.prefix(tmp_path.name),
               "--crank-default-image", BUSYBOX]
    proc = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, stdin=subprocess.DEVNULL, env=tes.env())
    try:
        wait_for(lambda: len(running_tasks(tes, workdir)) == 2,
                 timeout=90, what="two running tasks")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert live_tasks(tes, workdir) == []
    assert len(tasks_of(tes, workdir)) == 2
    assert not list(workdir.glob("slow*.txt"))


def test_tasks_of_a_crashed_run_are_canceled_at_start(tes, tmp_path):
    workdir = copy_workflow("failing", tmp_path / "wf")
    body = {"name": "orphan", "executors": [{"image": BUSYBOX, "command": ["sleep", "600"]}],
            "tags": {TAG_RUN: "crashed", TAG_WORKDIR: workdir_tag(str(workdir))}}
    orphan = requests.post(f"{tes.url}/v1/tasks", json=body, timeout=30).json()["id"]
    other = requests.post(f"{tes.url}/v1/tasks", json={
        **body, "tags": {TAG_RUN: "crashed", TAG_WORKDIR: workdir_tag(str(tmp_path / "other"))}},
        timeout=30).json()["id"]
    # another machine's workdir at the same path (a CI runner, a cloud VM)
    elsewhere = requests.post(f"{tes.url}/v1/tasks", json={
        **body, "tags": {**body["tags"], TAG_ORIGIN: "another-machine"}}, timeout=30).json()["id"]
    try:
        done = tes_run(tes, workdir, "greedy", "--max-threads", "1")
        assert done.returncode == 0, done.stderr

        def state(task_id):
            return requests.get(f"{tes.url}/v1/tasks/{task_id}", timeout=30).json()["state"]

        assert state(orphan) in ("CANCELED", "CANCELING")
        assert state(other) in NON_TERMINAL  # another workdir's run is left alone
        assert state(elsewhere) in NON_TERMINAL
        said = [line for line in done.stderr.splitlines() if "come from another directory at this path" in line]
        assert len(said) == 1 and "1 task(s)" in said[0], done.stderr[-3000:]
        [mine] = [t for t in tasks_of(tes, workdir) if t["id"] not in (orphan, elsewhere)]
        assert mine["tags"][TAG_ORIGIN] == runs.origin(str(workdir))
    finally:
        for task_id in (other, elsewhere):
            requests.post(f"{tes.url}/v1/tasks/{task_id}:cancel", timeout=30)


def test_the_run_says_what_waits_and_runs_on_the_server(tes, tmp_path):
    """A queue view in the log: one line when the run's tasks change state, at most every
    30 s (a 4 s job: one line), naming the server."""
    workdir = slow_workflow(tmp_path, 4)
    done = tes_run(tes, workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    pattern = re.compile(r"crank: 1 (queued|initializing|running) on " + re.escape(tes.url) + "$")
    said = [line for line in done.stderr.splitlines() if pattern.search(line)]
    assert len(said) == 1, done.stderr[-3000:]


# ---------------------------------------------------------------- faults (docs/reliability.md)


def test_server_unreachable_mid_run_is_survived(tes, tmp_path):
    """Promise 2 on TES: the server stops answering while a task runs and ends; crank keeps
    trying within --crank-backend-tolerance and then collects the task as usual."""
    workdir = slow_workflow(tmp_path, 4)
    with proxy_to(tes) as proxy:
        proc = tes_start(tes, workdir, "--crank-tes-url", proxy.url)
        try:
            wait_for(lambda: running_tasks(tes, workdir), timeout=60, what="the task running")
            proxy.set_rule(lambda method, path: "refuse")
            # down until the task has ended on the server and crank has tried a few rounds
            wait_for(lambda: not live_tasks(tes, workdir) and len(proxy.actions("refuse")) >= 3,
                     timeout=60, what="the task ended while crank could not reach the server")
            proxy.set_rule(lambda method, path: "pass")
            _, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert (workdir / "slow.txt").read_text() == "done\n"
    assert len(tasks_of(tes, workdir)) == 1


@pytest.mark.slow
def test_server_that_stops_answering_is_given_up_within_the_tolerance(tes, tmp_path):
    """Promises 2 and 3 on TES: a server that accepts status requests but never answers
    holds no round for long; past --crank-backend-tolerance the job is reported failed with
    the reason, and its task canceled first. The tolerance is 0: the first round that waits
    out its bound gives up (a longer one only adds rounds of 20 s each; rounds tolerated
    and then given up: test_tes_hardening.py's web page, test_faults.py on Docker)."""
    workdir = slow_workflow(tmp_path, 600)
    with proxy_to(tes, hang_s=600) as proxy:
        proc = tes_start(tes, workdir, "--crank-tes-url", proxy.url, "--crank-backend-tolerance", "0")
        try:
            wait_for(lambda: running_tasks(tes, workdir), timeout=60, what="the task running")
            proxy.set_rule(lambda method, path: "hang" if status_request(method, path) else "pass")
            # the tolerance, plus one round's timeout and the shutdown: far below the
            # minutes that a round retrying its reads would hold the run
            _, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
            for task in live_tasks(tes, workdir):  # only after a failure above
                requests.post(f"{tes.url}/v1/tasks/{task['id']}:cancel", timeout=30)
    assert proc.returncode != 0
    assert "did not answer (no answer within 20 s)" in stderr, stderr[-3000:]
    assert live_tasks(tes, workdir) == []
    assert not (workdir / "slow.txt").exists()


def test_lost_answer_to_create_makes_one_task(tes, tmp_path):
    """The server created the task but its answer was lost: crank finds the task by its
    submission tag instead of posting again."""
    workdir = copy_workflow("failing", tmp_path / uuid.uuid4().hex / "wf")
    lost = []

    def lose_first_create(method, path):
        if method == "POST" and path == "/tasks" and not lost:
            lost.append(path)
            return "lose_answer"
        return "pass"

    with proxy_to(tes) as proxy:
        proxy.set_rule(lose_first_create)
        done = subprocess.run(
            tes_command(tes, workdir, "greedy", "--max-threads", "1", "--crank-tes-url", proxy.url),
            cwd=workdir, capture_output=True, text=True, env=tes.env(), stdin=subprocess.DEVNULL,
            timeout=300,
        )
        assert proxy.actions("lose_answer") == [("POST", "/tasks")]
    assert done.returncode == 0, done.stderr
    assert (workdir / "greedy.txt").read_text() == "1\n"
    assert len(tasks_of(tes, workdir)) == 1


# ---------------------------------------------------------------- the backend itself


def sleeper(tmp_path: Path, i: int, script: str = "sleep 600", **kw) -> TaskSpec:
    return TaskSpec(name=f"sleep-{i}", label="rule sleep", job_id=str(i), attempt=1, image=BUSYBOX,
                    script=script, workdir=str(tmp_path), resources=Resources(),
                    log_dir=str(tmp_path / "logs"), **kw)


def wait_terminal(backend, handles, timeout=120):
    return wait_for(lambda: (lambda s: s if all(v.terminal for v in s.values()) else None)(
        backend.poll(handles)), timeout=timeout, what="terminal tasks")


def test_a_status_round_costs_the_active_tasks_not_the_finished_ones(aws_env, tmp_path):
    """Twelve tasks of the run finished and were released, ten still run: a round is one
    list per active state (RUNNING, QUEUED, INITIALIZING), or one GetTask per running task
    when the server's lists were measured slower (a database holding many earlier tasks),
    and carries the ten only (a round used to list every task of the run)."""
    backend = TesBackend(uuid.uuid4().hex, str(tmp_path),
                         TesOptions(url=aws_env.url, storage_prefix=aws_env.prefix("count")))
    try:
        done = [backend.submit(sleeper(tmp_path, i, script="true")) for i in range(12)]
        wait_terminal(backend, done)
        backend.release(done)
        running = [backend.submit(sleeper(tmp_path, 100 + i)) for i in range(10)]
        wait_for(lambda: set(backend.poll(running).values()) == {State.RUNNING}, timeout=120,
                 what="10 running tasks")
        listed = []
        list_tasks = backend.api.list_tasks

        def list_and_note(*a, **kw):
            found = list_tasks(*a, **kw)
            if kw.get("kind") != tails.KIND:  # the live logs' list of the running ones, every few seconds
                listed.extend(found)
            return found

        backend.api.list_tasks = list_and_note
        for _ in range(3):
            before, listed[:] = dict(backend.http.counts), []
            states = backend.poll(running)
            made = {k: n - before.get(k, 0) for k, n in backend.http.counts.items() if n != before.get(k, 0)}
            assert made.pop("tails", 0) <= 1  # the live logs' one list, every few seconds
            assert made in ({"list": 3}, {"state": 10}), made
            if listed:
                assert sorted(t.id for t in listed) == sorted(backend._subs[h].tes_id for h in running)
            assert set(states.values()) == {State.RUNNING}
    finally:
        backend.close()
    live = [t for t in backend_list(aws_env, backend.run_id) if t.get("state") in NON_TERMINAL]
    assert live == []


def test_funnel_minimal_answers_parse_into_py_tes_models(aws_env, tmp_path, monkeypatch):
    """Funnel answers a MINIMAL ListTasks without a tag filter (as a TES 1.0 server, or through
    a proxy that drops the query) with every field present and empty (``resources: null``):
    the status rounds still parse it into py-tes models, as the FULL answer a result is read
    from."""
    from snakemake_executor_plugin_crank.backends.tes import monitor

    monkeypatch.setattr(monitor, "FEW", 0)  # the rounds list even for one task
    with proxy_to(aws_env) as proxy:
        proxy.set_rule(lambda method, path: "drop_tag_filter" if (method, path) == ("GET", "/tasks") else "pass")
        backend = TesBackend(uuid.uuid4().hex, str(tmp_path),
                             TesOptions(url=proxy.url, storage_prefix=aws_env.prefix("minimal")))
        try:
            task = sleeper(tmp_path, 1, script="echo hi > hi.txt", outputs=(Output(str(tmp_path / "hi.txt")),))
            handle = backend.submit(task)
            wait_terminal(backend, [handle])
            tes_id = backend._subs[handle].tes_id
            unfiltered = requests.get(f"{aws_env.url}/v1/tasks", params={"view": "MINIMAL"}, timeout=30).json()
            assert any(t["resources"] is None for t in unfiltered["tasks"])
            listed = {t.id: t for t in backend.api.list_tasks(TAG_RUN, backend.run_id)}
            assert {type(t) for t in listed.values()} == {TesTask} and listed[tes_id].state == "COMPLETE"
            assert len(proxy.actions("drop_tag_filter")) >= 2
            result = backend.result(handle, task)
            assert result.ok and result.seconds is not None and result.seconds >= 0, result
            assert read(tmp_path / "hi.txt") == "hi\n"
        finally:
            backend.close()


def backend_list(tes, run_id):
    answer = requests.get(f"{tes.url}/v1/tasks", params={
        "tag_key": TAG_RUN, "tag_value": run_id, "view": "MINIMAL", "page_size": 2047}, timeout=30)
    return answer.json().get("tasks") or []


def test_second_run_with_unchanged_inputs_uploads_nothing(aws_env, tmp_path):
    data = tmp_path / "data"
    (data / "dir").mkdir(parents=True)
    (data / "big.bin").write_bytes(os.urandom(3 << 20))
    (data / "dir" / "one").write_text("one\n")
    prefix = aws_env.prefix(f"dedup-{uuid.uuid4().hex[:8]}")
    inputs = (Input(str(data / "big.bin")), Input(str(data / "dir"), Kind.DIRECTORY))
    script = "wc -c < data/big.bin > out.txt; cat data/dir/one >> out.txt"
    sent = []
    for run in range(2):
        backend = TesBackend(uuid.uuid4().hex, str(tmp_path), TesOptions(url=aws_env.url, storage_prefix=prefix))
        try:
            task = sleeper(tmp_path, run, script=script, inputs=inputs,
                           outputs=(Output(str(tmp_path / "out.txt")),))
            handle = backend.submit(task)
            wait_terminal(backend, [handle])
            result = backend.result(handle, task)
            assert result.ok, result
            assert read(tmp_path / "out.txt") == f"{3 << 20}\none\n"
            sent.append(backend.stager.stats.bytes_sent)
        finally:
            backend.close()
    assert sent[0] >= 3 << 20
    assert sent[1] == 0


def test_an_input_removed_from_the_store_mid_run_is_sent_again_with_one_resubmission(aws_env, tmp_path):
    """The run remembers what it staged; when the object goes (a lifecycle rule, a person),
    the task ends in SYSTEM_ERROR before its command starts, and the backend sends the input
    again and submits the task once more: the job succeeds without a retry of Snakemake's."""
    (tmp_path / "in.txt").write_text("input\n")
    prefix = aws_env.prefix(f"gone-{uuid.uuid4().hex[:8]}")
    said = []
    backend = TesBackend(uuid.uuid4().hex, str(tmp_path), TesOptions(url=aws_env.url, storage_prefix=prefix),
                         report=said.append)
    try:
        def run(i):
            task = sleeper(tmp_path, i, script=f"cat in.txt > out{i}.txt", inputs=(Input(str(tmp_path / "in.txt")),),
                           outputs=(Output(str(tmp_path / f"out{i}.txt")),))
            handle = backend.submit(task)
            wait_terminal(backend, [handle])
            result = backend.result(handle, task)
            backend.release([handle])
            return result

        assert run(0).ok
        key = file_key(hashlib.sha256(b"input\n").hexdigest())
        backend.store.delete(key)
        again = run(1)
        assert again.ok, again
        assert read(tmp_path / "out1.txt") == "input\n"
        assert backend.store.head(key) == len("input\n")
        assert len([line for line in said if "could not fetch its inputs" in line]) == 1, said
    finally:
        backend.close()


def test_an_output_the_next_job_reads_is_not_uploaded_again(aws_env, tmp_path):
    """A file and a directory made by one job and read by the next come back once; they
    reach the next task by their content address without being sent again (3 files: the
    directory holds Snakemake's timestamp file too)."""
    run = uuid.uuid4().hex  # crank() names the storage prefix after the workdir's parent
    workdir = copy_workflow("tes_handoff", tmp_path / run / "wf")
    done = tes_run(aws_env, workdir)
    assert done.returncode == 0, done.stderr
    assert read(workdir / "sizes.txt") == f"{3 << 20}\n{1 << 20}\n"
    summary = [line for line in done.stderr.splitlines() if "crank: staging:" in line]
    assert len(summary) == 1 and " 3 files, 0 B sent, 4.0 MiB already in store" in summary[0], summary
    store = Store.from_url(aws_env.prefix(run))
    for made in ("mid/data.bin", "mid/parts/one"):
        digest = hashlib.sha256((workdir / made).read_bytes()).hexdigest()
        assert store.head(file_key(digest)) == (workdir / made).stat().st_size, made
    final = hashlib.sha256((workdir / "sizes.txt").read_bytes()).hexdigest()
    assert store.head(file_key(final)) is None  # no job reads it: not kept


def test_staging_failure_is_a_failed_task_with_one_line(aws_env, tmp_path):
    backend = TesBackend(uuid.uuid4().hex, str(tmp_path),
                         TesOptions(url=aws_env.url, storage_prefix=aws_env.prefix("missing")))
    try:
        # a socket cannot be read: staging fails (a missing path is skipped, see _stage)
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(tmp_path / "unreadable.sock"))
        task = sleeper(tmp_path, 1, script="true", inputs=(Input(str(tmp_path / "unreadable.sock")),))
        handle = backend.submit(task)
        assert wait_terminal(backend, [handle])[handle] is State.FINISHED
        result = backend.result(handle, task)
        assert not result.ok and "unreadable.sock" in result.reason and "\n" not in result.reason
        sock.close()
    finally:
        backend.close()


def test_unreachable_server_and_bad_storage_are_one_clear_line(aws_env, tmp_path):
    with pytest.raises(CrankError, match=r"did not answer .*check --crank-tes-url"):
        TesBackend("r", str(tmp_path), TesOptions(url="http://127.0.0.1:9", storage_prefix="s3://x/y"),
                   session=Session("http://127.0.0.1:9", retries=1, backoff=0.01))
    with pytest.raises(CrankError, match="bucket does not exist"):
        TesBackend("r", str(tmp_path), TesOptions(url=aws_env.url, storage_prefix="s3://no-such-bucket-crank/x"))


def test_bad_tes_settings_are_one_clear_line(tes, tmp_path):
    workdir = copy_workflow("failing", tmp_path / "wf")
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "--executor", "crank", "--jobs", "1", "fails",
         "--crank-backend", "tes", "--crank-tes-url", "http://127.0.0.1:9",
         "--crank-storage-prefix", tes.prefix("x")],
        # Snakemake echoes its own command line: secrets belong in the environment
        cwd=workdir, capture_output=True, text=True, timeout=120,
        env={**tes.env(), "SNAKEMAKE_CRANK_TES_TOKEN": "sekrit-token-1"})
    assert done.returncode != 0
    assert "did not answer" in done.stderr and "check --crank-tes-url" in done.stderr
    assert "sekrit-token-1" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- pure logic


def test_every_tes_state_is_mapped():
    assert set(STATES) == {"UNKNOWN", "QUEUED", "INITIALIZING", "RUNNING", "PAUSED", "COMPLETE",
                           "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED", "CANCELING", "PREEMPTED"}
    assert STATES["PREEMPTED"] is State.PREEMPTED and STATES["CANCELING"] is State.CANCELED


def test_volumes_never_prefix_each_other():
    found = layout.volumes(["/w/out", "/w/outdir", "/tmp/x/y", "/tmpx/a", "/work/p", "/wor/k"])
    everything = found + list(layout.RESERVED)
    for a in everything:
        for b in everything:
            # a string prefix only where it is a parent directory (same host tree on Funnel)
            assert a == b or not b.startswith(a) or b.startswith(a + "/"), (a, b)
    assert "/w" in found and "//tmpx/a" in found
    assert layout.volumes(["/data/my dir/x"]) == ["/data"]
    with pytest.raises(CrankError, match="reserved"):
        layout.volumes(["/crank/x"])


def test_redact_hides_credentials_in_urls():
    assert redact("http://u:secret@host:8000/v1") == "http://host:8000/v1"


def example_task(tmp_path: Path) -> TaskSpec:
    return TaskSpec(
        name="x-1-1", label="rule x", job_id="1", attempt=1, image=BASH, script="echo hi > out",
        workdir=str(tmp_path), env={"OMP_NUM_THREADS": "2"},
        inputs=(Input(str(tmp_path / "a.txt")), Input("/data/ref", Kind.DIRECTORY, url="s3://b/ref")),
        outputs=(Output(str(tmp_path / "out")),),
        resources=Resources(cpus=2, mem_mb=1500, disk_mb=2500, gpus=1, gpu_model="a100",
                            preemptible=True),
        log_dir=str(tmp_path / "logs"))


def test_resources_are_mapped_exactly(tmp_path):
    staged = [Staged(str(tmp_path / "a.txt"), "s3://b/cas/sha256/" + "0" * 64, "0" * 64, mode=0o644)]
    body = task_body(to_tes_task(example_task(tmp_path), staged, "s3://b/runs/r/1-1", {"crank-run": "r"}))
    assert body["resources"] == {"cpu_cores": 2, "ram_gb": 1.5, "disk_gb": 2.5, "preemptible": True,
                                 "backend_parameters": {"gpus": "1", "gpu_model": "a100"}}
    paths = [i["path"] for i in body["inputs"]]
    assert str(tmp_path / "a.txt") in paths and layout.WRAPPER in paths and layout.COMMAND in paths
    assert body["outputs"] == [{"path": "/crank/out", "url": "s3://b/runs/r/1-1", "type": "DIRECTORY"}]


def test_request_bodies_validate_against_the_tes_1_1_schema(tmp_path):
    """The official schema (ga4gh/task-execution-schemas, openapi/task_execution_service.openapi.yaml
    at tag v1.1) is not shipped by any package crank can depend on, so the test reads it from
    CRANK_TES_OPENAPI."""
    path = os.environ.get("CRANK_TES_OPENAPI")
    if not path or not os.path.isfile(path):
        pytest.skip("TES SCHEMA TEST SKIPPED: set CRANK_TES_OPENAPI to task_execution_service.openapi.yaml (v1.1)")
    import yaml
    from openapi_schema_validator import OAS30Validator

    spec = yaml.safe_load(Path(path).read_text())
    assert spec["info"]["version"].startswith("1.1")
    staged = [Staged(str(tmp_path / "a.txt"), "s3://b/cas/sha256/" + "0" * 64, "0" * 64, mode=0o644),
              Staged("/data/ref", "s3://b/ref", remote_dir=True)]
    body = task_body(to_tes_task(example_task(tmp_path), staged, "s3://b/runs/r/1-1",
                                 {"crank-run": "r", "crank-job": "1-1"}))
    schema = {**spec["components"]["schemas"]["tesTask"], "components": spec["components"]}
    OAS30Validator(schema).validate(body)


def test_a_task_released_while_it_runs_is_canceled_at_once(aws_env, tmp_path):
    """A job that failed while its task still ran (e.g. a wall-time stop the server
    refused): its task must not run on until the run ends."""
    backend = TesBackend(uuid.uuid4().hex, str(tmp_path),
                         TesOptions(url=aws_env.url, storage_prefix=aws_env.prefix("release")))
    try:
        handle = backend.submit(sleeper(tmp_path, 1))
        wait_for(lambda: backend.poll([handle])[handle] is State.RUNNING, timeout=120,
                 what="a running task")
        task_id = backend._subs[handle].tes_id
        backend.release([handle])

        def state():
            return requests.get(f"{aws_env.url}/v1/tasks/{task_id}", timeout=30).json()["state"]

        wait_for(lambda: state() not in NON_TERMINAL, timeout=60, what="the released task canceled")
        assert state() == "CANCELED"
    finally:
        backend.close()
