"""Where commands write: checked before any work starts, and a directory owned by one process.

A command refuses an output path that cannot work (an existing file given as a directory,
a path under a file, a place it may not write) before it spends any time, and leaves
nothing behind when it refuses. A run or sweep directory is owned by one process at a time
(`DirectoryLock`): a second process is refused instead of mixing its files with the
first's, and since the kernel drops the lock however its owner ends, a killed run never
leaves a lock that blocks its resume.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from pathlib import Path
from types import TracebackType

from . import HwqError

LOCK_FILE = ".lock"
# The temporaries of accel_sim.ir.atomic_write_bytes: ".NAME.XXXXXXXX.tmp" (tempfile.mkstemp).
TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def existing_ancestor(path: Path) -> Path:
    """The path itself or its nearest ancestor that exists (what creating it starts from)."""
    path = path.absolute()
    return next(p for p in (path, *path.parents) if os.path.lexists(p))


def unwritable(directory: Path, target: Path) -> str | None:
    """Create and remove a file in `directory`: the only test that holds for root, read-only
    file systems and network mounts alike (permission bits alone do not tell)."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".hwq-probe-")
    except OSError as exc:
        return f"{target}: cannot write in {directory} ({exc.strerror})"
    os.close(fd)
    os.unlink(probe)
    return None


def output_dir_problem(path: Path) -> str | None:
    """Why `path` cannot be made an output directory, or None (nothing is created)."""
    if os.path.lexists(path) and not path.is_dir():
        return f"{path} exists and is not a directory"
    base = existing_ancestor(path)
    if not base.is_dir():
        return f"{path}: {base} is not a directory"
    return unwritable(base, path)


def output_file_problem(path: Path) -> str | None:
    """Why `path` cannot be written as a file, or None; missing parent directories are fine
    (the atomic write creates them)."""
    if path.is_dir():
        return f"{path} is a directory; give a file name"
    base = existing_ancestor(path.parent)
    if not base.is_dir():
        return f"{path}: {base} is not a directory"
    return unwritable(base, path)


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse an output directory that cannot be one, before any work and creating nothing."""
    problem = output_dir_problem(Path(path))
    if problem:
        raise HwqError(f"{flag} {problem}")
    return Path(path)


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete the temporaries of atomic writes that a killed process left (call it only while
    owning the directory: another owner's writes in flight would look the same)."""
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if TEMP_FILE.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class DirectoryLock:
    """Exclusive ownership of a directory for as long as the `with` block runs.

    An `fcntl.flock` on DIR/.lock, which the kernel releases when its holder exits or is
    killed; the file holds the owner's PID for the message of the process refused. On
    entry the directory is checked and created and the stale temporaries of atomic writes
    are removed; if the block fails leaving the directory holding nothing but the lock,
    what was created is removed again.
    """

    def __init__(self, path: str | os.PathLike, flag: str = "--out"):
        self.path = Path(path)
        self.flag = flag
        self.fd: int | None = None
        self.created: list[Path] = []

    def __enter__(self) -> DirectoryLock:
        check_output_dir(self.path, self.flag)
        self.created = [p for p in (self.path.absolute(), *self.path.absolute().parents) if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HwqError(f"cannot create {self.flag} {self.path} ({exc.strerror})") from None
        try:
            self.fd = self.acquire()
        except BaseException:
            self.remove_created()
            raise
        remove_stale_temp_files(self.path)
        return self

    def acquire(self) -> int:
        lock = self.path / LOCK_FILE
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise HwqError(f"{self.path} is in use by process {holder}") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the owner removed the file before we locked it: lock the new one
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None and self.holds_only_the_lock():
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            self.remove_created()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def holds_only_the_lock(self) -> bool:
        return [p.name for p in self.path.iterdir()] == [LOCK_FILE]

    def remove_created(self) -> None:
        for p in self.created:  # deepest first
            try:
                p.rmdir()
            except OSError:
                return
