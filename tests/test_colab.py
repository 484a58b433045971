"""The Colab notebook: its code cells run in order (IPython magics and shell lines skipped)."""
import json
import logging
import os

import vljax.train.config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "tpu", "colab.ipynb")


def code_cells(path):
  with open(path) as f:
    notebook = json.load(f)
  assert notebook["nbformat"] == 4
  cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
  sources = ["".join(c["source"]) for c in cells]
  return [("\n".join(line for line in s.splitlines() if not line.lstrip().startswith(("%", "!"))),
           s) for s in sources]


def test_notebook_structure():
  cells = code_cells(NOTEBOOK)
  full = "\n".join(original for _, original in cells)
  assert "REPO_URL = " in full and "%pip install" in full and "jax[tpu]" in full
  assert "jax.default_backend()" in full and "colab_tpu" in full
  assert 'load_config("clip_tiny.py")' in full and "train_and_evaluate(config, WORKDIR)" in full
  assert "VLJAX_COLAB_STEPS" in full


def _tiny(load_config):
  """`load_config` followed by a model, batch and evaluation small enough for a CPU test."""

  def load(name):
    config = load_config(name)
    config.batch_size = 16
    config.model.image = dict(config.model.image, width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.text = dict(config.model.text, width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.embed_dim = 16
    config.data = dict(image_size=32, max_text_len=16)
    config.evals = dict(zeroshot_images=48, retrieval_pairs=40, batch_size=16)
    return config

  return load


def test_notebook_runs(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  # The notebook imports load_config inside a cell, so it picks up this smaller variant.
  monkeypatch.setattr(vljax.train.config, "load_config", _tiny(vljax.train.config.load_config))
  monkeypatch.setenv("VLJAX_COLAB_STEPS", "4")
  monkeypatch.setenv("VLJAX_COLAB_WORKDIR", str(workdir))
  monkeypatch.chdir(tmp_path)
  # The notebook points the "vljax" logger at stdout; give other tests theirs back.
  logger = logging.getLogger("vljax")
  saved = (list(logger.handlers), logger.level, logger.propagate)
  namespace = {"__name__": "__main__"}
  try:
    for i, (code, _) in enumerate(code_cells(NOTEBOOK)):
      exec(compile(code, f"colab.ipynb cell {i}", "exec"), namespace)  # pylint: disable=exec-used
  finally:
    logger.handlers[:], logger.level, logger.propagate = saved
  assert namespace["config"].total_steps == 4
  with open(workdir / "metrics.json") as f:
    metrics = json.load(f)
  assert metrics == namespace["final"] and 0.0 <= metrics["zeroshot/top1"] <= 1.0
  for picture in ("samples.png", "curves.png"):
    assert (workdir / picture).stat().st_size > 10_000
