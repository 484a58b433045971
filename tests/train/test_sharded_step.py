"""A train step on several meshes gives the same loss and parameters as on one device.

Tolerance: float32 sums are reordered by sharding, so we allow rtol 1e-5 on the loss and
atol 2e-6 (with the learning rate 1e-3 after warm-up, i.e. ~0.2% of a step) on parameters.
"""
import jax
import numpy as np
import pytest

from tests.train.helpers import random_batch, tiny_config
from vljax.data.pipeline import global_batch
from vljax.train.loop import build_experiment


def run_steps(config, devices, num_steps=2):
  exp = build_experiment(config, devices=devices)
  specs = {str(s.spec) for s in jax.tree.leaves(exp.shardings.params)}
  for axis, size in config.mesh:
    if axis != "data" and size > 1:  # the mesh axis really partitions some parameters
      assert any(axis in spec for spec in specs), (axis, specs)
  losses = []
  with exp.context():
    state = exp.init()
    for i in range(num_steps):
      batch = global_batch(random_batch(config, seed=i), exp.mesh, exp.rules)
      state, metrics = exp.train_step(state, batch)
      losses.append(float(metrics["train/loss"]))
  return losses, jax.device_get(state.params)


MESHES = {
    "data8": [("data", 8), ("fsdp", 1), ("tensor", 1)],
    "data2_fsdp4": [("data", 2), ("fsdp", 4), ("tensor", 1)],
    "data4_tensor2": [("data", 4), ("fsdp", 1), ("tensor", 2)],
}


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_sharded_steps_equal_single_device(loss):
  config = tiny_config(loss=loss)
  config.mesh = [("data", 1), ("fsdp", 1), ("tensor", 1)]
  ref_losses, ref_params = run_steps(config, jax.devices()[:1])
  for name, mesh in MESHES.items():
    config = tiny_config(loss=loss)
    config.mesh = mesh
    losses, params = run_steps(config, jax.devices())
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-6, err_msg=name),
                 params, ref_params)
