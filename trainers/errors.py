"""User-facing errors.

A :class:`UserError` is something the user can fix (bad config, bad data row, missing file, impossible
resources). The CLI turns it into exactly one line on stderr and exit code 2. Anything else is an
internal error and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user caused and can fix; printed as one line, exit code 2.

    ``lines`` may hold several problem lines (e.g. data validation reports up to 20 rows); the first
    line of ``str(err)`` is always a complete sentence on its own.
    """

    def __init__(self, message: str, lines: list[str] | None = None):
        super().__init__(message)
        # Explicit problem lines (e.g. `PATH:RECORD: field ...`) are printed verbatim; a plain message
        # gets the `rlhf: error:` prefix.
        self.verbatim = lines is not None
        self.lines = list(lines) if lines else [message]


class ConfigError(UserError):
    """Bad configuration: unknown key, wrong type, out-of-range value, inconsistent batch sizes."""


class DataError(UserError):
    """Bad input data: unreadable file, malformed row, empty dataset."""


class RunStopped(Exception):
    """A run that cannot go on for a reason found while it runs (not the user's input): gradients that
    stay non-finite, a training rank that died. The CLI prints it as one ``rlhf: stopped: ...`` line and
    exits with code 3; the message says what happened and which checkpoint a rerun resumes from."""
