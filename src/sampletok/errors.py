"""Errors a user can act on. The CLI prints them as one line; nothing else is caught."""
from __future__ import annotations


class SampletokError(Exception):
    """Base of every error meant for the user (printed as one line by the CLI)."""


class SchemaError(SampletokError):
    """The schema file or dict is invalid."""


class DataError(SampletokError):
    """Bad input data. The message names the file, the column and, where it applies, the row."""

    def __init__(self, origin: str, message: str, column: str | None = None, row: int | None = None):
        where = origin
        if column is not None:
            where += f", column '{column}'"
        if row is not None:
            where += f", row {row}"
        super().__init__(f"{where}: {message}")
        self.origin, self.column, self.row = origin, column, row


class StoreError(SampletokError):
    """A token store is missing, corrupt, or was written by a different producer."""


class ConfigError(SampletokError):
    """An experiment or model configuration is invalid."""
