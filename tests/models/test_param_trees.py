"""Checkpoint compatibility: the parameter trees of small TwoTower and CoCa models (every path,
shape, logical axis names, and the mean / std of its initial value from key 0) are pinned in
param_trees.json. A refactoring of the models must leave them unchanged, so that existing
checkpoints still load and fresh runs start from the same weights. Change the file only when
breaking checkpoint compatibility on purpose."""
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax.models.coca import CoCa
from vljax.models.two_tower import TwoTower

PINNED = json.loads((pathlib.Path(__file__).parent / "param_trees.json").read_text())
IMAGES = jnp.zeros((2, 16, 16, 3))
TOKENS = jnp.ones((2, 7), jnp.int32)
MODELS = {
    # MAP-pooled image tower, scanned text tower, SigLIP's bias.
    "two_tower_sigmoid": lambda: TwoTower(
        image=dict(variant="mu/8", pool="map"),
        text=dict(vocab_size=23, variant="mu", max_len=8, scan=True),
        embed_dim=16, contrastive="sigmoid"),
    # CLS-pooled image tower, bidirectional MAP-pooled text tower.
    "two_tower_softmax": lambda: TwoTower(
        image=dict(variant="mu/8", pool="cls"),
        text=dict(vocab_size=23, variant="mu", max_len=8, causal=False, pool="map"),
        embed_dim=16),
    "coca": lambda: CoCa(variant="mu", vocab_size=23, max_len=10, embed_dim=8),
    "coca_scanned_tied": lambda: CoCa(variant="mu", vocab_size=23, max_len=10, scan=True,
                                      tied_output=True),
}


def _leaves(model: nn.Module) -> dict[str, list]:
  """path -> [shape, logical axis names, mean, std] of the initial parameters."""
  boxed = jax.jit(model.init)(jax.random.key(0), IMAGES, TOKENS)["params"]
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  specs = dict(jax.tree_util.tree_flatten_with_path(nn.get_partition_spec(boxed),
                                                    is_leaf=is_spec)[0])
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))[0]:
    value = np.asarray(value, np.float64)
    out["/".join(p.key for p in path)] = [list(value.shape), list(specs[path]),
                                          float(value.mean()), float(value.std())]
  return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_tree_is_pinned(name):
  got, want = _leaves(MODELS[name]()), PINNED[name]
  assert sorted(got) == sorted(want), (
      f"paths changed: missing {sorted(set(want) - set(got))}, new {sorted(set(got) - set(want))}")
  for path, (shape, names, mean, std) in want.items():
    assert got[path][:2] == [shape, names], f"{path}: {got[path][:2]} != {[shape, names]}"
    np.testing.assert_allclose(got[path][2:], [mean, std], rtol=1e-5, atol=2e-7, err_msg=path)
