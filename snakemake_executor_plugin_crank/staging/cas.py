"""The store's content-addressed layout, under its prefix (every file key has the same
length, so no key is a string prefix of another: Funnel fetches a key as a directory when a
longer key starts with it):

    cas/sha256/<64 hex>   a file, named by the sha256 of its content
    cas/dirs/<64 hex>     a directory manifest (JSON list of {path, size, sha256, mode,
                          mtime_ns} for a file, {path, link} for a symlink and {path, dir,
                          mode, mtime_ns} for a directory, named by its own sha256), written
                          after all the directory's files: it marks the directory complete
    runs/...              outputs, under keys the backend chooses

and what a group ``cas/sha256/<2 hex>`` holds, listed once (``Listings``)."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import Future

from .store import Store

FILES = "cas/sha256"
DIRS = "cas/dirs"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

# A stage() call (stage.py) of this many files or more learns which of them the store holds by listing
# each group cas/sha256/<2 hex> it needs, once, instead of a HEAD per file: the HEADs of a
# cohort of small files slowed its first stage to 0.5-0.7x of a plain parallel upload (the
# server's CPU is shared). A group is listed up to LISTED_PER_GROUP times the files the call
# expects in it (at least LIST_PAGE keys), so a listing never takes more requests than the
# HEADs it saves, nor much memory; a larger group is looked up file by file.
LIST_FROM = 1024
LISTED_PER_GROUP = 2
LIST_PAGE = 1000  # keys in one answer to a listing


def file_key(sha256: str) -> str:
    return f"{FILES}/{sha256}"


def dir_key(sha256: str) -> str:
    return f"{DIRS}/{sha256}"


def cas_digest(key: str) -> str | None:
    """The sha256 a content-addressed file key names, else None."""
    head, _, hexdigest = key.rpartition("/")
    return hexdigest if head == FILES and _HEX64.match(hexdigest) else None


def manifest_bytes(entries: list[dict]) -> bytes:
    """Canonical JSON of a directory manifest: the same directory always gives the same bytes."""
    ordered = sorted(entries, key=lambda e: e["path"])
    return json.dumps(ordered, sort_keys=True, separators=(",", ":")).encode()


class Listings:
    """What the store holds in each group cas/sha256/<2 hex>, listed once for one stage() call
    (see LIST_FROM) when a file of that group is first looked up."""

    def __init__(self, store: Store, limit: int):
        self._store = store
        self._limit = limit
        self._lock = threading.Lock()
        self._groups: dict[str, Future] = {}  # "4f" -> {digest: size}, or None: too large to list

    def size(self, digest: str) -> int | None:
        """The size of the object of ``digest`` in the store, None when there is none."""
        with self._lock:
            listing = self._groups.get(digest[:2])
            if listing is None:
                mine = self._groups[digest[:2]] = listing = Future()
            else:
                mine = None
        if mine is not None:
            try:
                found = self._store.list_group(FILES, digest[:2], self._limit)
                mine.set_result(None if found is None else {cas_digest(k): n for k, n in found})
            except BaseException as e:
                mine.set_exception(e)
                raise
        sizes = listing.result()
        return self._store.head(file_key(digest)) if sizes is None else sizes.get(digest)
