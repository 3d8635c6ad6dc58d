"""crank against what users do without it: Snakemake's local executor with `docker run --rm`
in every rule.

A generated workflow of N independent jobs (default 200) runs twice per round, alternating:
  crank  snakemake --executor crank --jobs J --crank-default-image crank-test/busybox:1
         each job: `touch {output}` in the container (the workdir is mounted by crank)
  local  snakemake --cores J (Snakemake's local executor), each job:
         docker run --rm -u UID:GID -v $PWD:$PWD -w $PWD crank-test/busybox:1 sh -c 'touch {output}'
so both write the job's output from inside a container, as a user's rule would. With --work,
each job first spins a shell loop for about 0.5 s of CPU (on the machine of
docs/performance.md) in both variants.

Printed per -j value: wall clock of every run, the ratio of sums crank/local, and for crank
the Docker API requests per job (every HTTP request of the snakemake process, counted by a
wrapper around requests.Session.send that this script installs before running snakemake;
nothing in crank is changed for it) and the CPU time per job of the snakemake process
(user+sys of the process and the children it waited for, from wait4; for `local` that
includes the docker CLI it starts).

Needs the test images (bash scripts/setup.sh). Examples:
  python3 bench/docker_overhead.py                      # 200 no-op jobs, -j 4, 3 rounds
  python3 bench/docker_overhead.py -j 1 -j 16 --rounds 2
  python3 bench/docker_overhead.py --work               # ~0.5 s of CPU per job
  python3 bench/docker_overhead.py --crank-args="--crank-docker-warm no"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGE = "crank-test/busybox:1"
REPO = Path(__file__).resolve().parent.parent
# about 0.5 s of CPU in busybox sh
WORK = "i=0; while [ $i -lt 250000 ]; do i=$((i+1)); done; "

SNAKEFILE = """
N = {n}

rule all:
    input: expand("out/{{i}}.txt", i=range(N))

rule job:
    output: "out/{{i}}.txt"
    shell: {shell!r}
"""

# Run snakemake with every HTTP request of the process counted, the counts written as
# JSON to $BENCH_REQUEST_LOG at exit.
COUNTING_SHIM = r"""
import atexit, collections, json, os, re, runpy, sys, threading
import requests
counts = collections.Counter()
lock = threading.Lock()
send = requests.Session.send
def counted(self, request, **kwargs):
    path = re.sub(r"^/v[0-9.]+", "", request.path_url.split("?")[0])
    path = re.sub(r"/[0-9a-f]{64}|/crank-[0-9a-f]{8}-[^/]+", "/*", path)
    with lock:
        counts[f"{request.method} {path}"] += 1
    return send(self, request, **kwargs)
requests.Session.send = counted
def write():
    with open(os.environ["BENCH_REQUEST_LOG"], "w") as f:
        json.dump(dict(counts), f)
atexit.register(write)
sys.argv = ["snakemake"] + sys.argv[1:]
runpy.run_module("snakemake", run_name="__main__")
"""


def run_once(kind: str, jobs: int, n: int, work: bool, crank_args, code: Path):
    """One whole snakemake command in a fresh workflow directory: (seconds, cpu s, requests)."""
    with tempfile.TemporaryDirectory(prefix="crank-bench-") as tmp:
        if kind == "crank":
            shell = (WORK if work else "") + "touch {output}"
        else:
            inner = shlex.quote((WORK if work else "") + "touch {output}")
            shell = (
                f'docker run --rm -u {os.getuid()}:{os.getgid()} -v "$PWD:$PWD" -w "$PWD" '
                f"{IMAGE} sh -c {inner}"
            )
        (Path(tmp) / "Snakefile").write_text(SNAKEFILE.format(n=n, shell=shell))
        request_log = Path(tmp) / "requests.json"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")])),
            "BENCH_REQUEST_LOG": str(request_log),
        }
        if kind == "crank":
            command = [sys.executable, "-c", COUNTING_SHIM, "--executor", "crank",
                       "--jobs", str(jobs), "--crank-default-image", IMAGE, *crank_args]
        else:
            command = [sys.executable, "-m", "snakemake", "--cores", str(jobs)]
        started = time.monotonic()
        proc = subprocess.Popen(command, cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            sys.exit(f"{kind} failed:\n{stderr.decode(errors='replace')[-3000:]}")
        made = len(list((Path(tmp) / "out").glob("*.txt")))
        if made != n:
            sys.exit(f"{kind}: {made} outputs instead of {n}")
        counts = json.loads(request_log.read_text()) if request_log.exists() else {}
        return elapsed, usage.ru_utime + usage.ru_stime, counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--jobs-in-workflow", type=int, default=200, dest="n")
    parser.add_argument("-j", "--jobs", type=int, action="append",
                        help="parallel jobs (repeatable; default 4)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", action="store_true", help="about 0.5 s of CPU per job")
    parser.add_argument("--crank-args", default="", help="extra crank options")
    parser.add_argument("--only", choices=["crank", "local"], help="run one side only")
    parser.add_argument("--code", default=str(REPO),
                        help="directory whose snakemake_executor_plugin_crank is used")
    args = parser.parse_args()
    crank_args = shlex.split(args.crank_args)
    kinds = [args.only] if args.only else ["crank", "local"]
    what = "jobs with ~0.5 s CPU each" if args.work else "no-op jobs"
    print(f"{args.n} {what}, image {IMAGE}, {args.rounds} round(s), alternating {'/'.join(kinds)}")
    for jobs in args.jobs or [4]:
        times = {k: [] for k in kinds}
        cpu = {k: [] for k in kinds}
        requests = []
        for _ in range(args.rounds):
            for kind in kinds:
                seconds, cpu_s, counts = run_once(kind, jobs, args.n, args.work, crank_args,
                                                  Path(args.code))
                times[kind].append(seconds)
                cpu[kind].append(cpu_s)
                if kind == "crank":
                    requests.append(counts)
                print(f"  -j {jobs} {kind:<5} {seconds:7.2f} s  cpu {cpu_s:6.2f} s", flush=True)
        print(f"-j {jobs}:")
        for kind in kinds:
            total = sum(times[kind])
            print(f"  {kind:<5} sum {total:7.2f} s  per job {total / len(times[kind]) / args.n * 1000:6.1f} ms"
                  f"  cpu per job {sum(cpu[kind]) / len(cpu[kind]) / args.n * 1000:6.1f} ms")
        if len(kinds) == 2:
            print(f"  ratio of sums crank/local: {sum(times['crank']) / sum(times['local']):.2f}")
        if requests:
            merged = {}
            for counts in requests:
                for key, value in counts.items():
                    merged[key] = merged.get(key, 0) + value
            total = sum(merged.values()) / len(requests)
            print(f"  crank Docker API requests per job: {total / args.n:.1f}")
            for key, value in sorted(merged.items(), key=lambda kv: -kv[1]):
                print(f"    {value / len(requests) / args.n:6.2f}  {key}")


if __name__ == "__main__":
    main()
