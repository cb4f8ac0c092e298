"""Training quality side by side: lmtiny's January recipe, lmtiny's 2026 recipe and nanochat's own
code at its HEAD, trained on the same real text in the same batches, scored by one evaluator
(validation bits per byte on the same held-out rows) and timed in the same process (tokens/s).

  mkdir -p /tmp/nanochat_head && git -C /work/.mirror/karpathy+nanochat/repo archive HEAD | tar -x -C /tmp/nanochat_head
  PYTHONPATH=. python benchmarks/recipe_side_by_side.py --nanochat /tmp/nanochat_head \\
      --recipes jan,new,nanochat --steps 900 --eval-every 100 --threads 2

nanochat is imported from that export, never copied into this repository. The batch-size rules
the other way round (new with them, nanochat without): --batch-scaling on --nanochat-batch-scaling off.

The shape, for every recipe: depth 4, width 256, 4 heads x 64, MLP 4x relu^2, seq 512, vocab 8,192,
8,192 tokens per step (16 rows of 512, no accumulation), float32 on CPU, one row = one causal
sequence (documents meet inside a row with a BOS between them and attend across it, as in nanochat).
--shape toy: the speedrun toy preset's model instead (configs/tiny_2026.py: width 192, 3 heads x 64,
vocab 4,096, 16 rows of 256 = 4,096 tokens per step, 4.9M parameters), for a run of >= 1 token per
parameter on this CPU (--steps 1220); nanochat gets n_embd=192, n_head=3 at the same depth.
  jan       lmtiny.config.nanochat_config(4) (nanochat at 962b6bf, 2026-01-04: Muon + AdamW, WSD with a
            20% linear warmdown to 0, no warmup), at the shape above.
  new       lmtiny.config.nanochat_leaderboard_config(4) (nanochat at 92d63d4: SSSL windows, short window 128
            at seq 512, value embeddings, residual scalars, smear, backout, NorMuon with cautious
            weight decay, warmup 40 / warmdown 65% to 5%), train.auto_batch off, then
            lmtiny.plan.recipe.resolve. --batch-scaling on applies nanochat's LR rule (x sqrt(8192 /
            524288) = 1/8) and its weight-decay rule (train.lr_batch_scaling, train.weight_decay_scaling;
            the horizon in the WD rule is train.tokens_per_param = 12 x scaling params, as nanochat's);
            off (default) leaves the LRs and weight decay as the config gives them.
  nanochat  nanochat's GPT and MuonAdamW imported from --nanochat (GPTConfig(sequence_len=512,
            vocab_size=8192, n_layer=4, n_head=4, n_kv_head=4, n_embd=256, window_pattern="SSSL"),
            built on the meta device, to_empty, init_weights, seed 42 as base_train), setup_optimizer
            with base_train's default LRs (embedding 0.3, unembedding 0.008, matrix 0.02, scalar 0.5,
            weight decay 0.28) and base_train's LR multiplier, Muon momentum and cosine weight decay
            schedules (re-implemented below from scripts/base_train.py at 92d63d4).
            --nanochat-batch-scaling on (default, nanochat as it ships) scales the LRs and weight
            decay as base_train does for --total-batch-size 8192 --num-iterations STEPS: LRs x 1/8,
            weight decay 0.28 x 1/8 x D_ref / D (D = 12 x scaling params of this model, D_ref = the
            same at d12: base_train's horizon from --target-param-data-ratio, used even when
            --num-iterations sets the steps); off leaves the defaults unscaled.
            --nanochat-compile on: torch.compile(model, dynamic=False) as base_train, and the
            optimizer's @torch.compile fused steps; off: torch.compiler.set_stance("force_eager").

Same batches: the training rows are one token stream (BOS + document, documents back to back) cut
into contiguous 513-token rows, shuffled once with a fixed seed; step s of every recipe trains on
rows [16 s, 16 s + 16) of that order (inputs = row[:-1], targets = row[1:]). The rows are built for
max(--steps, 900) steps, so a shorter run sees the prefix of the long run's batches; no row repeats.
--rows bestfit: nanochat's BOS-aligned best-fit rows instead (lmtiny.data.bestfit, checked equal to
nanochat's dataloader in tests/data/test_bestfit.py; buffer 1,000). The documents here are books and
long articles, so the same training documents, in the same order, are first cut at paragraph breaks
into web-page-sized pieces (log-normal lengths, median PIECE_CHARS characters); the pieces holding
the shape's bestfit_margin x the rows' tokens are tokenized, shuffled once with a fixed seed and packed
(every row starts with a BOS, whole pieces placed best-fit, the one that overflows cropped and its
tail never trained on); step s of every recipe trains on the packer's s-th batch. The tokenizer and
the validation rows are the same for both --rows.

Data (../shared/corpora, never copied into the repo): Project Gutenberg books and Wikipedia
articles. Validation, held out before anything else: Wikipedia articles (a seeded permutation)
up to half of --val-mb, and the first ~100 KB (cut at a paragraph) of held-out books, whole books
never trained on, for the other half. Training: the remaining Wikipedia articles, then the
remaining books in permuted order, as far as the steps need. Tokenizer: an 8,192-token BPE trained
with lmtiny.tokenizer.bpe.train_tokenizer on --tokenizer-mb of the training text (the training
Wikipedia articles and 32 KB of each training book in order). Tokenizer, token rows and their
metadata are cached under --cache.

Evaluation, one evaluator for all three: every --eval-every steps and at the end, per-token
cross-entropy (nats, float32 log-softmax of the model's own logits: lmtiny's token_losses,
nanochat's model(x) cropped logits) on the first --eval-rows of the shuffled validation rows;
bpb = sum of nats / (ln 2 x UTF-8 bytes of those target tokens), targets that decode to no bytes
(the BOS between documents) left out of both sums, as nanochat's evaluate_bpb does.
The default 384 rows (197k tokens, ~0.7 MB of the 2.5 MB held out) keep evaluation near 8% of a
900-step run at --eval-every 100 on 2 CPU cores (~10 s per eval for lmtiny, ~17 s for nanochat);
--eval-rows 0 scores all 1,344 rows at 3.5x that cost.

Throughput: training step only (eval and compile excluded), median over the steps after the
first 3, tokens/s = 8192 / median step seconds; both frameworks on --threads threads:
torch.set_num_threads, and for XLA:CPU (which sizes its pool from the CPUs the process may run on)
the process's CPU affinity is cut to --threads CPUs when that is fewer than it has.

Caveats: the inits differ (lmtiny's and torch's RNGs, seeds 0 and 42), so step-0 bpb differs a
little. lmtiny runs Muon's Newton-Schulz in optim.muon_ns_dtype (bfloat16, as both configs say
and as nanochat does on a GPU); nanochat on a CPU runs its Polar Express in float32 (its
COMPUTE_DTYPE). Timings on a shared machine move with the other load; compare recipes from one
invocation. A short run (--steps 30) has its warmup and warmdown squeezed into 30 steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import importlib
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
from typing import Callable, Iterable

import grain
import jax
import numpy as np
import torch

from lmtiny import cli, config as config_lib
from lmtiny.data import bestfit
from lmtiny.errors import UserError
from lmtiny.plan import recipe as recipe_lib
from lmtiny.tokenizer.bpe import train_tokenizer
from lmtiny.tokenizer.spm import Tokenizer
from lmtiny.training import steps as steps_lib
from lmtiny.training.resolved import resolve_run

# base_train's three schedules (get_lr_multiplier, get_muon_momentum, get_weight_decay at 92d63d4),
# as the tests' PyTorch reference writes them (checked there against nanochat's own figures).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import nanochat_optim_reference as schedules  # noqa: E402

RECIPES = ("jan", "new", "nanochat")
ROWS = ("contiguous", "bestfit")
DOC_SEPARATOR = "\n\n\x1e\n\n"
WIKI_TITLE = re.compile(r"(?m)^(?== [^=].* =$)")  # zero-width: the title line starts the article
BOOKS = "gutenberg_en_200MB.txt.gz"
WIKI = "wikipedia_enwiki2016_plain.txt.gz"
# --shape: "bench" (the default), or "toy": the speedrun toy preset's model (configs/tiny_2026.py: width
# 192, 3 heads, vocab 4,096, rows of 256, 4,096 tokens a step), small enough for >= 1 token per
# parameter on a CPU. main() picks one before anything reads SHAPE or BATCH_TOKENS.
# bestfit_margin (--rows bestfit): tokenize this many times the tokens the rows hold. Rows of 256 crop
# a ~1,100-token piece each, so they use about one piece a row and need twice the text rows of 512 do.
SHAPES = {"bench": dict(depth=4, width=256, heads=4, head_dim=64, seq_len=512, vocab=8192, rows=16, bestfit_margin=3),
          "toy": dict(depth=4, width=192, heads=3, head_dim=64, seq_len=256, vocab=4096, rows=16, bestfit_margin=6)}
SHAPE = dict(SHAPES["bench"])
BATCH_TOKENS = SHAPE["rows"] * SHAPE["seq_len"]
MIN_DATA_STEPS = 900           # rows are built for at least this many steps (a short run is a prefix)
VAL_BOOK_CHARS = 100_000       # each held-out book gives its first ~100 KB
TOKENIZER_BOOK_CHARS = 32_000  # each training book gives this much to the tokenizer sample
WARMUP_STEPS_UNTIMED = 3
SEED = 0
DATA_VERSION = 2
PIECE_CHARS, PIECE_SIGMA = 2_000, 1.0  # --rows bestfit: web-page-sized pieces, log-normal lengths (chars)

# base_train.py's defaults at 92d63d4
NC_LRS = dict(embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, scalar_lr=0.5)
NC_WEIGHT_DECAY = 0.28
NC_WARMUP, NC_WARMDOWN_RATIO, NC_FINAL_LR_FRAC = 40, 0.65, 0.05
NC_B_REF, NC_RATIO, NC_ASPECT = 2 ** 19, 12.0, 64
NC_SEED = 42


# ---------------------------------------------------------------------------------------------
# Flags

def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--recipes", default=",".join(RECIPES), help="comma list of jan, new, nanochat")
  p.add_argument("--steps", type=int, default=900)
  p.add_argument("--shape", choices=tuple(SHAPES), default="bench",
                 help="bench: the shape below; toy: the speedrun toy preset's (configs/tiny_2026.py)")
  p.add_argument("--rows", choices=ROWS, default="contiguous",
                 help="training rows: contiguous slices of one token stream, or nanochat's best-fit rows")
  p.add_argument("--eval-every", type=int, default=100)
  p.add_argument("--eval-rows", type=int, default=384,
                 help="validation rows of seq_len + 1 tokens scored at each eval (a multiple of 16; 0 = all)")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--batch-scaling", choices=("on", "off"), default="off",
                 help="new: nanochat's LR and weight-decay batch-size rules")
  p.add_argument("--nanochat-batch-scaling", choices=("on", "off"), default="on",
                 help="nanochat: base_train's LR and weight-decay batch-size rules (on: as it ships)")
  p.add_argument("--nanochat-compile", choices=("on", "off"), default="on",
                 help="nanochat: torch.compile the model and optimizer steps (off: eager)")
  p.add_argument("--nanochat", default="/tmp/nanochat_head", help="a checkout of karpathy/nanochat")
  p.add_argument("--corpora", default="../shared/corpora/train")
  p.add_argument("--val-mb", type=float, default=2.4, help="held-out text, half Wikipedia, half books")
  p.add_argument("--tokenizer-mb", type=float, default=4.0)
  p.add_argument("--cache", default="/tmp/recipe_side_by_side")
  p.add_argument("--out", default="", help="JSON results (default CACHE/result.json)")
  args = p.parse_args(argv)
  use_shape(args.shape)
  check_args(args)
  return args


def use_shape(name: str) -> None:
  global BATCH_TOKENS
  SHAPE.update(SHAPES[name])
  BATCH_TOKENS = SHAPE["rows"] * SHAPE["seq_len"]


def check_args(args) -> None:
  args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
  bad = [r for r in args.recipes if r not in RECIPES]
  if bad or not args.recipes:
    raise UserError(f"--recipes={','.join(args.recipes)!r}: expected a comma list of {', '.join(RECIPES)}")
  for flag in ("steps", "eval_every", "threads"):
    if getattr(args, flag) < 1:
      raise UserError(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be >= 1")
  if args.eval_rows < 0 or args.eval_rows % SHAPE["rows"]:
    raise UserError(f"--eval-rows={args.eval_rows}: must be 0 or a positive multiple of {SHAPE['rows']}")
  if not 0.1 <= args.val_mb <= 20 or not 0.5 <= args.tokenizer_mb <= 50:
    raise UserError(f"--val-mb={args.val_mb} / --tokenizer-mb={args.tokenizer_mb}: expected 0.1..20 / 0.5..50")
  for name in (BOOKS, WIKI):
    if not os.path.isfile(os.path.join(args.corpora, name)):
      raise UserError(f"--corpora={args.corpora}: no {name} there")
  if "nanochat" in args.recipes and not os.path.isfile(os.path.join(args.nanochat, "nanochat", "gpt.py")):
    raise UserError(f"--nanochat={args.nanochat}: no nanochat/gpt.py there (export nanochat's HEAD with "
                    f"git archive, see this script's docstring)")
  args.out = args.out or os.path.join(args.cache, "result.json")


def set_threads(threads: int) -> str:
  """The same thread count for torch and XLA:CPU; says what was done."""
  torch.set_num_threads(threads)
  cpus = sorted(os.sched_getaffinity(0))
  if threads < len(cpus):
    os.sched_setaffinity(0, cpus[:threads])  # before JAX's CPU client exists: XLA sizes its pool from this
    return f"torch.set_num_threads({threads}); CPU affinity cut to {cpus[:threads]} for XLA:CPU"
  return (f"torch.set_num_threads({threads}); XLA:CPU uses the process's {len(cpus)} CPUs"
          + ("" if threads == len(cpus) else f" (fewer than --threads={threads})"))


# ---------------------------------------------------------------------------------------------
# Data: documents, held-out split, tokenizer, token rows (cached)

def read_documents(path: str) -> list[str]:
  """A corpus file's documents: split at the record separator, or, in the Wikipedia file (which
  has none), at each article's "= Title =" line."""
  with gzip.open(path, "rt", encoding="utf-8") as f:
    text = f.read()
  docs = text.split(DOC_SEPARATOR) if DOC_SEPARATOR in text else WIKI_TITLE.split(text)
  return [d.strip() for d in docs if d.strip()]


def utf8_len(text: str) -> int:
  return len(text.encode("utf-8"))


def book_excerpt(book: str, chars: int) -> str:
  """The book's first ~`chars` characters, cut at a paragraph break when there is one."""
  if len(book) <= chars:
    return book
  cut = book.rfind("\n\n", chars // 2, chars)
  return book[:cut if cut > 0 else chars]


@dataclasses.dataclass
class Split:
  val: list[str]                 # held-out documents, Wikipedia and book excerpts alternating
  train_wiki: list[str]
  train_books: list[str]         # in training order
  val_bytes: dict[str, int]


def split_documents(books: list[str], wiki: list[str], val_mb: float) -> Split:
  rng = np.random.default_rng(SEED)
  books = [books[i] for i in rng.permutation(len(books))]
  wiki = [wiki[i] for i in rng.permutation(len(wiki))]
  half = val_mb * 1e6 / 2
  val_wiki, n = [], 0
  while wiki and n < half:
    val_wiki.append(wiki.pop(0))
    n += utf8_len(val_wiki[-1])
  val_books, m = [], 0
  while books and m < half:
    val_books.append(book_excerpt(books.pop(0), VAL_BOOK_CHARS))
    m += utf8_len(val_books[-1])
  val = [d for pair in zip(val_wiki, val_books) for d in pair]
  val += val_wiki[len(val_books):] + val_books[len(val_wiki):]
  return Split(val=val, train_wiki=wiki, train_books=books,
               val_bytes={"wikipedia": n, "books": m, "wikipedia_docs": len(val_wiki), "books_docs": len(val_books)})


def tokenizer_sample(split: Split, mb: float) -> list[str]:
  out, n = [], 0
  for doc in split.train_wiki + [book_excerpt(b, TOKENIZER_BOOK_CHARS) for b in split.train_books]:
    if n >= mb * 1e6:
      break
    out.append(doc)
    n += utf8_len(doc)
  return out


def encode_documents(tok: Tokenizer, docs: Iterable[str], need: int | None, threads: int) -> list[np.ndarray]:
  """BOS + tokens of each document, in order, until they hold `need` tokens (None: all)."""
  out, total, docs = [], 0, iter(docs)
  while chunk := list(itertools.islice(docs, 8)):
    for ids in tok.encode_batch(chunk, num_threads=threads):
      out.append(np.asarray([tok.bos_id] + ids, np.int32))
      total += out[-1].size
      if need is not None and total >= need:
        return out
  if need is not None:
    raise UserError(f"--steps: the training text holds {total:,} tokens, fewer than the {need:,} needed")
  return out


def shuffled_rows(stream: np.ndarray, num_rows: int, seed: int) -> np.ndarray:
  width = SHAPE["seq_len"] + 1
  rows = stream[:num_rows * width].reshape(num_rows, width)
  return rows[np.random.default_rng(seed).permutation(num_rows)]


def web_pieces(docs: Iterable[str], seed: int) -> Iterable[str]:
  """Each document cut at paragraph breaks into pieces of web-page length: a piece ends at the first
  paragraph break after a log-normal number of characters (median PIECE_CHARS)."""
  rng = np.random.default_rng(seed)
  for doc in docs:
    start = 0
    while start < len(doc):
      cut = doc.find("\n\n", start + 1 + int(rng.lognormal(math.log(PIECE_CHARS), PIECE_SIGMA)))
      end = len(doc) if cut < 0 else cut
      if piece := doc[start:end].strip():
        yield piece
      start = end


def bestfit_rows(docs: list[np.ndarray], num_rows: int, bos_id: int, seed: int) -> tuple[np.ndarray, dict]:
  """nanochat's BOS-aligned best-fit rows (lmtiny.data.bestfit, nanochat's buffer of 1,000) over
  `docs` (BOS + tokens each) in a seeded order; and what they used."""
  docs = [docs[i][1:] for i in np.random.default_rng(seed).permutation(len(docs))]  # the packer adds the BOS
  it = iter(bestfit.BestFitRowsDataset(grain.MapDataset.source(docs), seq_len=SHAPE["seq_len"],
                                       batch_size=SHAPE["rows"], bos_id=bos_id))
  batches = [next(it, None) for _ in range(num_rows // SHAPE["rows"])]
  state = it.get_state()
  if state["next_index"] == len(docs):  # the buffer ran short (or out): no longer nanochat's rows
    raise UserError(f"--rows bestfit: {len(docs):,} pieces are too few for {num_rows:,} rows "
                    f"(raise the shape's bestfit_margin)")
  used = sum(d.size + 1 for d in docs[:state["next_index"]]) - sum(docs[i].size + 1 for i in state["buffer"])
  rows = np.concatenate([b["tokens"] for b in batches])
  return rows, {"pieces": len(docs), "pieces_used": state["next_index"] - len(state["buffer"]),
                "piece_tokens_mean": round(sum(d.size + 1 for d in docs) / len(docs), 1),
                "cropped_fraction": round(1 - rows.size / used, 4)}


@dataclasses.dataclass
class Data:
  train_rows: np.ndarray    # [rows, 513] int32, in training order
  val_rows: np.ndarray      # [rows, 513] int32, shuffled once
  token_bytes: np.ndarray   # [vocab] UTF-8 bytes per token id
  meta: dict


def load_data(args) -> Data:
  data_steps = max(args.steps, MIN_DATA_STEPS)
  key = dict(version=DATA_VERSION, seed=SEED, steps=data_steps, val_mb=args.val_mb, tokenizer_mb=args.tokenizer_mb,
             vocab=SHAPE["vocab"], seq_len=SHAPE["seq_len"], rows=SHAPE["rows"])
  tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
  base = os.path.join(args.cache, f"data_{tag}" + ("" if args.rows == "contiguous" else f"_{args.rows}"))
  tok_dir = os.path.join(args.cache, f"tokenizer_{tag}")  # the same tokenizer and validation rows for both --rows
  if os.path.isfile(base + ".json"):
    with open(base + ".json") as f:
      meta = json.load(f)
    tok = Tokenizer.load(tok_dir)
    return Data(np.load(base + "_train.npy"), np.load(base + "_val.npy"), np.asarray(tok.token_bytes), meta)
  os.makedirs(args.cache, exist_ok=True)
  t0 = time.perf_counter()
  print(f"data: reading {BOOKS} and {WIKI} ...", flush=True)
  split = split_documents(read_documents(os.path.join(args.corpora, BOOKS)),
                          read_documents(os.path.join(args.corpora, WIKI)), args.val_mb)
  if os.path.isdir(tok_dir):
    tok = Tokenizer.load(tok_dir)
  else:
    sample = tokenizer_sample(split, args.tokenizer_mb)
    print(f"data: training the {SHAPE['vocab']}-token BPE on {sum(map(utf8_len, sample)) / 1e6:.1f} MB ...", flush=True)
    tok = train_tokenizer(sample, SHAPE["vocab"], tok_dir, seed=SEED, num_threads=args.threads)
  train_rows_needed = data_steps * SHAPE["rows"]
  width = SHAPE["seq_len"] + 1
  print(f"data: tokenizing {train_rows_needed:,} training rows of {width} ({args.rows}) ...", flush=True)
  train_docs = split.train_wiki + split.train_books
  if args.rows == "contiguous":
    docs = encode_documents(tok, train_docs, train_rows_needed * width, args.threads)
    train_stream, used_text = np.concatenate(docs), train_docs[:len(docs)]
    train_rows = shuffled_rows(train_stream, train_rows_needed, SEED)
    rows_meta = dict(train_docs=len(docs), train_wiki_docs=min(len(docs), len(split.train_wiki)),
                     train_text_mb=round(sum(map(utf8_len, used_text)) / 1e6, 2),
                     train_tokens_per_byte_hint=round(len(train_stream) / sum(map(utf8_len, used_text)), 4))
  else:
    docs = encode_documents(tok, web_pieces(train_docs, SEED), SHAPE["bestfit_margin"] * train_rows_needed * width,
                            args.threads)
    train_rows, rows_meta = bestfit_rows(docs, train_rows_needed, tok.bos_id, SEED)
  val_stream = np.concatenate(encode_documents(tok, split.val, None, args.threads))
  val_rows = shuffled_rows(val_stream, len(val_stream) // width, SEED + 1)
  meta = dict(key, tag=tag, train_row_layout=args.rows, tokenizer=tok_dir, tokenizer_hash=tok.hash,
              val_bytes_raw=split.val_bytes, val_rows=len(val_rows), val_tokens=len(val_stream),
              val_rows_sha256=hashlib.sha256(val_rows.tobytes()).hexdigest()[:12], train_rows=len(train_rows),
              **rows_meta, build_s=round(time.perf_counter() - t0, 1))
  np.save(base + "_train.npy", train_rows)
  np.save(base + "_val.npy", val_rows)
  with open(base + ".json", "w") as f:
    json.dump(meta, f, indent=1)
  print(f"data: built in {meta['build_s']} s: {meta}", flush=True)
  return Data(train_rows, val_rows, np.asarray(tok.token_bytes), meta)


def step_rows(data: Data, step: int) -> np.ndarray:
  r = SHAPE["rows"]
  return data.train_rows[step * r:(step + 1) * r]


# ---------------------------------------------------------------------------------------------
# The common evaluator

def validation_bpb(losses_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], val_rows: np.ndarray,
                   token_bytes: np.ndarray) -> dict:
  """bpb over `val_rows`: losses_fn(inputs [16, 512], targets) -> per-token nats [16, 512]."""
  nats, nbytes, tokens = 0.0, 0, 0
  for i in range(0, len(val_rows), SHAPE["rows"]):
    rows = val_rows[i:i + SHAPE["rows"]]
    x, y = rows[:, :-1], rows[:, 1:]
    ce = np.asarray(losses_fn(x, y), np.float64)
    b = token_bytes[y]
    counted = b > 0  # the BOS between documents decodes to nothing: out of both sums
    nats += float(ce[counted].sum())
    nbytes += int(b[counted].sum())
    tokens += int(counted.sum())
  return {"bpb": nats / (math.log(2) * nbytes), "loss": nats / tokens, "val_tokens": tokens, "val_bytes": nbytes}


# ---------------------------------------------------------------------------------------------
# Recipes: each gives init / train_step(rows) -> loss / token_losses(x, y) and its settings

@dataclasses.dataclass
class Runner:
  train_step: Callable[[np.ndarray], float]
  token_losses: Callable[[np.ndarray, np.ndarray], np.ndarray]
  settings: dict
  close: Callable[[], None] = lambda: None


def lmtiny_config(name: str, steps: int, batch_scaling: bool):
  cfg = config_lib.nanochat_config(SHAPE["depth"]) if name == "jan" else config_lib.nanochat_leaderboard_config(SHAPE["depth"])
  cfg.model.update(d_model=SHAPE["width"], num_heads=SHAPE["heads"], head_dim=SHAPE["head_dim"],
                   vocab_size=SHAPE["vocab"], max_seq_len=SHAPE["seq_len"], dtype="float32", scan_layers=False,
                   remat="none")
  cfg.train.update(seq_len=SHAPE["seq_len"], batch_tokens=BATCH_TOKENS, steps=steps)
  cfg.data.document_mask = False  # one causal sequence per row, as nanochat (segment ids are all 1 anyway)
  if name == "new":
    cfg.train.update(auto_batch=False, lr_batch_scaling=batch_scaling, weight_decay_scaling=batch_scaling)
  config_lib.validate(cfg)
  return recipe_lib.resolve(cfg)


def lmtiny_batch(rows: np.ndarray) -> dict[str, np.ndarray]:
  b, t = rows.shape[0], SHAPE["seq_len"]
  return {"inputs": np.ascontiguousarray(rows[:, :-1]), "targets": np.ascontiguousarray(rows[:, 1:]),
          "segment_ids": np.ones((b, t), np.int32),
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          "loss_mask": np.ones((b, t), np.float32)}


def lmtiny_runner(name: str, args) -> Runner:
  run = resolve_run(lmtiny_config(name, args.steps, args.batch_scaling == "on"))
  cfg, mesh = run.cfg, run.mesh
  built = steps_lib.build_steps(cfg, mesh, total_steps=args.steps)
  document_mask = cfg.data.document_mask
  mesh_ctx = jax.set_mesh(mesh)
  mesh_ctx.__enter__()
  holder = {"state": built.init()}

  @jax.jit
  def losses(params, batch):
    return steps_lib.token_losses(built.graphdef, built.model_params(params), batch, document_mask=document_mask)

  def train_step(rows):
    holder["state"], metrics = built.train_step(holder["state"], steps_lib.device_batch(lmtiny_batch(rows), mesh))
    return float(jax.block_until_ready(metrics["loss"]))

  def token_losses(x, y):
    rows = np.concatenate([x, y[:, -1:]], axis=1)
    return np.asarray(losses(holder["state"]["params"], steps_lib.device_batch(lmtiny_batch(rows), mesh)))

  def close():
    holder.clear()
    mesh_ctx.__exit__(None, None, None)

  settings = {"model": cfg.model.to_dict(), "optim": cfg.optim.to_dict(),
              "train": {k: cfg.train[k] for k in ("seq_len", "batch_tokens", "steps", "tokens_per_param",
                                                  "horizon_params", "seed")},
              "document_mask": document_mask, "params": int(sum(x.size for x in jax.tree.leaves(holder["state"]["params"])))}
  return Runner(train_step, token_losses, settings, close)


def nc_config(gpt, depth: int, width: int):
  """base_train's build_model_meta config at `depth` and model width `width` (head dim 64): base_train
  sets width = depth x --aspect-ratio (64 by default; the toy shape's 192 at depth 4 is aspect 48)."""
  model_dim = -(-width // SHAPE["head_dim"]) * SHAPE["head_dim"]
  heads = model_dim // SHAPE["head_dim"]
  return gpt.GPTConfig(sequence_len=SHAPE["seq_len"], vocab_size=SHAPE["vocab"], n_layer=depth, n_head=heads,
                       n_kv_head=heads, n_embd=model_dim, window_pattern="SSSL")


def nc_scaling_params(gpt, depth: int, width: int) -> int:
  with torch.device("meta"):
    counts = gpt.GPT(nc_config(gpt, depth, width)).num_scaling_params()
  return counts["transformer_matrices"] + counts["lm_head"]


def nc_batch_rules(gpt, batch_scaling: bool) -> tuple[float, float, dict]:
  """(LR scale, scaled weight decay, what went in), as base_train computes them for this batch."""
  if not batch_scaling:
    return 1.0, NC_WEIGHT_DECAY, {}
  target_tokens = int(NC_RATIO * nc_scaling_params(gpt, SHAPE["depth"], SHAPE["width"]))
  d_ref = NC_RATIO * nc_scaling_params(gpt, 12, 12 * NC_ASPECT)  # base_train's reference model, d12
  lr_scale = (BATCH_TOKENS / NC_B_REF) ** 0.5
  wd = NC_WEIGHT_DECAY * math.sqrt(BATCH_TOKENS / NC_B_REF) * (d_ref / target_tokens)
  return lr_scale, wd, {"target_tokens": target_tokens, "d_ref": d_ref, "b_ref": NC_B_REF}


def import_nanochat(path: str):
  os.environ.setdefault("NANOCHAT_DTYPE", "float32")
  sys.path.insert(0, os.path.abspath(path))
  gpt = importlib.import_module("nanochat.gpt")
  common = importlib.import_module("nanochat.common")
  if common.COMPUTE_DTYPE != torch.float32:
    raise UserError(f"--nanochat: COMPUTE_DTYPE is {common.COMPUTE_DTYPE}, expected float32 (unset NANOCHAT_DTYPE)")
  return gpt


def nanochat_runner(args) -> Runner:
  if args.nanochat_compile == "off":
    # Eager everywhere, the optimizer's @torch.compile(fullgraph=True) steps included (with
    # torch._dynamo.config.disable they raise "found no compiled frames" in torch 2.13).
    torch.compiler.set_stance("force_eager")
  gpt = import_nanochat(args.nanochat)
  torch.manual_seed(NC_SEED)
  with torch.device("meta"):
    model = gpt.GPT(nc_config(gpt, SHAPE["depth"], SHAPE["width"]))
  model.to_empty(device="cpu")
  model.init_weights()
  lr_scale, weight_decay, rule_inputs = nc_batch_rules(gpt, args.nanochat_batch_scaling == "on")
  optimizer = model.setup_optimizer(**{k: v * lr_scale for k, v in NC_LRS.items()}, weight_decay=weight_decay)
  raw_model = model
  if args.nanochat_compile == "on":
    model = torch.compile(model, dynamic=False)
  state = {"step": 0}
  num_iterations = args.steps

  def train_step(rows):
    x = torch.from_numpy(np.ascontiguousarray(rows[:, :-1], np.int64))  # contiguous, as nanochat's loader gives
    y = torch.from_numpy(np.ascontiguousarray(rows[:, 1:], np.int64))
    model.train()
    loss = model(x, y)
    loss.backward()
    it = state["step"]
    lrm = schedules.lr_multiplier(it, num_iterations, NC_WARMUP, NC_WARMDOWN_RATIO, NC_FINAL_LR_FRAC)
    momentum = schedules.muon_momentum(it, num_iterations, NC_WARMDOWN_RATIO)
    wd = schedules.muon_weight_decay(it, num_iterations, weight_decay)
    for group in optimizer.param_groups:
      group["lr"] = group["initial_lr"] * lrm
      if group["kind"] == "muon":
        group["momentum"] = momentum
        group["weight_decay"] = wd
    optimizer.step()
    model.zero_grad(set_to_none=True)
    state["step"] += 1
    return float(loss.detach())

  def token_losses(x, y):
    model.eval()
    with torch.no_grad():
      logits = model(torch.from_numpy(np.ascontiguousarray(x, np.int64)))
      ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                             torch.from_numpy(y.astype(np.int64)).reshape(-1), reduction="none")
    return ce.reshape(y.shape).numpy()

  groups = [{k: (v if not isinstance(v, tuple) else list(v)) for k, v in g.items() if k != "params"}
            | {"numel": sum(p.numel() for p in g["params"])} for g in optimizer.param_groups]
  settings = {"config": dataclasses.asdict(raw_model.config), "compile": args.nanochat_compile,
              "batch_scaling": args.nanochat_batch_scaling, "lr_scale": lr_scale, "weight_decay": weight_decay,
              "rule_inputs": rule_inputs, "param_groups": json.loads(json.dumps(groups, default=float)),
              "params": sum(p.numel() for p in raw_model.parameters()), "seed": NC_SEED,
              "scaling_params": raw_model.num_scaling_params(), "nanochat": os.path.abspath(args.nanochat)}
  return Runner(train_step, token_losses, settings)


# ---------------------------------------------------------------------------------------------
# Running

def eval_points(steps: int, every: int) -> list[int]:
  return sorted(set(range(0, steps, every)) | {steps})


def run_recipe(name: str, args, data: Data, val_rows: np.ndarray) -> dict:
  t_start = time.perf_counter()
  runner = nanochat_runner(args) if name == "nanochat" else lmtiny_runner(name, args)
  setup_s = time.perf_counter() - t_start
  points, curve, losses, step_s, eval_s = set(eval_points(args.steps, args.eval_every)), [], [], [], []
  for step in range(args.steps + 1):
    if step in points:
      t0 = time.perf_counter()
      r = validation_bpb(runner.token_losses, val_rows, data.token_bytes)
      eval_s.append(time.perf_counter() - t0)
      curve.append(dict(step=step, tokens=step * BATCH_TOKENS, **r))
      print(f"  {name:8s} step {step:5d}  val bpb {r['bpb']:.4f}  val loss {r['loss']:.4f}  "
            f"({eval_s[-1]:.1f} s)", flush=True)
    if step == args.steps:
      break
    t0 = time.perf_counter()
    losses.append(runner.train_step(step_rows(data, step)))
    step_s.append(time.perf_counter() - t0)
    if not math.isfinite(losses[-1]):
      print(f"  {name:8s} step {step:5d}  train loss {losses[-1]}: diverged, stopping this recipe", flush=True)
      break
    if (step + 1) % 10 == 0:
      print(f"  {name:8s} step {step + 1:5d}  train loss {losses[-1]:.4f}  step {1e3 * step_s[-1]:.0f} ms", flush=True)
  runner.close()
  timed = step_s[WARMUP_STEPS_UNTIMED:] or step_s
  median = statistics.median(timed)
  return {"recipe": name, "settings": runner.settings, "curve": curve, "train_loss": losses, "step_s": step_s,
          "first_step_s": step_s[0] if step_s else None, "median_step_s": median,
          "tokens_per_s": BATCH_TOKENS / median, "eval_s": eval_s, "setup_s": setup_s, "steps": len(losses),
          "wall_s": time.perf_counter() - t_start,
          "final_bpb": curve[-1]["bpb"], "min_bpb": min(c["bpb"] for c in curve)}


def format_tables(results: list[dict]) -> str:
  names = [r["recipe"] for r in results]
  lines = ["", "validation bpb", f"{'step':>6s} {'tokens':>10s} " + " ".join(f"{n:>9s}" for n in names)]
  by_step = [{c["step"]: c["bpb"] for c in r["curve"]} for r in results]
  for step in sorted(set().union(*by_step)):
    cells = " ".join(f"{b[step]:9.4f}" if step in b else f"{'-':>9s}" for b in by_step)
    lines.append(f"{step:6d} {step * BATCH_TOKENS:10,d} {cells}")
  lines += ["", f"{'recipe':9s} {'final bpb':>9s} {'min bpb':>8s} {'tokens/s':>9s} {'ms/step':>8s} "
                f"{'steps':>5s} {'eval s':>7s} {'wall s':>7s}"]
  for r in results:
    lines.append(f"{r['recipe']:9s} {r['final_bpb']:9.4f} {r['min_bpb']:8.4f} {r['tokens_per_s']:9,.0f} "
                 f"{1e3 * r['median_step_s']:8.1f} {r['steps']:5d} {sum(r['eval_s']):7.1f} {r['wall_s']:7.1f}")
  return "\n".join(lines)


def run(argv) -> int:
  args = parse_args(argv)
  threads_note = set_threads(args.threads)
  data = load_data(args)
  val_rows = data.val_rows if args.eval_rows == 0 else data.val_rows[:args.eval_rows]
  if len(val_rows) < args.eval_rows:
    raise UserError(f"--eval-rows={args.eval_rows}: only {len(data.val_rows)} validation rows")
  val_rows = val_rows[:len(val_rows) // SHAPE["rows"] * SHAPE["rows"]]
  print(f"threads: {threads_note}", flush=True)
  print(f"data: {len(data.train_rows):,} training rows ({args.rows}), {len(val_rows)} of {len(data.val_rows)} "
        f"validation rows scored ({len(val_rows) * SHAPE['seq_len']:,} tokens)", flush=True)
  results = []
  for name in args.recipes:
    print(f"{name}: {args.steps} steps of {BATCH_TOKENS} tokens", flush=True)
    results.append(run_recipe(name, args, data, val_rows))
  print(format_tables(results), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  out = {"command": " ".join([os.path.basename(sys.argv[0])] + list(argv)), "shape": SHAPE, "threads": threads_note,
         "data": data.meta, "eval_rows": len(val_rows), "args": {k: v for k, v in vars(args).items()},
         "torch": torch.__version__, "jax": jax.__version__, "results": results}
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1, default=float)
  print(f"wrote {args.out}", flush=True)
  return 0


def main(argv=None) -> int:
  return cli.run_main(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  sys.exit(main())
