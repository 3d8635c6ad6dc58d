"""What each job used (issue 31): the usage trace after every run, and on TES the figures
measured in the task's own container, against what the kernel says the job itself used."""

import csv
import uuid
from pathlib import Path

import pytest

from snakemake_executor_plugin_crank.adapter.trace import COLUMNS

from conftest import BUSYBOX, OnDocker, OnTes

# 300 MiB held at once by dd, then about 2 s of CPU in a child shell; the job writes what the
# kernel counted for its children (cutime and cstime of /proc/<its shell>/stat, in ticks)
SNAKEFILE = """
rule all:
    input: "used.txt", "failed.txt"

rule used:
    input: "in.bin"
    output: "used.txt"
    shell: "dd if=/dev/zero of=/dev/null bs=300M count=1 2>/dev/null; "
           "sh -c 'i=0; while [ $i -lt 1000000 ]; do i=$((i+1)); done'; "
           "cut -d' ' -f16,17 /proc/$$/stat > {output}"

rule failing:
    output: "failed.txt"
    shell: "exit 3"
"""
HELD_MB = 300 * 2**20 / 1e6
TICKS = 100


def workflow(tmp_path: Path) -> Path:
    workdir = tmp_path / uuid.uuid4().hex / "wf"
    workdir.mkdir(parents=True)
    (workdir / "Snakefile").write_text(SNAKEFILE)
    (workdir / "in.bin").write_bytes(b"x" * 1_000_000)
    return workdir


def trace_of(workdir: Path, stderr: str) -> list:
    said = [line for line in stderr.splitlines() if "crank: what each job used: " in line]
    assert len(said) == 1, stderr[-3000:]
    path = workdir / said[0].rsplit("what each job used: ", 1)[1].strip()
    latest = workdir / ".snakemake" / "crank" / "usage" / "latest.tsv"
    assert latest.read_bytes() == path.read_bytes()
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert tuple(rows[0]) == COLUMNS
    return [dict(zip(COLUMNS, row)) for row in rows[1:]]


@pytest.mark.tes
def test_a_tes_jobs_usage_is_measured_in_its_container(tes, tmp_path):
    """Peak memory and CPU time within 15% of what the job held and what the kernel counted
    for it; a failed job's attempt has its row too."""
    workdir = workflow(tmp_path)
    done = OnTes(tes).run(workdir, "--keep-going")
    assert done.returncode != 0  # rule failing
    rows = {row["rule"]: row for row in trace_of(workdir, done.stderr)}
    assert set(rows) == {"used", "failing"}
    used, failing = rows["used"], rows["failing"]
    assert (used["status"], used["exit"], used["backend"], used["image"]) == ("ok", "0", "tes", BUSYBOX)
    assert (failing["status"], failing["exit"]) == ("failed", "3")
    ticks = sum(map(int, (workdir / "used.txt").read_text().split()))
    assert ticks > 0.5 * TICKS, "the job burnt too little CPU to compare"
    assert float(used["cpu_s"]) == pytest.approx(ticks / TICKS, rel=0.15)
    assert float(used["peak_rss_mb"]) == pytest.approx(HELD_MB, rel=0.15)
    assert float(used["realtime_s"]) >= float(used["cpu_s"]) * 0.5
    assert float(used["queue_s"]) >= 0
    assert used["read_mb"] != "" and used["written_mb"] != ""
    assert used["cpus"] == "1" and used["attempt"] == "1"
    assert float(used["staged_in_mb"]) == 1.0  # in.bin
    assert 0 < float(used["staged_out_mb"]) < 1  # used.txt, and its empty stdout and stderr
    assert failing["staged_in_mb"] == "0" and 0 < float(failing["staged_out_mb"]) < 0.01  # its exit code
    assert "does not measure" not in done.stderr


@pytest.mark.docker
def test_the_trace_is_written_on_docker_with_what_it_does_not_measure_left_empty(docker_api, tmp_path):
    workdir = workflow(tmp_path)
    done = OnDocker(docker_api).run(workdir, "--keep-going")
    assert done.returncode != 0
    rows = {row["rule"]: row for row in trace_of(workdir, done.stderr)}
    assert set(rows) == {"used", "failing"}
    assert (rows["used"]["status"], rows["failing"]["exit"]) == ("ok", "3")
    assert [rows["used"][c] for c in ("cpu_s", "peak_rss_mb", "read_mb", "written_mb")] == [""] * 4
    assert rows["used"]["realtime_s"] != ""
    said = [line for line in done.stderr.splitlines() if "does not measure CPU time" in line]
    assert len(said) == 1, done.stderr[-3000:]
