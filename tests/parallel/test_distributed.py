"""lmtiny.parallel.distributed: environment parsing, the initialize() paths, the gs:// workdir check.

The real multi-process join is proved in test_multiprocess.py; here jax.distributed.initialize is
replaced by a recorder so every path runs without a cluster.
"""
import os
import subprocess
import sys

import jax
import pytest

from lm_fixtures import xla_flags, ROOT
from lmtiny.errors import ConfigError
from lmtiny.parallel import distributed

SLURM = dict(SLURM_JOB_ID="17", SLURM_STEP_NODELIST="node[001-004]", SLURM_NTASKS="4",
             SLURM_PROCID="2", SLURM_LOCALID="0")


def test_empty_environment_is_one_process():
  plan = distributed.plan_from_env({})
  assert plan.mode == "single"


def test_lmtiny_variables_give_an_explicit_join():
  plan = distributed.plan_from_env(dict(LMTINY_COORDINATOR="10.0.0.2:8476", LMTINY_NUM_PROCESSES="4",
                                        LMTINY_PROCESS_ID="3"))
  assert (plan.mode, plan.coordinator, plan.num_processes, plan.process_id) == ("explicit", "10.0.0.2:8476", 4, 3)


def test_jax_variables_are_fallbacks_and_lmtiny_ones_win():
  env = dict(JAX_COORDINATOR_ADDRESS="host-a:1234", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
  plan = distributed.plan_from_env(env)
  assert (plan.coordinator, plan.num_processes, plan.process_id) == ("host-a:1234", 2, 1)
  env.update(LMTINY_COORDINATOR="host-b:99", LMTINY_NUM_PROCESSES="3", LMTINY_PROCESS_ID="2")
  plan = distributed.plan_from_env(env)
  assert (plan.coordinator, plan.num_processes, plan.process_id) == ("host-b:99", 3, 2)


def test_ipv6_coordinator_is_accepted():
  plan = distributed.plan_from_env(dict(LMTINY_COORDINATOR="[fd00::2]:8476", LMTINY_NUM_PROCESSES="2",
                                        LMTINY_PROCESS_ID="0"))
  assert plan.coordinator == "[fd00::2]:8476"


def test_one_process_needs_no_coordinator_even_on_a_tpu_vm():
  plan = distributed.plan_from_env(dict(LMTINY_NUM_PROCESSES="1"), on_tpu_vm=True)
  assert plan.mode == "single"


@pytest.mark.parametrize("env, words", [
    (dict(LMTINY_COORDINATOR="h:1", LMTINY_NUM_PROCESSES="2", LMTINY_PROCESS_ID="2"),
     ["LMTINY_PROCESS_ID=2", "LMTINY_NUM_PROCESSES=2"]),
    (dict(LMTINY_NUM_PROCESSES="2", LMTINY_PROCESS_ID="0"), ["LMTINY_NUM_PROCESSES=2", "LMTINY_COORDINATOR"]),
    (dict(LMTINY_COORDINATOR="h:1", LMTINY_NUM_PROCESSES="2"), ["LMTINY_PROCESS_ID", "0..1"]),
    (dict(LMTINY_PROCESS_ID="1"), ["LMTINY_PROCESS_ID=1", "LMTINY_NUM_PROCESSES"]),
    (dict(LMTINY_NUM_PROCESSES="two"), ["LMTINY_NUM_PROCESSES='two'", "integer"]),
    (dict(LMTINY_NUM_PROCESSES="0"), ["LMTINY_NUM_PROCESSES='0'", ">= 1"]),
    (dict(LMTINY_NUM_PROCESSES="2", LMTINY_PROCESS_ID="-1"), ["LMTINY_PROCESS_ID='-1'"]),
    (dict(LMTINY_COORDINATOR="h", LMTINY_NUM_PROCESSES="2", LMTINY_PROCESS_ID="0"), ["LMTINY_COORDINATOR='h'", "host:port"]),
    (dict(LMTINY_COORDINATOR="h:99999", LMTINY_NUM_PROCESSES="2", LMTINY_PROCESS_ID="0"), ["h:99999"]),
    (dict(LMTINY_COORDINATOR="h:1"), ["LMTINY_COORDINATOR='h:1'", "LMTINY_NUM_PROCESSES"]),
    (dict(JAX_COORDINATOR_ADDRESS="h:1"), ["JAX_COORDINATOR_ADDRESS='h:1'"]),
])
def test_inconsistent_variables_give_one_line_naming_them(env, words):
  with pytest.raises(ConfigError) as e:
    distributed.plan_from_env(env)
  msg = str(e.value)
  assert "\n" not in msg
  for w in words:
    assert w in msg


def test_slurm_and_open_mpi_are_left_to_jax_when_they_span_processes():
  assert distributed.plan_from_env(SLURM).mode == "auto"
  assert "Slurm" in distributed.plan_from_env(SLURM).source
  assert distributed.plan_from_env({**SLURM, "SLURM_NTASKS": "1"}).mode == "single"
  partial = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}  # sbatch without srun
  assert distributed.plan_from_env(partial).mode == "single"
  ompi = dict(OMPI_MCA_orte_hnp_uri="123.0;tcp://10.0.0.1:4000", OMPI_COMM_WORLD_SIZE="8")
  assert distributed.plan_from_env(ompi).mode == "auto"
  # An explicit coordinator with Slurm is handed to jax, which fills in the rest.
  plan = distributed.plan_from_env({**SLURM, "JAX_COORDINATOR_ADDRESS": "node001:5555"})
  assert (plan.mode, plan.coordinator) == ("auto", "node001:5555")


def test_tpu_vm_is_left_to_jax():
  plan = distributed.plan_from_env({}, on_tpu_vm=True)
  assert (plan.mode, plan.coordinator, plan.num_processes, plan.process_id) == ("auto", None, None, None)


@pytest.fixture
def recorder(monkeypatch):
  """Replaces jax.distributed.initialize; records its arguments; resets the module's cache."""
  calls = []
  monkeypatch.setattr(distributed, "_plan", None)
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: False)
  return calls


def test_initialize_single_process_touches_nothing_and_runs_once(recorder):
  plan = distributed.initialize({})
  assert plan.mode == "single" and recorder == []
  assert distributed.initialize(dict(LMTINY_NUM_PROCESSES="2")) is plan  # cached: env not re-read


def test_initialize_explicit_passes_the_variables(recorder, monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  env = dict(LMTINY_COORDINATOR="127.0.0.1:7000", LMTINY_NUM_PROCESSES="2", LMTINY_PROCESS_ID="1",
             LMTINY_INIT_TIMEOUT="30")
  distributed.initialize(env)
  assert recorder == [(("127.0.0.1:7000", 2, 1), dict(initialization_timeout=30))]


def test_initialize_on_tpu_vm_calls_jax_with_no_addresses(recorder, monkeypatch):
  monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: True)
  distributed.initialize({})
  assert recorder == [((None, None, None), dict(initialization_timeout=300))]


def test_initialize_rejects_a_process_count_the_coordinator_does_not_have(recorder, monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  env = dict(LMTINY_COORDINATOR="127.0.0.1:7000", LMTINY_NUM_PROCESSES="3", LMTINY_PROCESS_ID="1")
  with pytest.raises(ConfigError, match=r"LMTINY_NUM_PROCESSES=3 but the coordinator at 127.0.0.1:7000 runs 2"):
    distributed.initialize(env)


def test_initialize_checks_the_environment_before_touching_jax(recorder):
  with pytest.raises(ConfigError, match="LMTINY_INIT_TIMEOUT"):
    distributed.initialize(dict(LMTINY_INIT_TIMEOUT="soon"))
  with pytest.raises(ConfigError, match="LMTINY_PROCESS_ID=5"):
    distributed.initialize(dict(LMTINY_COORDINATOR="h:1", LMTINY_NUM_PROCESSES="2", LMTINY_PROCESS_ID="5"))
  assert recorder == []


def test_cpu_device_count_too_late_is_a_clear_error():
  jax.devices()  # backends are up (conftest: 8 emulated devices)
  distributed.set_cpu_device_count(jax.local_device_count())  # already right: accepted
  with pytest.raises(ConfigError, match=r"LMTINY_CPU_DEVICES=3: jax already started with 8"):
    distributed.set_cpu_device_count(3)


def test_cpu_device_count_in_a_fresh_process():
  code = ("from lmtiny.parallel import distributed; import jax; p = distributed.initialize(); "
          "print(p.mode, jax.device_count(), distributed.process_count(), distributed.is_main_process())")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("LMTINY_", "SLURM_", "OMPI_", "JAX_COORD"))}
  env.update(LMTINY_CPU_DEVICES="3", JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["single", "3", "1", "True"]


class _FakeGcs:
  def __init__(self, error=None):
    self.error, self.written, self.removed = error, [], []

  def pipe_file(self, path, data):
    if self.error:
      raise self.error
    self.written.append(path)

  def rm_file(self, path):
    self.removed.append(path)


def test_local_workdir_needs_no_check(monkeypatch):
  import fsspec
  monkeypatch.setattr(fsspec, "filesystem", lambda name: pytest.fail("no filesystem for local paths"))
  distributed.check_workdir("/tmp/run")
  distributed.check_workdir("runs/x")


def test_gs_workdir_is_probed_with_a_write_and_a_delete(monkeypatch):
  import fsspec
  fake = _FakeGcs()
  monkeypatch.setattr(fsspec, "filesystem", lambda name: fake if name == "gs" else None)
  distributed.check_workdir("gs://bucket/runs/a/")
  assert len(fake.written) == 1 and fake.written == fake.removed
  assert fake.written[0].startswith("gs://bucket/runs/a/.lmtiny_probe_0_")


def test_gs_workdir_without_credentials_is_one_line(monkeypatch):
  import fsspec
  err = PermissionError("Anonymous caller does not have storage.objects.create access\nsecond line")
  monkeypatch.setattr(fsspec, "filesystem", lambda name: _FakeGcs(err))
  with pytest.raises(ConfigError) as e:
    distributed.check_workdir("gs://bucket/run")
  msg = str(e.value)
  assert "\n" not in msg and "gs://bucket/run" in msg and "storage.objects.create" in msg
  assert "gcloud auth application-default login" in msg


def test_gs_workdir_without_gcsfs_names_the_package(monkeypatch):
  import fsspec

  def missing(name):
    raise ImportError("Please install gcsfs to access Google Storage")
  monkeypatch.setattr(fsspec, "filesystem", missing)
  with pytest.raises(ConfigError, match=r"workdir gs://b/r: gs:// needs the gcsfs package"):
    distributed.check_workdir("gs://b/r")


def test_open_mpi_5_is_refused_in_one_line():
  """Open MPI 5 sets OMPI_COMM_WORLD_SIZE but not OMPI_MCA_orte_hnp_uri: jax would start N
  independent one-process runs into one workdir."""
  with pytest.raises(ConfigError, match=r"^OMPI_COMM_WORLD_SIZE=4: Open MPI 5's mpirun is not detected by jax"):
    distributed.plan_from_env(dict(OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_RANK="1"))
  assert distributed.plan_from_env(dict(OMPI_COMM_WORLD_SIZE="1")).mode == "single"
