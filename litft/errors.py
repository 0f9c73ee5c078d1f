"""User-facing errors.

A `LitftError` is a mistake the user can fix (a bad flag, a missing file, a malformed record). The CLI prints its
message as one line on stderr and exits non-zero, without a traceback. Bugs in litft stay ordinary exceptions so
their traceback reaches the bug report.
"""

from __future__ import annotations


class LitftError(Exception):
    """A problem with the user's input, reported as one line: name the file, field or flag, and what to do."""

    exit_code = 2


class CheckpointError(LitftError):
    """A checkpoint folder that cannot be loaded as asked."""


class DataError(LitftError):
    """A dataset file or record that cannot be used."""


class ConfigError(LitftError):
    """A flag or configuration value that is out of range or contradicts another."""


class NotBuiltError(LitftError):
    """A subcommand that exists in the CLI but whose recipe is not built yet."""


class TrainingStopped(LitftError):
    """Training stopped on purpose (non-finite loss, out of memory) with the last good checkpoint kept."""

    exit_code = 3
