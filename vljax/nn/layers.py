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
import numpy as np

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
  """`y = x @ W + b` over the last axis, with logical names for W's input and output axes.

  With `lora_rank` > 0 it also holds a low-rank adapter (see LoraDenseGeneral), beside its
  kernel and bias under "dense".
  """

  features: int
  in_axis: str | None = "embed"  # logical name of the input feature axis
  out_axis: str | None = "mlp"  # logical name of the output feature axis
  use_bias: bool = True
  kernel_init: Initializer = default_kernel_init
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32
  lora_rank: int = 0  # rank of a LoRA adapter; 0: none
  lora_alpha: float = 16.0  # the adapter's output is scaled by lora_alpha / lora_rank

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.lora_rank:
      return LoraDenseGeneral(
          (self.features,), (-1,), (self.in_axis, self.out_axis), rank=self.lora_rank,
          alpha=self.lora_alpha, use_bias=self.use_bias, kernel_init=self.kernel_init,
          dtype=self.dtype, param_dtype=self.param_dtype, name="dense")(x)
    return nn.Dense(
        self.features,
        use_bias=self.use_bias,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=partitioned(self.kernel_init, (self.in_axis, self.out_axis)),
        bias_init=partitioned(nn.initializers.zeros, (self.out_axis,)),
        name="dense",
    )(x)


class LoraDenseGeneral(nn.Module):
  """`nn.DenseGeneral` with a low-rank adapter (Hu et al. 2021, "LoRA"):
  y = x W + b + (alpha / rank) (x A) B, with A [in..., rank] and B [rank, out...].

  W ("kernel") and b ("bias") are made and applied as nn.DenseGeneral does (names, shapes,
  initialiser, arithmetic), with "lora_a" and "lora_b" beside them, so the tree is the
  adapter-free one plus two leaves and `vljax.nn.lora.merge` folds them back. A is initialised
  as peft's default (kaiming-uniform with a = sqrt(5): U(+-1 / sqrt(fan_in))) and B with zeros,
  so a new adapter changes nothing. The adapter runs in the compute dtype as two thin matmuls;
  W + A B is never formed.
  """

  features: tuple[int, ...]  # the output feature shape
  axis: tuple[int, ...]  # the contracted input axes (negative: from the end)
  names: tuple[str | None, ...]  # logical names of the kernel's axes: the inputs', the outputs'
  rank: int = 8
  alpha: float = 16.0
  use_bias: bool = True
  kernel_init: Initializer = default_kernel_init
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    num_in, features = len(self.axis), tuple(self.features)
    if self.rank < 1:
      raise ValueError(f"a LoRA adapter needs rank >= 1, got {self.rank}")
    if len(self.names) != num_in + len(features):
      raise ValueError(f"{len(self.names)} logical names {self.names} for a kernel of "
                       f"{num_in} input and {len(features)} output axes")
    axis = tuple(a % x.ndim for a in self.axis)
    in_shape = tuple(x.shape[a] for a in axis)
    in_names, out_names = self.names[:num_in], self.names[num_in:]

    def flat_init(init: Initializer, shape, flat_shape) -> Initializer:
      # nn.DenseGeneral's: initialised as a matrix, then reshaped (the same values as it).
      return lambda rng, _, dtype: jnp.reshape(init(rng, flat_shape, dtype), shape)

    flat_kernel = (int(np.prod(in_shape)), int(np.prod(features)))
    kernel = self.param("kernel", partitioned(flat_init(self.kernel_init, in_shape + features,
                                                        flat_kernel), self.names),
                        in_shape + features, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", partitioned(nn.initializers.zeros, out_names), features,
                        self.param_dtype)
    a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                              in_axis=tuple(range(num_in)), out_axis=-1)
    lora_a = self.param("lora_a", partitioned(a_init, in_names + (None,)),
                        in_shape + (self.rank,), self.param_dtype)
    lora_b = self.param("lora_b", partitioned(nn.initializers.zeros, (None,) + out_names),
                        (self.rank,) + features, self.param_dtype)
    x, kernel, bias, lora_a, lora_b = nn.dtypes.promote_dtype(x, kernel, bias, lora_a, lora_b,
                                                              dtype=self.dtype)
    contract = tuple(range(num_in))
    y = jax.lax.dot_general(x, kernel, ((axis, contract), ((), ())))
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - len(features)) + features)
    xa = jax.lax.dot_general(x, lora_a, ((axis, contract), ((), ())))  # [..., rank]
    xa = xa * jnp.asarray(self.alpha / self.rank, xa.dtype)
    return y + jax.lax.dot_general(xa, lora_b, (((xa.ndim - 1,), (0,)), ((), ())))


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
  With `lora_rank` > 0 the projections named in `lora_targets` (fc1, fc2 or gate, up, down)
  get LoRA adapters (see LoraDenseGeneral).
  """

  mlp_dim: int
  act: str = "gelu"
  dropout: float = 0.0
  gated: bool = False
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora_rank: int = 0  # 0: no adapters
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ()  # projection names that get adapters

  @nn.compact
  def __call__(self, x_btd: jax.Array, deterministic: bool = True) -> jax.Array:
    width = x_btd.shape[-1]

    def dense(features: int, in_axis: str, out_axis: str, name: str) -> Dense:
      rank = self.lora_rank if name in self.lora_targets else 0
      return Dense(features, in_axis, out_axis, use_bias=self.use_bias, dtype=self.dtype,
                   param_dtype=self.param_dtype, lora_rank=rank, lora_alpha=self.lora_alpha,
                   name=name)

    if self.gated:
      gate_btm = dense(self.mlp_dim, "embed", "mlp", "gate")(x_btd)
      up_btm = dense(self.mlp_dim, "embed", "mlp", "up")(x_btd)
      h_btm = constrain(activation(self.act)(gate_btm) * up_btm, ("batch", "seq", "act_mlp"))
      h_btm = nn.Dropout(self.dropout)(h_btm, deterministic=deterministic)
      return dense(width, "mlp", "embed", "down")(h_btm)
    h_btm = dense(self.mlp_dim, "embed", "mlp", "fc1")(x_btd)
    h_btm = constrain(activation(self.act)(h_btm), ("batch", "seq", "act_mlp"))
    h_btm = nn.Dropout(self.dropout)(h_btm, deterministic=deterministic)
    return dense(width, "mlp", "embed", "fc2")(h_btm)
