"""A sweep's plan: which child runs it holds, each a set of config overrides over one base config.

  children = expand(grid=[("model.num_layers", ["1", "2"]), ("train.flops_budget", ["1e12", "3e12"])],
                    runs=[{"model.d_model": "64"}])    # each run x each grid point: 1 x 2 x 2 children
  plan = make_plan(base_cfg, children, config_path="configs/tiny.py")
  record_plan(workdir, plan)    # WORKDIR/sweep.json; the same plan again is a resume, another one refused

Overrides are `field.path=value` strings, typed by the base config's field as `--config.a.b=v` is
(int, float, bool, str); an unknown field names the closest known one. A child's name is its
overrides' last path parts and values (`num_layers-1_flops_budget-1e12`, full paths where two
would read alike); its directory is WORKDIR/<name>. `--part K/N` takes children K-1, K-1+N, ...
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import os
import re

from etils import epath

from lmtiny.errors import ConfigError
from lmtiny.fs.atomic import atomic_write_json

PLAN_FILE = "sweep.json"
PLAN_VERSION = 1
MAX_NAME = 100


@dataclasses.dataclass(frozen=True)
class Child:
  name: str
  overrides: dict  # {"model.num_layers": "1", ...}: as typed, in order


def parse_assignment(text: str, flag: str) -> tuple[str, str]:
  """'model.num_layers=2' -> ('model.num_layers', '2'); ConfigError naming `flag` otherwise."""
  key, eq, value = text.partition("=")
  key = key.strip().removeprefix("--config.").removeprefix("config.")
  if not eq or not key or not value.strip():
    raise ConfigError(f"{flag}={text}: expected FIELD=VALUE, e.g. model.num_layers=2")
  return key, value.strip()


def parse_grid(texts: list[str]) -> list[tuple[str, list[str]]]:
  """--grid FIELD=V1,V2,... (repeatable) -> [(field, [values])]; one field once."""
  grid = []
  for text in texts:
    key, values = parse_assignment(text, "--grid")
    split = [v.strip() for v in values.split(",")]
    if any(not v for v in split):
      raise ConfigError(f"--grid={text}: an empty value; list them as FIELD=V1,V2")
    if len(set(split)) != len(split):
      raise ConfigError(f"--grid={text}: a value is listed twice")
    if key in (k for k, _ in grid):
      raise ConfigError(f"--grid={text}: {key} is already a grid axis; list its values once")
    grid.append((key, split))
  return grid


def parse_run(text: str, flag: str = "--run") -> dict:
  """--run "a.b=1,c.d=2" -> {"a.b": "1", "c.d": "2"} (a value holding commas: give the field in --grid)."""
  out = {}
  for part in text.split(","):
    key, value = parse_assignment(part, flag)
    if key in out:
      raise ConfigError(f"{flag}={text}: {key} is set twice")
    out[key] = value
  return out


def read_runs_file(path: str) -> list[dict]:
  """--runs FILE: one run per line in --run's form; blank lines and `#` comments skipped."""
  try:
    lines = epath.Path(path).read_text().splitlines()
  except OSError as e:
    raise ConfigError(f"--runs={path}: cannot read ({e.strerror or e})") from None
  runs = [parse_run(line.split("#", 1)[0].strip(), f"--runs={path}:{i}")
          for i, line in enumerate(lines, 1) if line.split("#", 1)[0].strip()]
  if not runs:
    raise ConfigError(f"--runs={path}: no runs in it (one FIELD=VALUE,FIELD=VALUE line per run)")
  return runs


def _leaf_names(keys: list[str]) -> dict[str, str]:
  """Each field's shortest dotted suffix that no other field in `keys` shares."""
  out = {}
  for key in keys:
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
      suffix = ".".join(parts[-n:])
      if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
        break
    out[key] = suffix
  return out


def _safe(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9.+-]", "_", text)


def child_name(overrides: dict, leaves: dict[str, str]) -> str:
  """num_layers-1_flops_budget-1e12; long names end in a hash of the overrides."""
  if not overrides:
    return "base"
  name = "_".join(f"{_safe(leaves[k])}-{_safe(v)}" for k, v in overrides.items())
  if len(name) > MAX_NAME:
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
    name = f"{name[:MAX_NAME - 9]}-{digest}"
  return name


def expand(grid: list[tuple[str, list[str]]], runs: list[dict]) -> list[Child]:
  """Every run (or none) x every point of the grid, named; ConfigError on a field set by both or
  two children alike."""
  points = [dict(zip([k for k, _ in grid], values)) for values in itertools.product(*[v for _, v in grid])]
  combos = []
  for run in runs or [{}]:
    for point in points:
      both = sorted(set(run) & set(point))
      if both:
        raise ConfigError(f"--run and --grid both set {both[0]}: give it in one of them")
      combos.append({**run, **point})
  leaves = _leaf_names(sorted({k for c in combos for k in c}))
  children, seen = [], {}
  for overrides in combos:
    key = json.dumps(overrides, sort_keys=True)
    if key in seen:
      raise ConfigError(f"two children of the sweep set the same overrides ({seen[key]}): list each run once")
    name = child_name(overrides, leaves)
    seen[key] = name
    children.append(Child(name, overrides))
  names = [c.name for c in children]
  for c in children:
    if names.count(c.name) > 1:
      raise ConfigError(f"two children would share the directory {c.name}: make their values differ in more "
                        "than punctuation")
  return children


def _typed(default, value: str, field: str):
  """value parsed as the base config's field type (ConfigError naming the field)."""
  try:
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError("expected true or false")
      return value.lower() in ("true", "1")
    if isinstance(default, int):
      return int(value)
    if isinstance(default, float):
      return float(value)
  except ValueError as e:
    raise ConfigError(f"config.{field}={value!r}: not a {type(default).__name__} ({e})") from None
  return value


def apply_overrides(cfg, overrides: dict):
  """A copy of `cfg` with the overrides set (unknown fields: ConfigError naming the closest)."""
  cfg = copy.deepcopy(cfg)
  for field, value in overrides.items():
    section, _, name = field.partition(".")
    if section not in cfg or not name or name not in cfg[section]:
      known = [f"{s}.{n}" for s in cfg for n in (cfg[s] if hasattr(cfg[s], "keys") else ())]
      close = difflib.get_close_matches(field, known, n=1)
      raise ConfigError(f"config.{field}: no such field" + (f" (did you mean {close[0]}?)" if close else ""))
    cfg[section][name] = _typed(cfg[section][name], value, field)
  return cfg


def make_plan(base_cfg, children: list[Child], config_path: str = "") -> dict:
  """What sweep.json records: the base config (after the command's --config.* overrides) and every
  child's name and overrides, in order."""
  return {"version": PLAN_VERSION, "config": config_path, "base": json.loads(base_cfg.to_json_best_effort()),
          "children": [{"name": c.name, "overrides": c.overrides} for c in children]}


def children_of(plan: dict) -> list[Child]:
  return [Child(c["name"], dict(c["overrides"])) for c in plan["children"]]


def read_plan(workdir: str) -> dict | None:
  path = epath.Path(workdir) / PLAN_FILE
  if not path.exists():
    return None
  try:
    plan = json.loads(path.read_text())
    if not isinstance(plan, dict) or not isinstance(plan.get("children"), list) or "base" not in plan:
      raise ValueError("not a sweep plan")
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: unreadable ({e}); it records what this sweep runs") from None
  return plan


def _first_difference(old, new, where: str = "") -> str:
  if isinstance(old, dict) and isinstance(new, dict):
    for key in list(old) + [k for k in new if k not in old]:
      if old.get(key) != new.get(key):
        return _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
  return f"{where}: {old!r} -> {new!r}"


def record_plan(workdir: str, plan: dict) -> bool:
  """Writes WORKDIR/sweep.json for a new sweep (True), or checks that the one there is this plan
  (False: a resume). ConfigError when it differs, or when WORKDIR holds something else."""
  old = read_plan(workdir)
  if old is None and os.path.isdir(workdir) and os.listdir(workdir):
    old = read_plan(workdir)  # another host's part may have written it since
    if old is None:
      raise ConfigError(f"--workdir={workdir}: exists, is not empty and holds no {PLAN_FILE}: not a sweep this "
                        "command made; choose a new or empty --workdir")
  if old is None:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(epath.Path(workdir) / PLAN_FILE, plan)
    return True
  if old["children"] != plan["children"]:
    was, now = [c["name"] for c in old["children"]], [c["name"] for c in plan["children"]]
    detail = f"children {was} -> {now}" if was != now else _first_difference(old["children"], plan["children"])
    raise ConfigError(f"--workdir={workdir}: holds another sweep ({detail}, per {PLAN_FILE}); re-run its own "
                      "command to resume it, or choose another --workdir")
  if old["base"] != plan["base"]:
    raise ConfigError(f"--workdir={workdir}: holds this sweep over another base config "
                      f"({_first_difference(old['base'], plan['base'])}, per {PLAN_FILE}); re-run its own command "
                      "to resume it, or choose another --workdir")
  return False


def parse_part(text: str, environ=None) -> tuple[int, int]:
  """--part K/N (1 <= K <= N) -> (K, N); `auto`: from LMTINY_PROCESS_ID / LMTINY_NUM_PROCESSES
  (launch/gpu.sh --hosts sets them) or Slurm's SLURM_PROCID / SLURM_NTASKS, else 1/1."""
  if text == "auto":
    env = os.environ if environ is None else environ
    for index, count in (("LMTINY_PROCESS_ID", "LMTINY_NUM_PROCESSES"), ("SLURM_PROCID", "SLURM_NTASKS")):
      if env.get(count):
        text = f"{int(env.get(index, '0')) + 1}/{env[count]}"
        break
    else:
      return 1, 1
  match = re.fullmatch(r"(\d+)/(\d+)", text)
  if not match or not 1 <= int(match[1]) <= int(match[2]):
    raise ConfigError(f"--part={text}: expected K/N with 1 <= K <= N (this host runs children K, K+N, ...), or auto")
  return int(match[1]), int(match[2])


def part_of(children: list[Child], part: tuple[int, int]) -> list[Child]:
  k, n = part
  return children[k - 1::n]
