"""Shared small layers: partitioned initialisers, dense layers, norms and the MLP block.

Every weight carries logical axis names from one vocabulary (see `vljax.sharding.rules`):
`embed, mlp, heads, kv, vocab, layers` for parameters and `batch, seq, act_embed, act_mlp,
act_heads` for activations. Only the config decides which mesh axis each name maps to.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

default_kernel_init = nn.initializers.xavier_uniform()


class LogicalBox(nn.LogicallyPartitioned):
  """`nn.LogicallyPartitioned` whose `unbox` constrains only arrays of the names' rank.

  Under a mesh, flax's box constrains whatever it holds, which fails for shapes
  (`nn.meta.unbox(jax.eval_shape(init, ...))`) and for the flat [D, H * K] kernel that
  `nn.DenseGeneral` initialises, unboxes and only then reshapes to [D, H, K] (google/flax#3676).
  """

  def unbox(self, apply_constraint: bool = True) -> Any:
    if not isinstance(self.value, jax.Array) or self.value.ndim != len(self.names):
      apply_constraint = False
    return super().unbox(apply_constraint)


def partitioned(init: Initializer, names: Sequence[str | None]) -> Initializer:
  """An initialiser whose parameter is boxed with logical axis names."""
  names = tuple(names)

  @functools.wraps(init)
  def boxed_init(*args, **kwargs) -> LogicalBox:
    return LogicalBox(init(*args, **kwargs), names)

  return boxed_init


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pins an activation's sharding by logical names. A no-op unless both a mesh is set with
  `jax.set_mesh` (a bare `with mesh:` does not set it) and rules with `nn.logical_axis_rules`."""
  return nn.with_logical_constraint(x, tuple(names))


class Dense(nn.Module):
  """`y = x @ W + b` over the last axis, with logical names for W's input and output axes."""

  features: int
  in_axis: str | None = "embed"  # logical name of the input feature axis
  out_axis: str | None = "mlp"  # logical name of the output feature axis
  use_bias: bool = True
  kernel_init: Initializer = default_kernel_init
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(
        self.features,
        use_bias=self.use_bias,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=partitioned(self.kernel_init, (self.in_axis, self.out_axis)),
        bias_init=partitioned(nn.initializers.zeros, (self.out_axis,)),
        name="dense",
    )(x)


class RMSNorm(nn.Module):
  """RMSNorm (Zhang & Sennrich 2019) computed as transformers' LlamaRMSNorm: the mean square
  and the normalisation in float32, a cast back to the input dtype, then the scale multiply
  (so bfloat16 activations round exactly where LLaMA's do)."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd: jax.Array) -> jax.Array:
    scale_d = self.param("scale", partitioned(nn.initializers.ones, ("embed",)), (x_btd.shape[-1],),
                         self.param_dtype)
    x32_btd = x_btd.astype(jnp.float32)
    mean_square_bt1 = jnp.mean(jnp.square(x32_btd), axis=-1, keepdims=True)
    normed_btd = (x32_btd * jax.lax.rsqrt(mean_square_bt1 + self.epsilon)).astype(x_btd.dtype)
    return jnp.asarray(scale_d, self.dtype) * normed_btd.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm (or RMSNorm with `rms=True`) with logically named scale and bias."""

  epsilon: float = 1e-6
  rms: bool = False
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale_init = partitioned(nn.initializers.ones, ("embed",))
    if self.rms:
      return RMSNorm(self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
    return nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                        use_bias=self.use_bias, scale_init=scale_init,
                        bias_init=partitioned(nn.initializers.zeros, ("embed",)), name="norm")(x)


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # ViT, BERT
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),  # big_vision, SigLIP
    "quick_gelu": quick_gelu,  # OpenAI CLIP
    "relu": nn.relu,
    "silu": nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


class MlpBlock(nn.Module):
  """Transformer feed-forward block: Dense(mlp_dim) -> activation -> dropout -> Dense(width).

  With `gated` it is a gated linear unit (Shazeer 2020, "GLU Variants Improve Transformer"):
  act(x W_gate) * (x W_up) -> dropout -> W_down; with act="silu" this is LLaMA's SwiGLU.
  """

  mlp_dim: int
  act: str = "gelu"
  dropout: float = 0.0
  gated: bool = False
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_btd: jax.Array, deterministic: bool = True) -> jax.Array:
    width = x_btd.shape[-1]
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.gated:
      gate_btm = Dense(self.mlp_dim, "embed", "mlp", name="gate", **kw)(x_btd)
      up_btm = Dense(self.mlp_dim, "embed", "mlp", name="up", **kw)(x_btd)
      h_btm = constrain(activation(self.act)(gate_btm) * up_btm, ("batch", "seq", "act_mlp"))
      h_btm = nn.Dropout(self.dropout)(h_btm, deterministic=deterministic)
      return Dense(width, "mlp", "embed", name="down", **kw)(h_btm)
    h_btm = Dense(self.mlp_dim, "embed", "mlp", name="fc1", **kw)(x_btd)
    h_btm = constrain(activation(self.act)(h_btm), ("batch", "seq", "act_mlp"))
    h_btm = nn.Dropout(self.dropout)(h_btm, deterministic=deterministic)
    return Dense(width, "mlp", "embed", name="fc2", **kw)(h_btm)
