"""lmtiny.errors.first_line: how a one-line message quotes another library's error."""
from lmtiny.errors import first_line


def test_first_line_keeps_the_first_line_of_a_long_error():
  error = RuntimeError("\n  Corrupted Riegeli/records file: chunk data hash mismatch\nat byte 207\n  traceback...")
  assert first_line(error) == "Corrupted Riegeli/records file: chunk data hash mismatch"
  assert first_line(ValueError("x" * 1000)) == "x" * 300


def test_first_line_of_an_error_without_a_message_is_its_type():
  assert first_line(KeyboardInterrupt()) == "KeyboardInterrupt"
  assert first_line(OSError(" \n ")) == "OSError"
