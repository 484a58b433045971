"""vljax.convert.export: a vljax checkpoint of a trained TwoTower exported as a transformers
CLIPModel / SiglipModel directory and as a big_vision .npz, read back with the checkpoint's
params; families and layouts without a format, and bad command lines, refused in one line."""
import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax.convert import big_vision, export, hf_clip, hf_lm

IMAGE_SIZE = 20  # set by --config.data.image_size: without it the config is clip_tiny's 48
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
              image_size=IMAGE_SIZE, patch_size=4)
TEXT = dict(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
            num_attention_heads=3, max_position_embeddings=16)
CONFIG_FILE = '''from vljax.train.config import load_config


def get_config():
  c = load_config("clip_tiny.py")
  c.model = {model!r}
  c.loss.contrastive = {contrastive!r}
  c.data.max_text_len = 16
  return c
'''
OVERRIDE = f"--config.data.image_size={IMAGE_SIZE}"
_TOKENIZERS = {}


@pytest.fixture(autouse=True)
def _tokenizer_built_once(monkeypatch):
  """The shapes tokenizer takes a second to build, and each command line builds it again."""
  from vljax.data import pipeline  # pylint: disable=import-outside-toplevel
  build = pipeline.build_tokenizer

  def cached(cfg):
    key = (cfg.tokenizer, cfg.view)
    if key not in _TOKENIZERS:
      _TOKENIZERS[key] = build(cfg)
    return _TOKENIZERS[key]

  monkeypatch.setattr(pipeline, "build_tokenizer", cached)


def _model_fields(model_type: str, eos_id: int) -> dict:
  """config.model of the TwoTower transformers' `model_type` computes (CLIP: CLS pooling,
  pre-norm, bias-free patches, EOT pooling, quick GELU; SigLIP: MAP pooling, tanh GELU, text
  pooled at the last token, padding unmasked, which big_vision's two towers compute too), less
  the fields the tokenizer, the data and config.loss own."""
  # SigLIP compares the embeddings of the vision width: the text head projects to it.
  text = dict(TEXT, **(dict(eos_token_id=eos_id) if model_type == "clip" else
                       dict(projection_size=VISION["hidden_size"])))
  hf_config = dict(model_type=model_type, vision_config=VISION, text_config=text)
  if model_type == "clip":
    hf_config["projection_dim"] = 16
  fields = hf_clip.config_from_hf(hf_config)
  fields.pop("contrastive")
  fields["text"] = {k: v for k, v in fields["text"].items()
                    if k not in ("vocab_size", "pad_id", "max_len")}
  return fields


def _config_file(tmp_path, model_type: str) -> str:
  """A config file of clip_tiny with the `model_type` layout, sized as VISION and TEXT."""
  # pylint: disable=import-outside-toplevel
  from vljax.data.pipeline import build_tokenizer, data_config
  from vljax.train.config import load_config
  config_path = tmp_path / f"{model_type}_export.py"
  contrastive = "softmax" if model_type == "clip" else "sigmoid"
  # The shapes tokenizer's end-of-text id, where CLIP pools.
  eos_id = build_tokenizer(data_config(load_config("clip_tiny.py").data)).eos_id
  config_path.write_text(CONFIG_FILE.format(model=_model_fields(model_type, eos_id),
                                            contrastive=contrastive))
  return str(config_path)


def _workdir(tmp_path, model_type: str):
  """(config file, workdir, model, params): a checkpoint of random params of the TwoTower the
  config file (with OVERRIDE) builds, saved as training saves them."""
  # pylint: disable=import-outside-toplevel
  from vljax.data.pipeline import build_tokenizer, data_config
  from vljax.families import get_family
  from vljax.families.base import build_model
  from vljax.train.checkpoint import Checkpointer
  from vljax.train.config import apply_overrides, load_config, validate
  config_path = _config_file(tmp_path, model_type)
  config = validate(apply_overrides(load_config(str(config_path)), [OVERRIDE[len("--config."):]]))
  tokenizer = build_tokenizer(data_config(config.data))
  model = build_model(get_family(config.family), config, tokenizer)
  images = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
  tokens = jnp.zeros((1, 4), jnp.int32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, tokens)["params"])
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype),
                        nn.meta.unbox(abstract))
  workdir = tmp_path / f"{model_type}_work"
  checkpointer = Checkpointer(str(workdir))
  checkpointer.save(3, {"params": params, "step": np.int32(3)})
  checkpointer.close()
  return str(config_path), str(workdir), model, params


def _embed(model, params, images, tokens):
  out = jax.jit(model.apply)({"params": params}, images, tokens)
  return {k: np.asarray(out[k]) for k in ("zimg", "ztxt", "scale")}


def _assert_same(model, params, loaded_model, loaded_params, *, embeddings=True):
  """Equal params (cast as exported) and, with `embeddings`, equal embeddings of the modules."""
  want = flax.traverse_util.flatten_dict(params, sep="/")
  got = flax.traverse_util.flatten_dict(loaded_params, sep="/")
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(np.asarray(got[key], np.float32),
                                  np.asarray(value).astype(got[key].dtype).astype(np.float32),
                                  err_msg=key)
  if embeddings:  # the module read back computes what the trained one did
    rng = np.random.default_rng(2)
    images = rng.standard_normal((2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    tokens = rng.integers(4, 30, (2, 16)).astype(np.int32)
    tokens[:, 9] = 3  # an end-of-text token for CLIP's pooling
    want, got = (_embed(model, params, images, tokens),
                 _embed(loaded_model, loaded_params, images, tokens))
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)


def _run(capsys, *argv):
  """(exit status, stdout lines, stderr) of the command line."""
  rc = export.main([str(a) for a in argv])
  captured = capsys.readouterr()
  return rc, captured.out.split(), captured.err


def test_clip_exports_to_transformers(tmp_path, capsys):
  config, workdir, model, params = _workdir(tmp_path, "clip")
  out = tmp_path / "clip_hf"
  args = (f"--config={config}", f"--checkpoint={workdir}", OVERRIDE)
  rc, written, err = _run(capsys, *args, f"--out={out}")
  assert rc == 0, err
  assert sorted(written) == [str(out / "config.json"), str(out / "model.safetensors")]
  assert json.load(open(out / "config.json"))["architectures"] == ["CLIPModel"]
  _assert_same(model, params, *hf_clip.load(out))

  # An existing directory needs --overwrite; with it, the files are replaced.
  rc, _, err = _run(capsys, *args, f"--out={out}")
  assert rc == 1 and err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1
  rc, _, err = _run(capsys, *args, f"--out={out}", "--overwrite", "--dtype=float16")
  assert rc == 0, err
  loaded_model, loaded = hf_clip.load(out)
  assert loaded["t"].dtype == np.float16
  _assert_same(model, params, loaded_model, loaded, embeddings=False)

  # CLIP's CLS token and pre-norm have no big_vision parameter: refused naming the fields.
  rc, _, err = _run(capsys, *args, f"--out={tmp_path / 'clip.npz'}", "--format=big_vision")
  assert rc == 1 and "big_vision's two towers cannot express" in err and "image.pool" in err
  assert not (tmp_path / "clip.npz").exists()
  # An exported directory is no vljax checkpoint.
  rc, _, err = _run(capsys, f"--config={config}", f"--checkpoint={out}", OVERRIDE,
                    f"--out={tmp_path / 'again'}")
  assert rc == 1 and "is a Hugging Face model, not a vljax checkpoint" in err
  # Without the override the checkpoint is another model's (a 48px position table).
  rc, _, err = _run(capsys, f"--config={config}", f"--checkpoint={workdir}",
                    f"--out={tmp_path / 'again'}")
  assert rc == 1 and "holds the params of another model" in err and "pos_embedding" in err


def test_siglip_exports_to_big_vision_and_transformers(tmp_path, capsys):
  config, workdir, model, params = _workdir(tmp_path, "siglip")
  args = (f"--config={config}", f"--checkpoint={workdir}", OVERRIDE)
  npz = tmp_path / "siglip.npz"
  rc, written, err = _run(capsys, *args, f"--out={npz}", "--format=big_vision")
  assert rc == 0, err
  assert written == [str(npz)]
  loaded_model, loaded = big_vision.load(npz)
  assert loaded_model.contrastive == "sigmoid"
  _assert_same(model, params, loaded_model, loaded)
  rc, _, err = _run(capsys, *args, f"--out={npz}", "--format=big_vision")
  assert rc == 1 and "--overwrite" in err
  rc, _, err = _run(capsys, *args, f"--out={tmp_path / 'siglip_bv'}", "--format=big_vision")
  assert rc == 1 and ".npz" in err

  out = tmp_path / "siglip_hf"
  rc, _, err = _run(capsys, *args, f"--out={out}", "--dtype=bfloat16")
  assert rc == 0, err
  assert json.load(open(out / "config.json"))["architectures"] == ["SiglipModel"]
  loaded_model, loaded = hf_clip.load(out)
  assert loaded["t"].dtype.name == "bfloat16"
  _assert_same(model, params, loaded_model, loaded, embeddings=False)


def test_families_without_a_format_and_missing_checkpoints_are_refused(tmp_path, capsys):
  # CoCa is refused by name before its checkpoint is looked for.
  rc, _, err = _run(capsys, "--config=coca_tiny.py", f"--checkpoint={tmp_path / 'none'}",
                    f"--out={tmp_path / 'coca'}")
  assert rc == 1 and err.count("\n") == 1
  assert "CoCa" in err and "'coca'" in err and "transformers, big_vision" in err
  config = _config_file(tmp_path, "clip")
  rc, _, err = _run(capsys, f"--config={config}", OVERRIDE, f"--checkpoint={tmp_path / 'none'}",
                    f"--out={tmp_path / 'clip'}")
  assert rc == 1 and err.startswith("error: ") and "does not exist" in err
  # clip_tiny's layout (mean-pooled image tower, patch bias, no pre-norm) is not CLIPModel's.
  rc, _, err = _run(capsys, "--config=clip_tiny.py", f"--checkpoint={tmp_path / 'none'}",
                    f"--out={tmp_path / 'clip'}")
  assert rc == 1 and "transformers cannot express this vljax TwoTower" in err
  # An LM exports to transformers only.
  rc, _, err = _run(capsys, "--config=lm_tiny.py", f"--checkpoint={tmp_path / 'none'}",
                    f"--out={tmp_path / 'lm.npz'}", "--format=big_vision")
  assert rc == 1 and "exports to transformers, not --format=big_vision" in err
  # hf_lm's command is this one for LM / T5 and points elsewhere for the rest.
  rc = hf_lm.main(["export", "--config=clip_tiny.py", f"--checkpoint={tmp_path / 'none'}",
                   f"--out={tmp_path / 'clip'}"])
  assert rc == 1 and "python -m vljax.convert.export" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    hf_lm.main([])
  assert os.listdir(tmp_path) == ["clip_export.py"]  # nothing written
