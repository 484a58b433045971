"""Optimizers: AdamW with warm-up + decay schedules, global-norm clipping, a weight-decay mask,
learning-rate multipliers and freezing by parameter path.

Frozen parameters (e.g. LiT's locked image tower, `config.optim.freeze = "img/.*"`) get no
gradient (they enter the loss through `stop_gradient`, so autodiff never differentiates
through them) and no optimizer state (`optax.multi_transform` with `set_to_zero`), and their
values never change.

`config.optim.state_dtype` picks the dtype in which Adam's moments are stored: "float32" (the
default: plain `optax.adamw`) or "bfloat16" (`adamw_state_dtype`), which halves the optimizer
state's memory. The update itself is still computed in float32: the stored moments are upcast,
updated, used for the step, and only then rounded to bfloat16 for storage.
"""
from __future__ import annotations

import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

# config.optim.state_dtype -> the dtype Adam's moments are stored in.
STATE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def param_paths(params: Any) -> Any:
  """A tree like `params` whose leaves are "a/b/c" path strings."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  return flax.traverse_util.unflatten_dict({k: k for k in flat}, sep="/")


def path_mask(params: Any, pattern: str) -> Any:
  """Boolean tree: True where the parameter path fully matches the regex (all False if empty)."""
  if not pattern:
    return jax.tree.map(lambda _: False, params)
  regex = re.compile(pattern)
  return jax.tree.map(lambda path: regex.fullmatch(path) is not None, param_paths(params))


def required_mask(params: Any, pattern: str, field: str) -> Any:
  """`path_mask`, raising (naming the config `field`) when the pattern matches no parameter."""
  mask = path_mask(params, pattern)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f"{field}={pattern!r} matches no parameter path; paths look like "
                     f"{next(iter(jax.tree.leaves(param_paths(params))))!r}")
  return mask


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up to `lr`, then cosine / linear decay to `end_lr_fraction * lr`, or constant."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  end = cfg.lr * cfg.end_lr_fraction
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_fraction)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.lr, end, decay_steps)
  elif cfg.schedule == "constant":
    decay = optax.constant_schedule(cfg.lr)
  else:
    raise ValueError(f"config.optim.schedule={cfg.schedule!r}; choose cosine, linear or constant")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def moment_dtype(cfg: ml_collections.ConfigDict) -> Any:
  """The storage dtype of Adam's moments named by `cfg.state_dtype` (float32 when absent)."""
  name = cfg.get("state_dtype", "float32")
  if name not in STATE_DTYPES:
    raise ValueError(f"config.optim.state_dtype={name!r}; choose one of "
                     f"{', '.join(STATE_DTYPES)}")
  return STATE_DTYPES[name]


def scale_by_adam_state_dtype(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                              state_dtype: Any = jnp.bfloat16) -> optax.GradientTransformation:
  """Adam's rescaling (as `optax.scale_by_adam` with eps_root=0) with both moments stored in
  `state_dtype`.

  Each update upcasts the stored moments to float32 (or the gradient's dtype, when wider),
  computes the new moments and the bias-corrected step `mu_hat / (sqrt(nu_hat) + eps)` from
  them at that precision, and only then rounds the new moments to `state_dtype` for storage.
  The state is an `optax.ScaleByAdamState`, so its tree paths match `optax.adam`'s. The moments
  are built by mapping over the parameter tree, so logical-axis boxes around the parameters
  carry over to them.
  """
  store = jnp.dtype(state_dtype)

  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p, dtype=store)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                  mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    # Computed from the int32 count in float32 before any cast, so b ** count cannot round to 1.
    mu_correction = 1 - b1 ** count
    nu_correction = 1 - b2 ** count

    def moment(g, stored, decay, order):
      if g is None:
        return None
      g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
      return (1 - decay) * (g if order == 1 else g * g) + decay * stored.astype(g.dtype)

    def step(g, m, v):
      if g is None:
        return None
      m_hat = m / mu_correction.astype(m.dtype)
      v_hat = v / nu_correction.astype(v.dtype)
      return (m_hat / (jnp.sqrt(v_hat) + eps)).astype(g.dtype)

    def store_cast(x):
      return None if x is None else x.astype(store)

    none = lambda x: x is None
    mu = jax.tree.map(lambda g, m: moment(g, m, b1, 1), updates, state.mu, is_leaf=none)
    nu = jax.tree.map(lambda g, v: moment(g, v, b2, 2), updates, state.nu, is_leaf=none)
    steps = jax.tree.map(step, updates, mu, nu, is_leaf=none)
    return steps, optax.ScaleByAdamState(count=count, mu=jax.tree.map(store_cast, mu, is_leaf=none),
                                         nu=jax.tree.map(store_cast, nu, is_leaf=none))

  return optax.GradientTransformation(init_fn, update_fn)


def adamw_state_dtype(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
                      eps: float = 1e-8, weight_decay: float = 1e-4, mask: Any = None,
                      state_dtype: Any = jnp.bfloat16) -> optax.GradientTransformation:
  """AdamW as `optax.adamw` (Adam's rescaling, then decoupled weight decay on the `mask`ed
  parameters, then the step scaled by -learning_rate), with the moments stored in `state_dtype`
  (see `scale_by_adam_state_dtype`)."""
  return optax.chain(
      scale_by_adam_state_dtype(b1, b2, eps, state_dtype),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def make_optimizer(cfg: ml_collections.ConfigDict, params: Any, total_steps: int):
  """Returns (optimizer, lr_schedule, frozen_mask) for the parameter tree `params`.

  Adam's moments are stored in `cfg.state_dtype` ("float32" when the key is absent).
  """
  lr = schedule(cfg, total_steps)
  if cfg.name != "adamw":
    raise ValueError(f"config.optim.name={cfg.name!r}; only 'adamw' is available")
  moments_dtype = moment_dtype(cfg)
  decay_mask = jax.tree.map(lambda excluded: not excluded, path_mask(params, cfg.wd_exclude))
  if moments_dtype == jnp.float32:
    adamw = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=decay_mask)
  else:
    adamw = adamw_state_dtype(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                              weight_decay=cfg.weight_decay, mask=decay_mask,
                              state_dtype=moments_dtype)
  inner = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm else optax.identity(),
      adamw,
  )
  for pattern, factor in cfg.lr_multipliers:
    mask = required_mask(params, pattern, "config.optim.lr_multipliers pattern")
    inner = optax.chain(inner, optax.masked(optax.scale(float(factor)), mask))
  frozen = (required_mask(params, cfg.freeze, "config.optim.freeze") if cfg.freeze
            else path_mask(params, ""))
  labels = jax.tree.map(lambda f: "frozen" if f else "trained", frozen)
  tx = optax.multi_transform({"trained": inner, "frozen": optax.set_to_zero()}, labels)
  return tx, lr, frozen


def stop_frozen(params: Any, frozen: Any) -> Any:
  """Applies `stop_gradient` to frozen leaves so the loss is constant in them."""
  return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
