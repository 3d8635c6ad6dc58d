"""Inputs as the client has them on TES against the former layout, on Funnel and SeaweedFS.

    python3 tests/services.py start   # SeaweedFS and Funnel, left running
    set -a; . ~/.cache/crank-test/s3.env; . ~/.cache/crank-test/tes.env; set +a
    python3 bench/input_layout.py [--rounds 3] [--big-mib 1024] [--small 1000] [--image IMAGE]

Two cases, each in a fresh directory: 1,000 inputs of 1 KiB, and 2 inputs of 1 GiB.

- Staging: ``Stager.stage`` of the inputs into an empty prefix (hash, upload), and again with
  a new Stager and the same digest cache (a later run). Staging sends the same bytes as
  before; what changed is its plan (``staging/tree.py``: one lstat per entry, links kept),
  timed against what the former walk did for the same files (one stat per file).
- Task start: one task per layout, alternated --rounds times, all fetching the same stored
  objects: from the moment the server's worker takes it to its command's first line, split
  into the server's part (to the executor's start, as the task's logs say: fetching the
  inputs) and the script's (the executor's start to the command: the container's start and
  the setup before the command). The time a task waits for a worker (up to Funnel's polling
  interval) is the same for both and left out. The former layout fetched each distinct content to
  ``/crank/in/<sha256>`` and linked each path to it; the new one has the server fetch each
  file to its own path and the script give it its mode and time. Medians, and their ratio.

Objects it writes stay under a prefix of their own (``bench-layout-<uuid>``), deleted at the end.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import tempfile
import time
import uuid

import requests
import tes
from tes.utils import unmarshal

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from snakemake_executor_plugin_crank.backends.tes import layout  # noqa: E402
from snakemake_executor_plugin_crank.backends.tes.backend import TesOptions  # noqa: E402
from snakemake_executor_plugin_crank.backends.tes.tasks import task_body, to_tes_task  # noqa: E402
from snakemake_executor_plugin_crank.backends.tes.opening import open_tes_backend  # noqa: E402
from snakemake_executor_plugin_crank.staging import tree  # noqa: E402
from snakemake_executor_plugin_crank.staging.digest import DigestCache  # noqa: E402
from snakemake_executor_plugin_crank.staging.stage import Stager  # noqa: E402
from snakemake_executor_plugin_crank.staging.store import Store  # noqa: E402
from snakemake_executor_plugin_crank.task import FILE_LAUNCHER, Input, TaskSpec  # noqa: E402

# the command's first line: when it started, on the clock the host reads too
COMMAND = "cat /proc/uptime"


def boot_time() -> float:
    with open("/proc/uptime") as f:
        return time.time() - float(f.read().split()[0])


def make_inputs(root: str, count: int, size: int) -> list:
    os.makedirs(root)
    paths = []
    for i in range(count):
        path = os.path.join(root, f"in-{i:04d}.dat")
        with open(path, "wb") as f:
            left = size
            while left:
                block = os.urandom(min(left, 8 << 20))
                f.write(block)
                left -= len(block)
        paths.append(path)
    return paths


def former_task(task: TaskSpec, staged, out_url: str) -> tes.Task:
    """The former layout: each distinct content at /crank/in/<sha256>, each path a link to it."""
    q = shlex.quote
    inputs, lines = {}, ["set -u"]
    for s in staged:
        if s.url:
            inputs[s.digest] = tes.Input(url=s.url, path=f"{layout.IN}/{s.digest}", type="FILE")
    lines.append("mkdir -p " + " ".join(sorted({q(os.path.dirname(s.path)) for s in staged if s.url})))
    lines += [f"ln -sfn {layout.IN}/{s.digest} {q(s.path)}" for s in staged if s.url]
    lines.append(f"cd {q(task.workdir)} && /bin/sh -c {q(FILE_LAUNCHER)} crank {layout.COMMAND}")
    dirs = [task.workdir] + [os.path.dirname(s.path) for s in staged if s.url]
    return tes.Task(
        name=task.name, inputs=[*inputs.values(),
                                tes.Input(path=layout.WRAPPER, content="\n".join(lines) + "\n", type="FILE"),
                                tes.Input(path=layout.COMMAND, content=task.script, type="FILE")],
        outputs=[tes.Output(path=layout.OUT, url=out_url, type="DIRECTORY")],
        executors=[tes.Executor(image=task.image, command=["/bin/sh", layout.WRAPPER],
                                stdout=layout.STDOUT, stderr=layout.STDERR)],
        volumes=layout.volumes(dirs), tags={"crank-bench": "input-layout"})


def when(stamp) -> float:
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=datetime.timezone.utc)).timestamp()


def run_task(url: str, body: dict, store: Store, key: str, boot: float) -> tuple:
    """(the server's part, the script's part, in all) of one task's start, in seconds."""
    created = requests.post(f"{url}/v1/tasks", json=body, timeout=60).json()["id"]
    deadline = time.monotonic() + 1800
    while True:
        full = requests.get(f"{url}/v1/tasks/{created}", params={"view": "FULL"}, timeout=60).json()
        if full["state"] in ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED"):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"task {created} did not end within 30 minutes")
        time.sleep(0.2)
    if full["state"] != "COMPLETE":
        raise SystemExit(f"task {created} ended {full['state']}: {full['logs'][-1].get('system_logs')}")
    parsed = unmarshal(full, tes.Task)
    # from when the worker took the task: its queueing (up to Funnel's polling interval) is
    # the same for both layouts and only adds noise
    started = when(parsed.logs[-1].start_time)
    executor_start = when(parsed.logs[-1].logs[-1].start_time)
    with tempfile.TemporaryDirectory() as d:
        store.get_file(f"{key}/stdout", os.path.join(d, "stdout"))
        with open(os.path.join(d, "stdout")) as f:
            command_start = boot + float(f.read().split()[0])
    return executor_start - started, command_start - executor_start, command_start - started


def case(args, name: str, count: int, size: int) -> None:
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        workdir = os.path.join(root, "wf")
        paths = make_inputs(os.path.join(workdir, "data"), count, size)
        prefix = f"{args.prefix}/bench-layout-{uuid.uuid4().hex}"
        store = Store.from_url(prefix)
        try:
            stage_times = []
            for attempt in ("first", "again"):
                stager = Stager(store, DigestCache(os.path.join(root, "digests.sqlite")))
                start = time.perf_counter()
                stager.stage(paths)
                stage_times.append(time.perf_counter() - start)
                stager.close()
            plan_new = timed(lambda: tree.plan(paths))
            plan_old = timed(lambda: [os.stat(p) for p in paths])
            print(f"{name}: staging {stage_times[0]:.2f} s (first), {stage_times[1]:.2f} s (again); "
                  f"its plan {plan_new * 1000:.1f} ms against one stat per file {plan_old * 1000:.1f} ms "
                  f"({plan_new / plan_old:.1f}x)", flush=True)

            backend = open_tes_backend(uuid.uuid4().hex, workdir, TesOptions(url=args.url, storage_prefix=prefix))
            boot = boot_time()
            results = {"former": [], "new": []}
            try:
                task = TaskSpec(name="layout", label="rule layout", job_id="1", attempt=1, image=args.image,
                                script=COMMAND, workdir=workdir, inputs=tuple(Input(p) for p in paths),
                                log_dir=os.path.join(root, "logs"))
                staged = backend._stage(task)
                for n in range(args.rounds):
                    for kind in (("former", "new") if n % 2 == 0 else ("new", "former")):
                        key = f"runs/{uuid.uuid4().hex}"
                        out = store.url(key)
                        built = (former_task(task, staged, out) if kind == "former"
                                 else to_tes_task(task, staged, out, {"crank-bench": "input-layout"}))
                        results[kind].append(run_task(args.url, task_body(built), store, key, boot))
            finally:
                backend.close()
            med = {k: [statistics.median(r[i] for r in v) for i in range(3)] for k, v in results.items()}
            for kind in ("former", "new"):
                server, script, total = med[kind]
                print(f"  {kind:6}: server {server:.2f} s, script {script:.2f} s, in all {total:.2f} s", flush=True)
            print(f"  new/former in all: {med['new'][2] / med['former'][2]:.2f}x "
                  f"(server {med['new'][0] / med['former'][0]:.2f}x, script {med['new'][1] / med['former'][1]:.2f}x)",
                  flush=True)
        finally:
            for k, _ in store.list(""):
                store.delete(k)


def timed(fn, repeat: int = 5) -> float:
    best = None
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best = took if best is None else min(best, took)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=os.environ.get("CRANK_TEST_TES_URL", "http://127.0.0.1:18000"))
    parser.add_argument("--prefix", default=f"s3://{os.environ.get('CRANK_TEST_BUCKET', 'crank-test')}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", type=int, default=1000, help="inputs of 1 KiB")
    parser.add_argument("--big-mib", type=int, default=1024, help="size of each of the 2 large inputs")
    parser.add_argument("--dir", default=None, help="where the inputs are written (default: a temporary directory)")
    parser.add_argument("--image", default="crank-test/busybox:1",
                        help="the tasks' image (busybox: touch and chmod run in its shell; coreutils: a process each)")
    parser.add_argument("--cases", default="small,big", help="small (the 1 KiB inputs), big (the 2 large ones)")
    args = parser.parse_args()
    cases = args.cases.split(",")
    if "small" in cases:
        case(args, f"{args.small} inputs of 1 KiB", args.small, 1024)
    if "big" in cases:
        case(args, f"2 inputs of {args.big_mib} MiB", 2, args.big_mib << 20)


if __name__ == "__main__":
    main()
