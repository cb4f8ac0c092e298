"""What a failed checkpoint read means, and what it leaves behind.

  with reading():          # around the reads of one checkpoint (lmtiny.runs.checkpoint)
    ...                    # an error that means the checkpoint is damaged -> CheckpointCorrupt

CheckpointCorrupt is raised for a damaged checkpoint only: a tensorstore read error whose status
says the data is missing, cut short or undecodable, an undecodable JSON file, a missing file, a
fingerprint mismatch (FingerprintMismatch). The fallbacks to an older checkpoint catch that and
nothing else. `reading` also silences, once per process, the noise a failed orbax restore leaves on
stderr (quiet_abandoned_io), so a skipped checkpoint is one warning line; lmtiny.runs.checkpoint's
Checkpointer does the same for a failed save (a full disk is one error line).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import warnings
from typing import Iterator


class CheckpointCorrupt(Exception):
  """A checkpoint's files are damaged: missing, truncated or undecodable (the message says which
  and where). The one error the fallbacks to an older checkpoint catch."""


class FingerprintMismatch(CheckpointCorrupt):
  """Array data that reads cleanly but does not match the fingerprint saved with it (altered bytes)."""


# tensorstore reports a damaged file (missing, cut short, undecodable) with these status codes, as a
# ValueError whose text starts with the code (orbax wraps a failed array read in a bare Exception
# raised from it). Others (UNAVAILABLE, DEADLINE_EXCEEDED, PERMISSION_DENIED, RESOURCE_EXHAUSTED, ...)
# say nothing about the checkpoint: a good one must not be skipped (or moved aside) for them.
_DAMAGE_STATUS = re.compile(r"^(NOT_FOUND|DATA_LOSS|OUT_OF_RANGE|FAILED_PRECONDITION): ")


def damage(e: BaseException | None) -> str | None:
  """How the checkpoint is damaged, in one line, if `e` or an error it was raised from (`raise
  ... from`) means a damaged checkpoint: a tensorstore read error (_DAMAGE_STATUS), an undecodable
  JSON file, a missing file. None for anything else."""
  while e is not None:
    text = str(e)
    if isinstance(e, CheckpointCorrupt):
      return text
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
      return f"undecodable file ({type(e).__name__}: {first_nonblank_line(text)})"
    if isinstance(e, FileNotFoundError):
      return f"missing file ({first_nonblank_line(text)})"
    if isinstance(e, ValueError) and _DAMAGE_STATUS.match(text):
      return _tensorstore_line(text)
    e = e.__cause__
  return None


def first_nonblank_line(text: str) -> str:
  """The first line of `text` with anything but whitespace on it (an error text, of any length)."""
  return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _tensorstore_line(text: str) -> str:
  """'OUT_OF_RANGE: Error reading "params.embed.value/0.0": Requested byte range ...': tensorstore's
  error without its driver chain, the database's path and the JSON spec it appends."""
  text = re.sub(r'Error opening "\w+" driver: ', "", first_nonblank_line(text))
  text = re.sub(r' in OCDBT database at [^"]*"[^"]*"', "", text)
  return re.sub(r"\s*\[tensorstore_spec.*$", "", text)


@contextlib.contextmanager
def reading() -> Iterator[None]:
  """Reads of one checkpoint: an error that means it is damaged becomes CheckpointCorrupt (raised
  from it); anything else propagates unchanged."""
  quiet_abandoned_io()
  try:
    yield
  except CheckpointCorrupt:
    raise
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless damage() recognises it)
    why = damage(e)
    if why is None:
      raise
    raise CheckpointCorrupt(why) from e


def quiet_abandoned_io() -> None:
  """Silences what a failed orbax read or write leaves behind, and only that. orbax runs each
  restore (and each async save) in an event loop of its own and closes it as soon as one array
  read (write: a full disk) fails; the operations still in flight in tensorstore then complete
  into the closed loop ("RuntimeError: Event loop is closed", one traceback each through
  sys.unraisablehook), their coroutines are collected half-done (orbax's re-raise inside them,
  unraisable again; the read coroutines not yet started: "never awaited" warnings), and asyncio
  logs each failed task or gather nobody awaited any more with its whole tensorstore spec. The
  failure itself is reported once, by whoever catches it. Installed once per process (the hook
  again if something, such as pytest, puts its own back)."""
  if not getattr(sys.unraisablehook, "lmtiny_quiet_reads", False):
    previous = sys.unraisablehook

    def hook(unraisable):
      if not _abandoned_read(unraisable):
        previous(unraisable)
    hook.lmtiny_quiet_reads = True
    sys.unraisablehook = hook
  asyncio_logger = logging.getLogger("asyncio")
  if _not_an_abandoned_task not in asyncio_logger.filters:
    asyncio_logger.addFilter(_not_an_abandoned_task)
  # orbax's per-shard read coroutine (orbax/checkpoint/_src/serialization), created in a batch
  # before the gather that would start them: collected unstarted when their array's read is abandoned.
  warnings.filterwarnings("ignore", message="coroutine '_read_array_index_and_device_put' was never awaited",
                          category=RuntimeWarning)


_ORBAX_CODE = f"{os.sep}orbax{os.sep}"


def _abandoned_read(unraisable) -> bool:
  """An unraisable exception from a read (or write) that a failed orbax restore (or save) left behind."""
  e = unraisable.exc_value
  if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":  # a late result for a closed loop
    frames = [frame.f_code.co_name for frame, _ in _walk(e.__traceback__)]
    return frames[-2:] == ["call_soon_threadsafe", "_check_closed"]
  code = getattr(unraisable.object, "cr_code", None)  # an orbax coroutine collected half-done
  return code is not None and _ORBAX_CODE in code.co_filename


def _walk(tb):
  while tb is not None:
    yield tb.tb_frame, tb.tb_lineno
    tb = tb.tb_next


_UNAWAITED = re.compile(r"^(\w+ exception was never retrieved|Task was destroyed but it is pending)")


# tensorstore's own words for a failed read of a checkpoint's array store (orbax writes OCDBT).
_CHECKPOINT_STORE_READ = re.compile(r'Error reading "[^"]*" in OCDBT database')


def _not_an_abandoned_task(record) -> bool:
  """asyncio-logger filter: drops "Task (_GatheringFuture, Future) exception was never retrieved" /
  "Task was destroyed but it is pending!" for orbax's reads (the siblings of a read that failed):
  those whose error passed through orbax's code, whose task runs it, or (a bare Future that
  tensorstore completed from C++, with no Python frames) whose error is a checkpoint store read's."""
  message = record.getMessage()
  if not _UNAWAITED.match(message):
    return True
  error = record.exc_info[1] if record.exc_info else None
  return not (_ORBAX_CODE in message or _passed_through_orbax(error)
              or _CHECKPOINT_STORE_READ.search(f"{message} {error}"))


def _passed_through_orbax(error: BaseException | None) -> bool:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if any(_ORBAX_CODE in frame.f_code.co_filename for frame, _ in _walk(error.__traceback__)):
      return True
    error = error.__cause__ or error.__context__
  return False
