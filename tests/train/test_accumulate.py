"""`config.microbatches = k` gives the whole batch's loss and gradients, for every kind of loss.

Tolerance (float32): the microbatched step sums the same float32 terms in another order, so the
loss agrees to rtol 1e-5 and each gradient element to rtol 1e-4 with an absolute floor of 1e-6
times the largest gradient element (some gradients, such as the attention key bias's, are zero up
to rounding, sums of cancelling terms).
"""
import flax.linen as nn
import jax
import numpy as np
import pytest

from tests.families.test_families import coca_config
from tests.train.helpers import random_batch, tiny_config
from vljax.data.pipeline import global_batch
from vljax.families.base import LossTerms
from vljax.losses.captioning import captioning_from_sums, logits_captioning_sums, next_token_targets
from vljax.models.lm import LM
from vljax.train.accumulate import (accumulated_value_and_grad, merge_microbatches,
                                    split_microbatches)
from vljax.train.loop import build_experiment


def ragged_batch(config, seed=0):
  """random_batch with texts of different lengths, so microbatches hold unequal token counts."""
  batch = random_batch(config, seed=seed)
  rng = np.random.default_rng(seed + 100)
  length = batch["text"].shape[1]
  ends = rng.integers(2, length, size=len(batch["text"]))
  keep = np.arange(length)[None] < ends[:, None]
  text = np.where(keep, batch["text"], 0).astype(np.int32)
  text[np.arange(len(text)), ends - 1] = 3  # eos
  return {**batch, "text": text, "mask_loss": (text != 0).astype(np.int32)}


def assert_same(got, want):
  (loss, metrics), grads = got
  (want_loss, want_metrics), want_grads = want
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for key in want_metrics:
    np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, atol=1e-7, err_msg=key)

  largest = max(np.abs(np.asarray(w)).max() for w in jax.tree.leaves(want_grads))
  assert largest > 0

  def close(path, g, w):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6 * largest,
                               err_msg=jax.tree_util.keystr(path))

  jax.tree_util.tree_map_with_path(close, grads, want_grads)


def family_value_and_grad(config, k):
  exp = build_experiment(config, devices=jax.devices()[:1])
  params = exp.init_params(jax.random.key(0))
  params = nn.meta.unbox(params)
  batch = ragged_batch(config)
  fn = jax.jit(lambda p, b: accumulated_value_and_grad(
      exp.bound.loss_terms, exp.bound.combine, p, b, jax.random.key(1), k))
  return fn(params, batch)


def test_split_and_merge_are_inverse_and_interleave():
  x = np.arange(12)
  parts = split_microbatches({"x": x}, 3)["x"]
  np.testing.assert_array_equal(parts[1], [1, 4, 7, 10])
  np.testing.assert_array_equal(merge_microbatches(parts), x)
  with pytest.raises(ValueError, match="a batch of 12 examples cannot be split into 5"):
    split_microbatches({"x": x}, 5)


@pytest.mark.parametrize("contrastive", ["softmax", "sigmoid"])
def test_two_tower_microbatches_equal_one_batch(contrastive):
  config = tiny_config(loss=contrastive)
  want = family_value_and_grad(config, 1)
  assert_same(family_value_and_grad(config, 4), want)


def test_coca_microbatches_equal_one_batch():
  """With the chunked cross-entropy (which equals full logits, test below)."""
  config = coca_config()
  config.loss.ce_chunk_len = 5
  want = family_value_and_grad(config, 1)
  assert_same(family_value_and_grad(config, 4), want)
  assert float(want[0][1]["cap_tokens"]) > 0


def test_coca_chunked_cross_entropy_equals_full_logits():
  config = coca_config()
  want = family_value_and_grad(config, 1)
  config.loss.ce_chunk_len = 5
  assert_same(family_value_and_grad(config, 1), want)


def test_decoder_lm_microbatches_equal_one_batch():
  model = LM(variant="mu", recipe="gpt2", vocab_size=50)  # the library's decoder-only LM
  batch = ragged_batch(tiny_config())
  params = model.init(jax.random.key(0), batch["text"][:1, :-1])["params"]

  def terms_fn(p, b, rng):  # pylint: disable=unused-argument
    inputs_bt, targets_bt, weights_bt = next_token_targets(b["text"], b["mask_loss"])
    logits = model.apply({"params": p}, inputs_bt)["logits"]
    return LossTerms({}, {}, logits_captioning_sums(logits, targets_bt, weights_bt))

  def combine(terms):
    return captioning_from_sums(terms.sums)

  batch = {"text": batch["text"], "mask_loss": batch["mask_loss"]}
  run = lambda k: jax.jit(lambda p: accumulated_value_and_grad(
      terms_fn, combine, p, batch, jax.random.key(0), k))(params)
  want = run(1)
  assert_same(run(2), want)
  assert_same(run(8), want)
  # Averaging the microbatches' mean losses would not be exact: the token counts differ.
  parts = split_microbatches(batch, 8)
  means = [float(combine(terms_fn(params, jax.tree.map(lambda x: x[m], parts), None))[0])
           for m in range(8)]
  assert abs(np.mean(means) - float(want[0][0])) > 1e-4


def test_microbatched_sharded_train_step_equals_one_batch_on_one_device():
  """The loop's CoCa step with config.microbatches=2 on 8 devices (fsdp) equals the plain step on
  one device: contrastive embeddings, shared scale and token sums all cross devices."""

  def step(microbatches, mesh, devices):
    config = coca_config()
    config.microbatches, config.mesh = microbatches, mesh
    exp = build_experiment(config, devices=devices)
    with exp.context():
      state = exp.init()
      batch = global_batch(ragged_batch(config), exp.mesh, exp.rules)
      state, metrics = exp.train_step(state, batch)
    return float(metrics["train/loss"]), jax.device_get(state.params)

  want_loss, want_params = step(1, [("data", 1), ("fsdp", 1), ("tensor", 1)], jax.devices()[:1])
  loss, params = step(2, [("data", 2), ("fsdp", 4), ("tensor", 1)], jax.devices())
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-6), params, want_params)
