"""What a job is given and what comes back of the links it makes, at the edges: special files
among the inputs, links to what a job made outside the workdir, and a task that names in its
index where things should go (the host decides, see backends/tes/products.py). The common
cases (archives, copies, counts, times, links, shadow rules) are the differential test's
(tests/test_differential.py, FEATURES); these tests need no workflow of their own where a
pure function answers."""

import os
import uuid
from pathlib import Path

import pytest

from snakemake_executor_plugin_crank.backends.tes import layout, products
from snakemake_executor_plugin_crank.errors import CrankError
from snakemake_executor_plugin_crank.task import Input, Output, TaskSpec

from conftest import tes_run


def workdir_with(tmp_path: Path, snakefile: str) -> Path:
    workdir = tmp_path / uuid.uuid4().hex / "wf"
    workdir.mkdir(parents=True)
    (workdir / "Snakefile").write_text(snakefile)
    return workdir


FIFO = 'rule read:\n    input: "{input}"\n    output: "n.txt"\n    shell: "ls {{input}} > {{output}}; cat {{input}}/* >> {{output}} || true"\n'


def assert_one_line_naming(done, *words):
    assert done.returncode != 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if all(w in line for w in words)]
    assert lines, done.stderr


def test_a_fifo_input_fails_the_job_with_one_line(crank, tmp_path):
    """The local executor's job would wait on it for ever: crank's fails at once, saying why,
    on every backend."""
    workdir = workdir_with(tmp_path, FIFO.format(input="p"))
    os.mkfifo(workdir / "p")
    done = crank.run(workdir, timeout=120)
    assert_one_line_naming(done, str(workdir / "p"), "is a FIFO")
    assert not (workdir / "n.txt").exists()


@pytest.mark.tes
def test_a_fifo_in_a_directory_input_fails_the_job_with_one_line_on_tes(tes, tmp_path):
    """Inside a directory input a FIFO cannot be sent either (nothing opens it: staging would
    wait on it for ever). On Docker the job sees the directory as it is, as locally."""
    workdir = workdir_with(tmp_path, FIFO.format(input="d"))
    (workdir / "d").mkdir()
    (workdir / "d" / "a.txt").write_text("a\n")
    os.mkfifo(workdir / "d" / "p")
    done = tes_run(tes, workdir, timeout=120)
    assert_one_line_naming(done, str(workdir / "d" / "p"), "inside the directory", "is a FIFO")
    assert not (workdir / "n.txt").exists()


OUTSIDE = """
rule made_outside:
    output: directory("out.d")
    shell: "mkdir -p {{output}}; echo made > {target}; ln -s {target} {{output}}/l; echo x > {{output}}/x"
"""


@pytest.mark.tes
def test_a_link_to_what_the_job_made_outside_the_workdir_comes_back_alone_with_a_warning(tes, tmp_path):
    target = f"/tmp/crank-made-{uuid.uuid4().hex}"
    workdir = workdir_with(tmp_path, OUTSIDE.format(target=target))
    done = tes_run(tes, workdir, timeout=120)
    assert done.returncode == 0, done.stderr
    assert os.readlink(workdir / "out.d" / "l") == target and not os.path.exists(target)
    warned = [line for line in done.stderr.splitlines() if "which the job made outside the workdir" in line]
    assert len(warned) == 1 and target in warned[0], done.stderr


# ---------------------------------------------------------------- what a task's index may ask


def downloaded(tmp: Path, index: str, files: dict) -> Path:
    """A task's download as the host receives it: ``files`` by relative path, and the index."""
    tmp.mkdir()
    for rel, text in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    (tmp / layout.INDEX).write_text(index)
    return tmp


def task_in(workdir: Path, outputs, inputs=()) -> TaskSpec:
    return TaskSpec(name="t", label="rule t", job_id="1", attempt=1, image="i", script="true",
                    workdir=str(workdir), inputs=tuple(Input(str(workdir / i)) for i in inputs),
                    outputs=tuple(Output(str(workdir / o)) for o in outputs))


def test_a_link_target_the_job_made_is_installed_where_the_link_leads(tmp_path):
    """A file target, and a directory target merged into what is there (nothing else in it
    goes), with their modes; a link's target that is a link itself comes along."""
    workdir = tmp_path / "wf"
    (workdir / "made.d").mkdir(parents=True)
    (workdir / "made.d" / "kept").write_text("the user's\n")
    tmp = downloaded(tmp_path / "dl", "\n".join([
        "l p000000 .", "l p000001 .", "l p000002 .",
        "c p000000 q000001 .", "f q000001", "m q000001 751 .",
        "c p000001 q000002 .", "d q000002", "s q000002 .", "s q000002 ./sub", "m q000002 700 ./sub",
        "c p000002 q000003 .", "l q000003 .", "c q000003 q000004 .", "f q000004",
    ]) + "\n", {
        "p000000": "made.txt", "p000001": "made.d", "p000002": "hop",
        "q000001": "content\n", "q000002/sub/f": "in\n", "q000003": "end.txt", "q000004": "end\n",
    })
    task = task_in(workdir, ["out.lnk", "dir.lnk", "hop.lnk"])
    assert products.install_all(str(tmp), task) == []
    assert os.readlink(workdir / "out.lnk") == "made.txt" and (workdir / "made.txt").read_text() == "content\n"
    assert (workdir / "made.txt").stat().st_mode & 0o777 == 0o751
    assert (workdir / "made.d" / "kept").read_text() == "the user's\n"
    assert (workdir / "made.d" / "sub" / "f").read_text() == "in\n"
    assert (workdir / "made.d" / "sub").stat().st_mode & 0o777 == 0o700
    assert os.readlink(workdir / "hop") == "end.txt" and (workdir / "end.txt").read_text() == "end\n"


@pytest.mark.parametrize("text,why", [
    ("../outside.txt", "outside the workdir"),
    ("/etc/crank-test", "outside the workdir"),
    (".snakemake/x", "under .snakemake"),
    ("in.txt", "crank put it there"),
    ("data", "crank put it there"),  # a directory on the way to an input
    ("data/inputs/new", "crank put it there"),  # inside a directory input
    ("other.txt", "an output"),
    ("sym/x", "through a symlink"),
])
def test_a_task_cannot_put_a_link_target_where_the_job_did_not_make_it(tmp_path, text, why):
    """Whatever the task's index says, only the link comes back, and a warning."""
    workdir = tmp_path / "wf"
    (workdir / "data" / "inputs").mkdir(parents=True)
    (workdir / "data" / "inputs" / "i").write_text("input\n")
    (workdir / "in.txt").write_text("input\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (workdir / "sym").symlink_to(elsewhere)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    tmp = downloaded(tmp_path / "dl", "l p000000 .\nc p000000 q000001 .\nf q000001\n",
                     {"p000000": text, "q000001": "hostile\n"})
    task = task_in(workdir, ["out.lnk", "other.txt"], inputs=["in.txt", "data/inputs"])
    [warning] = products.install_all(str(tmp), task)
    assert why in warning and str(workdir / "out.lnk") in warning
    assert os.readlink(workdir / "out.lnk") == text
    assert {p: p.read_bytes() for p in before} == before
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == b"hostile\n"
                and not str(p).startswith(str(tmp))]


def test_a_task_index_naming_an_unknown_product_is_refused():
    for line in ("c p000000 ../x .", "c ../p q000001 .", "c p000000 q000001 ../.."):
        with pytest.raises(CrankError):
            layout.read_index(line + "\n")


def test_what_crank_placed_is_listed_by_tops_and_directories_made_whole():
    """The task tells what the job made from what crank put there without a line per file of
    a directory input (a task body must not grow with what a directory holds)."""
    from snakemake_executor_plugin_crank.staging.staged import Staged
    from snakemake_executor_plugin_crank.backends.tes.script import _time, placed_list

    task = TaskSpec(name="t", label="rule t", job_id="1", attempt=1, image="i", script="true",
                    workdir="/w", outputs=(Output("/w/out/x"),))
    staged = [Staged("/w/data/dir", directory=True, mode=0o755),
              Staged("/w/data/dir/a", url="s3://b/cas/sha256/0", mode=0o644),
              Staged("/w/data/dir/sub", directory=True, mode=0o755),
              Staged("/w/data/src", url="s3://b/cas/sha256/1", mode=0o644),
              Staged("/w/data/link", link="src"),
              Staged("/w/data", directory=True, mode=0o755, ancestor=True)]
    assert placed_list(task, staged).splitlines() == [
        "= /w", "= /w/data", "= /w/data/dir", "= /w/data/link", "= /w/data/src", "= /w/out", "d /w/data/dir"]
    assert _time(1_500_000_000_123_456_789) == "1500000000.123456789" and _time(-1) == "-0.000000001"
