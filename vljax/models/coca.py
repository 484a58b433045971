"""CoCa: Contrastive Captioners (Yu et al. 2022), layer for layer after the paper's pseudocode,
open_clip's CoCa and the authors' praxis layers.

An image ViT gives patch tokens; two task-specific attentional poolers (learned queries ->
one multi-head attention -> LayerNorm) turn them into one contrastive image embedding and
`num_caption_queries` captioning features of the decoder width. The text decoder is cut in two:

  unimodal: causal self-attention layers over [w_0 .. w_{T-1}, CLS] (token + learned position
      embeddings); the LayerNorm'd CLS output is the contrastive text embedding;
  multimodal: layers of causal self-attention, cross-attention to the captioning features and
      an MLP over the (un-normalised) unimodal outputs of the text tokens, then LayerNorm and a
      projection to the vocabulary (a separate matrix as in open_clip, or the tied embedding).

Right padding and the CLS: the CLS is appended after the whole padded row and always takes
position-embedding row `max_len` (open_clip's layout for a full-length row), so its embedding
does not depend on how much padding there is. Text queries use a plain causal mask: they never
see the CLS (it comes last) and, the padding being on the right, never see a pad either. The
CLS query sees every non-pad token and itself. Since no text position depends on the CLS,
generation (`decode_step`, KV cache) runs both decoders without it and gives the same logits as
the full forward.

`layout="open_clip"` is open_clip's CoCa, whose checkpoints `vljax.convert.open_clip` imports:
the ViT keeps a class token among the pooled tokens (pre-LayerNorm, patch embedding without
bias); the CLS takes the position row after the text (row T for T tokens); every text query
(not only the CLS) drops the keys of pads, and open_clip's mask is shifted by one: key 0 is
always seen and key k (the CLS included) is seen when token k - 1 is not a pad; each multimodal
layer is a self-attention block (attention + MLP) followed by a cross-attention block that
LayerNorms the captioning features too and has its own MLP (`OpenClipDecoder`). Generation
(`decode_step`) runs without that pad mask, like the paper layout.

`__call__(images, tokens)` returns a dict of named outputs, as `TwoTower` does (see
`CoCa.__call__`): L2-normalised [B, D] embeddings "zimg" / "ztxt" (None for a missing input),
the captioning "logits" (None unless both inputs are given), the logit "scale" (and "bias" with
the sigmoid loss) and intermediates under "img/..." and "txt/...". The losses live with the
family code; `generate` captions images, optionally continuing a prompt.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax import decode
from vljax.models.sizes import resolve_sizes
from vljax.models.two_tower import (check_contrastive, contrastive_outputs,
                                    contrastive_parameters, l2_normalize)
from vljax.models.vit import ViT
from vljax.nn import (REMAT_POLICIES, AttentionPool, Block, BlockConfig, Dense, LayerNorm,
                      LearnedPosEmbed, MlpBlock, MultiHeadAttention, TokenEmbed, Transformer,
                      causal_mask, constrain, padding_mask, partitioned)

# Decoder sizes and the image ViT variant per preset. The paper's three (Table 1) see 288px images
# in 18px patches (256 tokens) and use a 64,000-token vocabulary; the decoder width equals the
# image width. "mu" and "nano" are tiny presets for tests and CPU demos (vocab_size from the
# tokenizer).
COCA_VARIANTS: dict[str, dict[str, Any]] = {
    "mu": dict(image="mu/8", width=32, num_heads=2, mlp_dim=64, unimodal_depth=1,
               multimodal_depth=1, num_caption_queries=4),
    "nano": dict(image="nano/8", width=128, num_heads=4, mlp_dim=512, unimodal_depth=2,
                 multimodal_depth=2, num_caption_queries=16),
    "base": dict(image="B/18", width=768, num_heads=12, mlp_dim=3072, unimodal_depth=12,
                 multimodal_depth=12, num_caption_queries=256, vocab_size=64_000),
    "large": dict(image="L/18", width=1024, num_heads=16, mlp_dim=4096, unimodal_depth=12,
                  multimodal_depth=12, num_caption_queries=256, vocab_size=64_000),
    "giant": dict(image="g/18", width=1408, num_heads=16, mlp_dim=5632, unimodal_depth=18,
                  multimodal_depth=18, num_caption_queries=256, vocab_size=64_000),
}
PAPER_IMAGE_SIZE = 288

_SIZE_FIELDS = ("vocab_size", "width", "num_heads", "mlp_dim", "unimodal_depth",
                "multimodal_depth", "num_caption_queries")
LAYOUTS = ("paper", "open_clip")


class CrossAttentionBlock(nn.Module):
  """open_clip's cross-attention layer: x + attn(LN(x), LN(context)), then x + MLP(LN(x))."""

  config: BlockConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_btd: jax.Array, context_bsd: jax.Array | None) -> jax.Array:
    """`context_bsd` may be None only when decoding reads its keys / values from the cache."""
    c = self.config
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    cached_context = c.decode and c.cache_context
    if context_bsd is None and not cached_context:
      raise ValueError("a cross-attention block needs a context")
    if context_bsd is not None:
      context_bsd = LayerNorm(c.norm_eps, name="context_norm", **kw)(context_bsd)
    drop = nn.Dropout(c.dropout)
    attn = MultiHeadAttention(c.num_heads, use_bias=c.use_bias, decode=cached_context,
                              cache_context=c.cache_context, name="cross_attn", **kw)
    h_btd = LayerNorm(c.norm_eps, name="cross_attn_norm", **kw)(x_btd)
    x_btd = x_btd + drop(attn(h_btd, context_bsd), deterministic=self.deterministic)
    h_btd = LayerNorm(c.norm_eps, name="mlp_norm", **kw)(x_btd)
    mlp = MlpBlock(c.mlp_dim, c.act, c.dropout, use_bias=c.use_bias, name="mlp", **kw)
    x_btd = x_btd + drop(mlp(h_btd, self.deterministic), deterministic=self.deterministic)
    return constrain(x_btd, ("batch", "seq", "act_embed"))


class _OpenClipLayer(nn.Module):
  """One open_clip multimodal layer: a causal self-attention Block, then a CrossAttentionBlock."""

  config: BlockConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_btd, mask, context_bsd, positions_bt):
    x_btd = Block(self.config, deterministic=self.deterministic, name="self_block")(
        x_btd, mask, positions_bt=positions_bt)
    return CrossAttentionBlock(self.config, deterministic=self.deterministic,
                               name="cross_block")(x_btd, context_bsd)


class _ScanOpenClipLayer(_OpenClipLayer):
  """_OpenClipLayer with the (carry, per-layer output) signature of `nn.scan`."""

  @nn.compact
  def __call__(self, x_btd, mask, context_bsd, positions_bt):
    return super().__call__(x_btd, mask, context_bsd, positions_bt), None


class OpenClipDecoder(nn.Module):
  """open_clip's multimodal text decoder: `depth` _OpenClipLayers ("layer_i", or "layers"
  scanned) and a final LayerNorm. Called as `Transformer` is (the context mask is unused)."""

  depth: int
  block: BlockConfig
  scan: bool = False
  remat: str = "none"

  @nn.compact
  def __call__(self, x_btd: jax.Array, mask: jax.Array | None = None,
               context_bsd: jax.Array | None = None, context_mask: jax.Array | None = None,
               deterministic: bool = True, positions_bt: jax.Array | None = None) -> jax.Array:
    del context_mask  # open_clip attends to every captioning feature
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"Unknown remat policy {self.remat!r}; choose one of "
                       f"{sorted(REMAT_POLICIES)}")
    policy = REMAT_POLICIES[self.remat]
    if self.scan:
      unit = _ScanOpenClipLayer
      if self.remat != "none":
        unit = nn.remat(unit, prevent_cse=False, policy=policy)
      stack = nn.scan(unit, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * 3, length=self.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})(
                          self.block, deterministic=deterministic, name="layers")
      x_btd, _ = stack(x_btd, mask, context_bsd, positions_bt)
    else:
      unit = _OpenClipLayer
      if self.remat != "none":
        unit = nn.remat(unit, prevent_cse=True, policy=policy)
      for i in range(self.depth):
        x_btd = unit(self.block, deterministic=deterministic, name=f"layer_{i}")(
            x_btd, mask, context_bsd, positions_bt)
    c = self.block
    return LayerNorm(c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                     name="final_norm")(x_btd)


class CoCa(nn.Module):
  """Image ViT + attentional poolers + unimodal / multimodal text decoders + temperature."""

  variant: str | None = None  # a COCA_VARIANTS key; fills the size fields (and image) left None
  image: Mapping[str, Any] | None = None  # ViT fields, over the variant's (pool is "none")
  vocab_size: int | None = None
  width: int | None = None  # decoder width = pooler output width
  num_heads: int | None = None
  mlp_dim: int | None = None
  unimodal_depth: int | None = None
  multimodal_depth: int | None = None
  num_caption_queries: int | None = None  # paper: 256
  pool_heads: int | None = None  # heads of both poolers (default num_heads; open_clip: 8)
  max_len: int = 64  # longest text input; the CLS takes position row max_len
  embed_dim: int | None = None  # None: contrast the pooled / CLS features directly (paper);
  # else bias-free linear projections of both to embed_dim (open_clip)
  tied_output: bool = False  # False: separate vocabulary projection (open_clip, praxis)
  pad_id: int = 0
  contrastive: str = "softmax"  # "softmax" (paper) | "sigmoid" (SigLIP's, adds the bias "b")
  temperature_init: float | None = None  # t' with logit scale exp(t'); default by contrastive
  bias_init: float = -10.0  # the sigmoid loss's b
  max_scale: float | None = 100.0  # CLIP's clamp of exp(t')
  act: str = "gelu"
  norm_eps: float = 1e-6
  dropout: float = 0.0
  scan: bool = False
  remat: str = "none"
  decode: bool = False  # KV-cached decoders for `decode_step` (see decode_step_fn)
  layout: str = "paper"  # "paper" | "open_clip" (see the module docstring)
  dtype: Any = jnp.float32

  def sizes(self) -> dict[str, Any]:
    """The size fields, from the variant where not given explicitly."""
    if self.variant is not None and self.variant not in COCA_VARIANTS:
      raise ValueError(f"Unknown CoCa variant {self.variant!r}; "
                       f"choose one of {sorted(COCA_VARIANTS)}")
    return resolve_sizes("CoCa", COCA_VARIANTS.get(self.variant, {}), self, _SIZE_FIELDS)

  def setup(self):
    check_contrastive(self.contrastive)
    if self.layout not in LAYOUTS:
      raise ValueError(f"Unknown CoCa layout {self.layout!r}; choose one of {LAYOUTS}")
    s = self.sizes()
    width = s["width"]
    image = dict(pool="none", act=self.act, norm_eps=self.norm_eps, scan=self.scan,
                 remat=self.remat, dtype=self.dtype)
    if self.layout == "open_clip":
      image.update(class_token=True, pre_norm=True, patch_bias=False)
    if "image" in s:
      image["variant"] = s["image"]
    image.update(self.image or {})
    self.img = ViT(**image, name="img")
    # The paper's poolers: queries of the decoder width over ViT tokens, attention, LayerNorm.
    pool_kw = dict(num_heads=self.pool_heads or s["num_heads"], width=width,
                   probe_init=nn.initializers.normal(width ** -0.5), norm_eps=self.norm_eps,
                   dtype=self.dtype)
    self.contrastive_pool = AttentionPool(num_queries=1, **pool_kw)
    self.caption_pool = AttentionPool(num_queries=s["num_caption_queries"], **pool_kw)
    self.token_embedding = TokenEmbed(s["vocab_size"], width, dtype=self.dtype)
    self.pos_embedding = LearnedPosEmbed(self.max_len + 1, init_std=0.01)
    self.cls = self.param("cls", partitioned(nn.initializers.normal(0.01), (None, None, "embed")),
                          (1, 1, width), jnp.float32)
    # cache_context: decoding projects the captioning features to keys / values once.
    block = BlockConfig(s["num_heads"], s["mlp_dim"], act=self.act, dropout=self.dropout,
                        norm_eps=self.norm_eps, decode=self.decode, cache_context=True,
                        dtype=self.dtype)
    stack_kw = dict(block=block, scan=self.scan, remat=self.remat)
    self.unimodal = Transformer(s["unimodal_depth"], final_norm=False, **stack_kw)
    self.cls_norm = LayerNorm(self.norm_eps, dtype=self.dtype)
    if self.layout == "open_clip":
      self.multimodal = OpenClipDecoder(s["multimodal_depth"], **stack_kw)
    else:
      self.multimodal = Transformer(s["multimodal_depth"], cross_attention=True, **stack_kw)
    if not self.tied_output:
      self.head = Dense(s["vocab_size"], "embed", "vocab", use_bias=False,
                        kernel_init=nn.initializers.normal(width ** -0.5), dtype=self.dtype)
    if self.embed_dim is not None:
      self.img_proj = Dense(self.embed_dim, "embed", None, use_bias=False, dtype=self.dtype)
      self.txt_proj = Dense(self.embed_dim, "embed", None, use_bias=False, dtype=self.dtype)
    self.t_prime, self.bias = contrastive_parameters(self)

  def encode_image(self, images_bhwc: jax.Array, train: bool = False):
    """-> (contrastive features [B, W], captioning features [B, N, W], ViT tokens [B, P, W_img])."""
    tokens_bpd, _ = self.img(images_bhwc, train=train)
    pooled_bd = self.contrastive_pool(tokens_bpd)[:, 0]
    caption_bnd = constrain(self.caption_pool(tokens_bpd), ("batch", None, "act_embed"))
    return pooled_bd, caption_bnd, tokens_bpd

  def encode_text(self, tokens_bt: jax.Array, train: bool = False):
    """Unimodal decoder over [tokens, CLS] -> (LayerNorm'd CLS [B, W], text outputs [B, T, W])."""
    batch, length = tokens_bt.shape
    if length > self.max_len:
      raise ValueError(f"text length {length} exceeds max_len {self.max_len}")
    tokens_bt = constrain(tokens_bt, ("batch", "seq"))
    x_btd = self.pos_embedding(self.token_embedding(tokens_bt))
    cls_b1d = jnp.broadcast_to(self.cls, (batch, 1, self.cls.shape[-1])).astype(x_btd.dtype)
    open_clip = self.layout == "open_clip"
    cls_b1d = self.pos_embedding(cls_b1d, offset=length if open_clip else self.max_len)
    x_btd = jnp.concatenate([x_btd, cls_b1d], axis=1)
    if open_clip:
      # open_clip's (legacy) mask for every row: key 0, and key k where token k - 1 is no pad.
      valid_bk = jnp.concatenate([jnp.ones((batch, 1), bool), tokens_bt != self.pad_id], axis=1)
      mask = causal_mask(length + 1) & padding_mask(valid_bk)
    else:
      valid_bk = jnp.concatenate([tokens_bt != self.pad_id, jnp.ones((batch, 1), bool)], axis=1)
      # Every row is causal; only the CLS row (the last) also drops the pad keys.
      is_cls_row_q1 = (jnp.arange(length + 1) == length)[:, None]
      mask = causal_mask(length + 1) & (padding_mask(valid_bk) | ~is_cls_row_q1)
    x_btd = self.unimodal(x_btd, mask, deterministic=not train)
    return self.cls_norm(x_btd[:, -1]), x_btd[:, :-1]

  def caption_logits(self, text_btd: jax.Array, caption_bnd: jax.Array | None,
                     mask: jax.Array | None = None, train: bool = False,
                     hidden: bool = False, positions_bt: jax.Array | None = None) -> jax.Array:
    """Multimodal decoder (final LayerNorm included) and the vocabulary projection; with `hidden`
    the decoder output [B, T, W] before the projection."""
    x_btd = self.multimodal(text_btd, mask, caption_bnd, None, deterministic=not train,
                            positions_bt=positions_bt)
    return x_btd if hidden else self.vocab_logits(x_btd)

  def vocab_logits(self, x_btd: jax.Array) -> jax.Array:
    """The vocabulary projection [B, T, V] of multimodal decoder outputs."""
    if self.tied_output:
      return self.token_embedding.attend(x_btd)
    return self.head(x_btd)

  def decode_step(self, tokens_bt: jax.Array, caption_bnd: jax.Array | None,
                  positions_bt: jax.Array, hidden: bool = False) -> jax.Array:
    """With decode=True: feeds tokens at each row's `positions_bt` (int [B, T], also their KV
    cache slots) through both decoders (no CLS) and returns their next-token logits [B, T, V]
    (with `hidden`, the decoder outputs). The captioning features are projected to the
    cross-attention keys and values when given, and read from the cache when None."""
    x_btd = self.pos_embedding(self.token_embedding(tokens_bt), positions_bt=positions_bt)
    return self.caption_logits(self.unimodal(x_btd, positions_bt=positions_bt), caption_bnd,
                               hidden=hidden, positions_bt=positions_bt)

  def _embed(self, features_bd: jax.Array, proj: str) -> jax.Array:
    if self.embed_dim is not None:
      features_bd = getattr(self, proj)(features_bd)
    return l2_normalize(features_bd.astype(jnp.float32))

  def __call__(self, images_bhwc: jax.Array | None, tokens_bt: jax.Array | None,
               train: bool = False, caption_hidden: bool = False) -> dict[str, jax.Array | None]:
    """-> {"zimg": [B, D] or None, "ztxt": [B, D] or None, "logits": [B, T, V] or None (needs
    both inputs), "scale": [] (exp t', clamped), "bias": [] (sigmoid only), and with images
    "img/tokens" [B, P, W_img], "img/pre_logits" [B, W], "img/caption_features" [B, N, W],
    with tokens "txt/tokens" [B, T, W], "txt/pre_logits" [B, W]}.

    The logits at position t predict token t + 1; the embeddings are float32, L2-normalised.
    With `caption_hidden` the multimodal decoder's output [B, T, W] is returned as
    "caption_hidden" instead of the logits (a chunked cross-entropy projects it).
    """
    if self.decode:
      raise ValueError("a decode=True CoCa only runs decode_step; see decode_step_fn")
    out: dict[str, jax.Array | None] = {"zimg": None, "ztxt": None, "logits": None}
    if images_bhwc is not None:
      pooled_bd, caption_bnd, image_tokens = self.encode_image(images_bhwc, train)
      out.update({"img/tokens": image_tokens, "img/pre_logits": pooled_bd,
                  "img/caption_features": caption_bnd})
      out["zimg"] = self._embed(pooled_bd, "img_proj")
    if tokens_bt is not None:
      cls_bd, text_btd = self.encode_text(tokens_bt, train)
      out.update({"txt/tokens": text_btd, "txt/pre_logits": cls_bd})
      out["ztxt"] = self._embed(cls_bd, "txt_proj")
    if images_bhwc is not None and tokens_bt is not None:
      caption = self.caption_logits(text_btd, caption_bnd, causal_mask(tokens_bt.shape[1]), train,
                                    hidden=caption_hidden)
      out["caption_hidden" if caption_hidden else "logits"] = caption
    return {**out, **contrastive_outputs(self.t_prime, self.bias, self.max_scale)}


def init_decode(model: CoCa, params, images_bhwc: jax.Array, max_len: int) -> dict:
  """The empty `vljax.decode` cache for captioning `images` (KV caches of both decoders holding
  `max_len` positions and the cross-attention keys / values, every leaf batch-first), and the
  images' captioning features [B, N, W] that `prefill` projects into it."""
  if max_len > model.max_len:
    raise ValueError(f"cache length {max_len} exceeds the model's max_len {model.max_len}")
  caption_bnd = model.apply({"params": params}, images_bhwc,
                            method=lambda module, images: module.encode_image(images)[1])
  decoder = model.clone(decode=True)

  def declare(params, caption_bnd):
    tokens_bt = jnp.zeros((caption_bnd.shape[0], max_len), jnp.int32)
    _, variables = decoder.apply({"params": params}, tokens_bt, caption_bnd,
                                 jnp.arange(max_len)[None], method=CoCa.decode_step,
                                 mutable=["cache"])
    return variables["cache"]

  # A cache starts as zeros, so only its shapes are needed.
  shapes = jax.eval_shape(declare, params, caption_bnd)
  kv = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return {"kv": decode.batch_major_cache(kv, model.scan), "caption_features": caption_bnd}


def prefill(model: CoCa, params, cache: Mapping, prompt_bl: jax.Array,
            prompt_len_b: jax.Array | None = None) -> decode.Prefilled:
  """One parallel pass of both decoders over right-padded prompts [B, P] (BOS first; lengths
  `prompt_len_b`, default all P) that fills the cache from `init_decode`, projecting the
  captioning features to cross-attention keys and values once."""
  prompt_bl = jnp.asarray(prompt_bl, jnp.int32)
  batch, prompt_len = prompt_bl.shape
  prompt_len_b = decode.prompt_lengths(prompt_bl, prompt_len_b)
  decoder = model.clone(decode=True)
  variables = {"params": params, "cache": decode.layer_major_cache(cache["kv"], model.scan)}
  hidden_bld, mutated = decoder.apply(
      variables, prompt_bl, cache["caption_features"],
      jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len)), hidden=True,
      method=CoCa.decode_step, mutable=["cache"])
  last_b1d = decode.last_prompt_logits(hidden_bld, prompt_len_b)[:, None]
  logits_bv = decoder.apply({"params": params}, last_b1d, method=CoCa.vocab_logits)[:, 0]
  # The features now live in the cache as keys and values; beams need not carry them.
  return decode.Prefilled(
      logits_bv, {"kv": decode.batch_major_cache(mutated["cache"], model.scan)}, prompt_len_b)


def decode_step_fn(model: CoCa, params) -> decode.StepFn:
  """`step_fn(tokens_b, cache, positions_b) -> (logits_bv, cache)` for vljax.decode, from a
  cache that `prefill` filled."""
  decoder = model.clone(decode=True)

  def step_fn(tokens_b, cache, positions_b):
    variables = {"params": params, "cache": decode.layer_major_cache(cache["kv"], model.scan)}
    logits_b1v, mutated = decoder.apply(variables, tokens_b[:, None], None,
                                        positions_b[:, None], method=CoCa.decode_step,
                                        mutable=["cache"])
    return logits_b1v[:, 0], {"kv": decode.batch_major_cache(mutated["cache"], model.scan)}

  return step_fn


def generate(model: CoCa, params, images_bhwc: jax.Array, *, max_new_tokens: int, bos_id: int,
             eos_id: int | Sequence[int], pad_id: int | None = None, beam_size: int = 1,
             length_penalty: float = 0.0, prompt_bl: jax.Array | None = None,
             prompt_len_b: jax.Array | None = None, rng: jax.Array | None = None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Captions int32 [B, max_new_tokens] for normalised images (pad_id after the stop token):
  greedy by default, the best of `beam_size` > 1 beams, or, given `rng`, sampled.

  Decoding continues after a prompt: `prompt_bl`, int32 [B, P] starting with BOS, right-padded,
  with per-example lengths `prompt_len_b` (default: all P); without one, after BOS alone. The
  prompt is not part of the output. Needs P + max_new_tokens - 1 <= model.max_len.
  """
  pad_id = model.pad_id if pad_id is None else pad_id
  if prompt_bl is None:
    if prompt_len_b is not None:
      raise ValueError("prompt_len_b was given without prompt_bl")
    prompt_bl = jnp.full((images_bhwc.shape[0], 1), bos_id, jnp.int32)
  if prompt_bl.ndim != 2 or prompt_bl.shape[0] != images_bhwc.shape[0]:
    raise ValueError(f"prompt_bl must be [batch, length] with the images' batch "
                     f"{images_bhwc.shape[0]}, got shape {prompt_bl.shape}")
  cache = init_decode(model, params, images_bhwc,
                      decode.cache_length(prompt_bl.shape[1], max_new_tokens))
  start = prefill(model, params, cache, prompt_bl, prompt_len_b)
  return decode.run(decode_step_fn(model, params), start, max_new_tokens=max_new_tokens,
                    eos_id=eos_id, pad_id=pad_id, beam_size=beam_size,
                    length_penalty=length_penalty, rng=rng, temperature=temperature,
                    top_k=top_k, top_p=top_p)
