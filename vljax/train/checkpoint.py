"""Orbax checkpoints of the train state and the input iterator, written together.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves no checkpoint that `latest_step` would pick up. Restoring takes the target
shardings of the current mesh, so a checkpoint written on one mesh restores onto another.

A checkpoint can still be damaged after it was written (a deleted or truncated array file, a
missing item). `Checkpointer.restore_latest` then reports it, moves it out of the way (never
deletes it: it is the user's data) and resumes from the newest checkpoint that restores
completely. A checkpoint written by another model is not damage: that stops the run, naming the
first parameter that differs.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from typing import Any, Iterator

import flax
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.experimental import multihost_utils

log = logging.getLogger("vljax")

DAMAGED_DIR = "damaged_checkpoints"  # next to `checkpoints/` in the workdir
FILE_LIST = "vljax_files.json"  # in each step: every file orbax wrote, with its size


class CheckpointError(ValueError):
  """A checkpoint that cannot be used for this run; the message says why and what to do."""


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
  """Silences orbax's absl warnings (e.g. "metadata file does not exist") for calls whose
  failures vljax reports itself."""
  previous = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(previous)


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  line = text[0].split(" See full TensorStore details")[0] if text else ""
  return f"{type(error).__name__}: {line[:200]}"


def _file_sizes(directory: str) -> dict[str, int]:
  sizes = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      sizes[os.path.relpath(path, directory)] = os.path.getsize(path)
  sizes.pop(FILE_LIST, None)
  return sizes


def _missing_or_changed(step_dir: str) -> str | None:
  """Compares a step's files with the list written when it was saved (cheap: sizes only), so
  deleted or truncated array files are found without asking TensorStore to read them."""
  listing = os.path.join(step_dir, FILE_LIST)
  if not os.path.isfile(listing):
    return None  # written by an older vljax: the restore itself will tell
  with open(listing) as f:
    expected = json.load(f)
  found = _file_sizes(step_dir)
  missing = sorted(set(expected) - set(found))
  if missing:
    return f"{len(missing)} of its files are missing (e.g. {missing[0]})"
  changed = sorted(k for k in expected if found[k] != expected[k])
  if changed:
    return (f"{len(changed)} of its files were truncated or changed (e.g. {changed[0]}: "
            f"{found[changed[0]]} bytes, {expected[changed[0]]} when saved)")
  return None


def _all_processes_agree(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _state_metadata(state_dir: str) -> dict:
  with quiet_orbax():
    return ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree


def _in_saved_dtypes(target_params: Any, saved: dict) -> Any:
  """Parameters are restored in the dtype they were saved in: frozen ones that config.init holds
  in bfloat16 stay bfloat16 after a resume."""
  flat = flax.traverse_util.flatten_dict(target_params, sep="/")
  found = flax.traverse_util.flatten_dict(saved.get("params", {}), sep="/")
  for key, leaf in flat.items():
    dtype = getattr(found.get(key), "dtype", None)
    if dtype is not None and dtype != leaf.dtype:
      flat[key] = jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf.sharding)
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def compare_params(saved: dict, abstract_params: Any) -> str | None:
  """None if a saved state's parameters match `abstract_params` (paths and shapes), else the
  first difference, in words. (Optimizer states are not compared: their saved layout differs.)"""
  expected = flax.traverse_util.flatten_dict(abstract_params, sep="/")
  found = flax.traverse_util.flatten_dict(saved.get("params", {}), sep="/")
  for key in sorted(expected):
    if key not in found:
      return f"{key} is in this model but not in the checkpoint"
    if tuple(found[key].shape) != tuple(expected[key].shape):
      return (f"{key} has shape {tuple(found[key].shape)} in the checkpoint and "
              f"{tuple(expected[key].shape)} in this model")
  extra = sorted(set(found) - set(expected))
  if extra:
    return f"{extra[0]} is in the checkpoint but not in this model"
  return None


class Checkpointer:
  """Saves / restores {"state": TrainState, "data": input state} under `workdir/checkpoints`."""

  def __init__(self, workdir: str, keep: int = 2):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, data_iterator: Any | None = None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self.manager.wait_until_finished()
    if jax.process_index() == 0:
      step_dir = self.step_dir(step)
      sizes = _file_sizes(step_dir)
      with open(os.path.join(step_dir, FILE_LIST + ".tmp"), "w") as f:
        json.dump(sizes, f, indent=0, sort_keys=True)
      os.replace(os.path.join(step_dir, FILE_LIST + ".tmp"), os.path.join(step_dir, FILE_LIST))

  def has_data(self, step: int) -> bool:
    """Whether step's checkpoint holds this process's input state."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return os.path.isfile(os.path.join(self.step_dir(step), "data", name))

  def restore(self, step: int, abstract_state: Any, shardings: Any, data_iterator: Any | None = None):
    """Restores the state into `shardings` (and the iterator in place); returns the state."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, shardings)
    target = target.replace(params=_in_saved_dtypes(
        target.params, _state_metadata(os.path.join(self.step_dir(step), "state"))))
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    with quiet_orbax():
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def _problem(self, step: int, abstract_state: Any, need_data: bool) -> str | None:
    """Why step's checkpoint cannot be restored completely (None if nothing is seen missing).

    Raises CheckpointError when it holds another model's state: no other step would do better.
    """
    state_dir = os.path.join(self.step_dir(step), "state")
    if not os.path.isdir(state_dir):
      return "its state/ item is missing"
    if need_data and not self.has_data(step):
      return "its data/ item (the input iterator's position) is missing"
    changed = _missing_or_changed(self.step_dir(step))
    if changed is not None:
      return changed
    try:
      saved = _state_metadata(state_dir)
    except Exception as e:  # pylint: disable=broad-except
      return f"its metadata cannot be read ({_first_line(e)})"
    difference = compare_params(saved, abstract_state.params)
    if difference is not None:
      raise CheckpointError(
          f"{self.workdir} holds the checkpoint of another model ({difference}). Use a new "
          "--workdir for this config, or rerun with the config that wrote it.")
    return None

  def set_aside(self, step: int, reason: str) -> str:
    """Moves a damaged step out of `checkpoints/` (so it is neither resumed from nor overwritten)
    into `workdir/damaged_checkpoints/`; returns the new path."""
    target = os.path.join(self.workdir, DAMAGED_DIR, str(step))
    if os.path.exists(target):
      target += time.strftime("-%Y%m%d-%H%M%S")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(self.step_dir(step), target)
      with open(os.path.join(target, "WHY_DAMAGED.txt"), "w") as f:
        f.write(reason + "\n")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"vljax_set_aside_{step}")
    self.manager.reload()
    return target

  def restore_latest(self, abstract_state: Any, shardings: Any, data_iterator: Any | None = None,
                     restart_data: bool = False) -> tuple[int, Any] | None:
    """(step, state) of the newest checkpoint that restores completely; None if there is none.

    Newer checkpoints that fail are reported and, once an older one restores, set aside. Without
    input state (`data/`) a checkpoint is incomplete, unless `restart_data`: then its model is
    restored and the input order starts again. If checkpoints exist but none restores, raises
    CheckpointError and moves nothing.
    """
    failed: list[tuple[int, str]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      problem = self._problem(step, abstract_state, data_iterator is not None)
      use_data = data_iterator is not None
      if problem is not None and "data/ item" in problem and restart_data:
        log.warning("The checkpoint at step %d has no input state; as config.restart_data_order "
                    "asks, its model is restored and the data order starts again.", step)
        problem, use_data = None, False
      if problem is None:
        try:
          state = self.restore(step, abstract_state, shardings, data_iterator if use_data else None)
          jax.block_until_ready(state)
          ok = True
        except Exception as e:  # pylint: disable=broad-except
          problem, ok = f"it could not be read ({_first_line(e)})", False
        if _all_processes_agree(ok):
          for bad_step, reason in failed:
            where = self.set_aside(bad_step, f"step {bad_step}: {reason}")
            log.warning("The checkpoint at step %d cannot be restored completely: %s. Moved it to "
                        "%s (kept, not deleted); resuming from step %d instead.", bad_step, reason,
                        where, step)
          return step, state
        problem = problem or "another process could not read its part"
      failed.append((step, problem))
    if not failed:
      return None
    listing = "; ".join(f"step {s}: {p}" for s, p in failed)
    hint = ("rerun with --config.restart_data_order=True to resume from the model of a checkpoint "
            "that lacks only its input state, or " if any("data/ item" in p for _, p in failed)
            else "")
    raise CheckpointError(f"No checkpoint in {self.directory} can be restored ({listing}). Nothing "
                          f"was changed: {hint}move {self.directory} away to start over.")

  def close(self) -> None:
    self.manager.close()


def load_params(path: str) -> Any:
  """The parameter tree of a vljax checkpoint; `path` is a workdir, its checkpoints dir, or a step dir.

  Used to initialise part of a model from another run (LiT's locked image tower). In a workdir or
  checkpoints dir, the newest step whose parameters can be read is used.
  """
  path = os.path.abspath(path)
  step_dirs = [path]
  for directory in (path, os.path.join(path, "checkpoints")):
    steps = ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []
    if steps:
      step_dirs = [os.path.join(directory, str(s)) for s in sorted(steps, reverse=True)]
      break
  failures = []
  for step_dir in step_dirs:
    state_dir = os.path.join(step_dir, "state")
    if not os.path.isdir(state_dir):
      failures.append(f"{state_dir} does not exist")
      continue
    try:
      params = _read_params(state_dir)
    except Exception as e:  # pylint: disable=broad-except
      failures.append(f"{state_dir}: {_first_line(e)}")
      continue
    if failures:
      log.warning("Skipped unreadable checkpoint(s): %s", "; ".join(failures))
    log.info("Loading parameters from %s", state_dir)
    return params
  raise FileNotFoundError(f"No readable vljax checkpoint at {path!r}: {'; '.join(failures)}")


def _read_params(state_dir: str) -> Any:
  # Only the parameters are read, onto this host's first device, whatever mesh wrote them.
  metadata = _state_metadata(state_dir)["params"]
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype),
                              target)
  with quiet_orbax():
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
  return jax.device_get(restored["params"])
