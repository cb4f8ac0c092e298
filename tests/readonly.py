"""A read-only place for tests of unwritable outputs (shared by the test modules)."""
import os
import subprocess

import pytest


class ReadOnly:
  """A directory to fill and then make read-only, for root too: a tmpfs remounted read-only (file
  permission bits do not stop root); for other users, the permission bits."""

  def __init__(self, tmp_path):
    self.root, self.mounts = tmp_path / "ro", []
    self.root.mkdir()
    self.writable(self.root)

  def writable(self, path):
    """`path` (a directory under root) stays writable when root is frozen."""
    path.mkdir(exist_ok=True)
    if os.geteuid() == 0:
      if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
      self.mounts.append(path)

  def freeze(self) -> str:
    """Makes root read-only; returns why a write there fails, as the error line says it."""
    if os.geteuid() == 0:
      subprocess.run(["mount", "-o", "remount,ro", str(self.root)], check=True)
      return "Read-only file system"
    os.chmod(self.root, 0o555)
    return "Permission denied"

  def release(self):
    for path in reversed(self.mounts):
      subprocess.run(["umount", str(path)], check=True)
    if os.geteuid() != 0:
      os.chmod(self.root, 0o755)
