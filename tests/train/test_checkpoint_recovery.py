"""Damaged checkpoints: the newest one that cannot be restored completely is reported and set
aside (never deleted), the run resumes from the newest complete one with the uninterrupted run's
losses; a checkpoint of another model or without input state is refused with a message."""
import glob
import json
import logging
import os
import shutil

import pytest

from tests.train.helpers import tiny_config
from vljax.train.checkpoint import DAMAGED_DIR, CheckpointError, Checkpointer
from vljax.train.loop import build_experiment, train_and_evaluate

STEPS = 9


def _config(**changes):
  """No evaluation: these tests read the training losses and the log only."""
  return tiny_config(total_steps=STEPS, log_every=1, checkpoint_every=3, keep_checkpoints=3,
                     evals={}, **changes)


def _losses(workdir) -> dict[int, float]:
  """step -> loss; a step logged twice (before the damage and after the resume) keeps the last."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A 9-step run with complete checkpoints at steps 3, 6 and 9."""
  workdir = str(tmp_path_factory.mktemp("finished"))
  train_and_evaluate(_config(), workdir)
  assert sorted(Checkpointer(workdir).manager.all_steps()) == [3, 6, 9]
  return workdir


def _largest_array_file(step_dir):
  return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
             key=os.path.getsize)


DAMAGE = {
    "array file deleted": lambda d: os.remove(_largest_array_file(d)),
    "array file truncated": lambda d: os.truncate(_largest_array_file(d), 100),
    "manifest deleted": lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
    "state item deleted": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "data item deleted": lambda d: shutil.rmtree(os.path.join(d, "data")),
}
EXPECTED_REASON = {
    "array file deleted": "of its files are missing",
    "array file truncated": "truncated or changed",
    "manifest deleted": "manifest.ocdbt",
    "state item deleted": "its state/ item is missing",
    "data item deleted": "its data/ item (the input iterator's position) is missing",
}


class _Lines(logging.Handler):
  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(finished_run, tmp_path, kind):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  DAMAGE[kind](os.path.join(workdir, "checkpoints", "9"))
  lines, logger = _Lines(), logging.getLogger("vljax")
  level = logger.level
  logger.addHandler(lines)
  logger.setLevel(logging.INFO)
  try:
    train_and_evaluate(_config(), workdir)
  finally:
    logger.removeHandler(lines)
    logger.setLevel(level)
  text = "\n".join(lines.lines)
  assert "The checkpoint at step 9 cannot be restored completely" in text
  assert EXPECTED_REASON[kind] in text
  assert "Resuming from the checkpoint at step 6" in text
  # Set aside, not deleted, with the reason next to it.
  kept = os.path.join(workdir, DAMAGED_DIR, "9")
  assert os.path.isdir(kept)
  with open(os.path.join(kept, "WHY_DAMAGED.txt")) as f:
    assert EXPECTED_REASON[kind] in f.read()
  resumed, uninterrupted = _losses(workdir), _losses(finished_run)
  for step in range(7, STEPS + 1):  # bitwise equal from the fallback on
    assert resumed[step] == uninterrupted[step], step
  assert Checkpointer(workdir).latest_step() == STEPS


def test_checkpoint_of_another_model_is_named_not_set_aside(finished_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  exp = build_experiment(_config(**{"model.embed_dim": 24}))
  with exp.context(), pytest.raises(CheckpointError, match=(
      r"holds the checkpoint of another model \(.*has shape .* in the checkpoint and .* in this "
      r"model\)\. Use a new --workdir")):
    Checkpointer(workdir).restore_latest(exp.abstract_state, exp.shardings)
  assert not os.path.exists(os.path.join(workdir, DAMAGED_DIR))


def test_checkpoint_without_input_state_is_refused_unless_the_data_order_restarts(finished_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  for step in (3, 6, 9):
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), "data"))
  exp = build_experiment(_config())
  inputs = _DummyInputs()
  with exp.context():
    with pytest.raises(CheckpointError, match=r"restart_data_order=True"):
      Checkpointer(workdir).restore_latest(exp.abstract_state, exp.shardings, inputs)
    assert sorted(Checkpointer(workdir).manager.all_steps()) == [3, 6, 9]  # nothing moved
    step, state = Checkpointer(workdir).restore_latest(exp.abstract_state, exp.shardings, inputs,
                                                       restart_data=True)
  assert step == 9 and int(state.step) == 9
  assert inputs.restored is None  # the input state starts again


class _DummyInputs:
  """Stands in for InputState; records whether a restore reached it."""

  restored = None

  def get_state(self):
    return b"{}"

  def set_state(self, state):
    self.restored = state
