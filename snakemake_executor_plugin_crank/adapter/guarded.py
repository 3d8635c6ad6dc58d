"""Writing where a job may have made links: the benchmark files crank writes and the
update() outputs it keeps and puts back, under a workdir every task can change.

A directory's real path is noted before the job runs (``note``); after the job, crank
writes there only while it leads to the same place, so a directory the job turned into a
link (to the user's home, say) is refused, while a user's own symlinked directory keeps
working. The file itself is replaced by rename, never written through a link or a hard
link, and never appears half-written. A kept update() output is copied as it is (a link as
the link, never what it leads to; a FIFO is refused, not waited on) into a fresh directory
under ``.snakemake/crank/backups``, reached through no link below the workdir."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass

from ..backends.logs import open_dir
from ..staging.install import install

BACKUPS = (".snakemake", "crank", "backups")


@dataclass(frozen=True)
class Place:
    path: str
    parent: str  # the real path of its directory before the job


@dataclass(frozen=True)
class Kept:
    place: Place
    copy: str


def note(path: str) -> Place:
    path = os.path.abspath(path)
    return Place(path, os.path.realpath(os.path.dirname(path)))


def write(place: Place, data: bytes) -> None:
    """``data`` as the file at ``place``; OSError when its directory leads elsewhere now."""
    fd = _open_parent(place)
    try:
        replace_at(fd, os.path.basename(place.path), data)
    finally:
        os.close(fd)


def replace_at(dir_fd: int, name: str, data: bytes) -> None:
    """``data`` as ``name`` in the open directory, by rename: whole or not at all."""
    tmp = f".{name}.crank-{uuid.uuid4().hex[:12]}"
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o666, dir_fd=dir_fd)
        with os.fdopen(out, "wb") as f:
            f.write(data)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def alias_at(dir_fd: int, name: str, alias: str) -> None:
    """``alias`` the same file as ``name`` in the open directory (a hard link, else a copy
    where the file system has none), by rename."""
    tmp = f".{alias}.crank-{uuid.uuid4().hex[:12]}"
    try:
        os.link(name, tmp, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise
        source = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        with os.fdopen(source, "rb") as f:
            return replace_at(dir_fd, alias, f.read())
    try:
        os.replace(tmp, alias, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def keep(path: str, workdir: str) -> Kept:
    """A copy of the update() output at ``path``; OSError when it cannot be made."""
    root = os.path.join(workdir, *BACKUPS)
    os.close(open_dir(root, workdir))
    kept = Kept(note(path), os.path.join(tempfile.mkdtemp(dir=root), "kept"))
    try:
        if os.path.islink(path):
            os.symlink(os.readlink(path), kept.copy)
        elif os.path.isdir(path):
            shutil.copytree(path, kept.copy, symlinks=True)
        else:
            shutil.copy2(path, kept.copy)
    except BaseException:
        drop(kept)
        raise
    return kept


def put_back(kept: Kept) -> None:
    """The kept copy at its path again, replacing what the failed job left; OSError (or
    CrankError) when its directory leads elsewhere now, the copy then stays."""
    os.close(_open_parent(kept.place))
    install(kept.copy, kept.place.path)
    drop(kept)


def drop(kept: Kept) -> None:
    shutil.rmtree(os.path.dirname(kept.copy), ignore_errors=True)


def _open_parent(place: Place) -> int:
    directory = os.path.dirname(place.path)
    now = os.path.realpath(directory)
    if now != place.parent:
        raise OSError(errno.ELOOP, f"{directory} leads to {now} now, not to {place.parent} as "
                      "before the job (did the job make it a link?); crank does not write there")
    return os.open(now, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
