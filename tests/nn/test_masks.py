"""attention_mask against a float64 NumPy reference, hand-written cases and MultiHeadAttention."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax.nn.attention import MultiHeadAttention, causal_mask
from vljax.nn.masks import attention_mask


def _reference(mask_ar, valid=None):
  """Loops over (query, key) pairs with float64 cumulative sums."""
  mask_ar = np.asarray(mask_ar, np.float64)
  batch, length = mask_ar.shape
  valid = np.ones((batch, length), bool) if valid is None else np.asarray(valid, bool)
  out = np.zeros((batch, 1, length, length), bool)
  for b in range(batch):
    block = np.cumsum(mask_ar[b])
    for i in range(length):
      for j in range(length):
        out[b, 0, i, j] = block[j] <= block[i] and valid[b, j]
  return out


def test_matches_reference_on_random_masks():
  rng = np.random.default_rng(0)
  mask_ar = rng.integers(0, 2, size=(5, 11))
  valid = rng.random((5, 11)) > 0.2
  for v in (None, valid):
    got = attention_mask(jnp.asarray(mask_ar), None if v is None else jnp.asarray(v))
    assert got.dtype == jnp.bool_ and got.shape == (5, 1, 11, 11)
    np.testing.assert_array_equal(np.asarray(got), _reference(mask_ar, v))
  jitted = jax.jit(attention_mask)(jnp.asarray(mask_ar), jnp.asarray(valid))
  np.testing.assert_array_equal(np.asarray(jitted), _reference(mask_ar, valid))


def test_hand_cases():
  causal = attention_mask(jnp.ones((1, 6), jnp.int32))
  np.testing.assert_array_equal(np.asarray(causal), np.asarray(causal_mask(6)))
  # Prefix-LM: three bidirectional prefix tokens, then three causal ones.
  prefix = np.asarray(attention_mask(jnp.array([[0, 0, 0, 1, 1, 1]])))[0, 0]
  expected = np.array([[1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 1, 0],
                       [1, 1, 1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(prefix, expected)
  # A leading 1 changes nothing (big_vision's note): every token's block just shifts by one.
  np.testing.assert_array_equal(np.asarray(attention_mask(jnp.array([[1, 0, 0, 1, 1, 1]])))[0, 0],
                                expected)
  # Blocks: [0 1] [2 3] [4 5 6] [7 8 9]; a block sees itself and all earlier blocks.
  blocks = np.asarray(attention_mask(jnp.array([[1, 0, 1, 0, 1, 0, 0, 1, 0, 0]])))[0, 0]
  block_of = np.array([0, 0, 1, 1, 2, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(blocks, block_of[None, :] <= block_of[:, None])
  # Padded keys are never attended, not even by the padding itself.
  padded = np.asarray(attention_mask(jnp.array([[0, 0, 1, 1]]),
                                     jnp.array([[True, True, True, False]])))[0, 0]
  np.testing.assert_array_equal(padded[:, 3], [False] * 4)
  np.testing.assert_array_equal(padded[3], [True, True, True, False])


def test_rejects_bad_shapes():
  with pytest.raises(ValueError, match="batch, length"):
    attention_mask(jnp.ones((4,), jnp.int32))
  with pytest.raises(ValueError, match="differ in shape"):
    attention_mask(jnp.ones((2, 4), jnp.int32), jnp.ones((2, 5), bool))


def test_prefix_lm_mask_in_multi_head_attention():
  """With the mask, a prefix output depends on later prefix tokens but never on the suffix."""
  mask_ar = jnp.array([[0, 0, 0, 1, 1, 1]])
  mask = attention_mask(mask_ar)
  x = jax.random.normal(jax.random.key(0), (1, 6, 8))
  module = MultiHeadAttention(num_heads=2)
  params = nn.meta.unbox(module.init(jax.random.key(1), x, None, mask)["params"])
  out = module.apply({"params": params}, x, None, mask)
  for j in range(6):
    changed = module.apply({"params": params}, x.at[0, j].add(1.0), None, mask)
    moved = np.abs(np.asarray(changed - out)).max(axis=-1)[0] > 1e-6
    expected = np.asarray(mask)[0, 0, :, j]  # exactly the queries that attend key j
    np.testing.assert_array_equal(moved, expected)
