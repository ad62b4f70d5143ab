"""The one base class of errors a user can fix (a config key, a shard, an input file).

The CLI prints these as one line and exits 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Something the user gave (config, path, data) is wrong; the message names it."""


class InputError(UserError, ValueError):
    """An input cannot be used as asked: a caption file, an image folder, an evaluation dataset's
    layout, a model directory's contents, an option's value."""


class MissingInputError(UserError, FileNotFoundError):
    """A path the user named does not exist, or lacks a file it must hold (a run's checkpoint, an
    export's config, a dataset's class names)."""


class CheckpointError(UserError):
    """A run's checkpoints cannot be resumed as they are: `latest` is damaged, no complete
    checkpoint is left, or the configuration differs from the checkpoint's."""


class DiskFullError(UserError):
    """Writing a checkpoint ran out of disk space; `latest` still names the last complete one."""
