"""sha256 of local files, streamed, with a cache so that an unchanged file is never hashed twice.

The cache is a small SQLite file (WAL mode) keyed by the file's real path and its
(size, mtime_ns, inode, device, ctime_ns). A user can set the mtime back (``cp -p``, ``touch -r``,
an archive extracted with stored mtimes) after rewriting a file in place, but not the ctime: the
kernel sets it to the current time on every change of content or metadata, so a rewritten file
never matches its old entry. Two runs sharing a workdir share the file safely (SQLite locking,
busy timeout).

The same file remembers which objects a store was seen to hold (table ``stored_v1``), so that
a new run does not ask the store about each unchanged input again; an entry is trusted for
STORED_TRUST_NS only.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable

from ..errors import CrankError

# Large reads keep the per-call overhead negligible; hashlib releases the GIL on big buffers, so
# hashing in several threads uses several cores.
BLOCK_SIZE = 1 << 20
# A file changed this recently may be changed again within the same timestamp tick (a few ms on
# Linux) without its stat changing: such a digest is used but not cached ("racy git" problem).
RACY_NS = 2_000_000_000
# The table of the current key. Caches written before the ctime was part of the key hold a table
# "digests" keyed without it: it is left alone (an older crank sharing the workdir keeps using
# it) and never read, so each file is hashed once more after an upgrade.
TABLE = "digests_v2"
# (store, key) -> when the store was last seen to hold the object (uploaded, or looked up). A
# table of its own: the digest tables keep their meaning, and an older crank never reads it.
STORED = "stored_v1"
# How long such an entry is trusted without asking the store again. Objects removed within this
# time (by hand, by a lifecycle rule) fail the task that needs them in SYSTEM_ERROR; the TES
# backend forgets its inputs and submits it once more, which sends them again.
STORED_TRUST_NS = 7 * 24 * 3600 * 1_000_000_000

# (size, mtime_ns, inode, device, ctime_ns)
Identity = tuple[int, int, int, int, int]


class Stopped(CrankError):
    """Hashing or uploading was asked to stop (the run is ending)."""

    def __init__(self) -> None:
        super().__init__("staging stopped: crank is shutting down")


def check(stop: Callable[[], bool] | None) -> None:
    """Raise Stopped when ``stop`` says so: called between blocks of long work."""
    if stop is not None and stop():
        raise Stopped()


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in large blocks (never the whole file in memory)."""
    digest, _ = _hash_with_stat(path)
    return digest


def file_identity(st: os.stat_result) -> Identity:
    """What the cache compares: a change to the content changes at least one of these, the
    ctime even when the size is kept and the mtime is set back."""
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns)


def recently_changed(identity: Identity) -> bool:
    """Changed so recently that a further change could leave the same stat (see RACY_NS).
    Both times count: ``cp -p`` leaves an old mtime and a new ctime."""
    return time.time_ns() - max(identity[1], identity[4]) < RACY_NS


def _open_regular(path: str):
    """``path`` opened for reading, unbuffered, if it is a regular file; OSError otherwise.
    Opened without blocking: a FIFO put where a file was would block open() until someone
    writes to it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file (a FIFO, socket or device is not read)")
    return open(fd, "rb", buffering=0)


def _hash_with_stat(path: str, stop: Callable[[], bool] | None = None) -> tuple[str, os.stat_result]:
    """Hash a file and return the stat it was hashed under. The stat is taken on the open file
    before and after reading: a file written to meanwhile is refused instead of hashed wrong.
    ``stop`` is asked between blocks (see check)."""
    h = hashlib.sha256()
    try:
        with _open_regular(path) as f:
            before = os.fstat(f.fileno())
            # a buffer no larger than the file: zeroing a whole block for each small file of
            # a cohort cost more CPU than hashing it
            buf = bytearray(max(1, min(BLOCK_SIZE, before.st_size)))
            view = memoryview(buf)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while n := f.readinto(buf):
                h.update(view[:n])
                check(stop)
            after = os.fstat(f.fileno())
    except OSError as e:
        raise CrankError(f"cannot read {path}: {e.strerror or e}") from None
    _unchanged(path, before, after)
    return h.hexdigest(), after


def _unchanged(path: str, before: os.stat_result, after: os.stat_result, read: int | None = None) -> Identity:
    """The identity of the file read at ``path``, whose stat was ``before`` when it was opened
    and ``after`` once read (``read`` bytes of it, when counted); a file written to meanwhile
    is refused."""
    identity = file_identity(after)
    if file_identity(before) != identity or read not in (None, identity[0]):
        raise CrankError(f"{path} changed while it was being read; is something still writing it?")
    return identity


def _retry_while_locked(setup, seconds: float = 30.0) -> None:
    """Run ``setup``, again while another process holds the database: switching a new
    database to WAL answers "locked" at once, without waiting on the busy timeout, when
    two runs open it at the same moment."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return setup()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


class DigestCache:
    """sha256 of files, cached in a SQLite file by (real path, size, mtime_ns, inode, device,
    ctime_ns)."""

    def __init__(self, path: str):
        self.path = path
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            # One connection shared by the threads of this process, guarded by _lock; other
            # processes get SQLite's own locking, with a generous busy timeout.
            self._db = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
            _retry_while_locked(self._setup)
        except sqlite3.Error as e:
            raise CrankError(f"digest cache {path}: {e}; remove the file to start a new cache") from None

    def _setup(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} ("
            " path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, inode INTEGER,"
            " dev INTEGER, ctime_ns INTEGER, sha256 TEXT NOT NULL)"
        )
        self._db.execute(
            f"CREATE TABLE IF NOT EXISTS {STORED} ("
            " store TEXT NOT NULL, key TEXT NOT NULL, confirmed_ns INTEGER NOT NULL,"
            " PRIMARY KEY (store, key)) WITHOUT ROWID"
        )

    def lookup(self, path: str) -> str | None:
        """The cached digest of ``path`` if the file is unchanged since it was hashed."""
        return self._lookup(os.path.realpath(path))[0]

    def _lookup(self, real: str, st: os.stat_result | None = None) -> tuple[str | None, Identity]:
        try:
            identity = file_identity(st or os.stat(real))
        except OSError as e:
            raise CrankError(f"cannot read {real}: {e.strerror or e}") from None
        with self._lock:
            row = self._db.execute(
                f"SELECT size, mtime_ns, inode, dev, ctime_ns, sha256 FROM {TABLE} WHERE path = ?",
                (real,),
            ).fetchone()
        if row is not None and tuple(row[:5]) == identity:
            return row[5], identity
        return None, identity

    def cached(self, path: str, st: os.stat_result | None = None) -> tuple[str, Identity] | None:
        """The cached digest of ``path`` and the identity (see file_identity) it was cached
        under, when the file is unchanged since it was hashed; else None. ``st``: the file's
        stat when the caller has just taken it."""
        digest, identity = self._lookup(os.path.realpath(path), st)
        if digest is None:
            return None
        with self._lock:
            self.hits += 1
        return digest, identity

    def digest(self, path: str) -> str:
        """sha256 hex of ``path``; hashed only when the cache has no entry for this exact file."""
        return self.digest_with_identity(path)[0]

    def digest_with_identity(
        self, path: str, cached: bool = True, stop: Callable[[], bool] | None = None,
    ) -> tuple[str, Identity]:
        """The digest and the identity (see file_identity) of the file it is the digest of,
        so that a later reader can tell whether the file is still the same. ``cached=False``
        hashes the file whatever the cache holds, and replaces the entry; ``stop`` ends the
        hashing early (see check)."""
        if cached and (found := self.cached(path)) is not None:
            return found
        real = os.path.realpath(path)
        digest, st = _hash_with_stat(real, stop)
        identity = file_identity(st)
        self._remember(real, identity, digest)
        return digest, identity

    def read_small(self, path: str, limit: int) -> tuple[str, Identity, bytes] | None:
        """The digest, identity and content of ``path`` when it holds at most ``limit`` bytes
        (else None, having read nothing), from one read: a caller that uploads these bytes
        sends exactly what was hashed, without reading and hashing the file again. The digest
        is cached as by digest_with_identity."""
        real = os.path.realpath(path)
        try:
            with _open_regular(real) as f:
                before = os.fstat(f.fileno())
                if before.st_size > limit:
                    return None
                data = f.read()
                after = os.fstat(f.fileno())
        except OSError as e:
            raise CrankError(f"cannot read {real}: {e.strerror or e}") from None
        identity = _unchanged(real, before, after, read=len(data))
        digest = hashlib.sha256(data).hexdigest()
        self._remember(real, identity, digest)
        return digest, identity, data

    def _remember(self, real: str, identity: Identity, digest: str) -> None:
        """Cache the digest just computed of the file at ``real``, unless it changed too
        recently for its stat to tell a later change (see RACY_NS)."""
        with self._lock:
            self.misses += 1
            if recently_changed(identity):
                return
            try:
                self._db.execute(
                    f"INSERT OR REPLACE INTO {TABLE} VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (real, *identity, digest),
                )
            except sqlite3.Error:
                pass  # a cache that cannot be written only costs a rehash next time

    def stored(self, store: str, key: str) -> bool:
        """Whether ``store`` was seen to hold ``key`` less than STORED_TRUST_NS ago."""
        with self._lock:
            row = self._db.execute(
                f"SELECT confirmed_ns FROM {STORED} WHERE store = ? AND key = ?", (store, key),
            ).fetchone()
        # an entry from the future (a clock set back) is not trusted either
        return row is not None and 0 <= time.time_ns() - row[0] < STORED_TRUST_NS

    def mark_stored(self, store: str, key: str) -> None:
        """``store`` holds ``key`` now (it was uploaded, copied or looked up)."""
        with self._lock:
            try:
                self._db.execute(
                    f"INSERT OR REPLACE INTO {STORED} VALUES (?, ?, ?)", (store, key, time.time_ns()),
                )
            except sqlite3.Error:
                pass  # an entry that cannot be written only costs a lookup next time

    def forget_stored(self, store: str, keys: Iterable[str]) -> None:
        """Ask the store about these keys again next time (something may have removed them)."""
        with self._lock:
            try:
                self._db.executemany(
                    f"DELETE FROM {STORED} WHERE store = ? AND key = ?", [(store, k) for k in keys],
                )
            except sqlite3.Error:
                pass

    def close(self) -> None:
        with self._lock:
            self._db.close()
