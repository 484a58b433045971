"""LLaVA (Liu et al. 2023, "Visual Instruction Tuning"; LLaVA-1.5, Liu et al. 2024), layer for
layer as transformers' LlavaForConditionalGeneration, so that its checkpoints import
(`vljax.convert.hf_llava`) and give the same logits.

  vision tower  a ViT (CLIP or SigLIP fields) whose features are the hidden states after layer
                `feature_layer` (transformers' `vision_feature_layer`: -2 is the penultimate
                layer's output, 0 the embeddings), with no final norm: the tower is built with
                only the layers up to that one. `feature_select="patch"` drops the class token
                (transformers' strategy "default"), "full" keeps every token;
  projector     "linear" (LLaVA 1: one Linear) or "mlp2x_gelu" (LLaVA-1.5: Linear, GELU,
                Linear), from the vision width to the LM width;
  LM            a `vljax.models.lm.LM` (LLaMA / Vicuna), reading the text embeddings with each
                image's P projected feature tokens written over its P placeholder tokens.

The token sequence holds P = `num_image_tokens(image_size)` placeholder ids
(`image_token_id`) per image, in the order of the images, as transformers' processor expands
"<image>"; `expand_image_tokens` turns a view's texts (one placeholder per image, or none) into
that form. `Llava(...)(images_bnhwc, tokens_bt)` -> {"logits": [B, T, V], "hidden": [B, T, D],
"img/features": [B, N, P, Dv] (selected vision features), "img/embeds": [B, N, P, D] (projected),
"img/mismatch": bool [B] (rows whose placeholder count is not P x their valid images)}. A
mismatch is an error: raised at once for concrete inputs, from the device (a host callback)
under `jax.jit`, unless `check_image_tokens=False`. `generate` prefills the spliced embeddings
and decodes with the LM's KV cache. Params: "img" (the ViT), "mm_projector" ("linear_1",
"linear_2") and "language_model" (the LM's, so `lm_module()` applies them alone).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vljax.models import lm as lm_lib
from vljax.models.vit import ViT
from vljax.nn import Dense, activation, constrain

PROJECTORS = ("linear", "mlp2x_gelu")
FEATURE_SELECTS = ("patch", "full")

# CLIP's vision tower in ViT fields: a class token, pre-LayerNorm, a bias-free patch embedding.
_CLIP_VISION = dict(class_token=True, pre_norm=True, patch_bias=False, act="quick_gelu",
                    norm_eps=1e-5)

# Presets: vision ViT fields, LM fields and the bridge's. The LLaVA-1.5 ones are
# llava-hf/llava-1.5-7b-hf and -13b-hf: CLIP ViT-L/14 at 336 px (24 x 24 patches, CLS dropped:
# 576 image tokens), the mlp2x_gelu projector, Vicuna v1.5 with the vocabulary padded to 32,064
# and the "<image>" token at 32,000. "mu" is a tiny preset for tests and CPU demos (the
# vocabulary size comes from the tokenizer).
LLAVA_VARIANTS: dict[str, dict[str, Any]] = {
    "mu": dict(vision=dict(variant="mu/8", **_CLIP_VISION), lm=dict(variant="mu", recipe="llama"),
               projector="mlp2x_gelu"),
    "llava-1.5-7b": dict(vision=dict(variant="L/14", **_CLIP_VISION),
                         lm=dict(variant="vicuna-7b", vocab_size=32_064),
                         projector="mlp2x_gelu", image_token_id=32_000),
    "llava-1.5-13b": dict(vision=dict(variant="L/14", **_CLIP_VISION),
                          lm=dict(variant="vicuna-13b", vocab_size=32_064),
                          projector="mlp2x_gelu", image_token_id=32_000),
}
PAPER_IMAGE_SIZE = 336  # LLaVA-1.5's CLIP ViT-L/14-336


class Projector(nn.Module):
  """Vision features [..., Dv] -> LM embeddings [..., D]: "linear" (linear_1) or "mlp2x_gelu"
  (linear_1, `act`, linear_2), transformers' LlavaMultiModalProjector."""

  kind: str
  width: int  # D, the LM width
  act: str = "gelu"  # exact GELU, transformers' projector_hidden_act "gelu"
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_bnpd: jax.Array) -> jax.Array:
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.kind == "linear":
      return Dense(self.width, None, "embed", name="linear_1", **kw)(x_bnpd)
    if self.kind != "mlp2x_gelu":
      raise ValueError(f"Unknown projector {self.kind!r}; choose one of {PROJECTORS}")
    h = Dense(self.width, "embed", "mlp", name="linear_1", **kw)(x_bnpd)
    h = activation(self.act)(h)
    return Dense(self.width, "mlp", "embed", name="linear_2", **kw)(h)


class Llava(nn.Module):
  """Vision tower, projector and decoder LM (see the module docstring). Fields left None come
  from the variant; `vision` and `lm` are merged over the variant's dicts."""

  variant: str | None = None  # a LLAVA_VARIANTS key
  vision: Mapping[str, Any] | None = None  # ViT fields (pool, final_norm and depth are set here)
  lm: Mapping[str, Any] | None = None  # vljax.models.lm.LM fields
  feature_layer: int = -2  # transformers' vision_feature_layer: hidden state index of the tower
  feature_select: str = "patch"  # "patch": drop the class token; "full": keep every token
  projector: str | None = None  # "linear" | "mlp2x_gelu"
  projector_act: str = "gelu"
  projector_bias: bool = True
  image_token_id: int | None = None  # the placeholder id whose embeddings the images replace
  check_image_tokens: bool = True  # raise when placeholders and images disagree
  scan: bool = False  # both stacks (unless `vision` / `lm` say otherwise)
  remat: str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  # --- Resolved configuration (usable unbound) ---------------------------------------------

  def _variant(self) -> dict[str, Any]:
    if self.variant is None:
      return {}
    if self.variant not in LLAVA_VARIANTS:
      raise ValueError(f"Unknown Llava variant {self.variant!r}; choose one of "
                       f"{sorted(LLAVA_VARIANTS)}")
    return LLAVA_VARIANTS[self.variant]

  def vision_depth(self) -> int:
    """The depth of the whole vision tower (the checkpoint's), before truncation."""
    return ViT(**self._vision_base(), parent=None).sizes()["depth"]

  def _vision_base(self) -> dict[str, Any]:
    fields = dict(self._variant().get("vision", {}))
    fields.update(self.vision or {})
    return fields

  def kept_layers(self) -> int:
    """How many tower layers produce the features: hidden state `feature_layer` of a tower of
    depth L (index 0: the embeddings; -1: the last layer's output) is the output of layer
    feature_layer (>= 0) or L + 1 + feature_layer (< 0)."""
    depth = self.vision_depth()
    index = self.feature_layer
    kept = index if index >= 0 else depth + 1 + index
    if not 0 <= kept <= depth:
      raise ValueError(f"feature_layer={index} is outside the {depth}-layer vision tower's hidden "
                       f"states (indices {-depth - 1} .. {depth})")
    return kept

  def vision_fields(self) -> dict[str, Any]:
    """The fields of the ViT this module builds: the tower truncated after `feature_layer`."""
    fields = dict(scan=self.scan, remat=self.remat, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    fields.update(self._vision_base())
    for key, allowed in (("pool", "none"), ("final_norm", False), ("out_dim", None)):
      if key in fields and fields[key] != allowed:
        raise ValueError(f"vision.{key}={fields[key]!r}: a LLaVA vision tower gives unpooled, "
                         "unnormalised, unprojected tokens; remove it")
    fields.update(pool="none", final_norm=False, out_dim=None, depth=self.kept_layers())
    if self.feature_select not in FEATURE_SELECTS:
      raise ValueError(f"Unknown feature_select {self.feature_select!r}; choose one of "
                       f"{FEATURE_SELECTS}")
    if self.feature_select == "patch" and not fields.get("class_token"):
      raise ValueError("feature_select='patch' drops the class token, but the vision tower has "
                       "none (class_token is not True): use feature_select='full'")
    return fields

  def lm_fields(self) -> dict[str, Any]:
    """The fields of the decoder LM this module builds."""
    fields = dict(scan=self.scan, remat=self.remat, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    fields.update(self._variant().get("lm", {}))
    fields.update(self.lm or {})
    return fields

  def lm_module(self) -> lm_lib.LM:
    """The (unbound) decoder LM; its params are params["language_model"]."""
    return lm_lib.LM(**self.lm_fields(), parent=None)

  def vision_module(self) -> ViT:
    """The (unbound, truncated) vision tower; its params are params["img"]."""
    return ViT(**self.vision_fields(), parent=None)

  def projector_kind(self) -> str:
    kind = self.projector or self._variant().get("projector")
    if kind not in PROJECTORS:
      raise ValueError(f"projector={kind!r}; choose one of {PROJECTORS}")
    return kind

  def placeholder_id(self) -> int:
    token = self.image_token_id
    if token is None:
      token = self._variant().get("image_token_id")
    if token is None:
      raise ValueError("Llava needs image_token_id (the id of the image placeholder token)")
    return int(token)

  def num_image_tokens(self, image_size: int | Sequence[int]) -> int:
    """P: the feature tokens (and placeholders) of one image of `image_size` (a side or
    (height, width)): the patch grid, plus the class token with feature_select="full"."""
    fields = self.vision_fields()
    patch = ViT(**fields, parent=None).sizes()["patch_size"]
    height, width = (image_size, image_size) if np.ndim(image_size) == 0 else image_size
    cls = int(bool(fields.get("class_token")) and self.feature_select == "full")
    return (int(height) // patch) * (int(width) // patch) + cls

  # --- Modules -------------------------------------------------------------------------------

  def setup(self):
    self.img = ViT(**self.vision_fields())
    self.language_model = lm_lib.LM(**self.lm_fields())
    width = self.lm_module().config()["width"]
    self.mm_projector = Projector(self.projector_kind(), width, act=self.projector_act,
                                      use_bias=self.projector_bias, dtype=self.dtype,
                                      param_dtype=self.param_dtype)

  def encode_images(self, images_bnhwc: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Images [B, N, H, W, 3] (or [B, H, W, 3]: N = 1) -> {"features": the selected tower
    tokens [B, N, P, Dv], "embeds": projected [B, N, P, D]}."""
    if images_bnhwc.ndim == 4:
      images_bnhwc = images_bnhwc[:, None]
    if images_bnhwc.ndim != 5:
      raise ValueError(f"images must be [B, N, H, W, 3] or [B, H, W, 3], got shape "
                       f"{images_bnhwc.shape}")
    batch, count = images_bnhwc.shape[:2]
    _, aux = self.img(images_bnhwc.reshape((batch * count,) + images_bnhwc.shape[2:]),
                      train=train)
    tokens = aux["tokens"]
    if self.feature_select == "patch":
      tokens = tokens[:, 1:]
    features_bnpd = tokens.reshape((batch, count) + tokens.shape[1:])
    embeds_bnpd = self.mm_projector(features_bnpd)
    return {"features": features_bnpd,
            "embeds": constrain(embeds_bnpd, ("batch", None, "seq", "act_embed"))}

  def embed_inputs(self, images_bnhwc: jax.Array, tokens_bt: jax.Array,
                   image_mask_bn: jax.Array | None = None,
                   image_positions_bt: jax.Array | None = None, *, train: bool = False
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(LM input embeddings [B, T, D], {"img/features", "img/embeds", "img/mismatch"}): the
    text embedded, each image position's embedding replaced by its image token."""
    image = self.encode_images(images_bnhwc, train)
    text_btd = self.language_model.embed(tokens_bt)
    embeds_bnpd = image["embeds"]
    if image_mask_bn is None:
      image_mask_bn = jnp.ones(embeds_bnpd.shape[:2], bool)
    if image_positions_bt is None:
      image_positions_bt = tokens_bt == self.placeholder_id()
    embeds_btd, mismatch_b = splice_image_tokens(
        text_btd, image_positions_bt, embeds_bnpd.astype(text_btd.dtype), image_mask_bn,
        check=self.check_image_tokens)
    return embeds_btd, {"img/features": image["features"], "img/embeds": embeds_bnpd,
                        "img/mismatch": mismatch_b}

  def __call__(self, images_bnhwc: jax.Array, tokens_bt: jax.Array,
               image_mask_bn: jax.Array | None = None,
               image_positions_bt: jax.Array | None = None, *, mask: jax.Array | None = None,
               positions_bt: jax.Array | None = None, train: bool = False,
               hidden_only: bool = False) -> dict[str, jax.Array]:
    """Images [B, N, H, W, 3] (`image_mask_bn` bool [B, N]: which are real; default all) and
    token ids [B, T] holding P placeholders per real image -> named outputs (module
    docstring). `image_positions_bt` (bool [B, T]) marks the image tokens instead of the
    placeholder id (`expand_image_tokens` gives it). `mask` / `positions_bt` / `hidden_only`
    are the LM's (default: causal, 0..T-1)."""
    embeds_btd, aux = self.embed_inputs(images_bnhwc, tokens_bt, image_mask_bn,
                                        image_positions_bt, train=train)
    out = self.language_model(embeds_btd=embeds_btd, mask=mask, positions_bt=positions_bt,
                              train=train, hidden_only=hidden_only)
    return {**out, **aux}


# ---------------------------------------------------------------------------------------------
# Image tokens in the text.


def _raise_on_mismatch(counts_b3, *, per_image: int) -> None:
  """Raises naming the rows (column 0) whose placeholder count (1) is not the image tokens (2)."""
  counts_b3 = np.asarray(counts_b3)
  bad = counts_b3[counts_b3[:, 1] != counts_b3[:, 2]]
  if not bad.size:
    return
  shown = "; ".join(f"row {row}: {found} placeholders, {expected // max(per_image, 1)} images x "
                    f"{per_image} = {expected} image tokens" for row, found, expected in bad[:4])
  more = f" (and {len(bad) - 4} more rows)" if len(bad) > 4 else ""
  raise ValueError(f"image placeholder tokens and images disagree: {shown}{more}. Each image "
                   f"needs exactly {per_image} placeholder ids in its row (expand_image_tokens "
                   "writes them)")


def splice_image_tokens(text_btd: jax.Array, is_image_bt: jax.Array, images_bnpd: jax.Array,
                        image_mask_bn: jax.Array, *, check: bool = True
                        ) -> tuple[jax.Array, jax.Array]:
  """(embeddings [B, T, D], mismatch bool [B]): `text_btd` with the k-th image position
  (`is_image_bt`: the placeholders) of a row replaced by token k % P of the row's (k // P)-th
  valid image (images in order, invalid ones skipped), as transformers' masked_scatter fills
  them. Placeholders beyond the images take a clipped index; `mismatch` marks the rows whose
  placeholder count is not P x their valid images, which `check` turns into an error (a host
  callback under jit: no data-dependent Python control flow)."""
  batch, count, per_image = images_bnpd.shape[:3]
  is_image_bt = jnp.asarray(is_image_bt, bool)
  index_bt = jnp.cumsum(is_image_bt.astype(jnp.int32), axis=1) - 1  # k, among the placeholders
  image_mask_bn = jnp.broadcast_to(jnp.asarray(image_mask_bn, bool), (batch, count))
  # The valid images first, in order: the i-th valid image of row b is order_bn[b, i].
  order_bn = jnp.argsort(~image_mask_bn, axis=1, stable=True)
  slot_bt = jnp.clip(index_bt // per_image, 0, count - 1)
  image_bt = jnp.take_along_axis(order_bn, slot_bt, axis=1)
  flat_bt = image_bt * per_image + jnp.clip(index_bt, 0) % per_image
  flat_bkd = images_bnpd.reshape(batch, count * per_image, images_bnpd.shape[-1])
  gathered_btd = jnp.take_along_axis(flat_bkd, flat_bt[..., None], axis=1)
  embeds_btd = jnp.where(is_image_bt[..., None], gathered_btd, text_btd)
  found_b = jnp.sum(is_image_bt, axis=1, dtype=jnp.int32)
  expected_b = per_image * jnp.sum(image_mask_bn, axis=1, dtype=jnp.int32)
  if check:
    # (row, found, expected) in one array, so that each shard's callback sees its own rows
    # (partitioned: no gather of the batch to one device).
    counts_b3 = jnp.stack([jnp.arange(batch), found_b, expected_b], axis=1)
    raise_fn = functools.partial(_raise_on_mismatch, per_image=per_image)
    if isinstance(counts_b3, jax.core.Tracer):
      jax.debug.callback(partitioned=True)(raise_fn, counts_b3)
    else:
      raise_fn(counts_b3)
  return embeds_btd, found_b != expected_b


def expand_image_tokens(text_bl: jax.Array, mask_ar_bl: jax.Array, mask_loss_bl: jax.Array, *,
                        image_token_id: int, tokens_per_image: int, max_images: int = 1,
                        num_images_b: jax.Array | None = None,
                        prompt_len_b: jax.Array | None = None, pad_id: int = 0
                        ) -> dict[str, jax.Array]:
  """A view's texts -> the model's: each placeholder id becomes P = `tokens_per_image` of them,
  and a row without any gets its `num_images_b` (default `max_images`) images' P x n
  placeholders after its first token (the bos), as LLaVA puts an image before a caption or
  question. Image tokens take the mask_ar of their placeholder (or of the bos) and mask_loss 0;
  the rest keep their masks, shifted. The result has the static length
  L + max_images x P (right-padded with pad_id, mask_ar 1, mask_loss 0; texts with more
  placeholders than that are cut, which the model's check reports); "image" (bool) marks the
  image tokens, and `image_token_id` < 0 (a tokenizer without a placeholder token: no row has
  one) writes pad_id there. With `prompt_len_b` the dict holds the expanded "prompt_len" too.
  Traceable: no data-dependent Python control flow.
  """
  batch, length = text_bl.shape
  per_image = tokens_per_image
  out_len = length + max_images * per_image
  if num_images_b is None:
    num_images_b = jnp.full((batch,), max_images, jnp.int32)
  is_image_bl = text_bl == image_token_id
  reps_bl = jnp.where(is_image_bl, per_image, 1)
  extra_b = jnp.where(jnp.any(is_image_bl, axis=1), 0, num_images_b * per_image)
  after_first_bl = (jnp.arange(length) >= 1)[None, :]
  # Where each input token's (first) output lands: the tokens before it, expanded, plus the
  # inserted images for every token after the first.
  start_bl = (jnp.cumsum(reps_bl, axis=1) - reps_bl
              + jnp.where(after_first_bl, extra_b[:, None], 0))
  total_b = jnp.sum(reps_bl, axis=1) + extra_b
  out_o = jnp.arange(out_len)
  source_bo = jax.vmap(lambda s: jnp.searchsorted(s, out_o, side="right"))(start_bl) - 1
  source_bo = jnp.clip(source_bo, 0, length - 1)
  offset_bo = out_o[None, :] - jnp.take_along_axis(start_bl, source_bo, axis=1)
  inside_bo = out_o[None, :] < total_b[:, None]
  image_bo = inside_bo & (jnp.take_along_axis(is_image_bl, source_bo, axis=1) | (offset_bo >= 1))

  def take(values_bl):
    return jnp.take_along_axis(values_bl, source_bo, axis=1)

  fill_id = image_token_id if image_token_id >= 0 else pad_id
  out = {
      "image": image_bo,
      "text": jnp.where(image_bo, fill_id,
                        jnp.where(inside_bo, take(text_bl), pad_id)).astype(text_bl.dtype),
      "mask_ar": jnp.where(inside_bo, take(mask_ar_bl), 1).astype(mask_ar_bl.dtype),
      "mask_loss": jnp.where(inside_bo & ~image_bo, take(mask_loss_bl),
                             0).astype(mask_loss_bl.dtype),
  }
  if prompt_len_b is not None:
    last_b = jnp.clip(jnp.asarray(prompt_len_b, jnp.int32) - 1, 0, length - 1)[:, None]
    end_b = (jnp.take_along_axis(start_bl, last_b, axis=1)
             + jnp.take_along_axis(reps_bl, last_b, axis=1))[:, 0]
    out["prompt_len"] = (end_b + jnp.where(last_b[:, 0] == 0, extra_b, 0)).astype(jnp.int32)
  return out


# ---------------------------------------------------------------------------------------------
# Generation.


def generate(model: Llava, params, images_bnhwc: jax.Array, tokens_bl: jax.Array, *,
             image_mask_bn: jax.Array | None = None,
             image_positions_bl: jax.Array | None = None, prompt_len_b: jax.Array | None = None,
             max_new_tokens: int, eos_id: int | Sequence[int], pad_id: int = 0,
             **decode_options) -> jax.Array:
  """Continuations int32 [B, max_new_tokens] (pad_id after the stop token) of right-padded
  prompts [B, P] holding the images' placeholders (or marked by `image_positions_bl`;
  lengths `prompt_len_b`, default all): the
  spliced embeddings prefilled in one pass, then the LM's KV-cached decoding (greedy by
  default; `decode_options` are `vljax.models.lm.generate`'s: beam_size, rng, temperature..)."""
  embeds_bld, _ = model.apply({"params": params}, images_bnhwc, tokens_bl, image_mask_bn,
                              image_positions_bl, method=Llava.embed_inputs)
  return lm_lib.generate(model.lm_module(), params["language_model"], embeds_bld=embeds_bld,
                         prompt_len_b=prompt_len_b, max_new_tokens=max_new_tokens,
                         eos_id=eos_id, pad_id=pad_id, **decode_options)
