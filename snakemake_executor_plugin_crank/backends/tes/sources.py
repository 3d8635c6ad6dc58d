"""The workflow's sources as one archive: a single TES input however many files a git
checkout tracks (a TES DIRECTORY input of thousands of objects makes every task fetch them
one by one, and Funnel v0.11 stalls on it).

The archive holds each file as ``<n>`` and a ``manifest`` of ``<n> <path>`` lines; it is
written the same way for the same files (sorted, no times, no owners), so its digest, and
with it the object stored by content, stays the same from run to run."""

from __future__ import annotations

import io
import os
import tarfile
from typing import Sequence

MANIFEST = "manifest"
PREFIX = "sources"  # the archives' keys in the store: sources/<sha256>


def write_archive(paths: Sequence[str], dest: str) -> None:
    """The archive of the files among ``paths`` (a path holding a line break cannot be a
    manifest line and is left out), written to ``dest`` whole."""
    files = sorted(p for p in set(paths) if os.path.isfile(p) and "\n" not in p)
    tmp = f"{dest}.part"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        lines = []
        for n, path in enumerate(files):
            info = tar.gettarinfo(path, arcname=str(n))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode &= 0o755
            with open(path, "rb") as f:
                tar.addfile(info, f)
            lines.append(f"{n} {path}\n")
        data = "".join(lines).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, dest)
