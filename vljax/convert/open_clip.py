r"""open_clip checkpoints to vljax: CLIP as `TwoTower`, CoCa as `CoCa` (layout="open_clip"), from
the directory open_clip's `push_to_hf_hub` publishes (`open_clip_config.json` with the model's
`model_cfg` and `preprocess_cfg`, and `open_clip_model.safetensors`), plus open_clip's eval image
transform. Pickle weights (`open_clip_pytorch_model.bin`) are refused, never opened.

  path = "/ckpt/CLIP-ViT-B-32-laion2B-s34B-b79K"
  model, params = open_clip.load(path)
  transform = open_clip.ImageTransform.from_config(open_clip.read_config(path))
  out = model.apply({"params": params}, transform(images), tokens_bt)
  logits = out["scale"] * out["ztxt"] @ out["zimg"].T (+ out["bias"] with init_logit_bias)

Tokens are open_clip's (`vljax.convert.clip_bpe.ClipBPETokenizer`, padded with 0). How the
originals map onto vljax:
- CLIP (OpenAI's layout with quick_gelu, LAION's with gelu): ViT with a class token, ln_pre
  (`pre_norm`), a bias-free patch embedding, ln_post as the stack's final norm (per token, so it
  commutes with taking the class token), `proj` as a bias-free head. Causal text tower pooled at
  the largest id (`pool="argmax"`: the EOT, the first one where ids tie), at the first `eos_id`
  (`pool_type="eos"`) or at the first / last token; pads (0) are ordinary tokens
  (`mask_padding=False`), as open_clip does not mask them. The logit scale exp(t) is not clamped
  (`max_scale=None`), as open_clip's forward returns it unclamped; `init_logit_bias` configs get
  the sigmoid loss's bias.
- CoCa: see `vljax.models.coca` for the layout. open_clip pools the image with one attentional
  pooler of N + 1 queries (query 0 contrastive, the others the captioning features) and LayerNorms
  its constant queries (`ln_q`), the ViT tokens (`ln_k`) and its output (`ln_post`). vljax's two
  poolers get the first query and the N others, each with the same attention weights and ln_post;
  ln_q is folded into the probes (LN(query) is a constant), ln_k becomes the ViT's final norm.
  Fine-tuned, the two poolers are then trained apart.

Config fields the importer cannot represent (layer scale `ls_init_value`, timm or ResNet image
towers, `hf_model_name` text towers, average pooling, the custom attention block's options, ...)
raise NotImplementedError naming the field; missing or extra tensors raise hf.KeyMismatchError
naming them.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import PIL.ImageOps

from vljax.convert import hf
from vljax.convert.hf_image import load_image
from vljax.models.coca import CoCa
from vljax.models.two_tower import TwoTower

CONFIG_NAME = "open_clip_config.json"
# The safetensors names open_clip looks for in a directory, in its order of preference.
WEIGHTS_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                 "model.safetensors")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_NORM_EPS = 1e-5  # torch's LayerNorm default, open_clip's unless norm_kwargs say otherwise

# open_clip 3.3's config dataclasses (CLIPVisionCfg, CLIPTextCfg, MultimodalCfg): each field and
# its default. A field at its default needs nothing; the converters read the others or refuse
# them by name.
_VISION_DEFAULTS: dict[str, Any] = dict(
    layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16, image_size=224,
    ls_init_value=None, patch_dropout=0.0, attentional_pool=False, attn_pooler_queries=256,
    attn_pooler_heads=8, no_ln_pre=False, pos_embed_type="learnable", final_ln_after_pool=False,
    pool_type="tok", output_tokens=False, act_kwargs=None, norm_kwargs=None, block_type=None,
    qk_norm=False, scaled_cosine_attn=False, scale_heads=False, scale_attn_inner=False,
    scale_attn=False, scale_fc=False, timm_model_name=None, timm_model_pretrained=False,
    timm_pool="avg", timm_proj="linear", timm_proj_bias=False, timm_drop=0.0,
    timm_drop_path=None)
_TEXT_DEFAULTS: dict[str, Any] = dict(
    context_length=77, vocab_size=49408, hf_tokenizer_name=None, tokenizer_mode=None,
    tokenizer_kwargs=None, width=512, heads=8, layers=12, mlp_ratio=4.0, ls_init_value=None,
    embed_cls=False, pad_id=0, eos_id=2, no_causal_mask=False, final_ln_after_pool=False,
    pool_type="argmax", proj_bias=False, proj_type="linear", output_tokens=False,
    act_kwargs=None, norm_kwargs=None, block_type=None, qk_norm=False, scaled_cosine_attn=False,
    scale_heads=False, scale_attn_inner=False, scale_attn=False, scale_fc=False,
    hf_model_name=None, hf_model_pretrained=True, hf_proj_type="mlp",
    hf_pooler_type="mean_pooler")
_MULTIMODAL_DEFAULTS: dict[str, Any] = dict(_TEXT_DEFAULTS, mlp_ratio=4, dim_head=64, heads=8,
                                            n_queries=256, attn_pooler_heads=8)
_MODEL_DEFAULTS: dict[str, Any] = dict(
    embed_dim=None, vision_cfg=None, text_cfg=None, multimodal_cfg=None, quick_gelu=False,
    init_logit_scale=math.log(1 / 0.07), init_logit_bias=None, nonscalar_logit_scale=False,
    custom_text=False, output_dict=False, pad_id=0, cast_dtype=None)
# Fields without effect on an inference forward pass (training only, tokenizer, or unused).
_VISION_IGNORED = frozenset({"patch_dropout", "output_tokens", "timm_model_pretrained",
                             "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
                             "timm_drop_path", "final_ln_after_pool"})
_TEXT_IGNORED = frozenset({"hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs",
                           "output_tokens", "hf_model_pretrained", "hf_proj_type",
                           "hf_pooler_type", "final_ln_after_pool"})
_MODEL_IGNORED = frozenset({"init_logit_scale", "nonscalar_logit_scale", "custom_text",
                            "output_dict", "pad_id", "cast_dtype"})
# Why a field at another value than its default is refused.
_REFUSALS = {
    "ls_init_value": "layer scale (LayerScale after attention and MLP) is not in vljax's blocks",
    "timm_model_name": "timm image towers are not open_clip ViTs",
    "hf_model_name": "Hugging Face text towers are not open_clip text transformers",
    "block_type": "open_clip's custom attention block is not vljax's",
    "qk_norm": "vljax's attention has no query / key LayerNorm",
    "scaled_cosine_attn": "vljax's attention is not cosine attention",
    "scale_heads": "vljax's attention has no per-head scale",
    "scale_attn_inner": "vljax's attention has no LayerNorm before its output projection",
    "scale_attn": "vljax's blocks have no LayerNorm after attention",
    "scale_fc": "vljax's MLP has no inner LayerNorm",
    "pool_type": "vljax's ViT pools the class token (open_clip's 'tok') only, with a class token",
    "no_causal_mask": "CoCa's unimodal text decoder is causal",
    "proj_bias": "CoCa's text projection has no bias",
    "proj_type": "the text tower needs its projection to the embedding",
    "attentional_pool": "an attentionally pooled CLIP is not a TwoTower (CoCa configs have a "
                        "multimodal_cfg)",
}


def _refuse(field: str, value: Any, reason: str) -> None:
  raise NotImplementedError(f"open_clip config field {field}={value!r} is not supported: {reason}")


def _resolve(cfg: Any, defaults: Mapping[str, Any], ignored: frozenset, where: str,
             handled: Sequence[str]) -> dict[str, Any]:
  """The fields of one (sub-)config over open_clip's defaults. Raises naming a field open_clip
  does not have, or one not at its default that is neither `handled` nor `ignored`."""
  if not isinstance(cfg, Mapping):
    raise ValueError(f"open_clip config {where} must be a JSON object, got {type(cfg).__name__}")
  unknown = sorted(set(cfg) - set(defaults))
  if unknown:
    names = ", ".join(f"{where}.{name}" for name in unknown)
    raise NotImplementedError(f"open_clip config field(s) {names} are not supported: open_clip "
                              "3.3 does not define them")
  fields = {**defaults, **cfg}
  for name, value in fields.items():
    if name not in handled and name not in ignored and value != defaults[name]:
      _refuse(f"{where}.{name}", value, _REFUSALS.get(name, "vljax does not read it"))
  return fields


def _norm_eps(fields: Mapping[str, Any], where: str) -> float:
  kwargs = fields["norm_kwargs"] or {}
  if set(kwargs) - {"eps"}:
    _refuse(f"{where}.norm_kwargs", kwargs, "vljax's LayerNorm takes an eps only")
  return float(kwargs.get("eps", _NORM_EPS))


def _act(quick_gelu: bool, fields: Mapping[str, Any], where: str) -> str:
  kwargs = fields["act_kwargs"] or {}
  if not kwargs:
    return "quick_gelu" if quick_gelu else "gelu"
  if not quick_gelu and kwargs == {"approximate": "tanh"}:
    return "gelu_tanh"
  _refuse(f"{where}.act_kwargs", kwargs, "vljax reads {'approximate': 'tanh'} with GELU only")
  return ""


def _int(value: Any, field: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
    raise ValueError(f"open_clip config field {field} must be an integer, got {value!r}")
  return int(value)


def _square(value: Any, field: str) -> int:
  """An int, or a pair of equal ints (open_clip's `to_2tuple`)."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      _refuse(field, value, "vljax's patches are square")
    value = value[0]
  return _int(value, field)


def _vision(model_cfg: Mapping[str, Any], coca: bool) -> tuple[dict[str, Any], dict[str, Any]]:
  """(the resolved vision_cfg, vljax ViT fields)."""
  raw = model_cfg.get("vision_cfg") or {}
  if isinstance(raw, Mapping):
    if raw.get("timm_model_name"):
      _refuse("vision_cfg.timm_model_name", raw["timm_model_name"], _REFUSALS["timm_model_name"])
    if isinstance(raw.get("layers"), (list, tuple)):
      _refuse("vision_cfg.layers", raw["layers"], "ResNet image towers (layers given per stage) "
              "are not ViTs")
  handled = ["layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size",
             "no_ln_pre", "pos_embed_type", "norm_kwargs", "act_kwargs"]
  if coca:
    handled += ["attentional_pool", "attn_pooler_queries", "attn_pooler_heads"]
  cfg = _resolve(raw, _VISION_DEFAULTS, _VISION_IGNORED, "vision_cfg", handled)
  if coca and cfg["attentional_pool"] is not True:
    _refuse("vision_cfg.attentional_pool", cfg["attentional_pool"],
            "vljax's CoCa pools the image with attentional poolers (open_clip's True)")
  if cfg["pos_embed_type"] not in ("learnable", "sin_cos_2d"):  # both tables are in the weights
    _refuse("vision_cfg.pos_embed_type", cfg["pos_embed_type"], "unknown to open_clip 3.3")
  width = _int(cfg["width"], "vision_cfg.width")
  head_width = _int(cfg["head_width"], "vision_cfg.head_width")
  if width % head_width:
    raise ValueError(f"open_clip config vision_cfg.width {width} is not a multiple of "
                     f"head_width {head_width}")
  image = dict(width=width, depth=_int(cfg["layers"], "vision_cfg.layers"),
               mlp_dim=int(width * float(cfg["mlp_ratio"])), num_heads=width // head_width,
               patch_size=_square(cfg["patch_size"], "vision_cfg.patch_size"), stem="patch",
               posemb="learn", pre_norm=not cfg["no_ln_pre"], patch_bias=False,
               act=_act(bool(model_cfg.get("quick_gelu", False)), cfg, "vision_cfg"),
               norm_eps=_norm_eps(cfg, "vision_cfg"))
  return cfg, image


def _model_cfg(config: Mapping[str, Any]) -> dict[str, Any]:
  """The model config of an open_clip_config.json dict (its "model_cfg"; a bare model config as
  in open_clip's model_configs/ is taken as is), checked at the top level."""
  if not isinstance(config, Mapping):
    raise ValueError(f"an open_clip config is a JSON object, got {type(config).__name__}")
  model_cfg = config.get("model_cfg", config)
  if not isinstance(model_cfg, Mapping):
    raise ValueError("open_clip config model_cfg must be a JSON object")
  for needed in ("embed_dim", "vision_cfg", "text_cfg"):
    if needed not in model_cfg:
      raise ValueError(f"open_clip config model_cfg lacks {needed!r}")
  handled = ["embed_dim", "vision_cfg", "text_cfg", "multimodal_cfg", "quick_gelu",
             "init_logit_bias"]
  return _resolve(model_cfg, _MODEL_DEFAULTS, _MODEL_IGNORED, "model_cfg", handled)


def is_coca(config: Mapping[str, Any]) -> bool:
  """Whether an open_clip config is a CoCa (it has a multimodal_cfg)."""
  return _model_cfg(config).get("multimodal_cfg") is not None


def _contrastive(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
  bias = model_cfg["init_logit_bias"]
  out = dict(contrastive="softmax" if bias is None else "sigmoid", max_scale=None,
             temperature_init=float(model_cfg["init_logit_scale"]))
  if bias is not None:
    out["bias_init"] = float(bias)
  return out


def two_tower_fields(config: Mapping[str, Any]) -> dict[str, Any]:
  """The `TwoTower` fields of an open_clip CLIP config (open_clip_config.json, or its
  model_cfg); unsupported fields raise NotImplementedError naming them."""
  model_cfg = _model_cfg(config)
  if model_cfg["multimodal_cfg"] is not None:
    raise ValueError("this open_clip config is a CoCa (it has a multimodal_cfg): use "
                     "coca_fields")
  _, image = _vision(model_cfg, coca=False)
  raw = model_cfg["text_cfg"]
  if isinstance(raw, Mapping) and raw.get("hf_model_name"):
    _refuse("text_cfg.hf_model_name", raw["hf_model_name"], _REFUSALS["hf_model_name"])
  handled = ["context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pad_id",
             "eos_id", "no_causal_mask", "pool_type", "proj_bias", "proj_type", "act_kwargs",
             "norm_kwargs"]
  cfg = _resolve(raw, _TEXT_DEFAULTS, _TEXT_IGNORED, "text_cfg", handled)
  if cfg["proj_type"] == "none":  # open_clip reads any other value as "linear"
    _refuse("text_cfg.proj_type", "none", _REFUSALS["proj_type"])
  pools = {"argmax": dict(pool="argmax", eot_id=None), "first": dict(pool="first", eot_id=None),
           "last": dict(pool="last", eot_id=None),
           "eos": dict(pool="eot", eot_id=_int(cfg["eos_id"], "text_cfg.eos_id"))}
  if cfg["pool_type"] not in pools:
    _refuse("text_cfg.pool_type", cfg["pool_type"], "a text tower pooled at one token is needed")
  width = _int(cfg["width"], "text_cfg.width")
  embed_dim = _int(model_cfg["embed_dim"], "embed_dim")
  text = dict(vocab_size=_int(cfg["vocab_size"], "text_cfg.vocab_size"), width=width,
              depth=_int(cfg["layers"], "text_cfg.layers"),
              mlp_dim=int(width * float(cfg["mlp_ratio"])),
              num_heads=_int(cfg["heads"], "text_cfg.heads"),
              max_len=_int(cfg["context_length"], "text_cfg.context_length"),
              causal=not cfg["no_causal_mask"], **pools[cfg["pool_type"]],
              pad_id=_int(cfg["pad_id"], "text_cfg.pad_id"), mask_padding=False,
              act=_act(bool(model_cfg["quick_gelu"]), cfg, "text_cfg"),
              norm_eps=_norm_eps(cfg, "text_cfg"), norm_position="pre", out_dim=embed_dim,
              out_bias=bool(cfg["proj_bias"]))
  image.update(pool="cls", class_token=True, out_dim=embed_dim, out_bias=False)
  return dict(image=image, text=text, embed_dim=embed_dim, **_contrastive(model_cfg))


def coca_fields(config: Mapping[str, Any]) -> dict[str, Any]:
  """The `CoCa` fields (layout="open_clip") of an open_clip CoCa config; what vljax's CoCa
  cannot express (towers of different widths, heads or MLP sizes, a text tower pooled other
  than at its CLS, ...) raises NotImplementedError naming the field."""
  model_cfg = _model_cfg(config)
  if model_cfg["multimodal_cfg"] is None:
    raise ValueError("this open_clip config has no multimodal_cfg: it is a CLIP, use "
                     "two_tower_fields")
  vision, image = _vision(model_cfg, coca=True)
  raw = model_cfg["text_cfg"]
  if isinstance(raw, Mapping) and raw.get("hf_model_name"):
    _refuse("text_cfg.hf_model_name", raw["hf_model_name"], _REFUSALS["hf_model_name"])
  # pool_type and eos_id do not matter: the appended CLS is always what is pooled.
  text = _resolve(raw, _TEXT_DEFAULTS, _TEXT_IGNORED | {"pool_type", "eos_id"}, "text_cfg",
                  ["context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
                   "embed_cls", "pad_id"])
  # open_clip's text decoder reads only these; the rest of MultimodalCfg is unused.
  multimodal = _resolve(model_cfg["multimodal_cfg"], _MULTIMODAL_DEFAULTS,
                        frozenset(_MULTIMODAL_DEFAULTS) - {"width", "heads", "layers",
                                                           "ls_init_value"},
                        "multimodal_cfg", ["width", "heads", "layers"])
  if text["embed_cls"] is not True:
    _refuse("text_cfg.embed_cls", text["embed_cls"], "CoCa's text tower appends a CLS")
  width = _int(text["width"], "text_cfg.width")
  embed_dim = _int(model_cfg["embed_dim"], "embed_dim")
  # vljax's CoCa has one width, head count and MLP size for both decoders and the poolers.
  for field, value, want in (("multimodal_cfg.width", multimodal["width"], width),
                             ("embed_dim", embed_dim, width),
                             ("multimodal_cfg.heads", multimodal["heads"], text["heads"]),
                             ("text_cfg.mlp_ratio", int(width * float(text["mlp_ratio"])),
                              4 * width)):
    if value != want:
      _refuse(field, value, f"vljax's CoCa needs it to match the text tower ({want}); open_clip "
                            "requires equal widths and its decoder's MLP is 4 x width")
  queries = _int(vision["attn_pooler_queries"], "vision_cfg.attn_pooler_queries")
  if queries < 2:
    _refuse("vision_cfg.attn_pooler_queries", queries, "one contrastive query and at least one "
            "captioning query are needed")
  if image.pop("norm_eps") != _NORM_EPS:  # open_clip's poolers keep torch's default eps
    _refuse("vision_cfg.norm_kwargs", vision["norm_kwargs"], "CoCa's LayerNorms share one eps")
  act = "quick_gelu" if model_cfg["quick_gelu"] else "gelu"
  if image.pop("act") != act:
    _refuse("vision_cfg.act_kwargs", vision["act_kwargs"], "CoCa's towers share one activation")
  return dict(image=image, vocab_size=_int(text["vocab_size"], "text_cfg.vocab_size"),
              width=width, num_heads=_int(text["heads"], "text_cfg.heads"), mlp_dim=4 * width,
              unimodal_depth=_int(text["layers"], "text_cfg.layers"),
              multimodal_depth=_int(multimodal["layers"], "multimodal_cfg.layers"),
              num_caption_queries=queries - 1,
              pool_heads=_int(vision["attn_pooler_heads"], "vision_cfg.attn_pooler_heads"),
              max_len=_int(text["context_length"], "text_cfg.context_length"),
              embed_dim=embed_dim, tied_output=False,
              pad_id=_int(text["pad_id"], "text_cfg.pad_id"),
              act=act, norm_eps=_NORM_EPS,
              layout="open_clip", **_contrastive(model_cfg))


def image_size(config: Mapping[str, Any]) -> tuple[int, int]:
  """(height, width) of the images the model's position table is made for."""
  size = (_model_cfg(config)["vision_cfg"] or {}).get("image_size", _VISION_DEFAULTS["image_size"])
  height, width = size if isinstance(size, (list, tuple)) else (size, size)
  return _int(height, "vision_cfg.image_size"), _int(width, "vision_cfg.image_size")


# --- State dict mapping ----------------------------------------------------------------------

# (open_clip key, vljax path, layout). Layouts: "linear_in" a torch Linear weight [out, in]
# transposed and reshaped to a kernel whose first axis is the input ([in, out] or [in, heads,
# head_dim]); "linear_out" the same to an attention output kernel [heads, head_dim, out];
# "matmul" a Parameter used as x @ P ([in, out], as is); "conv" [out, in, kh, kw] -> [kh, kw, in,
# out]; "bias" a vector, flattened in vljax ([heads, head_dim] for attention); "table" the same
# values with vljax's leading axes of size 1; "scalar" () or [1] -> (); "probe_first" /
# "probe_rest" query row 0 / rows 1.. as [1, Q, W].
_Entry = tuple[str, tuple[str, ...], str]


class _Entries:
  """Collects the mapping of one model, block by block."""

  def __init__(self):
    self.entries: list[_Entry] = []

  def add(self, key: str, path: Sequence[str], layout: str) -> None:
    self.entries.append((key, tuple(path), layout))

  def norm(self, key: str, path: Sequence[str]) -> None:
    self.add(key + ".weight", (*path, "norm", "scale"), "bias")
    self.add(key + ".bias", (*path, "norm", "bias"), "bias")

  def linear(self, key: str, path: Sequence[str]) -> None:
    self.add(key + ".weight", (*path, "dense", "kernel"), "linear_in")
    self.add(key + ".bias", (*path, "dense", "bias"), "bias")

  def attention(self, key: str, path: Sequence[str], fused: bool = True) -> None:
    """torch MultiheadAttention: a fused in_proj_weight ("...:q", ":k", ":v" once split), or
    q/k/v_proj_weight where keys and values have another width than queries."""
    for name, target in zip("qkv", ("query", "key", "value")):
      weight = f"{key}in_proj_weight:{name}" if fused else f"{key}{name}_proj_weight"
      self.add(weight, (*path, target, "kernel"), "linear_in")
      self.add(f"{key}in_proj_bias:{name}", (*path, target, "bias"), "bias")
    self.add(key + "out_proj.weight", (*path, "out", "kernel"), "linear_out")
    self.add(key + "out_proj.bias", (*path, "out", "bias"), "bias")

  def mlp(self, key: str, path: Sequence[str]) -> None:
    self.linear(key + "c_fc", (*path, "fc1"))
    self.linear(key + "c_proj", (*path, "fc2"))

  def resblock(self, key: str, path: Sequence[str]) -> None:
    """open_clip's ResidualAttentionBlock -> vljax's Block."""
    self.norm(key + "ln_1", (*path, "self_attn_norm"))
    self.attention(key + "attn.", (*path, "self_attn"))
    self.norm(key + "ln_2", (*path, "mlp_norm"))
    self.mlp(key + "mlp.", (*path, "mlp"))

  def vit(self, path: Sequence[str], image: Mapping[str, Any]) -> None:
    """The ViT up to its transformer (ln_post and the pooling differ by model)."""
    self.add("visual.conv1.weight", (*path, "embedding", "conv", "kernel"), "conv")
    self.add("visual.class_embedding", (*path, "cls"), "table")
    self.add("visual.positional_embedding", (*path, "pos_embedding", "pos_embedding"), "table")
    if image["pre_norm"]:
      self.norm("visual.ln_pre", (*path, "pre_norm"))
    for i in range(image["depth"]):
      self.resblock(f"visual.transformer.resblocks.{i}.", (*path, "encoder", f"layer_{i}"))

  def contrastive(self, sigmoid: bool) -> None:
    self.add("logit_scale", ("t",), "scalar")
    if sigmoid:
      self.add("logit_bias", ("b",), "scalar")


def _clip_entries(fields: Mapping[str, Any], text_prefix: str) -> list[_Entry]:
  e = _Entries()
  image, text = fields["image"], fields["text"]
  e.vit(("img",), image)
  e.norm("visual.ln_post", ("img", "encoder", "final_norm"))
  e.add("visual.proj", ("img", "head", "dense", "kernel"), "matmul")
  p = text_prefix
  e.add(p + "token_embedding.weight", ("txt", "token_embedding", "embedding"), "table")
  e.add(p + "positional_embedding", ("txt", "pos_embedding", "pos_embedding"), "table")
  for i in range(text["depth"]):
    e.resblock(f"{p}transformer.resblocks.{i}.", ("txt", "encoder", f"layer_{i}"))
  e.norm(p + "ln_final", ("txt", "encoder", "final_norm"))
  if text["out_bias"]:  # an nn.Linear
    e.linear(p + "text_projection", ("txt", "head"))
  else:
    e.add(p + "text_projection", ("txt", "head", "dense", "kernel"), "matmul")
  e.contrastive(fields["contrastive"] == "sigmoid")
  return e.entries


def _coca_entries(fields: Mapping[str, Any]) -> list[_Entry]:
  e = _Entries()
  image = fields["image"]
  e.vit(("img",), image)
  # One open_clip pooler -> vljax's two (same attention and ln_post, query 0 / queries 1..).
  fused = image["width"] == fields["width"]  # torch's MultiheadAttention with kdim == embed_dim
  e.norm("visual.attn_pool.ln_k", ("img", "encoder", "final_norm"))
  for pool, rows in (("contrastive_pool", "probe_first"), ("caption_pool", "probe_rest")):
    e.add("visual.attn_pool.query:normed", (pool, "probe"), rows)
    e.attention("visual.attn_pool.attn.", (pool, "attn"), fused=fused)
    e.norm("visual.ln_post", (pool, "norm"))
  e.add("visual.proj", ("img_proj", "dense", "kernel"), "matmul")
  e.add("text.token_embedding.weight", ("token_embedding", "embedding"), "table")
  e.add("text.positional_embedding", ("pos_embedding", "pos_embedding"), "table")
  e.add("text.cls_emb", ("cls",), "table")
  for i in range(fields["unimodal_depth"]):
    e.resblock(f"text.transformer.resblocks.{i}.", ("unimodal", f"layer_{i}"))
  e.norm("text.ln_final", ("cls_norm",))
  e.add("text.text_projection", ("txt_proj", "dense", "kernel"), "matmul")
  for i in range(fields["multimodal_depth"]):
    e.resblock(f"text_decoder.resblocks.{i}.", ("multimodal", f"layer_{i}", "self_block"))
    key, path = f"text_decoder.cross_attn.{i}.", ("multimodal", f"layer_{i}", "cross_block")
    e.norm(key + "ln_1", (*path, "cross_attn_norm"))
    e.norm(key + "ln_1_kv", (*path, "context_norm"))
    e.attention(key + "attn.", (*path, "cross_attn"))
    e.norm(key + "ln_2", (*path, "mlp_norm"))
    e.mlp(key + "mlp.", (*path, "mlp"))
  e.norm("text_decoder.ln_final", ("multimodal", "final_norm"))
  e.add("text_decoder.text_projection", ("head", "dense", "kernel"), "matmul")
  e.contrastive(fields["contrastive"] == "sigmoid")
  return e.entries


def _source_key(key: str) -> list[str]:
  """The checkpoint key(s) an entry reads."""
  if key == "visual.attn_pool.query:normed":
    return ["visual.attn_pool.query", "visual.attn_pool.ln_q.weight",
            "visual.attn_pool.ln_q.bias"]
  return [key.partition(":")[0]]


def _split_fused(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """torch's fused in_proj_weight [3D, D] / in_proj_bias [3D] also as "...:q", ":k", ":v"."""
  out = dict(tensors)
  for key, value in tensors.items():
    if key.endswith((".in_proj_weight", ".in_proj_bias")):
      if value.ndim < 1 or value.shape[0] % 3:
        raise ValueError(f"{key}: shape {value.shape}, expected a first axis of 3 x width")
      for name, part in zip("qkv", np.split(value, 3, axis=0)):
        out[f"{key}:{name}"] = part
  return out


def _normed_queries(tensors: Mapping[str, np.ndarray]) -> np.ndarray:
  """open_clip's pooler queries after their LayerNorm ln_q (a constant), in float64, cast to
  the queries' dtype."""
  query = np.asarray(tensors["visual.attn_pool.query"])
  for name in ("weight", "bias"):
    shape = np.shape(tensors[f"visual.attn_pool.ln_q.{name}"])
    if query.ndim != 2 or shape != query.shape[-1:]:
      raise ValueError(f"visual.attn_pool.ln_q.{name}: shape {shape} does not fit the queries "
                       f"{query.shape} ([queries, width])")
  q = query.astype(np.float64)
  normed = (q - q.mean(-1, keepdims=True)) / np.sqrt(q.var(-1, keepdims=True) + _NORM_EPS)
  weight = np.asarray(tensors["visual.attn_pool.ln_q.weight"], np.float64)
  bias = np.asarray(tensors["visual.attn_pool.ln_q.bias"], np.float64)
  return (normed * weight + bias).astype(query.dtype)


def _torch_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
  """The checkpoint shape an entry of `layout` needs for a vljax parameter of `shape`."""
  if layout == "linear_in":
    return (math.prod(shape[1:]), shape[0])
  if layout == "linear_out":
    return (shape[-1], math.prod(shape[:-1]))
  if layout == "matmul":
    return (shape[0], math.prod(shape[1:]))
  if layout == "conv":
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  if layout == "bias":
    return (math.prod(shape),)
  if layout == "table":
    while len(shape) > 1 and shape[0] == 1:
      shape = shape[1:]
    return shape
  return None  # "scalar" and the probes are checked where they are read


def _convert(key: str, value: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
  """One checkpoint tensor in the vljax parameter's layout and `shape`."""
  if layout == "scalar":
    if value.size != 1 or value.ndim > 1:
      raise ValueError(f"{key}: shape {value.shape}, expected a scalar or [1]")
    return np.array(value.reshape(()))
  if layout in ("probe_first", "probe_rest"):
    rows = value[:1] if layout == "probe_first" else value[1:]
    if rows.shape != shape[1:]:
      raise ValueError(f"visual.attn_pool.query: shape {value.shape}, expected "
                       f"[{shape[1] + (1 if layout == 'probe_rest' else 0)} queries, {shape[2]}]"
                       " from the config")
    return np.array(rows.reshape(shape), order="C")
  want = _torch_shape(layout, shape)
  if tuple(value.shape) != want:
    raise ValueError(f"{key}: shape {tuple(value.shape)}, expected {want} from the config")
  if layout in ("linear_in", "linear_out"):
    value = value.T
  elif layout == "conv":
    value = value.transpose(2, 3, 1, 0)
  return np.array(value.reshape(shape), order="C")


def _abstract_params(model: nn.Module, size: tuple[int, int]) -> dict[str, Any]:
  """path -> ShapeDtypeStruct of the (unscanned) model's parameters."""
  images = jnp.zeros((1, *size, 3))
  tokens = jnp.zeros((1, 2), jnp.int32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, tokens)["params"])
  return flax.traverse_util.flatten_dict(nn.meta.unbox(abstract))


def _stack_layers(params: dict, stacks: Sequence[tuple[str, ...]]) -> dict:
  """Unscanned "layer_i" subtrees under each of `stacks` -> one "layers" subtree whose leaves
  are stacked on a leading axis, as `nn.scan` stores them."""
  for path in stacks:
    node = params
    for name in path:
      node = node[name]
    layers = []
    while f"layer_{len(layers)}" in node:
      layers.append(node.pop(f"layer_{len(layers)}"))
    node["layers"] = jax.tree.map(lambda *x: np.stack(x), *layers)
  return params


def from_state_dict(config: Mapping[str, Any], tensors: Mapping[str, Any], *,
                    scan: bool = False) -> tuple[TwoTower | CoCa, dict]:
  """(model, params as NumPy arrays) of an open_clip config (open_clip_config.json, or its
  model_cfg) and state dict (name -> array): a `TwoTower` for CLIP, a `CoCa` for CoCa; the layer
  stacks scanned with `scan`. Checkpoint dtypes are kept. Missing or unexpected tensors raise
  hf.KeyMismatchError, wrong shapes a ValueError naming the tensor."""
  tensors = {key: np.asarray(value) for key, value in tensors.items()}
  if is_coca(config):
    fields = coca_fields(config)
    model: TwoTower | CoCa = CoCa(**fields)
    entries = _coca_entries(fields)
    what = "the open_clip CoCa state dict"
    stacks = [("img", "encoder"), ("unimodal",), ("multimodal",)]
  else:
    fields = two_tower_fields(config)
    model = TwoTower(**fields)
    # open_clip's CLIP keeps the text tower at the top level, CustomTextCLIP under "text.";
    # open_clip converts between the two on loading, so either is read.
    prefix, other = ("text.", "") if _model_cfg(config)["custom_text"] else ("", "text.")
    if (f"{prefix}token_embedding.weight" not in tensors
        and f"{other}token_embedding.weight" in tensors):
      prefix = other
    entries = _clip_entries(fields, prefix)
    what = "the open_clip CLIP state dict"
    stacks = [("img", "encoder"), ("txt", "encoder")]
  expected = sorted({source for key, _, _ in entries for source in _source_key(key)})
  hf.check_keys(expected, tensors, what)
  split = _split_fused(tensors)
  if "visual.attn_pool.query" in tensors:
    split["visual.attn_pool.query:normed"] = _normed_queries(tensors)
  want = _abstract_params(model, image_size(config))
  mapped = {path for _, path, _ in entries}
  assert mapped == set(want), (sorted(set(want) - mapped), sorted(mapped - set(want)))
  params: dict = {}
  for key, path, layout in entries:
    value = _convert(key, split[key], layout, tuple(want[path].shape))
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  if scan:
    params = _stack_layers(params, stacks)
    if isinstance(model, CoCa):
      model = model.clone(scan=True)
    else:
      model = model.clone(image={**model.image, "scan": True}, text={**model.text, "scan": True})
  return model, params


# --- Reading ---------------------------------------------------------------------------------


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
  """The open_clip_config.json of a directory (or the file itself)."""
  path = os.fspath(path)
  config_path = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: open_clip's hub directories hold the "
                            "model config (model_cfg, preprocess_cfg) next to the weights")
  try:
    with open(config_path, "rb") as f:
      config = json.loads(f.read())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{config_path}: the open_clip config is not valid JSON ({e})") from e
  if not isinstance(config, dict):
    raise ValueError(f"{config_path}: the open_clip config is not a JSON object")
  return config


def _weights_path(directory: str) -> str:
  """The safetensors weights of an open_clip directory; pickles are refused, never opened."""
  for name in WEIGHTS_NAMES:
    if os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  names = sorted(os.listdir(directory))
  pickles = [name for name in names if name.endswith(_PICKLE_SUFFIXES)]
  if pickles:
    raise ValueError(
        f"{directory} has PyTorch pickle weights ({', '.join(pickles)}) and no "
        f"{WEIGHTS_NAMES[0]}; vljax never loads pickles: unpickling can run arbitrary code. "
        "Convert them once, from a source you trust, with open_clip and safetensors: `model = "
        f"open_clip.create_model('local-dir:{directory}'); safetensors.torch.save_file("
        f"model.state_dict(), '{os.path.join(directory, WEIGHTS_NAMES[0])}')`")
  raise FileNotFoundError(f"{directory} has none of {', '.join(WEIGHTS_NAMES)} (it holds: "
                          f"{', '.join(names) or 'nothing'})")


def load(path: str | os.PathLike[str], *, scan: bool = False) -> tuple[TwoTower | CoCa, dict]:
  """(model, params as NumPy arrays) of an open_clip hub directory: a `TwoTower` for CLIP, a
  `CoCa` (layout="open_clip") for CoCa. Images are [B, H, W, 3] at the config's image_size
  (see `ImageTransform`), tokens open_clip's (see `vljax.convert.clip_bpe`). Unsupported config
  fields, missing files, pickle-only directories, missing or extra tensors and wrong shapes
  raise naming the problem."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No open_clip model directory at {path}")
  config = read_config(path)
  try:
    coca_fields(config) if is_coca(config) else two_tower_fields(config)  # before the weights
    tensors = hf.read_safetensors(_weights_path(path))
    return from_state_dict(config, tensors, scan=scan)
  except NotImplementedError as e:
    raise NotImplementedError(f"{path}: {e}") from e
  except hf.KeyMismatchError as e:
    raise hf.KeyMismatchError(f"{path}: {e}", e.missing, e.unexpected) from e
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


# --- Image preprocessing ---------------------------------------------------------------------

_INTERPOLATIONS = {"bicubic": PIL.Image.Resampling.BICUBIC,
                   "bilinear": PIL.Image.Resampling.BILINEAR,
                   "random": PIL.Image.Resampling.BICUBIC}  # open_clip's eval: bicubic
_RESIZE_MODES = ("shortest", "longest", "squash")


class ImageTransform:
  """open_clip's eval transform (`open_clip.image_transform(size, is_train=False, ...)` on PIL
  images): `transform(images) -> float32 [N, H, W, 3]`, its tensors channels-last.

  The steps follow torchvision's PIL path: resize with PIL in the image's own mode ("shortest":
  the short edge to the size, the long one `int(size * long / short)`, or for a non-square size
  both edges by the smaller ratio, rounded, always bicubic; "longest": both edges by the larger
  ratio, rounded; "squash": to the size), centre crop at `round((edge - crop) / 2)` after
  padding a smaller image (left / top `(crop - edge) // 2`, with `fill_color` in "longest"
  mode, else 0), convert to RGB (alpha dropped, not composited), divide by 255 and normalise,
  in float32.
  """

  def __init__(self, size: int | Sequence[int], *, mean: float | Sequence[float] = OPENAI_MEAN,
               std: float | Sequence[float] = OPENAI_STD, interpolation: str = "bicubic",
               resize_mode: str = "shortest", fill_color: int = 0):
    height, width = size if isinstance(size, (list, tuple)) else (size, size)
    self.size = (_int(height, "size"), _int(width, "size"))
    mean = [mean] * 3 if isinstance(mean, (int, float)) else list(mean)
    std = [std] * 3 if isinstance(std, (int, float)) else list(std)
    if len(mean) != 3 or len(std) != 3:
      raise ValueError(f"mean and std need 3 values, got {mean!r}, {std!r}")
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)
    if interpolation not in _INTERPOLATIONS:
      raise ValueError(f"Unknown interpolation {interpolation!r}; open_clip's are "
                       f"{sorted(_INTERPOLATIONS)}")
    self.resample = _INTERPOLATIONS[interpolation]
    if resize_mode not in _RESIZE_MODES:
      raise ValueError(f"Unknown resize_mode {resize_mode!r}; open_clip's are {_RESIZE_MODES}")
    self.resize_mode = resize_mode
    self.fill_color = fill_color

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> ImageTransform:
    """The transform of an open_clip_config.json dict: its preprocess_cfg over open_clip's
    defaults, at the vision tower's image_size (as open_clip's factory sets it)."""
    pp = config.get("preprocess_cfg") or {}
    if not isinstance(pp, Mapping):
      raise ValueError("open_clip config preprocess_cfg must be a JSON object")
    if pp.get("mode", "RGB") != "RGB":
      raise ValueError(f"open_clip config preprocess_cfg.mode={pp['mode']!r}: open_clip reads RGB")
    kw = {key: pp[key] for key in ("mean", "std", "interpolation", "resize_mode", "fill_color")
          if pp.get(key) is not None}
    return cls(image_size(config), **kw)

  def _resize(self, image: PIL.Image.Image) -> PIL.Image.Image:
    target_h, target_w = self.size
    height, width = image.height, image.width
    if self.resize_mode == "squash":
      new = (target_h, target_w)
    elif self.resize_mode == "shortest" and target_h == target_w:
      short, long = min(height, width), max(height, width)
      new_long = int(target_h * long / short)
      new = (new_long, target_h) if width <= height else (target_h, new_long)
    else:  # scale both edges by one ratio (the larger: "longest"; the smaller: "shortest")
      ratios = (height / target_h, width / target_w)
      ratio = max(ratios) if self.resize_mode == "longest" else min(ratios)
      new = (round(height / ratio), round(width / ratio))
    resample = self.resample
    if self.resize_mode == "shortest" and target_h != target_w:
      resample = PIL.Image.Resampling.BICUBIC  # open_clip does not pass its interpolation there
    if new == (height, width):
      return image
    return image.resize((new[1], new[0]), resample=resample)

  def _crop(self, image: PIL.Image.Image) -> PIL.Image.Image:
    crop_h, crop_w = self.size
    fill = self.fill_color if self.resize_mode == "longest" else 0
    if crop_w > image.width or crop_h > image.height:
      pad_w, pad_h = max(crop_w - image.width, 0), max(crop_h - image.height, 0)
      border = (pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2)
      bands = len(image.getbands())
      fill_value = tuple([int(fill)] * bands) if bands > 1 else int(fill)
      palette = image.getpalette() if image.mode == "P" else None
      image = PIL.ImageOps.expand(image, border=border, fill=fill_value)
      if palette is not None:
        image.putpalette(palette)
      if (image.height, image.width) == (crop_h, crop_w):
        return image
    top = int(round((image.height - crop_h) / 2.0))
    left = int(round((image.width - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))

  def preprocess_one(self, image: Any) -> np.ndarray:
    """One image (a path, encoded bytes, a PIL image or a uint8 array) as float32 [H, W, 3]."""
    pil = self._crop(self._resize(load_image(image))).convert("RGB")
    pixels = np.asarray(pil).astype(np.float32) / np.float32(255)
    return (pixels - self.mean) / self.std

  def __call__(self, images: Any | Sequence[Any]) -> np.ndarray:
    """Images (one, or a list) as float32 [N, H, W, 3]."""
    if isinstance(images, (list, tuple)):
      return np.stack([self.preprocess_one(image) for image in images])
    return self.preprocess_one(images)[None]

