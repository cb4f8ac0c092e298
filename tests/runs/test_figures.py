"""lmtiny.runs.figures: one way a figure becomes a PNG file."""
import matplotlib

from lmtiny.runs.figures import new_figure, save_figure


def test_save_figure_writes_a_png_and_closes_the_figure(tmp_path):
  fig, ax = new_figure(3, 2)
  ax.plot([0, 1], [1, 0])
  path = tmp_path / "plot.png"
  assert save_figure(fig, path, dpi=50) == str(path)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["plot.png"]
  assert matplotlib.get_backend().lower() == "agg" and not matplotlib.pyplot.get_fignums()
