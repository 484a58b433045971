r"""Hugging Face CLIP, SigLIP and SigLIP 2 directories to and from vljax's `TwoTower`: `load`
reads a transformers `CLIPModel` / `SiglipModel` / `Siglip2Model` directory (config.json and
safetensors) into the TwoTower module and its params; `save` writes a TwoTower as a directory
that transformers' `from_pretrained` loads strictly, with the config.json `hf_config` derives
from the module.

  model, params = hf_clip.load("/ckpt/clip-vit-base-patch32")
  out = model.apply({"params": params}, images_bhwc, tokens_bt)
  logits = out["scale"] * out["ztxt"] @ out["zimg"].T (+ out["bias"] for SigLIP)
  hf_clip.save("/tmp/out", model, params)

How the originals map onto TwoTower options:
- CLIP: ViT with a CLS token, pre-LayerNorm on the embeddings (`pre_norm`), a patch embedding
  without bias (`patch_bias=False`), the post-LayerNorm as the stack's final norm (it is
  per-token, so normalising every token and pooling the CLS one equals CLIP's order), bias-free
  projections. Causal text tower pooled at the end-of-text token as transformers finds it: the
  first `eos_token_id` (`eot_id`), or for configs with the legacy eos_token_id == 2 the largest
  token id (`pool="argmax"`). Pads are not masked (`mask_padding=False`): CLIP pads with the
  EOT id, and causal attention keeps the pads after EOT from its output anyway.
- SigLIP: ViT without CLS, patch embedding with bias, post-LayerNorm, MAP head (probe,
  torch's fused in_proj split into query / key / value, LayerNorm, MLP residual) with the
  tower's activation (`map_act`), no image projection; bidirectional text tower pooled at the
  last position with a biased head; logit bias.
- SigLIP 2 (`Siglip2Model`): SigLIP's towers, but the image tower embeds patches with a Linear
  layer over flattened patches (the processor's `convert_image_to_patches` order: patch row,
  patch column, channel) and fits its position grid (sqrt(num_patches) square) to each image's
  patch grid with antialiased bilinear interpolation. vljax reads it at one fixed resolution:
  the Linear weight becomes the conv kernel [p, p, 3, D], and the table is resampled once to
  the grid of `image_size` (by default the stored grid). A [B, H, W, 3] image then gives what
  transformers gives for the same image patchified, `spatial_shapes` (H / p, W / p) and every
  patch valid; NaFlex batches of padded, mixed-resolution patch lists have no TwoTower form.
- The logit scale exp(t') is not clamped (`max_scale=None`), as transformers does not clamp it.

`save` writes a CLIPModel (softmax loss) or a SiglipModel (sigmoid loss), so a TwoTower imported
from SigLIP 2 exports as the SiglipModel of its fixed resolution; `model_type="siglip2"` writes
a Siglip2Model instead. Single-tower directories are refused by name.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vljax.convert import hf, posemb
from vljax.models.text import TextTransformer
from vljax.models.two_tower import TwoTower
from vljax.models.vit import ViT

SUPPORTED_MODEL_TYPES = ("clip", "siglip", "siglip2")
_ARCHITECTURES = {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model"}
_REFUSED_MODEL_TYPES = {
    "clip_text_model": "a lone CLIP text tower; load a CLIPModel directory",
    "clip_vision_model": "a lone CLIP vision tower; load a CLIPModel directory",
    "siglip_text_model": "a lone SigLIP text tower; load a SiglipModel directory",
    "siglip_vision_model": "a lone SigLIP vision tower; load a SiglipModel directory",
    "siglip2_text_model": "a lone SigLIP 2 text tower; load a Siglip2Model directory",
    "siglip2_vision_model": "a lone SigLIP 2 vision tower; load a Siglip2Model directory",
}
# transformers activation names -> vljax's; vljax's -> the name exported.
_FROM_HF_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "relu": "relu", "silu": "silu"}
_TO_HF_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh",
              "relu": "relu", "silu": "silu"}
# transformers 5.24's config defaults, for config.json files that leave entries out.
_DEFAULTS = {
    ("clip", "text"): dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                           projection_dim=512, num_hidden_layers=12, num_attention_heads=8,
                           max_position_embeddings=77, hidden_act="quick_gelu",
                           layer_norm_eps=1e-5, pad_token_id=1, eos_token_id=49407),
    ("clip", "vision"): dict(hidden_size=768, intermediate_size=3072, projection_dim=512,
                             num_hidden_layers=12, num_attention_heads=12, num_channels=3,
                             image_size=224, patch_size=32, hidden_act="quick_gelu",
                             layer_norm_eps=1e-5),
    ("siglip", "text"): dict(vocab_size=32000, hidden_size=768, intermediate_size=3072,
                             num_hidden_layers=12, num_attention_heads=12,
                             max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                             layer_norm_eps=1e-6, pad_token_id=1, projection_size=None),
    ("siglip", "vision"): dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, num_channels=3, image_size=224,
                               patch_size=16, hidden_act="gelu_pytorch_tanh",
                               layer_norm_eps=1e-6, vision_use_head=True),
    ("siglip2", "text"): dict(vocab_size=32000, hidden_size=768, intermediate_size=3072,
                              num_hidden_layers=12, num_attention_heads=12,
                              max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                              layer_norm_eps=1e-6, pad_token_id=1, projection_size=None),
    ("siglip2", "vision"): dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, num_channels=3, num_patches=256,
                                patch_size=16, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6, vision_use_head=True),
}
# Non-persistent buffers that older checkpoints still hold.
_BUFFERS = (r".*\.position_ids",)
# The fields that decide a tower's function (not dtype, sharding, dropout or initialisation).
_IMAGE_FIELDS = ("stem", "posemb", "pool", "pre_norm", "patch_bias", "act", "norm_eps", "out_dim",
                 "out_bias")
_TEXT_FIELDS = ("vocab_size", "max_len", "causal", "pool", "pad_id", "eot_id", "mask_padding",
                "act", "norm_eps", "norm_position", "out_dim", "out_bias")


# --- Configs ---------------------------------------------------------------------------------


def handles(model_type: Any) -> bool:
  """Whether a config.json's model_type is this module's to read (or to refuse by name)."""
  return model_type in SUPPORTED_MODEL_TYPES or model_type in _REFUSED_MODEL_TYPES


def model_type_of(config: Mapping[str, Any] | None, path: str = "the directory") -> str:
  """The supported model_type of a config.json dict; a ValueError naming it otherwise."""
  if config is None:
    raise FileNotFoundError(f"{path} has no config.json next to its weights: the architecture "
                            "and sizes come from it")
  model_type = config.get("model_type")
  if model_type in _REFUSED_MODEL_TYPES:
    raise NotImplementedError(f"{path}: model_type {model_type!r} is not supported: "
                              f"{_REFUSED_MODEL_TYPES[model_type]}")
  if model_type not in SUPPORTED_MODEL_TYPES:
    what = (f"model_type {model_type!r}" if model_type is not None
            else "a config.json without model_type")
    raise ValueError(f"{path}: {what} is not supported; supported: "
                     f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  return model_type


def _sub_config(config: Mapping[str, Any], model_type: str, tower: str) -> dict[str, Any]:
  sub = config.get(f"{tower}_config") or {}
  if not isinstance(sub, Mapping):
    raise ValueError(f"{tower}_config must be a dict, got {type(sub).__name__}")
  return {**_DEFAULTS[(model_type, tower)], **{k: v for k, v in sub.items() if v is not None}}


def _act(name: Any) -> str:
  if name not in _FROM_HF_ACT:
    raise NotImplementedError(f"activation {name!r} has no vljax equivalent (vljax reads "
                              f"{', '.join(_FROM_HF_ACT)})")
  return _FROM_HF_ACT[name]


def _sizes(sub: Mapping[str, Any]) -> dict[str, int]:
  return dict(width=int(sub["hidden_size"]), depth=int(sub["num_hidden_layers"]),
              mlp_dim=int(sub["intermediate_size"]), num_heads=int(sub["num_attention_heads"]))


def _stored_grid(model_type: str, vision: Mapping[str, Any]) -> int:
  """The side of the square patch grid a vision config's position table holds."""
  patch = vision["patch_size"]
  if not isinstance(patch, int) or isinstance(patch, bool) or patch < 1:
    raise NotImplementedError(f"vision_config.patch_size={patch!r}: vljax reads one positive "
                              "int (square patches)")
  if model_type != "siglip2":
    return int(vision["image_size"]) // patch
  # Siglip2VisionEmbeddings views its num_patches rows as a square grid.
  positions = int(vision["num_patches"])
  side = math.isqrt(positions)
  if side < 1 or side * side != positions:
    raise ValueError(f"vision_config.num_patches={positions} is not a square: Siglip2Model "
                     "reshapes its position table to sqrt(num_patches) x sqrt(num_patches)")
  return side


def config_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
  """TwoTower fields of a transformers CLIPConfig / SiglipConfig / Siglip2Config dict
  (config.json). Layouts TwoTower does not implement raise NotImplementedError naming them."""
  model_type = model_type_of(config, "config")
  text, vision = (_sub_config(config, model_type, tower) for tower in ("text", "vision"))
  _stored_grid(model_type, vision)
  if int(vision.get("num_channels", 3)) != 3:
    raise NotImplementedError(f"num_channels={vision['num_channels']}: vljax towers read RGB")
  for tower, sub in (("text", text), ("vision", vision)):
    if sub["hidden_size"] % sub["num_attention_heads"]:
      raise ValueError(f"{tower}_config: hidden_size {sub['hidden_size']} is not a multiple of "
                       f"num_attention_heads {sub['num_attention_heads']}")
  image = dict(_sizes(vision), patch_size=int(vision["patch_size"]), stem="patch",
               posemb="learn", act=_act(vision["hidden_act"]),
               norm_eps=float(vision["layer_norm_eps"]))
  txt = dict(_sizes(text), vocab_size=int(text["vocab_size"]),
             max_len=int(text["max_position_embeddings"]), act=_act(text["hidden_act"]),
             norm_eps=float(text["layer_norm_eps"]), norm_position="pre", mask_padding=False)
  pad = text.get("pad_token_id")
  txt["pad_id"] = int(pad) if isinstance(pad, int) else 0
  if model_type == "clip":
    projection = int(config.get("projection_dim", text.get("projection_dim", 512)))
    image.update(pool="cls", pre_norm=True, patch_bias=False, out_dim=projection, out_bias=False)
    eos = text.get("eos_token_id")
    if isinstance(eos, list):  # transformers compares the config value itself with 2
      raise NotImplementedError(f"text_config.eos_token_id={eos}: CLIPTextModel needs one id")
    # transformers' CLIPTextModel: eos_token_id == 2 is the legacy config, pooled at the
    # largest id (OpenAI's EOT is the last of its vocabulary); else the first eos_token_id.
    pool = dict(pool="argmax", eot_id=None) if eos == 2 else dict(pool="eot", eot_id=int(eos))
    txt.update(causal=True, **pool, out_dim=projection, out_bias=False)
    return dict(image=image, text=txt, embed_dim=projection, contrastive="softmax",
                max_scale=None,
                temperature_init=float(config.get("logit_scale_init_value", math.log(1 / 0.07))))
  architecture = _ARCHITECTURES[model_type]
  if not vision.get("vision_use_head", True):
    raise NotImplementedError("a SigLIP vision tower without its MAP head (vision_use_head="
                              f"False) has no pooled output for {architecture}")
  projection = int(text.get("projection_size") or text["hidden_size"])
  if projection != vision["hidden_size"]:
    raise ValueError(f"text_config.projection_size {projection} differs from the vision width "
                     f"{vision['hidden_size']}: {architecture} compares the two directly")
  image.update(pool="map", pre_norm=False, patch_bias=True, map_act=image["act"], out_dim=None)
  txt.update(causal=False, pool="last", eot_id=None, out_dim=projection, out_bias=True)
  return dict(image=image, text=txt, embed_dim=projection, contrastive="sigmoid", max_scale=None)


def tower_modules(model: TwoTower) -> tuple[ViT, TextTransformer]:
  """The towers TwoTower.setup builds (unbound, for their resolved fields and sizes)."""
  image = ViT(**{"out_dim": model.embed_dim, **dict(model.image)})
  text = TextTransformer(**{"out_dim": model.embed_dim, **dict(model.text)})
  return image, text


def _describe(model: TwoTower) -> dict[str, Any]:
  """The fields that decide what `model` computes, sizes resolved."""
  image, text = tower_modules(model)
  out = {"contrastive": model.contrastive}
  out.update({f"image.{k}": v for k, v in image.sizes().items()})
  out.update({f"image.{k}": getattr(image, k) for k in _IMAGE_FIELDS})
  if image.pool == "map":
    out["image.map_act"] = image.map_act
  out.update({f"text.{k}": v for k, v in text.sizes().items()})
  out.update({f"text.{k}": getattr(text, k) for k in _TEXT_FIELDS})
  return out


def _refuse(reason: str) -> None:
  raise ValueError(f"transformers cannot express this vljax TwoTower: {reason}")


def _hf_act(act: str) -> str:
  if act not in _TO_HF_ACT:
    _refuse(f"act={act!r} has no transformers name vljax reads back")
  return _TO_HF_ACT[act]


def hf_config(model: TwoTower, *, image_size: int, model_type: str | None = None,
              **extra: Any) -> dict[str, Any]:
  """The transformers config.json dict (CLIPModel for the softmax loss, SiglipModel for the
  sigmoid one, or Siglip2Model with `model_type="siglip2"`) of a TwoTower seeing
  `image_size`-pixel square images (its position table's size; SigLIP 2 writes the patch
  count, num_patches, instead), such that `config_from_hf` gives the module's architecture
  back; configs transformers cannot express raise a ValueError naming the fields. `extra` adds
  or overrides entries."""
  if not isinstance(model, TwoTower):
    raise TypeError(f"hf_config exports vljax TwoTower modules, got {type(model).__name__}")
  if model_type is None:
    model_type = "clip" if model.contrastive == "softmax" else "siglip"
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"model_type {model_type!r} is not one vljax writes; choose one of "
                     f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  if (model_type == "clip") != (model.contrastive == "softmax"):
    _refuse(f"its contrastive={model.contrastive!r} loss is not {_ARCHITECTURES[model_type]}'s "
            f"({'softmax' if model_type == 'clip' else 'sigmoid'})")
  image, text = tower_modules(model)
  si, st = image.sizes(), text.sizes()

  def tower(s, act, eps):
    return dict(hidden_size=s["width"], num_hidden_layers=s["depth"],
                intermediate_size=s["mlp_dim"], num_attention_heads=s["num_heads"],
                hidden_act=_hf_act(act), layer_norm_eps=float(eps), attention_dropout=0.0)

  vision = dict(tower(si, image.act, image.norm_eps), image_size=int(image_size),
                patch_size=si["patch_size"], num_channels=3)
  txt = dict(tower(st, text.act, text.norm_eps), vocab_size=text.vocab_size,
             max_position_embeddings=text.max_len, pad_token_id=text.pad_id)
  if model_type == "clip":
    projection = model.embed_dim
    if text.pool == "argmax":
      eos = 2
    elif text.pool == "eot" and text.eot_id is not None:
      eos = text.eot_id
    else:
      _refuse(f"text pool={text.pool!r} with eot_id={text.eot_id!r}: CLIPTextModel pools at the "
              "first eos_token_id (set eot_id) or, for eos_token_id 2, at the largest id "
              "(pool='argmax')")
    txt.update(eos_token_id=eos, projection_dim=projection)
    vision.update(projection_dim=projection)
    t_init = model.temperature_init
    config = dict(projection_dim=projection, text_config=txt, vision_config=vision,
                  logit_scale_init_value=math.log(1 / 0.07) if t_init is None else t_init)
  else:
    txt.update(projection_size=text.out_dim)
    vision.update(vision_use_head=True)
    if model_type == "siglip2":  # the table is sized by its patch count, square
      grid = vision.pop("image_size") // si["patch_size"]
      vision.update(num_patches=grid * grid)
    config = dict(text_config=txt, vision_config=vision)
  # Whatever the checks above miss: transformers' reading of the config must be this model.
  back = _describe(TwoTower(**config_from_hf({"model_type": model_type, **config})))
  mine = _describe(model)
  differing = sorted(k for k in set(back) | set(mine) if back.get(k) != mine.get(k))
  if differing:
    _refuse(", ".join(f"{k}={mine.get(k)!r} (transformers' {_ARCHITECTURES[model_type]} has "
                      f"{back.get(k)!r})" for k in differing))
  return {"model_type": model_type, "architectures": [_ARCHITECTURES[model_type]], **config,
          **extra}


# --- State dict mapping ----------------------------------------------------------------------

# (hf key, vljax path, layout, hf shape, vljax shape); layout "linear": a torch Linear weight
# [out, in] transposed; "conv": a Conv2d weight [out, in, kh, kw] -> [kh, kw, in, out]; "": as is
# (reshaped).
_Entry = tuple[str, tuple[str, ...], str, tuple[int, ...], tuple[int, ...]]


def _hf_entries(model_type: str, fields: Mapping[str, Any], grid: int) -> list[_Entry]:
  """Every parameter of an unscanned TwoTower built from `fields` (config_from_hf's), its
  position table a grid x grid square, and its transformers key. torch's fused
  MultiheadAttention in_proj of SigLIP's MAP head appears as "...in_proj:q.weight", ":k", ":v"
  (see _split_in_proj)."""
  entries: list[_Entry] = []
  image, text = fields["image"], fields["text"]

  def add(key, path, layout, hf_shape, shape):
    entries.append((key, tuple(path), layout, tuple(hf_shape), tuple(shape)))

  def norm(key, path, width):
    add(key + ".weight", path + ("norm", "scale"), "", (width,), (width,))
    add(key + ".bias", path + ("norm", "bias"), "", (width,), (width,))

  def linear(key, path, fan_in, fan_out, kernel_shape, bias_shape=None):
    add(key + ".weight", path + ("kernel",), "linear", (fan_out, fan_in), kernel_shape)
    if bias_shape is not None:
      add(key + ".bias", path + ("bias",), "", (fan_out,), bias_shape)

  def attention(key, path, width, heads, names=("q_proj", "k_proj", "v_proj")):
    head_dim = width // heads
    for name, target in zip(names, ("query", "key", "value")):
      linear(key + name, path + (target,), width, width, (width, heads, head_dim),
             (heads, head_dim))
    linear(key + "out_proj", path + ("out",), width, width, (heads, head_dim, width), (width,))

  def mlp(key, path, width, mlp_dim):
    linear(key + "fc1", path + ("fc1", "dense"), width, mlp_dim, (width, mlp_dim), (mlp_dim,))
    linear(key + "fc2", path + ("fc2", "dense"), mlp_dim, width, (mlp_dim, width), (width,))

  def encoder(prefix, tower, s):
    for i in range(s["depth"]):
      key, layer = f"{prefix}encoder.layers.{i}.", (tower, "encoder", f"layer_{i}")
      norm(key + "layer_norm1", layer + ("self_attn_norm",), s["width"])
      attention(key + "self_attn.", layer + ("self_attn",), s["width"], s["num_heads"])
      norm(key + "layer_norm2", layer + ("mlp_norm",), s["width"])
      mlp(key + "mlp.", layer + ("mlp",), s["width"], s["mlp_dim"])

  # Vision tower.
  width, patch, prefix = image["width"], image["patch_size"], "vision_model."
  positions = grid * grid + (1 if image["pool"] == "cls" else 0)
  if model_type == "siglip2":
    # A Linear over patches flattened as convert_image_to_patches does: (row in the patch,
    # column, channel), the conv kernel's [p, p, 3] order, so the transposed weight is it.
    linear(prefix + "embeddings.patch_embedding", ("img", "embedding", "conv"),
           patch * patch * 3, width, (patch, patch, 3, width), (width,))
  else:
    add(prefix + "embeddings.patch_embedding.weight", ("img", "embedding", "conv", "kernel"),
        "conv", (width, 3, patch, patch), (patch, patch, 3, width))
    if image["patch_bias"]:
      add(prefix + "embeddings.patch_embedding.bias", ("img", "embedding", "conv", "bias"), "",
          (width,), (width,))
  if image["pool"] == "cls":
    add(prefix + "embeddings.class_embedding", ("img", "cls"), "", (width,), (1, 1, width))
  add(prefix + "embeddings.position_embedding.weight", ("img", "pos_embedding", "pos_embedding"),
      "", (positions, width), (1, positions, width))
  if image["pre_norm"]:
    norm(prefix + "pre_layrnorm", ("img", "pre_norm"), width)
  encoder(prefix, "img", image)
  norm(prefix + "post_layernorm", ("img", "encoder", "final_norm"), width)
  if model_type in ("siglip", "siglip2"):
    head = ("img", "map_head")
    add(prefix + "head.probe", head + ("probe",), "", (1, 1, width), (1, 1, width))
    attention(prefix + "head.attention.", head + ("attn",), width, image["num_heads"],
              names=("in_proj:q", "in_proj:k", "in_proj:v"))
    norm(prefix + "head.layernorm", head + ("norm",), width)
    mlp(prefix + "head.mlp.", head + ("mlp",), width, image["mlp_dim"])
  else:
    linear("visual_projection", ("img", "head", "dense"), width, image["out_dim"],
           (width, image["out_dim"]))

  # Text tower.
  width, prefix = text["width"], "text_model."
  add(prefix + "embeddings.token_embedding.weight", ("txt", "token_embedding", "embedding"), "",
      (text["vocab_size"], width), (text["vocab_size"], width))
  add(prefix + "embeddings.position_embedding.weight", ("txt", "pos_embedding", "pos_embedding"),
      "", (text["max_len"], width), (1, text["max_len"], width))
  encoder(prefix, "txt", text)
  norm(prefix + "final_layer_norm", ("txt", "encoder", "final_norm"), width)
  if model_type in ("siglip", "siglip2"):
    linear(prefix + "head", ("txt", "head", "dense"), width, text["out_dim"],
           (width, text["out_dim"]), (text["out_dim"],))
    add("logit_scale", ("t",), "", (1,), ())
    add("logit_bias", ("b",), "", (1,), ())
  else:
    linear("text_projection", ("txt", "head", "dense"), width, text["out_dim"],
           (width, text["out_dim"]))
    add("logit_scale", ("t",), "", (), ())
  return entries


def _split_in_proj(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """torch MultiheadAttention's fused "...in_proj_weight" [3D, D] / "in_proj_bias" [3D] ->
  "...in_proj:q.weight" [D, D], ":k", ":v" (biases [D]); `_merge_in_proj` undoes it."""
  out = {}
  for key, value in state.items():
    match = re.fullmatch(r"(.*)\.in_proj_(weight|bias)", key)
    if not match:
      out[key] = value
      continue
    if value.shape[0] % 3:
      raise ValueError(f"{key}: shape {value.shape}, expected a first axis of 3 * width")
    for name, part in zip("qkv", np.split(value, 3, axis=0)):
      out[f"{match[1]}.in_proj:{name}.{match[2]}"] = part
  return out


def _merge_in_proj(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for key, value in state.items():
    match = re.fullmatch(r"(.*)\.in_proj:([qkv])\.(weight|bias)", key)
    if not match:
      out[key] = value
    elif match[2] == "q":
      out[f"{match[1]}.in_proj_{match[3]}"] = np.concatenate(
          [state[f"{match[1]}.in_proj:{name}.{match[3]}"] for name in "qkv"], axis=0)
  return out


def _grid(config: Mapping[str, Any]) -> int:
  """The side of the square patch grid of a config's position table."""
  model_type = model_type_of(config, "config")
  return _stored_grid(model_type, _sub_config(config, model_type, "vision"))


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
  for name in path:
    tree = tree[name]
  return tree


def from_hf_state_dict(state_dict: Mapping[str, Any], config: Mapping[str, Any], *,
                       scan: bool = False) -> dict:
  """vljax params of `TwoTower(**config_from_hf(config))` (towers scanned with `scan`) from a
  CLIPModel / SiglipModel state dict of NumPy arrays; dtypes are kept. Every key must be used
  (old checkpoints' position_ids buffers aside) and every shape must match, else a ValueError
  names them."""
  model_type = model_type_of(config, "config")
  fields = config_from_hf(config)
  entries = _hf_entries(model_type, fields, _grid(config))
  state = _split_in_proj({k: np.asarray(v) for k, v in state_dict.items()})
  hf.check_keys([e[0] for e in entries], state, f"the {_ARCHITECTURES[model_type]} state dict",
                allow_unexpected=_BUFFERS)
  params: dict = {}
  for key, path, layout, hf_shape, shape in entries:
    value = state[key]
    if value.shape != hf_shape:
      raise ValueError(f"{key}: shape {value.shape}, expected {hf_shape} from the config")
    if layout == "linear":
      value = value.T
    elif layout == "conv":
      value = value.transpose(2, 3, 1, 0)
    _set(params, path, np.array(value.reshape(shape), order="C"))  # 0-d stays 0-d
  return stack_layers(params, fields) if scan else params


def to_hf_state_dict(params: Mapping, config: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of `from_hf_state_dict` (scanned params too)."""
  model_type = model_type_of(config, "config")
  fields = config_from_hf(config)
  params = jax.tree.map(np.asarray, nn.meta.unbox(params))
  params = unstack_layers(params, fields)
  state = {}
  for key, path, layout, hf_shape, _ in _hf_entries(model_type, fields, _grid(config)):
    value = _get(params, path)
    if layout == "linear":
      value = value.reshape(hf_shape[::-1]).T
    elif layout == "conv":
      out, cin, kh, kw = hf_shape
      value = value.reshape(kh, kw, cin, out).transpose(3, 2, 0, 1)
    state[key] = np.array(value.reshape(hf_shape), order="C")
  return _merge_in_proj(state)


def stack_layers(params: Mapping, fields: Mapping[str, Any]) -> dict:
  """Unscanned TwoTower params ("<tower>/encoder/layer_i") -> scanned ("encoder/layers")."""
  out = dict(params)
  for tower, key in (("img", "image"), ("txt", "text")):
    encoder = dict(out[tower]["encoder"])
    if "layers" in encoder:
      continue
    layers = [encoder.pop(f"layer_{i}") for i in range(fields[key]["depth"])]
    encoder["layers"] = jax.tree.map(lambda *x: np.stack(x), *layers)
    out[tower] = {**out[tower], "encoder": encoder}
  return out


def unstack_layers(params: Mapping, fields: Mapping[str, Any]) -> dict:
  """The inverse of `stack_layers`; unscanned towers pass unchanged."""
  out = dict(params)
  for tower, key in (("img", "image"), ("txt", "text")):
    encoder = dict(out[tower]["encoder"])
    if "layers" not in encoder:
      continue
    layers = encoder.pop("layers")
    for i in range(fields[key]["depth"]):
      encoder[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], layers)
    out[tower] = {**out[tower], "encoder": encoder}
  return out


# --- Reading ---------------------------------------------------------------------------------


def _image_grid(image_size: int | tuple[int, int], patch: int) -> tuple[int, int]:
  """The patch grid (rows, columns) of `image_size` (square side or (height, width))."""
  size = (image_size, image_size) if np.ndim(image_size) == 0 else tuple(image_size)
  if len(size) != 2 or min(int(x) for x in size) < patch:
    raise ValueError(f"image_size {image_size!r}: expected a side or (height, width), each at "
                     f"least the patch size {patch}")
  return int(size[0]) // patch, int(size[1]) // patch


def from_hf(config: Mapping[str, Any], tensors: Mapping[str, Any], *, scan: bool = False,
            image_size: int | tuple[int, int] | None = None) -> tuple[TwoTower, dict]:
  """(TwoTower, params) of a config.json dict and a state dict of arrays (what `read_hf_dir`
  returns). An `image_size` (a side, or (height, width)) whose patch grid differs from the
  stored one resamples the position embeddings to that grid as transformers does: CLIP /
  SigLIP's `interpolate_pos_encoding=True` (bicubic, not antialiased), SigLIP 2's per-image
  resize to `spatial_shapes` (bilinear, antialiased)."""
  model_type = model_type_of(config, "config")
  fields = config_from_hf(config)
  if scan:
    fields = dict(fields, image=dict(fields["image"], scan=True),
                  text=dict(fields["text"], scan=True))
  model = TwoTower(**fields)
  params = from_hf_state_dict(tensors, config, scan=scan)
  stored = _grid(config)
  grid = stored, stored
  if image_size is not None:
    grid = _image_grid(image_size, fields["image"]["patch_size"])
  if grid != (stored, stored):
    prefix = 1 if fields["image"]["pool"] == "cls" else 0
    method = "bilinear_antialias" if model_type == "siglip2" else "bicubic"
    tables = params["img"]["pos_embedding"]
    table = posemb.resample(np.asarray(tables["pos_embedding"])[0], grid, method=method,
                            num_prefix=prefix)
    params["img"] = {**params["img"], "pos_embedding": {**tables, "pos_embedding": table[None]}}
  return model, params


def load(path: str | os.PathLike[str], *, scan: bool = False,
         image_size: int | tuple[int, int] | None = None) -> tuple[TwoTower, dict]:
  """(TwoTower, params as NumPy arrays) of a transformers CLIPModel / SiglipModel /
  Siglip2Model directory. Images are [B, H, W, 3] at the stored grid (CLIP / SigLIP: the
  config's image_size, transformers' pixel_values transposed; SigLIP 2: sqrt(num_patches)
  patches a side, the image before transformers' patchifying), or at `image_size` (a side or
  (height, width)) with the position embeddings resampled as transformers does.
  Unsupported model types, missing files, pickle-only directories, keys the mapping does not
  expect or lacks and shape mismatches raise naming the problem."""
  path = os.fspath(path)
  config_path = os.path.join(path, hf.CONFIG_NAME)
  if os.path.isdir(path) and os.path.isfile(config_path):
    with open(config_path, "rb") as f:  # refuse before reading the weights
      try:
        early = json.load(f)
      except ValueError:
        early = None
    if isinstance(early, dict):
      model_type_of(early, path)
  config, tensors = hf.read_hf_dir(path)
  model_type_of(config, path)
  try:
    return from_hf(config, tensors, scan=scan, image_size=image_size)
  except NotImplementedError as e:
    raise NotImplementedError(f"{path}: {e}") from e
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


# --- Writing ---------------------------------------------------------------------------------


def image_size_of(model: TwoTower, params: Mapping) -> int:
  """The square image size whose patch grid fills the image tower's position table."""
  image, _ = tower_modules(model)
  table = nn.meta.unbox(params)["img"]["pos_embedding"]["pos_embedding"]
  positions = table.shape[1] - (1 if image.pool == "cls" else 0)
  grid = math.isqrt(positions)
  if grid * grid != positions:
    _refuse(f"the image position table has {positions} patch rows, not a square grid")
  return grid * image.sizes()["patch_size"]


def _check_params(model: TwoTower, params: Mapping, image_size: int) -> None:
  """Raises a ValueError naming missing, unexpected and misshapen parameters."""
  scanned = {k: "layers" in params[k]["encoder"] for k in ("img", "txt")
             if k in params and "encoder" in params[k]}
  probe = model.clone(image=dict(model.image, scan=scanned.get("img", False)),
                      text=dict(model.text, scan=scanned.get("txt", False)))
  images = jnp.zeros((1, image_size, image_size, 3))
  tokens = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(lambda: probe.init(jax.random.PRNGKey(0), images, tokens)["params"])
  want = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract), sep="/")
  got = flax.traverse_util.flatten_dict(params, sep="/")
  hf.check_keys(want, got, "the params of this TwoTower")
  misshapen = [f"{k}: {tuple(np.shape(got[k]))}, expected {tuple(want[k].shape)}" for k in want
               if tuple(np.shape(got[k])) != tuple(want[k].shape)]
  if misshapen:
    raise ValueError(f"the params of this TwoTower have {len(misshapen)} wrong shape(s): "
                     f"{'; '.join(misshapen[:5])}")


def to_hf(model: TwoTower, params: Mapping, *, model_type: str | None = None
          ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json dict, state dict of NumPy arrays) of `params` of `model`, scanned or not;
  `model_type` as `hf_config`'s."""
  params = nn.meta.unbox(params)
  if set(params) == {"params"}:  # the variables dict of `model.init`
    params = params["params"]
  image_size = image_size_of(model, params)
  config = hf_config(model, image_size=image_size, model_type=model_type)
  _check_params(model, params, image_size)
  if model.max_scale is not None and float(np.exp(np.asarray(params["t"]))) > model.max_scale:
    _refuse(f"its logit scale exp(t)={float(np.exp(np.asarray(params['t']))):.4g} is clamped at "
            f"max_scale={model.max_scale}, and transformers does not clamp")
  return config, to_hf_state_dict(params, config)


def save(path: str | os.PathLike[str], model: TwoTower, params: Mapping, *,
         overwrite: bool = False, extra_config: Mapping[str, Any] | None = None,
         max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES,
         model_type: str | None = None) -> list[str]:
  """Writes `params` of `model` as a transformers CLIPModel (softmax loss) / SiglipModel
  (sigmoid loss) directory, or a Siglip2Model with `model_type="siglip2"` (sigmoid loss, its
  position table the square grid that every image then has as `spatial_shapes`): config.json
  (`hf_config`, image_size or num_patches from the position table, plus `extra_config`) and
  safetensors. Returns the paths written; an existing model directory needs `overwrite`."""
  config, tensors = to_hf(model, params, model_type=model_type)
  config.update(dict(extra_config or {}))
  floating = [v.dtype for v in tensors.values() if np.issubdtype(v.dtype, np.floating)
              or v.dtype.name == "bfloat16"]
  if floating:
    config.setdefault("dtype", floating[0].name)  # transformers 5 (4.x: torch_dtype)
    config.setdefault("torch_dtype", floating[0].name)
  return hf.write_hf_dir(path, config, tensors, max_shard_bytes=max_shard_bytes,
                         overwrite=overwrite)
