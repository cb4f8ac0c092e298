"""Atomic writes: a failed rename leaves the old file and no temporary behind; a directory appears
whole, and what a hard-killed build left is cleaned up by the next one."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from lmtiny.fs.atomic import atomic_directory, atomic_write_json, remove_stale_siblings


def test_json_is_written_atomically(tmp_path, monkeypatch):
  target = tmp_path / "m.json"
  atomic_write_json(str(target), {"a": 1})

  def boom(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", boom)
  with pytest.raises(OSError):
    atomic_write_json(str(target), {"a": 2})
  assert json.loads(target.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["m.json"]


def _names(path):
  return sorted(os.listdir(path))


def test_directory_appears_whole_replaces_the_old_one_and_a_failure_changes_nothing(tmp_path):
  target = tmp_path / "out"
  with atomic_directory(str(target)) as tmp:
    (pathlib.Path(tmp) / "a").write_text("1")
    assert not target.exists()  # nothing under the real name until the block ends
  assert _names(target) == ["a"]
  with atomic_directory(str(target), replace=True) as tmp:
    (pathlib.Path(tmp) / "b").write_text("2")
  assert _names(target) == ["b"] and _names(tmp_path) == ["out"]  # no old file survives
  with pytest.raises(RuntimeError):
    with atomic_directory(str(target), replace=True) as tmp:
      (pathlib.Path(tmp) / "c").write_text("3")
      raise RuntimeError("interrupted")
  assert _names(target) == ["b"] and _names(tmp_path) == ["out"]


def test_what_a_hard_killed_build_left_is_removed_by_the_next_one(tmp_path):
  target = tmp_path / "out"
  target.mkdir()
  (target / "kept").write_text("old")
  # SIGKILL inside the block: no finally runs, the temporary sibling stays behind.
  code = ("import os, signal, sys; from lmtiny.fs.atomic import atomic_directory\n"
          "with atomic_directory(sys.argv[1], replace=True) as tmp:\n"
          "  open(os.path.join(tmp, 'big'), 'w').write('x' * 1000)\n"
          "  os.kill(os.getpid(), signal.SIGKILL)\n")
  proc = subprocess.Popen([sys.executable, "-c", code, str(target)])
  assert proc.wait() == -signal.SIGKILL
  left = [n for n in _names(tmp_path) if n != "out"]
  assert len(left) == 1 and left[0].startswith(".out.tmp-") and str(proc.pid) in left[0]
  # Another live process's build (this one's pid) is not touched; the dead one's is.
  live = tmp_path / f".out.tmp-{socket.gethostname()}-{os.getpid()}-0123abcd"
  live.mkdir()
  with atomic_directory(str(target), replace=True) as tmp:
    (pathlib.Path(tmp) / "new").write_text("1")
  assert _names(tmp_path) == sorted(["out", live.name]) and _names(target) == ["new"]


def test_an_old_copy_left_between_the_two_renames_goes_back(tmp_path):
  dead = _dead_pid()
  old = tmp_path / f".out.old-{socket.gethostname()}-{dead}-0123abcd"
  old.mkdir()
  (old / "kept").write_text("old")
  assert remove_stale_siblings(str(tmp_path / "out")) == [old.name]
  assert _names(tmp_path) == ["out"] and (tmp_path / "out" / "kept").read_text() == "old"
  # Another host's siblings (a shared filesystem) are never judged by this host's process table.
  other = tmp_path / f".out.tmp-elsewhere-{dead}-0123abcd"
  other.mkdir()
  assert remove_stale_siblings(str(tmp_path / "out")) == [] and other.exists()


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid
