"""Errors a user can act on: bad configuration and bad input, each message naming the fix (imports nothing).

Both are caught by `pipeline.cli.run` and printed as `error: ...` with exit status 2, before any
work has been done or any file has been written.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class UsageError(Exception):
    """Bad input found before any work: printed as `error: ...` with exit status 2."""


def closest(name: str, candidates: Sequence[str]) -> str:
    """' (did you mean X?)' for the candidate closest to `name`, or '' when none is close."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
