"""The family contract: one name for the model, derived fields that cannot silently disagree,
the contrastive loss chosen in one place, images normalised in one place, predict functions by
name, and the batch spec checked against the pipeline's batches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.helpers import random_batch, tiny_config
from vljax.data.pipeline import check_batch
from vljax.data.tokenizer import shapes_tokenizer
from vljax.errors import ConfigError
from vljax.families import FAMILIES, PREDICT_FUNCTIONS, Family, get_family, model_config
from vljax.losses.contrastive import sigmoid_loss, softmax_loss
from vljax.train.evaluation import Evaluation
from vljax.train.loop import build_experiment


def coca_config(**changes):
  config = tiny_config(family="coca", **changes)
  config.model = dict(image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8),
                      width=32, num_heads=2, mlp_dim=64, unimodal_depth=1, multimodal_depth=1,
                      num_caption_queries=4)
  config.data = dict(image_size=32, max_text_len=17, text_bos=True)
  return config


def test_every_family_declares_known_predict_functions_and_views():
  for name, family in FAMILIES.items():
    assert family.name == name and get_family(name) is family
    assert set(family.predict) <= set(PREDICT_FUNCTIONS)
    # Families that see images train on captions, the language models on their text.
    assert ("text" if name in ("lm", "t5") else "caption") in family.views
  with pytest.raises(ValueError, match="unknown predict function"):
    Family("x", object, lambda c, t: {}, lambda b: (), lambda *a: None, lambda *a: None,
           predict={"embed": None})
  with pytest.raises(ValueError, match=r"config\.family='flamingo'; choose one of "
                                       r"\['coca', 'llava', 'lm', 't5', 'two_tower'\]"):
    get_family("flamingo")


def test_config_family_alone_names_the_model():
  config = tiny_config()
  config.model.name = "coca"
  with pytest.raises(ConfigError, match=r"config\.model\.name='coca': remove it; "
                                        r"config\.family='two_tower' alone chooses the model \(TwoTower\)"):
    model_config(get_family("two_tower"), config, shapes_tokenizer())


def test_derived_model_fields_cannot_disagree_silently():
  tok = shapes_tokenizer()
  family = get_family("two_tower")
  fields = model_config(family, tiny_config(), tok)
  assert fields["text"]["vocab_size"] == tok.vocab_size and fields["text"]["pad_id"] == tok.pad_id
  assert fields["contrastive"] == "softmax" and fields["text"]["max_len"] == 16
  config = tiny_config()
  config.model.contrastive = "sigmoid"
  with pytest.raises(ConfigError, match=r"config\.model\.contrastive='sigmoid' disagrees with "
                                        r"config\.loss\.contrastive \('softmax'\); remove"):
    model_config(family, config, tok)
  config = tiny_config()
  config.model.text.pad_id = tok.pad_id + 1
  with pytest.raises(ConfigError, match=r"config\.model\.text\.pad_id=.* disagrees with the tokenizer"):
    model_config(family, config, tok)
  config = tiny_config()
  config.model.text.vocab_size = tok.vocab_size - 1
  with pytest.raises(ConfigError, match=r"config\.model\.text\.vocab_size=.* is smaller than"):
    model_config(family, config, tok)
  config.model.text.vocab_size = 256  # a padded vocabulary is fine
  assert model_config(family, config, tok)["text"]["vocab_size"] == 256
  config = coca_config()
  assert model_config(get_family("coca"), config, tok)["max_len"] == 16  # decoder inputs


@pytest.mark.parametrize("contrastive", ["softmax", "sigmoid"])
def test_the_contrastive_loss_follows_config_loss(contrastive):
  config = tiny_config(loss=contrastive)
  exp = build_experiment(config)
  bound = exp.bound
  params = exp.init_params(jax.random.key(0))
  batch = random_batch(config)
  loss, metrics = bound.loss(params, batch, jax.random.key(1))
  images = (batch["image"].astype(np.float32) / 255 - 0.5) / 0.5  # the data's mean and std
  out = bound.model.apply({"params": params}, images, batch["text"])
  if contrastive == "sigmoid":
    want, _ = sigmoid_loss(out["zimg"], out["ztxt"], out["scale"], out["bias"])
    assert "b" in metrics
  else:
    want, _ = softmax_loss(out["zimg"], out["ztxt"], out["scale"])
    assert "bias" not in out and "b" not in metrics
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_predict_functions_by_name_and_a_clear_error_for_a_missing_one():
  config = coca_config()
  exp = build_experiment(config)
  params = exp.init_params(jax.random.key(0))
  batch = random_batch(config)
  zimg = exp.bound.predict("embed_images", params, {"image": batch["image"]})
  ztxt = exp.bound.predict("embed_texts", params, {"text": batch["text"]})
  assert zimg.shape == ztxt.shape == (config.batch_size, 32)
  np.testing.assert_allclose(jnp.linalg.norm(zimg, axis=-1), 1.0, rtol=1e-5)
  nll = exp.bound.predict("token_nll", params, batch)
  loss, metrics = exp.bound.loss(params, batch, jax.random.key(1))
  # The captioning loss is the token-weighted mean of the per-example sums.
  np.testing.assert_allclose(nll["nll"].sum() / nll["tokens"].sum(), metrics["cap_loss"], rtol=1e-5)
  two_tower = build_experiment(tiny_config())
  with pytest.raises(ValueError, match=r"family 'two_tower' has no predict function 'generate'; "
                                       r"it has \['embed_images', 'embed_texts'\]"):
    two_tower.bound.predict("generate", params, batch)


def test_a_batch_that_does_not_match_the_spec_names_the_field():
  config = tiny_config()
  exp = build_experiment(config)
  batch = random_batch(config)
  check_batch(batch, exp.batch_spec, 1, "two_tower")
  half = {k: v[:8] for k, v in batch.items()}
  check_batch(half, exp.batch_spec, 2, "two_tower")  # one of two processes
  wrong = dict(batch, text=batch["text"][:, :-1])
  with pytest.raises(ValueError, match=r"batch field 'text' is int32\[16, 15\] but the batch spec "
                                       r"says int32\[16, 16\] per process"):
    check_batch(wrong, exp.batch_spec, 1, "two_tower")
  with pytest.raises(ValueError, match=r"lack field 'mask_loss'"):
    check_batch({k: v for k, v in batch.items() if k != "mask_loss"}, exp.batch_spec, 1, "two_tower")
  with pytest.raises(ValueError, match=r"have field 'boxes', which is not in the batch spec"):
    check_batch(dict(batch, boxes=np.zeros((16, 4))), exp.batch_spec, 1, "two_tower")
  with pytest.raises(ValueError, match=r"batch field 'image' is float32"):
    check_batch(dict(batch, image=batch["image"].astype(np.float32)), exp.batch_spec, 1, "two_tower")


def test_a_view_the_family_does_not_train_on_is_refused():
  config = tiny_config()
  config.data.view = "vqa"
  with pytest.raises(ConfigError, match=r"config\.data\.view='vqa': family 'two_tower' trains on 'caption'"):
    build_experiment(config)


def test_an_evaluator_the_family_cannot_serve_stops_the_build_naming_it():
  """Checked in build_experiment, before any parameter or evaluation set exists."""
  config = tiny_config()
  config.evals = dict(captioning=dict(type="captioning", images=8))
  with pytest.raises(ConfigError, match=r"config\.evals\.captioning \(type 'captioning'\) needs "
                                        r"predict function\(s\) generate, which family 'two_tower' "
                                        r"does not have \(it has embed_images, embed_texts\)"):
    build_experiment(config)
  config = coca_config()
  config.evals = dict(fewshot=dict(type="fewshot"))
  with pytest.raises(ConfigError, match=r"config\.evals\.fewshot \(type 'fewshot'\) prompts with the "
                                        r"'interleaved' view, which family 'coca' does not train on"):
    build_experiment(config)


def test_samples_come_from_evaluators_with_images_and_never_crash_without_one():
  config = coca_config()
  config.evals = dict(perplexity=dict(type="perplexity", examples=4, batch_size=4))
  exp = build_experiment(config)
  params = exp.init_params(jax.random.key(0))
  with exp.context():
    assert Evaluation(exp, config.evals).samples(params) is None  # nothing to show: no picture
