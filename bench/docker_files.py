"""Copying a job's files into its container and its outputs back (--crank-docker-files copy,
what crank does for an engine that does not see the client's files) against binding them
(--crank-docker-files bind), on the local engine, alternating, in the same run:

  noop   N independent jobs (default 200), each `touch {output}`, at -j 4, in warm runners
         (the default) and with one container per job (--crank-docker-warm no)
  read   one job that reads a 1 GiB input (`--gib`) and writes its 64-byte checksum line
  shared 8 jobs (`--readers`) that each read the same input, a container per job: copied, it
         is sent to the engine once (the engine's copy of the workdir), not once per container

Printed: the wall clock of every run and the ratio of the sums. Needs the test images
(bash scripts/setup.sh). Examples:
  python3 bench/docker_files.py
  python3 bench/docker_files.py --jobs 50 --gib 0.25 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGE = "crank-test/busybox:1"

NOOP = """
rule all:
    input: expand("out/{{i}}.txt", i=range({n}))

rule job:
    output: "out/{{i}}.txt"
    shell: "touch {{output}}"
"""

# `n` jobs that each read the same input (one: the read case)
READERS = """
rule all:
    input: expand("sum{{i}}.txt", i=range({n}))

rule sum:
    input: "big.bin"
    output: "sum{{i}}.txt"
    shell: "sha256sum {{input}} > {{output}}"
"""

VARIANTS = {
    "bind": ["--crank-docker-files", "bind"],
    "copy": ["--crank-docker-files", "copy"],
    "bind-cold": ["--crank-docker-files", "bind", "--crank-docker-warm", "no"],
    "copy-cold": ["--crank-docker-files", "copy", "--crank-docker-warm", "no"],
}


def run(snakefile: str, variant: str, big: Path = None) -> float:
    with tempfile.TemporaryDirectory(prefix="crank-bench-files-") as tmp:
        workdir = Path(tmp)
        (workdir / "Snakefile").write_text(snakefile)
        if big is not None:
            os.link(big, workdir / "big.bin")
        command = [sys.executable, "-m", "snakemake", "--executor", "crank", "--jobs", "4",
                   "--crank-default-image", IMAGE, "--quiet", *VARIANTS[variant]]
        start = time.monotonic()
        done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
        seconds = time.monotonic() - start
        if done.returncode != 0:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="no-op jobs (default 200)")
    parser.add_argument("--gib", type=float, default=1.0, help="size of the input read (default 1)")
    parser.add_argument("--readers", type=int, default=8, help="jobs reading the same input (default 8)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    times = {("noop", v): [] for v in VARIANTS}
    times.update({("read", v): [] for v in ("bind", "copy")})
    times.update({("shared", v): [] for v in ("bind-cold", "copy-cold")})
    with tempfile.TemporaryDirectory(prefix="crank-bench-big-") as keep:
        big = Path(keep) / "big.bin"
        with open(big, "wb") as f:
            for _ in range(int(args.gib * 1024)):
                f.write(os.urandom(1 << 20))
        for _ in range(args.rounds):
            for variant in VARIANTS:
                times[("noop", variant)].append(run(NOOP.format(n=args.jobs), variant))
            for variant in ("bind", "copy"):
                times[("read", variant)].append(run(READERS.format(n=1), variant, big))
            for variant in ("bind-cold", "copy-cold"):
                times[("shared", variant)].append(run(READERS.format(n=args.readers), variant, big))

    print(f"{args.jobs} no-op jobs at -j 4; one job reading {args.gib:g} GiB; {args.readers} jobs reading it, "
          f"a container each; {args.rounds} round(s)")
    for (case, variant), seconds in times.items():
        print(f"  {case:6} {variant:10} " + "  ".join(f"{s:6.1f} s" for s in seconds))
    total = {key: sum(seconds) for key, seconds in times.items()}
    print(f"noop: copy / bind (warm runners) = {total[('noop', 'copy')] / total[('noop', 'bind')]:.2f}, "
          f"copy-cold / bind-cold = {total[('noop', 'copy-cold')] / total[('noop', 'bind-cold')]:.2f}")
    print(f"read: copy / bind = {total[('read', 'copy')] / total[('read', 'bind')]:.2f}")
    print(f"shared: copy-cold / bind-cold = {total[('shared', 'copy-cold')] / total[('shared', 'bind-cold')]:.2f}")


if __name__ == "__main__":
    main()
