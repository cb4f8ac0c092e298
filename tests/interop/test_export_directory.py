"""Where an export may go (lmtiny.interop.convert.check_export_dir), on a core install (no torch):
an earlier export is replaced only when it holds nothing but the files it wrote."""
import json

import pytest

from lmtiny.interop.convert import check_export_dir, EXPORT_RECORD, InteropError


def _earlier_export(out, files=None):
  out.mkdir()
  record = {"source": "/runs/a", "step": 3}
  if files is not None:
    record["files"] = files
  for name in files or ["config.json", "model.safetensors", "tokenizer.json"]:
    (out / name).write_text("{}")
  (out / EXPORT_RECORD).write_text(json.dumps(record))


def test_an_earlier_export_with_only_its_own_files_may_be_replaced(tmp_path):
  _earlier_export(tmp_path / "hf", ["config.json", "model.safetensors", EXPORT_RECORD])
  check_export_dir(str(tmp_path / "hf"))
  _earlier_export(tmp_path / "old")  # written before the record listed its files: the known names
  check_export_dir(str(tmp_path / "old"))


@pytest.mark.parametrize("listed", [True, False])
def test_a_users_file_in_an_earlier_export_is_refused_by_name(tmp_path, listed):
  # Before: re-running `export --out DIR` replaced DIR whole, deleting DIR/MY_NOTES.txt (exit 0).
  out = tmp_path / "hf"
  _earlier_export(out, ["config.json", "model.safetensors", EXPORT_RECORD] if listed else None)
  (out / "MY_NOTES.txt").write_text("mine")
  with pytest.raises(InteropError, match=rf"^--out={out}: holds MY_NOTES.txt, which the earlier export there did "
                                         r"not write; move it, or export to a new directory$"):
    check_export_dir(str(out))
  assert (out / "MY_NOTES.txt").read_text() == "mine"
