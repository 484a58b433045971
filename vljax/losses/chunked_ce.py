"""Chunked token cross-entropy for large vocabularies: never holds the [tokens, vocab] logits.

The plain captioning path projects the decoder output to logits [B, T, V] (the model's
vocabulary Dense, or the tied embedding's `attend`) and then scores them with
`vljax.losses.captioning.captioning_loss`. With a big vocabulary those logits, and the
softmax the backward pass needs, dominate the activation memory. Here the sequence is cut into
chunks of `chunk_size` positions (every example's, so a sharded batch stays sharded) and scored
one chunk at a time: each chunk's logits are computed
exactly as the model computes them, reduced to a float32 NLL and an argmax hit, and dropped.
The per-chunk function is rematerialised (`jax.checkpoint`) so the backward pass recomputes
one [B, chunk, V] block at a time instead of storing all [B, T, V].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vljax.losses.captioning import captioning_from_sums, captioning_sums, token_nll


def _chunk_logits(hidden_cd: jax.Array, kernel: jax.Array, dtype, transpose_kernel: bool
                  ) -> jax.Array:
  """Logits [C, V] of one chunk, with the values and dtype of the model's logits.

  transpose_kernel=False: `kernel` is the [D, V] vocabulary Dense kernel; as flax's Dense
  (`vljax.nn.Dense`), inputs and kernel are cast to `dtype` (their promoted type if None).
  transpose_kernel=True: `kernel` is the [V, D] token-embedding table; as
  `TokenEmbed.attend`, only the table is cast to `dtype` (left as is if None) and the einsum
  promotes it with the hidden states.
  The product is accumulated in (at least) float32 and rounded once to the logits dtype, which
  is what the model's `dtype` matmul yields. Spelling the rounding out matters: XLA:CPU runs
  a 2-D bfloat16 dot in float32 and drops the rounding of its output, whereas the model's
  3-D dot keeps it, so a bare bfloat16 dot per chunk would not reproduce the model's logits.
  """
  if transpose_kernel:
    table_vd = kernel if dtype is None else jnp.asarray(kernel, dtype)
    logits_dtype = jnp.result_type(hidden_cd, table_vd)
    operand, contract = table_vd, (((1,), (1,)), ((), ()))
  else:
    logits_dtype = jnp.result_type(hidden_cd, kernel) if dtype is None else jnp.dtype(dtype)
    operand, contract = kernel, (((1,), (0,)), ((), ()))
  accumulate_dtype = jnp.promote_types(logits_dtype, jnp.float32)
  logits_cv = jax.lax.dot_general(jnp.asarray(hidden_cd, logits_dtype),
                                  jnp.asarray(operand, logits_dtype), contract,
                                  preferred_element_type=accumulate_dtype)
  return logits_cv.astype(logits_dtype)


def _validate(hidden_btd: jax.Array, kernel: jax.Array, targets_bt: jax.Array,
              transpose_kernel: bool) -> None:
  """Raises ValueError when the hidden width, kernel and targets do not fit together."""
  if hidden_btd.ndim < 1:
    raise ValueError(f"hidden must have a feature axis, got shape {hidden_btd.shape}")
  if kernel.ndim != 2:
    layout = "[V, D] embedding table" if transpose_kernel else "[D, V] kernel"
    raise ValueError(f"expected a 2-D {layout}, got shape {kernel.shape}")
  width = hidden_btd.shape[-1]
  kernel_width = kernel.shape[1] if transpose_kernel else kernel.shape[0]
  if width != kernel_width:
    axis = "kernel.shape[1] (table width)" if transpose_kernel else "kernel.shape[0]"
    raise ValueError(f"hidden width {width} (shape {hidden_btd.shape}) does not match "
                     f"{axis} = {kernel_width} (kernel shape {kernel.shape}, "
                     f"transpose_kernel={transpose_kernel})")
  if targets_bt.shape != hidden_btd.shape[:-1]:
    raise ValueError(f"targets shape {targets_bt.shape} does not match the hidden token "
                     f"shape {hidden_btd.shape[:-1]} (hidden shape {hidden_btd.shape})")


def chunked_token_nll(hidden_btd: jax.Array, kernel_dv: jax.Array, targets_bt: jax.Array, *,
                      chunk_size: int, dtype=None, transpose_kernel: bool = False
                      ) -> tuple[jax.Array, jax.Array]:
  """(nll_bt float32, correct_bt bool) of the targets under logits = hidden @ kernel, by chunks.

  hidden_btd: [..., T, D] decoder outputs; targets_bt: [..., T] token ids (the leading shape of
  hidden). kernel_dv: the [D, V] vocabulary kernel, or with `transpose_kernel=True` the
  [V, D] token-embedding table (tied output). `dtype` is the compute dtype of the projection,
  as the model's Dense / TokenEmbed `dtype` (see `_chunk_logits`): each chunk's logits equal
  the model's logits for those tokens. The NLL is `token_nll` (logsumexp - target logit in
  float32) and `correct` is argmax(logits) == target.

  The last token axis (the sequence) is cut into chunks of `chunk_size` positions, padded to a
  multiple of it (the padding is scored and sliced off, so it carries no value and no
  gradient); `chunk_size <= 0` or `>= T` scores everything as one chunk. The leading (batch)
  axes stay whole, so a batch sharded over devices stays sharded: no chunk lives on only some
  devices. Each chunk runs under `jax.checkpoint` inside `lax.map`, so forward and backward
  hold one [..., chunk, V] logits block, not [..., T, V]. Gradients flow to both hidden and
  kernel (the kernel's gradient is summed over chunks in its own dtype).
  """
  _validate(hidden_btd, kernel_dv, targets_bt, transpose_kernel)
  token_shape = targets_bt.shape
  if not token_shape or 0 in token_shape:
    return jnp.zeros(token_shape, jnp.float32), jnp.zeros(token_shape, bool)
  *lead, length = token_shape
  width = hidden_btd.shape[-1]
  chunk = length if chunk_size <= 0 or chunk_size >= length else chunk_size
  num_chunks = -(-length // chunk)
  padding = num_chunks * chunk - length
  if padding:
    hidden_btd = jnp.pad(hidden_btd, [(0, 0)] * len(lead) + [(0, padding), (0, 0)])
    targets_bt = jnp.pad(targets_bt, [(0, 0)] * len(lead) + [(0, padding)])
  # [..., K * C, D] -> [K, ..., C, D]: chunk k holds positions k * C .. (k + 1) * C - 1.
  hidden_kbcd = jnp.moveaxis(hidden_btd.reshape(*lead, num_chunks, chunk, width), -3, 0)
  targets_kbc = jnp.moveaxis(targets_bt.reshape(*lead, num_chunks, chunk), -2, 0)

  @jax.checkpoint
  def score_chunk(kernel, hidden_bcd, targets_bc):
    """NLL and argmax hits [..., C] of one chunk; its logits are recomputed on the backward
    pass rather than saved."""
    logits_nv = _chunk_logits(hidden_bcd.reshape(-1, width), kernel, dtype, transpose_kernel)
    targets_n = targets_bc.reshape(-1)
    correct_n = jnp.argmax(logits_nv, axis=-1) == targets_n
    return (token_nll(logits_nv, targets_n).reshape(targets_bc.shape),
            correct_n.reshape(targets_bc.shape))

  nll_kbc, correct_kbc = jax.lax.map(lambda xs: score_chunk(kernel_dv, *xs),
                                     (hidden_kbcd, targets_kbc))

  def unchunk(x_kbc):
    return jnp.moveaxis(x_kbc, 0, -2).reshape(*lead, num_chunks * chunk)[..., :length]

  return unchunk(nll_kbc), unchunk(correct_kbc)


def chunked_captioning_loss(hidden_btd: jax.Array, kernel_dv: jax.Array, targets_bt: jax.Array,
                            mask_bt: jax.Array, *, chunk_size: int, dtype=None,
                            transpose_kernel: bool = False
                            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`captioning_loss` of the logits hidden @ kernel, without materialising them.

  Same (loss, metrics) as `vljax.losses.captioning.captioning_loss(logits, targets, mask)`
  with the logits the model would produce (see `chunked_token_nll` for `kernel_dv`, `dtype`,
  `transpose_kernel` and `chunk_size`): loss is the NLL averaged over the tokens where
  `mask_bt` is True (denominator max(tokens, 1)); metrics: cap_loss, cap_accuracy
  (argmax == target over the counted tokens, stop_gradient), cap_tokens.
  """
  if mask_bt.shape != targets_bt.shape:
    raise ValueError(f"mask shape {mask_bt.shape} does not match targets shape "
                     f"{targets_bt.shape}")
  nll_bt, correct_bt = chunked_token_nll(hidden_btd, kernel_dv, targets_bt,
                                         chunk_size=chunk_size, dtype=dtype,
                                         transpose_kernel=transpose_kernel)
  return captioning_from_sums(captioning_sums(nll_bt, correct_bt, mask_bt))
