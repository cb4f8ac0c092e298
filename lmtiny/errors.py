"""The errors lmtiny raises on purpose, at the bottom of the import graph so every layer can raise them.

Entry points (lmtiny.cli.run_main) turn a `UserError` into one `error: ...` line and exit status 2,
and a `RunFailed` into one `error: ...` line and exit status 1. `first_line(e)` is how a message
quotes another library's error (`f"{path}: corrupt shard ({first_line(e)})"`).
"""


class UserError(ValueError):
  """Something the user can fix (a flag, a config field, a file): entry points print the one-line
  message as `error: ...` and exit with status 2."""


class RunFailed(RuntimeError):
  """A run stopped by a fault of its own (diverged, a checkpoint failed to save): entry points
  print the one-line message as `error: ...` and exit with status 1."""


class ConfigError(UserError):
  """A problem in the config or flags; the message names the field and the value."""


def first_line(error: BaseException) -> str:
  """The first line of `error`'s message (at most 300 characters), or its type's name when it has
  none: a library's error (riegeli, gcsfs, libtpu) can run to pages, and ours are one line."""
  lines = str(error).strip().splitlines()
  return lines[0][:300] if lines else type(error).__name__
