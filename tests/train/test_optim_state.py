"""Tests of config.optim.state_dtype: Adam's moments stored in bfloat16, updates in float32."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.train.helpers import random_batch, tiny_config
from vljax.data.pipeline import global_batch
from vljax.train.config import base_config, load_config
from vljax.train.loop import build_experiment, mesh_context
from vljax.train.optim import (adamw_state_dtype, make_optimizer, path_mask,
                               scale_by_adam_state_dtype)
from vljax.train.state import state_shardings


def _params():
  keys = jax.random.split(jax.random.key(0), 3)
  return {"enc": {"kernel": jax.random.normal(keys[0], (6, 5)),
                  "bias": jax.random.normal(keys[1], (5,))},
          "head": {"kernel": jax.random.normal(keys[2], (5, 3))},
          "t": jnp.asarray(0.5)}


def _grads(params, i):
  """Deterministic, step-dependent pseudo-gradients."""
  return jax.tree.map(lambda p: jnp.sin(p * (i + 1.0)) * 2.0 + 0.1 * i, params)


def _cfg(state_dtype=None, **overrides):
  """config.optim with warm-up and weight decay; state_dtype None drops the key altogether."""
  cfg = base_config().optim
  cfg.warmup_steps = 3
  cfg.weight_decay = 0.1
  cfg.lr = 0.05
  for key, value in overrides.items():
    cfg[key] = value
  with cfg.unlocked():
    if state_dtype is not None:
      cfg.state_dtype = state_dtype
    elif "state_dtype" in cfg:  # None: a config without the key (older configs, checkpoints)
      del cfg["state_dtype"]
  return cfg


def _run(tx, params, steps, jit=True):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  for i in range(steps):
    updates, state = update(_grads(params, i), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _adam_states(opt_state):
  """The optax.ScaleByAdamState nodes inside an optimizer state (or a tree shaped like one)."""
  nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
  return [n for n in nodes if isinstance(n, optax.ScaleByAdamState)]


def _nbytes(tree):
  return sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------
# float32: today's behaviour


def _old_make_optimizer(cfg, params, total_steps):
  """make_optimizer as it was before state_dtype (plain optax.adamw)."""
  lr = optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps),
       optax.cosine_decay_schedule(cfg.lr, total_steps - cfg.warmup_steps,
                                   alpha=cfg.end_lr_fraction)], [cfg.warmup_steps])
  decay_mask = jax.tree.map(lambda excluded: not excluded, path_mask(params, cfg.wd_exclude))
  inner = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm),
                      optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, mask=decay_mask))
  labels = jax.tree.map(lambda _: "trained", params)
  return optax.multi_transform({"trained": inner, "frozen": optax.set_to_zero()}, labels)


@pytest.mark.parametrize("state_dtype", [None, "float32"])
def test_float32_state_is_todays_adamw_bit_for_bit(state_dtype):
  """The default (and a config without the key) is plain optax.adamw, as before state_dtype."""
  cfg = _cfg(state_dtype)
  assert cfg.grad_clip_norm and cfg.schedule == "cosine"
  params = _params()
  tx, _, _ = make_optimizer(cfg, params, total_steps=12)
  got_params, got_state = _run(tx, params, 8)
  want_params, want_state = _run(_old_make_optimizer(cfg, params, 12), params, 8)
  assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
  jax.tree.map(np.testing.assert_array_equal, (got_params, got_state), (want_params, want_state))
  assert all(x.dtype == jnp.float32 for m in _adam_states(got_state)
             for x in jax.tree.leaves((m.mu, m.nu)))


@pytest.mark.parametrize("jit", [True, False])
def test_own_transform_in_float32_matches_optax_adamw(jit):
  """With float32 storage the transform is AdamW: same state layout, same numbers (to rounding:
  XLA may evaluate optax's and this graph's divisions differently, so not asserted bit-exact)."""
  params = _params()
  mask = {"enc": {"kernel": True, "bias": False}, "head": {"kernel": True}, "t": False}
  lr = optax.join_schedules([optax.linear_schedule(0.0, 0.05, 3),
                             optax.cosine_decay_schedule(0.05, 9)], [3])
  ours = adamw_state_dtype(lr, 0.9, 0.98, 1e-6, 0.1, mask, state_dtype=jnp.float32)
  ref = optax.adamw(lr, 0.9, 0.98, 1e-6, weight_decay=0.1, mask=mask)
  got_params, got_state = _run(ours, params, 10, jit)
  want_params, want_state = _run(ref, params, 10, jit)
  assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
  np.testing.assert_array_equal(_adam_states(got_state)[0].count, 10)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               (got_params, got_state), (want_params, want_state))
  # The decay mask is honoured: only the masked-in leaves feel the weight decay.
  decayed, _ = _run(adamw_state_dtype(0.1, 0.9, 0.98, 1e-6, 0.5, mask, jnp.float32), params, 1)
  plain, _ = _run(adamw_state_dtype(0.1, 0.9, 0.98, 1e-6, 0.0, mask, jnp.float32), params, 1)
  np.testing.assert_array_equal(decayed["enc"]["bias"], plain["enc"]["bias"])
  assert not np.array_equal(decayed["enc"]["kernel"], plain["enc"]["kernel"])


# ---------------------------------------------------------------------------------------------
# bfloat16


def test_bfloat16_state_stores_moments_in_bfloat16_and_keeps_params_float32():
  params = _params()
  tx, _, _ = make_optimizer(_cfg("bfloat16"), params, total_steps=10)
  new_params, state = _run(tx, params, 3)
  (adam,) = _adam_states(state)
  assert adam.count.dtype == jnp.int32 and int(adam.count) == 3
  for leaf in jax.tree.leaves((adam.mu, adam.nu)):
    assert leaf.dtype == jnp.bfloat16
  assert jax.tree.structure(adam.mu) == jax.tree.structure(params)
  for leaf in jax.tree.leaves(new_params):
    assert leaf.dtype == jnp.float32
  # Frozen parameters (masked out by optax.multi_transform) get no moments and do not move.
  tx, _, _ = make_optimizer(_cfg("bfloat16", freeze="head/.*", lr_multipliers=(("t", 2.0),)),
                            params, total_steps=10)
  new_params, state = _run(tx, params, 3)
  (adam,) = _adam_states(state)
  assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype("bfloat16")}
  assert len(jax.tree.leaves(adam.mu)) == len(jax.tree.leaves(params)) - 1
  np.testing.assert_array_equal(new_params["head"]["kernel"], params["head"]["kernel"])
  assert not np.array_equal(new_params["t"], params["t"])
  # The step comes from the float32 moments: the first Adam step from zero state is sign(g).
  tx = scale_by_adam_state_dtype(0.9, 0.98, 1e-12)
  g = {"w": jnp.asarray([3.0, -0.125, 1e-3], jnp.float32)}
  step, _ = tx.update(g, tx.init(g))
  assert step["w"].dtype == jnp.float32
  np.testing.assert_allclose(step["w"], np.sign(g["w"]), rtol=1e-6)


def test_bfloat16_state_tracks_float32_on_a_quadratic_and_decreases_the_loss():
  target = jnp.linspace(-2.0, 3.0, 24).reshape(4, 6)
  scales = jnp.linspace(0.5, 2.0, 6)
  params = {"w": jnp.zeros((4, 6)), "b": jnp.full((6,), 1.5)}

  def loss(p):
    return jnp.sum(scales * (p["w"] - target) ** 2) + jnp.sum((p["b"] - 0.25) ** 2)

  def train(state_dtype):
    cfg = _cfg(state_dtype, lr=0.1, weight_decay=1e-3, schedule="cosine", warmup_steps=0)
    tx, _, _ = make_optimizer(cfg, params, total_steps=20)

    @jax.jit
    def step(p, s):
      value, grads = jax.value_and_grad(loss)(p)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s, value

    p, s, losses = params, tx.init(params), []
    for _ in range(20):
      p, s, value = step(p, s)
      losses.append(float(value))
    return p, s, losses + [float(loss(p))]

  p32, s32, losses32 = train("float32")
  p16, s16, losses16 = train("bfloat16")
  assert losses16[-1] < 0.3 * losses16[0]
  assert all(b < a for a, b in zip(losses16[:-1], losses16[1:]))
  np.testing.assert_allclose(losses16, losses32, rtol=2e-2)
  # Parameters: within 1% of the float32 run (atol for entries near zero).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3), p16, p32)
  # The stored moments are the float32 ones, rounded (bfloat16 keeps 8 significant bits).
  (m16,), (m32,) = _adam_states(s16), _adam_states(s32)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=5e-2,
                                                       atol=1e-3), (m16.mu, m16.nu),
               (m32.mu, m32.nu))


def test_bfloat16_state_takes_half_the_bytes():
  params = _params()
  sizes = {}
  for name in ("float32", "bfloat16"):
    tx, _, _ = make_optimizer(_cfg(name), params, total_steps=10)
    sizes[name] = _nbytes(tx.init(params))
  moments32 = 2 * _nbytes(params)
  assert sizes["float32"] - sizes["bfloat16"] == moments32 // 2
  assert sizes["bfloat16"] / sizes["float32"] == pytest.approx(0.5, abs=0.05)


def test_unknown_state_dtype_is_rejected_naming_the_key():
  with pytest.raises(ValueError, match=r"config\.optim\.state_dtype='float16'.*float32, bfloat16"):
    make_optimizer(_cfg("float16"), _params(), total_steps=10)


# ---------------------------------------------------------------------------------------------
# Sharding: the bfloat16 moments keep their parameters' logical axes.


def _check_moments_sharded_like_params(params_sharding, opt_sharding, abstract_opt_state):
  (adam,) = _adam_states(opt_sharding)
  for moments in (adam.mu, adam.nu):
    same = jax.tree.map(lambda m, p: m.spec == p.spec, moments, params_sharding)
    assert all(jax.tree.leaves(same)), same
  specs = [s.spec for s in jax.tree.leaves(params_sharding)]
  assert any(any(axis is not None for axis in spec) for spec in specs)  # some are sharded
  (abstract,) = _adam_states(abstract_opt_state)
  assert {x.dtype for x in jax.tree.leaves((abstract.mu, abstract.nu))} == {jnp.dtype("bfloat16")}


def test_bfloat16_moments_keep_the_parameters_logical_shardings_in_state_shardings():
  """Independent of the config schema: a bfloat16 optimizer through `state_shardings`."""
  exp = build_experiment(load_config("clip_tiny.py"), devices=jax.devices()[:1])
  cfg = exp.config.optim.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.state_dtype = "bfloat16"
  tx, _, _ = make_optimizer(cfg, exp.abstract_state.params, exp.config.total_steps)
  with mesh_context(exp.mesh, exp.rules):
    abstract, shardings = state_shardings(exp.init_params, tx, exp.mesh, exp.rules)
  _check_moments_sharded_like_params(shardings.params, shardings.opt_state, abstract.opt_state)
  # The logical names themselves (before mapping to the mesh) are carried over as well.
  boxed = jax.eval_shape(lambda key: tx.init(exp.init_params(key)), jax.random.key(0))
  (adam,) = _adam_states(nn.get_partition_spec(boxed))
  param_specs = nn.get_partition_spec(jax.eval_shape(exp.init_params, jax.random.key(0)))
  assert any(spec is not None and any(spec) for spec in jax.tree.leaves(
      param_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
  assert all(jax.tree.leaves(jax.tree.map(lambda m, p: m == p, adam.mu, param_specs)))
  assert all(jax.tree.leaves(jax.tree.map(lambda m, p: m == p, adam.nu, param_specs)))


def test_experiment_with_bfloat16_state_dtype_keeps_the_parameters_shardings():
  config = load_config("clip_tiny.py")
  config.optim.state_dtype = "bfloat16"
  exp = build_experiment(config, devices=jax.devices()[:1])
  _check_moments_sharded_like_params(exp.shardings.params, exp.shardings.opt_state,
                                     exp.abstract_state.opt_state)


def test_sharded_train_steps_with_bfloat16_state():
  """Real steps on an fsdp x tensor mesh: the bfloat16 moments live sharded as their parameters
  and stay bfloat16 through the jitted (donating) step."""
  config = tiny_config(**{"optim.state_dtype": "bfloat16"})
  config.mesh = [("data", 2), ("fsdp", 2), ("tensor", 2)]
  exp = build_experiment(config, devices=jax.devices())
  losses = []
  with exp.context():
    state = exp.init()
    for i in range(2):
      batch = global_batch(random_batch(config, seed=i), exp.mesh, exp.rules)
      state, metrics = exp.train_step(state, batch)
      losses.append(float(metrics["train/loss"]))
  (adam,) = _adam_states(state.opt_state)
  assert int(adam.count) == 2
  for moments in (adam.mu, adam.nu):
    assert {x.dtype for x in jax.tree.leaves(moments)} == {jnp.dtype("bfloat16")}
    same = jax.tree.map(lambda m, p: m.sharding.spec == p.sharding.spec, moments, state.params)
    assert all(jax.tree.leaves(same)), same
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
  assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(adam.mu))
  assert all(np.isfinite(losses))


def test_offloaded_optimizer_state_lives_in_host_memory_and_steps_and_resumes_the_same(tmp_path):
  """config.optim.offload keeps Adam's state in pinned host memory between steps; the steps are
  those of the on-device state, and a checkpoint of it restores into host memory."""
  from vljax.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel

  def steps(offload, num_steps=1):
    config = tiny_config()
    config.mesh = [("data", 2), ("fsdp", 2), ("tensor", 1)]
    config.optim.offload = offload
    exp = build_experiment(config, devices=jax.devices()[:4])
    with exp.context():
      state = exp.init()
      for i in range(num_steps):
        state, metrics = exp.train_step(state, global_batch(random_batch(config, seed=i), exp.mesh,
                                                            exp.rules))
    return exp, state, float(metrics["train/loss"])

  _, want, want_loss = steps(False)
  exp, state, loss = steps(True)
  kinds = {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state.opt_state)}
  assert kinds == {"pinned_host"}
  assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state.params)} == {"device"}
  assert loss == pytest.approx(want_loss, rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
               jax.device_get(state.params), jax.device_get(want.params))
  checkpointer = Checkpointer(str(tmp_path), keep=1)
  checkpointer.save(1, state)
  checkpointer.close()
  with exp.context():
    _, restored = Checkpointer(str(tmp_path)).restore_latest(exp.abstract_state, exp.shardings)
  assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(restored.opt_state)} == {"pinned_host"}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.opt_state),
               jax.device_get(state.opt_state))
