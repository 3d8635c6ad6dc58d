"""Host-side costs of the Docker backend that grow with a job's size, measured on the
functions themselves (no engine needed unless --start is given):

  mounts  plan_mounts() for N inputs outside the workdir (default 6,000 real files under
          one directory, as in `ref/part{i}.txt`, and the same number spread over one
          directory each), median of --repeat runs, and the number of mounts planned;
          with --start also the time to create and start a busybox container with
          those mounts (then removed).
  tail    save_logs() of a stderr of 8, 16 and 32 MiB without a newline (a progress bar
          redrawn with \\r), in chunks of 16 KiB as the engine streams them.

--against REV runs the same on the backend modules of an earlier commit (loaded from
`git show REV:...`), for a before/after comparison on the same machine and minute.

  python3 bench/docker_planning.py
  python3 bench/docker_planning.py --against 28ddb4c --start
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import types
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from snakemake_executor_plugin_crank.backends.docker import mounts as mounts_now  # noqa: E402
from snakemake_executor_plugin_crank.backends import logs as logs_now  # noqa: E402
from snakemake_executor_plugin_crank.task import TaskSpec  # noqa: E402

PACKAGE = "snakemake_executor_plugin_crank.backends"
IMAGE = "crank-test/busybox:1"


def module_at(rev: str, name: str) -> types.ModuleType:
    """backends/<name>.py as it was at ``rev``, importable beside today's modules."""
    source = subprocess.run(
        ["git", "show", f"{rev}:snakemake_executor_plugin_crank/backends/{name}.py"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    package = ".".join([PACKAGE, *name.split("/")[:-1]])
    spec = importlib.util.spec_from_loader(f"{package}._{name.split('/')[-1]}_at_{rev}", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = package
    sys.modules[spec.name] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:{name}.py", "exec"), module.__dict__)
    return module


def planner_at(rev: str) -> types.ModuleType:
    """The module with plan_mounts at ``rev``: docker/mounts.py, before it docker.py."""
    try:
        return module_at(rev, "docker/mounts")
    except subprocess.CalledProcessError:
        return module_at(rev, "docker")


def median_s(action, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def bench_mounts(label, planner, n, repeat, start):
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp, "wd")
        workdir.mkdir()
        layouts = {}
        flat = Path(tmp, "ref")
        flat.mkdir()
        layouts["one directory"] = [flat / f"part{i}.txt" for i in range(n)]
        spread = Path(tmp, "spread")
        layouts["a directory each"] = [spread / f"s{i}" / "f.txt" for i in range(n)]
        for paths in layouts.values():
            for path in paths:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("x")
        for layout, paths in layouts.items():
            inputs = [str(p) for p in paths]
            plan = planner.plan_mounts(str(workdir), inputs, [str(workdir / "out.txt")])
            seconds = median_s(
                lambda: planner.plan_mounts(str(workdir), inputs, [str(workdir / "out.txt")]),
                repeat,
            )
            line = f"{label:>8}  mounts  {n} inputs, {layout}: {len(plan)} mounts, plan {seconds * 1000:.0f} ms"
            if start:
                line += f", container create+start {start_with(plan, str(workdir)):.2f} s"
            print(line, flush=True)


def start_with(plan, workdir) -> float:
    """Seconds to create and start a container with these mounts (removed after)."""
    import docker

    api = docker.from_env(timeout=600).api
    mounts = [docker.types.Mount(target=p, source=p, type="bind", read_only=not rw) for p, rw in plan]
    name = f"crank-bench-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    try:
        cid = api.create_container(IMAGE, ["true"], name=name, working_dir=workdir,
                                   host_config=api.create_host_config(mounts=mounts))["Id"]
        api.start(cid)
        return time.perf_counter() - started
    finally:
        api.remove_container(name, force=True)
        api.close()


def bench_tail(label, logs_module, repeat):
    chunk = (b"\r[#####     ] 50% " * 1024)[: 16 * 1024]
    with tempfile.TemporaryDirectory() as tmp:
        task = TaskSpec(name="bar", label="rule bar", job_id="1", attempt=1, image=IMAGE,
                        script="true", workdir=tmp, log_dir=str(Path(tmp, "logs")))
        for mib in (8, 16, 32):
            count = mib * 1024 * 1024 // len(chunk)
            seconds = median_s(lambda: logs_module.save_logs(task, [b"out"], (chunk for _ in range(count))), repeat)
            print(f"{label:>8}  tail    {mib} MiB without a newline: {seconds:.2f} s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", metavar="REV", help="also measure the modules of this commit")
    parser.add_argument("-n", type=int, default=6000, help="inputs (default 6000)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--start", action="store_true", help="also start a container with the mounts")
    parser.add_argument("--only", choices=("mounts", "tail"))
    args = parser.parse_args()
    variants = [("now", mounts_now, logs_now)]
    if args.against:
        variants.insert(0, (args.against[:8], planner_at(args.against), module_at(args.against, "logs")))
    for label, planner, logs_module in variants:
        if args.only != "tail":
            bench_mounts(label, planner, args.n, args.repeat, args.start)
        if args.only != "mounts":
            bench_tail(label, logs_module, args.repeat)


if __name__ == "__main__":
    main()
