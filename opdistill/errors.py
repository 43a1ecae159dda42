"""User-facing errors: one readable message that names the file, line or field, and the fix."""

from __future__ import annotations


class OpdistillError(Exception):
    """An error caused by the user's input; the CLI prints it as one message and exits non-zero."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(message if fix is None else f"{message}\n  fix: {fix}")


class ConfigError(OpdistillError):
    """A config file or override is invalid."""


class DataError(OpdistillError):
    """A prompt/response file has bad records."""


class ModelError(OpdistillError):
    """A model or tokenizer cannot be loaded or used."""


class CheckpointError(OpdistillError):
    """A checkpoint cannot be written or resumed."""
