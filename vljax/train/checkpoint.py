"""Orbax checkpoints of the train state and the input iterator, written together.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves no checkpoint that `latest_step` would pick up. Restoring takes the target
shardings of the current mesh, so a checkpoint written on one mesh restores onto another.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves / restores {"state": TrainState, "data": grain iterator} under `workdir/checkpoints`."""

  def __init__(self, workdir: str, keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any | None = None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any, shardings: Any, data_iterator: Any | None = None):
    """Restores the state into `shardings` (and the iterator in place); returns the state."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, shardings)
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iterator is not None and "data" in self.manager.item_metadata(step):
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def close(self) -> None:
    self.manager.close()


def load_params(path: str) -> Any:
  """The parameter tree of a vljax checkpoint; `path` is a workdir, its checkpoints dir, or a step dir.

  Used to initialise part of a model from another run (LiT's locked image tower).
  """
  path = os.path.abspath(path)
  step_dir = path
  for directory in (path, os.path.join(path, "checkpoints")):
    steps = ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []
    if steps:
      step_dir = os.path.join(directory, str(max(steps)))
      break
  state_dir = os.path.join(step_dir, "state")
  if not os.path.isdir(state_dir):
    raise FileNotFoundError(f"No vljax checkpoint at {path!r} (looked for {state_dir})")
  logging.info("Loading parameters from %s", state_dir)
  # Only the parameters are read, onto this host's first device, whatever mesh wrote them.
  metadata = ocp.StandardCheckpointer().metadata(state_dir).item_metadata["params"]
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype),
                              target)
  restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
      item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
  return jax.device_get(restored["params"])
