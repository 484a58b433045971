"""Tests of the optimizer: which parameters get weight decay, learning-rate multipliers."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vljax.train.config import base_config, load_config
from vljax.train.loop import build_experiment
from vljax.train.optim import make_optimizer, param_paths, path_mask


def test_weight_decay_skips_biases_norms_embeddings_and_the_contrastive_scalars():
  config = load_config("siglip_tiny.py")
  params = build_experiment(config, devices=jax.devices()[:1]).abstract_state.params
  excluded = dict(zip(jax.tree.leaves(param_paths(params)),
                      jax.tree.leaves(path_mask(params, config.optim.wd_exclude))))
  for path, skip in excluded.items():
    name = path.split("/")[-1]
    assert skip == (name in ("bias", "scale", "pos_embedding", "t", "b")), path
  assert excluded["t"] and excluded["b"] and any(p.endswith("kernel") for p in excluded)


def _one_update(multipliers):
  cfg = base_config().optim
  cfg.weight_decay, cfg.warmup_steps, cfg.schedule = 0.0, 0, "constant"
  cfg.lr_multipliers = multipliers
  params = {"t": jnp.zeros(()), "img": {"kernel": jnp.zeros((2,))}}
  tx, _, _ = make_optimizer(cfg, params, total_steps=10)
  grads = {"t": jnp.ones(()), "img": {"kernel": jnp.ones((2,))}}
  updates, _ = tx.update(grads, tx.init(params), params)
  return jax.device_get(optax.apply_updates(params, updates))


def test_lr_multipliers_scale_only_the_matching_parameters():
  plain = _one_update(())
  scaled = _one_update((("t", 10.0),))
  np.testing.assert_allclose(scaled["t"], 10 * plain["t"], rtol=1e-6)
  np.testing.assert_array_equal(scaled["img"]["kernel"], plain["img"]["kernel"])
  assert plain["t"] == pytest.approx(-1e-3, rel=1e-3)  # Adam's first step is -lr * sign(g)
  with pytest.raises(ValueError, match="matches no parameter path"):
    _one_update((("nothing_here", 2.0),))
