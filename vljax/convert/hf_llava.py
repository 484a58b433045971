r"""Hugging Face LLaVA directories to and from vljax's `Llava`: `load` reads a transformers
`LlavaForConditionalGeneration` directory (config.json and safetensors; a CLIP or SigLIP vision
tower, the multi-modal projector, a LLaMA / Vicuna language model) into the module and its
params; `save` writes a Llava as a directory that transformers' `from_pretrained` loads strictly.

  model, params = hf_llava.load("/ckpt/llava-1.5-7b-hf")
  out = model.apply({"params": params}, images_bnhwc, tokens_bt)  # 576 placeholders per image
  hf_llava.save("/tmp/out", model, params)

How the original maps onto Llava:
- config.json: vision_config (model_type clip_vision_model / siglip_vision_model; the tower's
  layers as `hf_clip` reads CLIP / SigLIP), text_config (model_type llama, as `hf_lm`),
  image_token_index -> image_token_id, vision_feature_layer -> feature_layer (one int; lists
  of layers are refused), vision_feature_select_strategy "default" / "full" -> feature_select
  "patch" / "full", projector_hidden_act and multimodal_projector_bias -> the "mlp2x_gelu"
  projector's activation and biases. Entries a config.json leaves out take transformers 5.24's
  defaults (LlavaConfig, CLIPVisionConfig, LlamaConfig).
- Weights: transformers 5's keys (model.vision_tower.*, model.multi_modal_projector.*,
  model.language_model.*, lm_head.weight) or the older layout of the released llava-hf
  checkpoints (vision_tower.*, multi_modal_projector.*, language_model.model.*,
  language_model.lm_head.weight). The vision tower keeps its layers up to `feature_layer`; the
  layers after it, its post-LayerNorm and a SigLIP MAP head do not reach LLaVA's outputs and are
  not imported. `save` writes them back as identity placeholders (zero layers, a unit
  LayerNorm), so the exported config keeps the tower's depth and feature layer and transformers
  loads it strictly with the same outputs. A "linear" (LLaVA 1) projector has no transformers
  form and is refused.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vljax.convert import hf, hf_clip, hf_lm
from vljax.models import lm as lm_lib
from vljax.models.llava import Llava
from vljax.models.vit import ViT

MODEL_TYPE = "llava"
ARCHITECTURE = "LlavaForConditionalGeneration"
# config.json's vision model_type -> the hf_clip model type whose vision layout it has.
VISION_MODEL_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
_TEXT_MODEL_TYPES = ("llama",)
# transformers 5.24's defaults for entries a config.json leaves out.
_LLAVA_DEFAULTS = dict(image_token_index=32_000, projector_hidden_act="gelu",
                       vision_feature_select_strategy="default", vision_feature_layer=-2,
                       multimodal_projector_bias=True, tie_word_embeddings=False)
# LlavaConfig's vision_config when config.json has none: CLIP ViT-L/14 at 336 px.
_DEFAULT_VISION = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                       num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                       image_size=336)
_LLAMA_DEFAULTS = dict(model_type="llama", vocab_size=32_000, hidden_size=4096,
                       intermediate_size=11_008, num_hidden_layers=32, num_attention_heads=32,
                       hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
_SELECT = {"default": "patch", "full": "full"}
# The vision tower's options as ViT fields (class token, pre-LayerNorm, patch-embedding bias).
_TOWER_LAYOUTS = {"clip": dict(class_token=True, pre_norm=True, patch_bias=False),
                  "siglip": dict(class_token=False, pre_norm=False, patch_bias=True)}
# The older (transformers 4.x) key prefixes of released checkpoints -> transformers 5's.
_LEGACY_PREFIXES = (("language_model.model.", "model.language_model."),
                    ("language_model.lm_head.", "lm_head."),
                    ("vision_tower.", "model.vision_tower."),
                    ("multi_modal_projector.", "model.multi_modal_projector."))
_VISION, _PROJECTOR, _TEXT = ("model.vision_tower.", "model.multi_modal_projector.",
                              "model.language_model.")
_BUFFERS = (r".*\.position_ids", r".*rotary_emb\.inv_freq")
# The CLIP / SigLIP vision config reading and state-dict entries of hf_clip, and hf_lm's dtype
# helpers, shared rather than written twice.
# pylint: disable=protected-access
_clip_sub_config, _clip_grid, _clip_sizes, _clip_act, _clip_entries, _TO_HF_ACT = (
    hf_clip._sub_config, hf_clip._stored_grid, hf_clip._sizes, hf_clip._act, hf_clip._hf_entries,
    hf_clip._TO_HF_ACT)
_cast, _dtype_name = hf_lm._cast, hf_lm._dtype_name
# pylint: enable=protected-access
# hf_clip's tower keys start with the vision model's level, which transformers 5's
# CLIPVisionModel / SiglipVisionModel no longer have ("model.vision_tower.embeddings...").
_TOWER_MODEL = "vision_model."


# --- Configs ---------------------------------------------------------------------------------


def _check_model_type(config: Mapping[str, Any] | None, path: str = "config") -> None:
  if config is None:
    raise FileNotFoundError(f"{path} has no config.json next to its weights: the architecture "
                            "and sizes come from it")
  if config.get("model_type") != MODEL_TYPE:
    raise ValueError(f"{path}: model_type {config.get('model_type')!r} is not {MODEL_TYPE!r} "
                     f"({ARCHITECTURE})")


def _sub(config: Mapping[str, Any], name: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
  sub = config.get(name)
  if sub is None:
    sub = {}
  if not isinstance(sub, Mapping):
    raise ValueError(f"{name} must be a dict, got {type(sub).__name__}")
  return {**defaults, **{k: v for k, v in sub.items() if v is not None}}


def _vision_config(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
  """(hf_clip model type, the vision_config with CLIP's / SigLIP's defaults filled in)."""
  vision = _sub(config, "vision_config", _DEFAULT_VISION if config.get("vision_config") is None
                else {})
  vision_type = vision.get("model_type")
  if vision_type not in VISION_MODEL_TYPES:
    raise NotImplementedError(f"vision_config.model_type={vision_type!r}: vljax reads "
                              f"{', '.join(VISION_MODEL_TYPES)} towers")
  kind = VISION_MODEL_TYPES[vision_type]
  return kind, _clip_sub_config({"vision_config": vision}, kind, "vision")


def _text_config(config: Mapping[str, Any]) -> dict[str, Any]:
  text = _sub(config, "text_config", _LLAMA_DEFAULTS)
  if text.get("model_type") not in _TEXT_MODEL_TYPES:
    raise NotImplementedError(f"text_config.model_type={text.get('model_type')!r}: vljax reads "
                              f"{', '.join(_TEXT_MODEL_TYPES)} language models")
  # LlavaConfig ties the head when either config says so.
  tied = bool(text.get("tie_word_embeddings")) or bool(config.get("tie_word_embeddings", False))
  return {**text, "tie_word_embeddings": tied}


def config_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
  """Llava fields of a transformers LlavaConfig dict (config.json). Layouts vljax does not
  implement raise NotImplementedError naming them."""
  _check_model_type(config)
  top = {**_LLAVA_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
  kind, vision = _vision_config(config)
  _clip_grid(kind, vision)
  if int(vision.get("num_channels", 3)) != 3:
    raise NotImplementedError(f"num_channels={vision['num_channels']}: vljax towers read RGB")
  if vision["hidden_size"] % vision["num_attention_heads"]:
    raise ValueError(f"vision_config: hidden_size {vision['hidden_size']} is not a multiple of "
                     f"num_attention_heads {vision['num_attention_heads']}")
  layer = top["vision_feature_layer"]
  if not isinstance(layer, int) or isinstance(layer, bool):
    raise NotImplementedError(f"vision_feature_layer={layer!r}: vljax reads one layer (an int), "
                              "not the concatenated features of several")
  select = top["vision_feature_select_strategy"]
  if select not in _SELECT:
    raise NotImplementedError(f"vision_feature_select_strategy={select!r}; vljax reads "
                              f"{', '.join(_SELECT)}")
  if select == "default" and kind == "siglip":
    raise NotImplementedError("vision_feature_select_strategy='default' drops a SigLIP tower's "
                              "first patch (it has no class token); vljax drops class tokens "
                              "only ('full' keeps every patch)")
  fields = dict(
      vision=dict(_clip_sizes(vision), patch_size=int(vision["patch_size"]),
                  act=_clip_act(vision["hidden_act"]),
                  norm_eps=float(vision["layer_norm_eps"]), **_TOWER_LAYOUTS[kind]),
      lm=lm_lib.config_from_hf("llama", _text_config(config)),
      feature_layer=int(layer), feature_select=_SELECT[select], projector="mlp2x_gelu",
      projector_act=_clip_act(top["projector_hidden_act"]),
      projector_bias=bool(top["multimodal_projector_bias"]),
      image_token_id=int(top["image_token_index"]))
  Llava(**fields).vision_fields()  # feature_layer inside the tower, a class token to drop
  return fields


def _tower_kind(model: Llava) -> str:
  """"clip" or "siglip": the transformers tower whose layout the ViT has; refuses others."""
  fields = model.vision_fields()
  for kind, layout in _TOWER_LAYOUTS.items():
    if all(bool(fields.get(k, ViT.__dataclass_fields__[k].default)) == v
           for k, v in layout.items()):
      break
  else:
    _refuse("its vision tower is neither CLIP's (class_token, pre_norm, no patch bias) nor "
            "SigLIP's (none of them)")
  for key, want in (("stem", "patch"), ("posemb", "learn")):
    value = fields.get(key, ViT.__dataclass_fields__[key].default)
    if value != want:
      _refuse(f"vision.{key}={value!r}; transformers' towers have {key}={want!r}")
  return kind


def _refuse(reason: str) -> None:
  raise ValueError(f"transformers cannot express this vljax Llava: {reason}")


def _describe(model: Llava) -> dict[str, Any]:
  """What decides `model`'s outputs, sizes resolved."""
  vision = model.vision_fields()
  tower = ViT(**vision)
  out = {f"vision.{k}": v for k, v in tower.sizes().items()}
  for key in ("stem", "posemb", "class_token", "pre_norm", "patch_bias", "act", "norm_eps"):
    out[f"vision.{key}"] = getattr(tower, key)
  out["vision.full_depth"] = model.vision_depth()
  out.update({f"lm.{k}": v for k, v in model.lm_module().config().items()})
  out.update(feature_layer=model.feature_layer, feature_select=model.feature_select,
             projector=model.projector_kind(), projector_act=model.projector_act,
             projector_bias=model.projector_bias, image_token_id=model.placeholder_id())
  return out


def hf_config(model: Llava, *, image_size: int, **extra: Any) -> dict[str, Any]:
  """The transformers config.json dict (LlavaForConditionalGeneration) of a Llava seeing
  `image_size`-pixel square images, such that `config_from_hf` gives the module back;
  configs transformers cannot express raise a ValueError naming the fields. `extra` adds or
  overrides entries."""
  if not isinstance(model, Llava):
    raise TypeError(f"hf_config exports vljax Llava modules, got {type(model).__name__}")
  if model.projector_kind() != "mlp2x_gelu":
    _refuse(f"projector={model.projector_kind()!r}: transformers' LlavaMultiModalProjector is "
            "Linear, activation, Linear ('mlp2x_gelu')")
  kind = _tower_kind(model)
  tower = model.vision_module()
  sizes = tower.sizes()
  if tower.act not in _TO_HF_ACT or model.projector_act not in _TO_HF_ACT:
    _refuse(f"activations {tower.act!r} / {model.projector_act!r} need transformers names")
  vision = dict(model_type=f"{kind}_vision_model", hidden_size=sizes["width"],
                intermediate_size=sizes["mlp_dim"], num_hidden_layers=model.vision_depth(),
                num_attention_heads=sizes["num_heads"], image_size=int(image_size),
                patch_size=sizes["patch_size"], num_channels=3,
                hidden_act=_TO_HF_ACT[tower.act],
                layer_norm_eps=float(tower.norm_eps), attention_dropout=0.0)
  if kind == "siglip":
    vision["vision_use_head"] = False  # LLaVA never reads the MAP head
  text = hf_lm.hf_config(model.lm_module())
  text.pop("architectures", None)
  config = dict(
      model_type=MODEL_TYPE, architectures=[ARCHITECTURE], vision_config=vision,
      text_config=text, image_token_index=model.placeholder_id(),
      image_seq_length=model.num_image_tokens(int(image_size)),
      projector_hidden_act=_TO_HF_ACT[model.projector_act],
      multimodal_projector_bias=bool(model.projector_bias),
      vision_feature_layer=int(model.feature_layer),
      vision_feature_select_strategy="default" if model.feature_select == "patch" else "full",
      tie_word_embeddings=bool(text["tie_word_embeddings"]))
  back, mine = _describe(Llava(**config_from_hf(config))), _describe(model)
  differing = sorted(k for k in set(back) | set(mine) if back.get(k) != mine.get(k))
  if differing:
    _refuse(", ".join(f"{k}={mine.get(k)!r} (transformers would read {back.get(k)!r})"
                      for k in differing))
  return {**config, **extra}


# --- State dict mapping ----------------------------------------------------------------------

# (hf key, vljax path, layout, hf shape, vljax shape), as `hf_clip`'s entries.
_Entry = tuple[str, tuple[str, ...], str, tuple[int, ...], tuple[int, ...]]


def _vision_entries(kind: str, vision: Mapping[str, Any], depth: int, grid: int) -> list[_Entry]:
  """The tower entries of `depth` layers (keys under "model.vision_tower.", paths under "img"),
  from hf_clip's mapping of the same tower, without its final norm and heads."""
  image = dict(vision, depth=depth, pool="cls" if vision["class_token"] else "none", out_dim=1)
  stub_text = dict(width=1, depth=0, num_heads=1, mlp_dim=1, vocab_size=1, max_len=1, out_dim=1)
  entries = _clip_entries(kind, {"image": image, "text": stub_text}, grid)
  dropped = (("img", "encoder", "final_norm"), ("img", "map_head"), ("img", "head"))
  return [(_VISION + key[len(_TOWER_MODEL):], path, layout, hf_shape, shape)
          for key, path, layout, hf_shape, shape in entries
          if path[0] == "img" and not any(path[:len(d)] == d for d in dropped)]


def _projector_entries(vision_width: int, width: int, bias: bool) -> list[_Entry]:
  entries = []
  for name, fan_in in (("linear_1", vision_width), ("linear_2", width)):
    path = ("mm_projector", name, "dense")
    entries.append((f"{_PROJECTOR}{name}.weight", path + ("kernel",), "linear", (width, fan_in),
                    (fan_in, width)))
    if bias:
      entries.append((f"{_PROJECTOR}{name}.bias", path + ("bias",), "", (width,), (width,)))
  return entries


def _tower_fields(model: Llava) -> dict[str, Any]:
  """The tower options and sizes hf_clip's entries read."""
  tower = model.vision_module()
  return dict(tower.sizes(), class_token=bool(tower.class_token), pre_norm=tower.pre_norm,
              patch_bias=tower.patch_bias)


def _normalise_keys(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Keys in transformers 5's layout (older checkpoints' prefixes renamed)."""
  out = {}
  for key, value in state.items():
    for old, new in _LEGACY_PREFIXES:
      if key.startswith(old):
        key = new + key[len(old):]
        break
    if key.startswith(_VISION + _TOWER_MODEL):  # CLIPVisionModel's level before transformers 5
      key = _VISION + key[len(_VISION + _TOWER_MODEL):]
    if key in out:
      raise ValueError(f"{key!r} appears under two layouts of the checkpoint")
    out[key] = np.asarray(value)
  return out


def _unused_vision_keys(kind: str, tower: Mapping[str, Any], full_depth: int, grid: int,
                        state: Mapping[str, Any]) -> set[str]:
  """The keys of `state` that do not reach LLaVA's outputs: the tower's layers after the
  features, its post-LayerNorm and SigLIP's MAP head."""
  kept = {e[0] for e in _vision_entries(kind, tower, tower["depth"], grid)}
  later = {e[0] for e in _vision_entries(kind, tower, full_depth, grid)} - kept
  base = _VISION
  return {key for key in state if key in later or key.startswith(base + "post_layernorm.")
          or (kind == "siglip" and key.startswith(base + "head."))}


def from_hf_state_dict(state_dict: Mapping[str, Any], config: Mapping[str, Any], *,
                       scan: bool = False) -> dict:
  """vljax params of `Llava(**config_from_hf(config))` (both stacks scanned with `scan`) from a
  LlavaForConditionalGeneration state dict of NumPy arrays; dtypes are kept. Every key must be
  used (buffers and the tower's unused tail aside) and every shape must match, else a
  ValueError names them."""
  fields = config_from_hf(config)
  model = Llava(**fields)
  kind, vision = _vision_config(config)
  grid = _clip_grid(kind, vision)
  state = _normalise_keys(state_dict)
  tower = _tower_fields(model)
  width = model.lm_module().config()["width"]
  entries = (_vision_entries(kind, tower, tower["depth"], grid)
             + _projector_entries(tower["width"], width, model.projector_bias))
  text_state = {"model." + k[len(_TEXT):] if k.startswith(_TEXT) else k: v
                for k, v in state.items() if k.startswith(_TEXT) or k == "lm_head.weight"}
  rest = {k: v for k, v in state.items() if not (k.startswith(_TEXT) or k == "lm_head.weight")}
  for key in _unused_vision_keys(kind, tower, model.vision_depth(), grid, rest):
    del rest[key]
  hf.check_keys([e[0] for e in entries], rest, f"the {ARCHITECTURE} state dict",
                allow_unexpected=_BUFFERS)
  flat = {}
  for key, path, layout, hf_shape, shape in entries:
    value = rest[key]
    if value.shape != hf_shape:
      raise ValueError(f"{key}: shape {value.shape}, expected {hf_shape} from the config")
    if layout == "linear":
      value = value.T
    elif layout == "conv":
      value = value.transpose(2, 3, 1, 0)
    flat[path] = np.array(value.reshape(shape), order="C")
  params = flax.traverse_util.unflatten_dict(flat)
  params["language_model"] = lm_lib.from_hf_state_dict("llama", text_state,
                                                       _text_config(config))
  return scan_params(model, params) if scan else params


def _unscanned(model: Llava, params: Mapping) -> dict:
  """Params with both stacks unscanned."""
  params = dict(params)
  encoder = dict(params["img"]["encoder"])
  if "layers" in encoder:
    layers = encoder.pop("layers")
    for i in range(model.kept_layers()):
      encoder[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], layers)
    params["img"] = {**params["img"], "encoder": encoder}
  if "layers" in params["language_model"]["decoder"]:
    depth = model.lm_module().config()["depth"]
    params["language_model"] = lm_lib.unstack_layers(params["language_model"], depth)
  return params


def scan_params(model: Llava, params: Mapping) -> dict:
  """Unscanned Llava params with both stacks in the scanned layout (layers stacked)."""
  params = dict(params)
  encoder = dict(params["img"]["encoder"])
  if "layers" not in encoder:
    layers = [encoder.pop(f"layer_{i}") for i in range(model.kept_layers())]
    encoder["layers"] = jax.tree.map(lambda *x: np.stack(x), *layers)
    params["img"] = {**params["img"], "encoder": encoder}
  if "layers" not in params["language_model"]["decoder"]:
    depth = model.lm_module().config()["depth"]
    params["language_model"] = lm_lib.stack_layers(params["language_model"], depth)
  return params


def to_hf_state_dict(model: Llava, params: Mapping, image_size: int) -> dict[str, np.ndarray]:
  """The LlavaForConditionalGeneration state dict (NumPy) of `params` of `model` (scanned or
  not): the tower's layers after the features as zeros (identity residual layers) and its
  post-LayerNorm as a unit one, which LLaVA's outputs never read."""
  params = _unscanned(model, jax.tree.map(np.asarray, nn.meta.unbox(params)))
  flat = flax.traverse_util.flatten_dict(params)
  kind, tower = _tower_kind(model), _tower_fields(model)
  grid = int(image_size) // tower["patch_size"]
  width = model.lm_module().config()["width"]
  state = {}
  for key, path, layout, hf_shape, _ in (_vision_entries(kind, tower, tower["depth"], grid)
                                         + _projector_entries(tower["width"], width,
                                                              model.projector_bias)):
    value = flat[path]
    if layout == "linear":
      value = value.reshape(hf_shape[::-1]).T
    elif layout == "conv":
      out, cin, kh, kw = hf_shape
      value = value.reshape(kh, kw, cin, out).transpose(3, 2, 0, 1)
    state[key] = np.array(value.reshape(hf_shape), order="C")
  dtype = state[_VISION + "embeddings.patch_embedding.weight"].dtype
  for key, _, _, hf_shape, _ in _vision_entries(kind, tower, model.vision_depth(), grid):
    if key not in state:  # a layer after the features
      state[key] = np.zeros(hf_shape, dtype)
  for name, fill in (("weight", np.ones), ("bias", np.zeros)):
    state[f"{_VISION}post_layernorm.{name}"] = fill((tower["width"],), dtype)
  text_config = hf_lm.hf_config(model.lm_module())
  for key, value in lm_lib.to_hf_state_dict("llama", params["language_model"],
                                            text_config).items():
    state[_TEXT + key[len("model."):] if key.startswith("model.") else key] = value
  return state


# --- Reading ---------------------------------------------------------------------------------


def from_hf(config: Mapping[str, Any], tensors: Mapping[str, Any], *,
            scan: bool = False) -> tuple[Llava, dict]:
  """(Llava, params) of a config.json dict and a state dict of arrays (what `read_hf_dir`
  returns)."""
  model = Llava(**config_from_hf(config), scan=scan)
  return model, from_hf_state_dict(tensors, config, scan=scan)


def load(path: str | os.PathLike[str], *, scan: bool = False) -> tuple[Llava, dict]:
  """(Llava, params as NumPy arrays) of a transformers LlavaForConditionalGeneration directory.
  Images are [B, N, H, W, 3] at the config's image_size (transformers' pixel_values
  transposed). Other model types, unsupported layouts, missing files, pickle-only
  directories, keys the mapping does not expect or lacks and shape mismatches raise naming the
  problem."""
  path = os.fspath(path)
  config_path = os.path.join(path, hf.CONFIG_NAME)
  if os.path.isdir(path) and os.path.isfile(config_path):
    with open(config_path, "rb") as f:  # refuse before reading the weights
      try:
        early = json.load(f)
      except ValueError:
        early = None
    if isinstance(early, dict):
      _check_model_type(early, path)
  config, tensors = hf.read_hf_dir(path)
  _check_model_type(config, path)
  try:
    return from_hf(config, tensors, scan=scan)
  except NotImplementedError as e:
    raise NotImplementedError(f"{path}: {e}") from e
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


# --- Writing ---------------------------------------------------------------------------------


def image_size_of(model: Llava, params: Mapping) -> int:
  """The square image size whose patch grid fills the vision tower's position table."""
  tower = model.vision_module()
  table = nn.meta.unbox(params)["img"]["pos_embedding"]["pos_embedding"]
  positions = table.shape[1] - (1 if tower.class_token else 0)
  grid = math.isqrt(positions)
  if grid * grid != positions:
    _refuse(f"the image position table has {positions} patch rows, not a square grid")
  return grid * tower.sizes()["patch_size"]


def _check_params(model: Llava, params: Mapping, image_size: int) -> None:
  """Raises a ValueError naming missing, unexpected and misshapen parameters."""
  params = _unscanned(model, params)
  images = jnp.zeros((1, 1, image_size, image_size, 3))
  tokens = jnp.zeros((1, 1), jnp.int32)
  probe = model.clone(scan=False, check_image_tokens=False)
  abstract = jax.eval_shape(lambda: probe.init(jax.random.PRNGKey(0), images, tokens,
                                               jnp.zeros((1, 1), bool))["params"])
  want = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract), sep="/")
  got = flax.traverse_util.flatten_dict(params, sep="/")
  hf.check_keys(want, got, "the params of this Llava")
  misshapen = [f"{k}: {tuple(np.shape(got[k]))}, expected {tuple(want[k].shape)}" for k in want
               if tuple(np.shape(got[k])) != tuple(want[k].shape)]
  if misshapen:
    raise ValueError(f"the params of this Llava have {len(misshapen)} wrong shape(s): "
                     f"{'; '.join(misshapen[:5])}")


def to_hf(model: Llava, params: Mapping) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json dict, state dict of NumPy arrays) of `params` of `model`, scanned or not."""
  params = nn.meta.unbox(params)
  if set(params) == {"params"}:  # the variables dict of `model.init`
    params = params["params"]
  image_size = image_size_of(model, params)
  config = hf_config(model, image_size=image_size)
  _check_params(model, params, image_size)
  return config, to_hf_state_dict(model, params, image_size)


def save(path: str | os.PathLike[str], model: Llava, params: Mapping, *, dtype: Any = None,
         overwrite: bool = False, extra_config: Mapping[str, Any] | None = None,
         max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """Writes `params` of `model` as a transformers LlavaForConditionalGeneration directory:
  config.json (`hf_config`, image_size from the position table, plus `extra_config`) and
  safetensors, sharded above `max_shard_bytes`; `dtype` ("bfloat16", "float16", "float32")
  casts the floating tensors. Returns the paths written; an existing model directory needs
  `overwrite`."""
  config, tensors = to_hf(model, params)
  if dtype is not None:
    tensors = _cast(tensors, dtype)
  config.update(dict(extra_config or {}))
  name = _dtype_name(tensors)
  if name is not None:
    config.setdefault("dtype", name)  # transformers 5 (4.x: torch_dtype)
    config.setdefault("torch_dtype", name)
  return hf.write_hf_dir(path, config, tensors, max_shard_bytes=max_shard_bytes,
                         overwrite=overwrite)
