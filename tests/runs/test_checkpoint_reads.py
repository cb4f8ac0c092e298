"""lmtiny.runs.checkpoint_reads' asyncio filter: what a failed orbax restore leaves behind is dropped,
anything else is kept (the CLI tests of damaged checkpoints count the lines a user sees)."""
import logging

from lmtiny.runs.checkpoint_reads import _not_an_abandoned_task


def _record(message: str, error: BaseException | None = None) -> logging.LogRecord:
  exc_info = (type(error), error, None) if error else None
  return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, exc_info)


def test_a_bare_future_of_a_failed_checkpoint_read_is_dropped():
  """tensorstore completes the read's Future from C++: no frame of orbax's in its traceback, only
  its error's text, as a generate run over damaged checkpoints printed it once in a while (when
  the collector reached the Future before the process ended)."""
  error = ValueError('OUT_OF_RANGE: Error reading "params.layers.0.attn.v.value/1.3.0" in OCDBT database at '
                     'local file "/tmp/run/checkpoints/2/state/": Requested byte range [153101, 155049) is not valid')
  message = f"Future exception was never retrieved\nfuture: <Future finished exception={error!r}>"
  assert not _not_an_abandoned_task(_record(message, error))


def test_other_unretrieved_errors_and_other_records_are_kept():
  error = ValueError("boom")
  assert _not_an_abandoned_task(_record(f"Future exception was never retrieved\nfuture: <Future finished "
                                        f"exception={error!r}>", error))
  assert _not_an_abandoned_task(_record('Error reading "x" in OCDBT database'))  # not an unretrieved future
