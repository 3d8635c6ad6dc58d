"""Wall clock of a 12-step chain of instant shell jobs: crank vs. Snakemake's local executor.

Each run is a whole `snakemake` command in a fresh copy of a temporary workflow:
  crank  snakemake --executor crank --jobs 1 --crank-default-image crank-test/busybox:1
         (Snakemake's default --seconds-between-status-checks; crank adapts the interval)
  local  snakemake --cores 1 (no containers): the floor
Each is repeated 3 times; the table shows the median. Needs the test images
(bash scripts/setup.sh). Run from anywhere: python3 bench/chain.py
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = 12
REPEATS = 3
IMAGE = "crank-test/busybox:1"
REPO = Path(__file__).resolve().parent.parent

SNAKEFILE = f"""
wildcard_constraints:
    i="[0-9]+"

rule all:
    input: "s{STEPS - 1}.txt"

rule first:
    output: "s0.txt"
    shell: "echo start > {{output}}"

rule step:
    input: lambda w: f"s{{int(w.i) - 1}}.txt"
    output: "s{{i}}.txt"
    shell: "cp {{input}} {{output}} && echo {{wildcards.i}} >> {{output}}"

ruleorder: first > step
"""

COMMANDS = {
    "crank": ["--executor", "crank", "--jobs", "1", "--crank-default-image", IMAGE],
    "local": ["--cores", "1"],
}


def run_once(args):
    """Seconds for one whole snakemake command in a fresh workflow directory."""
    with tempfile.TemporaryDirectory(prefix="crank-bench-") as tmp:
        (Path(tmp) / "Snakefile").write_text(SNAKEFILE)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=tmp, env=env,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        elapsed = time.monotonic() - started
        if done.returncode != 0:
            sys.exit(f"snakemake {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        if len((Path(tmp) / f"s{STEPS - 1}.txt").read_text().splitlines()) != STEPS:
            sys.exit("the chain's last output is wrong")
        return elapsed


def main():
    times = {name: [] for name in COMMANDS}
    for _ in range(REPEATS):  # interleaved, so drift hits both alike
        for name, args in COMMANDS.items():
            times[name].append(run_once(args))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{STEPS}-step chain of instant shell jobs, median of {REPEATS} runs (wall clock, s)")
    print(f"{'executor':<8} {'median':>7}   runs")
    for name, values in times.items():
        print(f"{name:<8} {median[name]:7.2f}   " + " ".join(f"{v:.2f}" for v in values))
    print(f"ratio crank/local: {median['crank'] / median['local']:.1f}x")
    print(f"crank overhead per job: {(median['crank'] - median['local']) / STEPS:.2f} s")


if __name__ == "__main__":
    main()
