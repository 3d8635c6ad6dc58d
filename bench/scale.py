"""How crank's cost per job grows with the size of a workflow: N independent no-op jobs on
Docker and on TES, against the same workflow under Snakemake's local executor (no container,
`touch {output}`), which is Snakemake's own share.

    python3 tests/services.py start   # SeaweedFS and Funnel, left running
    set -a; . ~/.cache/crank-test/s3.env; . ~/.cache/crank-test/tes.env; set +a
    nice -n 19 python3 bench/scale.py [--sizes 100,1000,10000] [--backends docker,tes,local]

Each run is one whole `snakemake` command (Docker `-j 50`, TES `-j 200`, local `-j 50`) in a
fresh directory, started through a shim that changes nothing in crank and records:
- wall time of the command, and the peak RSS of the snakemake process (its VmHWM at exit);
- CPU per job: every Python thread of the process runs under cProfile with a per-thread CPU
  clock; crank's share is the inclusive time of crank's functions called from outside crank
  (what Snakemake calls, and the bodies of crank's threads), Snakemake's share the rest of
  the profiled time; "other threads" is the process's CPU outside Python threads (the object
  store client's runtime, on TES) and "children" its children's (the scheduler's solver; on
  the local executor, the jobs). The profiler slows both sides alike; the wall times are
  taken under it too;
- HTTP requests by kind (every request of the process), per job;
- TES: every status round (``Monitor.round``): its requests and bytes received, the tasks
  it watched and the jobs the run had finished when it ran; printed in buckets of finished
  jobs, so a cost that grew with them would show; at the end, one list of every task of the
  run (what each round cost before rounds followed the watched tasks only), for comparison.

With ``--throttle-creates R`` the TES runs go through a gateway (the tests' fault proxy, on
loopback) that lets R creates a second through, answers the others 429 with ``Retry-After: 1``
and loses the answer of every 100th create it lets through; after each TES run every task of
the run is listed once (BASIC) to count tasks against submissions: a duplicate would show.

Printed: a table of the runs, crank's CPU per job at each size against the smallest size
(the issue's target: within 1.5x), RSS above the local executor's at the same size, and the
status rounds. ``--tes-tasks`` prints how many tasks the server holds before the TES runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from faultproxy import FaultProxy  # noqa: E402

IMAGE = "crank-test/busybox:1"
REPO = Path(__file__).resolve().parent.parent
JOBS = {"docker": 50, "tes": 200, "local": 50}

SNAKEFILE = """
N = {n}

rule all:
    input: expand("out/{{i}}.txt", i=range(N))

rule job:
    output: "out/{{i}}.txt"
    shell: "touch {{output}}"
"""

# Runs snakemake with every thread profiled, HTTP requests counted and TES status rounds
# recorded; writes the figures as JSON to $BENCH_LOG at exit.
SHIM = r"""
import atexit, cProfile, collections, json, os, pstats, re, resource, runpy, sys, threading, time
import requests

# the main thread's profile, and the others': each folded into ``ended`` when its thread
# ends, so that a thread's profile (about 80 KiB) is not held for the rest of the run
profiles = [cProfile.Profile(time.thread_time)]
ended, ended_lock = pstats.Stats(), threading.Lock()
run = threading.Thread.run
def profiled(self):
    p = cProfile.Profile(time.thread_time)
    with ended_lock:
        profiles.append(p)
    p.enable()
    try:
        run(self)
    finally:
        p.disable()
        with ended_lock:
            profiles.remove(p)
            try:
                ended.add(p)
            except TypeError:  # a thread that never ran a profiled call
                pass
threading.Thread.run = profiled

lock = threading.Lock()
counts = collections.Counter()
status = collections.Counter()  # requests and bytes of status rounds (MINIMAL views)
send = requests.Session.send
def counted(self, request, **kwargs):
    response = send(self, request, **kwargs)
    path = re.sub(r"^/v[0-9.]+", "", request.path_url.split("?")[0])
    path = re.sub(r"/[0-9a-f]{64}|/crank-[0-9a-f]{8}-[^/]+|/tasks/[a-z0-9]{20}", lambda m: "/tasks/{id}" if m.group().startswith("/tasks") else "/*", path)
    with lock:
        counts[f"{request.method} {path}"] += 1
        if "/tasks" in path and "view=MINIMAL" in request.path_url and not kwargs.get("stream"):
            status["requests"] += 1
            status["bytes"] += len(response.content)
    return response
requests.Session.send = counted

rounds, finished, monitors = [], [0], []
try:
    from snakemake_executor_plugin_crank.backends.tes import monitor
    round_, remove = monitor.Monitor.round, monitor.Monitor.remove
    def timed_round(self):
        if self not in monitors:
            monitors.append(self)
        with lock:
            before = dict(status)
            watched = len(self._created)
        started = time.perf_counter()
        try:
            return round_(self)
        finally:
            with lock:
                rounds.append((finished[0], watched, status["requests"] - before.get("requests", 0),
                               status["bytes"] - before.get("bytes", 0), time.perf_counter() - started))
    def counted_remove(self, task_id):
        finished[0] += 1
        remove(self, task_id)
    monitor.Monitor.round, monitor.Monitor.remove = timed_round, counted_remove
except ImportError:
    pass

# what a round that lists every task of the run (crank before it followed the watched tasks
# only) costs at the end of this run: requests, bytes, seconds
def whole_run_list():
    if not monitors:
        return None
    m = monitors[0]
    url, (key, value) = m.api.http.base + "/v1/tasks", m.tag
    n, size, token, started = 0, 0, None, time.perf_counter()
    while True:
        params = {"tag_key": key, "tag_value": value, "view": "MINIMAL", "page_size": 2047}
        if token:
            params["page_token"] = token
        answer = requests.get(url, params=params, timeout=120)
        n, size = n + 1, size + len(answer.content)
        token = answer.json().get("next_page_token")
        if not token or not answer.json().get("tasks"):
            return n, size, time.perf_counter() - started

def crank_seconds():
    stats = pstats.Stats(profiles[0])
    with ended_lock:
        for p in [*profiles[1:], ended]:
            try:
                stats.add(p)
            except TypeError:  # a thread that never ran a profiled call
                pass
    if os.environ.get("BENCH_PROFILE"):
        stats.dump_stats(os.environ["BENCH_PROFILE"])
    mine = lambda func: "snakemake_executor_plugin_crank" in func[0]
    profiled = sum(row[2] for row in stats.stats.values())
    total = 0.0
    for func, (_, _, _, _, callers) in stats.stats.items():
        if mine(func):
            total += sum(c[3] for caller, c in callers.items() if not mine(caller))
            if not callers:
                total += stats.stats[func][3]
    return total, profiled

def write():
    profiles[0].disable()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    crank, profiled = crank_seconds()
    with open(os.environ["BENCH_LOG"], "w") as f:
        json.dump({"requests": dict(counts), "rounds": rounds, "rss_kib": hwm,
                   "cpu_s": me.ru_utime + me.ru_stime, "children_s": children.ru_utime + children.ru_stime,
                   "crank_s": crank, "profiled_s": profiled, "whole_run_list": whole_run_list()}, f)
atexit.register(write)
sys.argv = ["snakemake"] + sys.argv[1:]
profiles[0].enable()
runpy.run_module("snakemake", run_name="__main__")
"""


def run_once(backend: str, n: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="crank-scale-") as tmp:
        (Path(tmp) / "Snakefile").write_text(SNAKEFILE.format(n=n))
        log = Path(tmp) / "bench.json"
        profile = {"BENCH_PROFILE": os.path.join(os.path.abspath(args.profile_dir), f"{backend}-{n}.pstats")
                   } if args.profile_dir else {}
        env = {**os.environ, **profile, "BENCH_LOG": str(log),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-c", SHIM, "--jobs", str(JOBS[backend]), *args.snakemake_args]
        if backend == "local":
            command += ["--cores", str(JOBS[backend])]
        else:
            command += ["--executor", "crank", "--crank-default-image", IMAGE]
        if backend == "tes":
            prefix = f"{args.prefix}/{os.path.basename(tmp)}"
            if prefix.startswith("file://"):  # a shared directory: crank wants it made
                os.makedirs(prefix[len("file://"):], exist_ok=True)
            command += ["--crank-backend", "tes", "--crank-tes-url", args.tes_url,
                        "--crank-storage-prefix", prefix]
        started = time.monotonic()
        try:
            done = subprocess.run(command, cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            made = len(list((Path(tmp) / "out").glob("*.txt")))
            print(f"| {backend} | {n} | stopped after {args.timeout:.0f} s with {made} jobs done |", flush=True)
            return None
        elapsed = time.monotonic() - started
        if done.returncode != 0:
            sys.exit(f"{backend} at {n} jobs failed:\n{done.stderr.decode(errors='replace')[-3000:]}")
        made = len(list((Path(tmp) / "out").glob("*.txt")))
        if made != n:
            sys.exit(f"{backend} at {n} jobs: {made} outputs instead of {n}")
        figures = json.loads(log.read_text())
        figures["wall_s"] = elapsed
        if backend == "tes":
            figures["tasks"], figures["submissions"] = tasks_and_submissions(args.url, tmp)
        return figures


def tasks_and_submissions(url: str, workdir: str) -> tuple:
    """How many tasks the server holds for the run in ``workdir``, and how many distinct
    submissions they are (one list of the whole run, BASIC: it carries the tags)."""
    from snakemake_executor_plugin_crank.backends.tes.tasks import TAG_SUBMISSION, TAG_WORKDIR, workdir_tag

    tags, token = [], None
    while True:
        params = {"tag_key": TAG_WORKDIR, "tag_value": workdir_tag(workdir), "view": "BASIC",
                  "page_size": 2047, **({"page_token": token} if token else {})}
        answer = requests.get(f"{url}/v1/tasks", params=params, timeout=600).json()
        tags += [(t.get("tags") or {}).get(TAG_SUBMISSION) for t in answer.get("tasks") or []]
        token = answer.get("next_page_token")
        if not token or not answer.get("tasks"):
            return len(tags), len(set(tags))


class Gateway:
    """``rate`` creates a second go through; the others are answered 429 (Retry-After: 1);
    every 100th answer that went through is lost."""

    def __init__(self, rate: float):
        self.interval, self.last, self.passed = 1.0 / rate, 0.0, 0

    def __call__(self, method: str, path: str) -> str:
        if (method, path) != ("POST", "/tasks"):
            return "pass"
        now = time.monotonic()
        if now - self.last < self.interval:
            return "error429"
        self.last, self.passed = now, self.passed + 1
        return "lose_answer" if self.passed % 100 == 0 else "pass"


def server_tasks(url: str) -> int:
    """How many tasks the TES server holds, by one unfiltered MINIMAL list."""
    total, token = 0, None
    while True:
        params = {"view": "MINIMAL", "page_size": 2047, **({"page_token": token} if token else {})}
        answer = requests.get(f"{url}/v1/tasks", params=params, timeout=60).json()
        total += len(answer.get("tasks") or [])
        token = answer.get("next_page_token")
        if not token or not answer.get("tasks"):
            return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--backends", default="local,docker,tes")
    parser.add_argument("--url", default=os.environ.get("CRANK_TEST_TES_URL", "http://127.0.0.1:18000"))
    parser.add_argument("--prefix", default=f"s3://{os.environ.get('CRANK_TEST_BUCKET', 'crank-test')}/scale",
                        help="TES: the storage prefix, or file:///dir on a directory the server shares")
    parser.add_argument("--snakemake-args", default="", help="extra snakemake options, e.g. --scheduler greedy")
    parser.add_argument("--json", help="also write every run's figures here")
    parser.add_argument("--timeout", type=float, help="stop a run after this many seconds")
    parser.add_argument("--profile-dir", help="keep each run's merged profile (pstats) here")
    parser.add_argument("--throttle-creates", type=float, metavar="R",
                        help="TES: a gateway in front of the server lets R creates a second through")
    args = parser.parse_args()
    args.tes_url, gateway = args.url, None
    if args.throttle_creates:
        host, port = args.url.rsplit("//", 1)[1].rstrip("/").split(":")
        gateway = FaultProxy(("127.0.0.1", 0), (host, int(port)), retry_after_s=1).__enter__()
        gateway.set_rule(Gateway(args.throttle_creates))
        args.tes_url = gateway.url
    args.snakemake_args = args.snakemake_args.split()
    sizes = [int(s) for s in args.sizes.split(",")]
    backends = args.backends.split(",")
    results = {}
    print("| backend | jobs | wall | jobs/s | crank CPU per job | Snakemake CPU per job | "
          "other threads per job | children per job | peak RSS | requests per job |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in sizes:
        for backend in backends:
            if backend == "tes":
                print(f"(the TES server holds {server_tasks(args.url)} tasks)", flush=True)
            r = run_once(backend, n, args)
            if r is None:
                continue
            results[(backend, n)] = r
            kinds = ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(r["requests"].items()) if v / n >= 0.01)
            per_job = lambda seconds: f"{seconds / n * 1000:.1f} ms"  # noqa: E731
            print(f"| {backend} | {n} | {r['wall_s']:.1f} s | {n / r['wall_s']:.1f} | "
                  f"{per_job(r['crank_s'])} | {per_job(r['profiled_s'] - r['crank_s'])} | "
                  f"{per_job(r['cpu_s'] - r['profiled_s'])} | {per_job(r['children_s'])} | "
                  f"{r['rss_kib'] / 1024:.0f} MiB | {sum(r['requests'].values()) / n:.2f} ({kinds}) |",
                  flush=True)
    print()
    for backend in backends:
        if backend == "local":
            continue
        base = results.get((backend, sizes[0]))
        for n in sizes:
            r = results.get((backend, n))
            if not (r and base):
                continue
            line = (f"{backend} {n}: crank CPU per job {r['crank_s'] / n * 1000:.1f} ms, "
                    f"{(r['crank_s'] / n) / (base['crank_s'] / sizes[0]):.2f}x of at {sizes[0]}")
            if ("local", n) in results:
                extra = (r["rss_kib"] - results[("local", n)]["rss_kib"]) / 1024
                line += f"; RSS {extra:+.0f} MiB against the local executor at {n}"
            print(line)
    for n in sizes:
        r = results.get(("tes", n), {})
        rounds = r.get("rounds")
        if not rounds:
            continue
        print(f"\nTES status rounds at {n} jobs ({len(rounds)} rounds), by jobs finished when the round ran")
        print("| finished jobs | rounds | watched tasks (mean) | requests per round | KiB per round | "
              "bytes per watched task | round wall (mean) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        step = max(1, n // 5)
        for lo in range(0, n, step):
            some = [x for x in rounds if lo <= x[0] < lo + step]
            if not some:
                continue
            mean = lambda i: sum(x[i] for x in some) / len(some)  # noqa: E731
            print(f"| {lo}-{lo + step - 1} | {len(some)} | {mean(1):.0f} | {mean(2):.1f} | "
                  f"{mean(3) / 1024:.1f} | {sum(x[3] for x in some) / max(1, sum(x[1] for x in some)):.0f} | "
                  f"{mean(4) * 1000:.0f} ms |")
        if r.get("whole_run_list"):
            requests_, size, seconds = r["whole_run_list"]
            last = rounds[-1]
            print(f"A round listing the whole run (as before), at its end: {requests_} request(s), "
                  f"{size / 1024:.0f} KiB, {seconds * 1000:.0f} ms; the last round here: {last[2]} "
                  f"request(s), {last[3] / 1024:.1f} KiB, {last[4] * 1000:.0f} ms "
                  f"({last[3] / max(1, size):.3f}x the bytes)")
    for n in sizes:
        r = results.get(("tes", n))
        if r:
            print(f"\nTES at {n} jobs: {r['tasks']} tasks for {r['submissions']} submissions "
                  f"({r['tasks'] - r['submissions']} duplicates)")
    if gateway:
        throttled, lost = len(gateway.actions("error429")), len(gateway.actions("lose_answer"))
        print(f"gateway: {throttled} creates answered 429, {lost} answers lost")
        gateway.stop()
    if args.json:
        Path(args.json).write_text(json.dumps({f"{b} {n}": r for (b, n), r in results.items()}))


if __name__ == "__main__":
    main()
