"""Local inputs to content-addressed objects (cas.py says where they go), and outputs back.

A file already in the store with the right size is not uploaded again; identical content is
uploaded once per run; hashing of one file overlaps the upload of others. What the store was
seen to hold is remembered in the digest cache's database, so that a later run sends no request
for an unchanged input (for a bounded time, see digest.STORED_TRUST_NS).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import CrankError
from . import tree
from .digest import DigestCache, Identity, check
from .cas import LIST_FROM, LIST_PAGE, LISTED_PER_GROUP, Listings, cas_digest, dir_key, file_key, manifest_bytes
from .install import install
from .staged import Staged
from .store import ContentChanged, Store

_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# A file this small whose digest is not cached is read once: hashed and uploaded from memory
# (a cohort's first stage read and hashed each file twice, and on two cores that CPU came out
# of the upload). The stager's workers hold at most this much each.
READ_ONCE_MAX = 1 << 20


def is_remote(path: str) -> bool:
    """An input that already is an object-store URL (file:// counts as local)."""
    return bool(_REMOTE.match(path)) and not path.startswith("file://")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


@dataclass
class StageStats:
    files: int = 0
    bytes_sent: int = 0
    bytes_deduplicated: int = 0  # already in the store, or identical to another file of the run
    seconds: float = 0.0  # wall time during which at least one stage() call was running


class Stager:
    """Uploads inputs by content; thread-safe (several jobs may stage at once)."""

    def __init__(
        self,
        store: Store,
        cache: DigestCache,
        workers: int = 8,
        progress: Callable[[str], None] | None = None,
        progress_interval: float = 10.0,
    ):
        self.store = store
        self.cache = cache
        self.stats = StageStats()
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="crank-stage")
        self._progress = progress
        self._progress_interval = progress_interval
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._where = store.location  # names the store in the digest cache's database
        self._present: set[str] = set()  # digests known to be in the store
        # digests forgotten by this process: the store is asked whatever the database says
        self._doubted: set[str] = set()
        self._uploading: dict[str, Future] = {}  # digest -> the upload of that content
        self._active = 0
        self._active_since = 0.0
        self._queued_bytes = 0
        self._sent_bytes = 0
        self._last_report = time.monotonic()

    # ------------------------------------------------------------------ inputs

    def stage(self, paths: Sequence[str], missing_ok: bool = False) -> list[Staged]:
        """Put every local file (a directory: each file in it, then its manifest) in the store.
        Remote URLs pass through. Returns every entry a task needs to rebuild the inputs as the
        client has them (``tree.plan``; ``missing_ok``: a path that is not there is left out),
        then the remote inputs."""
        self._begin()
        try:
            return self._stage(paths, missing_ok)
        finally:
            self._end()

    def _stage(self, paths: Sequence[str], missing_ok: bool) -> list[Staged]:
        remote = [p for p in paths if is_remote(p)]
        local = [os.path.abspath(p[len("file://"):] if p.startswith("file://") else p)
                 for p in paths if not is_remote(p)]
        planned = tree.plan(local, missing_ok) if local else tree.Plan()

        # one task per distinct file; identical content in different files is handled in _put
        files = planned.files()
        listings = None
        if len(files) >= LIST_FROM and self.store.kind != "file":
            listings = Listings(self.store, max(LIST_PAGE, LISTED_PER_GROUP * -(-len(files) // 256)))
        # A file whose digest is cached and whose content the store is known to hold needs
        # neither a read nor a request: answered here, without a task (a rerun of a cohort
        # spent more time on the pool's hand-offs than on the lookups themselves).
        done: dict[str, tuple[str, int]] = {}
        tasks: dict[str, Future] = {}
        for f in files:
            cached = self._cached(f)
            if cached is not None and self._held(cached[0], cached[1][0]):
                done[f.path] = (cached[0], cached[1][0])
            else:
                tasks[f.path] = self._pool.submit(self._stage_file, f.path, listings, cached)
        done.update(_wait_all(tasks))

        staged = []
        for e in planned.entries:
            if e.kind == tree.FILE:
                digest, size = done[e.path]
                staged.append(Staged(e.path, self.store.url(file_key(digest)), digest, size,
                                     mode=e.mode, mtime_ns=e.mtime_ns))
            else:
                staged.append(Staged(e.path, link=e.link, directory=e.kind == tree.DIR,
                                     mode=e.mode, mtime_ns=e.mtime_ns))
        staged.extend(Staged(url, url) for url in remote)
        kinds = {e.path: e.kind for e in planned.entries}
        for _, root in planned.roots:
            if kinds[root] == tree.DIR:
                self._put_manifest(root, planned.below(root), done)
        with self._lock:
            self.stats.files += len(files)
        return staged

    def forget(self, digests: Iterable[str]) -> None:
        """Look these contents up in the store again next time they are staged (something
        may have removed them), in this run and in later ones."""
        digests = set(digests)
        with self._lock:
            self._present.difference_update(digests)
            self._doubted.update(digests)
        self.cache.forget_stored(self._where, [file_key(d) for d in digests])

    def stop(self) -> None:
        """End every stage() call soon, now and later, with digest.Stopped: hashing stops within
        a block, uploads and downloads in flight at once (abandoned: nothing appears under
        their keys or final names). For a run that is ending (Ctrl-C), which should not wait
        for gigabytes to move or for a store that stopped answering."""
        self._stopping.set()
        self.store.abandon()

    def _cached(self, entry: tree.Entry) -> tuple[str, Identity] | None:
        """The file's cached digest and identity (its stat taken by the plan); None also
        when it cannot be read now (its task then says why)."""
        try:
            return self.cache.cached(entry.path, entry.st)
        except CrankError:
            return None

    def _held(self, digest: str, size: int) -> bool:
        """Whether the store holds ``digest``, as known without a request; counted then."""
        with self._lock:
            present = digest in self._present
        if not present and not self._remembered(file_key(digest), digest):
            return False
        with self._lock:
            self._present.add(digest)
            self.stats.bytes_deduplicated += size
        return True

    def _stage_file(
        self, path: str, listings: Listings | None, cached: tuple[str, Identity] | None,
    ) -> tuple[str, int]:
        """``cached``: the digest cache's answer for ``path`` when looked up just before (None:
        it had none, the file is hashed)."""
        check(self._stopping.is_set)
        read = None if cached else self.cache.read_small(path, READ_ONCE_MAX)
        if read is not None:
            digest, identity, data = read
            sent = self._put(path, digest, identity[0], identity, listings, data)
            return self._count(digest, identity[0], sent)
        digest, identity = cached or self.cache.digest_with_identity(
            path, cached=False, stop=self._stopping.is_set)
        try:
            sent = self._put(path, digest, identity[0], identity, listings)
        except ContentChanged:
            # The bytes read for the upload are not those of the digest. Either the file
            # changed since it was hashed, or the cached digest was wrong although the stat
            # matched (a file system that keeps no ctime); hashing it again settles both, and
            # a file that changes again meanwhile really is being written.
            digest, identity = self.cache.digest_with_identity(path, cached=False, stop=self._stopping.is_set)
            sent = self._put(path, digest, identity[0], identity, listings)
        return self._count(digest, identity[0], sent)

    def _count(self, digest: str, size: int, sent: bool) -> tuple[str, int]:
        with self._lock:
            if sent:
                self.stats.bytes_sent += size
            else:
                self.stats.bytes_deduplicated += size
        return digest, size

    def _put(
        self, path: str, digest: str, size: int, identity: Identity, listings: Listings | None,
        data: bytes | None = None,
    ) -> bool:
        """Make sure the content ``digest`` is in the store; True when this call uploaded it.
        ``data``: the file's content, already read and hashed, sent as it is."""
        with self._lock:
            if digest in self._present:
                return False
            pending = self._uploading.get(digest)
            if pending is None:
                mine = self._uploading[digest] = Future()
        if pending is not None:  # the same bytes under another name, being uploaded right now
            pending.result()
            return False
        key = file_key(digest)
        try:
            uploaded = False
            if not self._remembered(key, digest):
                if (listings.size(digest) if listings else self.store.head(key)) != size:
                    with self._lock:
                        self._queued_bytes += size
                    if data is None:
                        self.store.put_file(path, key, sha256=digest, on_bytes=self._sent, identity=identity,
                                            stop=self._stopping.is_set)
                    else:
                        check(self._stopping.is_set)
                        self.store.put_bytes(data, key)
                        self._sent(size)
                    uploaded = True
                self._confirmed(key, digest)
            with self._lock:
                self._present.add(digest)
            mine.set_result(None)
            return uploaded
        except BaseException as e:
            mine.set_exception(e)
            raise
        finally:
            with self._lock:
                del self._uploading[digest]

    def _remembered(self, key: str, digest: str | None = None) -> bool:
        """The database says the store holds ``key``, and this process has not doubted it."""
        with self._lock:
            if digest is not None and digest in self._doubted:
                return False
        return self.cache.stored(self._where, key)

    def _confirmed(self, key: str, digest: str | None = None) -> None:
        """The store was just seen to hold ``key``. Only then is the database's entry renewed:
        an entry trusted without asking must not extend its own life."""
        self.cache.mark_stored(self._where, key)
        if digest is not None:
            with self._lock:
                self._doubted.discard(digest)

    def _put_manifest(self, directory: str, entries: list[tree.Entry], done: dict[str, tuple[str, int]]) -> str:
        listed = []
        for e in entries:
            item: dict = {"path": os.path.relpath(e.path, directory)}
            if e.kind == tree.FILE:
                digest, size = done[e.path]
                item.update(size=size, sha256=digest, mode=e.mode, mtime_ns=e.mtime_ns)
            elif e.kind == tree.LINK:
                item.update(link=e.link)
            else:
                item.update(dir=True, mode=e.mode, mtime_ns=e.mtime_ns)
            listed.append(item)
        data = manifest_bytes(listed)
        key = dir_key(hashlib.sha256(data).hexdigest())
        if not self._remembered(key):
            if self.store.head(key) != len(data):
                self.store.put_bytes(data, key)
            self._confirmed(key)
        return self.store.url(key)

    # ------------------------------------------------------------------ outputs

    def fetch_file(self, key: str, dest: str, size: int | None = None) -> None:
        """Download one object to ``dest`` (temp name beside it, checked, renamed)."""
        self.store.get_file(key, dest, size, sha256=cas_digest(key))

    def fetch_dir(
        self, key_prefix: str, dest: str, share: Collection[str] = (), only: Collection[str] | None = None
    ) -> int:
        """Every object under ``key_prefix``/ (of the top-level names in ``only``, when given) to
        ``dest``/<relative path>, built in a temporary directory beside ``dest`` and renamed
        into place: it arrives whole or not at all. Returns the bytes fetched.

        The files under the top-level names in ``share`` (outputs another task will read) are
        also copied, inside the store, to their content address, so that staging them for that
        task finds them there and sends nothing."""
        key_prefix = key_prefix.strip("/")
        objects = self.store.list(key_prefix)
        dest = os.path.abspath(dest)
        parent = os.path.dirname(dest)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.crank-", dir=parent)
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; outputs get the usual mode
            futures = {}
            for key, size in objects:
                relative = key[len(key_prefix) + 1:]
                parts = relative.split("/")
                if only is not None and parts[0] not in only:
                    continue
                if not relative or any(p in ("", ".", "..") for p in parts):
                    raise CrankError(f"{self.store.url(key)}: not a usable file name below {dest}")
                target = os.path.join(tmp, *parts)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shared = parts[0] in share
                futures[key] = self._pool.submit(self._fetch, key, target, size, shared)
            _wait_all(futures)
            install(tmp, dest)
            return sum(size for key, size in objects if key in futures)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _fetch(self, key: str, target: str, size: int, shared: bool) -> None:
        digest = self.store.get_file(key, target, size, digest=shared)
        if digest is not None:
            self._share(key, digest, size)

    def _share(self, key: str, digest: str, size: int) -> None:
        """Put the object ``key``, whose content has ``digest``, under its content address."""
        with self._lock:
            if digest in self._present or digest in self._uploading:
                return
        cas = file_key(digest)
        if not self._remembered(cas, digest):
            try:
                if self.store.head(cas) != size:
                    self.store.copy(key, cas)
            except CrankError:
                return  # e.g. above a store's copy limit: staging uploads it when it is needed
            self._confirmed(cas, digest)
        with self._lock:
            self._present.add(digest)

    # ------------------------------------------------------------------ reporting

    def summary(self) -> str:
        """One line for the run."""
        with self._lock:
            s = self.stats
            return (
                f"staging: {s.files} files, {human_bytes(s.bytes_sent)} sent, "
                f"{human_bytes(s.bytes_deduplicated)} already in store, {s.seconds:.1f} s"
            )

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _sent(self, n: int) -> None:
        message = None
        with self._lock:
            self._sent_bytes += n
            now = time.monotonic()
            if self._progress and now - self._last_report >= self._progress_interval:
                self._last_report = now
                message = (
                    f"staging: {human_bytes(self._sent_bytes)} of "
                    f"{human_bytes(self._queued_bytes)} uploaded"
                )
        if message:
            self._progress(message)

    def _begin(self) -> None:
        with self._lock:
            if self._active == 0:
                self._active_since = time.monotonic()
                self._last_report = self._active_since
            self._active += 1

    def _end(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self.stats.seconds += time.monotonic() - self._active_since


def _wait_all(futures: dict) -> dict:
    """Results of all futures; waits for every one before raising the first error, so nothing
    is still running for this call when it returns."""
    results, error = {}, None
    for name, future in futures.items():
        try:
            results[name] = future.result()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            error = error or e
    if error is not None:
        raise error
    return results


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask
