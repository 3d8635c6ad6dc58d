"""Staging end to end: the real snakemake CLI with crank on Funnel and SeaweedFS (see
docs/staging.md), compared where it matters with Snakemake's local executor."""

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from snakemake_executor_plugin_crank.staging.cas import file_key
from snakemake_executor_plugin_crank.staging.store import Store

from conftest import live_tasks, snakemake, tes_run, tes_start, wait_for

pytestmark = pytest.mark.tes

OLD = 1_600_000_000  # an mtime well in the past


def new_workdir(tmp_path: Path, snakefile: str) -> Path:
    """A workdir whose parent names the storage prefix (see crank_command): one per test."""
    workdir = tmp_path / uuid.uuid4().hex / "wf"
    workdir.mkdir(parents=True)
    (workdir / "Snakefile").write_text(snakefile)
    return workdir


def local_snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Snakemake's own local executor, for comparison."""
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "1", *args], cwd=workdir,
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )


def test_a_file_rewritten_with_its_old_mtime_reaches_the_job(tes, tmp_path):
    """Same size, same inode, the old mtime restored (``touch -r``, ``cp -p``): a forced rerun
    gets the new content. Once the digest cache, keyed without the ctime, gave the old one."""
    workdir = new_workdir(tmp_path, 'rule copy:\n    input: "in.txt"\n    output: "out.txt"\n'
                                    '    shell: "cat {input} > {output}"\n')
    data = workdir / "in.txt"
    data.write_text("AAAA\n")
    os.utime(data, (OLD, OLD))
    old = data.stat()
    # the first run caches the digest only once the file's last change is 2 s old
    wait_for(lambda: time.time_ns() - old.st_ctime_ns > 2_000_000_000, 10, "the input to settle")
    first = tes_run(tes, workdir)
    assert first.returncode == 0, first.stderr
    assert (workdir / "out.txt").read_text() == "AAAA\n"

    with open(data, "r+") as f:  # in place: same inode
        f.write("BBBB\n")
    os.utime(data, ns=(old.st_atime_ns, old.st_mtime_ns))
    now = data.stat()
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == (old.st_ino, old.st_size, old.st_mtime_ns)
    again = tes_run(tes, workdir, "-F")
    assert again.returncode == 0, again.stderr
    assert (workdir / "out.txt").read_text() == "BBBB\n"


LOOK = r'''
rule look:
    input: "ref"
    output: "seen.txt"
    shell:
        "cd ref && find . > ../{output} && "
        "for p in a sub/b sub/up/a sub/up/sub/b sub/deeper/back/a sub/up/sub/deeper/back/sub/up/a; "
        "do echo \"$p: $(cat $p)\"; done >> ../{output} && "
        "echo \"up -> $(readlink sub/up)\" >> ../{output} && "
        "echo \"back -> $(readlink sub/deeper/back)\" >> ../{output}"
'''


def ancestor_links(workdir: Path) -> None:
    """ref/ with two links back to itself: followed, they repeat the tree 2^40 times."""
    (workdir / "ref" / "sub" / "deeper").mkdir(parents=True)
    (workdir / "ref" / "a").write_text("a\n")
    (workdir / "ref" / "sub" / "b").write_text("b\n")
    (workdir / "ref" / "sub" / "up").symlink_to("..")
    (workdir / "ref" / "sub" / "deeper" / "back").symlink_to("../..")


def test_a_directory_input_with_links_to_its_ancestors(tes, tmp_path):
    """The job sees what it sees under Snakemake's local executor and crank on Docker: the
    files once and the links as links, reaching the same files. Once the staging walk followed them to ELOOP:
    41 copies of every file for one link, and a job that never left "queued" for two."""
    workdir = new_workdir(tmp_path, LOOK)
    ancestor_links(workdir)
    local = new_workdir(tmp_path, LOOK)
    ancestor_links(local)
    expected = local_snakemake(local)
    assert expected.returncode == 0, expected.stderr
    on_docker = new_workdir(tmp_path, LOOK)
    ancestor_links(on_docker)
    docker_run = snakemake(on_docker)
    assert docker_run.returncode == 0, docker_run.stderr

    start = time.monotonic()
    done = tes_run(tes, workdir, timeout=120)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - start < 90
    seen = (workdir / "seen.txt").read_text().splitlines()
    assert sorted(seen) == sorted((local / "seen.txt").read_text().splitlines())
    assert sorted(seen) == sorted((on_docker / "seen.txt").read_text().splitlines())
    assert "./sub/up" in seen and "sub/up/sub/deeper/back/sub/up/a: a" in seen and "up -> .." in seen
    summary = [line for line in done.stderr.splitlines() if "crank: staging:" in line]
    assert len(summary) == 1 and " 2 files," in summary[0], summary
    assert live_tasks(tes, workdir) == []


def test_ctrl_c_does_not_wait_for_an_upload(aws_env, tmp_path):
    """Ctrl-C while a large input is staged: the upload is abandoned (nothing lands under its
    content address) instead of awaited, and no task is left. Once the run finished the
    upload first."""
    workdir = new_workdir(tmp_path, 'rule big:\n    input: "big.bin"\n    output: "n.txt"\n'
                                    '    shell: "wc -c < {input} > {output}"\n')
    block = os.urandom(8 << 20)
    digest = hashlib.sha256()
    with open(workdir / "big.bin", "wb") as f:
        for _ in range(96):  # 768 MiB: seconds to hash and to upload
            f.write(block)
            digest.update(block)
    proc = tes_start(aws_env, workdir)
    lines = []

    def read_stderr():
        for line in proc.stderr:
            lines.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(line.startswith("rule big") for line in lines), 60, "the job to start")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    reader.join(10)
    store = Store.from_url(aws_env.prefix(workdir.parent.name))
    text = "".join(lines)
    assert "Terminating processes on user request" in text and "Traceback" not in text, text
    assert store.head(file_key(digest.hexdigest())) is None, text
    assert live_tasks(aws_env, workdir) == []
    assert not (workdir / "n.txt").exists()
    (workdir / "big.bin").unlink()


def test_objects_the_store_lost_cost_one_resubmission_not_a_retry(aws_env, tmp_path):
    """A lifecycle rule (here: a delete) removed the input's object and the sources archive
    that the digest database trusts for days: the next run's task cannot fetch them; crank
    sends them again and submits the task once more, with --retries 0."""
    workdir = new_workdir(tmp_path, 'rule copy:\n    input: "in.txt"\n    output: "out.txt"\n'
                                    '    shell: "cat {input} > {output}"\n')
    (workdir / "in.txt").write_text("kept\n")
    os.utime(workdir / "in.txt", (OLD, OLD))
    changed = (workdir / "in.txt").stat().st_ctime_ns
    # settled: the digest database keeps it
    wait_for(lambda: time.time_ns() - changed > 2_000_000_000, 10, "the input to settle")
    first = tes_run(aws_env, workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    store = Store.from_url(aws_env.prefix(workdir.parent.name), aws_env.s3.endpoint)
    digest = hashlib.sha256(b"kept\n").hexdigest()
    lost = [file_key(digest)] + [key for key, _ in store.list("sources/")]
    for key in lost:
        store.delete(key)
    assert store.head(file_key(digest)) is None
    again = tes_run(aws_env, workdir, "-F", "--retries", "0")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (workdir / "out.txt").read_text() == "kept\n"
    said = [line for line in again.stderr.splitlines() if "could not fetch its inputs" in line]
    assert len(said) == 1, again.stderr[-3000:]
    assert store.head(file_key(digest)) is not None
