"""The errors a user can fix. The CLI prints any ``UserError`` as one line (``--debug`` shows the traceback)."""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: a bad file, setting, path or dataset; the message is one line."""


class ConfigError(UserError, ValueError):
    """A bad experiment, recipe, suite or model file (or override); the message names the key."""


class UnsafeFileError(UserError):
    """A weights file that holds more than tensors and plain data (it could run code when loaded)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is incomplete, corrupt, non-finite or does not match the run."""


class TrainingStopped(UserError, RuntimeError):
    """The run cannot continue (too many non-finite steps, unusable data, a stalled input pipeline ...)."""
