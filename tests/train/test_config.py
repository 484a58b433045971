"""Config validation: unknown keys fail before anything is built, naming the key; every shipped
config loads, validates and builds its model abstractly."""
import os
import subprocess
import sys

import jax
import pytest

from vljax.data.pipeline import data_config
from vljax.train.config import CONFIG_DIR, base_config, load_config, resolve_config_path, validate
from vljax.train.evaluation import eval_config
from vljax.train.loop import build_experiment

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))


def test_unknown_top_level_and_nested_keys_are_named():
  c = base_config()
  c.totl_steps = 5
  with pytest.raises(ValueError, match=r"config\.totl_steps; did you mean config\.total_steps"):
    validate(c)
  c = base_config()
  c.optim.lrr = 0.1
  with pytest.raises(ValueError, match=r"config\.optim\.lrr"):
    validate(c)
  c = base_config()
  c.data = dict(image_sise=32)
  with pytest.raises(ValueError, match=r"config\.data\.image_sise"):
    build_experiment(c)


def test_wrong_type_is_named():
  c = base_config()
  with pytest.raises(TypeError, match="total_steps"):  # ConfigDict keeps each field's type
    c.total_steps = "ten"
  c.total_steps = -1
  with pytest.raises(ValueError, match="config.total_steps must be a non-negative int"):
    validate(c)


def test_bare_names_resolve_to_experiments_configs():
  assert resolve_config_path("clip_tiny.py") == os.path.join(CONFIG_DIR, "clip_tiny.py")
  assert resolve_config_path("clip_tiny") == os.path.join(CONFIG_DIR, "clip_tiny.py")
  with pytest.raises(FileNotFoundError, match="clip_tny.py"):
    resolve_config_path("clip_tny.py")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_validates_and_builds(name):
  config = load_config(name)
  for key in ("total_steps", "log_every", "eval_every", "checkpoint_every", "seed"):
    assert key in config
  data_config(config.data)
  eval_config(config.evals)  # data and evals are free-form: their consumers validate them
  config.init.checkpoint = ""  # LiT's source checkpoint is not needed to build shapes
  config.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  exp = build_experiment(config, devices=jax.devices()[:1])
  assert jax.tree.leaves(exp.abstract_state.params)


def test_main_rejects_unknown_override_before_compiling():
  """`--config.optim.lrr=...` must fail fast, naming the key."""
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "main.py"), "--config=clip_tiny.py",
       "--config.optim.lrr=0.1", "--workdir=/nonexistent/never_created"],
      capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode != 0
  assert "lrr" in proc.stderr + proc.stdout
  assert not os.path.exists("/nonexistent/never_created")
