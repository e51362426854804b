"""Files and directories that appear whole or not at all.

A file: write a temporary sibling, then rename it over the target (``rename(2)`` is atomic within a
directory), so a killed process never leaves a half-written file that looks finished.

A directory (``AtomicDirectory``, the child checkpoint): built inside ``<path>.tmp-<host>-<pid>-<id>``
and renamed to ``path`` only when complete. An exception removes the temporary directory; after a
kill it stays, under a name that is not ``path``, and the next ``AtomicDirectory`` for the same
``path`` removes it once its process is gone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


def write_text_atomic(path: str | Path, text: str, fsync: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically; ``fsync`` also survives a power loss (flush, then sync
    the file before the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class AtomicDirectory:
    """A directory built under a temporary name and renamed to ``path`` when complete.

    ``create()`` makes the temporary directory (removing those of earlier, dead builders of ``path``
    on this host) and returns it; ``commit()`` renames it to ``path``; ``discard()`` removes it.
    An existing ``path`` is refused unless ``overwrite=True``; then it is swapped atomically where
    the OS allows (Linux ``renameat2(RENAME_EXCHANGE)``), else renamed away first. ``fsync=True``
    syncs every file, the directory and its parent at commit (survives a power loss; a kill alone
    loses nothing).
    """

    def __init__(self, path: str | Path, overwrite: bool = False, fsync: bool = False):
        self.path = Path(path).expanduser().absolute()
        self.overwrite = overwrite
        self.fsync = fsync
        self.tmp: Path | None = None

    def create(self) -> Path:
        """The temporary directory, created now."""
        if self.path.exists() and not self.overwrite:
            raise FileExistsError(f"{self.path} already exists; choose another output directory or pass overwrite=True")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.remove_stale()
        self.tmp = self.path.parent / f"{self.path.name}.tmp-{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        return self.tmp

    def remove_stale(self) -> None:
        """Remove temporary directories of earlier builders of ``path`` on this host whose process is gone."""
        prefix = f"{self.path.name}.tmp-"
        host = host_tag()
        for p in self.path.parent.glob(f"{glob_escape(prefix)}*"):
            parts = p.name[len(prefix):].rsplit("-", 2)
            if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
                continue
            pid = int(parts[1])
            if pid != os.getpid() and not pid_alive(pid) and p.is_dir():
                log.info("removing %s, left by an export that did not finish (process %d is gone)", p, pid)
                shutil.rmtree(p, ignore_errors=True)

    def commit(self) -> Path:
        """Move the finished temporary directory to ``path`` (synced first with ``fsync``)."""
        assert self.tmp is not None, "create() first"
        if self.fsync:
            for p in [*self.tmp.rglob("*"), self.tmp]:
                fsync_path(p)
        try:
            self._rename_into_place()
        finally:
            if self.fsync:
                fsync_path(self.path.parent)
        return self.path

    def _rename_into_place(self) -> None:
        if not self.path.exists():
            os.rename(self.tmp, self.path)
            return
        if not self.overwrite:
            raise FileExistsError(f"{self.path} appeared while writing; pass overwrite=True to replace it")
        if exchange(self.tmp, self.path):
            shutil.rmtree(self.tmp, ignore_errors=True)  # now holds the previous directory
        else:
            old = self.path.parent / f"{self.path.name}.old-{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(self.path, old)
            os.rename(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        log.info("replaced the previous %s", self.path)

    def discard(self) -> None:
        """Remove the temporary directory (nothing appears at ``path``)."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def host_tag() -> str:
    """This host's name as it may appear in a file name (at most 40 characters)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def fsync_path(p: Path) -> None:
    """fsync a file or directory (durability across power loss; a kill alone loses nothing)."""
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def glob_escape(s: str) -> str:
    """``s`` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", s)
