"""File primitives every writer of this project uses: atomic writes, leftovers of kills, an advisory lock.

Everything a run writes that a later run reads (checkpoints, sweep.csv's companions, figures, grids) goes
through `atomic_write`: a temporary file *beside* the target (same filesystem, so the final `os.replace` is
a rename, never a copy onto the old file as a move from `$TMPDIR` to another filesystem is), fsynced, then
renamed, then the directory fsynced. A kill leaves at worst a `.NAME.tmp-PID` file, which
`remove_stale_temp_files` deletes once PID is no live process.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMP_PATTERN = re.compile(r"^\..+\.tmp-(?P<pid>\d+)$")  # `.last.ckpt.tmp-<pid>`: see temp_path


def is_url(path: object) -> bool:
    """A path with a scheme (`http://`, `file://`, `s3://`, ...): not a plain local file."""
    return "://" in str(path)


def temp_path(path: str | Path) -> Path:
    """Where `path` is written before it replaces the target: beside it (same filesystem), named by our pid."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{os.getpid()}")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every OS/filesystem lets a directory be opened or synced.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | Callable[[IO[bytes]], None]) -> None:
    """Replace `path` by `data` (bytes, or a function that writes into the open file) all at once: readers see
    the old file or the new one, never a part. On any failure (a full disk, an exception, Ctrl-C) the temp file
    is removed and the old `path` is left as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    try:
        with open(tmp, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def atomic_save(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)`, atomically (see atomic_write)."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy `src` to `dst`, atomically (see atomic_write)."""
    with open(src, "rb") as source:
        atomic_write(dst, lambda f: shutil.copyfileobj(source, f))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def remove_stale_temp_files(*directories: str | Path | None) -> list[Path]:
    """Delete the `.NAME.tmp-PID` files killed writers left in `directories` (PID is no live process); returns
    what was removed. Temp files of live processes (a write in progress elsewhere) stay."""
    removed = []
    for directory in directories:
        if directory is None or is_url(directory) or not Path(directory).is_dir():
            continue
        for p in Path(directory).iterdir():
            m = TEMP_PATTERN.match(p.name)
            if m and p.is_file() and not _alive(int(m["pid"])):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


@contextmanager
def exclusive_lock(directory: Path, name: str = ".sweep.lock", what: str = "sweep") -> Iterator[None]:
    """Hold `directory/name` (an advisory flock) for the duration: a second process that writes to the same
    directory waits here (and says so) instead of interleaving its writes with ours. The lock dies with its
    process, so a kill never leaves the directory locked."""
    with open(directory / name, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            print(f"[{what}] {directory} is in use by {holder}; waiting for it to finish (its finished cells "
                  "will be reused)", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
