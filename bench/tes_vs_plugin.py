"""A 100-job workflow on the same Funnel: crank against snakemake-executor-plugin-tes 0.1.3.

    python3 tests/services.py start   # SeaweedFS and Funnel, left running
    set -a; . ~/.cache/crank-test/s3.env; . ~/.cache/crank-test/tes.env; set +a
    python3 bench/tes_vs_plugin.py [--jobs 100] [--plugin-python PATH]

The plugin needs py-tes < 0.5 (crank needs 1.1), so it runs from its own virtual environment
(``--plugin-python``, e.g. a venv made with --system-site-packages holding
snakemake-executor-plugin-tes==0.1.3 and snakemake-storage-plugin-s3), with Snakemake's default
storage provider (S3) and an image with Snakemake. Each command's wall time is printed, or the
first lines that say why it failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

SNAKEFILE = """\
N = {n}

rule all:
    input: expand("out/{{i}}.txt", i=range(N))

# no input: with a default storage provider, Snakemake expects inputs to be in storage already
rule one:
    output: "out/{{i}}.txt"
    shell: "echo {{wildcards.i}} > {{output}}"
"""


def workflow(n: int) -> str:
    d = tempfile.mkdtemp(prefix="crank-bench-")
    with open(os.path.join(d, "Snakefile"), "w") as f:
        f.write(SNAKEFILE.format(n=n))
    os.makedirs(os.path.join(d, "data"))
    with open(os.path.join(d, "data", "in.txt"), "w") as f:
        f.write("input\n")
    return d


def timed(command, cwd, env=None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=env)
    return time.perf_counter() - start, done


def why(done: subprocess.CompletedProcess) -> str:
    lines = [l for l in done.stderr.splitlines() if "Error" in l or "error" in l]
    return " / ".join(lines[-4:])[:600] or done.stderr[-600:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=os.environ.get("CRANK_TEST_TES_URL", "http://127.0.0.1:18000"))
    parser.add_argument("--bucket", default=os.environ.get("CRANK_TEST_BUCKET", "crank-test"))
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--image", default="crank-test/snakemake:9.27.1")
    parser.add_argument("--plugin-python", default=None)
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:8]

    d = workflow(args.jobs)
    seconds, done = timed([
        sys.executable, "-m", "snakemake", "--executor", "crank", "--jobs", "100",
        "--crank-backend", "tes", "--crank-tes-url", args.url,
        "--crank-storage-prefix", f"s3://{args.bucket}/bench-{tag}/crank",
        "--crank-default-image", "crank-test/busybox:1", "--seconds-between-status-checks", "10",
    ], d)
    print(f"crank: {seconds:.1f} s for {args.jobs} jobs" if done.returncode == 0
          else f"crank: FAILED after {seconds:.1f} s: {why(done)}", flush=True)
    shutil.rmtree(d, ignore_errors=True)

    if not args.plugin_python:
        print("snakemake-executor-plugin-tes: not run (no --plugin-python)")
        return
    d = workflow(args.jobs)
    seconds, done = timed([
        args.plugin_python, "-m", "snakemake", "--executor", "tes", "--tes-url", args.url,
        "--jobs", "100", "--default-storage-provider", "s3",
        "--default-storage-prefix", f"s3://{args.bucket}/bench-{tag}/plugin",
        "--storage-s3-endpoint-url", os.environ["AWS_ENDPOINT_URL"],
        "--container-image", args.image,
    ], d, env={**os.environ, "SNAKEMAKE_STORAGE_S3_ACCESS_KEY": os.environ["AWS_ACCESS_KEY_ID"],
               "SNAKEMAKE_STORAGE_S3_SECRET_KEY": os.environ["AWS_SECRET_ACCESS_KEY"]})
    print(f"snakemake-executor-plugin-tes: {seconds:.1f} s" if done.returncode == 0
          else f"snakemake-executor-plugin-tes: FAILED after {seconds:.1f} s: {why(done)}", flush=True)
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
