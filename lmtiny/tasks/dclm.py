"""DCLM CORE as published: the 22 tasks of the DCLM eval bundle, read in the bundle's own layout
(nanochat's copy, as its scripts/base_eval.py reads it), scored by lmtiny.tasks.hf6's rows.

Layout of eval_bundle/:
  core.yaml            `icl_tasks`: label, dataset_uri (under eval_data/), num_fewshot (a list; its
                       first entry is used, as nanochat does), icl_task_type (multiple_choice |
                       schema | language_modeling), continuation_delimiter (default " ")
  eval_meta_data.csv   "Eval Task" and "Random baseline" (percent) per task
  eval_data/<category>/<file>.jsonl   one item a line: multiple_choice {query, choices, gold},
                       schema {context_options, continuation, gold}, language_modeling {context,
                       continuation}
Prompts as nanochat renders them: few-shot examples "<context><delimiter><answer>\\n\\n" then the
item's; a language-modelling context is stripped, and its continuation is scored from the end of
the stripped prompt (greedy decoding must give all of it). Multiple choice and schema compare mean
loss per token (never --norm char: CORE is defined per token). An item's few-shot examples are
drawn from the task's other items with random.Random(1234 + index) after the items are shuffled
with random.Random(1337), which --max-items then cuts (base_eval's order): the same prompts as
nanochat's. Centered accuracy (acc - 0.01 b) / (1 - 0.01 b) with b the random baseline in percent;
CORE is the mean over every task core.yaml lists (DCLM's "low_variance_datasets_centered").

The bundle comes from `--data-dir DIR` (DIR holding eval_bundle/, or being it), else from the cache
(~/.cache/lmtiny/eval_bundle), downloaded there once from nanochat's copy when the network allows
(unzipped into a temporary sibling and renamed into place whole). A cache directory that lmtiny did
not fill is never overwritten. HF_HUB_OFFLINE=1, the project's offline switch, counts as no network.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import random
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from typing import Sequence
from urllib.parse import urlsplit

import yaml

from lmtiny.corpus.hub import probe
from lmtiny.data.dataset import DEFAULT_CACHE_DIR
from lmtiny.fs.atomic import atomic_directory
from lmtiny.tasks import hf6
from lmtiny.tasks.rows import EvalDataError, jsonl_rows, read_text
from lmtiny.tasks.scoring import Scorer

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
CACHE_DIR = os.path.join(DEFAULT_CACHE_DIR, "eval_bundle")
CORE = "core"              # the suite's name in --tasks / train.core_tasks and its key in eval.json
KEY_PREFIX = "core:"       # a task's result key: core:<label> (apart from the HF6 tasks' names)
SHUFFLE_SEED = 1337        # the items' order before --max-items cuts (nanochat's base_eval)
_KINDS = {"multiple_choice": "multiple_choice", "schema": "schema", "language_modeling": "language_model"}
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclasses.dataclass(frozen=True)
class BundleTask:
  label: str
  task: hf6.Task      # kind, shots, chance = 0.01 * baseline, delimiter; source = the jsonl path
  baseline: float      # random baseline, percent (eval_meta_data.csv)


@dataclasses.dataclass(frozen=True)
class Suite:
  bundle: str                                   # the eval_bundle directory read
  tasks: tuple[BundleTask, ...]                 # in core.yaml's order
  items: dict[str, list[hf6.Item]]             # by label


def result_key(label: str) -> str:
  return KEY_PREFIX + label


def centered(accuracy: float, baseline: float) -> float:
  """DCLM's centering of an accuracy by its random baseline (percent)."""
  return hf6.centered(accuracy, 0.01 * baseline)


def core_metric(centered_values: Sequence[float]) -> float:
  return sum(centered_values) / len(centered_values)


# -- finding the bundle ------------------------------------------------------------------------

def _holds_bundle(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, "core.yaml"))


def _way_out(flag: str) -> str:
  return f"point {flag} at a directory holding eval_bundle/ (unzipped from {BUNDLE_URL})"


def bundle_dir(data_dir: str | None, flag: str = "--data-dir", cache: str | None = None) -> str:
  """The eval_bundle directory: DATA_DIR or DATA_DIR/eval_bundle; without `data_dir`, the cache,
  downloaded into first when it is empty and the network allows."""
  if data_dir:
    d = os.path.expanduser(data_dir)
    for candidate in (os.path.join(d, "eval_bundle"), d):
      if _holds_bundle(candidate):
        return candidate
    raise EvalDataError(f"{flag}={data_dir}: no eval_bundle/core.yaml (the DCLM eval bundle, unzipped from "
                        f"{BUNDLE_URL})")
  cache = os.path.expanduser(cache or CACHE_DIR)
  if _holds_bundle(cache):
    return cache
  if os.path.isdir(cache) and os.listdir(cache):
    raise EvalDataError(f"{cache}: holds no core.yaml and was not made by lmtiny, so it is left as it is; "
                        f"remove it to download the bundle there, or {_way_out(flag)}")
  reason = offline_reason()
  if reason:
    raise EvalDataError(f"the DCLM eval bundle is not in {cache} and cannot be downloaded: {reason}; {_way_out(flag)}")
  download(cache, flag)
  return cache


def _address(url: str) -> tuple[str, int]:
  """(host, port) a request for `url` connects to: its host, or the proxy urllib would use."""
  parts = urlsplit(url)
  proxy = urllib.request.getproxies().get(parts.scheme)
  if proxy and not urllib.request.proxy_bypass(parts.hostname):
    proxy_url = urlsplit(proxy if "://" in proxy else "http://" + proxy)
    if proxy_url.hostname:
      return proxy_url.hostname, proxy_url.port or 8080
  return parts.hostname, parts.port or (80 if parts.scheme == "http" else 443)


def offline_reason(url: str = BUNDLE_URL) -> str | None:
  """Why `url` cannot be fetched now (HF_HUB_OFFLINE set, or no connection within seconds), else None."""
  if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE:
    return "offline (HF_HUB_OFFLINE is set)"
  reason = probe(*_address(url))
  return None if reason is None else f"no network ({reason})"


def download(cache: str, flag: str = "--data-dir", url: str = BUNDLE_URL) -> None:
  """Fetches and unzips the bundle into `cache` (absent or empty): whole or not at all."""
  print(f"downloading the DCLM eval bundle from {url} into {cache} (once)", file=sys.stderr)
  try:
    with atomic_directory(cache) as tmp:
      archive, unzipped = os.path.join(tmp, ".eval_bundle.zip"), os.path.join(tmp, ".unzipped")
      with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f:
        shutil.copyfileobj(response, f)
      with zipfile.ZipFile(archive) as z:
        z.extractall(unzipped)  # zipfile drops absolute and ".." parts of member names
      source = next((d for d in (os.path.join(unzipped, "eval_bundle"), unzipped) if _holds_bundle(d)), None)
      if source is None:
        raise EvalDataError(f"{url}: the archive holds no eval_bundle/core.yaml; {_way_out(flag)}")
      for entry in os.listdir(source):
        os.rename(os.path.join(source, entry), os.path.join(tmp, entry))
      os.remove(archive)
      shutil.rmtree(unzipped)
  except (OSError, zipfile.BadZipFile) as e:  # urllib's errors are OSErrors
    if _holds_bundle(cache):  # another process put it there first
      return
    raise EvalDataError(f"{url}: download failed ({type(e).__name__}: {e}); {_way_out(flag)}") from None


# -- reading it --------------------------------------------------------------------------------

def _read_yaml_tasks(path: str) -> list[dict]:
  try:
    doc = yaml.safe_load(read_text(path))
  except yaml.YAMLError as e:
    raise EvalDataError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
  tasks = doc.get("icl_tasks") if isinstance(doc, dict) else None
  if not isinstance(tasks, list) or not tasks:
    raise EvalDataError(f"{path}: no icl_tasks list")
  return tasks


def _read_baselines(path: str) -> dict[str, float]:
  if not os.path.isfile(path):
    raise EvalDataError(f"{path}: missing (each task's random baseline)")
  rows = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
  if not rows or "Eval Task" not in rows[0] or "Random baseline" not in rows[0]:
    raise EvalDataError(f"{path}: needs the columns 'Eval Task' and 'Random baseline'")
  out = {}
  for lineno, row in enumerate(rows, 2):
    try:
      out[row["Eval Task"]] = float(row["Random baseline"])
    except (TypeError, ValueError):
      raise EvalDataError(f"{path}:{lineno}: random baseline {row['Random baseline']!r} is not a number") from None
  return out


def _shots(value, where: str) -> int:
  first = value[0] if isinstance(value, list) and value else value
  if isinstance(first, bool) or not isinstance(first, int) or first < 0:
    raise EvalDataError(f"{where}: num_fewshot={value!r} must be a count >= 0 or a list of them")
  return first


def _text(r, key: str) -> str:
  if not isinstance(r[key], str):
    raise TypeError(f"{key} must be text, not {type(r[key]).__name__}")
  return r[key]


def _texts(r, key: str) -> tuple[str, ...]:
  if not isinstance(r[key], list) or not all(isinstance(t, str) for t in r[key]):
    raise TypeError(f"{key} must be a list of texts, not {r[key]!r:.60}")
  return tuple(r[key])


def _gold(r) -> int:
  if isinstance(r["gold"], bool) or not isinstance(r["gold"], int):
    raise TypeError(f"gold must be an integer, not {r['gold']!r}")
  return r["gold"]


def _multiple_choice(r):
  return _checked(hf6.Item((_text(r, "query"),), _texts(r, "choices"), _gold(r)))


def _schema(r):
  return _checked(hf6.Item(_texts(r, "context_options"), (_text(r, "continuation"),), _gold(r)))


def _language_model(r):
  return hf6.Item((_text(r, "context").strip(),), (_text(r, "continuation"),))


def _checked(item: hf6.Item) -> hf6.Item:
  options = max(len(item.contexts), len(item.choices))
  if options < 2 or not 0 <= item.gold < options:
    raise ValueError(f"gold={item.gold} with {options} options")
  return item


_CONVERT = {"multiple_choice": _multiple_choice, "schema": _schema, "language_model": _language_model}


def read_bundle(directory: str) -> list[BundleTask]:
  """core.yaml's tasks with their baselines (the files' problems as one line naming the file)."""
  config = os.path.join(directory, "core.yaml")
  baselines = _read_baselines(os.path.join(directory, "eval_meta_data.csv"))
  out = []
  for i, spec in enumerate(_read_yaml_tasks(config)):
    where = f"{config}: icl_tasks[{i}]"
    if not isinstance(spec, dict) or not all(k in spec for k in ("label", "dataset_uri", "icl_task_type")):
      raise EvalDataError(f"{where}: needs label, dataset_uri and icl_task_type")
    label, kind = str(spec["label"]), _KINDS.get(spec["icl_task_type"])
    if kind is None:
      raise EvalDataError(f"{where} ({label}): icl_task_type={spec['icl_task_type']!r} is not one of "
                          f"{', '.join(_KINDS)}")
    if label not in baselines:
      raise EvalDataError(f"{os.path.join(directory, 'eval_meta_data.csv')}: no random baseline for {label!r}")
    path = os.path.join(directory, "eval_data", str(spec["dataset_uri"]))
    task = hf6.Task(kind, _shots(spec.get("num_fewshot", [0]), f"{where} ({label})"), 0.01 * baselines[label],
                     path, _CONVERT[kind], str(spec.get("continuation_delimiter", " ")),
                     strip_prefix=kind == "language_model")
    out.append(BundleTask(label, task, baselines[label]))
  return out


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    raise EvalDataError(f"{path}: missing (named by core.yaml's dataset_uri)")
  rows = list(jsonl_rows(path))
  if not rows:
    raise EvalDataError(f"{path}: no items")
  return rows


def task_items(bt: BundleTask, limit: int = 0) -> list[hf6.Item]:
  """The task's items in nanochat's order (shuffled with SHUFFLE_SEED), the first `limit` (0 = all).
  Every item is checked, in file order (an error names its row there), before the shuffle."""
  items = hf6.convert_rows(f"{bt.task.source} ({bt.label})", bt.task, _read_jsonl(bt.task.source))
  random.Random(SHUFFLE_SEED).shuffle(items)  # the permutation depends on the length alone
  return items[:limit] if limit else items


def load_suite(data_dir: str | None, limit: int = 0, flag: str = "--data-dir") -> Suite:
  """Every task's items, read up front (a missing file fails before any model loads)."""
  directory = bundle_dir(data_dir, flag)
  tasks = tuple(read_bundle(directory))
  return Suite(directory, tasks, {bt.label: task_items(bt, limit) for bt in tasks})


# -- scoring -----------------------------------------------------------------------------------

def evaluate_core(scorer: Scorer, tokenizer, suite: Suite, clock=None) -> dict:
  """{"core": CORE, "results": {"core:<label>": accuracy, centered, items, shots, baseline (and
  seconds, with `clock`, a time.perf_counter-like function)}}."""
  results = {}
  for bt in suite.tasks:
    start = clock() if clock else 0.0
    r = hf6.evaluate_task(scorer, tokenizer, bt.task, suite.items[bt.label])
    r["centered"] = centered(r["accuracy"], bt.baseline)  # DCLM's expression, to the last bit
    r["baseline"] = bt.baseline
    if clock:
      r["seconds"] = clock() - start
    results[result_key(bt.label)] = r
  return {"core": core_metric([r["centered"] for r in results.values()]), "results": results}
