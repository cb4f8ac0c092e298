"""LoRA: low-rank adapters trained on a frozen base model.

For each targeted weight W (attention q, k, v, o; MLP up, gate, down) an adapter holds A, whose
leading axes are W's input axes plus a rank axis, and B, the rank axis plus W's output axes
(with scan_layers both also keep W's leading layer axis). The model runs with

    W' = W + (alpha / rank) * A @ B          (A @ B contracts the rank axis)

folded into the weight before the forward pass, so the model code is untouched and merging for
deployment is the same function. A starts random (std 1/sqrt(fan_in)), B at zero: an untrained
adapter leaves the model exactly as it was. Adapters carry logical axes (W's own, with
`lora_rank` for the rank), so lmtiny.parallel.sharding places them like the weights they adapt.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmtiny.errors import ConfigError
from lmtiny.model.transformer import abstract_model, path_names

# Target name -> how many of the weight's axes (after a layer axis) are input axes.
TARGETS = {"q": 1, "k": 1, "v": 1, "o": 2, "up": 1, "gate": 1, "down": 1}


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def parse_targets(text: str) -> tuple[str, ...]:
  targets = tuple(t.strip() for t in text.split(",") if t.strip())
  unknown = [t for t in targets if t not in TARGETS]
  if not targets or unknown:
    raise ConfigError(f"config.lora.targets={text!r}: must be a comma list of {', '.join(TARGETS)}")
  return targets


class LoRA:
  """Adapters for the targeted weights of a model whose parameters look like `abstract_params`
  (an nnx.State of ShapeDtypeStruct Params, e.g. nnx.state(abstract_model(m), nnx.Param))."""

  def __init__(self, abstract_params, rank: int, alpha: float, targets: tuple[str, ...]):
    if not (isinstance(rank, int) and rank > 0):
      raise ConfigError(f"config.lora.rank={rank!r}: must be a positive integer")
    self.rank, self.scale = rank, float(alpha) / rank
    self.specs = {}  # path names -> (shape, logical axes, leading axes, input axes)
    for path, var in jax.tree_util.tree_flatten_with_path(abstract_params, is_leaf=_is_variable)[0]:
      names = tuple(path_names(path))
      if names[-1] in targets and len(names) >= 2 and names[-2] in ("attn", "mlp"):
        axes = tuple(var.get_metadata()["logical_axes"])
        lead = 1 if axes[0] == "layers" else 0
        self.specs[names] = (tuple(var.get_value().shape), axes, lead, TARGETS[names[-1]])
    if not self.specs:
      raise ConfigError(f"config.lora.targets={','.join(targets)!r}: the model has none of these weights")

  def _shapes(self, shape, axes, lead, n_in):
    k = lead + n_in
    a = (shape[:k] + (self.rank,), axes[:k] + ("lora_rank",))
    b = (shape[:lead] + (self.rank,) + shape[k:], axes[:lead] + ("lora_rank",) + axes[k:])
    return a, b

  def init(self, key) -> dict:
    """Nested dicts (path names, then "a"/"b") of nnx.Params: A random, B zero."""
    adapters = {}
    for i, (names, (shape, axes, lead, n_in)) in enumerate(sorted(self.specs.items())):
      (a_shape, a_axes), (b_shape, b_axes) = self._shapes(shape, axes, lead, n_in)
      fan_in = math.prod(shape[lead:lead + n_in])
      a = jax.random.normal(jax.random.fold_in(key, i), a_shape, jnp.float32) / math.sqrt(fan_in)
      node = adapters
      for name in names:
        node = node.setdefault(name, {})
      node["a"] = nnx.Param(a, logical_axes=a_axes)
      node["b"] = nnx.Param(jnp.zeros(b_shape, jnp.float32), logical_axes=b_axes)
    return adapters

  def delta(self, a, b, shape, lead: int, n_in: int):
    """(alpha / rank) * A @ B in W's shape."""
    lead_shape = shape[:lead]
    a_IxR = a.reshape(lead_shape + (-1, self.rank))
    b_RxO = b.reshape(lead_shape + (self.rank, -1))
    return (self.scale * jnp.matmul(a_IxR, b_RxO)).reshape(shape)

  def merge(self, base_params, adapters):
    """The base parameters with every adapter folded in (same structure as `base_params`)."""

    def fold(path, var):
      names = tuple(path_names(path))
      if names not in self.specs:
        return var
      shape, _, lead, n_in = self.specs[names]
      node = adapters
      for name in names:
        node = node[name]
      a, b = (node[k].get_value() if _is_variable(node[k]) else node[k] for k in ("a", "b"))
      value = var.get_value()
      return var.replace(value + self.delta(a, b, shape, lead, n_in).astype(value.dtype))

    return jax.tree_util.tree_map_with_path(fold, base_params, is_leaf=_is_variable)

  def num_params(self) -> int:
    total = 0
    for shape, axes, lead, n_in in self.specs.values():
      (a_shape, _), (b_shape, _) = self._shapes(shape, axes, lead, n_in)
      total += math.prod(a_shape) + math.prod(b_shape)
    return total


def from_config(model_cfg, lora_cfg) -> LoRA | None:
  """The config's LoRA (None when lora.rank is 0: full fine-tuning)."""
  if not lora_cfg.rank:
    return None
  abstract = nnx.state(abstract_model(model_cfg), nnx.Param)
  return LoRA(abstract, lora_cfg.rank, lora_cfg.alpha, parse_targets(lora_cfg.targets))
