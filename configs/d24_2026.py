"""nanochat's 2026 leaderboard model (lmtiny.config.nanochat_leaderboard_config): depth 24, sliding windows, value
embeddings, residual scalars, smear and backout; NorMuon + AdamW; nanochat's batch-size rules; the leaderboard's
horizon of 8 tokens per scaling parameter (runs/speedrun.sh, which also trains in fp8:
--config.model.matmul_dtype=fp8 on H100s)."""
from lmtiny.config import nanochat_leaderboard_config

NUM_PARAMS = 1_384_122_122


def get_config():
  c = nanochat_leaderboard_config(24, tokens_per_param=8.0)
  c.data.packing = "bestfit"  # nanochat's BOS-aligned best-fit rows (lmtiny.data.bestfit)
  c.data.document_mask = False  # rows attend across their documents, as nanochat's (docs/performance.md)
  return c
