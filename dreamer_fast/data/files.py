"""Files written whole or not at all, and the temp files a killed writer leaves.

`atomic_write` writes into `<path>.tmp<pid>`, fsyncs and renames over the path, so a kill at
any moment leaves the previous file whole; a lack of space raises `DiskFull` (the path, the
bytes needed and free) with the partial file already removed. The replay store and the
checkpoints both write through it; `remove_stale_temps` clears what dead writers left.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import time

_TMP = re.compile(r"\.tmp(\d+)$")
WRITE_DELAY_S = float(os.environ.get("DREAMER_FAST_WRITE_DELAY_S", "0") or 0)
"""Fault injection for tests: seconds every file write waits before its rename (a kill or
a signal then lands mid-write). 0 outside tests."""


class DiskFull(OSError):
    """A write failed for lack of space; its partial file is already removed."""

    def __init__(self, path: str, needed: int, free: int):
        super().__init__(errno.ENOSPC, f"no space left on device writing {path} (needs about "
                         f"{needed / 2**20:,.1f} MiB, {free / 2**20:,.1f} MiB free)")
        self.path, self.needed, self.free = path, needed, free


def _is_enospc(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left" in str(e) or "file write failed" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def atomic_write(path: str, write, needed: int = 0) -> int:
    """write(file_object) into `<path>.tmp<pid>`, fsync, rename over path; returns the bytes.

    On any error the temp file is removed; a lack of space raises DiskFull (path, about
    `needed` bytes, bytes free)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if WRITE_DELAY_S:
            time.sleep(WRITE_DELAY_S)
        size = os.path.getsize(tmp)
        os.replace(tmp, path)
        return size
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if _is_enospc(e):
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            raise DiskFull(path, needed, free) from None
        raise


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str, depth: int = 1, mine: bool = False) -> list[str]:
    """Remove `*.tmp<pid>` files in folder (and `depth` levels down) whose process is gone;
    with `mine`, also this process's own (call it only before this process writes there)."""
    removed = []
    paths = []
    for level in range(depth + 1):
        paths += glob.glob(os.path.join(folder, *["*"] * level, "*.tmp*"))
    for path in paths:
        m = _TMP.search(path)
        if m and ((mine and int(m.group(1)) == os.getpid()) or not pid_alive(int(m.group(1)))):
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    return removed
