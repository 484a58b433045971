"""The Colab notebook: its code cells run in order (IPython magics and shell lines skipped)."""
import importlib.util
import json
import logging
import os
import re
import shutil

import pytest

import vljax.train.config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "tpu", "colab.ipynb")


def code_cells(path):
  with open(path) as f:
    notebook = json.load(f)
  assert notebook["nbformat"] == 4 and notebook["nbformat_minor"] >= 5
  for cell in notebook["cells"]:  # what nbformat 4.5 requires of every cell
    assert {"cell_type", "id", "metadata", "source"} <= set(cell), cell
    if cell["cell_type"] == "code":
      assert "outputs" in cell and "execution_count" in cell, cell
  cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
  sources = ["".join(c["source"]) for c in cells]
  return [("\n".join(line for line in s.splitlines() if not line.lstrip().startswith(("%", "!"))),
           s) for s in sources]


def test_notebook_structure():
  cells = code_cells(NOTEBOOK)
  full = "\n".join(original for _, original in cells)
  assert "REPO_URL = " in full and '"pip", "install"' in full and "jax[tpu]" in full
  assert "jax.default_backend()" in full and "colab_tpu" in full
  assert 'load_config("clip_tiny.py")' in full and "train_and_evaluate(config, WORKDIR)" in full
  assert "VLJAX_COLAB_STEPS" in full


def test_notebook_has_no_placeholder_and_hides_no_failure():
  """REPO_URL starts empty (the user sets it); no URL to a placeholder, no silenced clone."""
  full = "\n".join(original for _, original in code_cells(NOTEBOOK))
  assert re.search(r'^REPO_URL = ""  #@param', full, re.MULTILINE)
  assert not re.search(r"YOUR[-_]|<[a-z-]*org|example\.(com|org)|https?://github\.com/", full,
                       re.IGNORECASE)
  assert "/dev/null" not in full and "|| git" not in full and "!git" not in full
  assert not any(line.lstrip().startswith("!") for line in full.splitlines())


def _first_cell(monkeypatch, tmp_path, repo_url="", repo_dir="vljax"):
  """Runs the set-up cell as on a fresh runtime: no vljax importable, in an empty directory."""
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "vljax" else real_find_spec(name, *a))
  monkeypatch.chdir(tmp_path)
  code, _ = code_cells(NOTEBOOK)[0]
  for name, value in (("REPO_URL", repo_url), ("REPO_DIR", repo_dir)):
    code, count = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", code, count=1,
                          flags=re.MULTILINE)
    assert count == 1, name
  namespace = {"__name__": "__main__"}
  exec(compile(code, "colab.ipynb cell 0", "exec"), namespace)  # pylint: disable=exec-used


def test_notebook_without_vljax_or_repo_url_says_what_to_set(tmp_path, monkeypatch):
  with pytest.raises(RuntimeError, match="set REPO_URL at the top of this cell"):
    _first_cell(monkeypatch, tmp_path)


def test_notebook_stops_when_the_clone_fails(tmp_path, monkeypatch):
  if shutil.which("git") is None:
    pytest.skip("git is not installed")
  missing = str(tmp_path / "no-such-repo.git")
  with pytest.raises(RuntimeError, match=re.escape(f"git clone of REPO_URL={missing!r} failed")):
    _first_cell(monkeypatch, tmp_path, repo_url=missing)
  assert not (tmp_path / "vljax").exists()


def test_notebook_refuses_a_repo_dir_that_is_no_checkout(tmp_path, monkeypatch):
  (tmp_path / "stale").mkdir()
  with pytest.raises(RuntimeError, match="REPO_DIR='stale' exists but holds no vljax checkout"):
    _first_cell(monkeypatch, tmp_path, repo_url="https://git.invalid/vljax.git", repo_dir="stale")


def _tiny(load_config):
  """`load_config` followed by a model, batch and evaluation small enough for a CPU test."""

  def load(name):
    config = load_config(name)
    config.batch_size = 16
    config.model.image = dict(config.model.image, width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.text = dict(config.model.text, width=32, depth=1, mlp_dim=64, num_heads=2)
    config.model.embed_dim = 16
    config.data = dict(image_size=32, max_text_len=16)
    config.evals = dict(zeroshot=dict(type="zeroshot", images=48, batch_size=16),
                        retrieval=dict(type="retrieval", pairs=40, batch_size=16))
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
