"""The one base class of errors a user can fix (a config key, a shard, an input file).

The CLI prints these as one line and exits 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Something the user gave (config, path, data) is wrong; the message names it."""
