"""The language-model families ("lm": decoder-only, "t5": prefix-LM encoder-decoder), the text
view they train on, and the perplexity evaluator's pooled sums and text-only samples."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax.data import captions
from vljax.data.pipeline import data_config, global_batch, train_iterator
from vljax.data.shapes import ShapesWorld
from vljax.data.shapes_text import ShapesCaptions, caption_nll
from vljax.data.tokenizer import shapes_tokenizer
from vljax.data.views import CaptionView, TextView
from vljax.errors import ConfigError
from vljax.evals.pictures import plot_samples
from vljax.families import get_family
from vljax.families.lm import prefix_split
from vljax.train.config import base_config, load_config
from vljax.train.evaluation import Evaluation
from vljax.train.loop import build_experiment

CAPTION = "a large red circle at the top left and a small blue star."


@pytest.fixture(scope="module")
def tokenizer():
  return shapes_tokenizer()


def lm_config(family="lm", steps=4, **data):
  c = base_config()
  c.family = family
  c.total_steps, c.batch_size, c.log_every, c.eval_every, c.checkpoint_every = steps, 16, 1, 0, 0
  if family == "lm":
    c.model = dict(variant="mu", recipe="llama")
  else:
    c.model = dict(variant="mu")
    data.setdefault("view_settings", dict(prefix_words=-1))
  c.data = dict(view="text", max_text_len=33, text_bos=True, **data)
  c.optim.lr, c.optim.warmup_steps = 3e-3, 0
  c.evals = dict(lm=dict(type="perplexity", view="text", examples=20, batch_size=8))
  return c


def test_text_view_masks(tokenizer):
  record = {"caption": CAPTION, "index": 7}
  plain = TextView(tokenizer, 33).map(record)
  as_caption = CaptionView(tokenizer, 33).map(
      {"caption": CAPTION, "image": np.zeros((8, 8, 3), np.uint8)})
  for key in ("text", "mask_ar", "mask_loss"):  # the caption view's text, without the image
    np.testing.assert_array_equal(plain[key], as_caption[key])
  assert set(TextView(tokenizer, 33).spec(4)) == {"text", "mask_ar", "mask_loss"}

  words = CAPTION.split()
  head = [tokenizer.bos_id] + tokenizer.tokenize(" ".join(words[:3]))
  rest = tokenizer.tokenize(" ".join(words[3:])) + [tokenizer.eos_id]
  split = TextView(tokenizer, 33, prefix_words=3).map(record)
  n, m = len(head), len(rest)
  np.testing.assert_array_equal(split["text"][:n + m], head + rest)
  np.testing.assert_array_equal(split["text"][:n + m], plain["text"][:n + m])  # same tokens
  np.testing.assert_array_equal(split["mask_ar"], [0] * n + [1] * (33 - n))
  np.testing.assert_array_equal(split["mask_loss"], [0] * n + [1] * m + [0] * (33 - n - m))

  randoms = [TextView(tokenizer, 33, prefix_words=-1).map({"caption": CAPTION, "index": i})
             for i in range(40)]
  prefixes = {int(np.sum(r["mask_ar"] == 0)) for r in randoms}
  assert len(prefixes) > 3 and min(prefixes) >= 2 and max(prefixes) <= len(plain["text"])
  again = TextView(tokenizer, 33, prefix_words=-1).map({"caption": CAPTION, "index": 5})
  np.testing.assert_array_equal(again["mask_ar"], randoms[5]["mask_ar"])  # fixed per record

  prompt = TextView(tokenizer, 33).prompt(record)
  assert int(prompt["prompt_len"]) == n and not prompt["mask_loss"].any()
  np.testing.assert_array_equal(prompt["text"][:n], head)


def test_caption_source_and_entropy_floor():
  world, text_only = ShapesWorld("validation"), ShapesCaptions("validation")
  assert text_only[3]["caption"] == world[3]["caption"] and "image" not in text_only[3]
  # A one-object "colours and shapes" caption ("a red circle.") is one of 48 pairs, one of 9
  # templates and one of 3 object counts.
  one = ShapesWorld("validation", min_objects=1, max_objects=1)
  index = captions.NUM_CAPTION_TEMPLATES * 3 + captions.FULL_CAPTION_TEMPLATES
  assert one[index]["caption"].count(" ") == 2
  assert caption_nll(one, index) == pytest.approx(math.log(9 * 48))


def _forward_numpy_nll(exp, state, batch):
  """float64 NumPy masked next-token NLL sum and count of an "lm" batch, from the logits."""
  text, mask_loss = np.asarray(batch["text"]), np.asarray(batch["mask_loss"])
  apply = jax.jit(lambda params, tokens: exp.bound.apply(params, tokens)["logits"])
  logits = np.asarray(apply(state.params, jnp.asarray(text[:, :-1])), np.float64)
  log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                     keepdims=True)) - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(log_probs, text[:, 1:, None], axis=-1)[..., 0]
  weights = mask_loss[:, 1:].astype(np.float64)
  return float(np.sum(nll * weights)), float(np.sum(weights))


class _Params:
  """Parameters alone (no optimizer state), as a TrainState's `params`."""

  def __init__(self, exp):
    self.params = nn.meta.unbox(exp.bound.init(jax.random.key(0), exp.batch_spec))


def _data_batch(exp, seed=0):
  it = train_iterator(exp.data_cfg, exp.tokenizer, seed=seed,
                      global_batch_size=exp.config.batch_size)
  return {k: v for k, v in next(it).items() if k in exp.batch_spec}


def test_lm_loss_is_the_masked_next_token_nll(tokenizer):
  exp = build_experiment(lm_config(), devices=jax.devices()[:1], tokenizer=tokenizer)
  with exp.context():
    state = _Params(exp)
    batch = _data_batch(exp)
    batch["mask_loss"][:4, 1:6] = 0  # some scored tokens left out
    nll, tokens = _forward_numpy_nll(exp, state, batch)
    loss, metrics = jax.jit(exp.bound.loss)(state.params, batch, jax.random.key(0))
    assert float(metrics["cap_tokens"]) == tokens
    np.testing.assert_allclose(float(loss), nll / tokens, rtol=1e-5)
    exp.config.loss.ce_chunk_len = 8  # chunked cross-entropy: the same loss
    chunked, _ = jax.jit(exp.bound.loss)(state.params, batch, jax.random.key(0))
    np.testing.assert_allclose(float(chunked), nll / tokens, rtol=1e-5)


def test_t5_loss_is_the_prefix_lm_nll_row_by_row(tokenizer):
  exp = build_experiment(lm_config("t5"), devices=jax.devices()[:1], tokenizer=tokenizer)
  with exp.context():
    state = _Params(exp)
    batch = {k: v[:3] for k, v in _data_batch(exp).items()}
    loss, metrics = jax.jit(exp.bound.loss)(state.params, batch, jax.random.key(0))
    apply = jax.jit(lambda params, encoder, decoder: exp.bound.apply(params, encoder,
                                                                     decoder)["logits"][0])
    total, count = 0.0, 0.0
    for text, mask_ar, mask_loss in zip(batch["text"], batch["mask_ar"], batch["mask_loss"]):
      prefix = int(np.argmax(mask_ar != 0))  # the encoder reads exactly the prefix, unmasked
      suffix = text[prefix:][mask_loss[prefix:] == 1]
      decoder = np.zeros(len(text), np.int32)  # causal: what follows the suffix changes nothing
      decoder[1:len(suffix)] = suffix[:-1]
      logits = np.asarray(apply(state.params, jnp.asarray(text[None, :prefix]),
                                jnp.asarray(decoder[None])), np.float64)[:len(suffix)]
      top = logits.max(-1, keepdims=True)
      log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
      total -= float(np.sum(log_probs[np.arange(len(suffix)), suffix]))
      count += len(suffix)
    assert float(metrics["cap_tokens"]) == count
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)


def test_prefix_split_moves_the_continuation_to_the_front():
  text = np.array([[2, 5, 6, 7, 3, 0], [2, 5, 6, 7, 8, 3]], np.int32)
  mask_ar = np.array([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]], np.int32)
  mask_loss = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], np.int32)
  out = jax.tree.map(np.asarray, prefix_split(text, mask_ar, mask_loss, start_id=0))
  np.testing.assert_array_equal(out["encoder_mask"][:, :3], [[1, 1, 0], [1, 0, 0]])
  np.testing.assert_array_equal(out["targets"][0, :3], [6, 7, 3])
  np.testing.assert_array_equal(out["weights"][0], [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(out["decoder"][1], [0, 5, 6, 7, 8])
  np.testing.assert_array_equal(out["weights"][1], [1, 1, 1, 1, 1])


def test_t5_needs_a_prefix(tokenizer):
  with pytest.raises(ConfigError, match="prefix_words"):
    build_experiment(lm_config("t5", view_settings={}), devices=jax.devices()[:1],
                     tokenizer=tokenizer)


def test_perplexity_pools_sums_over_the_whole_set_and_samples_completions(tokenizer, tmp_path):
  exp = build_experiment(lm_config(), devices=jax.devices()[:1], tokenizer=tokenizer)
  with exp.context():
    state = exp.init()
    evaluation = Evaluation(exp, exp.config.evals)
    metrics = evaluation.run(state.params)  # 20 examples in batches of 8: the last one padded
    inputs = evaluation.evaluators[0].inputs
    nll, tokens = _forward_numpy_nll(exp, state, inputs)
    assert metrics["lm/perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert 0 <= metrics["lm/token_accuracy"] <= 1
    images, lines = evaluation.samples(state.params, count=4)
  assert images.shape == (4, 0, 0, 3) and lines[0][0].startswith("prompt: ")
  assert lines[0][1].startswith("greedy: " + lines[0][0][len("prompt: "):])
  plot_samples(images, lines, str(tmp_path / "samples.png"))
  assert (tmp_path / "samples.png").stat().st_size > 0


@pytest.mark.parametrize("family", ["lm", "t5"])
def test_training_lowers_the_loss(family, tokenizer):
  exp = build_experiment(lm_config(family, steps=40), devices=jax.devices()[:1],
                         tokenizer=tokenizer)
  with exp.context():
    state = exp.init()
    it = train_iterator(exp.data_cfg, exp.tokenizer, seed=0, global_batch_size=16)
    losses = []
    for _ in range(40):
      local = {k: v for k, v in next(it).items() if k in exp.batch_spec}
      state, metrics = exp.train_step(state, global_batch(local, exp.mesh, exp.rules))
      losses.append(float(metrics["train/loss"]))
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_paper_config_builds_at_its_published_size():
  config = load_config("lm_vicuna7b.py")
  config.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  exp = build_experiment(config, devices=jax.devices()[:1])
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(exp.abstract_state.params))
  assert count == pytest.approx(6.74e9, rel=0.01)
  assert data_config(config.data).view == "text" and get_family("lm").views == ("text",)
