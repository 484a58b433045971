"""Chunked cross-entropy against the plain path (the model's vocabulary Dense / tied `attend`
followed by `captioning_loss`), a float64 NumPy reference, gradients, masking, and a compiled
memory check that the [tokens, vocab] logits are never materialised."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax.losses.captioning import captioning_loss, token_nll
from vljax.losses.chunked_ce import chunked_captioning_loss, chunked_token_nll
from vljax.nn import Dense, TokenEmbed

BATCH, LENGTH, WIDTH, VOCAB = 3, 5, 8, 37
# B * T = 15 tokens: 4 and 7 leave a padded last chunk, 0 and 15 (and more) are one chunk.
CHUNKS = [2, 3, 1, 0, 5, 64]  # positions per chunk of T = 5
DTYPES = [jnp.float32, jnp.bfloat16]
# The chunked logits are the model's logits bit for bit, so chunked vs plain differs only in
# summation order of the reductions: tight in float32, a little looser in bfloat16.
RTOL_PLAIN = {jnp.float32: 1e-6, jnp.bfloat16: 1e-5}
# Against float64 logits: float32 rounding only; bfloat16 rounds inputs and logits (2^-8).
RTOL_FLOAT64 = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}
# Gradients: chunked accumulates the kernel gradient chunk by chunk (another summation order).
GRAD_TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-7), jnp.bfloat16: dict(rtol=2e-2, atol=1e-4)}


def _problem(seed, batch=BATCH, length=LENGTH, width=WIDTH, vocab=VOCAB):
  """float32 (hidden_btd, kernel_dv, targets_bt, mask_bt); about half the targets are the
  argmax so accuracy is not trivially 0, and row 1 is partly / row 2 wholly masked."""
  rng = np.random.default_rng(seed)
  hidden_btd = rng.standard_normal((batch, length, width)).astype(np.float32)
  kernel_dv = (2.0 * rng.standard_normal((width, vocab)) / np.sqrt(width)).astype(np.float32)
  logits_btv = hidden_btd.astype(np.float64) @ kernel_dv.astype(np.float64)
  targets_bt = rng.integers(0, vocab, (batch, length))
  targets_bt = np.where(rng.random((batch, length)) < 0.5, logits_btv.argmax(-1), targets_bt)
  lengths_b = np.minimum(np.array([length, 2, 0] + [length] * (batch - 3))[:batch], length)
  mask_bt = np.arange(length)[None] < lengths_b[:, None]
  return (jnp.asarray(hidden_btd), jnp.asarray(kernel_dv), jnp.asarray(targets_bt, jnp.int32),
          jnp.asarray(mask_bt))


def _dense_logits(hidden_btd, kernel_dv, dtype):
  """The model's untied head: vljax.nn Dense(vocab, use_bias=False, dtype=dtype)."""
  head = Dense(kernel_dv.shape[1], "embed", "vocab", use_bias=False, dtype=dtype)
  return head.apply({"params": {"dense": {"kernel": kernel_dv}}}, hidden_btd)


def _attend_logits(hidden_btd, table_vd, dtype):
  """The model's tied head: TokenEmbed(dtype=dtype).attend."""
  embed = TokenEmbed(table_vd.shape[0], table_vd.shape[1], dtype=dtype)
  return embed.apply({"params": {"embedding": table_vd}}, hidden_btd, method="attend")


def _plain_loss(hidden_btd, kernel, targets_bt, mask_bt, dtype, transpose_kernel=False):
  """captioning_loss of the full logits, as the model computes them."""
  if transpose_kernel:
    logits_btv = _attend_logits(hidden_btd, kernel, dtype)
  else:
    logits_btv = _dense_logits(hidden_btd, kernel, dtype)
  return captioning_loss(logits_btv, targets_bt, mask_bt)


def _float64_reference(hidden_btd, kernel_dv, targets_bt, mask_bt, dtype):
  """(loss, accuracy, tokens) in float64 from the inputs rounded to the compute dtype."""
  hidden = np.asarray(hidden_btd.astype(dtype).astype(jnp.float32), np.float64)
  kernel = np.asarray(kernel_dv.astype(dtype).astype(jnp.float32), np.float64)
  targets, mask = np.asarray(targets_bt), np.asarray(mask_bt, np.float64)
  logits = hidden @ kernel
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  correct = (logits.argmax(-1) == targets).astype(np.float64)
  return (nll * mask).sum() / mask.sum(), (correct * mask).sum() / mask.sum(), mask.sum()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_token_nll_matches_plain_logits(dtype, chunk_size):
  hidden, kernel, targets, _ = _problem(0)
  fn = jax.jit(lambda h, k, t: chunked_token_nll(h, k, t, chunk_size=chunk_size, dtype=dtype))
  nll_bt, correct_bt = fn(hidden, kernel, targets)
  logits_btv = _dense_logits(hidden, kernel, dtype)
  assert nll_bt.shape == correct_bt.shape == targets.shape
  assert nll_bt.dtype == jnp.float32 and correct_bt.dtype == jnp.bool_
  np.testing.assert_allclose(nll_bt, token_nll(logits_btv, targets), rtol=RTOL_PLAIN[dtype])
  np.testing.assert_array_equal(correct_bt, jnp.argmax(logits_btv, -1) == targets)
  assert np.asarray(correct_bt).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_loss_matches_plain_and_float64(dtype, chunk_size):
  hidden, kernel, targets, mask = _problem(1)
  loss, metrics = jax.jit(
      lambda h, k, t, m: chunked_captioning_loss(h, k, t, m, chunk_size=chunk_size,
                                                 dtype=dtype))(hidden, kernel, targets, mask)
  want_loss, want_metrics = _plain_loss(hidden, kernel, targets, mask, dtype)
  assert loss.dtype == jnp.float32
  assert set(metrics) == set(want_metrics) == {"cap_loss", "cap_accuracy", "cap_tokens"}
  np.testing.assert_allclose(loss, want_loss, rtol=RTOL_PLAIN[dtype])
  np.testing.assert_allclose(metrics["cap_loss"], loss, rtol=0)
  np.testing.assert_array_equal(metrics["cap_accuracy"], want_metrics["cap_accuracy"])
  np.testing.assert_array_equal(metrics["cap_tokens"], want_metrics["cap_tokens"])
  ref_loss, ref_accuracy, ref_tokens = _float64_reference(hidden, kernel, targets, mask, dtype)
  np.testing.assert_allclose(loss, ref_loss, rtol=RTOL_FLOAT64[dtype])
  assert metrics["cap_tokens"] == ref_tokens == 7
  if dtype == jnp.float32:  # bfloat16 logits may tie or swap a near argmax
    np.testing.assert_allclose(metrics["cap_accuracy"], ref_accuracy, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [2, 3, 0])
def test_gradients_match_plain(dtype, chunk_size):
  hidden, kernel, targets, mask = _problem(2)
  chunked = lambda h, k: chunked_captioning_loss(h, k, targets, mask, chunk_size=chunk_size,
                                                 dtype=dtype)[0]
  plain = lambda h, k: _plain_loss(h, k, targets, mask, dtype)[0]
  got_h, got_k = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, kernel)
  want_h, want_k = jax.jit(jax.grad(plain, argnums=(0, 1)))(hidden, kernel)
  assert got_h.dtype == hidden.dtype and got_k.dtype == kernel.dtype
  assert np.abs(np.asarray(got_k)).max() > 0
  np.testing.assert_allclose(got_h, want_h, **GRAD_TOL[dtype])
  np.testing.assert_allclose(got_k, want_k, **GRAD_TOL[dtype])


def test_masked_tokens_carry_no_loss_and_no_gradient():
  hidden, kernel, targets, mask = _problem(3)
  loss_fn = lambda h: chunked_captioning_loss(h, kernel, targets, mask, chunk_size=4)[0]
  noise = 100.0 * jax.random.normal(jax.random.key(0), hidden.shape)
  perturbed = jnp.where(mask[..., None], hidden, noise)
  np.testing.assert_allclose(jax.jit(loss_fn)(perturbed), jax.jit(loss_fn)(hidden), rtol=1e-6)
  grad_btd = np.asarray(jax.jit(jax.grad(loss_fn))(hidden))
  assert np.all(grad_btd[~np.asarray(mask)] == 0)
  assert np.all(np.abs(grad_btd[np.asarray(mask)]).sum(-1) > 0)


def test_all_masked_gives_zero_loss_not_nan():
  hidden, kernel, targets, _ = _problem(4)
  mask = jnp.zeros(targets.shape, bool)
  loss_fn = lambda h: chunked_captioning_loss(h, kernel, targets, mask, chunk_size=4)
  (loss, metrics), grad_btd = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(hidden)
  assert loss == 0 and metrics["cap_accuracy"] == 0 and metrics["cap_tokens"] == 0
  assert np.all(np.asarray(grad_btd) == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [2, 3, 0])
def test_tied_output_matches_attend(dtype, chunk_size):
  hidden, kernel, targets, mask = _problem(5)
  table_vd = kernel.T
  hidden = hidden.astype(dtype)  # the decoder output is in the compute dtype, as in CoCa
  nll_bt, correct_bt = jax.jit(
      lambda h, t, y: chunked_token_nll(h, t, y, chunk_size=chunk_size, dtype=dtype,
                                        transpose_kernel=True))(hidden, table_vd, targets)
  logits_btv = _attend_logits(hidden, table_vd, dtype)
  np.testing.assert_allclose(nll_bt, token_nll(logits_btv, targets), rtol=RTOL_PLAIN[dtype])
  np.testing.assert_array_equal(correct_bt, jnp.argmax(logits_btv, -1) == targets)
  # ... and equals the plain x @ table.T in the compute dtype.
  np.testing.assert_allclose(
      nll_bt, token_nll(hidden @ table_vd.astype(dtype).T, targets), rtol=RTOL_PLAIN[dtype])
  chunked = lambda h, t: chunked_captioning_loss(h, t, targets, mask, chunk_size=chunk_size,
                                                 dtype=dtype, transpose_kernel=True)
  plain = lambda h, t: _plain_loss(h, t, targets, mask, dtype, transpose_kernel=True)
  value_and_grads = lambda fn: jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(
      hidden.astype(jnp.float32), table_vd)
  (loss, metrics), grads = value_and_grads(chunked)
  (want_loss, want_metrics), want_grads = value_and_grads(plain)
  np.testing.assert_allclose(loss, want_loss, rtol=RTOL_PLAIN[dtype])
  np.testing.assert_array_equal(metrics["cap_accuracy"], want_metrics["cap_accuracy"])
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, **GRAD_TOL[dtype])


def test_token_shapes_other_than_btd():
  hidden, kernel, targets, _ = _problem(6)
  flat_nll, flat_correct = chunked_token_nll(hidden.reshape(-1, WIDTH), kernel,
                                             targets.reshape(-1), chunk_size=4)
  nll_bt, correct_bt = chunked_token_nll(hidden, kernel, targets, chunk_size=4)
  np.testing.assert_array_equal(flat_nll.reshape(targets.shape), nll_bt)
  np.testing.assert_array_equal(flat_correct.reshape(targets.shape), correct_bt)
  empty_nll, empty_correct = chunked_token_nll(jnp.zeros((2, 0, WIDTH)), kernel,
                                               jnp.zeros((2, 0), jnp.int32), chunk_size=4)
  assert empty_nll.shape == empty_correct.shape == (2, 0)


def test_shape_errors():
  hidden, kernel, targets, mask = _problem(7)
  with pytest.raises(ValueError, match="hidden width 8"):
    chunked_token_nll(hidden, kernel[:-1], targets, chunk_size=4)
  with pytest.raises(ValueError, match="hidden width 8"):
    chunked_token_nll(hidden, kernel, targets, chunk_size=4, transpose_kernel=True)
  with pytest.raises(ValueError, match="2-D"):
    chunked_token_nll(hidden, kernel[None], targets, chunk_size=4)
  with pytest.raises(ValueError, match="targets shape"):
    chunked_token_nll(hidden, kernel, targets[:, :-1], chunk_size=4)
  with pytest.raises(ValueError, match="mask shape"):
    chunked_captioning_loss(hidden, kernel, targets, mask[:, :-1], chunk_size=4)


def test_backward_never_materialises_the_full_logits():
  """Compiled on CPU, grad of the plain loss keeps [N, V] float32 buffers (64 MiB each here);
  the chunked one only [B, chunk, V] blocks and the [D, V] kernel gradient."""
  tokens, width, vocab, chunk = 512, 64, 32768, 8  # chunks of [8 examples, 8 positions]
  hidden_btd = jax.ShapeDtypeStruct((8, tokens // 8, width), jnp.float32)
  kernel_dv = jax.ShapeDtypeStruct((width, vocab), jnp.float32)
  targets_bt = jax.ShapeDtypeStruct((8, tokens // 8), jnp.int32)
  mask_bt = jax.ShapeDtypeStruct((8, tokens // 8), jnp.bool_)

  def temp_bytes(loss_fn):
    grad_fn = jax.jit(jax.grad(lambda h, k, t, m: loss_fn(h, k, t, m)[0], argnums=(0, 1)))
    return grad_fn.lower(hidden_btd, kernel_dv, targets_bt, mask_bt).compile(
        ).memory_analysis().temp_size_in_bytes

  plain = temp_bytes(lambda h, k, t, m: captioning_loss(h @ k, t, m))
  chunked = temp_bytes(lambda h, k, t, m: chunked_captioning_loss(h, k, t, m, chunk_size=chunk))
  logits_bytes = tokens * vocab * 4
  print(f"temp bytes: plain {plain}, chunked {chunked}, full logits {logits_bytes}")
  assert plain >= logits_bytes
  assert chunked < plain / 4
  assert chunked < logits_bytes / 2
