"""The report card's leaderboard row: a whole run as one row of nanochat's leaderboard columns.

lmtiny.runs.card hands over its summary's own figures (the base run's CORE and val bpb cells, the
eval files, the wall time per stage, the chips), so the row and the summary never disagree; this
module picks and lays them out: run name, base DCLM CORE (never HF6), base val bpb, ChatCORE (the
last stage whose eval.json holds it: lmtiny.eval writes it only when all chat tasks ran), wall
time of all stages, chips, and the cost of that time on those chips at the stated price per
chip-hour. nanochat's own figure is quoted beneath as a constant reference line.
"""
from __future__ import annotations

from lmtiny.plan.units import duration

DASH = "-"  # a figure not measured, here and in the rest of the card
TITLE = "## Leaderboard row"
COLUMNS = ("run", "DCLM CORE", "val bpb", "ChatCORE", "wall time (all stages)", "chips", "cost")
REFERENCE = "Reference (nanochat HEAD's speedrun, not this run): d24 on 8 x H100, 99 min, CORE 0.2565."
NO_PRICE = f"{DASH} (pass --price-per-chip-hour)"


def cost(seconds: float, chips: int, price: float | None) -> str:
  """The estimated cost of `seconds` on `chips` chips at `price` dollars per chip-hour."""
  if price is None:
    return NO_PRICE
  return f"${seconds / 3600 * chips * price:,.2f} at ${price}/chip-hour"


def section(name: str, *, core: str, bpb: str, evals: list[tuple[str, dict]], seconds: dict[str, float],
            chips: tuple[int, str], price: float | None) -> list[str]:
  """The one-row table and the reference line. `evals`: (stage, eval.json) in pipeline order;
  `seconds`: wall seconds per stage; `chips`: (count, kind)."""
  chatcore = [f"{out['chatcore']:.4f} ({stage})" for stage, out in evals if isinstance(out.get("chatcore"), (int, float))]
  total = sum(seconds.values())
  cells = (name, core, bpb, chatcore[-1] if chatcore else DASH, duration(total) if seconds else DASH,
           f"{chips[0]} x {chips[1]}", cost(total, chips[0], price) if seconds else DASH)
  return [TITLE, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
          "| " + " | ".join(cells) + " |", "", REFERENCE]
