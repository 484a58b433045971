"""Captioning loss against a float64 NumPy cross-entropy, padding handling, and the
input/target shift."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax.losses.captioning import captioning_loss, decoder_input_length, next_token_targets

PAD = 0


def reference(logits_btv, targets_bt, mask_bt):
  """Float64 masked mean of -log softmax(logits)[target], token accuracy and token count."""
  logits = np.asarray(logits_btv, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, targets_bt[..., None], -1)[..., 0]
  weight = mask_bt.astype(np.float64)
  correct = (logits.argmax(-1) == targets_bt).astype(np.float64)
  return (nll * weight).sum() / weight.sum(), (correct * weight).sum() / weight.sum(), weight.sum()


def _example(seed, dtype):
  rng = np.random.default_rng(seed)
  batch, length, vocab = 4, 6, 11
  logits = jnp.asarray(3.0 * rng.standard_normal((batch, length, vocab)), dtype)
  targets = rng.integers(1, vocab, (batch, length))
  lengths = np.array([6, 3, 0, 1])  # row 2 is all padding
  targets = np.where(np.arange(length)[None] < lengths[:, None], targets, PAD)
  return logits, targets, targets != PAD


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_loss_matches_float64_reference(dtype):
  logits, targets, mask = _example(0, dtype)
  loss, metrics = jax.jit(captioning_loss)(logits, jnp.asarray(targets), jnp.asarray(mask))
  # The reference sees exactly the values the loss sees (bfloat16 logits upcast).
  want_loss, want_accuracy, want_tokens = reference(np.asarray(logits.astype(jnp.float32)),
                                                    targets, mask)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["cap_loss"], want_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["cap_accuracy"], want_accuracy, rtol=1e-6)
  assert metrics["cap_tokens"] == want_tokens == 10


def test_padding_carries_no_loss_and_no_gradient():
  logits, targets, mask = _example(1, jnp.float32)
  noise = 100.0 * jax.random.normal(jax.random.key(0), logits.shape)
  perturbed = jnp.where(jnp.asarray(mask)[..., None], logits, noise)
  loss_fn = lambda x: captioning_loss(x, jnp.asarray(targets), jnp.asarray(mask))[0]
  np.testing.assert_allclose(loss_fn(perturbed), loss_fn(logits), rtol=1e-6)
  grad = jax.grad(loss_fn)(logits)
  assert np.all(np.asarray(grad)[~mask] == 0)
  assert np.all(np.abs(np.asarray(grad)[mask]).sum(-1) > 0)


def test_all_padding_gives_zero_loss_not_nan():
  loss, metrics = captioning_loss(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32),
                                  jnp.zeros((2, 3), bool))
  assert float(loss) == 0.0 and float(metrics["cap_tokens"]) == 0.0


def test_next_token_targets_shift_and_weight_by_mask_loss():
  bos, eos = 2, 1
  text = jnp.array([[bos, 7, 8, 9, eos, PAD],
                    [bos, 5, eos, PAD, PAD, PAD]])
  # The second row is a prompt (BOS 5) and an answer (EOS): only the answer is scored.
  mask_loss = jnp.array([[0, 1, 1, 1, 1, 0],
                         [0, 0, 1, 0, 0, 0]])
  inputs, targets, weights = next_token_targets(text, mask_loss)
  np.testing.assert_array_equal(inputs, [[bos, 7, 8, 9, eos], [bos, 5, eos, PAD, PAD]])
  np.testing.assert_array_equal(targets, [[7, 8, 9, eos, PAD], [5, eos, PAD, PAD, PAD]])
  np.testing.assert_array_equal(weights, [[1, 1, 1, 1, 0], [0, 1, 0, 0, 0]])
  assert weights.dtype == bool and inputs.shape[1] == decoder_input_length(text.shape[1])
