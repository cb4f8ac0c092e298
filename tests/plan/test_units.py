"""lmtiny.plan.units: counts, bytes and durations, each written one way."""
import pytest

from lmtiny.plan.units import duration, human, human_bytes


@pytest.mark.parametrize("seconds, text", [
    (0, "0.0s"), (12.46, "12.5s"), (59.9, "59.9s"), (60, "1m00s"), (125, "2m05s"), (3600, "1h00m"),
    (3725, "1h02m"), (86399, "23h59m"), (86400, "1d00h"), (3 * 86400 + 4 * 3600 + 59, "3d04h"), (-5, "0.0s")])
def test_duration(seconds, text):
  assert duration(seconds) == text


@pytest.mark.parametrize("seconds, text", [(0, "0m00s"), (12.7, "0m12s"), (125, "2m05s"), (3725, "1h02m"), (-1, "0m00s")])
def test_a_clock_counts_whole_seconds(seconds, text):
  assert duration(seconds, clock=True) == text


def test_counts_and_bytes():
  assert [human(n) for n in (37748736, 2.5e12, 1500, 12)] == ["37.7M", "2.5T", "1.5K", "12"]
  assert [human_bytes(n) for n in (3 * 2**30, 2**30, 2**30 - 2**20, 5 * 2**20)] == ["3.00 GiB", "1.00 GiB",
                                                                                      "1023.0 MiB", "5.0 MiB"]
