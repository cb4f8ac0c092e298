"""Figures written as PNG files, one way: the loss curve, the RL reward curve, the LR range test.

  fig, ax = new_figure(7, 4)
  ax.plot(steps, losses)
  save_figure(fig, "RUN/loss.png")

matplotlib is imported on first use (it is slow to import and most commands draw nothing) and
draws with its Agg backend, which needs no display. The PNG is written atomically (a temporary
name, then a rename; lmtiny.fs.atomic), so a reader never sees half a file.
"""
from __future__ import annotations

import io

from lmtiny.fs.atomic import atomic_write


def new_figure(width: float, height: float):
  """(figure, axes) of one plot, `width` x `height` inches, drawn off-screen."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  return plt.subplots(figsize=(width, height))


def save_figure(fig, path, dpi: int = 100) -> str:
  """Lays `fig` out, writes it to `path` as a PNG and closes it; returns the path."""
  from matplotlib import pyplot as plt
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, dpi=dpi, format="png")
  plt.close(fig)
  atomic_write(path, png.getvalue())
  return str(path)
