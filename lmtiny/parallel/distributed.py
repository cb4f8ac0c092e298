"""Joining the processes of a multi-host run, decided from the environment alone.

`initialize()` runs once at the start of training, before anything else touches jax. The same
command then works on one process or many:

- `LMTINY_NUM_PROCESSES` / `LMTINY_PROCESS_ID` / `LMTINY_COORDINATOR` (GPU clusters; jax's own
  `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` / `JAX_COORDINATOR_ADDRESS` are read as fallbacks):
  explicit `jax.distributed.initialize(coordinator, count, id)`. A count of 1 means one process.
- Slurm (`srun`), Open MPI (`mpirun`) with more than one task, or a Cloud TPU VM: jax detects
  everything itself, so `jax.distributed.initialize()` is called with no arguments. On a TPU VM
  that holds for a single host too (the worker list then has one entry).
- Otherwise: one process, nothing to do.

`LMTINY_CPU_DEVICES=n` sets the number of emulated CPU devices (tests run 2 processes x 4 devices
on one machine); `LMTINY_INIT_TIMEOUT` bounds the wait for all processes (seconds, default 300).
Mistakes in these variables raise `ConfigError` with one line naming the variable and its value.
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
import uuid
from collections.abc import Mapping

import jax

from lmtiny.errors import ConfigError, first_line

log = logging.getLogger(__name__)

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins the run. `mode`: single | explicit | auto (jax detects the cluster)."""
  mode: str
  source: str
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


_plan: Plan | None = None  # set by the first initialize(); later calls return it


def _int_var(env: Mapping[str, str], names: tuple[str, ...], minimum: int):
  """(value, name) of the first variable set among `names`, or (None, names[0])."""
  for name in names:
    raw = env.get(name, "").strip()
    if raw:
      try:
        value = int(raw)
      except ValueError:
        value = None
      if value is None or value < minimum:
        raise ConfigError(f"{name}={raw!r}: must be an integer >= {minimum}")
      return value, name
  return None, names[0]


def _detected_cluster(env: Mapping[str, str], on_tpu_vm: bool) -> str | None:
  """The cluster jax.distributed.initialize() would detect on its own, if it spans > 1 process."""
  if all(v in env for v in _SLURM_VARS) and env["SLURM_NTASKS"].strip() not in ("", "1"):
    return f"Slurm (SLURM_NTASKS={env['SLURM_NTASKS']})"
  if "OMPI_MCA_orte_hnp_uri" in env and env.get("OMPI_COMM_WORLD_SIZE", "1").strip() not in ("", "1"):
    return f"Open MPI (OMPI_COMM_WORLD_SIZE={env['OMPI_COMM_WORLD_SIZE']})"
  if env.get("OMPI_COMM_WORLD_SIZE", "1").strip() not in ("", "1"):
    # Open MPI 5 (PRRTE/PMIx) sets no OMPI_MCA_orte_hnp_uri, so jax would not see the cluster and
    # every rank would run alone, all writing into one workdir.
    raise ConfigError(f"OMPI_COMM_WORLD_SIZE={env['OMPI_COMM_WORLD_SIZE']}: Open MPI 5's mpirun is not "
                      "detected by jax; launch with srun, or set LMTINY_COORDINATOR / LMTINY_NUM_PROCESSES / "
                      "LMTINY_PROCESS_ID (OMPI_COMM_WORLD_RANK) per rank")
  if on_tpu_vm:
    return "Cloud TPU VM"
  return None


def plan_from_env(env: Mapping[str, str], on_tpu_vm: bool = False) -> Plan:
  """Decides how to join from environment variables; raises ConfigError on inconsistent ones."""
  coordinator, coord_name = None, "LMTINY_COORDINATOR"
  for name in ("LMTINY_COORDINATOR", "JAX_COORDINATOR_ADDRESS"):
    if env.get(name, "").strip():
      coordinator, coord_name = env[name].strip(), name
      break
  count, count_name = _int_var(env, ("LMTINY_NUM_PROCESSES", "JAX_NUM_PROCESSES"), minimum=1)
  pid, pid_name = _int_var(env, ("LMTINY_PROCESS_ID", "JAX_PROCESS_ID"), minimum=0)

  if count is not None or pid is not None:
    if count is None:
      raise ConfigError(f"{pid_name}={pid} is set but {count_name} (the number of processes) is not")
    if pid is None:
      if count > 1:
        raise ConfigError(f"{count_name}={count} needs {pid_name} (0..{count - 1}) for this process")
      pid = 0
    if pid >= count:
      raise ConfigError(f"{pid_name}={pid}: must be < {count_name}={count}")
    if count == 1:
      return Plan("single", f"{count_name}=1")
    if coordinator is None:
      raise ConfigError(f"{count_name}={count} needs {coord_name}=host:port (the address of process 0)")
    if not _ADDRESS.match(coordinator) or not 0 < int(coordinator.rsplit(":", 1)[1]) < 65536:
      raise ConfigError(f"{coord_name}={coordinator!r}: must be host:port, e.g. 10.0.0.2:8476")
    return Plan("explicit", f"{count_name}/{pid_name}/{coord_name}", coordinator, count, pid)

  cluster = _detected_cluster(env, on_tpu_vm)
  if cluster is not None:
    return Plan("auto", cluster, coordinator)
  if coordinator is not None:
    raise ConfigError(f"{coord_name}={coordinator!r} is set but LMTINY_NUM_PROCESSES and "
                      "LMTINY_PROCESS_ID are not (set all three, or none for one process)")
  return Plan("single", "no multi-process environment")


def on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM (jax's own check, made when jax is imported: TPU chips on PCI)."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):  # jax moved it: fall back to the TPU device files
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def set_cpu_device_count(n: int) -> None:
  """Emulated CPU devices for this process; must precede any jax computation."""
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # backends already up: fine only if they already have n devices
    if jax.devices()[0].platform != "cpu" or jax.local_device_count() != n:
      raise ConfigError(f"LMTINY_CPU_DEVICES={n}: jax already started with {jax.local_device_count()} "
                        "local devices; set it before the first jax computation") from None


def initialize(env: Mapping[str, str] | None = None) -> Plan:
  """Joins the multi-process run the environment describes (once; later calls are no-ops)."""
  global _plan
  if _plan is not None:
    return _plan
  env = os.environ if env is None else env
  cpu_devices, _ = _int_var(env, ("LMTINY_CPU_DEVICES",), minimum=1)
  timeout, _ = _int_var(env, ("LMTINY_INIT_TIMEOUT",), minimum=1)
  plan = plan_from_env(env, on_cloud_tpu_vm())
  if cpu_devices is not None:
    set_cpu_device_count(cpu_devices)
  if plan.mode != "single" and not jax.distributed.is_initialized():
    log.info("joining %s processes via %s (coordinator %s); waiting up to %s s for all of them",
             plan.num_processes or "all", plan.source, plan.coordinator or "auto-detected", timeout or 300)
    jax.distributed.initialize(plan.coordinator, plan.num_processes, plan.process_id,
                               initialization_timeout=timeout or 300)
    if plan.num_processes is not None and jax.process_count() != plan.num_processes:
      # The coordinator's count wins silently in jax; a mismatch means a misconfigured launch.
      raise ConfigError(f"LMTINY_NUM_PROCESSES={plan.num_processes} but the coordinator at "
                        f"{plan.coordinator} runs {jax.process_count()} processes")
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
  _plan = plan
  return plan


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def is_main_process() -> bool:
  """Process 0 alone writes logs, TensorBoard and plots."""
  return jax.process_index() == 0


def check_workdir(workdir: str) -> None:
  """Fails early, in one line, when a gs:// workdir cannot be written from this process.

  Every process writes its own checkpoint shards, so each one probes: it writes and deletes a
  small object under the workdir. Local paths need no check (they are created on demand).
  """
  if not workdir.startswith("gs://"):
    return
  import fsspec  # pylint: disable=g-import-not-at-top  (only remote workdirs need it)
  try:
    fs = fsspec.filesystem("gs")
  except (ImportError, ValueError) as e:
    raise ConfigError(f"workdir {workdir}: gs:// needs the gcsfs package (pip install -e '.[tpu]' "
                      f"or pip install gcsfs): {first_line(e)}") from None
  probe = f"{workdir.rstrip('/')}/.lmtiny_probe_{jax.process_index()}_{uuid.uuid4().hex[:8]}"
  try:
    fs.pipe_file(probe, b"lmtiny write check\n")
    fs.rm_file(probe)
  except Exception as e:  # pylint: disable=broad-except  (auth, bucket and network errors vary)
    raise ConfigError(f"workdir {workdir}: cannot write to it ({type(e).__name__}: {first_line(e)}); "
                      "check the bucket exists and credentials work (gcloud auth application-default "
                      "login, or a VM service account with storage write access)") from None


def check_shared_workdir(workdir: str) -> None:
  """A multi-process run writes one checkpoint from every process into one directory, so a local
  workdir must be a filesystem all hosts share: process 0 writes a marker, every other process
  must see it, else one line (on every process) instead of checkpoints split across hosts."""
  if jax.process_count() == 1 or "://" in workdir:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  marker = os.path.join(workdir, f".lmtiny-shared-{multihost_utils.broadcast_one_to_all(np.int32(os.getpid()))}")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(marker, "w") as f:
      f.write("lmtiny shared-workdir check\n")
  multihost_utils.sync_global_devices("lmtiny-shared-workdir-written")
  unseen = multihost_utils.process_allgather(np.int32(not os.path.exists(marker)))
  multihost_utils.sync_global_devices("lmtiny-shared-workdir-read")
  if jax.process_index() == 0:
    os.remove(marker)
  if np.any(unseen):
    hosts = [int(i) for i in np.flatnonzero(unseen)]
    raise ConfigError(f"--workdir={workdir}: not shared between hosts (process(es) {hosts} cannot see files "
                      "process 0 writes there); use gs://BUCKET/... or a filesystem every host mounts")
