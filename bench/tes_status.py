"""Status requests and crank CPU time per round on a TES server, for 1, 100 and 1000 tasks.

    python3 tests/services.py start   # SeaweedFS and Funnel, left running
    set -a; . ~/.cache/crank-test/s3.env; . ~/.cache/crank-test/tes.env; set +a
    python3 bench/tes_status.py [--counts 1,100,1000] [--rounds 20]

For each count N: N tasks are submitted through TesBackend (one run tag), then ``poll()`` is
timed over several rounds: wall time, crank's CPU time (process time) and the HTTP requests it
made, against the naive alternative of one GetTask(MINIMAL) per task. Up to --running tasks
are ``sleep`` containers that stay RUNNING; above that, tasks name an image the engine lacks so
that Funnel ends them at once (2 cores cannot run 1000 containers). Since rounds follow the
watched tasks only (lists of the active states, a GetTask for each watched task they miss),
such ended tasks, which this benchmark never releases, cost one GetTask each per round: that
row measures those lookups, not a round of a run, which releases a task once it ended
(bench/scale.py measures rounds in whole runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from snakemake_executor_plugin_crank.backends.tes.backend import TesOptions  # noqa: E402
from snakemake_executor_plugin_crank.backends.tes.tasks import TAG_RUN  # noqa: E402
from snakemake_executor_plugin_crank.backends.tes.opening import open_tes_backend  # noqa: E402
from snakemake_executor_plugin_crank.task import Resources, TaskSpec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=os.environ.get("CRANK_TEST_TES_URL", "http://127.0.0.1:18000"))
    parser.add_argument("--prefix", default=f"s3://{os.environ.get('CRANK_TEST_BUCKET', 'crank-test')}/bench")
    parser.add_argument("--counts", default="1,100,1000")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--running", type=int, default=100, help="most sleep tasks to keep running")
    args = parser.parse_args()

    print("| tasks | requests per round | poll() wall (median) | crank CPU per round | "
          "one GetTask per task (wall) | bytes of the round's lists | bytes of a live-log look |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in (int(c) for c in args.counts.split(",")):
        with tempfile.TemporaryDirectory() as workdir:
            row = measure(args, n, workdir)
        print(f"| {n} | {row[0]} | {row[1] * 1000:.1f} ms | {row[2] * 1000:.1f} ms | {row[3] * 1000:.0f} ms "
              f"| {row[4]} | {row[5]} |", flush=True)


def measure(args, n: int, workdir: str):
    backend = open_tes_backend(uuid.uuid4().hex, workdir, TesOptions(url=args.url, storage_prefix=args.prefix,
                                                                     submit_workers=8))
    try:
        image = "crank-test/busybox:1" if n <= args.running else "crank-test/absent-bench:1"
        tasks = [
            TaskSpec(name=f"s-{i}", label="rule s", job_id=str(i), attempt=1, image=image,
                     script="sleep 900", workdir=workdir, resources=Resources(),
                     log_dir=os.path.join(workdir, "logs"))
            for i in range(n)
        ]
        handles = [backend.submit(t) for t in tasks]
        deadline = time.monotonic() + 600
        while not all(backend._subs[h].tes_id for h in handles):
            if time.monotonic() > deadline:
                raise SystemExit("tasks not created within 600 s")
            time.sleep(0.2)
        walls, cpus, requests = [], [], []
        backend.tails.round = lambda running: None  # timed apart below
        for _ in range(args.rounds):
            before = sum(backend.http.counts.values())
            c0, w0 = time.process_time(), time.perf_counter()
            backend.poll(handles)
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
            requests.append(sum(backend.http.counts.values()) - before)
        ids = [backend._subs[h].tes_id for h in handles]
        w0 = time.perf_counter()
        for task_id in ids:
            backend.http.request("GET", f"/v1/tasks/{task_id}", "get", params={"view": "MINIMAL"})
        naive = time.perf_counter() - w0
        # what a status round's lists carry (MINIMAL, the active states), against the one FULL
        # list of the RUNNING tasks that live logs add every few seconds (tails.py)
        lists = sum(_bytes(backend, "MINIMAL", state) for state in ("RUNNING", "QUEUED", "INITIALIZING"))
        return max(requests), statistics.median(walls), statistics.median(cpus), naive, lists, \
            _bytes(backend, "FULL", "RUNNING")
    finally:
        backend.close()


def _bytes(backend, view: str, state: str) -> int:
    """The bytes of the answers to one tagged list of the run's tasks in ``state``."""
    total, token = 0, None
    while True:
        params = {"view": view, "state": state, "tag_key": TAG_RUN, "tag_value": backend.run_id,
                  "page_size": 2048, **({"page_token": token} if token else {})}
        response = backend.http.session.get(backend.http.base + "/v1/tasks", params=params, timeout=60)
        total += len(response.content)
        token = response.json().get("next_page_token")
        if not token:
            return total


if __name__ == "__main__":
    main()
