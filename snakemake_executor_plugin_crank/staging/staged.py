"""What a task holds for its inputs once they are staged, entry by entry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Staged:
    """One entry a task holds for its inputs, at the user's path ``path``: fetched from
    ``url`` (a local file's content, stored by its ``digest``; or an object already in
    storage, a directory of objects when ``remote_dir``), or made in the task as a
    directory (``directory``) or a symlink (``link``)."""

    path: str
    url: str = ""
    digest: str = ""  # sha256 of a local file's content (its object under cas/)
    size: int = 0  # bytes of a local file's content
    remote_dir: bool = False
    link: str = ""  # a symlink with this target text
    directory: bool = False
    # the client's permission bits and modification time; None for an object already in
    # storage (it carries neither)
    mode: Optional[int] = None
    mtime_ns: int = 0
    ancestor: bool = False  # a directory on the way to the others: its mode and time if it may

    @property
    def fetched(self) -> bool:
        return bool(self.url)
