"""End-to-end runs of the training loop on tiny configs: outputs, resume, checkpoints, LiT."""
import json
import logging
import os

import flax
import jax
import numpy as np
import pytest

from tests.train.helpers import small_evals, tiny_config
from vljax.train.config import load_config
from vljax.train.checkpoint import Checkpointer, load_params
from vljax.train.loop import build_experiment, train_and_evaluate


def test_train_writes_metrics_and_resumes(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  config = tiny_config()
  final = train_and_evaluate(config, workdir)
  for key in ("zeroshot/top1", "retrieval/i2t/r@1", "retrieval/t2i/r@1", "retrieval/i2t/r@5"):
    assert 0.0 <= final[key] <= 1.0
  with open(os.path.join(workdir, "metrics.json")) as f:
    assert json.load(f) == pytest.approx(final)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train_steps = [r["step"] for r in records if "train/loss" in r]
  assert train_steps == [2, 4, 6]
  assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
  assert Checkpointer(workdir).latest_step() == 6
  for picture in ("samples.png", "curves.png"):
    assert os.path.getsize(os.path.join(workdir, picture)) > 10_000

  # Longer run in the same workdir: resumes from step 6 and trains only steps 7..8.
  config = tiny_config(total_steps=8, evals={})
  with caplog.at_level(logging.INFO, logger="vljax"):
    train_and_evaluate(config, workdir)
  assert "Resuming from the checkpoint at step 6" in caplog.text
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if "train/loss" in line]
  assert steps == [2, 4, 6, 8]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
  """Checkpoint + data iterator state make a resumed run reproduce the uninterrupted losses."""
  full = str(tmp_path / "full")
  train_and_evaluate(tiny_config(total_steps=6, log_every=1, evals={}), full)
  split = str(tmp_path / "split")
  train_and_evaluate(tiny_config(total_steps=3, log_every=1, evals={}), split)
  train_and_evaluate(tiny_config(total_steps=6, log_every=1, evals={}), split)
  read = lambda w: [(r["step"], r["train/loss"]) for r in map(json.loads, open(os.path.join(w, "metrics.jsonl")))
                    if "train/loss" in r]
  assert read(split) == read(full)


def test_checkpoint_round_trip(tmp_path):
  config = tiny_config()
  exp = build_experiment(config)
  with exp.context():
    state = exp.init()
    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save(3, state)
    restored = checkpointer.restore(3, exp.abstract_state, exp.shardings)
  assert checkpointer.latest_step() == 3
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state)
  jax.tree.map(lambda a, s: (a.sharding == s) or pytest.fail(f"{a.sharding} != {s}"),
               restored, exp.shardings)


def test_lit_locks_the_image_tower(tmp_path):
  """LiT: image tower loaded from a CLIP checkpoint, bitwise unchanged, with no optimizer state."""
  clip_dir = str(tmp_path / "clip")
  train_and_evaluate(tiny_config(total_steps=3, evals={}), clip_dir)
  source = load_params(clip_dir)

  config = tiny_config(total_steps=4, evals={})
  config.optim.freeze = "img/.*"
  config.init = [dict(checkpoint=clip_dir, params="img/.*")]
  lit_dir = str(tmp_path / "lit")
  train_and_evaluate(config, lit_dir)
  trained = load_params(lit_dir)
  flat_src = flax.traverse_util.flatten_dict(source["img"], sep="/")
  flat_new = flax.traverse_util.flatten_dict(trained["img"], sep="/")
  assert flat_src.keys() == flat_new.keys()
  for key in flat_src:
    np.testing.assert_array_equal(flat_new[key], flat_src[key], err_msg=key)
  # The text tower did train.
  assert not np.array_equal(trained["txt"]["head"]["dense"]["kernel"], source["txt"]["head"]["dense"]["kernel"])
  # No optimizer state for the image tower: every leaf of the optimizer state is a text/temperature leaf.
  exp = build_experiment(config)
  opt_leaves = jax.tree_util.tree_flatten_with_path(exp.abstract_state.opt_state)[0]
  img_leaves = [p for p, leaf in opt_leaves if any(getattr(k, "key", None) == "img" for k in p)]
  assert not img_leaves
  num_opt = sum(int(np.prod(leaf.shape)) for _, leaf in opt_leaves)
  num_txt = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(exp.abstract_state.params["txt"]))
  assert num_opt <= 2 * (num_txt + 1) + 10  # Adam's two moments of the trained leaves, plus counters


def test_init_checkpoint_with_missing_keys_is_named(tmp_path):
  clip_dir = str(tmp_path / "clip")
  exp = build_experiment(tiny_config(total_steps=1))
  with exp.context():  # a checkpoint as training writes it, without the training
    checkpointer = Checkpointer(clip_dir)
    checkpointer.save(1, exp.init())
    checkpointer.close()
  config = tiny_config(total_steps=1)
  config.model["image"]["depth"] = 2  # layer_1 does not exist in the checkpoint
  config.init = [dict(checkpoint=clip_dir, params="img/.*")]
  with pytest.raises(ValueError, match=r"config\.init\[0\]\.checkpoint=.* lacks .*layer_1"):
    build_experiment(config).init()
  config.init = [dict(checkpoint=str(tmp_path / "nowhere"), params="img/.*")]
  with pytest.raises(FileNotFoundError, match=r"config\.init\[0\]\.checkpoint=.*nowhere.* does not exist"):
    build_experiment(config).init()


def test_coca_family_trains_evaluates_and_draws(tmp_path):
  """The CoCa family through the shared loop: both losses fall into the metrics, captioning is
  scored, and samples.png carries generated captions."""
  config = tiny_config(total_steps=4, log_every=2)
  config.family = "coca"
  config.model = dict(image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8),
                      width=32, num_heads=2, mlp_dim=64, unimodal_depth=1, multimodal_depth=1,
                      num_caption_queries=4)
  config.data = dict(image_size=32, max_text_len=17, text_bos=True, shapes=dict(shape_siblings=1))
  config.evals = small_evals(retrieval=16, captioning=8, batch_size=8)
  workdir = str(tmp_path / "coca")
  final = train_and_evaluate(config, workdir)
  for key in ("zeroshot/top1", "retrieval/i2t/r@1", "captioning/cider", "captioning/bleu4"):
    assert key in final
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r for r in records if "train/loss" in r]
  for key in ("train/cap_loss", "train/con_loss", "train/cap_accuracy"):
    assert key in train[0]
  assert train[0]["train/loss"] == pytest.approx(
      train[0]["train/con_loss"] + 2 * train[0]["train/cap_loss"], rel=1e-5)
  assert os.path.getsize(os.path.join(workdir, "samples.png")) > 10_000


def test_coca_on_the_vqa_view_is_scored_with_vqa_accuracy_and_perplexity(tmp_path):
  """Another view through the same loop: coca_vqa_tiny's data, loss and evaluators on a tiny
  model; the captioning loss counts the answer tokens only, samples.png shows answers."""
  config = load_config("coca_vqa_tiny.py")
  config.total_steps, config.log_every, config.eval_every, config.batch_size = 2, 1, 0, 8
  config.optim.warmup_steps = 1
  config.model = dict(image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8),
                      width=32, num_heads=2, mlp_dim=64, unimodal_depth=1, multimodal_depth=1,
                      num_caption_queries=4)
  config.data.image_size = 32
  config.evals.vqa.update(questions=8, batch_size=8)
  config.evals.perplexity.update(examples=8, batch_size=8)
  workdir = str(tmp_path / "vqa")
  final = train_and_evaluate(config, workdir)
  assert 0.0 <= final["vqa/accuracy"] <= 1.0 and final["perplexity/perplexity"] > 1.0
  assert any(key.startswith("vqa/accuracy/") for key in final)
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  # One- or two-word answers and EOS: a few scored tokens per question, not the whole text.
  tokens = [r["train/cap_tokens"] for r in records if "train/cap_tokens" in r]
  assert tokens and all(8 * 2 <= t <= 8 * 4 for t in tokens)
  assert os.path.getsize(os.path.join(workdir, "samples.png")) > 10_000
