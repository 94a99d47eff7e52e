"""One exception type for every user-facing failure: the CLI prints its message as one line."""

from __future__ import annotations

import errno

# errnos of a write that ran out of room, and how to say so
OUT_OF_ROOM = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EFBIG: "file too large for the file-size limit (ulimit -f)"}


class UserError(Exception):
    """A problem the user can fix (bad param, missing file, corrupt data); the message says how."""


class TrainingPaused(Exception):
    """A training process spent its wall-time budget after writing its checkpoint: not a failure."""


class DiskFullError(UserError):
    """A write ran out of room (full disk, quota or file-size limit) while `path` was being written."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path} could not be written: {reason}; nothing was kept under that name. "
                         "Free disk space (or raise the limit) and run the stage again")
