"""vljax.convert.hf_clip: transformers CLIPModel / SiglipModel / Siglip2Model directories load
into vljax's TwoTower with the same image embeddings, text embeddings and logits (float32,
1e-4; SigLIP 2 given the image patchified as its processor does, at the stored grid and at
another, non-square one); exporting then importing is the identity; a vljax TwoTower saved as a
directory loads strictly into transformers and gives vljax's outputs; unsupported layouts and
broken checkpoints are refused by name.

The tiny configs are chosen to break a wrong mapping: unequal tower widths, a 5 x 5 patch grid
(20px images, 4px patches), quick_gelu next to gelu, the tanh GELU (SigLIP, MAP head included),
text padded with the end-of-text id, a real token equal to the config's pad id, a logit scale
above 100 (not clamped) and SigLIP's logit bias."""
import json
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vljax.convert import hf, hf_clip  # noqa: E402
from vljax.models.two_tower import TwoTower  # noqa: E402

IMAGE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             image_size=20, patch_size=4)
TEXT = dict(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=3, max_position_embeddings=12)
LOG_SCALE = math.log(150.0)  # above CLIP's clamp at 100
CASES = {
    # transformers' current CLIP: pooled at the first eos_token_id; pads are EOT (49); a real
    # token equals the config's pad id (1).
    "clip": dict(model_type="clip", text=dict(TEXT, hidden_act="gelu", pad_token_id=1,
                                              bos_token_id=48, eos_token_id=49),
                 vision=dict(IMAGE, hidden_act="quick_gelu"), projection_dim=16),
    # The legacy config (eos_token_id 2): pooled at the largest id, OpenAI's EOT.
    "clip_legacy": dict(model_type="clip", text=dict(TEXT, hidden_act="quick_gelu",
                                                     pad_token_id=1, bos_token_id=48,
                                                     eos_token_id=2),
                        vision=dict(IMAGE, hidden_act="gelu"), projection_dim=16),
    # SigLIP: pad id == eos id == 1, and a real 1 inside the text.
    "siglip": dict(model_type="siglip",
                   text=dict(TEXT, hidden_act="gelu_pytorch_tanh", pad_token_id=1,
                             bos_token_id=48, eos_token_id=1, projection_size=32),
                   vision=dict(IMAGE, hidden_act="gelu_pytorch_tanh")),
}
# Rows: BOS, text (with a 1), EOT, then pads of the EOT id (CLIP) or of the pad id (SigLIP).
TOKENS = {
    "clip": [[48, 5, 1, 7, 49, 49, 49, 49], [48, 9, 3, 3, 8, 10, 12, 49]],
    "clip_legacy": [[48, 5, 1, 7, 49, 0, 0, 0], [48, 9, 3, 3, 8, 10, 12, 49]],
    "siglip": [[5, 1, 7, 1, 1, 1, 1, 1], [9, 3, 3, 8, 10, 12, 6, 1]],
}
VALID = [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]]


def _hf_config(name):
  case = CASES[name]
  if case["model_type"] == "clip":
    return transformers.CLIPConfig(text_config=case["text"], vision_config=case["vision"],
                                   projection_dim=case["projection_dim"])
  return transformers.SiglipConfig(text_config=case["text"], vision_config=case["vision"])


def _perturb(model):
  """Random weights far from the initialisation: norms 1 + 0.2 N, biases 0.2 N, the rest +
  0.05 N; logit scale above 100, SigLIP's bias -2.5."""
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if name == "logit_scale":
        p.fill_(LOG_SCALE)
      elif name == "logit_bias":
        p.fill_(-2.5)
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.2 * noise)
      else:
        p.add_(0.05 * noise)
  return model


def _hf_forward(model, pixels_bchw, ids, mask=None):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels_bchw),
                attention_mask=None if mask is None else torch.tensor(mask))
  return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_text.numpy()


def _vljax_forward(model, params, pixels_bchw, ids, mask=None):
  # One compiled program: much faster on CPU than dispatching op by op.
  apply = jax.jit(lambda p, x, t, v: model.apply({"params": p}, x, t, text_valid_bt=v))
  out = apply(params, jnp.asarray(pixels_bchw.transpose(0, 2, 3, 1)), jnp.asarray(ids),
              None if mask is None else jnp.asarray(mask, bool))
  logits = out["scale"] * out["ztxt"] @ out["zimg"].T + out.get("bias", 0.0)
  return np.asarray(out["zimg"]), np.asarray(out["ztxt"]), np.asarray(logits)


def _pixels(seed=0):
  return np.random.default_rng(seed).normal(size=(2, 3, 20, 20)).astype(np.float32)


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_dir(request, tmp_path_factory):
  """(case name, directory written by transformers' save_pretrained, the torch model)."""
  torch.manual_seed(0)
  cls = transformers.CLIPModel if CASES[request.param]["model_type"] == "clip" else \
      transformers.SiglipModel
  model = _perturb(cls(_hf_config(request.param)).eval())
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path)
  return request.param, str(path), model


def test_import_parity(hf_dir):
  name, path, hf_model = hf_dir
  model, params = hf_clip.load(path)
  assert model.max_scale is None
  pixels, ids = _pixels(), np.array(TOKENS[name])
  want = _hf_forward(hf_model, pixels, ids)
  got = _vljax_forward(model, params, pixels, ids)
  for what, w, g in zip(("image embeddings", "text embeddings", "logits"), want, got):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=what)
  # The scale, 150, is above CLIP's training clamp: transformers does not clamp it, nor vljax.
  np.testing.assert_allclose(np.exp(params["t"]), 150.0, rtol=1e-6)
  if name == "siglip":
    # transformers' attention_mask against vljax's validity mask (bidirectional: it matters).
    want_masked = _hf_forward(hf_model, pixels, ids, VALID)
    got_masked = _vljax_forward(model, params, pixels, ids, VALID)
    np.testing.assert_allclose(got_masked[1], want_masked[1], atol=1e-4, rtol=0)
    assert np.abs(want_masked[1] - want[1]).max() > 1e-3


def test_export_then_import_is_identity(hf_dir, tmp_path):
  name, path, _ = hf_dir
  config, tensors = hf.read_hf_dir(path)
  model, params = hf_clip.load(path)
  written = hf_clip.save(tmp_path / "out", model, params)
  assert any(p.endswith("model.safetensors") for p in written)
  config_back, tensors_back = hf.read_hf_dir(tmp_path / "out")
  assert sorted(tensors_back) == sorted(tensors)
  for key, value in tensors.items():
    np.testing.assert_array_equal(tensors_back[key], value, err_msg=key)
  assert hf_clip.config_from_hf(config_back) == hf_clip.config_from_hf(config)
  model_back, params_back = hf_clip.load(tmp_path / "out")
  assert model_back == model
  jax.tree.map(np.testing.assert_array_equal, params_back, params)
  # Scanned towers import to the stacked layout and export the same tensors.
  scanned_model, scanned = hf_clip.load(path, scan=True)
  assert "layers" in scanned["img"]["encoder"] and "layers" in scanned["txt"]["encoder"]
  _, tensors_scanned = hf_clip.to_hf(scanned_model, scanned)
  for key, value in tensors.items():
    np.testing.assert_array_equal(tensors_scanned[key], value, err_msg=key)


def _random_params(model, seed=0):
  """Params of `model` (shapes from eval_shape, nothing compiled) far from the initialisation:
  norm scales 1 + 0.2 N, biases 0.2 N, kernels N / sqrt(fan in), embeddings, probe and CLS
  0.3 N; logit scale 150, bias -2.5."""
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 20, 20, 3)), jnp.zeros((1, 8), jnp.int32))["params"])
  flat = flax.traverse_util.flatten_dict(flax.linen.meta.unbox(abstract))
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in flat.items():
    noise = rng.normal(size=leaf.shape)
    if path[-1] == "kernel":
      # Attention q / k / v kernels are [D, heads, head_dim]; the others [..., fan in, out].
      qkv = path[-2] in ("query", "key", "value")
      fan_in = leaf.shape[0] if qkv else int(np.prod(leaf.shape[:-1]))
      value = noise / np.sqrt(fan_in)
    elif path[-1] == "scale":
      value = 1 + 0.2 * noise
    elif path[-1] == "bias":
      value = 0.2 * noise
    else:
      value = 0.3 * noise
    out[path] = value.astype(np.float32)
  params = flax.traverse_util.unflatten_dict(out)
  params["t"] = np.float32(LOG_SCALE)
  if "b" in params:
    params["b"] = np.float32(-2.5)
  return params


VLJAX_MODELS = {
    "clip": lambda: TwoTower(
        image=dict(width=32, depth=2, mlp_dim=48, num_heads=4, patch_size=4, pool="cls",
                   pre_norm=True, patch_bias=False, act="quick_gelu", norm_eps=1e-5,
                   out_bias=False),
        text=dict(vocab_size=50, width=24, depth=2, mlp_dim=40, num_heads=3, max_len=12,
                  pool="eot", eot_id=49, pad_id=1, mask_padding=False, act="gelu",
                  norm_eps=1e-5),
        embed_dim=16, max_scale=None),
    "siglip": lambda: TwoTower(
        image=dict(width=32, depth=2, mlp_dim=48, num_heads=4, patch_size=4, pool="map",
                   act="gelu_tanh", map_act="gelu_tanh", out_dim=None),
        text=dict(vocab_size=50, width=24, depth=2, mlp_dim=40, num_heads=3, max_len=12,
                  causal=False, pool="last", pad_id=1, mask_padding=False, act="gelu_tanh",
                  out_bias=True),
        embed_dim=32, contrastive="sigmoid", max_scale=None),
}


@pytest.mark.parametrize("name", sorted(VLJAX_MODELS))
def test_transformers_loads_export_strictly(name, tmp_path):
  model = VLJAX_MODELS[name]()
  params = _random_params(model)
  hf_clip.save(tmp_path, model, params)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["architectures"] == [{"clip": "CLIPModel", "siglip": "SiglipModel"}[name]]
  cls = transformers.CLIPModel if name == "clip" else transformers.SiglipModel
  hf_model, info = cls.from_pretrained(tmp_path, output_loading_info=True)
  assert not any(info.values()), info
  hf_model.eval()
  pixels, ids = _pixels(1), np.array(TOKENS[name])
  want = _hf_forward(hf_model, pixels, ids)
  got = _vljax_forward(model, params, pixels, ids)
  for what, w, g in zip(("image embeddings", "text embeddings", "logits"), want, got):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=what)


def test_text_pooling_options():
  """eot_id pools at the first end-of-text id (pads share it, a real token equals pad_id),
  "argmax" at the largest id, the default at the last token that is not pad_id or that the
  validity mask marks."""
  from vljax.models.text import TextTransformer, eot_index, first_index
  tokens = jnp.array([[7, 0, 9, 5, 5, 5], [7, 3, 0, 4, 9, 5]])  # eot 9, pads 5, a real 0
  valid = jnp.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
  np.testing.assert_array_equal(first_index(tokens, 9), [2, 4])
  np.testing.assert_array_equal(jnp.argmax(tokens, axis=1), [2, 4])
  np.testing.assert_array_equal(eot_index(tokens, 5), [2, 4])
  # pad_id 0 is a real token here: counting tokens != 0 ends row 0 at a pad; a mask does not.
  np.testing.assert_array_equal(eot_index(tokens, 0), [4, 4])
  np.testing.assert_array_equal(eot_index(tokens, 0, valid), [2, 4])
  base = dict(vocab_size=10, width=8, depth=1, mlp_dim=16, num_heads=2, max_len=6,
              mask_padding=False)
  x = TextTransformer(**base)
  params = x.init(jax.random.PRNGKey(0), tokens)["params"]
  _, aux = x.apply({"params": params}, tokens)
  expected = np.asarray(aux["tokens"])[[0, 1], [2, 4]]
  for kw, valid_bt in ((dict(eot_id=9), None), (dict(pool="argmax"), None), ({}, valid)):
    _, aux = TextTransformer(**base, **kw).apply({"params": params}, tokens, valid_bt=valid_bt)
    np.testing.assert_allclose(aux["pre_logits"], expected, atol=1e-6, err_msg=str(kw))


def test_refusals(hf_dir, tmp_path):
  name, path, _ = hf_dir
  config, tensors = hf.read_hf_dir(path)
  lone = dict(config, model_type="siglip2_vision_model")
  with pytest.raises(NotImplementedError, match="lone SigLIP 2 vision tower"):
    hf_clip.from_hf(lone, tensors)
  with pytest.raises(ValueError, match="model_type 'llama'"):
    hf_clip.from_hf(dict(config, model_type="llama"), tensors)
  extra = dict(tensors, **{"text_model.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(hf.KeyMismatchError, match="1 unexpected"):
    hf_clip.from_hf(config, extra)
  missing = {k: v for k, v in tensors.items() if k != "text_model.final_layer_norm.bias"}
  with pytest.raises(hf.KeyMismatchError, match="final_layer_norm.bias"):
    hf_clip.from_hf(config, missing)
  wrong = dict(tensors)
  wrong["vision_model.post_layernorm.weight"] = np.zeros(31, np.float32)
  with pytest.raises(ValueError, match="post_layernorm.weight: shape"):
    hf_clip.from_hf(config, wrong)
  # Buffers of older checkpoints are tolerated.
  buffered = dict(tensors, **{"text_model.embeddings.position_ids": np.arange(12)[None]})
  hf_clip.from_hf(config, buffered)
  if name != "clip":
    return
  model, params = hf_clip.from_hf(config, tensors)
  # Pooling at the last non-pad token has no transformers counterpart.
  last_non_pad = model.clone(text=dict(model.text, eot_id=None))
  with pytest.raises(ValueError, match="eot_id"):
    hf_clip.hf_config(last_non_pad, image_size=20)
  # A clamped scale that the params exceed would differ in transformers.
  with pytest.raises(ValueError, match="max_scale=100"):
    hf_clip.save(tmp_path / "clamped", model.clone(max_scale=100.0), params)
  # Siglip2Model trains with the sigmoid loss.
  with pytest.raises(ValueError, match="'softmax' loss is not Siglip2Model's"):
    hf_clip.hf_config(model, image_size=20, model_type="siglip2")
  with pytest.raises(NotImplementedError, match="vision_use_head"):
    hf_clip.config_from_hf({"model_type": "siglip", "vision_config": {"vision_use_head": False}})


def test_another_image_size_resamples_as_transformers(hf_dir):
  """Loaded for 28px images (a 7 x 7 grid from the 5 x 5 table), the outputs equal
  transformers' with `interpolate_pos_encoding=True` at 28px."""
  name, path, hf_model = hf_dir
  model, params = hf_clip.load(path, image_size=28)
  table = params["img"]["pos_embedding"]["pos_embedding"]
  assert table.shape[1] == 49 + (name != "siglip")
  pixels = np.random.default_rng(3).normal(size=(2, 3, 28, 28)).astype(np.float32)
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(TOKENS[name]), pixel_values=torch.tensor(pixels),
                   interpolate_pos_encoding=True)
  zimg, _, logits = _vljax_forward(model, params, pixels, TOKENS[name])
  np.testing.assert_allclose(zimg, out.image_embeds.numpy(), atol=1e-4)
  np.testing.assert_allclose(logits, out.logits_per_text.numpy(), atol=1e-4 * 150)
  assert hf_clip.image_size_of(model, params) == 28


# --- SigLIP 2 --------------------------------------------------------------------------------

SIGLIP2 = dict(
    text=dict(TEXT, hidden_act="gelu_pytorch_tanh", pad_token_id=1, bos_token_id=48,
              eos_token_id=1, projection_size=32),
    # A 5 x 5 position grid of 4px patches: 20px images at the stored grid.
    vision=dict({k: v for k, v in IMAGE.items() if k != "image_size"}, num_patches=25,
                hidden_act="gelu_pytorch_tanh"))


@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory):
  """(directory written by transformers' save_pretrained, the torch Siglip2Model)."""
  torch.manual_seed(0)
  config = transformers.Siglip2Config(text_config=SIGLIP2["text"],
                                      vision_config=SIGLIP2["vision"])
  model = _perturb(transformers.Siglip2Model(config).eval())
  path = tmp_path_factory.mktemp("siglip2")
  model.save_pretrained(path)
  return str(path), model


def _siglip2_forward(model, pixels_bchw, ids, patch=4):
  """Siglip2Model's outputs for images patchified as Siglip2ImageProcessor does, every patch
  valid, spatial_shapes the images' patch grid."""
  from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches
  patches = torch.stack([convert_image_to_patches(torch.tensor(x), patch) for x in pixels_bchw])
  batch, height, width = pixels_bchw.shape[0], pixels_bchw.shape[2], pixels_bchw.shape[3]
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), pixel_values=patches,
                pixel_attention_mask=torch.ones(patches.shape[:2], dtype=torch.int32),
                spatial_shapes=torch.tensor([[height // patch, width // patch]] * batch))
  return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_text.numpy()


def test_siglip2_import_parity(siglip2_dir):
  path, hf_model = siglip2_dir
  model, params = hf_clip.load(path)
  # SigLIP's towers: the fields a SiglipModel of the same sizes (20px images) gives.
  config, _ = hf.read_hf_dir(path)
  siglip = transformers.SiglipConfig(text_config=SIGLIP2["text"],
                                     vision_config=dict(SIGLIP2["vision"], image_size=20))
  assert hf_clip.config_from_hf(config) == hf_clip.config_from_hf(siglip.to_dict())
  pixels, ids = _pixels(), np.array(TOKENS["siglip"])
  want = _siglip2_forward(hf_model, pixels, ids)
  got = _vljax_forward(model, params, pixels, ids)
  for what, w, g in zip(("image embeddings", "text embeddings", "logits"), want, got):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=what)


def test_siglip2_other_grid_resamples_as_transformers(siglip2_dir):
  """Loaded for 24 x 12 images, the 5 x 5 table becomes 6 x 3 (rows grow, columns shrink: the
  antialiasing matters) as Siglip2Model resizes it for spatial_shapes (6, 3)."""
  path, hf_model = siglip2_dir
  model, params = hf_clip.load(path, image_size=(24, 12))
  assert params["img"]["pos_embedding"]["pos_embedding"].shape == (1, 18, 32)
  pixels = np.random.default_rng(4).normal(size=(2, 3, 24, 12)).astype(np.float32)
  ids = np.array(TOKENS["siglip"])
  want = _siglip2_forward(hf_model, pixels, ids)
  got = _vljax_forward(model, params, pixels, ids)
  for what, w, g in zip(("image embeddings", "text embeddings", "logits"), want, got):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=what)
  with pytest.raises(ValueError, match="not a square grid"):
    hf_clip.to_hf(model, params)


def test_siglip2_export(siglip2_dir, tmp_path):
  """Written back as a Siglip2Model: the same tensors, loaded strictly by transformers; as a
  SiglipModel (the default for the sigmoid loss): SigLIP's conv patchifying of the unpatchified
  image gives Siglip2Model's outputs."""
  path, hf_model = siglip2_dir
  config, tensors = hf.read_hf_dir(path)
  model, params = hf_clip.load(path)
  hf_clip.save(tmp_path / "siglip2", model, params, model_type="siglip2")
  config_back, tensors_back = hf.read_hf_dir(tmp_path / "siglip2")
  assert config_back["model_type"] == "siglip2"
  assert config_back["vision_config"]["num_patches"] == 25
  assert hf_clip.config_from_hf(config_back) == hf_clip.config_from_hf(config)
  assert sorted(tensors_back) == sorted(tensors)
  for key, value in tensors.items():
    np.testing.assert_array_equal(tensors_back[key], value, err_msg=key)
  scanned_model, scanned = hf_clip.load(path, scan=True)
  _, tensors_scanned = hf_clip.to_hf(scanned_model, scanned, model_type="siglip2")
  for key, value in tensors.items():
    np.testing.assert_array_equal(tensors_scanned[key], value, err_msg=key)
  _, info = transformers.Siglip2Model.from_pretrained(tmp_path / "siglip2",
                                                      output_loading_info=True)
  assert not any(info.values()), info

  hf_clip.save(tmp_path / "siglip", model, params)
  siglip, info = transformers.SiglipModel.from_pretrained(tmp_path / "siglip",
                                                          output_loading_info=True)
  assert not any(info.values()), info
  pixels, ids = _pixels(2), np.array(TOKENS["siglip"])
  want = _siglip2_forward(hf_model, pixels, ids)
  got = _hf_forward(siglip.eval(), pixels, ids)
  for what, w, g in zip(("image embeddings", "text embeddings", "logits"), want, got):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=what)


def test_siglip2_config_refusals():
  base = {"model_type": "siglip2", "text_config": {"projection_size": 768}}
  with pytest.raises(ValueError, match="num_patches=24 is not a square"):
    hf_clip.config_from_hf(dict(base, vision_config={"num_patches": 24}))
  with pytest.raises(NotImplementedError, match=r"patch_size=\[16, 8\]"):
    hf_clip.config_from_hf(dict(base, vision_config={"patch_size": [16, 8]}))
  with pytest.raises(NotImplementedError, match="lone SigLIP 2 text tower"):
    hf_clip.config_from_hf({"model_type": "siglip2_text_model"})
  fields = hf_clip.config_from_hf(base)  # transformers' defaults: 16px patches, a 16 x 16 grid
  assert fields["image"]["patch_size"] == 16 and fields["contrastive"] == "sigmoid"
