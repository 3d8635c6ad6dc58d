"""One object store (S3 and S3-compatible, Google Cloud Storage, Azure Blob, or a shared
filesystem via file://) under a prefix, through obstore.

Keys are relative to the prefix. Writes are atomic: an S3 PUT or a completed multipart upload
appears whole or not at all, and obstore's file:// store writes a staging file and renames it.
Downloads go to a temporary name beside the target and are renamed only once complete and checked.
Errors become one line (CrankError), transient ones after obstore's retries BackendUnavailable.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import BaseError
from obstore.store import from_url as obstore_from_url

from ..errors import BackendUnavailable, CrankError
from .digest import Identity, check, file_identity, recently_changed
from .memory import MemoryBudget, limit_heap_growth
from .transfers import Progress, Stalled, Transfers
from .store_errors import explain, first_line

# Scheme of a storage prefix -> the kind of store obstore builds for it.
SCHEMES = {
    "s3": "s3", "s3a": "s3",
    "gs": "gs",
    "az": "az", "azure": "az", "abfs": "az", "abfss": "az",
    "file": "file",
}

# Files up to PART_SIZE go in one PUT from memory; larger ones as multipart uploads of PART_SIZE
# parts, PART_CONCURRENCY in flight. One multipart upload at that concurrency already saturates
# a single S3 server here (measured: ~160 MiB/s, as fast as 8 parallel uploads).
PART_SIZE = 8 << 20
PART_CONCURRENCY = 6
# Upload buffers of all threads together stay within MEMORY_PARTS * PART_SIZE (64 MiB), so
# staging many large files at once cannot grow the process without bound.
MEMORY_PARTS = PART_CONCURRENCY + 2
DOWNLOAD_CHUNK = 4 << 20

# Transient failures (connection errors, timeouts, 5xx) are retried by obstore with exponential
# backoff and jitter.
RETRY = {
    "max_retries": 6,
    "retry_timeout": timedelta(minutes=2),
    "backoff": {"init_backoff": timedelta(milliseconds=200), "max_backoff": timedelta(seconds=10), "base": 2},
}
# Every request but a download sends or receives at most PART_SIZE bytes, so its whole time is
# bounded: the read timeout covers reading an answer only, and a server that stops reading a
# PUT's body (measured: SeaweedFS with its volumes full, for more than 7 minutes) would
# otherwise hold the upload until the overall timeout. 10 minutes still lets an 8 MiB part
# through at 14 KB/s.
CLIENT = {"connect_timeout": "5s", "read_timeout": "60s", "timeout": "10m"}
# A download of a large object is one request: its overall timeout is generous, and a stalled
# connection is caught by the read timeout instead.
DOWNLOAD_CLIENT = {**CLIENT, "timeout": "6h"}
# Uploads and downloads run through transfers.Transfers, so that Ctrl-C need not wait for them.
# An upload whose parts stop moving is dropped after STALL_S: the memory budget keeps at most
# MEMORY_PARTS parts (64 MiB) of all uploads in flight, so a link above 64 MiB / 300 s
# (about 1.8 Mbit/s) always moves a part within it. A download has no such limit: its read
# timeout catches a connection on which no byte moves.
STALL_S = 300.0
STALL_TOLERANCE_S = 120.0
# check() runs before any job: an unreachable store should be reported within seconds.
PROBE_RETRY = {
    "max_retries": 2,
    "retry_timeout": timedelta(seconds=10),
    "backoff": {"init_backoff": timedelta(milliseconds=200), "max_backoff": timedelta(seconds=1), "base": 2},
}
PROBE_CLIENT = {"connect_timeout": "3s", "timeout": "15s"}
PROBE_PREFIX = "crank-probe"


class ContentChanged(CrankError):
    """The file read for an upload is not the one its digest was computed from."""

    def __init__(self, path: str):
        super().__init__(
            f"{path} changed after crank computed its sha256 (its size, times or content differ "
            "now); is something still writing it? Run again once it is complete"
        )


def is_loopback(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Store:
    """Objects under one prefix URL, e.g. ``s3://bucket/some/prefix`` or ``file:///shared/dir``."""

    def __init__(self, prefix: str, kind: str, endpoint: str | None, options: dict):
        self.prefix = prefix
        self.kind = kind
        self.endpoint = endpoint
        self._options = options
        limit_heap_growth()
        self._store = self._build(RETRY, CLIENT)
        self._downloads = self._build(RETRY, DOWNLOAD_CLIENT)
        self._budget = MemoryBudget(MEMORY_PARTS)
        self._transfers = Transfers()
        # an upload that hands over no part (or whole object) for stall_s is dropped and
        # tried again, until it has stalled for tolerance_s since it first did
        self.stall_s = STALL_S
        self.tolerance_s = STALL_TOLERANCE_S

    def abandon(self) -> None:
        """Drop every upload and download in flight, now and later (digest.Stopped): for a
        run that is ending, which should not wait for a store that does not answer."""
        self._transfers.abandon()

    @classmethod
    def from_url(cls, prefix: str, endpoint: str | None = None) -> Store:
        """A store for ``s3://``, ``gs://``, ``az://`` or ``file:///abs/dir`` prefixes.

        S3 credentials and region come from the standard ``AWS_*`` variables, the endpoint from
        ``endpoint`` or ``AWS_ENDPOINT_URL``; plain http is allowed for loopback endpoints."""
        prefix = prefix.strip().rstrip("/")
        scheme = prefix.split("://", 1)[0].lower() if "://" in prefix else ""
        kind = SCHEMES.get(scheme)
        if kind is None:
            raise CrankError(
                f"storage prefix {prefix!r}: unknown scheme; use s3://bucket/path, gs://bucket/path, "
                "az://container/path or file:///absolute/dir"
            )
        options: dict = {}
        if kind == "s3":
            endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
            if endpoint:
                options["endpoint"] = endpoint
                if endpoint.startswith("http://") and is_loopback(endpoint):
                    options["allow_http"] = True
        elif kind == "file":
            path = prefix[len(scheme) + 3:]
            if not path.startswith("/"):
                raise CrankError(f"storage prefix {prefix!r}: a file:// prefix needs an absolute path (file:///dir)")
            if not os.path.isdir(path):
                raise CrankError(f"{prefix}: directory does not exist; create it or fix the storage prefix")
            endpoint = None
        else:
            endpoint = None
        return cls(prefix, kind, endpoint, options)

    def _build(self, retry: dict, client: dict):
        try:
            if self.kind == "file":
                return obstore_from_url(self.prefix)
            client = dict(client)
            config = dict(self._options)
            if config.pop("allow_http", False):
                client["allow_http"] = True
            return obstore_from_url(self.prefix, client_options=client, retry_config=retry, **config)
        except BaseError as e:
            raise self._error(e, "opening") from None
        except ValueError as e:
            raise CrankError(f"storage prefix {self.prefix!r}: {first_line(str(e))}") from None

    # ------------------------------------------------------------------ errors

    def _error(self, e: BaseException, doing: str, key: str | None = None) -> CrankError:
        """One line for the user saying what failed and what to do; never a credential."""
        return explain(e, doing, self.prefix, self.url(key) if key else self.prefix, self.endpoint)

    # ------------------------------------------------------------------ operations

    @property
    def location(self) -> str:
        """Names this store: its prefix, and the endpoint of an S3-compatible server (the same
        bucket name on two servers is two stores)."""
        return f"{self.prefix} at {self.endpoint}" if self.endpoint else self.prefix

    def url(self, key: str) -> str:
        """Full URL of ``key``, e.g. ``s3://bucket/prefix/cas/sha256/<hex>``."""
        return f"{self.prefix}/{key}"

    def check(self) -> None:
        """Prove the store is reachable and writable: put and delete a small probe object."""
        probe = self._build(PROBE_RETRY, PROBE_CLIENT)
        key = f"{PROBE_PREFIX}/{uuid.uuid4().hex}"
        try:
            obstore.put(probe, key, b"crank probe\n", use_multipart=False)
            obstore.delete(probe, key)
        except (BaseError, OSError) as e:
            raise self._error(e, "writing a probe object") from None

    def head(self, key: str) -> int | None:
        """Size of the object under ``key``, or None when there is none."""
        try:
            return int(obstore.head(self._store, key)["size"])
        except FileNotFoundError:
            return None
        except (BaseError, OSError) as e:
            raise self._error(e, "looking up an object", key) from None

    def put_file(
        self,
        path: str,
        key: str,
        sha256: str | None = None,
        on_bytes: Callable[[int], None] | None = None,
        identity: Identity | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        """Upload ``path`` to ``key``, atomically; multipart for files above PART_SIZE.

        A file changed after it was hashed must never land under a content address that is not
        its own: the upload is abandoned (nothing appears under ``key``) when the bytes sent may
        differ from ``sha256``. With ``identity`` (the file's digest.file_identity when it
        was hashed) a large file is checked by stat when opened and at its end, which
        costs nothing; it is hashed again on the way only when it was modified too recently for
        its stat to tell (or without ``identity``). ``on_bytes(n)`` reports progress. ``stop``
        is asked before each part (see digest.check): the upload is then abandoned."""
        first_stall = None
        tries = 0
        while True:
            tries += 1
            try:
                return self._put_file_once(path, key, sha256, on_bytes, identity, stop)
            except Stalled:
                now = time.monotonic()
                first_stall = first_stall or now
                if now - first_stall >= self.tolerance_s:
                    raise BackendUnavailable(
                        f"{self._where()} took no part of the upload of {self.url(key)} for "
                        f"{self.stall_s:.0f} s, {tries} times: is it full or overloaded? "
                        "(--crank-storage-stall sets the wait)") from None

    def _put_file_once(self, path, key, sha256, on_bytes, identity, stop) -> None:
        try:
            size = os.stat(path).st_size
            if size <= PART_SIZE:
                with self._budget.take(1):
                    with open(path, "rb") as f:
                        data = f.read()
                    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
                        raise ContentChanged(path)
                    check(stop)
                    self._transfers.run(lambda progress: obstore.put(
                        self._store, key, data, use_multipart=False), self.stall_s)
                if on_bytes:
                    on_bytes(len(data))
            else:
                chunks = _chunks(path, sha256, identity, on_bytes, stop)
                # the parts in flight, plus the one being read and the one obstore buffers
                with self._budget.take(PART_CONCURRENCY + 2):
                    self._transfers.run(lambda progress: obstore.put(
                        self._store, key, _pulled(chunks, progress),
                        chunk_size=PART_SIZE, max_concurrency=PART_CONCURRENCY,
                    ), self.stall_s)
        except (CrankError, Stalled):
            raise
        except (BaseError, OSError) as e:
            if isinstance(e, OSError) and not isinstance(e, BaseError) and getattr(e, "filename", None) == path:
                raise CrankError(f"cannot read {path}: {e.strerror or e}") from None
            raise self._error(e, "uploading", key) from None

    def _where(self) -> str:
        return f"the store at {self.endpoint}" if self.endpoint else f"the store {self.prefix}"

    def put_bytes(self, data: bytes, key: str) -> None:
        """Upload a small object (e.g. a manifest) in one atomic PUT."""
        try:
            self._transfers.run(lambda progress: obstore.put(
                self._store, key, data, use_multipart=False), self.stall_s)
        except Stalled:
            raise BackendUnavailable(
                f"{self._where()} took no part of the upload of {self.url(key)} for "
                f"{self.stall_s:.0f} s: is it full or overloaded?") from None
        except (BaseError, OSError) as e:
            raise self._error(e, "uploading", key) from None

    def get_file(
        self, key: str, dest: str, size: int | None = None, sha256: str | None = None,
        digest: bool = False,
    ) -> str | None:
        """Download ``key`` to ``dest``: into a temporary name beside it, size (and digest, when
        given) checked, then renamed. ``dest`` is never left partial. Returns the sha256 of
        what was written when ``sha256`` or ``digest`` is given."""
        directory, name = os.path.split(os.path.abspath(dest))
        tmp = os.path.join(directory, f".{name}.crank-{uuid.uuid4().hex[:12]}.part")
        try:
            got = self._transfers.run(lambda progress: self._download(key, tmp, size, sha256, digest, progress))
            os.replace(tmp, dest)
            return got
        except CrankError:
            _remove(tmp)
            raise
        except (BaseError, OSError) as e:
            _remove(tmp)
            if isinstance(e, OSError) and not isinstance(e, BaseError) and getattr(e, "filename", None):
                raise CrankError(f"cannot write {dest}: {e.strerror or e}") from None
            raise self._error(e, "downloading", key) from None
        except BaseException:
            _remove(tmp)
            raise

    def _download(self, key: str, tmp: str, size: int | None, sha256: str | None, digest: bool,
                  progress: Progress) -> str | None:
        """``key`` into the file ``tmp``, checked; the sha256 of what was written when asked."""
        result = obstore.get(self._downloads, key)
        expected = int(result.meta["size"]) if size is None else size
        if size is not None and int(result.meta["size"]) != size:
            raise CrankError(f"{self.url(key)}: has {result.meta['size']} bytes, expected {size}")
        h = hashlib.sha256() if sha256 or digest else None
        written = 0
        with open(tmp, "wb") as f:
            for chunk in result.stream(min_chunk_size=DOWNLOAD_CHUNK):
                progress.moved()  # raises once the caller gave up: nothing more is written
                f.write(chunk)
                if h:
                    h.update(chunk)
                written += len(chunk)
        if written != expected:
            raise CrankError(f"{self.url(key)}: received {written} bytes, expected {expected}")
        got = h.hexdigest() if h else None
        if sha256 and got != sha256:
            raise CrankError(f"{self.url(key)}: content does not match its sha256 {sha256}")
        return got

    def copy(self, src: str, dst: str) -> None:
        """Copy an object inside the store; ``dst`` appears whole (one request on S3)."""
        try:
            obstore.copy(self._store, src, dst)
        except (BaseError, OSError) as e:
            raise self._error(e, "copying", src) from None

    def list(self, key_prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every object under ``key_prefix``/ (whole path segments: ``runs/a``
        does not match ``runs/ab``); keys relative to the store's prefix."""
        try:
            return [
                (meta["path"], int(meta["size"]))
                for batch in obstore.list(self._store, prefix=key_prefix.strip("/") or None)
                for meta in batch
            ]
        except FileNotFoundError:
            return []
        except (BaseError, OSError) as e:
            raise self._error(e, "listing", key_prefix) from None

    def list_group(self, key_prefix: str, start: str, limit: int) -> list[tuple[str, int]] | None:
        """(key, size) of the objects under ``key_prefix``/ whose name starts with ``start``, or
        None when there are more than ``limit`` of them. Reads only as far as the group goes:
        object stores list in key order from where they are asked to start (not file://)."""
        first = f"{key_prefix.strip('/')}/{start}"
        found: list[tuple[str, int]] = []
        try:
            for batch in obstore.list(self._store, prefix=key_prefix.strip("/"), offset=first, chunk_size=1000):
                for meta in batch:
                    if not meta["path"].startswith(first):
                        return found
                    found.append((meta["path"], int(meta["size"])))
                    if len(found) > limit:
                        return None
        except FileNotFoundError:
            pass
        except (BaseError, OSError) as e:
            raise self._error(e, "listing", first) from None
        return found

    def delete(self, key: str) -> None:
        """Delete ``key``; an absent object is not an error."""
        try:
            obstore.delete(self._store, key)
        except FileNotFoundError:
            pass
        except (BaseError, OSError) as e:
            raise self._error(e, "deleting", key) from None


def _chunks(
    path: str,
    sha256: str | None,
    identity: Identity | None,
    on_bytes: Callable[[int], None] | None,
    stop: Callable[[], bool] | None,
) -> Iterator[bytes]:
    """The file in PART_SIZE pieces. When the bytes read may not be those that hash to
    ``sha256``, raises before the last piece is handed over, so obstore aborts the multipart
    upload instead of completing it."""
    with open(path, "rb", buffering=0) as f:
        opened = file_identity(os.fstat(f.fileno()))
        if identity is not None and opened != identity:
            raise ContentChanged(path)
        h = hashlib.sha256() if sha256 and (identity is None or recently_changed(opened)) else None
        chunk = f.read(PART_SIZE)
        while chunk:
            check(stop)
            following = f.read(PART_SIZE)
            if h:
                h.update(chunk)
            if not following:
                changed = identity is not None and file_identity(os.fstat(f.fileno())) != identity
                if changed or (h and h.hexdigest() != sha256):
                    raise ContentChanged(path)
            yield chunk
            if on_bytes:
                on_bytes(len(chunk))
            chunk = following


def _pulled(chunks: Iterator[bytes], progress: Progress) -> Iterator[bytes]:
    """``chunks``, each pull counted as progress (obstore pulls the next part once one in
    flight is sent); once the caller gave up, the next pull ends the upload uncompleted."""
    for chunk in chunks:
        progress.moved()
        yield chunk


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
