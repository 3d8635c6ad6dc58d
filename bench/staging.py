"""Staging to object storage against SeaweedFS (`python3 tests/services.py start`, its s3.env).

1. 1 GiB of inputs (8 x 128 MiB random files): crank's first stage vs a raw obstore upload of
   the same bytes to the same server (obstore.put of each file, its defaults), alternated
   --repeat times, medians; throughput ratio (target >= 0.9x).
2. The second run with unchanged inputs: bytes sent (target 0) and time vs the first (<= 2%).
3. With --rss-gib N (5 for the issue's figure): peak RSS of a child process staging N GiB,
   above its idle peak after imports (target <= 100 MB).
4. Hash throughput: crank's streamed sha256_file vs hashlib.sha256 alone over the same bytes
   already in memory (the physical limit).

Every object it writes is deleted at the end; with SeaweedFS's `weed` on PATH the freed space is
reclaimed too. Run: python3 bench/staging.py [--rss-gib 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import obstore  # noqa: E402
from obstore.store import from_url  # noqa: E402

from snakemake_executor_plugin_crank.staging.digest import RACY_NS, DigestCache, sha256_file  # noqa: E402
from snakemake_executor_plugin_crank.staging.stage import Stager  # noqa: E402
from snakemake_executor_plugin_crank.staging.store import Store  # noqa: E402

MiB = 1 << 20
FILE_SIZE = 128 * MiB
FILES = 8

RSS_CHILD = """
import os, sys, time
from snakemake_executor_plugin_crank.staging.digest import DigestCache
from snakemake_executor_plugin_crank.staging.stage import Stager
from snakemake_executor_plugin_crank.staging.store import Store

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

prefix, cache, *paths = sys.argv[1:]
stager = Stager(Store.from_url(prefix), DigestCache(cache))
idle = hwm()
start = time.monotonic()
stager.stage(paths)
print(idle, hwm(), stager.stats.bytes_sent, time.monotonic() - start)
"""


def load_env() -> dict[str, str]:
    """The AWS_* variables of the test server's s3.env into the environment; all its values."""
    state = Path(os.environ.get("CRANK_TEST_STATE") or Path.home() / ".cache" / "crank-test")
    env_file = state / "s3.env"
    if not env_file.is_file():
        sys.exit(f"no {env_file}: run python3 tests/services.py start first")
    values = {}
    for line in env_file.read_text().splitlines():
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep:
            values[key] = value
    os.environ.update({k: v for k, v in values.items() if k.startswith("AWS_")})
    return values


def make_files(directory: Path, count: int, tag: str) -> list[str]:
    """``count`` distinct files of FILE_SIZE: one random block, each copy with its own first bytes
    (as costly to hash and send as fully random files, much cheaper to make)."""
    block = bytearray(os.urandom(FILE_SIZE))
    paths = []
    for i in range(count):
        block[:32] = hashlib.sha256(f"{tag}-{i}-{uuid.uuid4()}".encode()).digest()
        path = directory / f"{tag}{i:03d}"
        path.write_bytes(block)
        os.utime(path, (time.time() - 3600,) * 2)
        paths.append(str(path))
    # settled, so that the digest cache keeps them: its key includes the ctime, which utime
    # cannot set back, and it keeps no file changed in the last RACY_NS
    time.sleep(max(0.0, RACY_NS / 1e9 - (time.time() - os.stat(paths[-1]).st_ctime)))
    return paths


def raw_upload(prefix: str, paths: list[str]) -> float:
    store = from_url(prefix, client_options={"allow_http": True})
    start = time.perf_counter()
    for p in paths:
        obstore.put(store, os.path.basename(p), Path(p))
    return time.perf_counter() - start


def crank_stage(prefix: str, cache: str, paths: list[str]) -> tuple[float, Stager]:
    stager = Stager(Store.from_url(prefix), DigestCache(cache))
    start = time.perf_counter()
    stager.stage(paths)
    elapsed = time.perf_counter() - start
    stager.close()
    return elapsed, stager


def remove_prefix(prefix: str) -> None:
    store = from_url(prefix, client_options={"allow_http": True})
    keys = [m["path"] for batch in obstore.list(store) for m in batch]
    for i in range(0, len(keys), 500):
        obstore.delete(store, keys[i:i + 500])


def reclaim_space() -> None:
    """SeaweedFS keeps deleted bytes in its volumes until they are vacuumed."""
    if shutil.which("weed"):
        subprocess.run(
            ["weed", "shell", "-master=127.0.0.1:19333"], input="lock\nvolume.vacuum -garbageThreshold 0.01\nunlock\n",
            text=True, capture_output=True, timeout=600, check=False,
        )


def mib_s(nbytes: int, seconds: float) -> float:
    return nbytes / MiB / seconds


def throughput(bucket: str, tmp: Path, repeat: int, prefixes: list[str]) -> None:
    total = FILES * FILE_SIZE
    raw_times, stage_times, stagers = [], [], []
    for r in range(repeat):
        # fresh bytes each round: the first stage must really send everything
        paths = make_files(tmp, FILES, f"r{r}-")
        raw_prefix = f"s3://{bucket}/bench-raw-{uuid.uuid4().hex}"
        stage_prefix = f"s3://{bucket}/bench-stage-{uuid.uuid4().hex}"
        prefixes += [raw_prefix, stage_prefix]
        cache = str(tmp / f"digests-{r}.sqlite")
        if r % 2 == 0:  # alternate the order: neither always gets the warmer server
            raw_times.append(raw_upload(raw_prefix, paths))
            stage_times.append(crank_stage(stage_prefix, cache, paths)[0])
        else:
            stage_times.append(crank_stage(stage_prefix, cache, paths)[0])
            raw_times.append(raw_upload(raw_prefix, paths))
        stagers.append((stage_prefix, cache, paths))
        print(f"  round {r + 1}: raw {mib_s(total, raw_times[-1]):.0f} MiB/s, "
              f"crank {mib_s(total, stage_times[-1]):.0f} MiB/s", flush=True)
        remove_prefix(raw_prefix)
    raw, first = statistics.median(raw_times), statistics.median(stage_times)
    print(f"1. first stage of 1 GiB ({FILES} x {FILE_SIZE // MiB} MiB), medians of {repeat}: "
          f"raw obstore {mib_s(total, raw):.0f} MiB/s, crank {mib_s(total, first):.0f} MiB/s, "
          f"ratio {raw / first:.2f}x (target >= 0.9)")

    # 2. unchanged inputs, a new run in the same workdir: digest cache, and its record of the store
    stage_prefix, cache, paths = stagers[-1]
    second, stager = crank_stage(stage_prefix, cache, paths)
    print(f"2. second run, unchanged: {stager.stats.bytes_sent} bytes sent, {second * 1000:.1f} ms = "
          f"{100 * second / stage_times[-1]:.2f}% of the first run (target 0 bytes, <= 2%)")
    for p in paths:
        os.unlink(p)


def peak_rss(bucket: str, tmp: Path, gib: int, prefixes: list[str]) -> None:
    count = gib * 1024 * MiB // FILE_SIZE
    paths = make_files(tmp, count, "rss-")
    prefix = f"s3://{bucket}/bench-rss-{uuid.uuid4().hex}"
    prefixes.append(prefix)
    out = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, prefix, str(tmp / "rss.sqlite"), *paths],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    idle, peak, sent, seconds = int(out[0]), int(out[1]), int(out[2]), float(out[3])
    print(f"3. staging {gib} GiB ({count} files, {mib_s(sent, seconds):.0f} MiB/s): peak RSS "
          f"{peak / 1e6:.0f} MB, idle {idle / 1e6:.0f} MB, +{(peak - idle) / 1e6:.0f} MB (target <= 100 MB)")
    for p in paths:
        os.unlink(p)
    remove_prefix(prefix)


def hashing(tmp: Path) -> None:
    [path] = make_files(tmp, 1, "hash-")
    data = Path(path).read_bytes()  # also leaves the file in the page cache for sha256_file
    plain = min(_timed(lambda: hashlib.sha256(data).hexdigest()) for _ in range(5))
    streamed = min(_timed(lambda: sha256_file(path)) for _ in range(5))
    del data
    print(f"4. sha256 of {FILE_SIZE // MiB} MiB: hashlib alone {mib_s(FILE_SIZE, plain):.0f} MiB/s, "
          f"crank's streamed sha256_file {mib_s(FILE_SIZE, streamed):.0f} MiB/s "
          f"({plain / streamed:.2f}x of the limit)")
    os.unlink(path)


def _timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds of part 1 (default 3)")
    parser.add_argument("--rss-gib", type=int, default=0, help="GiB to stage for the peak RSS (default: skip)")
    args = parser.parse_args()
    bucket = load_env()["CRANK_TEST_BUCKET"]
    print(f"machine: {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB; "
          f"server {os.environ.get('AWS_ENDPOINT_URL')}", flush=True)
    prefixes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="crank-bench-") as tmp:
        try:
            throughput(bucket, Path(tmp), args.repeat, prefixes)
            if args.rss_gib:
                peak_rss(bucket, Path(tmp), args.rss_gib, prefixes)
            hashing(Path(tmp))
        finally:
            for prefix in prefixes:
                remove_prefix(prefix)
            reclaim_space()


if __name__ == "__main__":
    main()
