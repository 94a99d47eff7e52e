"""Atomic outputs: a file or folder appears under its final name only once it is complete.

A write that runs out of room (full disk, quota, file-size limit) is reported by the output's
final name, as one DiskFullError, whatever the writer raised: torch's zip writer and numpy's
`tofile` lose the errno, so the file system itself is asked before the temporary is removed.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import tempfile
from pathlib import Path

from diffrepro.errors import OUT_OF_ROOM, DiskFullError

NEARLY_FULL_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, is_dir: bool = False):
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds.

    Same folder ⇒ same file system ⇒ `os.replace` is atomic. On any error (including a full
    disk) the temporary is removed and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as err:
        reason = out_of_room(err, tmp) if isinstance(err, Exception) else None
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if reason is not None:
            raise DiskFullError(final, reason) from err
        raise


def out_of_room(err: Exception, written: Path) -> str | None:
    """Why writing `written` (a file or folder) failed for lack of room, or None if it did not."""
    if isinstance(err, DiskFullError):  # from a nested output: report the outer name
        return err.reason
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in OUT_OF_ROOM:
            return OUT_OF_ROOM[seen.errno]
        seen = seen.__cause__ or seen.__context__
    said = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"
    disk = os.statvfs(written.parent)
    if disk.f_bavail * disk.f_frsize < NEARLY_FULL_BYTES:
        return f"the disk is full (the writer said {said})"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and _largest_file(written) >= limit:
        return f"a file reached the file-size limit of {limit} bytes, ulimit -f (the writer said {said})"
    return None


def _largest_file(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    sizes = [os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files]
    return max(sizes, default=0)
