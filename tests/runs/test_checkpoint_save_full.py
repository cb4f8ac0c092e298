"""A checkpoint save that fills the disk is its one `error:` line on stderr: the writes orbax had in
flight when one failed complete into its closed event loop ("RuntimeError: Event loop is closed",
one traceback each) and asyncio logs their unretrieved tasks; before, a disk-full run printed ~100
of those around its line. A real process on a small tmpfs (root here; skipped where mounting is
not allowed)."""
import os
import subprocess
import sys

import pytest

from lm_fixtures import ROOT, xla_flags

# 192 arrays of 16 KB (3 MB a checkpoint) on a 4.5 MB disk: step 1 saves, step 2 fails with many
# writes in flight (every run of this printed hundreds of lines before).
_SAVE_UNTIL_FULL = """
import sys
import numpy as np
from lmtiny import cli
from lmtiny.runs.checkpoint import Checkpointer

def run(argv):
  ckpt = Checkpointer(argv[1], keep=1, async_save=True)
  state = {"params": {f"w{i}": np.random.default_rng(i).normal(size=(16, 256)).astype(np.float32) for i in range(192)}}
  try:
    for step in (1, 2, 3):
      ckpt.save(step, state)
  finally:
    ckpt.close()

sys.exit(cli.run_main(run, sys.argv))
"""


@pytest.fixture
def small_disk(tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4500k", "tmpfs", str(disk)], capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here (not root)")
  yield disk
  subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_save_that_fills_the_disk_prints_its_one_line_only(small_disk):
  env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  done = subprocess.run([sys.executable, "-c", _SAVE_UNTIL_FULL, str(small_disk / "ckpt")], capture_output=True,
                        text=True, env=env, timeout=300)
  assert done.returncode == 1 and done.stderr == (
      f"error: checkpoint at step 2 failed to save (disk full: No space left on device) in {small_disk / 'ckpt'}; "
      "the last good checkpoint is step 1\n"), done.stderr[-3000:]
