"""What a finished TES task left: its logs, its exit code and its products, each product
installed at its path whole or not at all."""

from __future__ import annotations

import os
import shutil
import stat
from typing import Collection, Iterable, Mapping, Optional, Sequence

import tes

from ...staging.install import install, install_link
from ...staging.stage import Stager
from ...task import TaskResult, TaskSpec
from ..logs import save_logs
from . import layout


class Collector:
    """Downloads through ``fetcher`` into directories under ``tmp_root``."""

    def __init__(self, fetcher: Stager, tmp_root: str):
        self.fetcher = fetcher
        self.tmp_root = tmp_root

    def collect(self, full: tes.Task, key: str, handle: str, task: TaskSpec) -> TaskResult:
        """The outcome of ``task``, whose terminal TES task is ``full`` and whose objects lie
        under ``key``."""
        state = full.state or "UNKNOWN"
        last = full.logs[-1] if full.logs else tes.TaskLog()
        exec_log = last.logs[-1] if last.logs else tes.ExecutorLog()
        seconds = ((exec_log.end_time - exec_log.start_time).total_seconds()
                   if exec_log.start_time and exec_log.end_time else None)
        system = [line for entry in (last.system_logs or []) for line in entry.splitlines()]
        if state == "COMPLETE":
            tmp: Optional[str] = self._download(key, handle, task)
        else:
            tmp = self._download_logs(key, handle, task)
        try:
            stdout, stderr = (os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")) if tmp else ("", "")
            files, tail = save_logs(
                task,
                _read(stdout) if tmp and os.path.exists(stdout) else _text(exec_log.stdout),
                _read(stderr) if tmp and os.path.exists(stderr) else _text(exec_log.stderr),
            )
            if state != "COMPLETE":
                reason = f"TES state {state}"
                if system:
                    reason += ": " + system_summary(system)
                return TaskResult(ok=False, exit_code=exec_log.exit_code, reason=reason, stderr_tail=tail,
                                  log_files=files, seconds=seconds)
            code = _exit_code(tmp)
            if code is None:
                return TaskResult(ok=False, exit_code=exec_log.exit_code,
                                  reason="the task came back without its exit code (TES state COMPLETE)",
                                  stderr_tail=tail, log_files=files, seconds=seconds)
            # a failed job's own log files come back too (run.sh collected only those)
            self._install(tmp, task, None if code == 0 else layout.log_names(task))
            return TaskResult(ok=code == 0, exit_code=code, stderr_tail=tail, log_files=files,
                              seconds=seconds)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)

    def _download(self, key: str, handle: str, task: TaskSpec, only: Optional[Collection[str]] = None) -> str:
        """Everything the task uploaded (of the top-level names in ``only``, when given), in a
        fresh local directory (whole or nothing); the outputs a later task reads are also put
        under their content address."""
        dest = os.path.join(self.tmp_root, handle)
        if os.path.exists(dest):
            shutil.rmtree(dest)
        share = {layout.product_name(n) for n, p in enumerate(task.products) if p.read_later}
        self.fetcher.fetch_dir(key, dest, share, only)
        return dest

    def _download_logs(self, key: str, handle: str, task: TaskSpec) -> Optional[str]:
        """stdout/stderr of a task that did not complete, where the server uploaded them
        (Funnel uploads nothing after a failed executor)."""
        dest = self._download(key, handle, task, only=("stdout", "stderr", layout.EXIT))
        if os.listdir(dest):
            return dest
        os.rmdir(dest)
        return None

    def _install(self, tmp: str, task: TaskSpec, only: Optional[Collection[str]] = None) -> None:
        """Move every product the task made (of the names in ``only``, when given) into
        place."""
        try:
            with open(os.path.join(tmp, layout.INDEX)) as f:
                index = layout.read_index(f.read())
        except FileNotFoundError:
            index = layout.Index({}, {}, {}, {})
        for n, product in enumerate(task.products):
            name = layout.product_name(n)
            kind = index.kinds.get(name)
            if kind is None or (only is not None and name not in only):
                continue  # not made: Snakemake reports missing outputs itself
            src = os.path.join(tmp, name)
            if kind == "l":
                install_link(_link_target(src), product.path)
                continue
            if kind == "d":
                os.makedirs(src, exist_ok=True)
                for sub in index.subdirs.get(name, []):
                    os.makedirs(os.path.join(src, sub), exist_ok=True)
            _restore(src, index.links.get(name, []), index.modes.get(name, {}))
            install(src, product.path)


def _restore(root: str, links: Sequence[str], modes: Mapping[str, int]) -> None:
    """Turn the files standing for symlinks back into symlinks and give every file and
    directory its mode, below the downloaded product ``root``. The index comes from the task:
    nothing is changed through a symlink (a path whose real path is not itself) or outside
    ``root``; directories last, deepest first, so a read-only one is filled before."""
    root = os.path.realpath(root)

    def plain(sub: str, kind: int) -> Optional[str]:
        path = os.path.normpath(os.path.join(root, sub))
        try:
            is_kind = stat.S_IFMT(os.lstat(path).st_mode) == kind
        except OSError:
            return None
        return path if is_kind and os.path.realpath(path) == path else None

    directories = {sub: mode for sub, mode in modes.items() if plain(sub, stat.S_IFDIR)}
    for sub, mode in modes.items():
        path = plain(sub, stat.S_IFREG)
        if path and sub not in links:
            os.chmod(path, mode)
    for sub in links:
        path = plain(sub, stat.S_IFREG)
        if path:
            target = _link_target(path)
            os.unlink(path)
            os.symlink(target, path)
    for sub in sorted(directories, key=lambda s: -s.count("/") - (s != ".")):
        path = plain(sub, stat.S_IFDIR)
        if path:
            os.chmod(path, directories[sub])


def _link_target(path: str) -> str:
    """The target text of a symlink the task sent as a file holding it."""
    with open(path, "rb") as f:
        return os.fsdecode(f.read())


def system_summary(lines: Sequence[str], limit: int = 3) -> str:
    """The server's own error lines (Funnel: logfmt with level='error'), else its last lines."""
    errors = [line for line in lines if "level='error'" in line or 'level="error"' in line
              or "level=error" in line]
    chosen = (errors or list(lines))[-limit:]
    return " | ".join(line if len(line) <= 300 else line[:297] + "..." for line in chosen)


def _read(path: str) -> Iterable[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


def _text(value: Optional[str]) -> Iterable[bytes]:
    return [value.encode()] if value else []


def _exit_code(tmp: Optional[str]) -> Optional[int]:
    try:
        with open(os.path.join(tmp, layout.EXIT)) as f:
            return int(f.read().strip())
    except (OSError, ValueError, TypeError):
        return None
