"""Unit tests of pure logic: resource mapping, mount planning, launch command, messages."""

import dataclasses
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from snakemake_executor_plugin_crank.backends.docker.engine import gpu_request
from snakemake_executor_plugin_crank.backends.docker.mounts import plan_mounts
from snakemake_executor_plugin_crank.adapter.group_runs import Ended, GroupRuns, merge_twin
from snakemake_executor_plugin_crank.adapter.resources import from_snakemake
from snakemake_executor_plugin_crank.errors import CrankError, failure_message
from snakemake_executor_plugin_crank.limits import fit
from snakemake_executor_plugin_crank.rounds import Rounds
from snakemake_executor_plugin_crank.task import (
    Capacity,
    Resources,
    TaskResult,
    TaskSpec,
    shell_argv,
)


def test_resources_are_mapped_exactly():
    res = from_snakemake("rule r", 4, {"mem_mb": 1500, "disk_mb": 2500, "runtime": 90, "gpu": 1})
    assert res == Resources(cpus=4, mem_mb=1500, disk_mb=2500, runtime_s=5400, gpus=1)


def test_unset_and_remote_decided_resources_stay_unset():
    res = from_snakemake("rule r", 1, {"tmpdir": "<TBD>", "mem_mb": "<TBD>"})
    assert res == Resources(cpus=1)


@pytest.mark.parametrize(
    "name,value",
    [("mem_mb", "lots"), ("mem_mb", -5), ("runtime", "soon"), ("gpu", True), ("mem_mb", "inf")],
)
def test_invalid_resource_values_name_the_rule_and_resource(name, value):
    with pytest.raises(CrankError, match=rf"rule myrule: resource {name}="):
        from_snakemake("rule myrule", 1, {name: value})


CPUS_LOWERED = (
    "rule big asks for 8 CPUs (threads), more than the 2 the backend has: its jobs run "
    "on 2 CPUs (and, unless --cores is given, with {threads} = 2, as Snakemake caps threads at --cores)"
)


def test_threads_above_capacity_run_with_the_backend_cpus_and_one_warning():
    res, warnings = fit("rule big", Resources(cpus=8, mem_mb=500), Capacity(cpus=2, mem_mb=1000), clamp=False)
    assert res == Resources(cpus=2, mem_mb=500)
    assert warnings == [CPUS_LOWERED]


def test_memory_above_capacity_is_an_error_by_default():
    with pytest.raises(CrankError, match="mem_mb=5000 .* at most 1000 MB.*--crank-clamp-resources"):
        fit("rule big", Resources(cpus=1, mem_mb=5000), Capacity(cpus=2, mem_mb=1000), clamp=False)


def test_request_above_capacity_is_clamped_with_a_warning_when_asked():
    res, warnings = fit("rule big", Resources(cpus=8, mem_mb=5000), Capacity(cpus=2, mem_mb=1000), True)
    assert (res.cpus, res.mem_mb) == (2, 1000)
    assert warnings == [
        CPUS_LOWERED,
        "rule big: mem_mb=5000 lowered to 1000 (MB of memory available)",
    ]


def test_gpu_request_without_gpu_fails_even_when_clamping():
    with pytest.raises(CrankError, match="no GPU"):
        fit("rule g", Resources(gpus=1), Capacity(gpus=0), clamp=True)


def test_mounts_keep_paths_and_make_only_outputs_writable():
    mounts = plan_mounts(
        "/home/u/wf",
        inputs=["/home/u/wf/a.txt", "/data/ref.fa", "/data/ref.fa", "/data/idx/x"],
        outputs=["/home/u/wf/out/b.txt", "/scratch/res/c.txt"],
    )
    assert sorted(mounts) == sorted([
        ("/home/u/wf", True),
        ("/scratch/res", True),
        ("/data/ref.fa", False),
        ("/data/idx/x", False),
    ])


def test_mounts_follow_symlinked_inputs_to_their_target(tmp_path):
    target = tmp_path / "elsewhere" / "big.dat"
    target.parent.mkdir()
    target.write_text("x")
    workdir = tmp_path / "wf"
    workdir.mkdir()
    (workdir / "big.dat").symlink_to(target)
    mounts = plan_mounts(str(workdir), [str(workdir / "big.dat")], [])
    assert mounts == [(str(workdir), True), (str(target), False)]


def test_gpu_request_honours_cuda_visible_devices():
    assert gpu_request(2, "3,5,7")["DeviceIDs"] == ["3", "5"]
    assert gpu_request(1, None)["Count"] == 1
    with pytest.raises(CrankError, match="lists only 1"):
        gpu_request(2, "0")


def test_launcher_runs_in_strict_mode():
    argv = list(shell_argv("false | true; echo reached"))
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode != 0 and "reached" not in done.stdout
    done = subprocess.run(list(shell_argv("echo \"$0\" 'a b'")), capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("a b")


def _task(**kw):
    base = dict(name="r-1-1", label="rule r", job_id="1", attempt=1, image="img", script="x", workdir="/w")
    base.update(kw)
    return TaskSpec(**base)


def test_failure_message_names_rule_exit_code_reason_and_stderr():
    msg = failure_message(
        _task(), TaskResult(ok=False, exit_code=137, reason="killed: out of memory (limit 50 MB)",
                            stderr_tail="line1\nboom")
    )
    assert msg.startswith("rule r (job 1, attempt 1) failed in image img: exit code 137; killed: out of memory (limit 50 MB)")
    assert msg.rstrip().endswith("last lines of stderr:\nline1\nboom")


def test_poll_interval_is_short_for_young_tasks_and_bounded():
    class C:
        def __init__(self, since):
            self.running_since = since

    assert Rounds.next_interval([C(99.9)], now=100.0, ceiling=10) == 0.1
    assert Rounds.next_interval([C(0.0)], now=1000.0, ceiling=10) == 10
    assert Rounds.next_interval([], now=5.0, ceiling=10) == 0.1


@pytest.mark.parametrize(
    "found,expected", [("9.1.0", 0), ("8.30.0", 127), (None, 127)]
)
def test_snakemake_guard_accepts_only_the_same_major_version(tmp_path, found, expected):
    from snakemake_executor_plugin_crank.adapter.jobs import SNAKEMAKE_GUARD

    python = tmp_path / "python"
    body = f"echo {found}" if found else "exit 1"
    python.write_text(f"#!/bin/sh\n{body}\n")
    python.chmod(0o755)
    guard = SNAKEMAKE_GUARD.format(image="img", label="rule r", version="9.27.1", major="9")
    done = subprocess.run(
        ["sh", "-eu", "-c", guard + "echo ran"], capture_output=True, text=True,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
    )
    assert done.returncode == expected
    if expected:
        assert "crank: image img has" in done.stderr and "ran" not in done.stdout
    else:
        assert done.stdout == "ran\n"


def test_running_time_comes_from_the_container_timestamps():
    from snakemake_executor_plugin_crank.backends.docker.engine import running_seconds

    state = {"StartedAt": "2026-11-23T13:00:01.250000123Z", "FinishedAt": "2026-11-23T13:01:02.5Z"}
    assert running_seconds(state) == 61.25
    assert running_seconds({"StartedAt": "0001-01-01T00:00:00Z"}) is None


def _settings_rows(path):
    text = (Path(__file__).parent.parent / path).read_text()
    return [line for line in text.splitlines() if line.startswith("| `--crank-")]


def test_every_setting_is_documented_alike_in_readme_and_plugin_catalog_page():
    """docs/further.md is shown on its own by Snakemake's plugin catalog, so it keeps a copy
    of README's settings table; the two must not drift, and both must name every setting."""
    from snakemake_executor_plugin_crank import ExecutorSettings

    readme = _settings_rows("README.md")
    assert readme == _settings_rows("docs/further.md")
    documented = " ".join(readme)
    for f in dataclasses.fields(ExecutorSettings):
        option = "--crank-" + f.name.replace("_", "-")
        variable = "SNAKEMAKE_CRANK_" + f.name.upper()
        assert f"`{option}`" in documented and f"`{variable}`" in documented, f.name


@pytest.mark.parametrize("sub", ["../../home", "/etc", "a/../../b", ".."])
def test_a_task_index_naming_a_directory_outside_its_output_is_refused(sub):
    from snakemake_executor_plugin_crank.backends.tes.layout import read_index

    index = read_index("d p0\ns p0 ./a/b\nl p0 ./a/x y\nm p0 755 ./a/b\nl p1 .\nq p0 later\n")
    assert index.kinds == {"p0": "d", "p1": "l"} and index.subdirs == {"p0": ["a/b"]}
    assert index.links == {"p0": ["a/x y"]} and index.modes == {"p0": {"a/b": 0o755}}
    for line in (f"s p0 {sub}", f"l p0 {sub}", f"m p0 644 {sub}"):
        with pytest.raises(CrankError, match="outside its output"):
            read_index(f"d p0\n{line}\n")


def test_a_task_index_changes_nothing_through_a_link_it_makes(tmp_path):
    """Links are made from what the task sent; no mode is then set through one."""
    import os
    import stat

    from snakemake_executor_plugin_crank.backends.tes.products import restore as _restore

    outside = tmp_path / "outside"
    (outside / "d").mkdir(parents=True)
    (outside / "f").write_text("x")
    product = tmp_path / "p0"
    (product / "sub").mkdir(parents=True)
    (product / "up").write_text(str(outside))
    (product / "sub" / "run").write_text("#!/bin/sh\n")
    _restore(str(product), ["up"], {"up/f": 0o777, "up/d": 0o700, "sub": 0o555, "sub/run": 0o755})
    assert os.readlink(product / "up") == str(outside)
    assert stat.S_IMODE((outside / "f").stat().st_mode) != 0o777
    assert stat.S_IMODE((outside / "d").stat().st_mode) != 0o700
    assert stat.S_IMODE((product / "sub" / "run").stat().st_mode) == 0o755
    assert stat.S_IMODE((product / "sub").stat().st_mode) == 0o555
    (product / "sub").chmod(0o755)


def test_tes_answers_with_fields_and_states_beyond_the_schema_still_parse():
    """TES servers may extend the schema; py-tes's models refuse what they do not know."""
    import tes
    from tes.utils import unmarshal

    from snakemake_executor_plugin_crank.backends.tes.api import known_fields

    answer = {"tasks": [{"id": "t1", "state": "ARCHIVED", "vendorField": {"x": 1},
                         "logs": [{"systemLogs": ["pulled"], "vendorLog": 2,
                                   "logs": [{"exitCode": 3, "vendorExit": "x"}]}]}],
              "nextPageToken": "p2", "vendorPage": 1}
    with pytest.raises(Exception):
        unmarshal(answer, tes.ListTasksResponse)
    parsed = unmarshal(known_fields(answer, tes.ListTasksResponse), tes.ListTasksResponse)
    assert parsed.next_page_token == "p2"
    task = parsed.tasks[0]
    assert (task.id, task.state) == ("t1", "UNKNOWN")
    assert task.logs[0].system_logs == ["pulled"] and task.logs[0].logs[0].exit_code == 3


def test_an_adopted_tes_tasks_start_is_its_latest_attempts_command_start():
    """What an adopted task's wall time counts from (a time without a zone is UTC)."""
    import tes
    from tes.utils import unmarshal

    from snakemake_executor_plugin_crank.backends.tes.tasks import executor_start

    def task(*attempts):
        return unmarshal({"id": "t", "logs": [{"logs": [{"start_time": s} for s in a]} for a in attempts]},
                         tes.Task)

    assert executor_start(task(["2026-01-01T00:00:00Z"], ["2026-01-01T00:01:40.5Z"])) == 1767225700.5
    assert executor_start(task(["2026-01-01T00:01:40"])) == 1767225700.0
    assert executor_start(task()) is None and executor_start(task([])) is None


@pytest.mark.parametrize("status, transient", [(499, True), (408, True), (502, True), (400, False)])
def test_a_tes_answer_that_says_nothing_was_done_is_asked_again(status, transient):
    """Funnel's gateway answers 499 while it reconnects to itself: not a refusal."""
    import http.server
    import threading

    from snakemake_executor_plugin_crank.backends.tes.http import HttpError, Session
    from snakemake_executor_plugin_crank.errors import BackendUnavailable

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        session = Session(f"http://127.0.0.1:{server.server_address[1]}", retries=0)
        with pytest.raises(BackendUnavailable if transient else HttpError) as caught:
            session.request("GET", "/v1/tasks", "list", retry_reads=False)
        assert isinstance(caught.value, BackendUnavailable) is transient
    finally:
        server.shutdown()


def test_a_gateway_that_answers_the_first_page_for_ever_ends_the_listing():
    """A gateway that drops query strings, in front of a server holding more than one page:
    every request gets page 1 and a next_page_token. The listing ends at the second answer
    with one line naming the server, instead of paging for ever."""
    import http.server
    import json
    import threading

    from snakemake_executor_plugin_crank.backends.tes.api import TesApi
    from snakemake_executor_plugin_crank.backends.tes.http import Session
    from snakemake_executor_plugin_crank.errors import CrankError

    asked = []

    class FirstPage(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            body = json.dumps({"tasks": [{"id": "t1", "state": "RUNNING", "tags": {"k": "v"}}],
                               "next_page_token": "page-2"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FirstPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        api = TesApi(Session(base, retries=0), report=lambda line: None)
        for view in ("MINIMAL", "BASIC"):
            asked.clear()
            with pytest.raises(CrankError, match="answers GET /v1/tasks with a page it sent before") as caught:
                api.list_tasks("k", "v", view=view)
            assert base in str(caught.value) and len(asked) == 2
    finally:
        server.shutdown()


V2 = ("memory.peak 315957248\ncpu.stat usage_usec 2100000\ncpu.stat user_usec 2000000\n"
      "io.stat 8:0 rbytes=1000000 wbytes=3000000 rios=1 wios=2\nio.stat 259:0 rbytes=500000 wbytes=0\n")
V1 = ("memory/memory.max_usage_in_bytes 105725952\ncpuacct/cpuacct.usage 62962758\n"
      "blkio/blkio.throttle.io_service_bytes 8:0 Read 2000000\n"
      "blkio/blkio.throttle.io_service_bytes 8:0 Write 4000000\n"
      "blkio/blkio.throttle.io_service_bytes 8:0 Total 6000000\n"
      "blkio/blkio.throttle.io_service_bytes Total 6000000\n")
V1_BEFORE = ("memory/memory.max_usage_in_bytes 5000000\ncpuacct/cpuacct.usage 12962758\n"
             "blkio/blkio.throttle.io_service_bytes 8:0 Read 1000000\n")


@pytest.mark.parametrize("text, expected", [
    ("--\n" + V2, (2.1, 315.957248, 1.5, 3.0)),
    ("--\n" + V1, (0.062962758, 105.725952, 2.0, 4.0)),
    ("--\nmemory/memory.max_usage_in_bytes 1000000\ncpuacct/cpuacct.usage 1000000000\n"
     "blkio/blkio.throttle.io_service_bytes Total 0\n", (1.0, 1.0, 0.0, 0.0)),
    # a warm rounds: what the job used is the difference, its peak its own when it raised it
    (V1_BEFORE + "--\n" + V1, (0.05, 105.725952, 1.0, 4.0)),
    (V1.replace("105725952", "5000000") + "--\n" + V1.replace("105725952", "5000000"),
     (0.0, None, 0.0, 0.0)),
    # no cgroup files the container could read, or a reading cut short: nothing is made up
    ("--\n", (None, None, None, None)),
    ("", (None, None, None, None)),
    (V1_BEFORE + "--\n", (None, None, None, None)),
    (V1_BEFORE, (None, None, None, None)),  # a rounds killed with its job: only the reading before
], ids=["v2", "v1", "v1-no-io", "warm", "warm-below-earlier-peak", "none", "empty", "no-after", "killed"])
def test_a_jobs_usage_is_read_from_its_cgroup(text, expected):
    from snakemake_executor_plugin_crank.backends.cgroup import usage

    used = usage(text)
    assert (used.cpu_s, used.peak_mb, used.read_mb, used.written_mb) == pytest.approx(expected)


@pytest.mark.parametrize("text, killed", [
    ("--\n" + V1 + "memory/memory.oom_control oom_kill_disable 0\nmemory/memory.oom_control oom_kill 1\n", True),
    ("--\n" + V2 + "memory.events oom 1\nmemory.events oom_kill 2\n", True),
    ("--\n" + V2 + "memory.events oom_kill 0\n", False),
    ("memory.events oom_kill 3\n--\nmemory.events oom_kill 3\n", False),  # an earlier job's, in a runner
    ("memory.events oom_kill 3\n--\nmemory.events oom_kill 4\n", True),
    ("--\n" + V1, False),  # a kernel that does not count them: Docker's flag decides
    ("", False),
], ids=["v1", "v2", "none", "warm-earlier", "warm-this-job", "not-counted", "no-reading"])
def test_an_oom_kill_is_read_from_the_cgroup(text, killed):
    from snakemake_executor_plugin_crank.backends.cgroup import oom_killed

    assert oom_killed(text) is killed


def test_a_tes_task_waited_from_its_creation_to_its_command(tmp_path):
    import datetime

    from snakemake_executor_plugin_crank.backends.tes.results import usage

    (tmp_path / "usage").write_text("--\n" + V2)
    created = datetime.datetime(2026, 12, 4, 3, 0, 0)
    started = datetime.datetime(2026, 12, 4, 3, 0, 7, 500000, tzinfo=datetime.timezone.utc)
    used = usage(str(tmp_path), created, started)
    assert used.queue_s == pytest.approx(7.5) and used.cpu_s == pytest.approx(2.1)
    assert usage(str(tmp_path / "absent"), None, None).cpu_s is None


def test_the_cgroup_reading_runs_in_a_posix_shell():
    """The shell function the containers run, here on this machine's own cgroup."""
    import subprocess

    from snakemake_executor_plugin_crank.backends.cgroup import FUNCTION, usage

    out = subprocess.run(["/bin/sh", "-c", FUNCTION + "; echo --; crank_cg"], capture_output=True,
                         text=True, check=True).stdout
    assert all(line == "--" or line.split(" ", 1)[0] in FUNCTION for line in out.splitlines())
    assert usage(out).cpu_s is not None


def _row(rule, status="ok", mem=None, peak=None, cpus=1, cpu_s=None, real=10.0):
    return {"rule": rule, "status": status, "memory_mb": mem, "peak_rss_mb": peak, "cpus": cpus,
            "cpu_s": cpu_s, "realtime_s": real, "runtime_min": None}


def test_right_sizing_takes_the_most_a_rules_jobs_used_with_headroom():
    from snakemake_executor_plugin_crank.sizing import hints, profile_snippet, summarize

    rows = [
        _row("a", mem=4000, peak=300.0, cpus=8, cpu_s=25.0),  # 2.5 cores busy
        _row("a", mem=4000, peak=1500.0, cpus=8, cpu_s=10.0),
        _row("a", status="failed", mem=4000, peak=3900.0),  # a failure does not size a rule down
        _row("fits", mem=1000, peak=800.0, cpus=2, cpu_s=19.0),
        _row("unmeasured", mem=9000),
        _row("short", cpus=4, cpu_s=0.01, real=0.5),  # too short to judge its threads
        _row("killed", status="out_of_memory", mem=250, peak=250.0),
        _row("killed", mem=500, peak=400.0),
        _row("no_mem", status="out_of_memory"),
    ]
    found = {h.rule: h for h in hints(summarize(rows))}
    assert set(found) == {"a", "killed", "no_mem"}
    assert found["a"].resources == {"mem_mb": 1900} and found["a"].threads == 4
    assert "asked mem_mb=4000 and used at most 1500 MB (38%)" in found["a"].line
    assert "asked 8 threads and kept 2.5 busy at most: threads=4 would do" in found["a"].line
    assert found["killed"].resources == {"mem_mb": 500} and "with mem_mb=250" in found["killed"].line
    assert found["no_mem"].resources == {} and "give it mem_mb" in found["no_mem"].line
    import yaml

    snippet = yaml.safe_load(profile_snippet(list(found.values())))
    assert snippet == {"set-resources": {"a": {"mem_mb": 1900}, "killed": {"mem_mb": 500}},
                       "set-threads": {"a": 4}}


def test_the_report_of_rows_without_measures_says_so_and_escapes_names():
    from snakemake_executor_plugin_crank.report import html_page

    rows = [{**_row("x"), "jobid": "1", "attempt": 1, "queue_s": None, "submitted": None, "ended": None,
             "realtime_s": None}]
    page = html_page(rows, [], "run</script>", "docker")
    assert "run&lt;/script&gt;" in page and page.count('class="plot"') == 0
    assert page.count("Not measured on this backend") == 4


def _live(tmp_path, name="t-1"):
    from snakemake_executor_plugin_crank.backends.live import LiveLog
    from snakemake_executor_plugin_crank.task import TaskSpec

    task = TaskSpec(name=name, label="rule t", job_id="1", attempt=1, image="i", script=":",
                    workdir=str(tmp_path), log_dir=str(tmp_path / "logs"))
    return LiveLog(task, ".stdout"), tmp_path / "logs" / f"{name}.stdout"


def test_a_live_log_follows_overlapping_tails_and_marks_what_it_missed(tmp_path):
    log, path = _live(tmp_path)
    out = b"".join(b"line %d\n" % i for i in range(1, 2001))
    log.follow_tail(out[:30])
    log.follow_tail(out[:800])  # the whole log so far: only what is new is appended
    log.follow_tail(out[300:1200])  # a window that moved on
    log.follow_tail(out[300:1200])  # nothing new
    assert path.read_bytes() == out[:1200] and not log.broken
    log.follow_tail(out[1195:2000])  # a few bytes in common are taken for chance: a gap, said once
    assert log.broken and path.read_bytes().count(b"[crank: output missed here") == 1
    assert path.read_bytes().endswith(out[1195:2000])


@pytest.mark.parametrize("shown, final, kept, appended", [
    (b"a\nb\n", b"a\nb\nc\n", b"a\nb\nc\n", True),  # the start of the log: only the rest is appended
    (b"a\nX\n", b"a\nb\nc\n", b"a\nb\nc\n", False),  # not its start: replaced whole
    # shorter than what was shown (a server's last tail, a stream cut short): what was shown stays
    (b"a\nb\nc\nd\n", b"c\nd\n", b"a\nb\nc\nd\n", True),
])
def test_a_live_log_is_continued_or_replaced_at_the_end(tmp_path, shown, final, kept, appended):
    import os

    from snakemake_executor_plugin_crank.backends.logs import save_logs

    log, path = _live(tmp_path)
    log.append(shown)
    inode = path.stat().st_ino
    files, _ = save_logs(log.task, [final[:3], final[3:]], [b""], live={".stdout": log})
    assert path.read_bytes() == kept and str(path) in files
    assert (path.stat().st_ino == inode) is appended
    assert sorted(os.listdir(path.parent)) == ["t-1.stderr", "t-1.stdout"]  # no temporary left
    log.append(b"late")  # a copy that comes after the end changes nothing
    save_logs(log.task, [final], [b""], live={".stdout": log})  # nor a second saving
    assert path.read_bytes() == final


def _job(rule: str, *outputs: str, checkpoint: bool = False):
    return SimpleNamespace(rule=SimpleNamespace(name=rule), output=list(outputs), log=[],
                           is_checkpoint=checkpoint, is_group=lambda: False)


def _group(*jobs, attempt: int = 1):
    return SimpleNamespace(jobs=list(jobs), groupid="g", attempt=attempt, is_group=lambda: True)


def _split():
    return _job("split", "d", checkpoint=True)


def test_a_group_submitted_again_follows_its_run_in_flight_and_then_what_it_ran():
    """Snakemake makes a running group's jobs that wait for its checkpoint anew, and submits
    the group again (group_runs.py): the same jobs by rule and files, other objects."""
    runs = GroupRuns()
    first = _group(_split(), _job("use", "u.txt"), _job("sum", "s.txt"))
    assert runs.in_flight(first) is None and runs.ran(first) is None
    flight = runs.start(first, "chain-1")
    again = _group(_split(), _job("use", "u.txt"), _job("sum", "s.txt"))
    assert runs.in_flight(again) is flight and flight.handle == "chain-1"
    assert runs.in_flight(_group(_split(), _job("use", "u.txt"))) is flight  # its later jobs only
    assert runs.in_flight(_group(_split(), _job("other", "o.txt"))) is None
    assert runs.ran_object(first) and not runs.ran_object(again)
    assert runs.ran(again) is None and not flight.settled(SimpleNamespace(finished=lambda j: True))
    runs.end(flight, Ended(ok=True))
    assert flight.ended == Ended(ok=True) and runs.in_flight(again) is None
    # ended, it settles once Snakemake has taken in its success (or at the latest SETTLE_S on)
    assert not flight.settled(SimpleNamespace(finished=lambda j: False))
    assert flight.settled(SimpleNamespace(finished=lambda j: any(j is k for k in first.jobs)))
    done = runs.ran(again)
    assert done.ended.ok and done.handle == "chain-1" and list(map(id, done.jobs)) == list(map(id, first.jobs))
    assert runs.ran(_group(_split(), _job("other", "o.txt"))) is None
    assert runs.ran(_group(_split(), _job("use", "u.txt"), attempt=2)) is None  # a --retries retry


def test_a_group_without_a_checkpoint_or_whose_run_failed_is_run_when_submitted():
    runs = GroupRuns()
    plain = _group(_job("a", "a.txt"))
    assert runs.start(plain, "chain-1") is None and runs.in_flight(plain) is None
    job = _group(_split(), _job("a", "a.txt"))
    flight = runs.start(job, "chain-2")
    runs.end(flight, Ended(ok=False, message="rule a failed", logs=("a.log",)))
    assert flight.ended.message == "rule a failed" and flight.settled(SimpleNamespace(finished=lambda j: False))
    assert runs.in_flight(job) is None and runs.ran(job) is None


class _ChangingGroup:
    """A group object as Snakemake's: hashed by its set of jobs, which Snakemake changes."""

    def __init__(self, *jobs):
        self.jobs = frozenset(jobs)

    def __hash__(self):
        return hash(self.jobs)

    def __eq__(self, other):
        return isinstance(other, _ChangingGroup) and self.jobs == other.jobs


def _scheduler_holding(group, twice: bool):
    freed = []
    running, dag_running = set(), set()
    for entries in (running, dag_running):
        entries.add(group)
    if twice:  # its jobs changed, then it was submitted again
        group.jobs = group.jobs | {"replaced"}
        running.add(group)
        dag_running.add(group)
    scheduler = SimpleNamespace(running=running, _free_resources=freed.append)
    return SimpleNamespace(scheduler=scheduler, dag=SimpleNamespace(_running=dag_running)), freed


def test_a_group_object_held_twice_by_snakemake_is_made_one():
    group = _ChangingGroup("split", "use")
    workflow, freed = _scheduler_holding(group, twice=True)
    assert len(workflow.scheduler.running) == 2
    assert merge_twin(workflow, group)
    assert freed == [group]  # what the second submission took
    for entries in (workflow.scheduler.running, workflow.dag._running):
        entries.remove(group)  # as its end removes it: once, and then it is gone
        assert not entries


def test_a_group_object_held_once_is_left_as_it_is():
    group = _ChangingGroup("split", "use")
    workflow, freed = _scheduler_holding(group, twice=False)
    assert not merge_twin(workflow, group) and freed == []
    assert workflow.scheduler.running == {group}
    assert not merge_twin(SimpleNamespace(), group)  # a Snakemake without these sets
