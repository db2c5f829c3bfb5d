"""Errors a user can act on: bad configuration and bad input, each message naming the fix (imports nothing).

Both are caught by `pipeline.cli.run` and printed as `error: ...` with exit status 2, before any
work has been done or any file has been written. `WriteError` is the one raised mid-run: a file
could not be written (disk full, quota, read-only or foreign folder); `write_failure` is the one
place that turns such an OSError into its message.
"""

from __future__ import annotations

import difflib
import errno
import os
from collections.abc import Sequence
from pathlib import Path


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class UsageError(Exception):
    """Bad input found before any work: printed as `error: ...` with exit status 2."""


def closest(name: str, candidates: Sequence[str]) -> str:
    """' (did you mean X?)' for the candidate closest to `name`, or '' when none is close."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
"""OSErrors of a write the user can fix (space, quota, permissions); others stay tracebacks."""


class WriteError(UsageError):
    """A file could not be written: `<what> could not be written to <file> (<strerror>): <fix>`.

    `os_error` is the OSError it stands for, so a caller writing a bigger artifact (an export, a
    state) can name that artifact instead of one of its files.
    """

    def __init__(self, message: str, os_error: OSError) -> None:
        super().__init__(message)
        self.os_error = os_error


def write_failure(
    err: OSError, path: str | os.PathLike[str], what: str, folder: str | os.PathLike[str] | None = None
) -> WriteError | None:
    """The WriteError for `err` raised while writing `what` to `path` (in `folder`, default its parent);
    None for another kind of OSError."""
    if err.errno not in WRITE_ERRNOS:
        return None
    folder = Path(path).parent if folder is None else folder
    reason = err.strerror or os.strerror(err.errno)
    if err.errno == errno.ENOSPC:
        fix = f"free space on the disk holding {folder} or pass another --out"
    elif err.errno == errno.EDQUOT:
        fix = f"free space within your disk quota for {folder} or pass another --out"
    else:
        fix = f"the folder {folder} is read-only or not yours: pass a writable --out"
    return WriteError(f"{what} could not be written to {path} ({reason}): {fix}", err)
