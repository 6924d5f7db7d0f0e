"""The errors of unusable training data, which the command line reports in one line (no traceback)."""

from __future__ import annotations

from ..config import ConfigError


class DataError(ConfigError):
    """Training data that cannot be used: a missing or empty source, a malformed JSONL line, a corpus too small to
    train or evaluate on, a damaged token shard. The one-line message names the path and the problem."""


class MissingDataError(DataError, FileNotFoundError):
    """A data source (file or folder) that does not exist."""
