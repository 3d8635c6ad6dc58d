"""End to end: a workflow and profile written for the Slurm executor plugin, run on the real
Docker engine with only ``executor: crank`` changed; threads and memory as Snakemake treats
them. Every job writes the limits its container got, read from its cgroup."""

from pathlib import Path

import pytest

from conftest import copy_workflow, snakemake

pytestmark = pytest.mark.docker

IGNORED_LINE = "crank: ignored resources with no meaning in a container: "
PAGE = 4096  # the kernel keeps a memory limit in whole pages
UNLIMITED = 2**62  # cgroup v1 reports "no limit" as a number near 2**63


def limits(path: Path):
    """(CPUs, memory limit in bytes or None) and the rest of the line a job wrote."""
    quota, period, memory, *rest = path.read_text().split()
    cpus = None if quota in ("max", "-1") else int(quota) / int(period)
    mem = None if memory == "max" or int(memory) >= UNLIMITED else int(memory)
    return cpus, mem, rest


def assert_memory(got, mb):
    assert mb * 1_000_000 - PAGE < got <= mb * 1_000_000, got


@pytest.fixture
def workdir(docker_api, tmp_path):
    return copy_workflow("slurm", tmp_path / "wf")


def test_a_slurm_profile_runs_unchanged_with_its_limits(workdir):
    done = snakemake(workdir, "--profile", "profile")
    assert done.returncode == 0, done.stderr

    # set-resources cpus_per_task=2 (threads 1) -> 2 CPUs; default mem_mb_per_cpu=300 -> 600 MB
    cpus, mem, rest = limits(workdir / "limits/sized.txt")
    assert cpus == 2.0
    assert_memory(mem, 600)
    # the thread variables are {threads}, as Snakemake's shell sets them under Slurm too
    assert rest == ["threads=1", "omp=1"]
    cpus, mem, _ = limits(workdir / "limits/plain.txt")
    assert cpus == 1.0
    assert_memory(mem, 300)

    lines = [line for line in done.stderr.splitlines() if IGNORED_LINE in line]
    assert lines == [IGNORED_LINE + "constraint, slurm_account, slurm_extra, slurm_partition"]
    assert "crank: rule" not in done.stderr  # nothing to warn about per rule
    assert "Traceback" not in done.stderr


def test_threads_above_the_engine_run_with_its_cpus_warned_once_per_rule(docker_api, workdir):
    engine_cpus = docker_api.info()["NCPU"]
    done = snakemake(
        workdir, "greedy/a.txt", "greedy/b.txt", "idle.txt", "--max-threads", "64"
    )
    assert done.returncode == 0, done.stderr
    for name in ("a", "b"):
        cpus, mem, rest = limits(workdir / f"greedy/{name}.txt")
        assert (cpus, rest) == (float(engine_cpus), [f"omp={engine_cpus}"])
    warning = (
        f"crank: rule greedy asks for 64 CPUs (threads), more than the {engine_cpus} the "
        f"backend has: its jobs run on {engine_cpus} CPUs (and, unless --cores is given, "
        f"with {{threads}} = {engine_cpus}, as Snakemake caps threads at --cores)"
    )
    assert done.stderr.count(warning) == 1, done.stderr
    # threads: 0 is accepted and still gets one CPU
    cpus, _, _ = limits(workdir / "idle.txt")
    assert cpus == 1.0


def test_mem_mb_zero_means_no_memory_limit(workdir):
    done = snakemake(workdir, "limits/plain.txt", "--default-resources", "mem_mb=0")
    assert done.returncode == 0, done.stderr
    cpus, mem, _ = limits(workdir / "limits/plain.txt")
    assert (cpus, mem) == (1.0, None)


def test_envmodules_are_reported_once_or_fail_when_asked(workdir):
    done = snakemake(workdir, "modules.txt")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "envmodules:" in line]
    assert len(lines) == 1 and lines[0].endswith(": rule modules"), lines
    (workdir / "modules.txt").unlink()

    done = snakemake(workdir, "modules.txt", "--crank-envmodules", "fail")
    assert done.returncode != 0
    assert (
        "rule modules has envmodules: and no container:, and a container has no environment "
        "modules; give it a container: image with its tools (--crank-envmodules fail is set)"
    ) in done.stderr
    assert "Traceback" not in done.stderr


def test_mpi_tasks_are_one_clear_line(workdir):
    done = snakemake(workdir, "mpi.txt")
    assert done.returncode != 0
    assert (
        "rule mpi: resource tasks=4 asks for a multi-node or MPI job, which crank cannot run: "
        "a container is one task on one machine; remove tasks or set it to 1"
    ) in done.stderr
    assert "Traceback" not in done.stderr
