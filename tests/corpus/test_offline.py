"""No network: a command that needs the Hugging Face hub fails at once with one line naming the way
out (lmtiny.corpus.hub's probe), without the hub client's ~25 s of retries and their warnings.
The network is simulated (the probe's socket call fails) or loopback; nothing here goes out."""
import logging
import socket
import sys
import types

import pytest

from lmtiny import eval as eval_cli
from lmtiny.corpus import hub
from lmtiny.corpus.sources import open_source, SourceError
from lmtiny.tasks import dclm, hf6, gsm8k
from lmtiny.tasks.rows import EvalDataError, load_rows


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
  for name in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY",
               "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(name, raising=False)
  hub.probe.cache_clear()
  yield
  hub.probe.cache_clear()


@pytest.fixture
def no_network(monkeypatch):
  """Name lookups fail (as on this machine); returns the list of addresses tried."""
  tried = []

  def fail(address, timeout=None):
    tried.append(address)
    raise socket.gaierror(-2, "Name or service not known")

  monkeypatch.setattr(hub.socket, "create_connection", fail)
  return tried


@pytest.fixture
def hub_client(monkeypatch):
  """A stand-in huggingface_hub whose calls are recorded (the offline path must make none)."""
  calls = []
  fake = types.ModuleType("huggingface_hub")
  fake.list_repo_files = lambda *a, **k: calls.append(("list_repo_files", a)) or []
  fake.hf_hub_download = lambda *a, **k: calls.append(("hf_hub_download", a))
  monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
  return calls


def test_the_probe_runs_once_per_process(no_network):
  assert hub.hub_offline() == "no network (cannot resolve huggingface.co)"
  assert hub.hub_offline() == "no network (cannot resolve huggingface.co)"
  assert no_network == [("huggingface.co", 443)]


def test_hf_hub_offline_is_honoured_without_a_probe(monkeypatch, no_network):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  assert hub.hub_offline() == "offline (HF_HUB_OFFLINE is set)" and no_network == []


def test_probe_over_loopback_endpoint_and_proxy(monkeypatch):
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert hub.hub_address() == ("127.0.0.1", port) and hub.hub_offline() is None
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example")
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
    assert hub.hub_address() == ("127.0.0.1", port)  # the client would go through the proxy
  hub.probe.cache_clear()
  assert hub.hub_offline().startswith(f"no network (cannot connect to 127.0.0.1:{port}")  # closed now


def test_hf_source_offline_names_a_local_spec(no_network, hub_client):
  with pytest.raises(SourceError) as e:
    open_source("hf:someone/books?pattern=data/*.parquet&column=body")
  assert str(e.value) == ("hf:someone/books?pattern=data/*.parquet&column=body: no network (cannot resolve "
                          "huggingface.co); download someone/books's data/*.parquet files where there is "
                          "network and use parquet:DIR/*.parquet?column=body instead")
  assert hub_client == []


def test_eval_tasks_core_offline_is_one_line_naming_data_dir(chat_run, no_network, hub_client, capsys,
                                                             monkeypatch, caplog, tmp_path):
  # DCLM CORE: the bundle is neither cached nor downloadable; the probe goes to the bundle's host.
  from lmtiny.tasks import model_loading as loading
  monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model loaded before the data"))
  monkeypatch.setattr(dclm, "CACHE_DIR", str(tmp_path / "eval_bundle"))
  with caplog.at_level(logging.WARNING):
    assert eval_cli.main(["--workdir", chat_run, "--tasks", "core"]) == 2
  out = capsys.readouterr()
  assert out.err == (f"error: the DCLM eval bundle is not in {tmp_path / 'eval_bundle'} and cannot be downloaded: "
                     "no network (cannot resolve karpathy-public.s3.us-west-2.amazonaws.com); point --data-dir at a "
                     f"directory holding eval_bundle/ (unzipped from {dclm.BUNDLE_URL})\n")
  assert no_network == [("karpathy-public.s3.us-west-2.amazonaws.com", 443)]
  assert hub_client == [] and not caplog.records and out.out == "" and not (tmp_path / "eval_bundle").exists()


def test_eval_tasks_hf6_offline_is_one_line_naming_data_dir(chat_run, no_network, hub_client, capsys,
                                                            monkeypatch, caplog):
  from lmtiny.tasks import model_loading as loading
  monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model loaded before the data"))
  with caplog.at_level(logging.WARNING):
    assert eval_cli.main(["--workdir", chat_run, "--tasks", "hf6"]) == 2
  out = capsys.readouterr()
  assert out.err == ("error: hf:Rowan/hellaswag?pattern=data/validation-*.parquet&column=ctx: no network "
                     "(cannot resolve huggingface.co); point --data-dir at a directory holding hellaswag.jsonl "
                     "or hellaswag.parquet (the source's layout)\n")
  assert hub_client == [] and not caplog.records and out.out == ""


def test_eval_gsm8k_offline_via_hf_hub_offline(chat_run, monkeypatch, hub_client, capsys):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  assert eval_cli.main(["--workdir", chat_run, "--tasks", "gsm8k"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: hf:openai/gsm8k") and err.count("\n") == 1
  assert "offline (HF_HUB_OFFLINE is set); point --data-dir at a directory holding gsm8k.jsonl" in err
  assert hub_client == []


def test_rl_offline_is_one_line_naming_data_dir(chat_run, tmp_path, no_network, hub_client, capsys):
  from lmtiny import rl
  assert rl.main(["--init", chat_run, "--workdir", str(tmp_path / "rl")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: hf:openai/gsm8k") and err.count("\n") == 1
  assert "no network (cannot resolve huggingface.co)" in err and "--config.rl.data_dir" in err and "--config.rl.data=toy" in err
  assert hub_client == [] and not (tmp_path / "rl").exists()


def test_training_core_offline_names_the_config_field(no_network, hub_client, tmp_path):
  # As lmtiny.training.loop reads the CORE / HF6 tasks before training starts.
  with pytest.raises(EvalDataError, match=r"no network \(cannot resolve karpathy-public.s3.us-west-2.amazonaws.com\); "
                                          r"point config.train.core_data_dir at a directory holding eval_bundle/"):
    dclm.bundle_dir(None, "config.train.core_data_dir", cache=str(tmp_path / "eval_bundle"))
  with pytest.raises(SourceError, match=r"no network \(cannot resolve huggingface.co\); point "
                                        r"config.train.core_data_dir at a directory holding piqa.jsonl"):
    hf6.load_items("piqa", None, 10, flag="config.train.core_data_dir")
  assert hub_client == []


def test_a_caller_names_its_own_way_out(no_network, hub_client):
  hint = "use --data toy (no download), or --data-dir DIR"
  with pytest.raises(SourceError, match=r"\(cannot resolve huggingface.co\); use --data toy \(no download\)"):
    load_rows("gsm8k_train", gsm8k.TRAIN_SOURCE, None, hint=hint)


def test_hub_client_warnings_stay_quiet_when_its_modules_load_late(monkeypatch, caplog):
  # huggingface_hub loads its modules on first attribute access, and loading them set its logger back
  # to WARNING: the level set before the lookup did not hold, and every retry printed a warning.
  monkeypatch.setattr("lmtiny.corpus.sources.hub_offline", lambda: None)  # the probe passes
  hub_log = logging.getLogger("huggingface_hub")
  monkeypatch.setattr(hub_log, "level", hub_log.level)

  def list_repo_files(*args, **kwargs):
    logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
    raise ConnectionError("reset")

  class LazyHub(types.ModuleType):
    def __getattr__(self, name):
      hub_log.setLevel(logging.WARNING)  # what loading the real client's modules does
      return list_repo_files

  monkeypatch.setitem(sys.modules, "huggingface_hub", LazyHub("huggingface_hub"))
  with caplog.at_level(logging.WARNING), pytest.raises(SourceError, match="cannot list 'a/b' on the hub"):
    open_source("hf:a/b")
  assert not caplog.records
