"""Atomic writes: a failed rename leaves the old file and no temporary behind."""
import json
import os

import pytest

from lmtiny.files import atomic_write_json


def test_json_is_written_atomically(tmp_path, monkeypatch):
  target = tmp_path / "m.json"
  atomic_write_json(str(target), {"a": 1})

  def boom(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", boom)
  with pytest.raises(OSError):
    atomic_write_json(str(target), {"a": 2})
  assert json.loads(target.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["m.json"]
