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


class StopInterrupt(BaseException):
    """A stop signal ending a data wait that may never end (train/preemption.py). A BaseException, as
    KeyboardInterrupt is: the ``except Exception`` that counts a corrupt image as a skipped sample must not swallow
    it (it did: a SIGTERM landing in an image decode became one more skipped sample and the skip went on).
    The wait turns it into TrainingStopped; the CLI prints it as one line if it escapes elsewhere."""
