"""Faults on the Docker backend, injected for real: a private dockerd restarted mid-run,
and a proxy on a Unix socket between crank and that engine (tests/faultproxy.py). Every
test is bounded in time and polls with a deadline. See docs/reliability.md."""

import signal
import subprocess
import sys
import textwrap
import time

import docker
import pytest

from conftest import BUSYBOX, wait_for
from faultproxy import FaultProxy

pytestmark = pytest.mark.docker


def workflow(tmp_path, text, name="wf"):
    workdir = tmp_path / name
    workdir.mkdir(parents=True)
    (workdir / "Snakefile").write_text(textwrap.dedent(text))
    return workdir


def command(url, *args):
    return [sys.executable, "-m", "snakemake", "--executor", "crank", "--jobs", "2",
            "--crank-default-image", BUSYBOX, "--crank-docker-url", url,
            "--crank-docker-network", "none", "--seconds-between-status-checks", "1", *args]


def run(workdir, url, *args, timeout=90):
    return subprocess.run(command(url, *args), cwd=workdir, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def start(workdir, url, *args):
    return subprocess.Popen(command(url, *args), cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)


def finish(proc, timeout=90):
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return out


def running(api):
    return [c for c in api.containers(all=True) if c["State"] == "running"]


# the paths a job can take on Docker: by exec in a warm runner (the default) or in a
# container of its own; the fault tests of promises 2-4 run both
BOTH = pytest.mark.parametrize("warm", ["yes", "no"], ids=["warm", "cold"])


def running_command(api, text):
    """Whether a process whose command line holds ``text`` runs in a container: the job
    itself, whether a container of its own or an exec in a warm runner."""
    for c in running(api):
        try:
            top = api.top(c["Id"], ps_args="-o pid,args")
        except docker.errors.APIError:
            continue  # ended meanwhile
        if any(text in " ".join(row) for row in top.get("Processes") or []):
            return True
    return False


# ------------------------------------------------------------------ 1. engine restart


RESTART = """
rule all:
    input: "b.txt"

rule a:
    output: "a.txt"
    shell: "sleep 8; echo a > {output}"

rule b:
    input: "a.txt"
    output: "b.txt"
    shell: "cat {input} > {output}; echo b >> {output}"
"""


@BOTH
def test_engine_restart_mid_run_is_survived(engine, api, tmp_path, warm):
    """Item 1: dockerd restarts (live-restore off) while a job runs: crank keeps polling
    with backoff, reports the killed task truthfully, Snakemake's retry runs it again,
    and the run completes. Bounded: the whole test stays well under two minutes. In a
    warm runner the job is an exec, whose end an engine that restarted never reports:
    crank finds it when the event stream reconnects."""
    workdir = workflow(tmp_path, RESTART)
    began = time.monotonic()
    proc = start(workdir, engine.url, "--retries", "1", "--crank-docker-warm", warm)
    try:
        wait_for(lambda: running_command(api, "sleep 8"), 30, "job a to run")
        engine.restart()  # its containers are stopped: live-restore is off
        out = finish(proc, timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert (workdir / "b.txt").read_text() == "a\nb\n"
    # whether the engine's shutdown killed job a (then reported as killed and retried)
    # or left it running, the outcome reported is the true one
    if "rule a (job" in out:
        assert "killed by signal" in out or "exit code" in out, out
    assert "Traceback" not in out
    assert api.containers(all=True) == []
    assert time.monotonic() - began < 110


# a job's first attempt marks its start and takes 25 s (the engine stops under it); the
# attempt crank runs again finds the mark and ends at once: the run need not wait 25 s more
FOUR = """
rule all:
    input: expand("out/{i}.txt", i=range(4))

rule work:
    output: "out/{i}.txt"
    shell: "if [ -e started.{wildcards.i} ]; then echo again > again.{wildcards.i}; "
           "else echo started > started.{wildcards.i}; sleep 25; fi; echo {wildcards.i} > {output}"
"""


@pytest.mark.slow
@BOTH
def test_an_engine_stopped_under_running_jobs_runs_them_again_once(engine, api, tmp_path, warm):
    """dockerd stopped 3 s into four 25 s jobs, started 4 s after it stopped, no --retries: a task the
    engine's stop killed is not the job's fault, crank runs it again once, and the run
    completes with every output right, each written by the attempt run again
    (docs/reliability.md)."""
    workdir = workflow(tmp_path, FOUR)
    proc = start(workdir, engine.url, "--crank-docker-warm", warm, "--jobs", "4")
    try:
        wait_for(lambda: all((workdir / f"started.{i}").exists() for i in range(4)), 60,
                 "the four jobs to start")
        time.sleep(3)  # the scenario itself: the engine stops 3 s into the jobs
        engine.stop()
        time.sleep(4)  # and is away for 4 s
        engine.start()
        out = finish(proc, timeout=150)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    for i in range(4):
        assert (workdir / "out" / f"{i}.txt").read_text() == f"{i}\n"
        assert (workdir / f"again.{i}").read_text() == "again\n"
    assert "Traceback" not in out
    assert api.containers(all=True) == []


ONE_LONG = """
rule long:
    output: "out.txt"
    shell: "if [ -e started ]; then echo again > again; else echo started > started; sleep 60; fi; echo done > {output}"
"""


@pytest.mark.parametrize("stopping", [True, False], ids=["engine-gone-after", "engine-stays"])
def test_a_container_killed_as_the_engine_goes_runs_again_once_and_only_then(engine, api, tmp_path, stopping):
    """A stopping engine still answers while it kills its containers and goes silent moments
    later: crank can see a container ended by SIGKILL before any request of its own fails.
    Such a container (the engine gone for crank right after a listing showed it ended, as
    through the proxy here) is run again once; the same kill with the engine answering on is someone's kill,
    and fails the job."""
    workdir = workflow(tmp_path, ONE_LONG)
    with FaultProxy(str(tmp_path / "p.sock"), engine.socket) as proxy:
        proc = start(workdir, proxy.url, "--crank-docker-warm", "no")
        try:
            wait_for(lambda: running_command(api, "sleep 60"), 30, "the job's command to run")
            [container] = running(api)
            api.kill(container["Id"])
            if stopping:  # silent once crank has listed the container ended
                wait_for(lambda: api.inspect_container(container["Id"])["State"]["Status"] == "exited", 30,
                         "the container to end")
                before = len(proxy.seen)
                wait_for(lambda: ("GET", "/containers/json", "pass") in proxy.seen[before:], 30,
                         "crank to list the containers after the kill")
                proxy.set_rule(lambda method, path: "refuse")
                proxy.cut()
                wait_for(lambda: proxy.actions("refuse"), 30, "crank to find the engine gone")
                proxy.set_rule(lambda method, path: "pass")
            out = finish(proc, timeout=60)
        finally:
            proc.kill()
        assert "Traceback" not in out, out
        if stopping:
            assert proc.returncode == 0, out
            assert (workdir / "again").read_text() == "again\n"
            assert (workdir / "out.txt").read_text() == "done\n"
        else:
            assert proc.returncode != 0, out
            assert "exit code 137; likely killed by signal 9" in out, out
            assert not (workdir / "again").exists() and not (workdir / "out.txt").exists()
    assert api.containers(all=True) == []


def test_a_container_killed_while_the_engine_was_silent_since_its_start_runs_again_once(engine, api, tmp_path):
    """No listing of crank's is answered from before the job's container starts until after
    a kill ended it (as an engine that stops right after it started the container): crank
    never saw it running, and still runs it again once."""
    workdir = workflow(tmp_path, ONE_LONG)
    with FaultProxy(str(tmp_path / "p.sock"), engine.socket) as proxy:
        started = []

        def silent_from_the_start(method, path):
            if method == "POST" and path.endswith("/start"):
                started.append(path)
            return "refuse" if started and path == "/containers/json" else "pass"

        proxy.set_rule(silent_from_the_start)
        proc = start(workdir, proxy.url, "--crank-docker-warm", "no")
        try:
            wait_for(lambda: running_command(api, "sleep 60"), 30, "the job's command to run")
            [container] = running(api)
            api.kill(container["Id"])
            wait_for(lambda: api.inspect_container(container["Id"])["State"]["Status"] == "exited", 30,
                     "the container to end")
            proxy.set_rule(lambda method, path: "pass")
            out = finish(proc, timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 0, out
    assert (workdir / "again").read_text() == "again\n"
    assert (workdir / "out.txt").read_text() == "done\n"
    assert api.containers(all=True) == []


SLOW = """
rule slow:
    output: "slow.txt"
    shell: "sleep 4; echo done > {output}"
"""


@BOTH
def test_giving_up_never_lets_a_later_run_accept_the_outputs(engine, api, tmp_path, warm):
    """Item 1: the engine stays unreachable past the tolerance. crank reports the job
    failed; the container (unreachable, so not removable) then writes its output after
    Snakemake has exited. The next run must not take that output as complete, and
    removes the orphan container."""
    workdir = workflow(tmp_path, SLOW)
    with FaultProxy(str(tmp_path / "p.sock"), engine.socket) as proxy:
        proc = start(workdir, proxy.url, "--crank-backend-tolerance", "2", "--crank-docker-warm", warm)
        try:
            wait_for(lambda: running_command(api, "sleep 4"), 30, "the job's command to run")
            proxy.set_rule(lambda method, path: "refuse")  # the engine is gone for crank
            proxy.cut()
            out = finish(proc, timeout=60)
        finally:
            proc.kill()
        assert proc.returncode != 0
        assert "crank lost the backend" in out and "marked incomplete" in out, out
        assert "Traceback" not in out, out
        # the container outlived Snakemake and wrote its output under the final name
        wait_for(lambda: (workdir / "slow.txt").exists(), 30, "the orphan to write its output")

    again = run(workdir, engine.url)
    assert again.returncode != 0
    assert "Nothing to be done" not in again.stderr
    assert "incomplete" in again.stderr and "slow.txt" in again.stderr

    rerun = run(workdir, engine.url, "--rerun-incomplete")
    assert rerun.returncode == 0, rerun.stderr
    assert "removed 1 container(s) left by an earlier run" in rerun.stderr
    assert (workdir / "slow.txt").read_text() == "done\n"
    assert api.containers(all=True) == []


# ------------------------------------------------------------------ 2. lost during submit


TWO = """
rule all:
    input: "x.txt", "y.txt"

rule make:
    output: "{name}.txt"
    shell: "echo {wildcards.name} > {output}"
"""


@BOTH
def test_engine_lost_during_submit_is_retried_and_leaves_nothing(engine, api, tmp_path, warm):
    """Item 2: the connection breaks during create (request refused) and during start
    (the engine started the container, or the exec, but the answer was lost): the
    submission is made again, the jobs complete, no container is left, no traceback."""
    workdir = workflow(tmp_path, TWO)
    faults = {"create": 1, "start": 1, "image": 1}
    # the run's first container is crank's look at what the engine sees (never started): the
    # fault is for the next one, a job's
    creates = []

    def rule(method, path):
        if path == "/containers/create":
            creates.append(path)
            if len(creates) == 1:
                return "pass"
        for key, kind, action in (("image", "/json", "refuse"), ("create", "/containers/create", "refuse"),
                                  ("start", "/start", "lose_answer")):
            if method in ("GET", "POST") and path.endswith(kind) and faults[key]:
                if key == "image" and (not path.startswith("/images/") or path == "/images/json"):
                    continue
                faults[key] -= 1
                return action
        return "pass"

    with FaultProxy(str(tmp_path / "p.sock"), engine.socket) as proxy:
        proxy.set_rule(rule)
        done = run(workdir, proxy.url, "--crank-docker-warm", warm)
        assert {a for a in ("refuse", "lose_answer") if proxy.actions(a)} == {"refuse", "lose_answer"}
    assert done.returncode == 0, done.stderr
    assert (workdir / "x.txt").read_text() == "x\n" and (workdir / "y.txt").read_text() == "y\n"
    assert "Traceback" not in done.stderr
    assert api.containers(all=True) == []


def test_engine_gone_during_submit_fails_the_job_in_one_line(engine, api, tmp_path):
    """Item 2: the engine never takes the container: after the tolerance the job fails
    with one line, nothing is left behind."""
    workdir = workflow(tmp_path, SLOW)
    with FaultProxy(str(tmp_path / "p.sock"), engine.socket) as proxy:
        proxy.set_rule(lambda m, p: "lose_answer" if p.endswith("/start") else "pass")
        done = run(workdir, proxy.url, "--crank-backend-tolerance", "2")
    assert done.returncode != 0
    lines = [l for l in done.stderr.splitlines() if "rule slow: the backend failed" in l]
    # a container of its own is created and started in one step; a warm runner's start
    # is its own step
    assert lines and ("did not answer while creating a container" in lines[0]
                      or "did not answer while starting a container" in lines[0]), done.stderr
    assert "Traceback" not in done.stderr
    assert api.containers(all=True) == []
    assert not (workdir / "slow.txt").exists()


# ------------------------------------------------------------------ 3. disk full


DISK = """
rule fill:
    output: "big.txt"
    shell: "dd if=/dev/zero of={output} bs=1024 count=8192"

rule chatty:
    output: config["elsewhere"]
    shell: "head -c 3000000 /dev/zero | tr '\\\\0' x; echo ok > {output}"
"""


@pytest.fixture
def small_fs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@BOTH
def test_disk_full_fails_with_the_jobs_own_error(engine, api, tmp_path, small_fs, warm):
    """Item 3: the job's own 'No space left on device' is the report, once; saving logs
    on a full disk never changes an outcome: a job that succeeded while its log could not
    be saved is reported successful. A warm exec writes its logs in the runner's
    scratch directory, off the workdir's disk, and crank moves them afterwards."""
    workdir = workflow(small_fs, DISK)
    elsewhere = tmp_path / "elsewhere" / "ok.txt"
    elsewhere.parent.mkdir()
    args = ("--crank-docker-warm", warm, "--config", f"elsewhere={elsewhere}")
    done = run(workdir, engine.url, "fill", *args)
    assert done.returncode != 0
    assert "rule fill (job" in done.stderr and "No space left on device" in done.stderr, done.stderr
    assert "lost the backend" not in done.stderr and "backend failed" not in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.count("No space left on device") >= 1
    # Snakemake itself then fails to record its metadata on the full disk and leaves
    # the partial output (its cleanup comes after that): docs/reliability.md
    (workdir / "big.txt").unlink(missing_ok=True)

    done = run(workdir, engine.url, "chatty", *args)
    assert done.returncode == 0, done.stderr
    assert elsewhere.read_text() == "ok\n"
    assert "Traceback" not in done.stderr
    # no truncated log under the log's name
    assert not list((workdir / ".snakemake" / "crank" / "logs").glob("*/chatty-*.stdout"))
    assert api.containers(all=True) == []


# ------------------------------------------------------------------ 8. a silent engine


def test_engine_that_never_answers_is_reported_quickly(tmp_path):
    """Item 8: an address that accepts connections but never answers: one line, fast."""
    workdir = workflow(tmp_path, SLOW)
    with FaultProxy(str(tmp_path / "p.sock"), "/nonexistent", hang_s=60) as proxy:
        proxy.set_rule(lambda m, p: "hang")
        began = time.monotonic()
        done = run(workdir, proxy.url, timeout=60)
        took = time.monotonic() - began
    assert done.returncode != 0
    assert "accepted the connection but did not answer within 10 s" in done.stderr
    assert "check that this address is a Docker engine" in done.stderr
    assert "Traceback" not in done.stderr
    assert took < 40


# ------------------------------------------------------------------ 9. Ctrl-C


CANCEL = """
rule all:
    input: expand("slow{i}.txt", i=range(2))

rule slow:
    output: "slow{i}.txt"
    shell: "sleep 600; touch {output}"
"""


def test_ctrl_c_does_not_blame_removals_on_others(engine, api, tmp_path):
    """Item 9: after Ctrl-C crank removes its containers and says nothing about
    containers 'removed outside crank'."""
    workdir = workflow(tmp_path, CANCEL)
    proc = start(workdir, engine.url)
    try:
        wait_for(lambda: len(running(api)) == 2, 30, "two running containers")
        proc.send_signal(signal.SIGINT)
        out = finish(proc, timeout=60)
    finally:
        proc.kill()
    assert "removed outside crank" not in out, out
    assert "Traceback" not in out
    assert api.containers(all=True) == []
    assert not list(workdir.glob("slow*.txt"))


# ------------------------------------------------------------------ 11, 12. memory


MEMORY = """
rule tiny:
    output: "tiny.txt"
    resources: mem_mb=1
    shell: "x=$(head -c 100000000 /dev/zero | tr '\\\\0' a); echo ${{#x}} > {output}"

rule tolerant:
    output: "tolerant.txt"
    resources: mem_mb=20
    # the subshell offers itself to the OOM killer first, so the shell itself survives
    shell: "(echo 1000 > /proc/self/oom_score_adj; x=$(head -c 200000000 /dev/zero | tr '\\\\0' a); echo ${{#x}}) || true; echo survived > {output}"
"""


def test_memory_floor_is_reported_as_the_real_limit(engine, api, tmp_path):
    """Item 11: mem_mb below Docker's floor: the OOM report gives the limit the
    container really had, and the request."""
    workdir = workflow(tmp_path, MEMORY)
    done = run(workdir, engine.url, "tiny")
    assert done.returncode != 0
    assert "killed: out of memory (limit 6.29 MB, Docker's minimum; mem_mb=1 was asked)" in done.stderr, done.stderr
    assert not (workdir / "tiny.txt").exists()
    assert api.containers(all=True) == []


def test_child_killed_for_memory_but_exit_0_is_accepted_with_a_warning(engine, api, tmp_path):
    """Item 12: the exit code decides, as with Snakemake's local executor; crank warns."""
    workdir = workflow(tmp_path, MEMORY)
    done = run(workdir, engine.url, "tolerant")
    assert done.returncode == 0, done.stderr
    assert (workdir / "tolerant.txt").read_text() == "survived\n"
    warning = [l for l in done.stderr.splitlines() if "rule tolerant (job" in l]
    assert warning and "a process was killed: out of memory (limit 20 MB)" in warning[0], done.stderr
    assert "the command still exited 0" in warning[0]
    assert api.containers(all=True) == []
