"""Gradient accumulation that keeps every loss exact: `config.microbatches = k` runs each global
batch as k sequential microbatches inside the jitted step.

A family's loss is `combine(loss_terms(batch))` (`vljax.families.base.LossTerms`): per-example
arrays (contrastive embeddings), arrays shared by all examples (the logit scale and bias) and
sums (token NLLs and counts). Averaging k small-batch losses would change a contrastive loss (each
example would only meet the negatives of its own microbatch) and weigh tokens unequally.
Instead, as gradient caching (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size
under Memory Limited Setup"), the step runs two scans over the microbatches:

  1. the terms of every microbatch, without gradients; concatenated (examples) and added (sums),
     they are the whole batch's terms, and `combine` gives the whole batch's loss and metrics;
     its vector-Jacobian product gives the cotangent of every term;
  2. per microbatch, the gradient of the surrogate <cotangent, terms(params)> (the shared terms'
     share divided by k), recomputing the microbatch's forward pass. By the chain rule the
     surrogates' gradients add up to the gradient of the whole batch's loss.

Only one microbatch's activations are alive at a time; the cost is one extra forward pass. Both
scans give a microbatch the same dropout key, so the recomputation matches the first pass.
Microbatch m holds the examples m, m + k, m + 2k, ...: each device's shard of the batch holds
its share of every microbatch, so splitting moves no data between devices.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from vljax.families.base import LossTerms

TermsFn = Callable[[Any, dict, jax.Array], LossTerms]
CombineFn = Callable[[LossTerms], tuple[jax.Array, dict]]


def split_microbatches(batch: Any, k: int) -> Any:
  """[B, ...] leaves -> [k, B / k, ...]; microbatch m holds examples m, m + k, m + 2k, ..."""

  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"a batch of {x.shape[0]} examples cannot be split into {k} microbatches")
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def merge_microbatches(stacked: Any) -> Any:
  """The inverse of `split_microbatches`: [k, B / k, ...] -> [B, ...] in the batch's order."""
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:]), stacked)


def _inner(cotangents: Any, values: Any) -> jax.Array:
  """sum over leaves of <cotangent, value> in float32 (cotangents are constants)."""
  total = jnp.zeros((), jnp.float32)
  for c, v in zip(jax.tree.leaves(cotangents), jax.tree.leaves(values)):
    if jnp.issubdtype(v.dtype, jnp.inexact):
      total += jnp.sum(jax.lax.stop_gradient(c).astype(jnp.float32) * v.astype(jnp.float32))
  return total


def microbatch_keys(rng: jax.Array, k: int) -> jax.Array:
  """One dropout key per microbatch, the same in both passes."""
  return jax.vmap(lambda m: jax.random.fold_in(rng, m))(jnp.arange(k))


def accumulated_value_and_grad(terms_fn: TermsFn, combine_fn: CombineFn, params: Any, batch: dict,
                               rng: jax.Array, k: int, grad_constraint: Callable | None = None
                               ) -> tuple[tuple[jax.Array, dict], Any]:
  """((loss, metrics), grads) of `combine_fn(terms_fn(params, batch, rng))` over the whole batch,
  computed in `k` microbatches (see the module docstring). With k == 1 it is the plain
  `value_and_grad`. `grad_constraint` (e.g. a sharding constraint) is applied to the gradient
  accumulator."""
  if k == 1:
    return jax.value_and_grad(lambda p: combine_fn(terms_fn(p, batch, rng)), has_aux=True)(params)
  micro = split_microbatches(batch, k)
  keys = microbatch_keys(rng, k)
  constrain = grad_constraint or (lambda g: g)

  def forward(_, xs):
    mb, key = xs
    return None, jax.lax.stop_gradient(terms_fn(params, mb, key))

  _, stacked = jax.lax.scan(forward, None, (micro, keys))
  terms = LossTerms(examples=merge_microbatches(stacked.examples),
                    shared=jax.tree.map(lambda x: x[0], stacked.shared),
                    sums=jax.tree.map(lambda x: jnp.sum(x, axis=0), stacked.sums))
  loss, vjp_fn, metrics = jax.vjp(combine_fn, terms, has_aux=True)
  (cot,) = vjp_fn(jnp.ones_like(loss))
  cot_examples = split_microbatches(cot.examples, k)

  def backward(grads, xs):
    mb, key, cot_ex = xs

    def surrogate(p):
      t = terms_fn(p, mb, key)
      return (_inner(cot_ex, t.examples) + _inner(cot.shared, t.shared) / k
              + _inner(cot.sums, t.sums))

    g = jax.grad(surrogate)(params)
    return constrain(jax.tree.map(jnp.add, grads, g)), None

  zeros = constrain(jax.tree.map(jnp.zeros_like, params))
  grads, _ = jax.lax.scan(backward, zeros, (micro, keys, cot_examples))
  return (loss, metrics), grads
