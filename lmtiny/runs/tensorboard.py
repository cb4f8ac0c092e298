"""TensorBoard event files for scalars, written directly: no TensorFlow, torch or protobuf.

An event file is TFRecord-framed `Event` protos; lmtiny needs three kinds, hand-encoded here:
the file-version header, a `Summary` of scalars, and a `SessionLog` START at a resumed step,
which makes TensorBoard drop the stale points a killed run left after its checkpoint.
(tensorboardX, used before, imports torch whenever it is installed: 5 s on every start.)
"""
from __future__ import annotations

import os
import socket
import struct
import time

from etils import epath


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
    table.append(crc)
  return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
  crc = crc32c(data)
  return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def tfrecord(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return length + _masked_crc(length) + data + _masked_crc(data)


def varint(n: int) -> bytes:
  """A protobuf base-128 varint."""
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def field(number: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field (wire type 2)."""
  return varint(number << 3 | 2) + varint(len(payload)) + payload


def event(step: int, *, file_version: str | None = None, scalars: dict | None = None, session_start: bool = False,
          wall_time: float | None = None) -> bytes:
  """One serialized Event: wall_time (1), step (2), then file_version (3), summary (5) or
  session_log (7)."""
  out = b"\x09" + struct.pack("<d", time.time() if wall_time is None else wall_time) + b"\x10" + varint(step)
  if file_version is not None:
    out += field(3, file_version.encode())
  if scalars:  # Summary.value (1) = Value{tag (1), simple_value (2, float32)}
    values = b"".join(field(1, field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                      for tag, value in scalars.items())
    out += field(5, values)
  if session_start:
    out += field(7, b"\x08\x01")  # SessionLog.status = START
  return out


class EventWriter:
  """Appends scalar events to one new event file under `logdir`. A local file is flushed on every
  write (TensorBoard shows a run live); an object store cannot append, so a gs:// logdir gets a new
  event file of the records since the last one every `remote_flush_s` seconds and at close."""

  def __init__(self, logdir: str, *, drop_from: int | None = None, remote_flush_s: float = 60.0):
    """drop_from: TensorBoard hides the points at this step and after that earlier event files
    hold (a resumed run writes them again)."""
    self.dir = epath.Path(logdir)
    self.dir.mkdir(parents=True, exist_ok=True)
    self.remote_flush_s = remote_flush_s
    self._name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self._parts = 0
    self._pending = [tfrecord(event(0, file_version="brain.Event:2"))]
    self._last_flush = time.monotonic()
    if drop_from is not None:
      self._pending.append(tfrecord(event(drop_from, session_start=True)))
    self._flush()

  @property
  def remote(self) -> bool:
    return "://" in str(self.dir)

  def scalars(self, step: int, values: dict) -> None:
    if not values:
      return
    self._pending.append(tfrecord(event(step, scalars=values)))
    if not self.remote or time.monotonic() - self._last_flush >= self.remote_flush_s:
      self._flush()

  def _flush(self) -> None:
    if not self._pending:
      return
    data = b"".join(self._pending)
    self._pending = []
    self._last_flush = time.monotonic()
    if self.remote:  # names sort in write order, which is the order TensorBoard reads them in
      self._parts += 1
      (self.dir / f"{self._name}.{self._parts:06d}").write_bytes(data)
    else:
      with open(self.dir / self._name, "ab") as f:
        f.write(data)

  def close(self) -> None:
    self._flush()
