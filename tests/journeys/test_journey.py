"""The documentation is the test plan: every command README.md and the guides in docs/ tell a user
to type runs verbatim, from the root of a scratch copy of the repository, with relative paths, in
the order a user meets them, each consuming what the earlier ones left (tests/journey.py has the
rules). This module checks the documents' form and runs the README's chain: the quick start, the
pipeline, then the guides that start from the quick start's run; tests/journeys/test_journey_guides.py runs
the guides that start afresh, beside it (two chains, so two test workers share the time).
"""
import os

import pytest

from journey import (LONG_RUNNING, README, TEST_COMMAND, chains, commands, guides, installed, journey_fixture,
                     read, run_doc, stray_commands, with_dry_run)
from lm_fixtures import ROOT

# --- the documents are well formed (fast) -----------------------------------------------------

def test_every_guide_in_docs_is_linked_from_the_readme_and_has_commands():
  linked = guides()
  first, second = chains()
  assert first[0] == README and sorted(first[1:] + second) == sorted(linked)
  on_disk = sorted(f"docs/{name}" for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md"))
  assert sorted(linked) == on_disk and len(set(linked)) == len(linked)
  for doc in linked:
    assert commands(read(doc)), f"{doc} tells the user no command"


@pytest.mark.parametrize("doc", [README] + sorted(f"docs/{n}" for n in os.listdir(os.path.join(ROOT, "docs"))))
def test_no_command_outside_a_runnable_block(doc):
  assert stray_commands(read(doc)) == [], f"{doc}: put these in a ```bash block (or make them prose)"


def test_the_readme_has_the_two_quick_start_commands_and_ci_types_the_test_one():
  quick = commands(read(README))[:2]
  assert quick == ["pip install -e . && python -m lmtiny.train --config configs/tiny.py      # train the demo model",
                   f"{TEST_COMMAND}              # run the tests"]
  # .ci/run types it first, in a fresh venv, with nothing pip-installed before it
  ci = [line.strip() for line in read(".ci/run").splitlines() if line.strip() and not line.lstrip().startswith("#")]
  typed = ci.index(TEST_COMMAND)
  assert not [line for line in ci[:typed] if "pip " in line or "pytest" in line], ci[:typed]
  assert any(line.startswith("python3 -m venv ") for line in ci[:typed])


def test_commands_run_with_default_flags_are_documented_ones():
  typed = {installed(c.split(" #", 1)[0].strip()) for doc in [README] + guides() for c in commands(read(doc))}
  assert LONG_RUNNING <= typed, LONG_RUNNING - typed


def test_command_parsing_and_dry_run_insertion():
  doc = ("```bash\npython -m lmtiny.x --a 1 \\\n    --b 2\n# a comment\nlaunch/tpu.sh train -- --config c.py   "
         "# needs: gcloud\n```\n```text\npython -m lmtiny.out\n```\n    python -m lmtiny.indented\n")
  assert commands(doc) == ["python -m lmtiny.x --a 1 --b 2", "launch/tpu.sh train -- --config c.py   # needs: gcloud"]
  assert stray_commands(doc) == ["python -m lmtiny.out", "python -m lmtiny.indented"]
  assert with_dry_run(commands(doc)[1]) == "launch/tpu.sh train --dry-run -- --config c.py"
  assert with_dry_run("launch/speedrun.sh d20-v5e8   # needs: TPU") == "launch/speedrun.sh d20-v5e8 --dry-run"


journey = pytest.fixture(scope="module")(journey_fixture)

# What a command's documentation says it prints or leaves behind: (doc, command prefix, texts in
# its output, paths it leaves; "PATH::TEXT" for a file that must hold TEXT).
PROMISES = [
    (README, "pip install -e . && python -m lmtiny.train --config configs/tiny.py",
     ["done: 150 steps", "val bpb"], ["runs/tiny/checkpoints/150", "runs/tiny/loss.png", "runs/tiny/tokenizer.model"]),
    # --workdir relative to where the run was made, as typed after the demo (orbax wants absolute paths)
    (README, "python -m lmtiny.generate --workdir runs/tiny --prompt", ["runs/tiny: step 150, ", "decode"], []),
    (README, "python -m lmtiny.sft", ["done: 4 steps"], ["runs/tiny/sft/config.json"]),
    (README, "python -m lmtiny.rl", [], ["runs/tiny/rl/config.json"]),
    (README, "python -m lmtiny.report", [], ["runs/tiny/report.md"]),
    ("docs/chat.md", "python -m lmtiny.sft --init runs/tiny --workdir runs/tiny/sft", ["sft: replies ending with"],
     ["runs/tiny/sft/turn_ending.json"]),
    ("docs/chat.md", "python -m lmtiny.sft --init runs/tiny --workdir runs/tiny/nanochat_sft",
     ["best-fit rows padded with BOS", "optimizer state from the base run's step", "one epoch of the data ended after step"],
     ["runs/tiny/nanochat_sft/config.json"]),
    ("docs/chat.md", "python -m lmtiny.report", [], ["runs/tiny/report.md::## Summary",
                                                        "runs/tiny/report.md::## Leaderboard row"]),
    ("docs/interop.md", "python -m lmtiny.export --workdir runs/tiny --out", ["LmtinyForCausalLM", "modeling_lmtiny.py"],
     ["hf/tiny/model.safetensors", "hf/tiny/modeling_lmtiny.py"]),
    ("docs/interop.md", "python -m lmtiny.export --workdir runs/tiny/sft", [],
     ["hf/tiny_sft/tokenizer_config.json::chat_template"]),
    ("docs/interop.md", 'python -m lmtiny.generate --workdir runs/tiny --prompt "def fibonacci(n):"',
     ["def fibonacci(n):", "--- sample 2 ---", "tok/s"], []),
    ("docs/interop.md", 'echo "What is a list?" | python -m lmtiny.generate', ["assistant: "], []),
    ("docs/reliability.md", "python -m lmtiny.train", ["resumed from checkpoint at step 150", "done: 160 steps"], []),
]


@pytest.mark.slow(seconds=470)
@pytest.mark.parametrize("doc", chains()[0])
def test_every_documented_command_runs_verbatim(journey, doc):
  run_doc(journey, doc, PROMISES)
