"""What a TES status round costs when the server holds many tasks of earlier runs (issue 20:
requests and bytes per round follow the run's active tasks, whatever else the server's
database holds; measured with 50,000 earlier tasks); with ``--startup``, what a run's start
costs when its workdir has a long history (issue 34).

    python3 tests/services.py start   # SeaweedFS (Funnel's store); needs `funnel` on PATH
    set -a; . ~/.cache/crank-test/s3.env; set +a
    nice -n 19 python3 bench/tes_history.py [--earlier 50000] [--jobs 300]
    nice -n 19 python3 bench/tes_history.py --startup [--earlier 10000]

``--startup``: a Funnel of its own with ``Compute: noop`` holds, for one workdir, 5 tasks of
a dead run still queued and E ended tasks of earlier runs of that workdir (a run of 1,000
each, created and canceled). crank's start (``gather_orphans``: a list per active state, and
per dead run a list per adoptable end) is measured against one list of the workdir's every
task (what a start did before), each with an empty history and with E tasks: wall time,
crank's CPU and Python's peak memory (medians of 3).

It starts a Funnel of its own (loopback, free ports, a database in a temporary directory)
and runs the same workflow of N no-op jobs through crank twice, each as one whole `snakemake`
command recorded as `bench/scale.py` records it:
1. on the new, empty database;
2. after the database was filled with E tasks of earlier runs: Funnel restarted with
   ``Compute: noop`` (tasks are stored, never run), E tasks created under tags of their own
   (a run of 1,000 each) and canceled, then Funnel restarted with ``Compute: local`` on the
   same database.
Printed: per run, the server's task count, and the requests, bytes and wall time of its status
rounds that watched more than FEW tasks (the rounds that choose between lists and GetTasks),
per watched task; then the time of one tagged, state-filtered list and of one GetTask against
each database (medians of 8), which is where Funnel's cost per stored task shows.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import requests

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests"), str(HERE.parent)]
import scale  # noqa: E402
import services  # noqa: E402
from snakemake_executor_plugin_crank.backends.tes import monitor  # noqa: E402

IMAGE = "crank-test/busybox:1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnFunnel:
    """A Funnel on loopback with its database in ``base``."""

    def __init__(self, base: Path, s3_env: dict):
        self.base, self.s3_env = base, s3_env
        self.binary = services.find_funnel(base)
        self.http, self.rpc = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        self.daemon = services.Daemon("funnel")
        for sub in ("work", "shared"):
            (base / sub).mkdir(parents=True, exist_ok=True)

    def start(self, compute: str) -> None:
        config = self.base / f"funnel-{compute}.yml"
        services.write_private(config, services.funnel_config(
            self.base, self.s3_env, http_port=self.http, rpc_port=self.rpc, compute=compute))
        self.daemon.start_until([self.binary, "server", "run", "--config", str(config)],
                                self.base / "funnel.out", self.healthy, "Funnel")

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/healthz", timeout=2).ok
        except requests.RequestException:
            return False

    def stop(self) -> None:
        self.daemon.stop()


def fill(url: str, n: int, threads: int = 8) -> tuple:
    """``n`` tasks of earlier runs (1,000 a run), created and then canceled: (seconds to
    create, seconds to cancel)."""
    session = requests.Session()

    def create(i: int) -> str:
        body = {"name": f"earlier-{i}", "tags": {"bench-earlier-run": str(i // 1000)},
                "executors": [{"image": IMAGE, "command": ["true"]}]}
        answer = session.post(f"{url}/v1/tasks", json=body, timeout=60)
        answer.raise_for_status()
        return answer.json()["id"]

    def cancel(task_id: str) -> None:
        session.post(f"{url}/v1/tasks/{task_id}:cancel", timeout=60).raise_for_status()

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        ids = list(pool.map(create, range(n)))
        created = time.monotonic()
        list(pool.map(cancel, ids))
    return created - started, time.monotonic() - created


def list_and_get_ms(url: str, repeat: int = 8) -> tuple:
    """Medians of one tagged ListTasks with a state filter (a round's list) and of one
    GetTask (MINIMAL), in ms."""
    lists, gets = [], []
    some = requests.get(f"{url}/v1/tasks", params={"view": "MINIMAL", "page_size": 1}, timeout=60).json()
    task_id = (some.get("tasks") or [{}])[0].get("id")
    for _ in range(repeat):
        t = time.perf_counter()
        requests.get(f"{url}/v1/tasks", params={"tag_key": "crank-run", "tag_value": "none",
                                                "state": "RUNNING", "view": "MINIMAL"}, timeout=60)
        lists.append(time.perf_counter() - t)
        if task_id:
            t = time.perf_counter()
            requests.get(f"{url}/v1/tasks/{task_id}", params={"view": "MINIMAL"}, timeout=60)
            gets.append(time.perf_counter() - t)
    return statistics.median(lists) * 1000, statistics.median(gets) * 1000 if gets else float("nan")


def workdir_history(url: str, workdir: str, n: int, runs: tuple, threads: int = 8) -> None:
    """``n`` ended tasks of the workdir's earlier runs (1,000 a run, created and canceled),
    and 5 tasks a dead run left queued (``runs``: (dead run, its origin))."""
    from snakemake_executor_plugin_crank.backends.tes.tasks import (
        TAG_KEY, TAG_ORIGIN, TAG_RUN, TAG_SUBMISSION, TAG_WORKDIR, workdir_tag)

    dead, origin = runs
    session = requests.Session()

    def create(i: int, run: str) -> str:
        tags = {TAG_WORKDIR: workdir_tag(workdir), TAG_RUN: run, TAG_ORIGIN: origin,
                TAG_SUBMISSION: f"{run}:{i}-1", TAG_KEY: f"key-{run}-{i}"}
        body = {"name": f"{run}-{i}", "tags": tags, "executors": [{"image": IMAGE, "command": ["true"]}]}
        answer = session.post(f"{url}/v1/tasks", json=body, timeout=60)
        answer.raise_for_status()
        return answer.json()["id"]

    with ThreadPoolExecutor(threads) as pool:
        ended = list(pool.map(lambda i: create(i, f"earlier-{i // 1000}"), range(n)))
        list(pool.map(lambda t: session.post(f"{url}/v1/tasks/{t}:cancel", timeout=60).raise_for_status(), ended))
        list(pool.map(lambda i: create(i, dead), range(5)))


def measure_start(url: str, workdir: str, dead: str, prefix: str, repeat: int = 3) -> dict:
    """crank's start against one list of every task of the workdir: medians of wall, CPU
    and peak Python memory."""
    import tracemalloc

    from snakemake_executor_plugin_crank.backends.tes.backend import TesOptions
    from snakemake_executor_plugin_crank.backends.tes.tasks import TAG_WORKDIR, workdir_tag
    from snakemake_executor_plugin_crank.backends.tes.opening import open_tes_backend

    results = {}
    for name in ("crank", "whole history"):
        samples = []
        for _ in range(repeat):
            backend = open_tes_backend(f"bench-{time.monotonic_ns()}", workdir,
                                       TesOptions(url=url, storage_prefix=prefix))
            try:
                tracemalloc.start()
                wall, cpu = time.perf_counter(), time.process_time()
                if name == "crank":
                    backend.gather_orphans(set(), {dead})
                    backend.adoption.orphans.take_all()
                else:
                    backend.api.list_tasks(TAG_WORKDIR, workdir_tag(workdir), view="BASIC")
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                samples.append((wall, cpu, peak))
            finally:
                backend.close()
        results[name] = tuple(statistics.median(x[i] for x in samples) for i in range(3))
    return results


def startup(args, s3_env: dict) -> None:
    from snakemake_executor_plugin_crank import runs

    rows = []
    with tempfile.TemporaryDirectory(prefix="crank-startup-") as tmp:
        funnel = OwnFunnel(Path(tmp), s3_env)
        workdir = str(Path(tmp) / "wf")
        os.makedirs(workdir)
        dead = "dead-run"
        try:
            funnel.start("noop")
            for earlier in (0, args.earlier):
                if earlier:
                    workdir_history(funnel.url, workdir, earlier, (dead, runs.origin(workdir)))
                held = scale.server_tasks(funnel.url)
                rows.append((held, measure_start(funnel.url, workdir, dead, args.prefix)))
                print(f"measured with {held} tasks on the server", flush=True)
        finally:
            funnel.stop()
    print("\n| tasks of the workdir | start | wall | crank CPU | peak Python memory |")
    print("| --- | --- | --- | --- | --- |")
    for held, result in rows:
        for name, (wall, cpu, peak) in result.items():
            print(f"| {held} | {name} | {wall * 1000:.0f} ms | {cpu * 1000:.0f} ms | {peak / 2**20:.1f} MiB |")
    held, last = rows[-1]
    (w, c, p), (w0, c0, p0) = last["crank"], last["whole history"]
    print(f"\nwith {held} tasks, the whole history against crank's start: wall {w0 / w:.1f}x, "
          f"CPU {c0 / c:.1f}x, peak memory {p0 / p:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--earlier", type=int, default=None,
                        help="tasks of earlier runs (50,000; 10,000 with --startup)")
    parser.add_argument("--jobs", type=int, default=300, help="jobs of the measured workflow")
    parser.add_argument("--startup", action="store_true", help="measure a run's start instead")
    parser.add_argument("--prefix", default=f"s3://{os.environ.get('CRANK_TEST_BUCKET', 'crank-test')}/history")
    args = parser.parse_args()
    s3_env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    if "AWS_ENDPOINT_URL" not in s3_env:
        sys.exit("set the S3 variables first: set -a; . ~/.cache/crank-test/s3.env; set +a")
    if args.startup:
        args.earlier = 10000 if args.earlier is None else args.earlier
        return startup(args, s3_env)
    args.earlier = 50000 if args.earlier is None else args.earlier
    run_args = SimpleNamespace(profile_dir=None, snakemake_args=[], prefix=args.prefix, timeout=None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="crank-history-") as tmp:
        funnel = OwnFunnel(Path(tmp), s3_env)
        run_args.url = run_args.tes_url = funnel.url
        try:
            funnel.start("local")
            for earlier in (0, args.earlier):
                if earlier:
                    funnel.stop()
                    funnel.start("noop")
                    seconds = fill(funnel.url, earlier)
                    print(f"filled: {earlier} tasks created in {seconds[0]:.0f} s, canceled in "
                          f"{seconds[1]:.0f} s", flush=True)
                    funnel.stop()
                    funnel.start("local")
                held = scale.server_tasks(funnel.url)
                list_ms, get_ms = list_and_get_ms(funnel.url)
                r = scale.run_once("tes", args.jobs, run_args)
                rounds = [x for x in r["rounds"] if x[1] > monitor.FEW]  # the rounds that choose
                mean = lambda i: sum(x[i] for x in rounds) / len(rounds)  # noqa: E731
                watched = sum(x[1] for x in rounds)
                rows.append((held, r, len(rounds), mean(1), sum(x[2] for x in rounds) / watched,
                             sum(x[3] for x in rounds) / watched, mean(4) * 1000, list_ms, get_ms))
                print(f"done: {args.jobs} jobs with {held} tasks on the server", flush=True)
        finally:
            funnel.stop()
    print(f"\nRounds watching more than {monitor.FEW} tasks (fewer are always asked by id):")
    print("| tasks on the server | wall | rounds | watched (mean) | requests per watched task | "
          "bytes per watched task | round wall (mean) | one filtered list | one GetTask |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for held, r, n, watched, requests_, size, wall, list_ms, get_ms in rows:
        print(f"| {held} | {r['wall_s']:.1f} s | {n} | {watched:.0f} | {requests_:.2f} | {size:.0f} | "
              f"{wall:.0f} ms | {list_ms:.1f} ms | {get_ms:.1f} ms |")
    if len(rows) == 2:
        (*_, q0, b0, w0, l0, _), (*_, q1, b1, w1, l1, _) = rows
        print(f"\nwith {args.earlier} earlier tasks against none: requests per watched task {q1 / q0:.2f}x, "
              f"bytes {b1 / b0:.2f}x, round wall {w1 / w0:.2f}x, one filtered list {l1 / l0:.1f}x")


if __name__ == "__main__":
    main()
