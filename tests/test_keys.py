"""The adoption key and the pool of a dead run's tasks (backends/adoption.py): pure logic,
no engine, no server."""

import dataclasses
import os
import threading

import pytest

from snakemake_executor_plugin_crank.backends import adoption
from snakemake_executor_plugin_crank.backends.adoption import (
    Orphan, Orphans, key_of, products_id, stat_identity,
)
from snakemake_executor_plugin_crank.errors import CrankError
from snakemake_executor_plugin_crank.staging.digest import sha256_file
from snakemake_executor_plugin_crank.task import Input, Kind, Launch, Output, Resources, TaskSpec


def task(tmp_path, **changes):
    (tmp_path / "in.txt").write_text("x") if not (tmp_path / "in.txt").exists() else None
    base = TaskSpec(
        name="a-1-1", label="rule a", job_id="1", attempt=1, image="img", workdir=str(tmp_path),
        script="cat in.txt > out.txt", inputs=(Input(str(tmp_path / "in.txt")),),
        outputs=(Output(str(tmp_path / "out.txt")),), log_dir=str(tmp_path / "logs" / "run1"),
        launch=Launch.DIRECT,
    )
    return dataclasses.replace(base, **changes)


def test_what_a_rerun_numbers_anew_does_not_count(tmp_path):
    first = task(tmp_path)
    again = task(tmp_path, name="a-7-2", job_id="7", attempt=2, log_dir=str(tmp_path / "logs" / "run2"))
    assert key_of(first, stat_identity) == key_of(again, stat_identity)


def test_what_decides_the_work_counts(tmp_path):
    first = key_of(task(tmp_path), stat_identity)
    for change in (
        {"script": "cat in.txt > out.txt; echo"}, {"image": "other"}, {"label": "rule b"},
        {"env": {"A": "1"}}, {"resources": Resources(mem_mb=100)},
        {"outputs": (Output(str(tmp_path / "other.txt")),)},
        {"inputs": (Input(str(tmp_path / "in.txt"), Kind.FILE, "s3://b/in.txt"),)},
    ):
        assert key_of(task(tmp_path, **change), stat_identity) != first, change
    assert key_of(task(tmp_path), stat_identity, "s3://other/prefix") != first


def test_input_content_counts_as_the_backend_identifies_it(tmp_path):
    t = task(tmp_path)
    by_stat, by_digest = key_of(t, stat_identity), key_of(t, sha256_file)
    os.utime(tmp_path / "in.txt", ns=(1, 1))  # touched: same bytes
    assert key_of(t, stat_identity) != by_stat
    assert key_of(t, sha256_file) == by_digest
    (tmp_path / "in.txt").write_text("y")
    assert key_of(t, sha256_file) != by_digest


def test_a_directory_input_counts_by_what_it_holds(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "f").write_text("1")
    t = task(tmp_path, inputs=(Input(str(d), Kind.DIRECTORY),))
    before = key_of(t, sha256_file)
    (d / "sub" / "g").write_text("2")
    assert key_of(t, sha256_file) != before


def test_sources_count_for_snakemake_jobs_and_where_a_command_names_them(tmp_path):
    (tmp_path / "Snakefile").write_text("rule a: ...")
    (tmp_path / "prepare.sh").write_text("echo 1")
    sources = (str(tmp_path / "Snakefile"), str(tmp_path / "prepare.sh"))
    shell = task(tmp_path, sources=sources)
    names = task(tmp_path, sources=sources, script="sh prepare.sh > out.txt")
    runs_snakemake = task(tmp_path, sources=sources, launch=Launch.SNAKEMAKE)
    keys = [key_of(t, stat_identity) for t in (shell, names, runs_snakemake)]
    (tmp_path / "Snakefile").write_text("rule a: ... edited elsewhere")
    adoption._sources_identity.cache_clear()  # once per run: a rerun is a new process
    assert key_of(shell, stat_identity) == keys[0]  # its command is what it runs
    assert key_of(names, stat_identity) == keys[1]
    assert key_of(runs_snakemake, stat_identity) != keys[2]  # its code is in the Snakefile
    (tmp_path / "prepare.sh").write_text("echo 2 # edited")
    adoption._sources_identity.cache_clear()
    assert key_of(names, stat_identity) != keys[1]


def test_the_pool_hands_out_each_task_once_running_first(tmp_path):
    pool = Orphans([Orphan("k", "p", "done", finished=True), Orphan("k", "p", "running"),
                    Orphan("other", "q", "x")])
    assert pool.claim("k").ref == "running"
    assert pool.claim("k").ref == "done"
    assert pool.claim("k") is None
    assert len(pool) == 1


def test_the_pool_gives_up_the_tasks_writing_the_same_files(tmp_path):
    t = task(tmp_path)
    pool = Orphans([Orphan("old", products_id(t), "edited"), Orphan("k", "p", "x")])
    assert [o.ref for o in pool.writing(products_id(t))] == ["edited"]
    assert [o.ref for o in pool.take_all()] == ["x"]
    assert not pool


def test_new_content_behind_an_unchanged_link_counts(tmp_path):
    """A rerun after the user rewrote what an input links to does new work, on both backends."""
    (tmp_path / "data").mkdir()
    real = tmp_path / "data" / "real.txt"
    real.write_text("old\n")
    os.symlink("data/real.txt", tmp_path / "link.txt")
    t = task(tmp_path, inputs=(Input(str(tmp_path / "link.txt")),))
    keys = key_of(t, stat_identity), key_of(t, sha256_file)
    real.write_text("new\n")
    assert key_of(t, stat_identity) != keys[0]
    assert key_of(t, sha256_file) != keys[1]


def test_a_rewrite_that_keeps_size_and_mtime_counts_on_docker(tmp_path):
    """``cp -p`` of other bytes of the same size leaves size and mtime as they were."""
    t = task(tmp_path)
    st = os.stat(tmp_path / "in.txt")
    before = key_of(t, stat_identity)
    (tmp_path / "in.txt").write_text("z")
    os.utime(tmp_path / "in.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert key_of(t, stat_identity) != before


def test_a_fifo_in_a_directory_input_is_never_opened(tmp_path):
    """Opening a FIFO blocks until someone writes to it: the key counts it by its kind, and
    reading one where a file was expected fails at once."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("a")
    os.mkfifo(d / "progress.fifo")
    os.symlink("progress.fifo", d / "to-fifo")
    t = task(tmp_path, inputs=(Input(str(d), Kind.DIRECTORY),))
    done = []
    worker = threading.Thread(target=lambda: done.append(key_of(t, sha256_file)), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert done, "the key's computation blocked on the FIFO"
    with pytest.raises(CrankError, match="not a regular file"):
        sha256_file(str(d / "progress.fifo"))
