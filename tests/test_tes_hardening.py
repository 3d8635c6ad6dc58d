"""End-to-end tests of the TES backend's promises against hostile or unlucky surroundings
(docs/reliability.md, "On TES"): exact files as Snakemake's local executor leaves them, a
server that ignores tag filters, input uploads that crawl, and a server (or what stands in
front of it) that throttles, refuses the credentials or answers with a web page. Real Funnel
and SeaweedFS from tests/services.py; faults through tests/faultproxy.py on loopback ports."""

import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import obstore
import pytest
import requests
from obstore.store import from_url as obstore_from_url

from snakemake_executor_plugin_crank.backends.tes.tasks import (
    TAG_ORIGIN, TAG_RUN, TAG_SUBMISSION, TAG_WORKDIR, workdir_tag,
)

from conftest import (
    BUSYBOX, copy_workflow, ctrl_c, live_tasks, proxy_to, running_tasks, slow_workflow,
    status_request, tasks_of, tes_command, tes_run, tes_start, wait_for,
)
from faultproxy import FaultProxy

pytestmark = pytest.mark.tes


def local_run(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Snakemake's local executor (no containers) in ``workdir``: the reference."""
    return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", *args], cwd=workdir,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def user_files(workdir: Path) -> dict:
    """Every file and directory below ``workdir`` but Snakemake's and crank's own state."""
    found = {}
    for path in sorted(workdir.rglob("*")):
        relative = path.relative_to(workdir)
        if relative.parts[0] == ".snakemake":
            continue
        found[str(relative)] = None if path.is_dir() else path.read_bytes()
    return found


def twin(tmp_path: Path, snakefile: str, files: dict) -> tuple:
    """Two identical workdirs (the second for the local executor), each with its own
    storage prefix (crank names it after the workdir's parent)."""
    dirs = []
    for _ in range(2):
        workdir = tmp_path / uuid.uuid4().hex / "wf"
        workdir.mkdir(parents=True)
        (workdir / "Snakefile").write_text(snakefile)
        for name, content in files.items():
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            (workdir / name).write_text(content)
        dirs.append(workdir)
    return tuple(dirs)


def age(workdir: Path, *names: str, seconds: float = 100) -> None:
    """Make files older than the others (so that Snakemake finds their consumers due)."""
    then = time.time() - seconds
    for name in names:
        os.utime(workdir / name, (then, then))


# ---------------------------------------------------------------- item 1: update()


UPDATE_SNAKEFILE = """
rule all:
    input: "log.txt", "state"

rule append:
    input: "new.txt"
    output: update("log.txt")
    shell: "cat {input} >> {output}"

rule grow:
    input: "new.txt"
    output: update(directory("state"))
    shell: "cat {input} >> {output}/kept; cp {input} {output}/added"
"""


def test_update_outputs_keep_their_old_content_as_with_the_local_executor(aws_env, tmp_path):
    """An update() output is changed in place: the task starts with its old content, writable
    (a file and a directory), and the result is byte for byte the local executor's."""
    on_tes, local = twin(tmp_path, UPDATE_SNAKEFILE, {
        "log.txt": "old\n", "state/kept": "kept\n", "state/sub/deep": "deep\n", "new.txt": "new\n"})
    for workdir in (on_tes, local):
        age(workdir, "log.txt", "state/kept", "state/sub/deep", "state/sub", "state")
    reference = local_run(local)
    assert reference.returncode == 0, reference.stderr
    assert (local / "log.txt").read_text() == "old\nnew\n"  # what the local executor does

    done = tes_run(aws_env, on_tes)
    assert done.returncode == 0, done.stderr
    assert user_files(on_tes) == user_files(local)


# ---------------------------------------------------------------- item 2: logs of a failed job


FAILING_LOG_SNAKEFILE = """
rule fail:
    output: "never.txt", directory("never")
    log: "logs/fail.log", err="logs/fail.err"
    shell: "echo diagnostics > {log[0]}; echo details > {log.err}; mkdir {output[1]}; "
           "echo partial > {output[0]}; exit 3"
"""


def test_failed_jobs_log_files_come_back_as_with_the_local_executor(aws_env, tmp_path):
    on_tes, local = twin(tmp_path, FAILING_LOG_SNAKEFILE, {})
    reference = local_run(local)
    assert reference.returncode != 0
    assert (local / "logs" / "fail.log").read_text() == "diagnostics\n"

    done = tes_run(aws_env, on_tes)
    assert done.returncode != 0
    assert "exit code 3" in done.stderr and "Traceback" not in done.stderr
    assert user_files(on_tes) == user_files(local)


# ---------------------------------------------------------------- item 5: tag filters


def user_task(tes, tags: dict) -> str:
    """A task somebody else made on the same server, directly (not through crank)."""
    body = {"name": "somebody else's", "executors": [{"image": BUSYBOX, "command": ["sleep", "600"]}],
            "tags": tags}
    return requests.post(f"{tes.url}/v1/tasks", json=body, timeout=30).json()["id"]


def state_of(tes, task_id: str) -> str:
    return requests.get(f"{tes.url}/v1/tasks/{task_id}", timeout=30).json()["state"]


def test_a_server_that_ignores_tag_filters_never_costs_another_users_task(aws_env, tmp_path):
    """Through a proxy that drops the tag parameters of ListTasks, crank's start-up (orphans),
    its lookup after a create whose answer was lost, and its shutdown touch only crank's
    own tasks: another user's running task survives; a dead run's orphan is still removed;
    crank says once that the filter is ignored."""
    workdir = copy_workflow("failing", tmp_path / uuid.uuid4().hex / "wf")
    other = user_task(aws_env, {"owner": "somebody else"})
    orphan = user_task(aws_env, {TAG_RUN: "crashed", TAG_WORKDIR: workdir_tag(str(workdir))})
    refused = []

    def drop_filters_and_refuse_the_first_create(method, path):
        if method == "GET" and path == "/tasks":
            return "drop_tag_filter"
        if method == "POST" and path == "/tasks" and not refused:
            refused.append(path)  # never reaches the server: a lookup must not adopt anything
            return "refuse"
        return "pass"

    try:
        wait_for(lambda: state_of(aws_env, other) == "RUNNING", timeout=60, what="the user's task running")
        with proxy_to(aws_env) as proxy:
            proxy.set_rule(drop_filters_and_refuse_the_first_create)
            done = tes_run(aws_env, workdir, "greedy", "--max-threads", "1", "--crank-tes-url", proxy.url)
            assert ("POST", "/tasks") in proxy.actions("refuse")
            assert len(proxy.actions("drop_tag_filter")) >= 3  # start-up, lookup, rounds, shutdown
        assert done.returncode == 0, done.stderr
        assert (workdir / "greedy.txt").read_text() == "1\n"
        assert state_of(aws_env, other) == "RUNNING", "crank touched another user's task"
        assert state_of(aws_env, orphan) in ("CANCELED", "CANCELING")
        mine = [t for t in tasks_of(aws_env, workdir) if t["id"] != orphan]
        assert len(mine) == 1 and mine[0]["state"] == "COMPLETE"
        said = [line for line in done.stderr.splitlines() if "ignores the tag filter" in line]
        assert len(said) == 1, said
    finally:
        for task_id in (other, orphan):
            requests.post(f"{aws_env.url}/v1/tasks/{task_id}:cancel", timeout=30)


OLDER_SERVER_SNAKEFILE = """
rule all:
    input: "joined.txt", "tree"

rule long:
    output: "long.txt"
    shell: "sleep 15; echo long > {output}"

rule tree:
    input: "in.txt"
    output: directory("tree")
    shell: "mkdir -p {output}/sub; cp {input} {output}/sub/copy; ln -s sub/copy {output}/link"

rule joined:
    input: "in.txt", "long.txt"
    output: "joined.txt"
    shell: "cat {input} > {output}"
"""


@pytest.mark.parametrize("filters", ["refuse_filters", "drop_filters"])
def test_a_tes_1_0_server_runs_the_workflow_and_touches_only_its_own_tasks(aws_env, tmp_path, filters):
    """Funnel behind a proxy that answers 400 to ListTasks' tag and state filters (a strict
    TES 1.0 server) or drops them (a server that ignores them): a run killed while its task
    runs is adopted by the rerun, a dead run's task is canceled, another user's task and a
    task from the same path on another machine run on, the files are the local executor's,
    and each run says once that the server is older."""
    on_tes, local = twin(tmp_path, OLDER_SERVER_SNAKEFILE, {"in.txt": "in\n"})
    # the reference runs meanwhile in its own copy (its rule long sleeps 15 s too)
    pool = ThreadPoolExecutor(1)
    reference = pool.submit(local_run, local)
    pool.shutdown(wait=False)
    mine = {TAG_WORKDIR: workdir_tag(str(on_tes))}
    other = user_task(aws_env, {"owner": "somebody else"})
    elsewhere = user_task(aws_env, {**mine, TAG_RUN: "theirs", TAG_ORIGIN: "another machine"})
    crashed = user_task(aws_env, {**mine, TAG_RUN: "crashed"})
    try:
        wait_for(lambda: {state_of(aws_env, t) for t in (other, elsewhere, crashed)} == {"RUNNING"},
                 timeout=90, what="the other tasks running")
        with proxy_to(aws_env) as proxy:
            proxy.set_rule(lambda method, path: filters if (method, path) == ("GET", "/tasks") else "pass")
            first = tes_start(aws_env, on_tes, "--crank-tes-url", proxy.url)
            try:
                wait_for(lambda: any((t.get("tags") or {}).get(TAG_RUN) not in ("theirs", "crashed")
                                     for t in running_tasks(aws_env, on_tes)), 90, "the long task running")
            finally:
                first.kill()  # SIGKILL: no clean-up at all
                first.wait()
            assert tes_run(aws_env, on_tes, "--unlock").returncode == 0
            done = tes_run(aws_env, on_tes, "--rerun-incomplete", "--crank-tes-url", proxy.url)
            seen = len(proxy.actions("error400" if filters == "refuse_filters" else filters))
        assert done.returncode == 0, done.stderr[-3000:]
        adopted = [line for line in done.stderr.splitlines() if "adopts the" in line]
        assert any("rule long" in line for line in adopted), done.stderr[-3000:]
        reference = reference.result()
        assert reference.returncode == 0, reference.stderr
        assert user_files(on_tes) == user_files(local)
        assert seen >= 2  # start-up and the run's end at least
        said = [line for line in done.stderr.splitlines() if "as a TES 1.0 server does" in line]
        assert len(said) == 1, said
        assert state_of(aws_env, other) == "RUNNING" and state_of(aws_env, elsewhere) == "RUNNING"
        assert state_of(aws_env, crashed) in ("CANCELED", "CANCELING")
    finally:
        for task_id in (other, elsewhere, crashed):
            requests.post(f"{aws_env.url}/v1/tasks/{task_id}:cancel", timeout=30)


# ---------------------------------------------------------------- item 11: status vs uploads


STAGING_SNAKEFILE = """
localrules: all

rule all:
    input: "quick.txt", "big.txt"

rule quick:
    output: "quick.txt"
    shell: "echo quick > {output}"

rule big:
    input: [f"in/{i}.bin" for i in range(12)]
    output: "big.txt"
    shell: "cat {input} | wc -c > {output}"
"""


def test_a_finished_job_is_reported_while_other_inputs_still_upload(aws_env, tmp_path):
    """Input uploads that do not progress (the store accepts their PUTs and never answers)
    fill the upload pool; a job that finished meanwhile is still collected and reported, so
    status rounds (and wall times) never wait for staging."""
    workdir = tmp_path / uuid.uuid4().hex / "wf"
    (workdir / "in").mkdir(parents=True)
    (workdir / "Snakefile").write_text(STAGING_SNAKEFILE)
    for i in range(12):
        (workdir / "in" / f"{i}.bin").write_bytes(os.urandom(1000))
    host, port = aws_env.s3.endpoint.rsplit("//", 1)[1].split(":")
    with FaultProxy(("127.0.0.1", 0), (host, int(port)), hang_s=300) as store:
        store.set_rule(lambda method, path: "hang" if method == "PUT" and "/cas/" in path else "pass")
        proc = tes_start(aws_env, workdir, "--crank-storage-endpoint", store.url)
        try:
            wait_for(lambda: len(store.actions("hang")) >= 8, timeout=60, what="uploads stuck")
            wait_for(lambda: (workdir / "quick.txt").exists(), timeout=60,
                     what="the quick job collected while uploads hang")
            assert (workdir / "quick.txt").read_text() == "quick\n"
            assert not (workdir / "big.txt").exists()
            store.set_rule(lambda method, path: "pass")
            store.cut()  # the stuck uploads fail and are retried by the store client
            _, stderr = proc.communicate(timeout=180)
        finally:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert (workdir / "big.txt").read_text().strip() == "12000"


# ---------------------------------------------------------------- item 12: status list answers


def test_throttled_requests_are_waited_out(aws_env, tmp_path):
    """429 on a create, 429 and 503 with Retry-After on the status list: crank sends nothing
    until the time the server asked for, and the run completes within the tolerance, with
    one task."""
    workdir = slow_workflow(tmp_path, 3)
    creates, sent = [], []  # (time, action) of each create and each status list
    rounds = threading.Event()  # throttle the status list from now on

    def throttle(method, path):
        if (method, path) == ("POST", "/tasks"):
            creates.append((time.monotonic(), "error429" if not creates else "pass"))
            return creates[-1][1]
        if not status_request(method, path) or not rounds.is_set():
            return "pass"
        action = "error429" if len(sent) < 2 else "error503" if len(sent) < 4 else "pass"
        sent.append((time.monotonic(), action))
        return action

    with proxy_to(aws_env, retry_after_s=2) as proxy:
        proxy.set_rule(throttle)
        proc = tes_start(aws_env, workdir, "--crank-tes-url", proxy.url)
        try:
            wait_for(lambda: running_tasks(aws_env, workdir), timeout=60, what="the task running")
            rounds.set()
            _, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert (workdir / "slow.txt").read_text() == "done\n"
    assert [a for _, a in creates] == ["error429", "pass"] and creates[1][0] - creates[0][0] >= 1.5
    assert len(tasks_of(aws_env, workdir)) == 1
    assert [a for _, a in sent[:5]] == ["error429"] * 2 + ["error503"] * 2 + ["pass"], sent
    gaps = [later - earlier for (earlier, _), (later, _) in zip(sent, sent[1:5])]
    assert min(gaps) >= 1.5, gaps  # Retry-After: 2, less the round trip
    assert "asked crank to wait 2 s (HTTP 429" in stderr
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_creates_keep_pace_with_a_server_that_throttles_them(aws_env, tmp_path):
    """A gateway that refuses every create for its first 10 s (429, Retry-After: 1), then
    takes one a second, and loses the answer of every fifth create it lets through: every
    job of a wide run still gets exactly one task. Throttled creates are waited out, not
    counted as failures (five throttled answers used to fail a job)."""
    n = 16
    workdir = tmp_path / "wide"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(
        f"rule all:\n    input: expand('out/{{i}}.txt', i=range({n}))\n"
        "rule one:\n    output: 'out/{i}.txt'\n    shell: 'echo {wildcards.i} > {output}'\n")
    first, passed = [], []  # time of the first create; times of those let through

    def gateway(method, path):
        if (method, path) != ("POST", "/tasks"):
            return "pass"
        now = time.monotonic()
        first[:] = first or [now]
        if now - first[0] < 10 or (passed and now - passed[-1] < 1.0):
            return "error429"
        passed.append(now)
        return "lose_answer" if len(passed) % 5 == 0 else "pass"

    with proxy_to(aws_env, retry_after_s=1) as proxy:
        proxy.set_rule(gateway)
        done = tes_run(aws_env, workdir, "--crank-tes-url", proxy.url, "--jobs", str(n), timeout=400)
        throttled, lost = proxy.actions("error429"), proxy.actions("lose_answer")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(int(p.read_text()) for p in (workdir / "out").glob("*.txt")) == list(range(n))
    tags = [t["tags"][TAG_SUBMISSION] for t in tasks_of(aws_env, workdir)]
    assert len(tags) == n and len(set(tags)) == n, sorted(tags)
    assert len(throttled) >= n and len(lost) >= 3, (len(throttled), len(lost))
    assert "Traceback" not in done.stderr


def while_the_status_list_answers(tes, tmp_path: Path, action: str, *args: str, env=None):
    """A one-job workflow whose task sleeps on the server; once it runs, the fault proxy
    answers every status list with ``action``. Returns the workdir, the finished snakemake
    process with its stdout and stderr, and the seconds it took from then on."""
    workdir = slow_workflow(tmp_path, 600)
    with proxy_to(tes) as proxy:
        proc = subprocess.Popen(
            tes_command(tes, workdir, "--crank-tes-url", proxy.url, *args), cwd=workdir,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
            env={**tes.env(), **(env or {})})
        try:
            wait_for(lambda: running_tasks(tes, workdir), timeout=60, what="the task running")
            proxy.set_rule(lambda method, path: action if status_request(method, path) else "pass")
            started = time.monotonic()
            out, err = proc.communicate(timeout=100)
        finally:
            proc.kill()
            for task in live_tasks(tes, workdir):  # the shutdown could not list them
                requests.post(f"{tes.url}/v1/tasks/{task['id']}:cancel", timeout=30)
    return workdir, proc, out, err, time.monotonic() - started


def test_refused_credentials_on_the_status_list_are_one_line(aws_env, tmp_path):
    """An expired token (401 on the status list): the run ends with one line naming the
    token setting, without a traceback and without waiting out the tolerance."""
    token = f"sekrit-{uuid.uuid4().hex}"
    workdir, proc, out, stderr, seconds = while_the_status_list_answers(
        aws_env, tmp_path, "error401", env={"SNAKEMAKE_CRANK_TES_TOKEN": token})
    assert proc.returncode != 0
    assert seconds < 60  # not the 120 s tolerance
    lines = [line for line in stderr.splitlines() if "401 from the TES server" in line]
    assert lines and "--crank-tes-token / SNAKEMAKE_CRANK_TES_TOKEN" in lines[0], stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-5000:]
    assert token not in stderr + out
    assert not (workdir / "slow.txt").exists()


def test_a_web_page_instead_of_the_status_list_is_one_line(aws_env, tmp_path):
    """A proxy in front of the server answers with an HTML page: the status round fails like
    a server that does not answer (tolerated, then the job fails), in one line."""
    workdir, proc, _, stderr, _ = while_the_status_list_answers(
        aws_env, tmp_path, "html200", "--crank-backend-tolerance", "5")
    assert proc.returncode != 0
    assert "with something other than JSON (text/html: '<html><body><h1>Please sign in" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr
    assert not (workdir / "slow.txt").exists()


# ---------------------------------------------------------------- a store that stops reading


def store_proxy(tes) -> FaultProxy:
    """The fault proxy on a free loopback port in front of SeaweedFS."""
    host, port = tes.s3.endpoint.rsplit("//", 1)[1].split(":")
    return FaultProxy(("127.0.0.1", 0), (host, int(port.rstrip("/"))))


def hang_inputs(method: str, path: str) -> str:
    """An S3 server that takes the head of an input's PUT and never reads its body."""
    return "hang" if method == "PUT" and "/cas/" in path else "pass"


def hang_products(method: str, path: str) -> str:
    """One that never answers a download of a task's products."""
    return "hang" if method == "GET" and "/runs/" in path else "pass"


def input_workflow(tmp_path: Path) -> Path:
    workdir = tmp_path / uuid.uuid4().hex / "wf"
    workdir.mkdir(parents=True)
    (workdir / "big.bin").write_bytes(os.urandom(20 << 20))  # more than socket buffers hold
    (workdir / "Snakefile").write_text(
        'rule count:\n    input: "big.bin"\n    output: "count.txt"\n'
        '    shell: "wc -c < {input} > {output}"\n')
    return workdir


def test_an_upload_the_store_stops_reading_fails_its_job_in_one_line(aws_env, tmp_path):
    """The store takes an input's PUT and never reads it: the upload is dropped after
    --crank-storage-stall, sent again within the tolerance, and then the job fails with one
    line naming the store; nothing appears under the input's key and no task is made."""
    workdir = input_workflow(tmp_path)
    with store_proxy(aws_env) as proxy:
        proxy.set_rule(hang_inputs)
        where = proxy.url
        started = time.monotonic()
        done = tes_run(aws_env, workdir, "--crank-storage-endpoint", proxy.url,
                       "--crank-storage-stall", "2", "--crank-backend-tolerance", "4", timeout=120)
        seconds = time.monotonic() - started
        hung = len(proxy.actions("hang"))
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "took no part of the upload" in line]
    assert lines and f"the store at {where}" in lines[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-5000:]
    assert hung >= 2  # sent again after the first stall
    assert seconds < 60, seconds  # bounded by the stall and the tolerance, not by a timeout
    assert tasks_of(aws_env, workdir) == []
    assert not (workdir / "count.txt").exists()
    store = obstore_from_url(aws_env.prefix(workdir.parent.name), client_options={"allow_http": True})
    assert [m["path"] for batch in obstore.list(store) for m in batch] == []


@pytest.mark.parametrize("hang", [hang_inputs, hang_products], ids=["upload", "download"])
def test_ctrl_c_does_not_wait_for_a_store_that_stopped_answering(aws_env, tmp_path, hang):
    """Ctrl-C while an input upload or a product download hangs on the store: the run ends
    within seconds (the request is dropped, not awaited), the task is canceled, and no file
    appears under a final name."""
    workdir = input_workflow(tmp_path)
    with store_proxy(aws_env) as proxy:
        proxy.set_rule(hang)
        proc = tes_start(aws_env, workdir, "--crank-storage-endpoint", proxy.url)
        try:
            wait_for(lambda: proxy.actions("hang"), timeout=120, what="a request to the store hanging")
            seconds, stderr = ctrl_c(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert seconds < 5, f"Ctrl-C took {seconds:.1f} s: {stderr[-3000:]}"
    assert proc.returncode != 0
    assert live_tasks(aws_env, workdir) == []
    assert not (workdir / "count.txt").exists()
    assert [p.name for p in workdir.iterdir() if p.name.endswith(".part")] == []
