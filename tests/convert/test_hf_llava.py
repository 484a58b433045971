"""vljax.convert.hf_llava: tiny random transformers LlavaForConditionalGeneration directories
(a CLIP tower read at its penultimate layer with the CLS dropped, and a SigLIP tower read at its
last layer with every patch kept; a LLaMA LM with grouped-query attention and head_dim * heads
!= width) load into vljax's Llava with the same float32 logits (1e-4) on a batch of two rows
holding two and one images, and the same greedy answers; the older key layout of the released
checkpoints reads the same; a vljax Llava saved as a directory loads strictly into transformers
with the same logits, and reading it back gives its params; unsupported layouts are refused by
name. The 5 x 5 patch grid (20px images, 4px patches) is odd, and no two widths are equal."""
import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vljax.convert import checkpoints, hf, hf_llava  # noqa: E402
from vljax.models import llava  # noqa: E402

IMAGE_ID = 90
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              image_size=20, patch_size=4)
TEXT = dict(vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=12,
            max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500.0,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CASES = {
    "clip": dict(vision=transformers.CLIPVisionConfig(**VISION, hidden_act="quick_gelu"),
                 layer=-2, select="default", per_image=25),
    "siglip": dict(vision=transformers.SiglipVisionConfig(**VISION,
                                                          hidden_act="gelu_pytorch_tanh"),
                   layer=-1, select="full", per_image=25),
}


def _hf_model(name):
  case = CASES[name]
  config = transformers.LlavaConfig(
      vision_config=case["vision"], text_config=transformers.LlamaConfig(**TEXT),
      image_token_index=IMAGE_ID, vision_feature_layer=case["layer"],
      vision_feature_select_strategy=case["select"], projector_hidden_act="gelu")
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  torch.manual_seed(0)
  model = transformers.LlavaForConditionalGeneration(config).eval()
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():  # weights far from the init, so that every part moves the logits
    for key, param in model.named_parameters():
      normal = torch.randn(param.shape, generator=generator)
      if param.ndim == 1:
        param.copy_((1.0 if key.endswith("weight") else 0.0) + 0.1 * normal)
      elif "embed" in key or "class_embedding" in key:
        param.copy_(0.3 * normal)
      else:
        fan_in = param[0].numel()
        param.copy_(1.5 * normal / fan_in ** 0.5)
  return model


def _rows(per_image: int) -> np.ndarray:
  """Two rows of 60 tokens: one with two images between texts, one with one image."""
  rng = np.random.default_rng(2)
  row0 = [1] + list(rng.integers(3, 89, 3)) + [IMAGE_ID] * per_image + list(
      rng.integers(3, 89, 2)) + [IMAGE_ID] * per_image + list(rng.integers(3, 89, 4))
  row1 = [1] + [IMAGE_ID] * per_image + list(rng.integers(3, 89, 34))
  return np.array([row0, row1], np.int32)


def _images() -> np.ndarray:
  return np.random.default_rng(3).standard_normal((3, 20, 20, 3)).astype(np.float32)


def _vljax_inputs():
  """[B, N, H, W, 3] images (row 1's second slot empty) and their mask."""
  images = _images()
  batch = np.zeros((2, 2, 20, 20, 3), np.float32)
  batch[0], batch[1, 0] = images[:2], images[2]
  return batch, np.array([[True, True], [True, False]])


def _hf_logits(model, tokens) -> np.ndarray:
  pixels = torch.from_numpy(_images().transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                 pixel_values=pixels).logits.numpy()


def _logits(model, params, tokens) -> np.ndarray:
  images, mask = _vljax_inputs()
  apply = jax.jit(lambda p, i, t, m: model.apply({"params": p}, i, t, m)["logits"])
  return np.asarray(apply(params, images, tokens, mask))


@pytest.fixture(scope="module", params=sorted(CASES))
def imported(request, tmp_path_factory):
  name = request.param
  hf_model = _hf_model(name)
  directory = tmp_path_factory.mktemp(name)
  hf_model.save_pretrained(directory)
  model, params = hf_llava.load(directory)
  return dict(name=name, hf_model=hf_model, directory=str(directory), model=model,
              params=params)


def test_import_gives_transformers_logits_and_greedy_answers(imported):
  model, params, hf_model = imported["model"], imported["params"], imported["hf_model"]
  per_image = CASES[imported["name"]]["per_image"]
  assert model.num_image_tokens(20) == per_image
  assert model.kept_layers() == (2 if imported["name"] == "clip" else 3)
  tokens = _rows(per_image)
  want = _hf_logits(hf_model, tokens)
  got = _logits(model, params, tokens)
  assert np.abs(want).max() > 2.0  # not a comparison of near-zeros
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  if imported["name"] != "clip":
    return  # the decoding path is the same for either tower

  # Greedy answers: transformers' generate against the KV-cached prefill + decode.
  prompt = tokens[:, :58]  # every image whole
  pixels = torch.from_numpy(_images().transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    hf_out = hf_model.generate(input_ids=torch.from_numpy(prompt.astype(np.int64)),
                               pixel_values=pixels, max_new_tokens=6, do_sample=False,
                               eos_token_id=2, pad_token_id=0)
  hf_tokens = hf_out[:, prompt.shape[1]:].numpy()
  images, mask = _vljax_inputs()
  ours = jax.jit(lambda p, i, t, m: llava.generate(model, p, i, t, image_mask_bn=m,
                                                   max_new_tokens=6, eos_id=2, pad_id=0))(
                                                       params, images, prompt, mask)
  np.testing.assert_array_equal(np.asarray(ours), hf_tokens)


def test_the_released_checkpoints_older_key_layout_reads_the_same(imported):
  config, tensors = hf.read_hf_dir(imported["directory"])
  legacy = {}
  for key, value in tensors.items():
    for new, old in (("model.language_model.", "language_model.model."),
                     ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
      if key.startswith(new):
        key = old + key[len(new):]
        break
    legacy[key] = value
  assert any(k.startswith("language_model.model.") for k in legacy)
  params = hf_llava.from_hf_state_dict(legacy, config)
  jax.tree.map(np.testing.assert_array_equal, params, imported["params"])


def test_export_loads_strictly_into_transformers_and_reads_back(imported, tmp_path):
  model, params = imported["model"], imported["params"]
  scanned = model.clone(scan=True)
  hf_llava.save(tmp_path / "out", scanned, hf_llava.scan_params(model, params),
                extra_config=dict(pad_token_id=0))
  hf_model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
      tmp_path / "out", output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"] and not info["error_msgs"], info
  config = json.load(open(os.path.join(tmp_path / "out", "config.json")))
  assert config["vision_config"]["num_hidden_layers"] == 3  # the whole tower's depth
  assert config["vision_feature_layer"] == CASES[imported["name"]]["layer"]
  tokens = _rows(CASES[imported["name"]]["per_image"])
  np.testing.assert_allclose(_hf_logits(hf_model.eval(), tokens),
                             _logits(model, params, tokens), atol=1e-4, rtol=1e-4)
  back_model, back = hf_llava.load(tmp_path / "out")
  assert back_model == model
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_the_checkpoint_registry_reads_it_as_the_llava_family(imported):
  read = checkpoints.read(imported["directory"])
  assert read.format == "transformers" and read.family == "llava"
  assert read.data["image_size"] == 20
  rebuilt = llava.Llava(**read.model)
  assert rebuilt.lm_module().config() == imported["model"].lm_module().config()
  assert rebuilt.vision_fields() == imported["model"].vision_fields()
  jax.tree.map(np.testing.assert_array_equal, read.params, imported["params"])
  scanned = read.scanned(read.params)
  assert "layers" in scanned["img"]["encoder"] and "layers" in scanned["language_model"]["decoder"]


def test_a_vljax_llava_exports_and_imports_to_itself(tmp_path):
  model = llava.Llava(vision=dict(width=24, depth=3, mlp_dim=40, num_heads=2, patch_size=4,
                                  class_token=True, pre_norm=True, patch_bias=False,
                                  act="quick_gelu", norm_eps=1e-5),
                      lm=dict(recipe="llama", vocab_size=61, width=32, depth=2, num_heads=4,
                              num_kv_heads=1, mlp_dim=48, max_len=64, norm_eps=1e-5),
                      projector="mlp2x_gelu", image_token_id=60)
  images = jnp.zeros((1, 1, 12, 12, 3))
  tokens = jnp.full((1, 9), 60, jnp.int32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, tokens)["params"])
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                        nn.meta.unbox(abstract))
  hf_llava.save(tmp_path / "out", model, params)
  back_model, back = hf_llava.load(tmp_path / "out")
  assert back_model.lm_module().config() == model.lm_module().config()
  assert back_model.vision_module().sizes() == model.vision_module().sizes()
  assert back_model.vision_fields()["depth"] == 2 and back_model.vision_depth() == 3
  assert (flax.traverse_util.flatten_dict(back).keys()
          == flax.traverse_util.flatten_dict(params).keys())
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_unsupported_layouts_are_refused_by_name():
  base = transformers.LlavaConfig(vision_config=CASES["clip"]["vision"],
                                  text_config=transformers.LlamaConfig(**TEXT)).to_dict()
  with pytest.raises(NotImplementedError, match=r"vision_feature_layer=\[-2, -1\]"):
    hf_llava.config_from_hf(dict(base, vision_feature_layer=[-2, -1]))
  with pytest.raises(NotImplementedError, match=r"text_config\.model_type='mistral'"):
    hf_llava.config_from_hf(dict(base, text_config=dict(base["text_config"],
                                                        model_type="mistral")))
  with pytest.raises(ValueError, match=r"feature_layer=-5 is outside the 3-layer"):
    hf_llava.config_from_hf(dict(base, vision_feature_layer=-5))
  siglip = dict(base, vision_config=CASES["siglip"]["vision"].to_dict())
  with pytest.raises(NotImplementedError, match="'default' drops a SigLIP tower's first patch"):
    hf_llava.config_from_hf(siglip)
  with pytest.raises(ValueError, match="model_type 'clip' is not 'llava'"):
    hf_llava.config_from_hf(dict(base, model_type="clip"))
  model = llava.Llava(variant="mu", lm=dict(vocab_size=50), projector="linear", image_token_id=7)
  with pytest.raises(ValueError, match="projector='linear'"):
    hf_llava.hf_config(model, image_size=16)
