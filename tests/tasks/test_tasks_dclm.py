"""DCLM CORE (lmtiny.tasks.dclm): the bundle's layout (tests/fixtures/evals/eval_bundle: 4 items of
each of the 22 tasks, written for these tests in the bundle's exact file format), nanochat's prompt
rendering per format, the published per-task -> CORE computation reproduced exactly, the eval CLI
end to end, and the ways to the bundle (--data-dir, the cache, a download, offline)."""
import json
import os
import random
import re
import shutil
import zipfile

import numpy as np
import pytest

from lmtiny import eval as eval_cli
from lmtiny.tasks import dclm, hf6, model_loading
from lmtiny.tasks.model_loading import load_model
from lmtiny.tasks.rows import EvalDataError
from lm_fixtures import ROOT

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "evals")
BUNDLE = os.path.join(FIXTURES, "eval_bundle")

# Published by DCLM (github.com/mlfoundations/dclm, commit 361714b): Qwen/Qwen2-7B's per-task
# accuracies, exp_data/evals/evaluation_Qwen_Qwen2-7B.json ("eval_metrics" -> "icl"), and the
# random baselines (percent) of eval/eval_meta_data.csv ("v2", current) and eval_meta_data_v1.csv.
# The same file publishes "Core" (v2) 0.5648713793708661 and "Core_v1" 0.5746248774239971: the
# mean over these 22 tasks of (acc - 0.01 b) / (1 - 0.01 b) (eval/aggregated_metrics.py).
QWEN2_7B = {
    "hellaswag_zeroshot": (0.7810196876525879, 25, 25), "jeopardy": (0.4893040835857391, 0, 0),
    "bigbench_qa_wikidata": (0.7403178811073303, 0, 0), "arc_easy": (0.813973069190979, 25, 25),
    "arc_challenge": (0.5810580253601074, 25, 25), "copa": (0.8600000143051147, 50, 50),
    "commonsense_qa": (0.8583128452301025, 40.3, 20), "piqa": (0.8030467629432678, 50, 50),
    "openbook_qa": (0.4580000042915344, 25, 25), "lambada_openai": (0.7189986705780029, 0, 0),
    "hellaswag": (0.7911770343780518, 25, 25), "winograd": (0.8681318759918213, 50, 50),
    "winogrande": (0.7245461940765381, 50, 50), "bigbench_dyck_languages": (0.17399999499320984, 0, 0),
    "agi_eval_lsat_ar": (0.3478260934352875, 25, 20), "bigbench_cs_algorithms": (0.5386363863945007, 0, 0),
    "bigbench_operators": (0.699999988079071, 0, 0), "bigbench_repeat_copy_logic": (0.53125, 0, 0),
    "squad": (0.6749290227890015, 0, 0), "coqa": (0.46461230516433716, 0, 0),
    "boolq": (0.8715596199035645, 62, 62), "bigbench_language_identification": (0.5712000131607056, 25, 9.1),
}
QWEN2_7B_CORE, QWEN2_7B_CORE_V1 = 0.5648713793708661, 0.5746248774239971


def test_our_centering_and_aggregation_reproduce_dclm_published_core():
  tasks = dclm.read_bundle(BUNDLE)
  assert [bt.label for bt in tasks] == list(QWEN2_7B)  # the fixture lists CORE's 22 tasks
  for bt in tasks:  # and the published (v2) baselines
    assert bt.baseline == QWEN2_7B[bt.label][1] and bt.task.chance == 0.01 * bt.baseline
  for column, published in ((1, QWEN2_7B_CORE), (2, QWEN2_7B_CORE_V1)):
    ours = dclm.core_metric([dclm.centered(v[0], v[column]) for v in QWEN2_7B.values()])
    assert abs(ours - published) < 1e-15 and f"{ours:.15f}" == f"{published:.15f}"


def test_centering_and_the_mean():
  assert dclm.centered(0.25, 25) == 0.0 and dclm.centered(1.0, 62) == 1.0
  assert dclm.centered(0.5, 0) == 0.5 and dclm.centered(0.1, 50) == pytest.approx(-0.8)
  assert dclm.core_metric([0.5, -0.1, 0.2]) == pytest.approx(0.2)


def test_the_bundle_as_core_yaml_describes_it():
  tasks = {bt.label: bt for bt in dclm.read_bundle(BUNDLE)}
  assert len(tasks) == 22
  kinds = {label: bt.task.kind for label, bt in tasks.items()}
  assert sum(k == "multiple_choice" for k in kinds.values()) == 11
  assert {label for label, k in kinds.items() if k == "schema"} == {"winograd", "winogrande"}
  assert sum(k == "language_model" for k in kinds.values()) == 9
  assert tasks["jeopardy"].task.delimiter == "\nAnswer: " and tasks["copa"].task.delimiter == " "
  assert (tasks["hellaswag"].task.shots, tasks["hellaswag_zeroshot"].task.shots, tasks["agi_eval_lsat_ar"].task.shots) \
      == (10, 0, 3)
  assert tasks["squad"].task.source.endswith(os.path.join("eval_data", "reading_comprehension", "squad.jsonl"))
  assert tasks["lambada_openai"].task.strip_prefix and not tasks["arc_easy"].task.strip_prefix


def test_items_are_shuffled_as_nanochat_orders_them_before_the_cut():
  bt = next(bt for bt in dclm.read_bundle(BUNDLE) if bt.label == "arc_easy")
  rows = [json.loads(line) for line in open(bt.task.source)]
  random.Random(1337).shuffle(rows)
  items = dclm.task_items(bt)
  assert [i.contexts[0] for i in items] == [r["query"] for r in rows]
  assert dclm.task_items(bt, 2) == items[:2]
  # few-shot picks: nanochat's random.Random(1234 + index).sample(other indices, k)
  for index in range(4):
    want = random.Random(1234 + index).sample([i for i in range(4) if i != index], 3)
    assert hf6.fewshot_indices(4, index, 3) == want


@pytest.fixture(scope="module")
def loaded(chat_run):
  return load_model(chat_run)


def _suite():
  return dclm.load_suite(FIXTURES)


def _text(tok, row):
  return tok.decode(list(row.ids[1:]))  # after BOS


def _scored(tok, row):
  return tok.decode(list(row.ids[-row.n_cont:]))


def _task(suite, label):
  return next(bt for bt in suite.tasks if bt.label == label)


def test_multiple_choice_prompts(loaded):
  tok, suite = loaded.tokenizer, _suite()
  bt = _task(suite, "arc_easy")
  items, d = suite.items["arc_easy"], "\nAnswer: "
  rows = hf6.item_rows(bt.task, items, 1, tok, 512)
  shots = [items[j] for j in hf6.fewshot_indices(4, 1, 10)]
  prefix = "".join(f"{s.contexts[0]}{d}{s.choices[s.gold]}\n\n" for s in shots) + items[1].contexts[0] + d
  assert [_text(tok, r) for r in rows] == [prefix + c for c in items[1].choices]
  # the scored part: what follows the options' common prefix (here each option whole)
  assert [_scored(tok, r).strip() for r in rows] == list(items[1].choices)
  zero = _task(suite, "hellaswag_zeroshot")
  first = suite.items["hellaswag_zeroshot"][0]
  assert _text(tok, hf6.item_rows(zero.task, suite.items["hellaswag_zeroshot"], 0, tok, 512)[0]) == \
      first.contexts[0] + " " + first.choices[0]


def test_schema_prompts(loaded):
  tok, suite = loaded.tokenizer, _suite()
  bt, items = _task(suite, "winograd"), suite.items["winograd"]
  rows = hf6.item_rows(bt.task, items, 0, tok, 512)
  assert [_text(tok, r) for r in rows] == [c + " " + items[0].choices[0] for c in items[0].contexts]
  assert all(_scored(tok, r).strip() == items[0].choices[0] for r in rows)  # the shared continuation


def test_language_modelling_prompts(loaded):
  tok, suite = loaded.tokenizer, _suite()
  bt, items = _task(suite, "jeopardy"), suite.items["jeopardy"]
  rows = hf6.item_rows(bt.task, items, 2, tok, 512)
  shots = [items[j] for j in hf6.fewshot_indices(4, 2, 10)]
  want = "".join(f"{s.contexts[0]}\nAnswer: {s.choices[0]}\n\n" for s in shots) + \
      f"{items[2].contexts[0]}\nAnswer: {items[2].choices[0]}"
  assert len(rows) == 1 and _text(tok, rows[0]) == want and want.count("\n\n") == 3
  assert _scored(tok, rows[0]).strip() == items[2].choices[0]
  # contexts are stripped (the bundle's LAMBADA rows end in spaces), as nanochat's template trims
  lam = suite.items["lambada_openai"]
  assert all(i.contexts[0] == i.contexts[0].strip() for i in lam)
  raw = [json.loads(line)["context"] for line in open(_task(suite, "lambada_openai").task.source)]
  assert any(c != c.strip() for c in raw)


@pytest.fixture(scope="module")
def run_dir(chat_run, tmp_path_factory):
  copy = str(tmp_path_factory.mktemp("dclm") / "run")
  shutil.copytree(chat_run, copy)
  return copy


@pytest.mark.slow(seconds=6)
def test_eval_cli_computes_dclm_core_and_keeps_hf6_apart(run_dir, capsys):
  assert eval_cli.main(["--workdir", run_dir, "--tasks", "core,hf6", "--data-dir", FIXTURES]) == 0
  out = json.load(open(os.path.join(run_dir, "eval.json")))
  keys = [dclm.result_key(label) for label in QWEN2_7B]
  assert set(out["results"]) == set(keys) | set(hf6.TASKS)  # hellaswag and core:hellaswag side by side
  baselines = {bt.label: bt.baseline for bt in dclm.read_bundle(BUNDLE)}
  for label, baseline in baselines.items():
    r = out["results"][dclm.result_key(label)]
    assert r["items"] == 4 and r["baseline"] == baseline and r["seconds"] > 0
    assert r["centered"] == (r["accuracy"] - 0.01 * baseline) / (1 - 0.01 * baseline)
  assert out["core"] == sum(out["results"][k]["centered"] for k in keys) / 22
  assert out["hf6"] == pytest.approx(np.mean([out["results"][n]["centered"] for n in hf6.TASKS]))
  printed = capsys.readouterr().out
  assert "CORE (DCLM, 22 tasks)" in printed and "HF6 mean " in printed and "core:bigbench_operators" in printed
  card = open(os.path.join(run_dir, "report.md")).read()
  assert "| **DCLM CORE** (22 tasks) |" in card and "| **HF6 mean** (not CORE) |" in card
  # hf6 alone again: CORE (from the whole bundle, same step) stays, the HF6 mean is recomputed
  assert eval_cli.main(["--workdir", run_dir, "--tasks", "piqa", "--data-dir", FIXTURES]) == 0
  again = json.load(open(os.path.join(run_dir, "eval.json")))
  assert again["core"] == out["core"] and again["hf6"] == pytest.approx(out["hf6"])


def test_max_items_cuts_every_task(run_dir):
  args = eval_cli.parse_args(["--workdir", run_dir, "--tasks", "core", "--data-dir", BUNDLE, "--max-items", "2"])
  out = eval_cli.evaluate(args)
  assert len(out["results"]) == 22 and {r["items"] for r in out["results"].values()} == {2}
  assert "hf6" not in out and "core" in out


@pytest.mark.parametrize("args, message", [
    (["--tasks", "core", "--data-dir", FIXTURES + "/eval_bundle/eval_data"],
     f"--data-dir={FIXTURES}/eval_bundle/eval_data: no eval_bundle/core.yaml (the DCLM eval bundle"),
    (["--tasks", "core"], "the DCLM eval bundle is not in {cache} and cannot be downloaded: offline "
     "(HF_HUB_OFFLINE is set); point --data-dir at a directory holding eval_bundle/ (unzipped from "
     "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip)"),
    (["--tasks", "hf6,core"], "offline (HF_HUB_OFFLINE is set); point --data-dir at a directory holding hellaswag"),
    (["--tasks", "core:squad"], "--tasks: unknown task 'core:squad' (bpb, core, gsm8k, hf6, hellaswag"),
])
def test_no_bundle_is_one_line_and_exit_2(run_dir, tmp_path, capsys, monkeypatch, args, message):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  cache = str(tmp_path / "cache" / "eval_bundle")
  monkeypatch.setattr(dclm, "CACHE_DIR", cache)
  monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("the model loaded before the data"))
  assert eval_cli.main(["--workdir", run_dir, *args]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message.format(cache=cache) in err and err.count("\n") == 1
  assert not os.path.exists(cache)


def _zip_bundle(path):
  with zipfile.ZipFile(path, "w") as z:
    for dirpath, _, files in os.walk(BUNDLE):
      for f in files:
        full = os.path.join(dirpath, f)
        z.write(full, os.path.join("eval_bundle", os.path.relpath(full, BUNDLE)))


def test_download_unzips_into_the_cache_whole(tmp_path, monkeypatch):
  archive = tmp_path / "eval_bundle.zip"
  _zip_bundle(archive)
  cache = str(tmp_path / "cache" / "eval_bundle")
  dclm.download(cache, url=archive.as_uri())  # file:// through urllib: the same path as https
  assert sorted(os.listdir(cache)) == ["core.yaml", "eval_data", "eval_meta_data.csv"]
  assert os.listdir(tmp_path / "cache") == ["eval_bundle"]  # no temporary sibling left
  monkeypatch.setattr(dclm, "offline_reason", lambda *a: pytest.fail("no probe once cached"))
  assert dclm.bundle_dir(None, cache=cache) == cache
  assert len(dclm.read_bundle(cache)) == 22


def test_a_failed_download_leaves_nothing_and_names_the_flag(tmp_path):
  (tmp_path / "not.zip").write_bytes(b"not a zip")
  cache = str(tmp_path / "cache" / "eval_bundle")
  with pytest.raises(EvalDataError, match=r"download failed \(BadZipFile.*point config.train.core_data_dir at"):
    dclm.download(cache, "config.train.core_data_dir", url=(tmp_path / "not.zip").as_uri())
  assert os.listdir(tmp_path / "cache") == []


def test_a_cache_directory_lmtiny_did_not_fill_is_left_alone(tmp_path, monkeypatch):
  cache = tmp_path / "eval_bundle"
  cache.mkdir()
  (cache / "notes.txt").write_text("mine")
  monkeypatch.setattr(dclm, "offline_reason", lambda *a: pytest.fail("nothing to download into"))
  with pytest.raises(EvalDataError, match="holds no core.yaml and was not made by lmtiny"):
    dclm.bundle_dir(None, cache=str(cache))
  assert os.listdir(cache) == ["notes.txt"]


COPA = os.path.join("eval_data", "commonsense_reasoning", "copa.jsonl")


def _spoil(path, head: bytes):
  """`path` with its first bytes replaced by `head` (bytes that are not UTF-8 text)."""
  path.write_bytes(head + path.read_bytes()[len(head):])


def _items(bundle, **fields):
  """copa.jsonl with its first item's `fields` replaced (the items in file order: row 0 is the first)."""
  path = bundle / COPA
  items = [json.loads(line) for line in path.read_text().splitlines()]
  items[0].update(fields)
  path.write_text("".join(json.dumps(item) + "\n" for item in items))


@pytest.mark.parametrize("edit, message", [
    (lambda b: (b / "core.yaml").write_text("icl_tasks: [{label: x}]\n"), "needs label, dataset_uri and icl_task_type"),
    (lambda b: (b / "core.yaml").write_text((b / "core.yaml").read_text().replace("icl_task_type: schema", "icl_task_type: cloze", 1)),
     "icl_task_type='cloze' is not one of multiple_choice, schema, language_modeling"),
    (lambda b: (b / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ncopa,50\n"), "no random baseline for 'hellaswag_zeroshot'"),
    (lambda b: os.remove(b / "eval_data" / "reading_comprehension" / "squad.jsonl"), "squad.jsonl: missing"),
    (lambda b: (b / "eval_data" / "commonsense_reasoning" / "copa.jsonl").write_text('{"query": "x", "choices": ["a"], "gold": 0}\n'),
     "copa.jsonl (copa): row 0 is not in the task's layout (ValueError: gold=0 with 1 options)"),
    # Before, a UnicodeDecodeError traceback (the three kinds of file the bundle has)
    (lambda b: _spoil(b / COPA, b'{"query": "caf\xe9"'), f"{COPA}:1: not UTF-8 text (byte 0xe9 at column 15)"),
    (lambda b: _spoil(b / "core.yaml", b"# \xff\n"), "core.yaml: not UTF-8 text (byte 0xff at offset"),
    (lambda b: _spoil(b / "eval_meta_data.csv", b"\xfe"), "eval_meta_data.csv: not UTF-8 text (byte 0xfe at offset"),
    (lambda b: (os.remove(b / COPA), os.mkdir(b / COPA)), f"{COPA}: cannot read (Is a directory)"),
    # Before, a crash once the model had loaded (numbers), or scored as if valid (a string's letters as choices)
    (lambda b: _items(b, query=7), "copa.jsonl (copa): row 0 is not in the task's layout (TypeError: query must be "
     "text, not int)"),
    (lambda b: _items(b, choices=[1, 2]), "copa.jsonl (copa): row 0 is not in the task's layout (TypeError: choices "
     "must be a list of texts, not [1, 2])"),
    (lambda b: _items(b, choices="ab"), "copa.jsonl (copa): row 0 is not in the task's layout (TypeError: choices "
     "must be a list of texts, not 'ab')"),
    (lambda b: _items(b, gold=True), "copa.jsonl (copa): row 0 is not in the task's layout (TypeError: gold must be "
     "an integer, not True)"),
])
def test_a_damaged_bundle_is_one_line_naming_the_file(tmp_path, edit, message):
  bundle = tmp_path / "eval_bundle"
  shutil.copytree(BUNDLE, bundle)
  edit(bundle)
  with pytest.raises(EvalDataError, match=re.escape(message)):
    dclm.load_suite(str(tmp_path))


@pytest.mark.parametrize("edit", [lambda b: _items(b, query=7), lambda b: _spoil(b / COPA, b"\xff")])
def test_eval_refuses_a_damaged_bundle_before_the_model_loads(run_dir, tmp_path, capsys, monkeypatch, edit):
  bundle = tmp_path / "eval_bundle"
  shutil.copytree(BUNDLE, bundle)
  edit(bundle)
  monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("the model loaded before the data"))
  assert eval_cli.main(["--workdir", run_dir, "--tasks", "core", "--data-dir", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {bundle / COPA}") and err.count("\n") == 1, err
