"""Training state and its sharded initialisation."""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vljax.sharding import logical_shardings


@flax.struct.dataclass
class TrainState:
  """Everything a step changes: the step count, parameters and optimizer state."""

  step: jax.Array
  params: Any
  opt_state: Any


def boxed_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                rng: jax.Array) -> TrainState:
  """TrainState whose parameters and optimizer moments keep their logical-axis boxes.

  Logical boxes are pytree nodes, so `tx.init` maps through them and Adam's moments inherit
  their parameter's names; `nn.get_partition_spec` then reads the whole state's layout.
  """
  params = init_params(rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


# The memory kind of an offloaded optimizer state (`config.optim.offload`).
HOST_MEMORY = "pinned_host"


def with_memory_kind(shardings: Any, kind: str) -> Any:
  """The NamedShardings of a tree placed in memory `kind` ("device" or HOST_MEMORY)."""
  return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings)


def in_host_memory(shardings: Any) -> bool:
  return any(s.memory_kind == HOST_MEMORY for s in jax.tree.leaves(shardings))


def abstract_key() -> jax.ShapeDtypeStruct:
  """The shape and dtype of a PRNG key: what shape-only initialisation (`jax.eval_shape`) needs,
  without creating a key on any device (a compile-only TPU mesh has none to create it on)."""
  return jax.eval_shape(lambda: jax.random.key(0))


def state_shardings(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                    mesh: Mesh, rules) -> tuple[TrainState, TrainState]:
  """(abstract unboxed state, matching NamedShardings), from shapes only: nothing is allocated."""
  boxed = jax.eval_shape(lambda key: boxed_state(init_params, tx, key), abstract_key())
  return nn.meta.unbox(boxed), logical_shardings(boxed, mesh, rules)


def init_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
               rng: jax.Array, shardings: TrainState) -> TrainState:
  """Initialises the state directly into its shardings (each device builds only its shard)."""
  fn = jax.jit(lambda key: nn.meta.unbox(boxed_state(init_params, tx, key)), out_shardings=shardings)
  return fn(rng)
