"""The one base class of errors a user can fix (a config key, a shard, an input file).

The CLI prints these as one line and exits 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Something the user gave (config, path, data) is wrong; the message names it."""

    def reported(self) -> None:
        """Called once the command line has printed the error, before the process exits."""


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


class RankDataError(UserError):
    """One rank's data failed (unreadable shards, a missing file, a shard list that yields
    nothing): every rank of the run raises this same error together, naming that rank."""

    def reported(self) -> None:
        """Wait until every rank has printed it: a launcher stops all ranks when the first one
        exits, which would otherwise cut the others off before they could say why."""
        from navit_clip import dist

        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a rank already gone: nothing left to wait for
            pass
