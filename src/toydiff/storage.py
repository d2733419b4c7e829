"""File formats: atomic writes, .npy and CSV without pickle, and toydiff-tagged safetensors.

Every file toydiff writes goes to a temporary name beside its target and is renamed over it,
so a crash leaves the old file whole or the new one whole, never half of either. Nothing is
ever unpickled: arrays are .npy read with allow_pickle=False, weights and training state are
safetensors with a format tag and version in their metadata. Which files a run directory holds,
and what they are called, is toydiff.rundir's business.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ToydiffError, os_error

if TYPE_CHECKING:  # torch and safetensors are imported by the functions that need them: config reads its files
    import torch  # through this module, and `toydiff --help` loads no torch
    from torch import nn

FORMAT = "toydiff-run"  # the tag in every safetensors file and run manifest toydiff writes
VERSION = 1  # the newest format version this toydiff reads and writes
MAX_TEXT_BYTES = 64 * 2**20  # a JSON or TOML file toydiff reads (manifest, config, cache, log): larger is damage
TMP_SUFFIX = ".tmp"  # atomic writes' temporary files: `.NAME.XXXX.tmp` beside their target
_UMASK = os.umask(0)
os.umask(_UMASK)


def available_memory() -> int | None:
    """Bytes of memory the kernel says are available without swapping (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(need: float, what: str, fix: str) -> None:
    """Refuse, before allocating, something that needs more memory than this machine has available."""
    free = available_memory()
    if free is not None and need > free:
        raise ToydiffError(f"{what} needs about {need / 2**30:.1f} GiB of memory and {free / 2**30:.1f} GiB is "
                           f"available; {fix}")


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


def parse_json(text: str, where: str) -> Any:
    """JSON text, or a one-line error naming `where` (nesting too deep for the parser included)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ToydiffError(f"{where} is not valid JSON ({reason}); the file is damaged") from None


def read_json(path: str | Path, what: str = "file", schema: Any = object) -> Any:
    """A JSON file, checked against `schema` (see `check_schema`) before anything uses it."""
    where = f"{what} '{path}'"
    value = parse_json(read_text(path, what), where)
    check_schema(value, schema, where)
    return value


class Fields(dict):
    """A schema for a JSON object: the listed keys, where present, match their schemas (`required` must be
    present); other keys are let through."""

    def __init__(self, fields: dict, required: tuple[str, ...] = ()):
        super().__init__(fields)
        self.required = required


class MapOf:
    """A schema for a JSON object whose every value matches `schema` (a table keyed by names)."""

    def __init__(self, schema: Any):
        self.schema = schema


def check_schema(value: Any, schema: Any, where: str, at: str = "") -> None:
    """Check a value read from disk against a schema, so that damaged or hostile metadata ends in one line
    instead of a TypeError deep inside: a type (int: not bool; float or NUMBER: a finite number), None (null),
    a tuple (any of), a list of one schema (a list of such items), Fields or MapOf (objects), object (anything)."""
    if _matches(value, schema, where, at):
        return
    name = at or "the top level"
    raise ToydiffError(f"{where} is damaged: {name} should be {_describe(schema)}, not {type(value).__name__} "
                       f"{_short(value)}; the file was edited or corrupted")


def _matches(value: Any, schema: Any, where: str, at: str) -> bool:
    if schema is object:
        return True
    if schema is None:
        return value is None
    if isinstance(schema, tuple):  # a container of the wrong kind is False; a wrong item inside one raises
        return any(_matches(value, s, where, at) for s in schema)
    if isinstance(schema, (Fields, MapOf, list)):
        return _nested(value, schema, where, at)
    if schema is float:
        return isinstance(value, int) and not isinstance(value, bool) or \
            isinstance(value, float) and bool(np.isfinite(value))
    if schema is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, schema)


def _nested(value: Any, schema: Any, where: str, at: str) -> bool:
    """Containers: False when the container's own type is wrong; an item that is wrong raises, named."""
    if isinstance(schema, list):
        if not isinstance(value, list):
            return False
        for i, item in enumerate(value):
            check_schema(item, schema[0], where, f"{at}[{i}]")
        return True
    if not isinstance(value, dict):
        return False
    if isinstance(schema, MapOf):
        for k, v in value.items():
            check_schema(v, schema.schema, where, f"{at}.{k}" if at else k)
        return True
    missing = [k for k in schema.required if k not in value]
    if missing:
        raise ToydiffError(f"{where} is damaged: {f'{at}.' if at else ''}{missing[0]} is missing; the file was "
                           "edited or corrupted")
    for k, s in schema.items():
        if k in value:
            check_schema(value[k], s, where, f"{at}.{k}" if at else k)
    return True


def _describe(schema: Any) -> str:
    if isinstance(schema, tuple):
        return " or ".join(dict.fromkeys(_describe(s) for s in schema))
    if isinstance(schema, list):
        return f"a list of {_describe(schema[0])}"
    if isinstance(schema, (Fields, MapOf)):
        return "an object"
    return {None: "null", int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
            dict: "an object", list: "a list"}.get(schema, getattr(schema, "__name__", str(schema)))


def _short(value: Any) -> str:
    try:
        text = json.dumps(value) if not isinstance(value, float) or np.isfinite(value) else repr(value)
    except (ValueError, RecursionError):
        text = "..."
    return text if len(text) <= 40 else text[:37] + "..."


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


def save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


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


def npy_header(f, size: int, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from an open .npy stream's header, checked against the `size` bytes it holds, before any
    array is allocated: a header claiming more rows than its file carries is refused, not believed."""
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read:
            raise ValueError(f"unsupported .npy version {version}")
        shape, _, dtype = read[version](f, max_header_size=10_000)
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise ToydiffError(f"{where} is not a readable .npy array ({e})") from None
    if dtype.hasobject:
        raise ToydiffError(f"{where} holds Python objects; toydiff reads numeric arrays only")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need > size:
        raise ToydiffError(f"{where} is damaged: its header claims {shape} {dtype} ({need:,} bytes) but it holds "
                           f"{size:,}")
    return tuple(shape), dtype


def load_npy(path: Path) -> np.ndarray:
    """A numeric .npy array, its header checked against the file's size and the memory available first."""
    path = Path(path)
    st = check_regular(path, "array file")
    try:
        with open(path, "rb") as f:
            shape, dtype = npy_header(f, st.st_size, f"'{path}'")
    except OSError as e:
        raise os_error(e, path, "read") from None
    check_memory(st.st_size, f"'{path}'", "free memory or use a smaller file")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ToydiffError(f"'{path}' is not a readable .npy array ({e})") from None


def csv_text(rows: list[dict[str, Any]] | np.ndarray, header: list[str] | tuple[str, ...] | None = None) -> str:
    """Rows of dicts, or a 2-D array with its column names, as CSV text (numbers with 7 significant digits)."""
    buf = io.StringIO()
    if isinstance(rows, np.ndarray):  # the header through csv (a name with a comma or newline is quoted)
        if header:
            csv.writer(buf, lineterminator="\n").writerow(list(header))
        np.savetxt(buf, rows, delimiter=",", comments="", fmt="%.7g")
    else:
        writer = csv.DictWriter(buf, fieldnames=list(header or (list(rows[0]) if rows else [])))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def save_csv(path: Path, rows: list[dict[str, Any]] | np.ndarray, header: list[str] | tuple[str, ...] | None = None
             ) -> None:
    atomic_write_text(path, csv_text(rows, header))


def save_table(path: Path, x: np.ndarray, names: list[str]) -> None:
    """An (n, D) array as .npy (float32) or .csv (headed by `names`), by the path's suffix."""
    path = Path(path)
    if path.suffix == ".npy":
        save_npy(path, np.asarray(x, dtype=np.float32))
    elif path.suffix == ".csv":
        save_csv(path, x, names)
    else:
        raise ToydiffError(f"'{path}' must end in .npy or .csv")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Named tensors and string metadata as one safetensors file, tagged with the run format, written atomically."""
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(tensors, metadata={**meta, "format": FORMAT, "version": str(VERSION)}))


def load_tensors(path: Path, what: str = "weights") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a toydiff safetensors file; never unpickles anything."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).exists():
        raise ToydiffError(f"'{path}' does not exist: the run has no {what} (did training start?)")
    check_regular(Path(path), what)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, ValueError, OSError) as e:
        raise ToydiffError(f"'{path}' is not a safetensors file ({e}); the run directory is damaged") from None
    if meta.get("format") != FORMAT:
        raise ToydiffError(f"'{path}' was not written by toydiff (no '{FORMAT}' format tag)")
    if not meta.get("version", "").isdigit() or int(meta["version"]) > VERSION:
        raise ToydiffError(f"'{path}' has format version {meta.get('version')!r}; this toydiff reads versions up to "
                           f"{VERSION}: upgrade toydiff")
    return tensors, meta


def save_weights(path: Path, model: nn.Module, step: int) -> None:
    save_tensors(path, model.state_dict(), {"step": str(step)})


def load_weights(path: Path, model: nn.Module) -> int:
    """Load safetensors weights into `model`; returns the training step they were saved at."""
    tensors, meta = load_tensors(path)
    expected = model.state_dict()
    missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or extra or wrong:
        what = (f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(extra)[:3]}" if extra
                else f"{wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, the model needs "
                     f"{tuple(expected[wrong[0]].shape)}")
        raise ToydiffError(f"the weights in '{path}' do not fit the run's configured model ({what}); "
                           "was the file copied from another run?")
    step = meta.get("step", "0")
    if not step.isdigit() or len(step) > 18:
        raise ToydiffError(f"'{path}' is damaged: its step is {step!r}, not a count")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:  # a dtype it cannot copy from
        raise ToydiffError(f"the weights in '{path}' do not fit the run's model ({e}); the run directory is "
                           "damaged") from None
    return int(step)


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
