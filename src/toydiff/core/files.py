"""Files written whole or not at all, read within bounds, and folders one process writes at a time.

Every file toydiff writes goes to a temporary name beside its target and is renamed over it, so a crash
leaves the old file whole or the new one whole, never half of either; several files can be written as one
unit, a .npy memory map filled in place, a folder staged under a hidden name and published whole. A
folder's writer holds its OS lock (`Lock`), which the kernel drops when the process dies. What the files
hold is toydiff.core.formats' and toydiff.core.schema's business; which files a run directory holds is
toydiff.runs.directory's.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import ToydiffError, os_error

MAX_TEXT_BYTES = 64 * 2**20  # a JSON or TOML file toydiff reads (manifest, config, cache, log): larger is damage
TMP_SUFFIX = ".tmp"  # atomic writes' temporary files: `.NAME.XXXX.tmp` beside their target
_UMASK = os.umask(0)
os.umask(_UMASK)


def check_regular(path: Path, what: str = "file") -> os.stat_result:
    """The stat of `path` after checking it is a regular file (not a FIFO, a device such as /dev/zero, or a
    folder), so that reading it can neither block forever nor never end."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ToydiffError(f"{what} '{path}' does not exist") from None
    except OSError as e:
        raise os_error(e, path, "read") from None
    if not stat.S_ISREG(st.st_mode):
        raise ToydiffError(f"{what} '{path}' is not a regular file (a folder, pipe or device); give a file")
    return st


def read_text(path: str | Path, what: str = "file", limit: int = MAX_TEXT_BYTES) -> str:
    """A regular UTF-8 text file of at most `limit` bytes, or a one-line error."""
    path = Path(path)
    check_regular(path, what)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise os_error(e, path, "read") from None
    if len(data) > limit:
        raise ToydiffError(f"{what} '{path}' is larger than {limit // 2**20} MiB; it cannot be one of toydiff's "
                           "files: check the path")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ToydiffError(f"{what} '{path}' is not UTF-8 text ({e})") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: a crash leaves the old file whole. An
    OS error (full disk, read-only folder, name too long) is a one-line error, with the temporary file removed."""
    atomic_write_many({Path(path): data})


def atomic_write_many(files: dict[Path, bytes]) -> None:
    """Several files written as one unit: each to its temporary name first, then all renamed into place, so an
    error before the renames (a full disk) changes none of them. A kill between two renames can still leave
    them apart, which is why the last file written should be the one that vouches for the others."""
    tmps: list[str] = []
    current = next(iter(files))  # the file being written, named by an error
    try:
        for current, data in files.items():
            fd, tmp = tempfile.mkstemp(dir=current.parent, prefix=f".{current.name[:200]}.", suffix=TMP_SUFFIX)
            tmps.append(tmp)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for current, tmp in zip(files, tmps):
            os.replace(tmp, current)
    except BaseException as e:
        _discard(tmps, e, current)
        raise


def _discard(tmps: list[str], e: BaseException, path: Path) -> None:
    """Remove the temporary files of a write that failed; an OS error becomes its one line."""
    for tmp in tmps:
        Path(tmp).unlink(missing_ok=True)
    if isinstance(e, OSError):
        raise os_error(e, path, "write") from None


def remove_stale_temporaries(folder: Path) -> int:
    """Remove the temporary files that killed writers left in `folder` (call it holding the folder's lock)."""
    removed = 0
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        try:
            p.unlink()
            removed += 1
        except OSError:
            pass
    return removed


class Lock:
    """An exclusive OS lock on `folder` (flock on a file in it): the kernel releases it when the process dies,
    so a SIGKILL never leaves a stale lock. A second holder is refused with the first one's process id."""

    NAME = ".lock"

    def __init__(self, folder: str | Path, what: str = "run directory"):
        self.path, self.what, self.fd = Path(folder) / self.NAME, what, None

    def acquire(self) -> "Lock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return self  # a folder this process cannot write to: reading it needs no lock
            raise os_error(e, self.path.parent, "lock") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            raise ToydiffError(f"{self.what} '{self.path.parent}' is in use by process {holder}; wait for it to "
                               "finish (or stop it) and run the command again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def npy_writer(path: Path, shape: tuple[int, ...], dtype=np.float32):
    """A .npy file of `shape` to fill in place (a memory map: the data never has to fit in memory), written to a
    temporary name and renamed to `path` when the block ends without an error; nothing is left otherwise."""
    path, tmps = Path(path), []
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:200]}.", suffix=TMP_SUFFIX)
        tmps.append(tmp)
        os.close(fd)
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        with open(tmp, "rb+") as f:  # the disk space taken now: a full disk is an error here, not a SIGBUS later
            try:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        yield array
        array.flush()
        del array
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _discard(tmps, e, path)
        raise


def make_staging_dir(target: Path) -> Path:
    """A fresh hidden directory beside `target` (`publish_dir` renames it there once it is whole); an existing
    non-empty `target` is refused, never written into."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ToydiffError(f"'{target}' already exists and is not empty; choose another --out or remove it")
    remove_stale_staging(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
        os.chmod(staging, 0o777 & ~_UMASK)
    except OSError as e:
        raise ToydiffError(f"cannot create directory '{target}': {e}") from None
    return staging


def remove_stale_staging(target: Path) -> None:
    """Remove the staging directories of `target` that a killed process left (their lock is free: the kernel
    dropped it with the process, and they are over a minute old); one a living process is filling holds its
    lock and is left alone."""
    for stale in Path(target).parent.glob(f".{target.name}.*.partial"):
        try:
            if time.time() - stale.stat().st_mtime < 60:  # just made: its maker may not hold its lock yet
                continue
        except OSError:
            continue
        lock = Lock(stale)
        try:
            lock.acquire()
        except ToydiffError:
            continue  # in use
        try:
            if lock.fd is not None:
                shutil.rmtree(stale, ignore_errors=True)
        finally:
            lock.release()


def publish_dir(staging: Path, target: Path) -> Path:
    """Rename a fully written staging directory to `target`: the directory exists whole or not at all."""
    target = Path(target)
    try:
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        os.rename(staging, target)
    except OSError as e:
        raise ToydiffError(f"cannot create directory '{target}': {e}") from None
    return target
