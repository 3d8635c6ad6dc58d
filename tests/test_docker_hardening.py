"""The Docker backend against a hostile job and a hostile world (issue 17): a job cannot
make the host read or write a file outside its mounts through its logs, nor hang log
collection; the stderr tail stays bounded; inputs share mounts; an image that cannot be
pulled is said at once."""

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from snakemake_executor_plugin_crank.backends import logs
from snakemake_executor_plugin_crank.backends.docker.left_execs import LeftExec
from snakemake_executor_plugin_crank.task import TaskSpec

from conftest import ctrl_c, snakemake, wait_for

pytestmark = pytest.mark.docker


def workflow(workdir: Path, snakefile: str) -> Path:
    workdir.mkdir(parents=True)
    (workdir / "Snakefile").write_text(snakefile)
    return workdir


# ------------------------------------------------------ item 7: what a job leaves as logs

SCRATCH_TRICKS = """
rule all:
    input: "leak.txt", "fifo.txt"

rule leak:
    output: "leak.txt"
    shell: "for f in /.crank-logs/*.stderr; do rm -f $f; ln -s {config[secret]} $f; done; exit 1"

rule fifo:
    output: "fifo.txt"
    shell: "for f in /.crank-logs/*.stderr; do rm -f $f; mkfifo $f; done; exit 1"
"""


def test_a_warm_job_cannot_make_the_host_read_its_files_or_hang_on_a_fifo(docker_api, tmp_path):
    """Item 7: a job that replaced its scratch stderr by a symlink to a file outside every
    mount gets no byte of it into its failure message; a FIFO there does not hang the run."""
    secret = tmp_path / "home" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("TOPSECRET-7f3a\n")
    workdir = workflow(tmp_path / "wd", SCRATCH_TRICKS)
    done = snakemake(workdir, "--keep-going", "--crank-docker-warm", "yes",
                     "--config", f"secret={secret}", timeout=120)
    assert done.returncode != 0
    assert "TOPSECRET" not in done.stderr + done.stdout
    for rule in ("leak", "fifo"):
        assert f"rule {rule} (job" in done.stderr and "exit code 1" in done.stderr, done.stderr
    assert ".stderr: not a regular file" in done.stderr, done.stderr
    assert ".stderr: a symbolic link (not followed)" in done.stderr, done.stderr
    logs_dir = workdir / ".snakemake" / "crank" / "logs"
    assert not [p for p in logs_dir.rglob("*") if p.is_symlink() or not (p.is_file() or p.is_dir())]


PLANTED_LOG = """
rule all:
    input: "b.txt"

rule a:
    output: "a.txt"
    shell: "echo a > {output}"

rule b:
    input: "a.txt"
    output: "b.txt"
    shell: "for d in .snakemake/crank/logs/*/; do for i in 0 1 2 3 4 5 6 7 8 9; do "
           "ln -s {config[victim]} $d/b-$i-1.stdout; done; done; echo overwritten; echo b > {output}"
"""


def test_a_job_cannot_make_the_host_write_its_log_through_a_planted_symlink(docker_api, tmp_path):
    """Item 7: the log directory is in the workdir, which jobs can write: a symlink a job
    put under its own log's name is not followed when crank saves the log."""
    victim = tmp_path / "home" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("untouched\n")
    workdir = workflow(tmp_path / "wd", PLANTED_LOG)
    done = snakemake(workdir, "--crank-docker-warm", "no", "--config", f"victim={victim}")
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "untouched\n"
    assert (workdir / "b.txt").read_text() == "b\n"


def test_job_files_are_read_only_when_regular_and_never_through_a_symlink(tmp_path):
    regular = tmp_path / "regular"
    regular.write_bytes(b"one\ntwo\n")
    fd = logs.open_job_file(str(regular))
    try:
        assert logs.read_tail(fd) == "one\ntwo"
    finally:
        os.close(fd)
    (tmp_path / "link").symlink_to(regular)
    os.mkfifo(tmp_path / "fifo")
    for name in ("link", "fifo"):
        with pytest.raises(OSError):
            logs.open_job_file(str(tmp_path / name))


def test_the_log_directory_is_never_reached_through_a_symlink_below_the_workdir(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    workdir = tmp_path / "wd"
    (workdir / ".snakemake").mkdir(parents=True)
    (workdir / ".snakemake" / "crank").symlink_to(elsewhere)
    task = TaskSpec(name="t", label="rule t", job_id="1", attempt=1, image="x", script="true",
                    workdir=str(workdir), log_dir=str(workdir / ".snakemake" / "crank" / "logs" / "r"))
    saved, tail = logs.save_logs(task, [b"out"], [b"err\n"])
    assert saved == () and list(elsewhere.iterdir()) == []
    assert tail == f"err\n(crank could not save the log: {task.log_dir}: a symbolic link (not followed))"


# ------------------------------------------------------ item 10: the stderr tail


def test_the_tail_is_the_last_lines_as_the_file_reader_sees_them(tmp_path):
    cases = [
        b"".join(b"line %d\n" % i for i in range(30000)) + b"last",
        b"a\nb\n",
        b"err\nno newline",
        b"",
        b"x" * (3 * logs.TAIL_BYTES) + b"\n" + b"tail line",
        b"y" * (3 * logs.TAIL_BYTES) + b"\n",
        b"y" * (3 * logs.TAIL_BYTES),
    ]
    for data in cases:
        kept = logs.StderrTail()
        for start in range(0, len(data), 4093):
            kept.feed(data[start:start + 4093])
        path = tmp_path / "log"
        path.write_bytes(data)
        fd = logs.open_job_file(str(path))
        try:
            assert kept.text() == logs.read_tail(fd)
        finally:
            os.close(fd)
        if data.startswith(b"y"):  # one line longer than the window: its end
            assert kept.text() == "y" * (logs.TAIL_BYTES - data.endswith(b"\n"))
    lines = b"".join(b"line %d\n" % i for i in range(30000)) + b"last"
    assert logs.tail_text(lines, False) == "\n".join(
        [f"line {i}" for i in range(29981, 30000)] + ["last"])


def test_a_progress_bar_without_newlines_keeps_the_tail_bounded():
    """Item 10: 32 MiB of `\\r` progress output in small chunks: the window never holds
    more than twice the tail's bytes, and the tail is the end of the output (the old
    keeper re-split its whole pending line on every chunk: quadratic; timing in
    bench/stderr_tail.py and docs/performance.md)."""
    kept = logs.StderrTail()
    chunk = b"\r[#####     ] 50%" * 256
    largest = 0
    for _ in range(32 * 1024 * 1024 // len(chunk)):
        kept.feed(chunk)
        largest = max(largest, len(kept.window))
    assert largest <= 2 * logs.TAIL_BYTES
    text = kept.text()
    assert len(text) == logs.TAIL_BYTES and text.endswith("50%")


# ------------------------------------------------------ item 13: mounts for many inputs

MANY_INPUTS = """
rule all:
    input: "joined.txt"

rule join:
    input: expand("{root}/ref/part{i}.txt", root=config["root"], i=range(100)), config["alias"]
    output: joined="joined.txt", mounts="mounts.txt"
    shell: "cat {input} > {output.joined}; "
           "awk '{{print $5}}' /proc/self/mountinfo | grep '^{config[root]}/' | sort > {output.mounts}"
"""


def test_many_inputs_outside_the_workdir_share_their_directory_mount(docker_api, tmp_path):
    """Item 13: 100 inputs in one directory outside the workdir are one read-only mount,
    not 100; an input that is a symlink still reads its target."""
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(100):
        (ref / f"part{i}.txt").write_text(f"{i}\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "target.txt").write_text("target\n")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "alias.txt").symlink_to(tmp_path / "elsewhere" / "target.txt")
    workdir = workflow(tmp_path / "wd", MANY_INPUTS)
    done = snakemake(workdir, "--config", f"root={tmp_path}", f"alias={tmp_path}/links/alias.txt")
    assert done.returncode == 0, done.stderr
    assert (workdir / "joined.txt").read_text() == "".join(f"{i}\n" for i in range(100)) + "target\n"
    mounts = (workdir / "mounts.txt").read_text().split()
    assert mounts == sorted([str(tmp_path / "elsewhere" / "target.txt"), str(tmp_path / "links" / "alias.txt"),
                             str(ref), str(workdir)]), mounts


def test_merged_input_mounts_never_cover_system_dirs_home_or_writable_ones():
    from snakemake_executor_plugin_crank.backends.docker.mounts import MAX_INPUT_MOUNTS, plan_mounts

    home = os.path.expanduser("~")
    inputs = ([f"/etc/conf{i}" for i in range(40)] + [f"{home}/f{i}" for i in range(40)]
              + [f"/data/w/in{i}" for i in range(40)] + [f"/data/ref/s{i}/f.txt" for i in range(6000)]
              + ["/data/lone/a/b/c.txt"])
    plan = plan_mounts("/data/w/wd", inputs, ["/data/w/wd/o", "/out/d/f"])
    writable = [p for p, rw in plan if rw]
    readonly = [p for p, rw in plan if not rw]
    assert writable == ["/data/w/wd", "/out/d"]
    assert "/data/ref" in readonly and "/data/lone/a/b/c.txt" in readonly
    assert not any(p.startswith("/data/ref/") for p in readonly)
    assert {p for p in readonly if p.startswith("/etc")} == {f"/etc/conf{i}" for i in range(40)}
    assert home not in readonly and "/data/w" not in readonly and "/data" not in readonly
    small = plan_mounts("/wd", [f"/data/ref/f{i}" for i in range(MAX_INPUT_MOUNTS)], [])
    assert len(small) == MAX_INPUT_MOUNTS + 1  # few inputs: each its own mount, as before


# ------------------------------------------------------ item 14: images that cannot be pulled

PULLED = """
rule all:
    input: "a.txt", "b.txt"

rule a:
    output: "a.txt"
    container: config["image"]
    shell: "echo a > {output}"

rule b:
    output: "b.txt"
    container: config["image"]
    shell: "echo b > {output}"
"""


def test_a_registry_that_cannot_be_reached_is_said_at_once_and_tried_again(docker_api, tmp_path):
    """Item 14: one line per image, while the first submission is tried again (not after
    the whole tolerance); nothing reaches beyond loopback."""
    image = "127.0.0.1:1/crank-missing:1"
    workdir = workflow(tmp_path / "wd", PULLED)
    err = tmp_path / "stderr.txt"
    with open(err, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "snakemake", "--executor", "crank", "--jobs", "2",
             "--seconds-between-status-checks", "1", "--config", f"image={image}"],
            cwd=workdir, stdout=subprocess.DEVNULL, stderr=sink, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            line = f"could not pull image '{image}'"
            wait_for(lambda: "trying again" in err.read_text(), 60, "the line saying the pull is tried again")
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = err.read_text()
    said = [x for x in text.splitlines() if line in x and "trying again" in x]
    assert len(said) == 1 and "connection refused" in said[0], text
    assert "Traceback" not in text


class _Registry(http.server.BaseHTTPRequestHandler):
    """A registry on loopback that has no image: /v2/ answers, every manifest is refused."""

    refusal = ("MANIFEST_UNKNOWN", 404)

    def do_GET(self):
        if self.path == "/v2/":
            body, status = b"{}", 200
        else:
            code, status = self.refusal
            body = json.dumps({"errors": [{"code": code, "message": code.lower(), "detail": {}}]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("refusal", [("MANIFEST_UNKNOWN", 404), ("UNAUTHORIZED", 401)],
                         ids=["manifest-unknown", "unauthorized"])
def test_an_image_the_registry_does_not_have_fails_at_once(docker_api, tmp_path, refusal):
    """Item 14: the registry answered that the image is not there (or not for us): the
    jobs fail in one line each, without waiting out --crank-backend-tolerance (120 s)."""
    handler = type("Registry", (_Registry,), {"refusal": refusal})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    image = f"127.0.0.1:{server.server_port}/crank-missing:1"
    try:
        workdir = workflow(tmp_path / "wd", PULLED)
        done = snakemake(workdir, "--config", f"image={image}", timeout=90)
    finally:
        server.shutdown()
    assert done.returncode != 0
    assert done.stderr.count(f"could not pull image '{image}'") >= 2, done.stderr
    assert "trying again" not in done.stderr and "Traceback" not in done.stderr


def test_planned_mounts_reach_symlink_targets(tmp_path):
    from snakemake_executor_plugin_crank.backends.docker.mounts import plan_mounts

    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "sub" / "x").write_text("x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "y").write_text("y")
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "sub" / "z").symlink_to(tmp_path / "elsewhere" / "y")
    inputs = [str(tmp_path / "linked" / "sub" / n) for n in ("x", "z")]
    plan = plan_mounts(str(tmp_path / "wd"), inputs, [])
    assert sorted(plan) == sorted([
        (str(tmp_path / "wd"), True), *((i, False) for i in inputs),
        (str(tmp_path / "real" / "sub" / "x"), False), (str(tmp_path / "elsewhere" / "y"), False),
    ])


def test_a_long_script_is_never_written_through_a_symlink_a_job_planted(docker_api, tmp_path):
    """Item 7: the scripts too long for argv go under the workdir, which jobs can write."""
    from snakemake_executor_plugin_crank.backends.docker import DockerBackend
    from snakemake_executor_plugin_crank.errors import CrankError

    victim = tmp_path / "victim.txt"
    victim.write_text("untouched\n")
    workdir = tmp_path / "wd"
    backend = DockerBackend(uuid.uuid4().hex, str(workdir))
    try:
        scripts = workdir / ".snakemake" / "crank" / "scripts" / backend.run_id
        scripts.mkdir(parents=True)
        (scripts / "long-1-1.sh").symlink_to(victim)
        task = TaskSpec(name="long-1-1", label="rule long", job_id="1", attempt=1, image="x",
                        script="echo " + "x" * 300_000, workdir=str(workdir), log_dir=str(tmp_path / "logs"))
        with pytest.raises(CrankError, match="a symbolic link"):
            backend.command_for(task)
    finally:
        backend.close()
    assert victim.read_text() == "untouched\n"


def test_an_exit_code_file_a_job_made_a_fifo_does_not_hang_the_next_start(tmp_path):
    """The log scratch is the job's to write: its own ``.rc`` made a FIFO once left the rerun
    that looks at what the dead run left stuck before the DAG was built."""
    (tmp_path / "logs").mkdir()
    os.mkfifo(tmp_path / "logs" / "a-1-1.rc")
    left = LeftExec(key="k", products="p", name="a-1-1", exec_id="e", runner="r",
                    host_dir=str(tmp_path), started=0.0)
    codes = []
    reader = threading.Thread(target=lambda: codes.append(left.exit_code()), daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert codes == [None]


# ---------------------------------------------------------------- issue 30 item 6: outputs


TURNED_INTO_LINKS = """
rule all:
    input: "bench-done.txt", "state/log.txt"

rule benched:
    output: "bench-done.txt"
    benchmark: "bench/b.tsv"
    shell: "rm -rf bench; ln -s {config[home]} bench; echo ok > {output}"

rule grow:
    output: update("state/log.txt")
    shell: "rm -rf state; ln -s {config[home]} state; exit 1"
"""


def test_a_job_cannot_make_crank_write_its_benchmark_or_update_backup_elsewhere(tmp_path):
    """A job turns the directory of its benchmark file, and that of its update() output, into
    links to the user's home: crank writes neither the benchmark nor the kept update() content
    there. The first job fails with one line naming its benchmark file; the second fails as
    it asked, and crank says where the old content is kept."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "precious.txt").write_text("untouched\n")
    workdir = workflow(tmp_path / "wd", TURNED_INTO_LINKS)
    (workdir / "bench").mkdir()
    (workdir / "state").mkdir()
    (workdir / "state" / "log.txt").write_text("old\n")
    done = snakemake(workdir, "--keep-going", "--forcerun", "grow", "--config", f"home={home}")
    assert done.returncode != 0
    assert sorted(p.name for p in home.iterdir()) == ["precious.txt"], list(home.iterdir())
    assert (home / "precious.txt").read_text() == "untouched\n"
    assert "cannot write its benchmark file bench/b.tsv" in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "cannot put back the update() output" in line]
    assert lines and "did the job make it a link?" in lines[0], done.stderr[-3000:]
    kept = lines[0].rsplit("its old content is in ", 1)[1]
    assert Path(kept).read_text() == "old\n"
    assert "Traceback" not in done.stderr


def test_an_update_output_is_put_back_after_a_failure_and_its_links_stay_links(tmp_path):
    """The local executor's update() semantics, with a link among the kept output's entries:
    the failed job's changes are undone, the link comes back as the link."""
    workdir = workflow(tmp_path / "wd", """
rule grow:
    output: update(directory("state"))
    shell: "echo more >> {output}/kept; rm {output}/link; echo new > {output}/added; exit 1"
""")
    (workdir / "state").mkdir()
    (workdir / "state" / "kept").write_text("kept\n")
    os.symlink("kept", workdir / "state" / "link")
    done = snakemake(workdir, "--forcerun", "grow")
    assert done.returncode != 0
    assert sorted(p.name for p in (workdir / "state").iterdir()) == ["kept", "link"]
    assert (workdir / "state" / "kept").read_text() == "kept\n"
    assert os.readlink(workdir / "state" / "link") == "kept"
    assert list((workdir / ".snakemake" / "crank" / "backups").iterdir()) == []


# ---------------------------------------------------------------- issue 30 item 5: pulls


class SilentRegistry:
    """A registry on loopback that accepts connections and never answers; knows which of
    them the engine still holds open."""

    def __init__(self):
        import socket

        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.open = 0
        self.accepted = 0
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            self.accepted += 1
            self.open += 1
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn):
        conn.settimeout(0.5)
        try:
            while not self.stopped.is_set():
                try:
                    if not conn.recv(65536):
                        break  # the engine gave up
                except TimeoutError:
                    continue
        except OSError:
            pass
        finally:
            self.open -= 1
            conn.close()

    def stop(self):
        self.stopped.set()
        self.server.close()


PULL_HANGS = """
rule all:
    input: "stuck.txt", "quick.txt"

rule stuck:
    output: "stuck.txt"
    priority: 10
    container: config["image"]
    shell: "echo stuck > {output}"

rule quick:
    output: "quick.txt"
    shell: "echo quick > {output}"
"""


def test_a_registry_that_never_answers_holds_no_other_job_nor_ctrl_c(docker_api, tmp_path):
    """The first job's image comes from a registry that accepts and never answers: the
    other job runs and finishes while the engine still waits on the registry (the pull is
    off Snakemake's scheduler thread), and Ctrl-C ends the run within 5 s."""
    registry = SilentRegistry()
    image = f"127.0.0.1:{registry.port}/crank-silent:1"
    workdir = workflow(tmp_path / "wd", PULL_HANGS)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "snakemake", "--executor", "crank", "--jobs", "2",
             "--seconds-between-status-checks", "1", "--crank-default-image", "crank-test/busybox:1",
             "--config", f"image={image}"],
            cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            wait_for(lambda: list((workdir / ".snakemake" / "crank" / "usage").glob("*.tsv")), 60,
                     "the other job's end, in the usage trace")
            assert registry.accepted and registry.open, "the engine was not waiting on the registry"
            assert proc.poll() is None
            seconds, stderr = ctrl_c(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        registry.stop()
    assert (workdir / "quick.txt").read_text() == "quick\n"
    assert seconds < 5, f"Ctrl-C took {seconds:.1f} s: {stderr[-3000:]}"
    assert not (workdir / "stuck.txt").exists()
    assert "Traceback" not in stderr, stderr[-5000:]
    # what ran before Ctrl-C is in the trace and the report
    usage = workdir / ".snakemake" / "crank" / "usage"
    assert (usage / "latest.tsv").read_text().splitlines()[1].startswith("quick\t")
    assert "quick job" in (usage / "latest.html").read_text()
