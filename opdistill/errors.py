"""User-facing errors: one readable message that names the file, line or field, and the fix.

Each kind has a default fix for the raise sites that have nothing more specific to say, so every error the
CLI prints comes with a `fix:` line."""

from __future__ import annotations


class OpdistillError(Exception):
    """An error caused by the user's input; the CLI prints it as one message and exits non-zero."""

    default_fix = "correct the input named above and rerun"

    def __init__(self, message: str, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix or self.default_fix
        super().__init__(f"{message}\n  fix: {self.fix}")


class ConfigError(OpdistillError):
    """A config file or override is invalid."""

    default_fix = "correct that value in the config file or key=value override (`opdistill train --help-config` lists every key)"


class DataError(OpdistillError):
    """A prompt/response file has bad records."""

    default_fix = "correct or remove the record named above, then rerun"


class NothingToTrainOn(DataError):
    """Every record was skipped (over-long prompts, unfinished responses): a caller with its own knobs (the demo's
    flags) can say which of them to change."""


class ModelError(OpdistillError):
    """A model or tokenizer cannot be loaded or used."""

    default_fix = "pass a Hugging Face checkpoint directory (config.json + safetensors weights), a .gguf file or a built-in name"


class CheckpointError(OpdistillError):
    """A checkpoint cannot be written or resumed."""

    default_fix = "use another out_dir, or resume=false to start over"
