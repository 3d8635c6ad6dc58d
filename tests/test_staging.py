"""Staging to object storage: pure logic, and against the real SeaweedFS S3 server that
tests/services.py starts (credentials enforced). Each test works under its own uuid prefix."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import obstore
import pytest
from obstore.store import from_url as obstore_from_url

from snakemake_executor_plugin_crank.errors import BackendUnavailable, CrankError
from snakemake_executor_plugin_crank.staging import digest as digest_module
from snakemake_executor_plugin_crank.staging import stage as stage_module
from snakemake_executor_plugin_crank.staging import store as store_module
from snakemake_executor_plugin_crank.staging.digest import DigestCache, Stopped, sha256_file
from snakemake_executor_plugin_crank.staging.cas import cas_digest, dir_key, file_key, manifest_bytes
from snakemake_executor_plugin_crank.staging.stage import Stager, is_remote
from snakemake_executor_plugin_crank.staging.store import PART_SIZE, ContentChanged, Store

from conftest import wait_for

OLD = 1_600_000_000  # an mtime well in the past: the digest cache only keeps settled files
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def settled(monkeypatch):
    """Files the test wrote count as settled at once. The digest cache keeps no file changed
    in the last 2 s, and a test can set an old mtime but never an old ctime."""
    monkeypatch.setattr(digest_module, "RACY_NS", 0)


def wait_settled(paths) -> None:
    """For other processes, which the ``settled`` fixture does not reach."""

    def changed_last(p):
        st = os.stat(p)
        return max(st.st_mtime_ns, st.st_ctime_ns)

    wait_for(lambda: time.time_ns() - max(map(changed_last, paths)) > digest_module.RACY_NS,
             10, "the files to be older than the digest cache's racy window")


def write(path: Path, data: bytes, settled: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if settled:
        os.utime(path, (OLD, OLD))
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- pure logic


def test_key_layout_no_key_is_a_prefix_of_another():
    keys = [file_key(sha(bytes([i]))) for i in range(50)] + [dir_key(sha(bytes([i]))) for i in range(50)]
    assert len({len(k) for k in keys if k.startswith("cas/sha256/")}) == 1
    assert not [a for a in keys for b in keys if a != b and b.startswith(a)]
    assert file_key("a" * 64) == "cas/sha256/" + "a" * 64
    assert cas_digest(file_key("0f" * 32)) == "0f" * 32
    assert cas_digest(dir_key("0f" * 32)) is None
    assert cas_digest("runs/x/y") is None


def test_remote_inputs_are_recognised():
    assert is_remote("s3://b/k") and is_remote("gs://b/k") and is_remote("https://h/x")
    assert not is_remote("/abs/file") and not is_remote("rel/file") and not is_remote("file:///x")


def test_manifest_is_canonical():
    a = {"path": "a", "size": 1, "sha256": "x", "mode": 0o644}
    b = {"path": "b/c", "size": 2, "sha256": "y", "mode": 0o755}
    assert manifest_bytes([b, a]) == manifest_bytes([a, b])
    assert json.loads(manifest_bytes([b, a]))[0]["path"] == "a"


def test_digest_cache_hits_and_invalidation(tmp_path, settled):
    cache = DigestCache(str(tmp_path / ".snakemake" / "crank" / "digests.sqlite"))
    f = write(tmp_path / "f", b"one")
    assert cache.digest(str(f)) == sha(b"one") == sha256_file(str(f))
    assert cache.digest(str(f)) == sha(b"one")
    assert (cache.hits, cache.misses) == (1, 1)

    # same size, content changed in place: the mtime changes, so does the digest
    f.write_bytes(b"two")
    os.utime(f, (OLD + 1, OLD + 1))
    assert cache.digest(str(f)) == sha(b"two")
    # a new file under the same name (new inode), same size and mtime
    replacement = write(tmp_path / "g", b"333")
    os.utime(replacement, (OLD + 1, OLD + 1))
    os.replace(replacement, f)
    assert cache.digest(str(f)) == sha(b"333")
    assert cache.misses == 3

    # reached through a symlink: the same entry (keyed by the real path)
    (tmp_path / "link").symlink_to(f)
    assert cache.digest(str(tmp_path / "link")) == sha(b"333")
    assert cache.hits == 2


def _open_cache_at_once(path, barrier):
    barrier.wait()
    try:
        DigestCache(path).close()
        return None
    except CrankError as e:
        return str(e)


def test_digest_cache_opened_by_many_runs_at_the_same_moment(tmp_path):
    """A new cache switched to WAL by several processes at once: SQLite answers "locked"
    without waiting on its busy timeout; every run must still open it."""
    import multiprocessing

    # spawn, not fork: earlier tests leave obstore's threads, which a fork would copy mid-lock
    spawn = multiprocessing.get_context("spawn")
    with spawn.Manager() as manager, spawn.Pool(8) as pool:
        for attempt in range(10):
            barrier = manager.Barrier(8)
            path = str(tmp_path / f"c{attempt}" / "digests.sqlite")
            errors = [e for e in pool.starmap(_open_cache_at_once, [(path, barrier)] * 8) if e]
            assert errors == []


def test_digest_cache_does_not_keep_a_file_written_just_now(tmp_path):
    cache = DigestCache(str(tmp_path / "d.sqlite"))
    f = write(tmp_path / "f", b"fresh", settled=False)
    cache.digest(str(f))
    # it may still change within the same mtime tick: not cached, hashed again
    assert cache.lookup(str(f)) is None
    cache.digest(str(f))
    assert cache.misses == 2


def test_digest_cache_streams_large_files(tmp_path):
    data = os.urandom(9 << 20)
    f = write(tmp_path / "big", data)
    assert DigestCache(str(tmp_path / "d.sqlite")).digest(str(f)) == sha(data)


def test_a_small_file_is_read_once_for_its_digest_and_its_upload(tmp_path, settled):
    """read_small gives the content with its digest and caches the digest as a hash would;
    a file above the limit is not read; an empty file is a file."""
    cache = DigestCache(str(tmp_path / "d.sqlite"))
    data = os.urandom(5000)
    f = write(tmp_path / "f", data)
    digest, identity, content = cache.read_small(str(f), 5000)
    assert (digest, content, identity[0]) == (sha(data), data, 5000)
    assert cache.lookup(str(f)) == sha(data) and cache.misses == 1
    assert cache.read_small(str(f), 4999) is None and cache.misses == 1
    empty = write(tmp_path / "empty", b"")
    assert cache.read_small(str(empty), 10)[::2] == (sha(b""), b"")


def test_unreadable_input_is_one_line(tmp_path):
    with pytest.raises(CrankError, match="cannot read .*missing"):
        sha256_file(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "prefix, message",
    [
        ("ftp://host/dir", "unknown scheme"),
        ("bucket/path", "unknown scheme"),
        ("file://relative/dir", "absolute path"),
        ("file:///nonexistent-crank-dir/x", "directory does not exist"),
    ],
)
def test_bad_prefix_is_one_line(prefix, message):
    with pytest.raises(CrankError, match=message) as info:
        Store.from_url(prefix)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- helpers for the real stores


@pytest.fixture
def s3_prefix(s3, monkeypatch):
    """A fresh prefix in the test bucket, with the server's credentials in the environment."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    prefix = f"s3://{s3.bucket}/test-{uuid.uuid4().hex}"
    yield prefix
    for key, value in s3.env().items():  # a test may have spoilt them
        monkeypatch.setenv(key, value)
    remove_all(prefix)


@pytest.fixture(params=["s3", "file"])
def any_prefix(request, tmp_path):
    """The same test against S3 and against a file:// store."""
    if request.param == "s3":
        return request.getfixturevalue("s3_prefix")
    root = tmp_path / "store"
    root.mkdir()
    return f"file://{root}"


def objects(prefix: str) -> dict[str, tuple[int, object]]:
    """key -> (size, last_modified), straight from the store (not through crank's code)."""
    kwargs = {"client_options": {"allow_http": True}} if prefix.startswith("s3://") else {}
    raw = obstore_from_url(prefix, **kwargs)
    return {m["path"]: (m["size"], m["last_modified"]) for batch in obstore.list(raw) for m in batch}


def remove_all(prefix: str) -> None:
    raw = obstore_from_url(prefix, client_options={"allow_http": True})
    keys = [m["path"] for batch in obstore.list(raw) for m in batch]
    for i in range(0, len(keys), 500):
        obstore.delete(raw, keys[i:i + 500])


def stager(prefix: str, workdir: Path, **kwargs) -> Stager:
    cache = DigestCache(str(workdir / ".snakemake" / "crank" / "digests.sqlite"))
    return Stager(Store.from_url(prefix), cache, **kwargs)


# ---------------------------------------------------------------- against the real stores


@pytest.mark.s3
def test_second_run_sends_nothing(own_bucket, tmp_path, settled):
    s3_prefix, s3 = own_bucket  # counted alone: other tests write to the shared bucket meanwhile
    inputs = {
        "big": os.urandom(PART_SIZE * 2 + 12345),  # multipart
        "small": b"small input\n",
        "empty": b"",
    }
    paths = [str(write(tmp_path / name, data)) for name, data in inputs.items()]
    total = sum(map(len, inputs.values()))

    first = stager(s3_prefix, tmp_path)
    staged = first.stage(paths)
    assert first.stats.bytes_sent == total and first.stats.files == 3
    assert [s.url for s in staged] == [f"{s3_prefix}/{file_key(sha(d))}" for d in inputs.values()]
    assert [s.size for s in staged] == [len(d) for d in inputs.values()]
    before = objects(s3_prefix)
    assert sorted(before) == sorted(file_key(sha(d)) for d in inputs.values())
    writes_before = s3.requests("PUT", "POST")

    # a second run: new stager, same workdir (digest cache), nothing changed
    second = stager(s3_prefix, tmp_path)
    assert second.stage(paths) == staged
    assert second.stats.bytes_sent == 0 and second.stats.bytes_deduplicated == total
    assert second.cache.misses == 0 and second.cache.hits == 3  # nothing hashed again
    assert s3.requests("PUT", "POST") == writes_before  # server side: no write request at all
    assert objects(s3_prefix) == before  # same objects, same modification times
    assert "0 B sent" in second.summary()


ALL_REQUESTS = ("GET", "PUT", "POST", "LIST", "COPY", "DELETE")  # a HEAD counts as a GET


def counting(s: Stager) -> list[str]:
    """The store requests ``s`` makes from now on, by the name of the Store method."""
    calls: list[str] = []
    for name in ("head", "list_group", "put_file", "put_bytes", "copy", "list", "get_file"):
        original = getattr(s.store, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        setattr(s.store, name, counted)
    return calls


def confirmed_ages(cache: Path) -> dict[str, int]:
    import sqlite3

    with sqlite3.connect(cache) as db:
        return {k: time.time_ns() - t for k, t in db.execute("SELECT key, confirmed_ns FROM stored_v1")}


@pytest.fixture
def own_bucket(s3, s3_prefix):
    """A bucket of this test alone, so that the server's counters per bucket count only its
    requests while other tests use the server: (prefix in it, S3Server counting it)."""
    import boto3
    from botocore.config import Config

    from conftest import S3Server

    name = f"crank-test-{uuid.uuid4().hex[:12]}"
    env = s3.env()
    client = boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}))
    client.create_bucket(Bucket=name)
    try:
        yield f"s3://{name}/test", S3Server({**s3.values, "CRANK_TEST_BUCKET": name})
    finally:
        remove_all(f"s3://{name}")
        client.delete_bucket(Bucket=name)
        client.close()


@pytest.mark.s3
def test_a_new_run_asks_the_store_nothing_about_unchanged_inputs(own_bucket, tmp_path):
    """What the store holds is remembered beside the digests: a rerun (a new process) of 150
    unchanged files and a directory sends no request at all. Another store is asked."""
    s3_prefix, s3 = own_bucket
    datas = [os.urandom(100 + i) for i in range(120)]
    paths = [str(write(tmp_path / f"in{i}", d)) for i, d in enumerate(datas)]
    in_dir = [str(write(tmp_path / "dir" / f"f{i}", os.urandom(50 + i))) for i in range(30)]
    inputs = paths + [str(tmp_path / "dir")]
    cache = tmp_path / ".snakemake" / "crank" / "digests.sqlite"
    wait_settled(paths + in_dir)  # a file still in the racy window is hashed again by the rerun
    first = stage_process(s3_prefix, cache, inputs)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and f"done {sum(map(len, datas)) + sum(50 + i for i in range(30))}" in out, err
    # the server counts a request once it has answered it: this test's own listing is
    # counted by the time the rerun has ended, whenever it lands
    requests_before = s3.requests(*ALL_REQUESTS)
    before = objects(s3_prefix)

    rerun = stage_process(s3_prefix, cache, inputs)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0 and "done 0" in out, err
    assert s3.requests(*ALL_REQUESTS) == requests_before + 1  # this test's listing; 151 HEADs before
    assert objects(s3_prefix) == before
    # the same in this process, counted on the client: not one request
    again = stager(s3_prefix, tmp_path)
    calls = counting(again)
    tasks = []  # nor a task on the thread pool: answered from the database at once
    again._stage_file = lambda *args, _original=again._stage_file: tasks.append(args) or _original(*args)
    again.stage(inputs)
    assert calls == [] and tasks == [] and again.stats.bytes_sent == 0
    assert again.stats.bytes_deduplicated == sum(map(len, datas)) + sum(50 + i for i in range(30))

    # the same files for another store (another prefix): looked up there and sent
    elsewhere = f"{s3_prefix}-elsewhere"
    try:
        other = stager(elsewhere, tmp_path)
        other.stage(paths[:5])
        assert other.stats.bytes_sent == sum(map(len, datas[:5]))
    finally:
        remove_all(elsewhere)


@pytest.mark.s3
def test_a_forgotten_input_is_sent_again_by_this_run_and_later_ones(s3_prefix, tmp_path, settled):
    kept, lost = write(tmp_path / "kept", b"kept\n"), write(tmp_path / "lost", b"lost\n")
    first = stager(s3_prefix, tmp_path)
    first.stage([str(kept), str(lost)])
    obstore.delete(obstore_from_url(s3_prefix, client_options={"allow_http": True}), file_key(sha(b"lost\n")))
    # before forget: trusted (a later run would not notice the removal)
    assert stager(s3_prefix, tmp_path).cache.stored(first.store.location, file_key(sha(b"lost\n")))

    first.forget([sha(b"lost\n")])
    later = stager(s3_prefix, tmp_path)
    calls = counting(later)
    later.stage([str(kept), str(lost)])
    assert later.stats.bytes_sent == len(b"lost\n")
    assert calls == ["head", "put_file"]  # the kept file is still not looked up
    assert file_key(sha(b"lost\n")) in objects(s3_prefix)

    # the run that forgot asks the store whatever another run wrote in the database meanwhile
    obstore.delete(obstore_from_url(s3_prefix, client_options={"allow_http": True}), file_key(sha(b"lost\n")))
    first.forget([sha(b"lost\n")])
    first.cache.mark_stored(first.store.location, file_key(sha(b"lost\n")))
    sent = first.stats.bytes_sent
    first.stage([str(lost)])
    assert first.stats.bytes_sent - sent == len(b"lost\n")
    assert file_key(sha(b"lost\n")) in objects(s3_prefix)


@pytest.mark.s3
def test_an_entry_older_than_its_bound_is_checked_with_the_store(s3_prefix, tmp_path, settled):
    import sqlite3

    f = write(tmp_path / "in", b"content\n")
    key = file_key(sha(b"content\n"))
    cache = tmp_path / ".snakemake" / "crank" / "digests.sqlite"
    stager(s3_prefix, tmp_path).stage([str(f)])
    assert confirmed_ages(cache)[key] < 60e9
    obstore.delete(obstore_from_url(s3_prefix, client_options={"allow_http": True}), key)

    # just younger than the bound: trusted; and a trusted entry does not renew itself
    with sqlite3.connect(cache) as db:
        db.execute("UPDATE stored_v1 SET confirmed_ns = ?", (time.time_ns() - digest_module.STORED_TRUST_NS + 60e9,))
    young = stager(s3_prefix, tmp_path)
    calls = counting(young)
    young.stage([str(f)])
    assert calls == [] and confirmed_ages(cache)[key] > digest_module.STORED_TRUST_NS - 61e9

    for confirmed in (time.time_ns() - digest_module.STORED_TRUST_NS - 1, time.time_ns() + 3600e9):
        with sqlite3.connect(cache) as db:  # older than the bound, or from a clock set back
            db.execute("UPDATE stored_v1 SET confirmed_ns = ?", (int(confirmed),))
        old = stager(s3_prefix, tmp_path)
        calls = counting(old)
        old.stage([str(f)])
        assert calls == ["head", "put_file"] and old.stats.bytes_sent == len(b"content\n")
        assert 0 <= confirmed_ages(cache)[key] < 60e9  # confirmed anew
        assert key in objects(s3_prefix)
        obstore.delete(obstore_from_url(s3_prefix, client_options={"allow_http": True}), key)


@pytest.mark.s3
def test_a_large_stage_call_lists_what_the_store_holds_instead_of_a_head_per_file(
        s3_prefix, tmp_path, settled, monkeypatch):
    """A call with many files (here 40 against LIST_FROM 16) lists each group cas/sha256/<2 hex>
    it needs once; the files the store held already (staged from another workdir) are not sent
    again. A group larger than its bound is looked up file by file."""
    monkeypatch.setattr(stage_module, "LIST_FROM", 16)
    datas = [os.urandom(64 + i) for i in range(40)]
    paths = [str(write(tmp_path / f"in{i}", d)) for i, d in enumerate(datas)]
    elsewhere = tmp_path / "elsewhere"
    stager(s3_prefix, elsewhere).stage(paths[:10])  # below LIST_FROM: a HEAD each

    s = stager(s3_prefix, tmp_path)
    calls = counting(s)
    staged = s.stage(paths)
    groups = {sha(d)[:2] for d in datas}
    assert sorted(calls) == sorted(["list_group"] * len(groups) + ["put_bytes"] * 30)
    assert s.stats.bytes_sent == sum(map(len, datas[10:])) and [x.url for x in staged] == [
        f"{s3_prefix}/{file_key(sha(d))}" for d in datas]
    assert {k: v[0] for k, v in objects(s3_prefix).items()} == {file_key(sha(d)): len(d) for d in datas}

    # a store holding more of a group than the call may list: a HEAD for each file of it
    monkeypatch.setattr(stage_module, "LIST_PAGE", 0)
    monkeypatch.setattr(stage_module, "LISTED_PER_GROUP", 0)
    again = stager(s3_prefix, tmp_path / "third")
    calls = counting(again)
    again.stage(paths)
    assert sorted(calls) == sorted(["list_group"] * len(groups) + ["head"] * 40)
    assert again.stats.bytes_sent == 0


@pytest.mark.s3
def test_identical_files_are_uploaded_once(s3_prefix, tmp_path):
    data = os.urandom(PART_SIZE + 1)
    paths = [str(write(tmp_path / f"copy{i}", data)) for i in range(4)]
    s = stager(s3_prefix, tmp_path, workers=4)
    staged = s.stage(paths)
    assert {x.url for x in staged} == {f"{s3_prefix}/{file_key(sha(data))}"}
    assert s.stats.bytes_sent == len(data) and s.stats.bytes_deduplicated == 3 * len(data)
    assert list(objects(s3_prefix)) == [file_key(sha(data))]


@pytest.mark.s3
def test_concurrent_stage_calls_share_uploads(s3_prefix, tmp_path):
    shared = [str(write(tmp_path / f"shared{i}", os.urandom(1000 + i))) for i in range(6)]
    own = [[str(write(tmp_path / f"own{j}-{i}", os.urandom(500 + i))) for i in range(3)] for j in range(4)]
    s = stager(s3_prefix, tmp_path, workers=3)
    errors = []

    def job(j):
        try:
            s.stage(shared + own[j])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=job, args=(j,)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    unique = sum(os.path.getsize(p) for p in shared + sum(own, []))
    assert s.stats.bytes_sent == unique
    assert len(objects(s3_prefix)) == 6 + 12


@pytest.mark.s3
def test_file_changed_in_place_gets_a_new_digest(s3_prefix, tmp_path):
    f = write(tmp_path / "in.txt", b"version 1")
    s = stager(s3_prefix, tmp_path)
    [first] = s.stage([str(f)])
    f.write_bytes(b"version 2")  # same size, same inode
    os.utime(f, (OLD + 5, OLD + 5))
    [second] = s.stage([str(f)])
    assert first.url != second.url and second.url.endswith(sha(b"version 2"))
    assert s.stats.bytes_sent == 18
    assert len(objects(s3_prefix)) == 2


@pytest.mark.s3
def test_changed_content_never_lands_under_a_digest_key(any_prefix, tmp_path):
    store = Store.from_url(any_prefix)
    for size in (10, PART_SIZE * 2 + 1):  # single PUT and multipart
        f = write(tmp_path / f"f{size}", os.urandom(size))
        wrong = sha(b"what the file held when it was hashed")
        with pytest.raises(ContentChanged, match="changed after crank computed its sha256"):
            store.put_file(str(f), file_key(wrong), sha256=wrong)
        assert store.head(file_key(wrong)) is None
    assert objects(any_prefix) == {}


@pytest.mark.s3
def test_file_changed_after_hashing_is_not_uploaded(any_prefix, tmp_path):
    store = Store.from_url(any_prefix)
    cache = DigestCache(str(tmp_path / "d.sqlite"))
    f = write(tmp_path / "big", os.urandom(PART_SIZE * 2))
    digest, identity = cache.digest_with_identity(str(f))
    with f.open("r+b") as out:  # rewritten in place after it was hashed: same size and inode
        out.write(b"changed")
    os.utime(f, (OLD + 9, OLD + 9))
    with pytest.raises(ContentChanged):
        store.put_file(str(f), file_key(digest), sha256=digest, identity=identity)
    assert store.head(file_key(digest)) is None
    # unchanged: checked by stat alone, uploaded
    digest, identity = cache.digest_with_identity(str(f))
    store.put_file(str(f), file_key(digest), sha256=digest, identity=identity)
    assert store.head(file_key(digest)) == PART_SIZE * 2


STAGE_SCRIPT = """
import sys
from snakemake_executor_plugin_crank.staging.digest import DigestCache
from snakemake_executor_plugin_crank.staging.stage import Stager
from snakemake_executor_plugin_crank.staging.store import Store
prefix, cache, *paths = sys.argv[1:]
stager = Stager(Store.from_url(prefix), DigestCache(cache), workers=4,
                progress=lambda m: print("progress", m, flush=True), progress_interval=0)
staged = stager.stage(paths)
print("done", stager.stats.bytes_sent, flush=True)
"""


def stage_process(prefix: str, cache: Path, paths: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", STAGE_SCRIPT, prefix, str(cache), *paths],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )


@pytest.mark.s3
def test_two_runs_at_once_in_one_workdir(s3_prefix, tmp_path):
    datas = [os.urandom(PART_SIZE + i * 4096) for i in range(3)] + [os.urandom(100 + i) for i in range(20)]
    paths = [str(write(tmp_path / f"in{i}", d)) for i, d in enumerate(datas)]
    cache = tmp_path / ".snakemake" / "crank" / "digests.sqlite"
    wait_settled(paths)
    runs = [stage_process(s3_prefix, cache, paths) for _ in range(2)]
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        assert "done" in out
    found = objects(s3_prefix)
    assert {k: v[0] for k, v in found.items()} == {file_key(sha(d)): len(d) for d in datas}
    # both processes filled the one cache; a third run hashes nothing
    later = DigestCache(str(cache))
    assert [later.lookup(p) for p in paths] == [sha(d) for d in datas]


@pytest.mark.s3
def test_killed_mid_upload_leaves_no_object(s3, s3_prefix, tmp_path):
    data = os.urandom(256 << 20)
    f = write(tmp_path / "large", data)
    run = stage_process(s3_prefix, tmp_path / "d.sqlite", [str(f)])
    try:
        first = run.stdout.readline()  # the first progress line: parts are on the wire
        assert first.startswith("progress"), first + run.stderr.read()
    finally:
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
    assert run.returncode == -signal.SIGKILL
    wait_for(lambda: s3.in_flight() == 0, 30, "the server to finish the dead client's requests")
    assert Store.from_url(s3_prefix).head(file_key(sha(data))) is None
    assert objects(s3_prefix) == {}


@pytest.mark.s3
def test_stop_ends_staging_at_once_and_leaves_no_object(s3, s3_prefix, tmp_path):
    """What a run that is ending (Ctrl-C) asks: the upload in flight is abandoned, later
    calls end at once, and nothing lands under a content address."""
    data = os.urandom(256 << 20)
    f = write(tmp_path / "large", data)
    uploading = threading.Event()
    s = stager(s3_prefix, tmp_path, progress=lambda _: uploading.set(), progress_interval=0)
    errors = []

    def run():
        try:
            s.stage([str(f)])
        except CrankError as e:
            errors.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    assert uploading.wait(60), "the upload did not start"
    s.stop()
    worker.join(30)
    assert not worker.is_alive()
    assert [type(e) for e in errors] == [Stopped] and "crank is shutting down" in str(errors[0])
    with pytest.raises(Stopped):
        s.stage([str(write(tmp_path / "small", b"small"))])
    s.close()
    wait_for(lambda: s3.in_flight() == 0, 30, "the server to finish the abandoned requests")
    assert objects(s3_prefix) == {}


@pytest.mark.s3
def test_killed_mid_upload_to_a_file_store_leaves_no_object(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    data = os.urandom(256 << 20)
    f = write(tmp_path / "large", data)
    run = stage_process(f"file://{root}", tmp_path / "d.sqlite", [str(f)])
    try:
        first = run.stdout.readline()
        assert first.startswith("progress"), first + run.stderr.read()
    finally:
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
    assert Store.from_url(f"file://{root}").head(file_key(sha(data))) is None
    assert not (root / file_key(sha(data))).exists()


@pytest.mark.s3
def test_directory_round_trip_with_manifest_last(any_prefix, tmp_path):
    tree = {"a.txt": b"alpha", "sub/b.bin": os.urandom(PART_SIZE + 7), "sub/deeper/c": b"alpha", "x": b""}
    src = tmp_path / "src"
    for rel, data in tree.items():
        write(src / rel, data)
    os.chmod(src / "x", 0o755)

    order = []
    store = Store.from_url(any_prefix)
    for name in ("put_file", "put_bytes"):  # watch the order of writes; they still go to the server
        original = getattr(store, name)

        def watched(*args, _original=original, **kwargs):
            _original(*args, **kwargs)
            order.append(args[1])

        setattr(store, name, watched)
    s = Stager(store, DigestCache(str(tmp_path / "d.sqlite")))
    staged = s.stage([str(src)])

    assert sorted(x.path for x in staged if x.url) == sorted(str(src / rel) for rel in tree)
    assert order[-1].startswith("cas/dirs/") and len(order) == 4  # 3 distinct contents, then the manifest
    manifest_key = order[-1]
    s.fetch_file(manifest_key, str(tmp_path / "manifest.json"))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest_key == dir_key(sha((tmp_path / "manifest.json").read_bytes()))
    assert {e["path"]: (e["size"], e["sha256"]) for e in manifest if "sha256" in e} == {
        rel: (len(d), sha(d)) for rel, d in tree.items()
    }
    assert next(e["mode"] for e in manifest if e["path"] == "x") == 0o755
    assert {e["path"] for e in manifest if "dir" in e} == {"sub", "sub/deeper"}

    # back from the content-addressed objects ...
    back = tmp_path / "back"
    for e in (e for e in manifest if "sha256" in e):
        (back / e["path"]).parent.mkdir(parents=True, exist_ok=True)
        s.fetch_file(file_key(e["sha256"]), str(back / e["path"]), e["size"])
    assert {rel: (back / rel).read_bytes() for rel in tree} == tree

    # ... and as a directory output: uploaded one object per file, fetched whole
    run = f"runs/{uuid.uuid4().hex}/1-1/out"
    for rel in tree:
        store.put_file(str(src / rel), f"{run}/{rel}")
    dest = tmp_path / "out"
    write(dest / "stale", b"from an earlier attempt")
    s.fetch_dir(run, str(dest))
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == sorted(tree)
    assert {rel: (dest / rel).read_bytes() for rel in tree} == tree
    assert [p.name for p in tmp_path.iterdir() if ".crank-" in p.name] == []


@pytest.mark.s3
def test_directory_output_arrives_whole_or_not_at_all(any_prefix, tmp_path):
    store = Store.from_url(any_prefix)
    run = f"runs/{uuid.uuid4().hex}/out"
    store.put_bytes(b"fine", f"{run}/a")
    store.put_bytes(b"fine", f"{run}/b")
    s = Stager(store, DigestCache(str(tmp_path / "d.sqlite")))
    original = store.get_file

    def failing(key, dest, size=None, **kwargs):
        if key.endswith("/b"):
            raise BackendUnavailable("store went away")
        return original(key, dest, size, **kwargs)

    store.get_file = failing
    with pytest.raises(BackendUnavailable):
        s.fetch_dir(run, str(tmp_path / "out"))
    assert list(tmp_path.glob("*out*")) == []  # neither the target nor a temporary directory


@pytest.mark.s3
def test_outputs_another_task_reads_are_shared_by_content(any_prefix, tmp_path):
    """Outputs fetched back with ``share`` land under their content address by a copy
    inside the store: staging them for the next task sends nothing. Others do not."""
    store = Store.from_url(any_prefix)
    run = f"runs/{uuid.uuid4().hex}/1-1"
    made = {
        "p000000": os.urandom(PART_SIZE + 3),  # read later
        "p000001/a": b"part a\n",  # a directory read later
        "p000001/sub/b": b"",
        "p000002": b"a final output\n",  # not read later
    }
    for rel, data in made.items():
        store.put_bytes(data, f"{run}/{rel}")
    dest = tmp_path / "back"
    s = Stager(store, DigestCache(str(tmp_path / "d.sqlite")))
    s.fetch_dir(run, str(dest), share={"p000000", "p000001"})
    assert {rel: (dest / rel).read_bytes() for rel in made} == made

    keys = set(objects(any_prefix))
    for rel, data in made.items():
        assert (file_key(sha(data)) in keys) == (rel != "p000002"), rel
    # the next task: a fresh stager, as in a later round or run, finds them there
    s2 = Stager(store, DigestCache(str(tmp_path / "d2.sqlite")))
    s2.stage([str(dest / "p000000"), str(dest / "p000001")])
    assert s2.stats.bytes_sent == 0
    assert s2.stats.bytes_deduplicated == sum(len(made[r]) for r in made if r != "p000002")
    # the same stager knows without asking the store
    s.stage([str(dest / "p000000")])
    assert s.stats.bytes_sent == 0


@pytest.mark.s3
def test_download_is_atomic_and_checked(any_prefix, tmp_path):
    store = Store.from_url(any_prefix)
    s = Stager(store, DigestCache(str(tmp_path / "d.sqlite")))
    store.put_bytes(b"twelve bytes", "runs/r/out.txt")
    dest = tmp_path / "out.txt"
    dest.write_bytes(b"previous")

    with pytest.raises(CrankError, match="has 12 bytes, expected 13"):
        s.fetch_file("runs/r/out.txt", str(dest), size=13)
    # a content-addressed object whose bytes are not its name's: refused
    bogus = file_key(sha(b"something else entirely"))
    store.put_bytes(b"twelve bytes", bogus)
    with pytest.raises(CrankError, match="does not match its sha256"):
        s.fetch_file(bogus, str(dest))
    with pytest.raises(CrankError, match="no such object"):
        s.fetch_file("runs/r/missing", str(dest))
    assert dest.read_bytes() == b"previous"  # untouched by every failure
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    s.fetch_file("runs/r/out.txt", str(dest), size=12)
    assert dest.read_bytes() == b"twelve bytes"


@pytest.mark.s3
def test_file_store_stages_and_deduplicates(tmp_path):
    root = tmp_path / "shared"
    root.mkdir()
    f = write(tmp_path / "in", os.urandom(PART_SIZE * 2))
    s = stager(f"file://{root}", tmp_path)
    [staged] = s.stage([str(f), "s3://elsewhere/already-remote"])[:1]
    assert staged.url == f"file://{root}/{file_key(sha(f.read_bytes()))}"
    assert (root / file_key(sha(f.read_bytes()))).read_bytes() == f.read_bytes()
    again = stager(f"file://{root}", tmp_path)
    again.stage([str(f)])
    assert again.stats.bytes_sent == 0


@pytest.mark.s3
def test_remote_inputs_pass_through(s3_prefix, tmp_path):
    s = stager(s3_prefix, tmp_path)
    staged = s.stage(["s3://other-bucket/reads.fq.gz", "gs://b/ref.fa"])
    assert [(x.path, x.url, x.digest, x.mode) for x in staged] == [
        ("s3://other-bucket/reads.fq.gz", "s3://other-bucket/reads.fq.gz", "", None),
        ("gs://b/ref.fa", "gs://b/ref.fa", "", None),
    ]
    assert objects(s3_prefix) == {}


@pytest.mark.s3
def test_progress_is_reported(s3_prefix, tmp_path):
    messages = []
    f = write(tmp_path / "big", os.urandom(PART_SIZE * 3))
    s = stager(s3_prefix, tmp_path, progress=messages.append, progress_interval=0)
    s.stage([str(f)])
    assert messages and messages[-1] == "staging: 24.0 MiB of 24.0 MiB uploaded"
    quiet = []
    f2 = write(tmp_path / "big2", os.urandom(PART_SIZE * 3))
    stager(s3_prefix, tmp_path, progress=quiet.append).stage([str(f2)])  # default: every 10 s
    assert quiet == []


@pytest.mark.s3
def test_check_passes_and_leaves_nothing(s3_prefix):
    Store.from_url(s3_prefix).check()
    assert objects(s3_prefix) == {}


@pytest.mark.s3
def test_missing_bucket_is_one_clear_line(s3_prefix):
    with pytest.raises(CrankError) as info:
        Store.from_url(f"s3://crank-no-such-bucket-{uuid.uuid4().hex[:8]}/x").check()
    assert "bucket does not exist; create it or fix the storage prefix" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.s3
@pytest.mark.parametrize("variable, hint", [
    ("AWS_SECRET_ACCESS_KEY", "secret key was rejected; check AWS_SECRET_ACCESS_KEY"),
    ("AWS_ACCESS_KEY_ID", "does not know this access key; check AWS_ACCESS_KEY_ID"),
])
def test_wrong_credentials_are_one_clear_line(s3, s3_prefix, monkeypatch, variable, hint):
    wrong = "wrong-" + uuid.uuid4().hex
    monkeypatch.setenv(variable, wrong)
    with pytest.raises(CrankError) as info:
        Store.from_url(s3_prefix).check()
    message = str(info.value)
    assert hint in message and "\n" not in message
    assert wrong not in message and s3.env()["AWS_SECRET_ACCESS_KEY"] not in message


@pytest.mark.s3
def test_unreachable_endpoint_is_one_clear_line_fast(s3_prefix):
    start = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        Store.from_url(s3_prefix, endpoint="http://127.0.0.1:9").check()
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "http://127.0.0.1:9 unreachable" in message and "is it running?" in message
    assert "\n" not in message


@pytest.mark.s3
def test_store_down_while_staging_is_backend_unavailable(s3_prefix, tmp_path):
    f = write(tmp_path / "in", b"data")
    s = Stager(Store.from_url(s3_prefix, endpoint="http://127.0.0.1:9"), DigestCache(str(tmp_path / "d.sqlite")))
    with pytest.raises(BackendUnavailable, match="unreachable"):
        s.stage([str(f)])


# ---------------------------------------------------------------- the digest cache keys on ctime


def rewrite_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """What ``cp -p new path`` does to an existing file: same inode, same size, new content,
    the old mtime set back."""
    before = path.stat()
    assert len(data) == before.st_size
    source = path.parent / (path.name + ".new")
    source.write_bytes(data)
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    subprocess.run(["cp", "-p", str(source), str(path)], check=True)
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


@pytest.mark.s3
@pytest.mark.parametrize("prefix_kind", ["same prefix", "fresh prefix"])
def test_file_rewritten_with_its_old_mtime_is_staged_anew(s3, s3_prefix, tmp_path, settled, prefix_kind):
    """Same size, same inode, mtime restored (``cp -p``, ``touch -r``): the ctime tells. Once
    this staged the old content silently (same prefix: the old object was there) or failed
    with a false "changed while being staged" (fresh prefix)."""
    f = write(tmp_path / "in.txt", b"AAAA\n")
    [first] = stager(s3_prefix, tmp_path).stage([str(f)])
    assert first.url.endswith(sha(b"AAAA\n"))
    rewrite_keeping_size_and_mtime(f, b"BBBB\n")

    prefix = s3_prefix if prefix_kind == "same prefix" else f"{s3_prefix}/fresh"
    again = stager(prefix, tmp_path)
    [second] = again.stage([str(f)])
    assert second.url == f"{prefix}/" + file_key(sha(b"BBBB\n"))
    again.fetch_file(file_key(sha(b"BBBB\n")), str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == b"BBBB\n"
    assert again.cache.lookup(str(f)) == sha(b"BBBB\n")  # the cache holds the new digest


@pytest.mark.s3
def test_a_stale_cache_entry_is_hashed_again_not_reported_as_a_change(s3_prefix, tmp_path, settled):
    """A cached digest that does not match the bytes read for the upload (a file system that
    keeps no ctime could leave one): the file is hashed again and staged right; the error
    is kept for a file that really changes while it is staged."""
    cache_path = tmp_path / ".snakemake" / "crank" / "digests.sqlite"
    f = write(tmp_path / "in.txt", b"BBBB\n")
    cache = DigestCache(str(cache_path))
    cache.digest(str(f))
    cache._db.execute("UPDATE digests_v2 SET sha256 = ?", (sha(b"AAAA\n"),))  # stale, stat unchanged
    assert cache.lookup(str(f)) == sha(b"AAAA\n")
    [staged] = stager(s3_prefix, tmp_path).stage([str(f)])
    assert staged.url.endswith(sha(b"BBBB\n"))
    assert objects(s3_prefix).keys() == {file_key(sha(b"BBBB\n"))}
    assert cache.lookup(str(f)) == sha(b"BBBB\n")


@pytest.mark.s3
def test_a_cache_written_by_an_older_crank_is_not_trusted_and_stays_usable(s3_prefix, tmp_path, settled):
    """The cache of an older crank (table ``digests`` keyed without the ctime) holds an entry
    whose stat still matches a file rewritten with its mtime restored: it is not used, and an
    older crank sharing the file goes on reading and writing its own table."""
    import sqlite3

    cache_path = tmp_path / ".snakemake" / "crank" / "digests.sqlite"
    cache_path.parent.mkdir(parents=True)
    f = write(tmp_path / "in.txt", b"AAAA\n")
    old = sqlite3.connect(cache_path, isolation_level=None)
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("CREATE TABLE digests (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER,"
                " inode INTEGER, dev INTEGER, sha256 TEXT NOT NULL)")
    st = f.stat()
    old.execute("INSERT INTO digests VALUES (?, ?, ?, ?, ?, ?)",
                (os.path.realpath(f), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, sha(b"AAAA\n")))
    rewrite_keeping_size_and_mtime(f, b"BBBB\n")

    s = stager(s3_prefix, tmp_path)
    [staged] = s.stage([str(f)])
    assert staged.url.endswith(sha(b"BBBB\n")) and s.cache.misses == 1
    assert stager(s3_prefix, tmp_path).cache.lookup(str(f)) == sha(b"BBBB\n")
    # the older crank, still running on the same file, is not disturbed
    assert old.execute("SELECT sha256 FROM digests").fetchall() == [(sha(b"AAAA\n"),)]
    old.execute("INSERT OR REPLACE INTO digests VALUES ('/x', 1, 2, 3, 4, 'y')")
    old.close()


# ---------------------------------------------------------------- directories with symlinks


def ancestor_links_tree(root: Path) -> Path:
    """ref/ with two links back to itself (``sub/up -> ..``, ``sub/deeper/back -> ../..``),
    one to its parent by absolute path, a link to a file, a broken one, and two links to a
    directory outside it, which holds a link back to ref/."""
    ref = root / "ref"
    write(ref / "a", b"a\n")
    write(ref / "sub" / "b", b"b\n")
    (ref / "sub" / "deeper").mkdir()
    (ref / "sub" / "up").symlink_to("..")
    (ref / "sub" / "deeper" / "back").symlink_to("../..")
    (ref / "sub" / "deeper" / "root").symlink_to(root)
    (ref / "flink").symlink_to("sub/b")
    (ref / "broken").symlink_to("nowhere")
    write(root / "shared" / "c", b"c\n")
    (root / "shared" / "to_ref").symlink_to("../ref")
    (ref / "outside").symlink_to("../shared")
    (ref / "outside_again").symlink_to(root / "shared")
    return ref


def stage_within(s: Stager, paths: list[str], seconds: float) -> list:
    """``s.stage(paths)``, failing the test (instead of hanging it) when it takes longer."""
    result: list = []
    worker = threading.Thread(target=lambda: result.append(s.stage(paths)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"staging did not finish within {seconds} s"
    assert result, "staging failed"
    return result[0]


@pytest.mark.s3
def test_a_directory_with_links_is_staged_with_the_links_and_what_they_lead_to(any_prefix, tmp_path):
    """Every symlink stays a link with its own target text; what it leads to is staged too
    (here a directory outside, once), never walked again when it is a directory on the way to
    the link. Once this staged 41 copies of every file for one link back to an ancestor, and
    never ended for two; and links came as copies of their targets."""
    ref = ancestor_links_tree(tmp_path)
    s = Stager(Store.from_url(any_prefix), DigestCache(str(tmp_path / "d.sqlite")))
    staged = stage_within(s, [str(ref)], 30)

    def rel(path: str) -> str:
        return os.path.relpath(path, tmp_path)

    files = {rel(x.path): x.url.rsplit("/", 1)[1] for x in staged if x.url}
    assert files == {"ref/a": sha(b"a\n"), "ref/sub/b": sha(b"b\n"), "shared/c": sha(b"c\n")}
    links = {rel(x.path): x.link for x in staged if x.link}
    assert links == {
        "ref/sub/up": "..", "ref/sub/deeper/back": "../..", "ref/sub/deeper/root": str(tmp_path),
        "ref/flink": "sub/b", "ref/broken": "nowhere", "ref/outside": "../shared",
        "ref/outside_again": str(tmp_path / "shared"), "shared/to_ref": "../ref",
    }
    assert {rel(x.path) for x in staged if x.directory} == {"ref", "ref/sub", "ref/sub/deeper", "shared"}
    assert len(staged) == len({x.path for x in staged})  # each entry once
    assert s.stats.files == 3 and len(objects(any_prefix)) == 3 + 1  # a, b, c and the manifest

    [manifest_key] = [k for k in objects(any_prefix) if k.startswith("cas/dirs/")]
    s.fetch_file(manifest_key, str(tmp_path / "manifest.json"))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {e["path"]: e["link"] for e in manifest if "link" in e} == {
        os.path.relpath(p, "ref"): t for p, t in links.items() if p.startswith("ref/")}
    assert {e["path"] for e in manifest if "sha256" in e} == {"a", "sub/b"}
    assert {e["path"] for e in manifest if "dir" in e} == {"sub", "sub/deeper"}


@pytest.mark.s3
def test_linked_inputs_stay_links_with_their_modes_and_times(s3_prefix, tmp_path):
    """A directory input that is a symlink stays that link (its own target text, also along a
    chain of links) and the tree where it leads comes too, empty directories and modes and
    times included; a symlinked directory on the way to a file input becomes a link too."""
    real = tmp_path / "elsewhere" / "ref"
    write(real / "a", b"a\n")
    os.chmod(real / "a", 0o751)
    os.utime(real / "a", ns=(1, 1_500_000_000_123_456_789))
    (real / "empty" / "emptier").mkdir(parents=True)
    (tmp_path / "wf").mkdir()
    (tmp_path / "wf" / "ref").symlink_to(real)
    (tmp_path / "wf" / "rel").symlink_to("../elsewhere/ref")
    (tmp_path / "wf" / "via").symlink_to("rel")
    write(tmp_path / "big" / "x.fq", b"x\n")
    (tmp_path / "wf" / "data").symlink_to(tmp_path / "big")
    s = Stager(Store.from_url(s3_prefix), DigestCache(str(tmp_path / "d.sqlite")))
    staged = s.stage([str(tmp_path / "wf" / name) for name in ("ref", "rel", "via", "data/x.fq")])

    assert {x.path: x.link for x in staged if x.link} == {
        str(tmp_path / "wf" / "ref"): str(real), str(tmp_path / "wf" / "rel"): "../elsewhere/ref",
        str(tmp_path / "wf" / "via"): "rel", str(tmp_path / "wf" / "data"): str(tmp_path / "big")}
    assert {x.path for x in staged if x.url} == {str(real / "a"), str(tmp_path / "big" / "x.fq")}
    [a] = [x for x in staged if x.path == str(real / "a")]
    assert (a.mode, a.mtime_ns) == (0o751, 1_500_000_000_123_456_789)
    assert {x.path for x in staged if x.directory} == {str(real), str(real / "empty"), str(real / "empty" / "emptier")}
    assert not [k for k in objects(s3_prefix) if k.startswith("cas/dirs/")]  # only links were asked for


def test_an_input_that_is_a_fifo_a_socket_or_inside_a_directory_is_one_line(tmp_path):
    """Nothing opens it (a FIFO would block the read for ever): one line names it."""
    import socket

    from snakemake_executor_plugin_crank.staging import tree

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "d" / "inner")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        for name, what in (("fifo", "a FIFO"), ("sock", "a socket"), ("d", "a FIFO")):
            with pytest.raises(CrankError, match=f"is {what}") as e:
                tree.plan([str(tmp_path / name)])
            assert "\n" not in str(e.value)
    assert "inside the directory" in str(pytest.raises(CrankError, tree.plan, [str(tmp_path / "d")]).value)
    # a link to a device is made as the link, the container has its own
    (tmp_path / "null").symlink_to("/dev/null")
    assert [e.kind for e in tree.plan([str(tmp_path / "null")]).entries] == ["link"]


def test_link_cycles_and_dangling_links_among_inputs_are_links(tmp_path):
    """A cycle of links and a link to nothing are made as they are, at once."""
    from snakemake_executor_plugin_crank.staging import tree

    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    (tmp_path / "gone").symlink_to("nothing")
    (tmp_path / "self").symlink_to("self")
    planned = tree.plan([str(tmp_path / n) for n in ("a", "gone", "self")])
    assert {os.path.basename(e.path): e.link for e in planned.entries} == {
        "a": "b", "b": "a", "gone": "nothing", "self": "self"}


def test_install_puts_a_file_or_directory_whole_over_whatever_is_there(tmp_path):
    """One install for both backends' outputs: a directory over a file, a link or a directory,
    a file over a directory, and from another file system (a copy beside, then a rename)."""
    from snakemake_executor_plugin_crank.staging.install import install

    def made(name: str, directory: bool) -> Path:
        src = tmp_path / "src" / name
        if directory:
            (src / "sub").mkdir(parents=True)
            (src / "sub" / "f").write_text(name)
        else:
            src.parent.mkdir(parents=True, exist_ok=True)
            src.write_text(name)
        return src

    out = tmp_path / "out"
    out.mkdir()
    (out / "was-file").write_text("old")
    (out / "was-link").symlink_to("nowhere")
    (out / "was-dir").mkdir()
    (out / "was-dir" / "stale").write_text("old")
    for name in ("was-file", "was-link", "was-dir"):
        install(str(made(name, True)), str(out / name))
        assert (out / name / "sub" / "f").read_text() == name and not (out / name / "stale").exists()
    install(str(made("file-over-dir", False)), str(out / "was-dir"))
    assert (out / "was-dir").read_text() == "file-over-dir"
    assert sorted(p.name for p in out.iterdir()) == ["was-dir", "was-file", "was-link"]
    assert not (tmp_path / "src" / "was-file").exists()

    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system at /dev/shm")
    other = Path(f"/dev/shm/crank-install-{uuid.uuid4().hex}")
    try:
        (other / "d").mkdir(parents=True)
        (other / "d" / "x").write_text("far")
        install(str(other / "d"), str(out / "new" / "far"))
        assert (out / "new" / "far" / "x").read_text() == "far"
        assert os.listdir(out / "new") == ["far"]  # no copy left beside it
    finally:
        shutil.rmtree(other, ignore_errors=True)


@pytest.mark.s3
def test_an_upload_the_server_stops_reading_fails_within_its_timeout(s3_prefix, tmp_path, monkeypatch):
    """A store that accepts a PUT and never reads its body (SeaweedFS with full volumes did
    this for minutes): the upload fails with one line once the request's overall timeout has
    passed, instead of waiting on a write that nothing else bounds."""
    from faultproxy import FaultProxy

    # what ships: such requests are bounded; only a download (one large object) may take hours
    assert store_module.CLIENT["timeout"] == "10m" and store_module.DOWNLOAD_CLIENT["timeout"] == "6h"
    monkeypatch.setattr(store_module, "CLIENT", {**store_module.CLIENT, "timeout": "3s"})
    monkeypatch.setattr(store_module, "RETRY", {**store_module.RETRY, "retry_timeout": timedelta(seconds=1)})
    endpoint = os.environ["AWS_ENDPOINT_URL"].rsplit("//", 1)[1]
    host, port = endpoint.split(":")
    f = write(tmp_path / "big", os.urandom(PART_SIZE))  # more than the sockets' buffers hold
    with FaultProxy(("127.0.0.1", 0), (host, int(port)), hang_s=90) as proxy:
        proxy.set_rule(lambda method, path: "hang" if method == "PUT" else "pass")
        store = Store.from_url(s3_prefix, endpoint=proxy.url)
        started = time.monotonic()
        with pytest.raises(CrankError, match="uploading") as failed:
            store.put_file(str(f), "stalled")
        elapsed = time.monotonic() - started
    assert elapsed < 30, elapsed  # the 60 s read timeout alone waits for the proxy to give up
    assert "\n" not in str(failed.value)
