"""What each job used (issue 31): the usage trace after every run, with the figures
measured in the task's own container (TES, a Docker runner, a container of its own) against
what the kernel says the job itself used; the report, opened in a real browser; the
right-sizing hints and their profile snippet, read back by Snakemake."""

import csv
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from snakemake_executor_plugin_crank.adapter.trace import COLUMNS

from conftest import BUSYBOX, OnDocker, OnTes, snakemake_command

# 300 MiB held at once by dd, then about 2 s of CPU in a child shell; the job writes what the
# kernel counted for its children (cutime and cstime of /proc/<its shell>/stat, in ticks)
SNAKEFILE = """
rule all:
    input: "used.txt", "failed.txt"

rule used:
    input: "in.bin"
    output: "used.txt"
    resources: mem_mb=4000
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
    found = re.search(r"what each job used: (.+\.tsv) \(report: (.+\.html)\)$", said[0])
    path, report = workdir / found.group(1), workdir / found.group(2)
    assert report.stat().st_size > 1_000_000  # plotly.js inside
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
    assert "did not measure" not in done.stderr
    assert_sized_down(workdir, done.stderr)


@pytest.mark.docker
@pytest.mark.parametrize("warm", ["yes", "no"], ids=["warm", "cold"])
def test_a_docker_jobs_usage_is_measured_in_its_container(docker_api, tmp_path, warm):
    """The same figures on Docker, in a warm runner (which ran another job before or after:
    only this job's part counts) and in a container of its own."""
    workdir = workflow(tmp_path)
    done = OnDocker(docker_api).run(workdir, "--keep-going", "--crank-docker-warm", warm)
    assert done.returncode != 0
    rows = {row["rule"]: row for row in trace_of(workdir, done.stderr)}
    assert set(rows) == {"used", "failing"}
    used = rows["used"]
    assert (used["status"], used["backend"], rows["failing"]["exit"]) == ("ok", "docker", "3")
    ticks = sum(map(int, (workdir / "used.txt").read_text().split()))
    assert ticks > 0.5 * TICKS, "the job burnt too little CPU to compare"
    assert float(used["cpu_s"]) == pytest.approx(ticks / TICKS, rel=0.15)
    assert float(used["peak_rss_mb"]) == pytest.approx(HELD_MB, rel=0.15)
    assert float(rows["failing"]["cpu_s"]) < 0.5 * float(used["cpu_s"])
    assert used["read_mb"] != "" and used["written_mb"] != "" and used["queue_s"] == ""
    assert "did not measure" not in done.stderr
    assert not list((workdir / ".snakemake" / "crank" / "scripts").glob("*/*"))
    assert_sized_down(workdir, done.stderr)


def assert_sized_down(workdir: Path, stderr: str) -> None:
    """The 4000 MB asked for a job that held about 315 MB gets one line and a profile
    snippet that Snakemake takes as it is; the rule that failed gets none."""
    said = [line for line in stderr.splitlines() if line.startswith("crank: rule ")]
    assert len(said) == 1 and re.search(r"rule used asked mem_mb=4000 and used at most 3\d\d MB .*"
                                        r"mem_mb=400 would do", said[0]), stderr[-3000:]
    usage = workdir / ".snakemake" / "crank" / "usage"
    assert "suggested-resources.yaml" in stderr
    profile = workdir / "profile"
    profile.mkdir()
    (profile / "config.yaml").write_bytes((usage / "suggested-resources.yaml").read_bytes())
    (workdir / "used.txt").unlink()
    dry = subprocess.run(snakemake_command("--profile", str(profile), "-n", "used.txt"), cwd=workdir,
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0 and "mem_mb=400," in dry.stdout + dry.stderr, dry.stdout[-2000:] + dry.stderr[-2000:]


@pytest.mark.docker
def test_the_report_renders_in_a_browser_and_a_killed_rule_is_told_to_ask_more(docker_api, chromium, tmp_path):
    """The report of a run with a job killed for memory: its four plots drawn by a real
    headless chromium from the file alone, without a message on the console."""
    workdir = workflow(tmp_path)
    (workdir / "Snakefile").write_text(SNAKEFILE.replace('"exit 3"', '"dd if=/dev/zero of=/dev/null bs=300M count=1"')
                                       .replace('output: "failed.txt"', 'output: "failed.txt"\n    resources: mem_mb=100'))
    done = OnDocker(docker_api).run(workdir, "--keep-going")
    assert done.returncode != 0
    rows = {row["rule"]: row for row in trace_of(workdir, done.stderr)}
    assert rows["failing"]["status"] == "out_of_memory"
    assert re.search(r"crank: rule failing ran out of memory in 1 job\(s\) with mem_mb=100: raise it, "
                     r"e\.g\. mem_mb=200", done.stderr), done.stderr[-3000:]
    usage = workdir / ".snakemake" / "crank" / "usage"
    report = next(p for p in usage.glob("*.html") if p.name != "latest.html")
    assert (usage / "latest.html").read_bytes() == report.read_bytes()
    assert "mem_mb: 200" in (usage / "suggested-resources.yaml").read_text()

    dom, console = browse(chromium, report, tmp_path, "--dump-dom")
    for plot in ("memory", "cpu", "walltime", "timeline"):
        drawn = re.search(rf'<div class="plot[^"]*" id="{plot}".*?</div>', dom, re.S)
        assert drawn and "main-svg" in drawn.group(0), f"the {plot} plot was not drawn"
    assert "rule failing ran out of memory" in dom
    assert console == [], console
    shot = tmp_path / "report.png"
    browse(chromium, report, tmp_path, f"--screenshot={shot}", "--window-size=1200,2400")
    assert shot.stat().st_size > 50_000  # drawn, not blank


def browse(chromium: str, page: Path, tmp_path: Path, *args: str) -> tuple:
    """What headless chromium made of the page (stdout), and what the page wrote on its console."""
    profile = tmp_path / f"chromium-{uuid.uuid4().hex[:8]}"
    shown = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args, page.as_uri()],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert shown.returncode == 0, shown.stderr[-3000:]
    return shown.stdout, [line for line in shown.stderr.splitlines() if ":CONSOLE" in line]
