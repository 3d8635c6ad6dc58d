"""What the shared test workflows must give, whatever the backend runs them: one place, so
that the Docker and TES tests cannot drift apart."""

import os
from pathlib import Path
from typing import Tuple

from conftest import SNAKEMAKE_IMAGE, copy_workflow


def read(path: Path) -> str:
    return path.read_text()


def exact_workdir(tmp_path: Path) -> Tuple[Path, Tuple[str, ...]]:
    """The ``exact`` workflow (a space in its path) with its data and a reference file
    outside the workdir; the arguments to run it with."""
    workdir = copy_workflow("exact", tmp_path / "work dir")
    (workdir / "data").mkdir()
    (workdir / "data" / "a.txt").write_text("hello a\n")
    (workdir / "data" / "b.txt").write_text("hello b\n")
    outside = tmp_path / "elsewhere" / "ref file.txt"
    outside.parent.mkdir()
    outside.write_text("ref line\n")
    return workdir, ("--config", f"outside={outside}", "--container-image", SNAKEMAKE_IMAGE)


def assert_exact_outputs(workdir: Path, owner_in_container: str) -> None:
    """``owner_in_container``: uid:gid that a job's ``id`` printed."""
    results = workdir / "results"
    assert read(results / "a.upper.txt") == "HELLO A\n"
    assert read(results / "b.upper.txt") == "HELLO B\n"
    assert read(workdir / "logs" / "upper" / "a.log") == "upper a\n"
    joined = "HELLO A\nHELLO B\nref line\nthreads=2 omp=2\nshell=bash\n"
    assert read(results / "space dir" / "joined.txt") == joined
    assert read(results / "tree" / "sub" / "copy.txt") == joined
    assert read(results / "tree" / "owner.txt") == f"{owner_in_container}\n"
    assert read(results / "env.txt") == f"cwd={workdir} tmp=/tmp\nsh\n"
    # whoever ran the container, the files are the caller's
    owner = (results / "env.txt").stat()
    assert (owner.st_uid, owner.st_gid) == (os.getuid(), os.getgid())
    # a command run directly: crank writes the benchmark from the container's run time
    header, row = read(workdir / "benchmarks" / "timed.tsv").splitlines()
    assert header.split("\t")[:2] == ["s", "h:m:s"]
    assert 1.0 <= float(row.split("\t")[0]) < 10
    assert read(results / "timed.txt") == "timed\n"
    # shadow: goes through Snakemake in the image that has it; scratch stays in the shadow
    assert read(results / "shadowed.txt") == "shadowed\n"
    assert not (workdir / "scratch.txt").exists()


def rulekinds_workdir(tmp_path: Path) -> Tuple[Path, Tuple[str, ...]]:
    """The ``rulekinds`` workflow, its wrapper prefix outside the workdir (crank mounts or
    stages it like a source); the arguments to run it with."""
    workdir = copy_workflow("rulekinds", tmp_path / "wf")
    wrappers = tmp_path / "wrappers"
    (workdir / "wrappers").rename(wrappers)
    return workdir, ("--container-image", SNAKEMAKE_IMAGE, "--wrapper-prefix", f"file://{wrappers}/")


def assert_rulekinds_outputs(workdir: Path) -> None:
    def text(name):
        return read(workdir / name)

    run = f"hello from run threads=2 cwd={workdir}\n"
    assert text("run.txt") == run
    script_py = run.upper() + "word=snake threads=1\n"
    assert text("script_py.txt") == script_py
    assert text("logs/script_py.log") == "upper done\n"
    assert text("script_sh.txt") == script_py + "tag=bash\n"
    # checkpoint: the host re-evaluated the DAG from the parts that came back
    assert text("aggregated.txt") == "PART 0\nPART 1\nPART 2\n"
    assert text("grouped/final.txt") == "from-shell\nfrom-run\n"
    assert not (workdir / "grouped" / "intermediate.txt").exists()  # temp() inside the group
    assert not (workdir / "tmp" / "value.txt").exists()  # temp() between jobs
    assert text("consumed.txt") == "42\n"
    assert text("bench_done.txt") == "done\n"
    assert text("benchmarks/bench.tsv").startswith("s\th:m:s\t")
    assert text("wrapped.txt") == "3\n"
    assert text("shadowed.txt") == "shadowed\n"
    assert not (workdir / "scratch.txt").exists()  # stayed in the shadow directory
