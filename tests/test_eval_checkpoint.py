"""experiments/eval.py and vljax.train.eval_checkpoint: a checkpoint evaluated without training.

A tiny CLIP-layout TwoTower (random weights) is evaluated in-process on a TFDS zero-shot set
built here; the same weights exported as a transformers CLIPModel directory and evaluated by
`experiments/eval.py --checkpoint=DIR` (the model, image size and text length read from the
directory, the evaluators from the config) report the same top-1 and top-5. Imports and bad
checkpoints go through the same registry as config.init."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.tfds_helpers import build_dataset, encode
from vljax.convert import checkpoints, hf_clip
from vljax.train.config import load_config
from vljax.train.eval_checkpoint import checkpoint_params, config_for, evaluate
from vljax.train.evaluation import Evaluation
from vljax.train.loop import build_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
LABELS = ["red_square", "green_circle", "blue_triangle", "yellow_square"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tfds")
  rng = np.random.default_rng(0)
  records = [{"image": encode(np.clip(np.full((24, 30, 3), c) + rng.integers(-60, 60, (24, 30, 3)),
                                      0, 255).astype(np.uint8)), "label": i % 4}
             for i, c in enumerate(COLOURS * 6)]
  build_dataset(directory, "vljax_eval_colours", tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "label": tfds.features.ClassLabel(names=LABELS)}), {"test": records})
  return str(directory)


def _config(data_dir):
  """clip_tiny with a CLIP-layout model (CLS pooling, pre-norm, bias-free patches, EOT pooling,
  quick GELU: what transformers' CLIPModel computes) and only the TFDS zero-shot evaluator."""
  config = load_config("clip_tiny.py")
  tokenizer_eos = 3  # the shapes tokenizer's end-of-text id
  fields = hf_clip.config_from_hf(dict(
      model_type="clip", projection_dim=16,
      vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, image_size=20, patch_size=4),
      text_config=dict(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                       num_attention_heads=3, max_position_embeddings=16,
                       eos_token_id=tokenizer_eos)))
  fields.pop("contrastive")
  fields["text"] = {k: v for k, v in fields["text"].items() if k not in ("vocab_size", "pad_id")}
  config.model = fields
  config.data = dict(image_size=20, max_text_len=16, tfds=dict(data_dir=data_dir))
  config.evals = dict(colours=dict(type="tfds_zeroshot", name="vljax_eval_colours", batch_size=4))
  return config


def test_eval_cli_on_an_exported_model_reports_the_original_top1(data_dir, tmp_path):
  config = _config(data_dir)
  exp = build_experiment(config, devices=jax.devices()[:1])
  assert exp.tokenizer.eos_id == 3
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype),
                        exp.abstract_state.params)
  with exp.context():
    want = Evaluation(exp, config.evals).run(params)
  assert want["colours/images"] == 24.0
  hf_dir = tmp_path / "exported"
  hf_clip.save(hf_dir, exp.bound.model, jax.tree.map(np.asarray, params))

  # The same parameters through the registry land in the experiment unchanged.
  imported = checkpoints.read(hf_dir)
  assert (imported.format, imported.family) == ("transformers", "two_tower")
  assert imported.data == {"image_size": 20, "max_text_len": 16}  # no tokenizer in the directory
  assert imported.loss == {"contrastive": "softmax"}
  with exp.context():
    placed = checkpoint_params(exp, imported)
  jax.tree.map(np.testing.assert_array_equal, placed, params)
  # ... and the config eval.py makes from the directory computes the same function.
  rebuilt = config_for(load_config("clip_tiny.py"), imported)
  exp2 = build_experiment(rebuilt, devices=jax.devices()[:1])
  images = np.random.default_rng(2).integers(0, 256, (3, 20, 20, 3), np.uint8)
  tokens = exp.tokenizer.encode(["red square", "a blue circle on the left", ""], 16)
  with exp.context():
    a = exp.bound.predict("embed_images", params, {"image": images})
    b = exp.bound.predict("embed_texts", params, {"text": tokens})
  with exp2.context():
    np.testing.assert_allclose(exp2.bound.predict("embed_images", placed, {"image": images}), a,
                               atol=1e-5)
    np.testing.assert_allclose(exp2.bound.predict("embed_texts", placed, {"text": tokens}), b,
                               atol=1e-5)

  # config.init reads the same directory: LiT's locked image tower from a CLIP checkpoint.
  lit = _config(data_dir)
  lit.init = [dict(checkpoint=str(hf_dir), params="img/.*")]
  lit.optim.freeze = "img/.*"
  lit_params = build_experiment(lit, devices=jax.devices()[:1]).init().params
  jax.tree.map(np.testing.assert_array_equal, lit_params["img"], params["img"])
  assert not np.array_equal(lit_params["txt"]["token_embedding"]["embedding"],
                            params["txt"]["token_embedding"]["embedding"])
  # Fine-tuning at 28px (a 7 x 7 grid): the position table is resampled as transformers does.
  lit.data.image_size = 28
  lit_params = build_experiment(lit, devices=jax.devices()[:1]).init().params
  _, resampled = hf_clip.load(hf_dir, image_size=28)
  assert lit_params["img"]["pos_embedding"]["pos_embedding"].shape == (1, 50, 32)
  jax.tree.map(np.testing.assert_array_equal, lit_params["img"], resampled["img"])

  workdir = tmp_path / "eval"
  done = subprocess.run(
      [sys.executable, "experiments/eval.py", f"--checkpoint={hf_dir}", "--config=clip_tiny.py",
       f"--workdir={workdir}", f"--config.data.tfds.data_dir={data_dir}",
       "--config.data.max_text_len=16",
       "--config.evals={'colours': {'type': 'tfds_zeroshot', 'name': 'vljax_eval_colours', "
       "'batch_size': 4}}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  got = json.loads((workdir / "metrics.json").read_text())
  assert got == pytest.approx({k: float(v) for k, v in want.items()}, abs=1e-6)
  assert got["colours/images"] == 24.0 and set(got) >= {"colours/top1", "colours/skipped"}


def test_bad_checkpoints_and_workdirs_are_refused(data_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint at .*missing"):
    checkpoints.read(tmp_path / "missing")
  (tmp_path / "weights.bin").write_bytes(b"\x80\x04not read")
  with pytest.raises(ValueError, match="is not a checkpoint vljax reads; formats: open_clip "
                     "model directory, Hugging Face model, big_vision .npz file, vljax"):
    checkpoints.read(tmp_path / "weights.bin")
  pickles = tmp_path / "pickles"
  pickles.mkdir()
  (pickles / "config.json").write_text(json.dumps({"model_type": "clip"}))
  (pickles / "pytorch_model.bin").write_bytes(b"not opened")
  with pytest.raises(ValueError, match="has PyTorch pickle weights .* never loads"):
    checkpoints.read(pickles)
  # A training workdir keeps its metrics.json.
  train_dir = tmp_path / "run"
  (train_dir / "checkpoints").mkdir(parents=True)
  done = subprocess.run(
      [sys.executable, "experiments/eval.py", f"--checkpoint={tmp_path / 'missing'}",
       f"--workdir={train_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2 and "No checkpoint at" in done.stderr
  config = config_for(_config(data_dir), checkpoints.Imported("vljax", "x", {}))
  assert config.family == "two_tower" and config.model.image.pool == "cls"  # kept as it was
  with pytest.raises(ValueError, match="is a training workdir .* so its metrics.json is kept"):
    evaluate(config, checkpoints.Imported("vljax", "x", {}), str(train_dir))


def test_import_hints_follow_the_directory(tmp_path):
  """Normalisation from preprocessor_config.json; the tokenizer and its template only when the
  directory has one; SigLIP 2 tables resample as transformers' antialiased bilinear resize."""
  import transformers  # pylint: disable=import-outside-toplevel
  config = transformers.SiglipConfig(
      text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=8),
      vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, image_size=12, patch_size=4))
  transformers.SiglipModel(config).save_pretrained(tmp_path / "siglip")
  (tmp_path / "siglip" / "preprocessor_config.json").write_text(json.dumps(
      {"image_processor_type": "SiglipImageProcessor", "image_mean": [0.5, 0.5, 0.5],
       "image_std": 0.25}))
  imported = checkpoints.read(tmp_path / "siglip")
  assert imported.data == {"image_size": 12, "max_text_len": 8, "image_mean": (0.5, 0.5, 0.5),
                           "image_std": (0.25, 0.25, 0.25)}
  assert imported.loss == {"contrastive": "sigmoid"} and imported.posemb_method == "bicubic"
  (tmp_path / "siglip" / "tokenizer.model").write_bytes(b"")  # only its presence is read here
  assert checkpoints.read(tmp_path / "siglip").data["tokenizer"] == str(tmp_path / "siglip")
  assert checkpoints.read(tmp_path / "siglip").data["text_bos"] is False
