"""restart_counts: which step counts of a restored optimizer state restart (the schedules': LR,
Muon's momentum) and which continue (Adam's bias correction), through optax's nested states."""
import jax.numpy as jnp
import optax

from lmtiny.chat.warm_start import restart_counts
from lmtiny.training.muon import MuonState


def test_schedule_and_muon_counts_restart_adam_counts_continue():
  params = {"a": jnp.ones(3), "m": jnp.ones((2, 2))}
  tx = optax.multi_transform({"adam": optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(lambda n: 0.1)),
                              "sched": optax.scale_by_schedule(lambda n: 1.0 / (n + 1))},
                             {"a": "adam", "m": "sched"})
  fresh = tx.init(params)
  restored = fresh
  for _ in range(3):
    _, restored = tx.update(params, restored, params)
  restored = (restored, MuonState(count=jnp.asarray(3), momentum={"m": jnp.full((2, 2), 0.5)}))
  fresh = (fresh, MuonState(count=jnp.asarray(0), momentum={"m": jnp.zeros((2, 2))}))
  out = restart_counts(restored, fresh)
  inner = out[0].inner_states
  adam, lr = inner["adam"].inner_state
  assert int(adam.count) == 3 and float(adam.mu["a"][0]) != 0  # moments and bias correction continue
  assert int(lr.count) == 0 and int(inner["sched"].inner_state.count) == 0
  assert int(out[1].count) == 0 and float(out[1].momentum["m"][0, 0]) == 0.5  # momentum kept, its schedule restarts
