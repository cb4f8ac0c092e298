"""Atomic file writes, for local paths and gs:// alike (etils.epath).

Data is written to a uniquely named temporary sibling and renamed over the target, so a reader
never sees half a file and a crash never leaves a partial file under the real name.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from etils import epath


def atomic_write(path, data: bytes) -> None:
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
  try:
    tmp.write_bytes(data)
    tmp.replace(path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def atomic_write_json(path, obj: Any) -> None:
  atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())
