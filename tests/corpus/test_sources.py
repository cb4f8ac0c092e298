"""Document sources: each spec type on its own tiny fixture, undecodable bytes, bad input."""
import ast
import gzip
import json
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmtiny.corpus import embedded, sources
from lmtiny.corpus.sources import decode_counting, open_source, RECORD_SEPARATOR, SourceError


def docs_of(spec):
  return list(open_source(spec).iter_documents())


def test_txt_one_document_per_file_sorted(tmp_path):
  (tmp_path / "b.txt").write_text("second\n")
  (tmp_path / "a.txt").write_text("first  doc\n\tindented\n")
  (tmp_path / "empty.txt").write_text("")
  assert docs_of(f"txt:{tmp_path}/*.txt") == ["first  doc\n\tindented\n", "second\n"]


def test_txt_gz_record_delimiter_across_chunk_boundaries(tmp_path, monkeypatch):
  records = [f"record {i} " + "x" * (i * 7) + "\nend" for i in range(40)]
  with gzip.open(tmp_path / "c.txt.gz", "wt", encoding="utf-8") as f:
    f.write(RECORD_SEPARATOR.join(records))
  monkeypatch.setattr(sources, "_CHUNK_BYTES", 13)  # separators straddle many reads
  assert docs_of(f"txt:{tmp_path}/c.txt.gz?delimiter=record") == records


def test_txt_delimiter_escapes_and_line_mode(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "_CHUNK_BYTES", 2)
  (tmp_path / "d.txt").write_text("a\n---\nb\n---\nc")
  assert docs_of(f"txt:{tmp_path}/d.txt?delimiter=\\n---\\n") == ["a", "b", "c"]
  assert docs_of(f"txt:{tmp_path}/d.txt?delimiter=line") == ["a", "---", "b", "---", "c"]


def test_txt_doc_start_regex(tmp_path):
  (tmp_path / "w.txt").write_text("= One =\n\nbody 1\n= Two =\nbody 2\n")
  assert docs_of(f"txt:{tmp_path}/w.txt?doc_start=^= .+ =$") == [
      "= One =\n\nbody 1\n", "= Two =\nbody 2\n"]


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
  data = b"ok \xff\xfe then \xe2\x82 cut, then valid \xe2\x82\xac"
  (tmp_path / "bad.txt").write_bytes(data)
  src = open_source(f"txt:{tmp_path}/bad.txt")
  [doc] = list(src.iter_documents())
  assert doc == data.decode("utf-8", errors="replace")   # Python's own replacement as reference
  assert src.undecodable == 3 == doc.count("\ufffd")
  assert decode_counting("héllo".encode()) == ("héllo", 0)


def test_jsonl_plain_gz_and_message_lists(tmp_path):
  (tmp_path / "a.jsonl").write_text(json.dumps({"text": "plain"}) + "\n\n")
  with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
    f.write(json.dumps({"text": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "hello"}]}) + "\n")
  assert docs_of(f"jsonl:{tmp_path}/*.jsonl*") == ["plain", "hi\nhello"]


def test_jsonl_errors_name_file_and_line(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"text": "x"}\n{"body": "y"}\n')
  with pytest.raises(SourceError, match=r"a\.jsonl:2: no field 'text'"):
    docs_of(f"jsonl:{tmp_path}/a.jsonl")
  (tmp_path / "b.jsonl").write_text('{"text": \n')
  with pytest.raises(SourceError, match=r"b\.jsonl:1: invalid JSON"):
    docs_of(f"jsonl:{tmp_path}/b.jsonl")


def _write_parquet(path, **columns):
  pq.write_table(pa.table(columns), path, row_group_size=3)


def test_parquet_streams_row_groups(tmp_path, monkeypatch):
  texts = [f"doc {i}" for i in range(10)]
  _write_parquet(tmp_path / "p0.parquet", text=texts[:7], n=list(range(7)))
  _write_parquet(tmp_path / "p1.parquet", text=texts[7:] + [None], n=[7, 8, 9, 10])
  monkeypatch.setattr(sources, "_PARQUET_BATCH_ROWS", 2)
  assert docs_of(f"parquet:{tmp_path}/*.parquet") == texts


def test_parquet_missing_column_and_binary_column(tmp_path):
  _write_parquet(tmp_path / "p.parquet", body=["a"])
  with pytest.raises(SourceError, match=r"p\.parquet: no column 'text' \(columns: body\)"):
    open_source(f"parquet:{tmp_path}/p.parquet")
  _write_parquet(tmp_path / "b.parquet", raw=pa.array([b"caf\xc3\xa9", b"x\xffy"], pa.binary()))
  src = open_source(f"parquet:{tmp_path}/b.parquet?column=raw")
  assert list(src.iter_documents()) == ["café", "x\ufffdy"] and src.undecodable == 1


def test_parquet_column_that_is_not_text(tmp_path):
  _write_parquet(tmp_path / "n.parquet", text=[1, 2])
  with pytest.raises(SourceError, match=r"n\.parquet: column 'text' holds int64, not text$"):
    open_source(f"parquet:{tmp_path}/n.parquet")
  # Lists of strings or of messages (SmolTalk's `messages`) are text, joined by newlines.
  _write_parquet(tmp_path / "m.parquet", text=[[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]])
  assert list(open_source(f"parquet:{tmp_path}/m.parquet").iter_documents()) == ["hi\nyo"]
  # A list whose items are not text is caught per row (the schema allows structs of anything).
  _write_parquet(tmp_path / "s.parquet", text=[[{"content": "ok"}], [{"content": None}]])
  with pytest.raises(SourceError, match=r"s\.parquet: column 'text', row 2: list items must be strings"):
    list(open_source(f"parquet:{tmp_path}/s.parquet").iter_documents())


def test_tfds_source_through_data_source(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  calls = []

  def fake_data_source(name, split=None, data_dir=None):
    calls.append((name, split, data_dir))
    article = b"\n_START_ARTICLE_\nTitle\n_START_PARAGRAPH_\nLine one_NEWLINE_line two"
    return [{"text": article}, {"text": "plain str"}] * 150   # > one fetch batch

  monkeypatch.setattr(tfds, "data_source", fake_data_source)
  docs = docs_of("tfds:wiki40b/en?split=validation&data_dir=/nowhere")
  assert calls == [("wiki40b/en", "validation", "/nowhere")]
  assert docs[:2] == ["Title\nLine one\nline two", "plain str"] and len(docs) == 300


def test_tfds_open_failure_is_one_line(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")

  def failing(name, split=None, data_dir=None):
    raise RuntimeError("Dataset nope not found.\nmore detail")

  monkeypatch.setattr(tfds, "data_source", failing)
  with pytest.raises(SourceError, match=r"^tfds:nope: cannot open TFDS dataset \(Dataset nope "
                                        r"not found\.\)$"):
    docs_of("tfds:nope")


def test_hf_source_downloads_matching_shards_lazily(tmp_path, monkeypatch):
  _write_parquet(tmp_path / "s0.parquet", text=["from shard 0"])
  _write_parquet(tmp_path / "s1.parquet", text=["from shard 1"])
  downloads = []
  hub = types.ModuleType("huggingface_hub")
  hub.list_repo_files = lambda repo, repo_type, revision: [
      "README.md", "data/s1.parquet", "data/s0.parquet"]

  def hf_hub_download(repo, filename, repo_type, revision):
    downloads.append(filename)
    return str(tmp_path / filename.split("/")[-1])

  hub.hf_hub_download = hf_hub_download
  monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
  monkeypatch.setattr("lmtiny.corpus.sources.hub_offline", lambda: None)  # as if online
  src = open_source("hf:someone/books?pattern=data/*.parquet")
  assert downloads == []                          # nothing fetched before it is read
  it = src.iter_documents()
  assert next(it) == "from shard 0" and downloads == ["data/s0.parquet"]
  assert list(it) == ["from shard 1"]


def test_hf_without_huggingface_hub_says_so(monkeypatch):
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)   # import fails
  with pytest.raises(SourceError, match=r"needs huggingface_hub \(pip install huggingface_hub\)"):
    open_source("hf:someone/books")


@pytest.mark.parametrize("spec, message", [
    ("csv:x.csv", "unknown source type 'csv'"),
    ("txt:/no/such/dir/*.txt", "no files match"),
    ("txt:{tmp}/a.txt?delimitr=line", "unknown option"),
    ("txt:{tmp}/a.txt?delimiter=line&doc_start=x", "not both"),
    ("embedded?parts=code,pictures", "parts must be"),
    ("embedded?max_chars=lots", "bad value for max_chars"),
])
def test_bad_specs_raise_one_line(tmp_path, spec, message):
  (tmp_path / "a.txt").write_text("x")
  with pytest.raises(SourceError, match=message) as info:
    open_source(spec.format(tmp=tmp_path))
  assert "\n" not in str(info.value)


def test_source_with_only_empty_documents_fails_when_read(tmp_path):
  (tmp_path / "e.txt").write_text("")
  with pytest.raises(SourceError, match="no documents"):
    docs_of(f"txt:{tmp_path}/e.txt")


def test_embedded_is_deterministic_capped_and_mixed():
  first = docs_of("embedded?max_chars=200000")
  assert first == list(embedded.iter_embedded_documents(200_000))
  assert sum(map(len, first)) == 200_000
  from pydoc_data.topics import topics
  assert first[0] == topics[sorted(topics)[0]]                 # topics stream leads
  assert any("def " in d for d in first) and any(d in topics.values() for d in first[3:])
  code = docs_of("embedded?parts=code&max_chars=50000")
  assert all(d not in topics.values() for d in code)
  assert embedded.embedded_fingerprint(0) == embedded.embedded_fingerprint(0)
  assert embedded.embedded_fingerprint(0) != embedded.embedded_fingerprint(1000)


def test_embedded_docstrings_match_the_imported_modules():
  import inspect
  import json as json_module
  import textwrap as textwrap_module
  files = embedded.stdlib_source_files()
  for module in (json_module, textwrap_module):   # already imported, so no new side effects
    assert module.__file__ in files
    text = embedded.module_docstring(embedded.read_python_source(module.__file__))
    assert text == inspect.cleandoc(module.__doc__)
  assert not any("/test/" in p or "site-packages" in p for p in files)


def _whole_module_docstring(source):
  """The reference: ast's docstring of the whole parsed module (what module_docstring reads from
  the first statement alone)."""
  try:
    return ast.get_docstring(ast.parse(source), clean=True)
  except (SyntaxError, ValueError):
    return None


@pytest.mark.parametrize("source", [
    '"""One line."""\nimport os\n',
    '#!/usr/bin/env python\n# -*- coding: utf-8 -*-\n\n"""After comments\n\n    indented body\n"""\n',
    "'implicit' \"concatenation\"\nx = 1\n",
    '("parenthesised"\n "over two lines")\n',
    'r"""raw \\d"""; import re\n',
    '"\\f form feed\\x0c inside"\n',
    'f"""not a docstring {1}"""\n', 'b"bytes are not one"\n', '"doc" + "expr"\n',
    "def f():\n  '''a function's, not the module's'''\n", "import os\n'''too late'''\n",
    "# only a comment\n", "", '"""unterminated\n', "  indented = 1\n"])
def test_module_docstring_is_asts_from_the_first_statement(source):
  assert embedded.module_docstring(source) == _whole_module_docstring(source)


def test_module_docstring_equals_the_whole_module_parse_across_the_stdlib():
  files = embedded.stdlib_source_files()[::5]  # a fifth of them: ast parses a file in ~5 ms
  sources = [embedded.read_python_source(p) for p in files]
  assert [embedded.module_docstring(s) for s in sources] == [_whole_module_docstring(s) for s in sources]
  assert sum(embedded.module_docstring(s) is not None for s in sources) > len(files) // 2


def _climbmix_dir(tmp_path, shards=3):
  """A local copy of ClimbMix as nanochat downloads it: shard_NNNNN.parquet, text in `text`."""
  for i in range(shards):
    _write_parquet(tmp_path / f"shard_{i:05d}.parquet", text=[f"climbmix shard {i}"])
  (tmp_path / "shard_00009.parquet.tmp").write_text("a download in progress")  # not a shard
  return tmp_path


def test_climbmix_reads_a_local_copy_in_shard_order(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: a data_dir needs no hub
  data = _climbmix_dir(tmp_path)
  assert docs_of(f"climbmix?data_dir={data}") == [f"climbmix shard {i}" for i in range(3)]
  assert docs_of(f"climbmix?data_dir={data}&shards=2") == ["climbmix shard 0", "climbmix shard 1"]
  with pytest.raises(SourceError, match="unknown option.*column for climbmix"):
    open_source(f"climbmix?data_dir={data}&column=body")


def test_climbmix_from_the_hub_lists_its_shards(tmp_path, monkeypatch):
  data = _climbmix_dir(tmp_path)
  hub = types.ModuleType("huggingface_hub")
  listed = []

  def list_repo_files(repo, repo_type, revision):
    listed.append(repo)
    return ["README.md", "shard_00001.parquet", "shard_00000.parquet", "shard_00002.parquet"]

  hub.list_repo_files = list_repo_files
  hub.hf_hub_download = lambda repo, filename, repo_type, revision: str(data / filename)
  monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
  monkeypatch.setattr("lmtiny.corpus.sources.hub_offline", lambda: None)
  src = open_source("climbmix?shards=2")
  assert listed == ["karpathy/climbmix-400b-shuffle"] and src.files == ["shard_00000.parquet", "shard_00001.parquet"]
  assert list(src.iter_documents()) == ["climbmix shard 0", "climbmix shard 1"]


def test_climbmix_offline_names_the_local_way(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setitem(sys.modules, "huggingface_hub", types.ModuleType("huggingface_hub"))
  sys.modules["huggingface_hub"].list_repo_files = lambda *a, **k: pytest.fail("listed offline")
  with pytest.raises(SourceError, match=r"^climbmix: offline .*karpathy/climbmix-400b-shuffle's shard_\*\.parquet.*"
                                        r"use climbmix\?data_dir=DIR$"):
    open_source("climbmix")


@pytest.mark.parametrize("spec, message", [
    ("climbmix?data_dir={tmp}/nope", r"^climbmix\?data_dir=.*/nope: data_dir '.*/nope' is not a directory$"),
    ("climbmix?data_dir={tmp}", r"data_dir '.*' holds no shard_\*\.parquet files \(ClimbMix's shards"),
    ("climbmix?data_dir={tmp}&shards=-1", r"shards=-1: must be >= 0"),
    ("climbmix?data_dir={tmp}&shards=some", "bad value for shards"),
    ("climbmix:{tmp}", "takes no path"),
])
def test_climbmix_bad_input_is_one_line(tmp_path, spec, message):
  with pytest.raises(SourceError, match=message) as info:
    open_source(spec.format(tmp=tmp_path))
  assert "\n" not in str(info.value)


def test_climbmix_bad_data_dir_is_one_error_line_exit_2(tmp_path, capsys):
  """As the d24 speedrun presets train their tokenizer: on the pretraining source itself."""
  from lmtiny.tokenizer import train
  assert train.main(["--source", f"climbmix?data_dir={tmp_path}/nope", "--out", str(tmp_path / "tok"), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: climbmix?data_dir=") and "is not a directory" in err and err.count("\n") == 1
