"""Staging a cohort of many small inputs against SeaweedFS (`python3 tests/services.py start`).

N files (default 100,000) of sizes spread log-uniformly over 1 KiB-1 MiB (about 148 KiB on
average, 14.5 GiB for 100,000), in directories of 1,000:

1. A raw parallel upload of the files with obstore (obstore.put of each file from as many
   threads as the Stager has workers) vs crank's first stage of them (fresh prefix and digest
   cache, so every file is hashed, looked up and sent): the ratio (target >= 0.8x). Both go
   slice by slice (--slices, a crank process each), alternating which goes first.
2. The unchanged rerun in a new process, as a rerun of the workflow is: bytes sent (target 0),
   store requests (target <= 1 per 100 files), on the client and as the server counted them,
   and its time against the first stage's (target <= 5%). The same rerun with the database's
   record of the store ignored and no listing shows what it cost before (a HEAD per file).

It works in a bucket of its own (the server's counters are per bucket), deleted at the end with
the generated files (the raw upload: in a bucket per slice, deleted after it); with SeaweedFS's `weed` on PATH the freed space is reclaimed too.
Run: nice -n 19 python3 bench/cohort.py [--files 100000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import obstore  # noqa: E402
from obstore.store import from_url  # noqa: E402

from snakemake_executor_plugin_crank.staging.digest import RACY_NS  # noqa: E402
from staging import load_env, mib_s, reclaim_space, remove_prefix  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
WORKERS = 8  # the Stager's default
PER_DIR = 1000

# A run of crank in a new process: stages the listed files and says what it cost.
RUN = """
import json, sys, time
from snakemake_executor_plugin_crank.staging.digest import DigestCache
from snakemake_executor_plugin_crank.staging import stage
from snakemake_executor_plugin_crank.staging.stage import Stager
from snakemake_executor_plugin_crank.staging.store import Store

prefix, cache, listing, remembered = sys.argv[1:]
paths = open(listing).read().split("\\n")
if remembered == "ignored":  # as before: no record of the store is read, no group listed
    DigestCache.stored = lambda self, store, key: False
    stage.LIST_FROM = float("inf")
stager = Stager(Store.from_url(prefix), DigestCache(cache), workers=%d)
calls = {}
for name in ("head", "list_group", "put_file", "put_bytes", "copy", "list", "get_file"):
    def counted(*args, _original=getattr(stager.store, name), _name=name, **kwargs):
        calls[_name] = calls.get(_name, 0) + 1
        return _original(*args, **kwargs)
    setattr(stager.store, name, counted)
start = time.perf_counter()
stager.stage(paths)
seconds = time.perf_counter() - start
stager.close()
print(json.dumps({"seconds": seconds, "sent": stager.stats.bytes_sent, "calls": calls,
                  "hashed": stager.cache.misses}))
""" % WORKERS


def sizes(count: int, seed: int = 20) -> list[int]:
    rng = random.Random(seed)
    low, high = math.log(KiB), math.log(MiB)
    return [int(math.exp(rng.uniform(low, high))) for _ in range(count)]


def make_files(directory: Path, count: int) -> list[str]:
    """Distinct files: slices of one random block, each with its own first 32 bytes."""
    block = bytearray(os.urandom(2 * MiB))
    paths, old = [], time.time() - 3600
    for i, size in enumerate(sizes(count)):
        sub = directory / f"d{i // PER_DIR:03d}"
        if i % PER_DIR == 0:
            sub.mkdir()
        offset = (i * 7919) % MiB
        data = hashlib.sha256(f"{i}-{uuid.uuid4()}".encode()).digest() + block[offset:offset + size - 32]
        path = sub / f"f{i:06d}"
        path.write_bytes(data[:size])
        os.utime(path, (old, old))
        paths.append(str(path))
    # settled, so that the digest cache keeps them (it keeps no file changed in the last RACY_NS)
    time.sleep(max(0.0, RACY_NS / 1e9 - (time.time() - os.stat(paths[-1]).st_ctime)))
    return paths


def make_bucket(name: str, create: bool) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name=os.environ.get("AWS_REGION", "us-east-1"),
        config=Config(s3={"addressing_style": "path"}))
    try:
        client.create_bucket(Bucket=name) if create else client.delete_bucket(Bucket=name)
    finally:
        client.close()


def server_requests(metrics: str, bucket: str) -> int:
    """Every request the server counted for ``bucket`` (a HEAD counts as a GET)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(metrics, timeout=10).read().decode()
    return sum(int(float(value)) for value in
               re.findall(r'^SeaweedFS_s3_request_total\{[^}]*bucket="%s"[^}]*\} (\S+)$' % re.escape(bucket), text, re.M))


def raw_upload(prefix: str, paths: list[str]) -> float:
    store = from_url(prefix, client_options={"allow_http": True})
    start = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(lambda p: obstore.put(store, p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1], Path(p)),
                      paths))
    return time.perf_counter() - start


def crank_run(prefix: str, cache: Path, listing: Path, remembered: str = "read") -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", RUN, prefix, str(cache), str(listing), remembered],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {**json.loads(out), "process": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000, help="files in the cohort (default 100,000)")
    parser.add_argument("--slices", type=int, default=10, help="first stages of a slice each, alternated with "
                        "the raw upload of the same slice (default 10)")
    args = parser.parse_args()
    metrics = load_env()["CRANK_TEST_S3_METRICS"]
    # a stopped benchmark still deletes its bucket and its 14 GiB of files
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    bucket = f"crank-bench-{uuid.uuid4().hex[:12]}"
    print(f"machine: {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB, "
          f"load {os.getloadavg()[0]:.1f}; server {os.environ.get('AWS_ENDPOINT_URL')}", flush=True)
    make_bucket(bucket, create=True)
    stage_prefix = f"s3://{bucket}/stage"
    try:
        with tempfile.TemporaryDirectory(prefix="crank-cohort-") as tmp:
            start = time.perf_counter()
            paths = make_files(Path(tmp), args.files)
            total = sum(os.path.getsize(p) for p in paths)
            listing = Path(tmp) / "inputs.txt"
            listing.write_text("\n".join(paths))
            print(f"{args.files} files, 1 KiB-1 MiB log-uniform, {total / 2**30:.2f} GiB "
                  f"(mean {total / args.files / KiB:.0f} KiB), made in {time.perf_counter() - start:.0f} s", flush=True)
            cache = Path(tmp) / "digests.sqlite"

            # slice by slice, alternating which goes first: the machine's load changes by the
            # minute, and both should see the same
            raw = first = 0.0
            first_requests, calls = 0, {}
            step = -(-args.files // args.slices)
            for n, i in enumerate(range(0, args.files, step)):
                part = paths[i:i + step]
                part_listing = Path(tmp) / f"slice{n}.txt"
                part_listing.write_text("\n".join(part))
                for which in (("raw", "crank") if n % 2 == 0 else ("crank", "raw")):
                    if which == "raw":
                        # a bucket per slice, deleted at once: the test server holds 64 volumes,
                        # fewer than the cohort's two copies need (deleting the bucket frees its
                        # volumes, deleting its objects does not)
                        make_bucket(raw_bucket := f"{bucket}-raw{n}", create=True)
                        try:
                            raw += (raw_part := raw_upload(f"s3://{raw_bucket}/raw", part))
                        finally:
                            remove_prefix(f"s3://{raw_bucket}")
                            make_bucket(raw_bucket, create=False)
                        continue
                    before = server_requests(metrics, bucket)
                    run = crank_run(stage_prefix, cache, part_listing)
                    first_requests += server_requests(metrics, bucket) - before
                    first += run["seconds"]
                    calls = {k: calls.get(k, 0) + v for k, v in run["calls"].items()}
                print(f"  slice {n + 1}/{args.slices}: {len(part)} files, raw {raw_part:.1f} s, crank {run['seconds']:.1f} s, "
                      f"load {os.getloadavg()[0]:.0f}", flush=True)
            print(f"  raw parallel upload ({WORKERS} threads): {raw:.1f} s, {mib_s(total, raw):.0f} MiB/s, "
                  f"{args.files / raw:.0f} files/s", flush=True)
            print(f"  crank's first stage: {first:.1f} s, {mib_s(total, first):.0f} MiB/s, "
                  f"{first_requests} requests on the server, client {calls}", flush=True)
            print(f"1. first stage vs raw upload: {raw / first:.2f}x (target >= 0.8)", flush=True)

            for remembered in ("read", "ignored"):
                before = server_requests(metrics, bucket)
                rerun = crank_run(stage_prefix, cache, listing, remembered)
                requests = server_requests(metrics, bucket) - before
                label = "2. unchanged rerun, new process" if remembered == "read" else \
                    "   the same, store's record ignored (as before)"
                print(f"{label}: {rerun['sent']} bytes sent, {requests} requests on the server "
                      f"({100 * requests / args.files:.2f} per 100 files), client {rerun['calls']}, "
                      f"{rerun['hashed']} files hashed, stage() {rerun['seconds']:.2f} s = "
                      f"{100 * rerun['seconds'] / first:.1f}% of the first "
                      f"(process {rerun['process']:.2f} s = {100 * rerun['process'] / first:.1f}%)"
                      + (" (targets 0 bytes, <= 1 per 100, <= 5%)" if remembered == "read" else ""), flush=True)
    finally:
        remove_prefix(stage_prefix)
        make_bucket(bucket, create=False)
        reclaim_space()


if __name__ == "__main__":
    main()
