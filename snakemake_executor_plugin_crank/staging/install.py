"""Putting a finished file or directory at its final path, whole or not at all."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading

from ..errors import CrankError


def install(src: str, dest: str) -> None:
    """Move ``src`` (a file or a directory) to ``dest``, replacing whatever is there: by
    rename, so nothing half-written ever appears at ``dest``; from another file system by a
    copy to a temporary name beside ``dest`` first."""
    parent = os.path.dirname(dest)
    try:
        os.makedirs(parent, exist_ok=True)
        try:
            _replace(src, dest)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            name = f".{os.path.basename(dest)}.crank-{os.getpid()}-{threading.get_ident()}"
            tmp = os.path.join(parent, name)
            if os.path.isdir(src):
                shutil.copytree(src, tmp, symlinks=True)
            else:
                shutil.copy2(src, tmp)
            _replace(tmp, dest)
    except OSError as e:
        raise CrankError(f"cannot put an output at {dest}: {e.strerror or e}") from None


def install_link(target: str, dest: str) -> None:
    """Make ``dest`` a symlink to ``target`` (its text, as given), replacing whatever is
    there, by rename."""
    parent = os.path.dirname(dest)
    tmp = os.path.join(parent, f".{os.path.basename(dest)}.crank-{os.getpid()}-{threading.get_ident()}")
    try:
        os.makedirs(parent, exist_ok=True)
        os.symlink(target, tmp)
        try:
            _replace(tmp, dest)
        except OSError:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise CrankError(f"cannot put an output at {dest}: {e.strerror or e}") from None


def _replace(src: str, dest: str) -> None:
    if os.path.isdir(dest) and not os.path.islink(dest):
        # a directory cannot be renamed over: move it aside first, and back when that fails
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.crank-old-", dir=os.path.dirname(dest))
        os.rename(dest, os.path.join(old, "d"))
        try:
            os.rename(src, dest)
        except OSError:
            os.rename(os.path.join(old, "d"), dest)
            os.rmdir(old)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    if os.path.isdir(src) and os.path.lexists(dest):
        os.unlink(dest)  # rename() puts a directory only where nothing is
    os.replace(src, dest)


def merge_into(src: str, dest: str) -> None:
    """Move what the directory ``src`` holds into the directory ``dest``, entry by entry:
    what ``src`` has replaces what is there under the same name, nothing else in ``dest`` goes
    away; ``dest`` gets ``src``'s mode. Where ``dest`` is not a directory (or a symlink to
    one: never followed), ``src`` replaces it whole."""
    if not os.path.isdir(dest) or os.path.islink(dest):
        install(src, dest)
        return
    try:
        for entry in os.scandir(src):
            target = os.path.join(dest, entry.name)
            if entry.is_dir(follow_symlinks=False) and os.path.isdir(target) and not os.path.islink(target):
                merge_into(entry.path, target)
            elif entry.is_symlink():
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                os.replace(entry.path, target)
            else:
                install(entry.path, target)
        shutil.copymode(src, dest)
        os.rmdir(src)
    except OSError as e:
        raise CrankError(f"cannot put an output at {dest}: {e.strerror or e}") from None
