"""T5 encoder-decoder language models: T5 v1.1 / Flan-T5 and the original T5, layer for layer
as transformers' T5ForConditionalGeneration, so that their checkpoints import
(`from_hf_state_dict`) and give the same logits.

Both stacks are pre-norm: x + f(RMSNorm(x)) for self-attention, (decoder) cross-attention to the
encoder output and the feed-forward block, then a final RMSNorm. T5's RMSNorm has no mean
subtraction and no bias (variance in float32, eps 1e-6). Attention has no biases and no
1 / sqrt(head_dim) on the logits (Mesh TensorFlow folds it into the query initialisation); the
self-attention logits get a learned bias per head and relative-position bucket (bidirectional
buckets in the encoder, causal in the decoder), one table per stack shared by all its layers
(transformers keeps it in the stack's first layer). One token embedding feeds both stacks.

                 v1.1 / Flan-T5 (defaults)            original T5 ("t5-*")
  feed-forward   gated GELU (tanh): gelu(x wi_0) *    ReLU: relu(x wi) wo
                 (x wi_1), then wo
  output head    its own matrix                       the token embedding, applied to the
                                                      decoder output scaled by width ** -0.5

`T5(...)(tokens_bs, decoder_tokens_bt)` -> {"logits": [B, T, V], "encoder_out": [B, S, D],
"hidden": [B, T, D]}. The encoder may instead take embeddings (`encoder_embeds_bsd`: BLIP-2's or
PaLI's visual prefix) and a padding mask (`encoder_mask_bs`, True for real positions; default
all real). Decoder inputs start with `decoder_start_id` (T5: the pad id 0) and attend causally.
Generation (`init_cache`, `prefill`, `decode_step_fn`, `generate`) keeps a KV cache for decoder
self-attention; the prefill pass over the decoder prompt projects the encoder output to each
layer's cross-attention keys and values, once per sequence.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from vljax import decode
from vljax.models.sizes import resolve_sizes
from vljax.nn import (BlockConfig, Dense, RelativePositionBias, TokenEmbed, Transformer,
                      causal_mask, constrain, padding_mask)

# T5 v1.1 / Flan-T5; every entry can be overridden by a variant or a field.
T5_DEFAULTS: dict[str, Any] = dict(num_buckets=32, max_distance=128, norm_eps=1e-6,
                                   tied_head=False, act="gelu_tanh", gated_mlp=True)
_OPTION_FIELDS = tuple(T5_DEFAULTS)
_SIZE_FIELDS = ("vocab_size", "width", "depth_encoder", "depth_decoder", "num_heads", "mlp_dim")
_ORIGINAL = dict(act="relu", gated_mlp=False, tied_head=True)

# Released sizes (the checkpoints' config.json: d_model, num_layers / num_decoder_layers,
# num_heads, d_kv, d_ff). "mu" is a tiny preset for tests and CPU demos (vocab_size from the
# tokenizer), with head_dim * num_heads != width as in the released models.
T5_VARIANTS: dict[str, dict[str, Any]] = {
    "mu": dict(width=32, depth_encoder=2, depth_decoder=2, num_heads=4, head_dim=6, mlp_dim=64,
               num_buckets=8, max_distance=16),
    "flan-t5-small": dict(vocab_size=32_128, width=512, depth_encoder=8, depth_decoder=8,
                          num_heads=6, head_dim=64, mlp_dim=1024),
    "flan-t5-base": dict(vocab_size=32_128, width=768, depth_encoder=12, depth_decoder=12,
                         num_heads=12, head_dim=64, mlp_dim=2048),
    "flan-t5-large": dict(vocab_size=32_128, width=1024, depth_encoder=24, depth_decoder=24,
                          num_heads=16, head_dim=64, mlp_dim=2816),
    "flan-t5-xl": dict(vocab_size=32_128, width=2048, depth_encoder=24, depth_decoder=24,
                       num_heads=32, head_dim=64, mlp_dim=5120),
    "flan-t5-xxl": dict(vocab_size=32_128, width=4096, depth_encoder=24, depth_decoder=24,
                        num_heads=64, head_dim=64, mlp_dim=10_240),
    "t5-small": dict(vocab_size=32_128, width=512, depth_encoder=6, depth_decoder=6, num_heads=8,
                     head_dim=64, mlp_dim=2048, **_ORIGINAL),
    "t5-base": dict(vocab_size=32_128, width=768, depth_encoder=12, depth_decoder=12,
                    num_heads=12, head_dim=64, mlp_dim=3072, **_ORIGINAL),
    "t5-large": dict(vocab_size=32_128, width=1024, depth_encoder=24, depth_decoder=24,
                     num_heads=16, head_dim=64, mlp_dim=4096, **_ORIGINAL),
}


class T5Stack(nn.Module):
  """A T5 encoder or decoder stack: the relative position bias table shared by its layers, the
  layers and the final norm. The `Transformer` shares this module's scope, so its parameters
  ("layer_i" or, scanned, "layers", and "final_norm") sit beside "relative_bias"."""

  depth: int
  block: BlockConfig
  num_buckets: int
  max_distance: int
  causal: bool  # decoder: causal self-attention, unidirectional buckets, cross-attention
  bias_init_std: float = 1.0
  scan: bool = False
  remat: str = "none"

  def setup(self):
    self.relative_bias = RelativePositionBias(
        self.block.num_heads, self.num_buckets, self.max_distance, bidirectional=not self.causal,
        embedding_init=nn.initializers.normal(self.bias_init_std),
        param_dtype=self.block.param_dtype)
    self.stack = Transformer(self.depth, self.block, cross_attention=self.causal, scan=self.scan,
                             remat=self.remat)
    nn.share_scope(self, self.stack)

  def _cache_length(self) -> int | None:
    """Length of the decode KV cache; None before it exists (the call that makes it attends to
    its own tokens only)."""
    cache = self.variables.get("cache", {})
    layer = cache.get("layers" if self.scan else "layer_0", {})
    attention = layer.get("self_attn", {})
    if "cached_key" not in attention:
      return None
    return attention["cached_key"].shape[2 if self.scan else 1]  # scanned: [depth, B, L, ..]

  def __call__(self, x_btd: jax.Array, mask: jax.Array | None = None,
               context_bsd: jax.Array | None = None, context_mask: jax.Array | None = None,
               deterministic: bool = True, positions_bt: jax.Array | None = None) -> jax.Array:
    """`positions_bt` (int [B, T], decode only): each row's positions of the new tokens, which
    are also their KV cache slots; the relative bias is then taken against every cache slot."""
    length = x_btd.shape[1]
    query_positions, key_positions = jnp.arange(length), jnp.arange(length)
    if self.block.decode:
      if positions_bt is None:
        raise ValueError("a decode=True T5 decoder needs positions_bt")
      if (cache_length := self._cache_length()) is not None:
        query_positions, key_positions = positions_bt, jnp.arange(cache_length)
    bias_bhqk = self.relative_bias(query_positions, key_positions)
    return self.stack(x_btd, mask, context_bsd, context_mask, deterministic=deterministic,
                      positions_bt=positions_bt, attention_bias=bias_bhqk)


class T5(nn.Module):
  """Shared token embedding, T5 encoder and decoder stacks, vocabulary projection (tied or not).
  Fields left None come from the variant, then from T5_DEFAULTS (v1.1 / Flan-T5)."""

  variant: str | None = None  # a T5_VARIANTS key
  vocab_size: int | None = None
  width: int | None = None  # d_model
  depth_encoder: int | None = None  # num_layers
  depth_decoder: int | None = None  # num_decoder_layers
  num_heads: int | None = None
  head_dim: int | None = None  # d_kv; None: width // num_heads
  mlp_dim: int | None = None  # d_ff
  num_buckets: int | None = None  # relative_attention_num_buckets (32)
  max_distance: int | None = None  # relative_attention_max_distance (128)
  norm_eps: float | None = None  # layer_norm_epsilon (1e-6)
  tied_head: bool | None = None  # logits = (decoder output * width ** -0.5) @ embedding^T
  act: str | None = None  # a key of vljax.nn.layers.ACTIVATIONS ("gelu_tanh": gelu_new)
  gated_mlp: bool | None = None  # act(x wi_0) * (x wi_1) -> wo instead of act(x wi) -> wo
  dropout: float = 0.0  # dropout_rate: inputs, sublayer outputs, inside the MLP, final norms
  scan: bool = False
  remat: str = "none"
  decode: bool = False  # KV-cached decoder; see init_cache / decode_step_fn
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # LoRA adapters on both stacks' projections (vljax.nn.lora); lora_rank 0: none.
  lora_rank: int = 0
  lora_alpha: float = 16.0  # adapters are scaled by lora_alpha / lora_rank
  lora_targets: Sequence[str] = ("query", "value")  # see vljax.nn.lora.LORA_TARGETS

  def config(self) -> dict[str, Any]:
    """Every size and option: explicit fields over the variant over T5_DEFAULTS."""
    if self.variant is not None and self.variant not in T5_VARIANTS:
      raise ValueError(f"Unknown T5 variant {self.variant!r}; choose one of {sorted(T5_VARIANTS)}")
    c = {**T5_DEFAULTS, **resolve_sizes("T5", T5_VARIANTS.get(self.variant, {}), self,
                                        _SIZE_FIELDS)}
    for field in _OPTION_FIELDS + ("head_dim",):
      if getattr(self, field) is not None:
        c[field] = getattr(self, field)
    if c.get("head_dim") is None:
      if c["width"] % c["num_heads"]:
        raise ValueError(f"width {c['width']} is not divisible by num_heads {c['num_heads']}; "
                         "give head_dim")
      c["head_dim"] = c["width"] // c["num_heads"]
    return c

  def setup(self):
    c = self.config()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = c["width"]
    # transformers' initialisation (factor 1): embedding N(0, 1), relative bias N(0, d^-0.5).
    self.token_embedding = TokenEmbed(c["vocab_size"], width, init_std=1.0, **kw)
    block = BlockConfig(c["num_heads"], c["mlp_dim"], act=c["act"], dropout=self.dropout,
                        norm_eps=c["norm_eps"], rms_norm=True, head_dim=c["head_dim"],
                        gated_mlp=c["gated_mlp"], use_bias=False, scale_attention=False,
                        cache_context=True, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                        lora_targets=self.lora_targets, **kw)
    stack_kw = dict(num_buckets=c["num_buckets"], max_distance=c["max_distance"],
                    bias_init_std=width ** -0.5, scan=self.scan, remat=self.remat)
    self.encoder = T5Stack(c["depth_encoder"], block, causal=False, **stack_kw)
    self.decoder = T5Stack(c["depth_decoder"], block.replace(decode=self.decode), causal=True,
                           **stack_kw)
    if not c["tied_head"]:
      self.head = Dense(c["vocab_size"], "embed", "vocab", use_bias=False,
                        kernel_init=nn.initializers.normal(width ** -0.5), **kw)
    self.drop = nn.Dropout(self.dropout)

  def embed(self, tokens_bt: jax.Array) -> jax.Array:
    """Token embeddings [B, T, D], for bridges that splice in other vectors."""
    return self.token_embedding(constrain(tokens_bt, ("batch", "seq")))

  def _inputs(self, tokens_bt, embeds_btd, name: str) -> jax.Array:
    if (tokens_bt is None) == (embeds_btd is None):
      raise ValueError(f"give exactly one of {name} token ids and embeddings")
    x_btd = self.embed(tokens_bt) if embeds_btd is None else embeds_btd.astype(self.dtype)
    return constrain(x_btd, ("batch", "seq", "act_embed"))

  def encode(self, tokens_bs: jax.Array | None = None, *, embeds_bsd: jax.Array | None = None,
             mask_bs: jax.Array | None = None, train: bool = False) -> jax.Array:
    """Token ids [B, S] or input embeddings [B, S, D] (True in `mask_bs` for real positions)
    -> encoder output [B, S, D] (after the final norm)."""
    x_bsd = self.drop(self._inputs(tokens_bs, embeds_bsd, "encoder"), deterministic=not train)
    mask = None if mask_bs is None else padding_mask(mask_bs)
    x_bsd = self.encoder(x_bsd, mask, deterministic=not train)
    return constrain(self.drop(x_bsd, deterministic=not train), ("batch", "seq", "act_embed"))

  def decode_logits(self, decoder_tokens_bt: jax.Array | None = None,
                    encoder_out_bsd: jax.Array | None = None,
                    encoder_mask_bs: jax.Array | None = None, *,
                    decoder_embeds_btd: jax.Array | None = None, train: bool = False,
                    hidden: bool = False, positions_bt: jax.Array | None = None) -> jax.Array:
    """Decoder over ids [B, T] (or embeddings [B, T, D]) attending causally to itself and to
    the encoder output -> next-token logits [B, T, V] (with `hidden`, the decoder output
    [B, T, D]). With decode=True the tokens go to each row's `positions_bt` (int [B, T]) and
    `encoder_out_bsd` may be None once the cache holds its cross-attention keys and values
    (see prefill)."""
    if encoder_out_bsd is None and not self.decode:
      raise ValueError("the decoder needs the encoder output")
    x_btd = self.drop(self._inputs(decoder_tokens_bt, decoder_embeds_btd, "decoder"),
                      deterministic=not train)
    mask = None if self.decode else causal_mask(x_btd.shape[1])
    context_mask = None if encoder_mask_bs is None else padding_mask(encoder_mask_bs)
    x_btd = self.decoder(x_btd, mask, encoder_out_bsd, context_mask, deterministic=not train,
                         positions_bt=positions_bt)
    x_btd = self.drop(x_btd, deterministic=not train)
    return x_btd if hidden else self.logits(x_btd)

  def logits(self, hidden_btd: jax.Array) -> jax.Array:
    """The vocabulary projection [B, T, V] of decoder outputs."""
    c = self.config()
    if c["tied_head"]:
      # Original T5 rescales before its tied projection (transformers: scale_decoder_outputs).
      return self.token_embedding.attend(hidden_btd * c["width"] ** -0.5)
    return self.head(hidden_btd)

  def __call__(self, tokens_bs: jax.Array | None = None,
               decoder_tokens_bt: jax.Array | None = None, *,
               encoder_embeds_bsd: jax.Array | None = None,
               encoder_mask_bs: jax.Array | None = None,
               decoder_embeds_btd: jax.Array | None = None,
               train: bool = False) -> dict[str, jax.Array]:
    """-> {"logits": [B, T, V], "encoder_out": [B, S, D], "hidden": [B, T, D]}; the logits at
    t predict decoder token t + 1 (teacher forcing: decoder tokens are the targets shifted right
    after `decoder_start_id`)."""
    if self.decode:
      raise ValueError("a decode=True T5 only runs decode_logits; see decode_step_fn")
    encoder_out_bsd = self.encode(tokens_bs, embeds_bsd=encoder_embeds_bsd,
                                  mask_bs=encoder_mask_bs, train=train)
    hidden_btd = self.decode_logits(decoder_tokens_bt, encoder_out_bsd, encoder_mask_bs,
                                    decoder_embeds_btd=decoder_embeds_btd, train=train,
                                    hidden=True)
    return {"logits": self.logits(hidden_btd), "encoder_out": encoder_out_bsd,
            "hidden": hidden_btd}


# ---------------------------------------------------------------------------------------------
# Generation with a KV cache.


def init_cache(model: T5, params, encoder_out_bsd: jax.Array, *, max_len: int) -> dict:
  """The empty `vljax.decode` cache (every leaf batch-first) for decoding `max_len` positions
  against an encoded batch: decoder self-attention KV caches and every decoder layer's
  cross-attention keys and values, which `prefill` computes once per sequence."""
  batch = encoder_out_bsd.shape[0]
  decoder = model.clone(decode=True)

  def declare(params):
    tokens_bt = jnp.zeros((batch, max_len), jnp.int32)
    _, mutated = decoder.apply({"params": params}, tokens_bt, encoder_out_bsd,
                               positions_bt=jnp.arange(max_len)[None], method=T5.decode_logits,
                               mutable=["cache"])
    return mutated["cache"]

  # Shapes only: a cache starts as zeros.
  shapes = jax.eval_shape(declare, params)
  kv = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return {"kv": decode.batch_major_cache(kv, model.scan),
          "encoder_mask": jnp.ones(encoder_out_bsd.shape[:2], bool)}


def prefill(model: T5, params, cache: Mapping, encoder_out_bsd: jax.Array,
            encoder_mask_bs: jax.Array | None, prompt_bl: jax.Array,
            prompt_len_b: jax.Array | None = None) -> decode.Prefilled:
  """One parallel decoder pass over right-padded decoder prompts [B, P] (`decoder_start_id`,
  then any forced prefix; lengths `prompt_len_b`, default all P): fills the self-attention KV
  cache, projects the encoder output to every layer's cross-attention keys and values (once
  per sequence) and returns the logits after each row's prompt."""
  prompt_bl = jnp.asarray(prompt_bl, jnp.int32)
  batch, prompt_len = prompt_bl.shape
  if encoder_mask_bs is None:
    encoder_mask_bs = jnp.ones(encoder_out_bsd.shape[:2], bool)
  encoder_mask_bs = jnp.asarray(encoder_mask_bs, bool)
  prompt_len_b = decode.prompt_lengths(prompt_bl, prompt_len_b)
  decoder = model.clone(decode=True)
  variables = {"params": params, "cache": decode.layer_major_cache(cache["kv"], model.scan)}
  hidden_bld, mutated = decoder.apply(
      variables, prompt_bl, encoder_out_bsd, encoder_mask_bs,
      positions_bt=jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len)),
      method=T5.decode_logits, hidden=True, mutable=["cache"])
  last_bd = decode.last_prompt_logits(hidden_bld, prompt_len_b)
  logits_bv = decoder.apply({"params": params}, last_bd[:, None], method=T5.logits)[:, 0]
  new_cache = {"kv": decode.batch_major_cache(mutated["cache"], model.scan),
               "encoder_mask": encoder_mask_bs}
  return decode.Prefilled(logits_bv, new_cache, prompt_len_b)


def decode_step_fn(model: T5, params) -> decode.StepFn:
  """`step_fn(tokens_b, cache, positions_b) -> (logits_bv, cache)` for vljax.decode, from a
  cache that `prefill` filled."""
  decoder = model.clone(decode=True)

  def step_fn(tokens_b, cache, positions_b):
    variables = {"params": params, "cache": decode.layer_major_cache(cache["kv"], model.scan)}
    logits_b1v, mutated = decoder.apply(variables, tokens_b[:, None], None,
                                        cache["encoder_mask"], positions_bt=positions_b[:, None],
                                        method=T5.decode_logits, mutable=["cache"])
    return logits_b1v[:, 0], {**cache, "kv": decode.batch_major_cache(mutated["cache"],
                                                                      model.scan)}

  return step_fn


def generate(model: T5, params, tokens_bs: jax.Array | None = None, *,
             embeds_bsd: jax.Array | None = None, mask_bs: jax.Array | None = None,
             max_new_tokens: int, decoder_start_id: int = 0,
             eos_id: int | Sequence[int] = 1, pad_id: int = 0, beam_size: int = 1,
             length_penalty: float = 0.0, prompt_bl: jax.Array | None = None,
             prompt_len_b: jax.Array | None = None, rng: jax.Array | None = None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Outputs int32 [B, max_new_tokens] for encoder ids [B, S] (or embeddings [B, S, D]) with
  padding mask `mask_bs`; pad_id after the stop token. Greedy by default; the best of
  `beam_size` > 1 beams; or, given `rng`, sampled (temperature, top_k, top_p).

  The decoder starts from `decoder_start_id` (T5: the pad id 0), or continues a forced prefix
  `prompt_bl` [B, P] that starts with it (right-padded, lengths `prompt_len_b`); the prefix is
  not part of the output.
  """
  encoder_out_bsd = model.clone(decode=False).apply(
      {"params": params}, tokens_bs, embeds_bsd=embeds_bsd, mask_bs=mask_bs, method=T5.encode)
  batch = encoder_out_bsd.shape[0]
  if prompt_bl is None:
    if prompt_len_b is not None:
      raise ValueError("prompt_len_b was given without prompt_bl")
    prompt_bl = jnp.full((batch, 1), decoder_start_id, jnp.int32)
  prompt_bl = jnp.asarray(prompt_bl, jnp.int32)
  if prompt_bl.ndim != 2 or prompt_bl.shape[0] != batch:
    raise ValueError(f"prompt_bl must be [batch, length] with the encoder's batch {batch}, "
                     f"got shape {prompt_bl.shape}")
  cache = init_cache(model, params, encoder_out_bsd,
                     max_len=decode.cache_length(prompt_bl.shape[1], max_new_tokens))
  start = prefill(model, params, cache, encoder_out_bsd, mask_bs, prompt_bl, prompt_len_b)
  return decode.run(decode_step_fn(model, params), start, max_new_tokens=max_new_tokens,
                    eos_id=eos_id, pad_id=pad_id, beam_size=beam_size,
                    length_penalty=length_penalty, rng=rng, temperature=temperature,
                    top_k=top_k, top_p=top_p)


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers checkpoints (pure NumPy: state dicts of arrays, configs as objects
# or config.json dicts).

_HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                   "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "swish": "silu"}
# Keys transformers itself ignores on load: old checkpoints hold a never-used relative bias in
# the decoder's first cross-attention.
_HF_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
_EMBEDDING = ("token_embedding", "embedding")


def _hf_get(hf_config, name: str, default: Any = None) -> Any:
  if isinstance(hf_config, Mapping):
    value = hf_config.get(name, default)
  else:
    value = getattr(hf_config, name, default)
  return default if value is None else value


def config_from_hf(hf_config) -> dict[str, Any]:
  """T5 fields of a transformers T5Config (or MT5Config), or of a checkpoint's config.json."""
  get = lambda name, default=None: _hf_get(hf_config, name, default)
  model_type = get("model_type")
  if model_type not in (None, "t5", "mt5"):
    raise NotImplementedError(f"a {model_type!r} config is not a T5 layout vljax implements "
                              "(UMT5 has a relative bias in every layer)")
  projection = get("feed_forward_proj", "relu")
  parts = projection.split("-")
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise ValueError(f"feed_forward_proj {projection!r} is neither 'ACT' nor 'gated-ACT'")
  act = "gelu_new" if projection == "gated-gelu" else parts[-1]  # as transformers maps it
  if act not in _HF_ACTIVATIONS:
    raise NotImplementedError(f"activation {act!r} has no vljax equivalent")
  # transformers 5 always ties the config and keeps the v1.1 flag as scale_decoder_outputs; a
  # config.json (and transformers 4) says tie_word_embeddings (absent: original T5, tied).
  tied = get("scale_decoder_outputs")
  if tied is None:
    tied = get("tie_word_embeddings", True)
  return dict(vocab_size=get("vocab_size"), width=get("d_model"),
              depth_encoder=get("num_layers"),
              depth_decoder=get("num_decoder_layers", get("num_layers")),
              num_heads=get("num_heads"), head_dim=get("d_kv"), mlp_dim=get("d_ff"),
              num_buckets=get("relative_attention_num_buckets", 32),
              max_distance=get("relative_attention_max_distance", 128),
              norm_eps=float(get("layer_norm_epsilon", 1e-6)), tied_head=bool(tied),
              act=_HF_ACTIVATIONS[act], gated_mlp=len(parts) == 2)


# (hf key, vljax path, transposed, hf shape, vljax shape, alias): an alias is another name of
# the token embedding (each stack's embed_tokens, a tied lm_head), optional on import.
_Entry = tuple[str, tuple[str, ...], bool, tuple[int, ...], tuple[int, ...], bool]


def _hf_entries(c: Mapping[str, Any]) -> list[_Entry]:
  """Every parameter of an unscanned T5, in transformers' names; torch Linear weights are
  [out, in] (transposed), attention projections [heads * head_dim, width]."""
  width, heads, head_dim, mlp = c["width"], c["num_heads"], c["head_dim"], c["mlp_dim"]
  vocab, inner = c["vocab_size"], c["num_heads"] * c["head_dim"]
  entries: list[_Entry] = []

  def add(key, path, transposed, hf_shape, shape, alias=False):
    entries.append((key, tuple(path), transposed, tuple(hf_shape), tuple(shape), alias))

  def linear(key, path, fan_in, fan_out, shape):
    add(key + ".weight", path + ("kernel",), True, (fan_out, fan_in), shape)

  def attention(key, path):
    for name, target in zip("qkv", ("query", "key", "value")):
      linear(f"{key}.{name}", path + (target,), width, inner, (width, heads, head_dim))
    linear(f"{key}.o", path + ("out",), inner, width, (heads, head_dim, width))

  def norm(key, path):
    add(key + ".weight", path + ("norm", "scale"), False, (width,), (width,))

  add("shared.weight", _EMBEDDING, False, (vocab, width), (vocab, width))
  for stack in ("encoder", "decoder"):
    add(f"{stack}.embed_tokens.weight", _EMBEDDING, False, (vocab, width), (vocab, width), True)
    add(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        (stack, "relative_bias", "embedding"), False, (c["num_buckets"], heads),
        (c["num_buckets"], heads))
    for i in range(c[f"depth_{stack}"]):
      key, path = f"{stack}.block.{i}.layer.", (stack, f"layer_{i}")
      attention(key + "0.SelfAttention", path + ("self_attn",))
      norm(key + "0.layer_norm", path + ("self_attn_norm",))
      ff = f"{key}1."
      if stack == "decoder":
        attention(key + "1.EncDecAttention", path + ("cross_attn",))
        norm(key + "1.layer_norm", path + ("cross_attn_norm",))
        ff = f"{key}2."
      mlp_path = path + ("mlp",)
      inputs = (("wi_0", "gate"), ("wi_1", "up")) if c["gated_mlp"] else (("wi", "fc1"),)
      for name, target in inputs:
        linear(f"{ff}DenseReluDense.{name}", mlp_path + (target, "dense"), width, mlp,
               (width, mlp))
      linear(f"{ff}DenseReluDense.wo", mlp_path + ("down" if c["gated_mlp"] else "fc2", "dense"),
             mlp, width, (mlp, width))
      norm(ff + "layer_norm", path + ("mlp_norm",))
    norm(f"{stack}.final_layer_norm", (stack, "final_norm"))
  if c["tied_head"]:
    add("lm_head.weight", _EMBEDDING, False, (vocab, width), (vocab, width), True)
  else:
    add("lm_head.weight", ("head", "dense", "kernel"), True, (vocab, width), (width, vocab))
  return entries


def from_hf_state_dict(state_dict: Mapping[str, Any], hf_config, *, scan: bool = False) -> dict:
  """vljax params of `T5(**config_from_hf(hf_config), scan=scan)` from a transformers
  T5ForConditionalGeneration state dict of NumPy arrays (dtypes are kept).

  Every key must be used and every shape must match, else one ValueError names the missing,
  unused and misshapen keys. The stacks' embed_tokens and a tied lm_head may be absent; if
  present they must equal shared.weight.
  """
  c = T5(**config_from_hf(hf_config)).config()
  state = {key: np.asarray(value) for key, value in state_dict.items() if key not in _HF_IGNORED}
  flat: dict[tuple[str, ...], np.ndarray] = {}  # parameter path -> value
  missing, misshapen, different = [], [], []
  for key, path, transposed, hf_shape, shape, alias in _hf_entries(c):
    if key not in state:
      if not alias:
        missing.append(key)
      continue
    value = state[key]
    if value.shape != hf_shape:
      misshapen.append(f"{key}: {value.shape}, expected {hf_shape}")
    elif alias:
      if "shared.weight" in state and not np.array_equal(value, state["shared.weight"]):
        different.append(key)
    else:
      flat[path] = (value.T if transposed else value).reshape(shape)
  unused = sorted(set(state) - {entry[0] for entry in _hf_entries(c)})
  problems = [f"{title} ({len(keys)}): {keys[:8]}" for title, keys in (
      ("missing keys", missing), ("unused keys", unused), ("wrong shapes", misshapen),
      ("keys that should equal shared.weight but differ (tied embeddings)", different)) if keys]
  if problems:
    raise ValueError("the state dict does not match the T5 config; " + "; ".join(problems))
  params = traverse_util.unflatten_dict(flat)
  return stack_layers(params, c) if scan else params


def to_hf_state_dict(params: Mapping, hf_config) -> dict[str, np.ndarray]:
  """The inverse of `from_hf_state_dict`: a T5ForConditionalGeneration state dict of NumPy
  arrays with every key torch's `state_dict()` lists (the embedding under all its names)."""
  c = T5(**config_from_hf(hf_config)).config()
  params = jax.tree.map(np.asarray, nn.meta.unbox(params))
  if "layers" in params["encoder"]:
    params = unstack_layers(params, c)
  flat, state = traverse_util.flatten_dict(params), {}
  for key, path, transposed, hf_shape, _, _ in _hf_entries(c):
    value = flat[path]
    hf_value = value.reshape(hf_shape[::-1]).T if transposed else value.reshape(hf_shape)
    state[key] = np.ascontiguousarray(hf_value)
  return state


def stack_layers(params: Mapping, c: Mapping[str, Any]) -> dict:
  """Unscanned T5 params ("encoder/layer_i", ...) -> scanned ("encoder/layers", leading depth
  axis); `c` is `T5.config()`."""
  out = dict(params)
  for stack in ("encoder", "decoder"):
    tree = dict(params[stack])
    layers = [tree.pop(f"layer_{i}") for i in range(c[f"depth_{stack}"])]
    tree["layers"] = jax.tree.map(lambda *x: np.stack(x), *layers)
    out[stack] = tree
  return out


def unstack_layers(params: Mapping, c: Mapping[str, Any]) -> dict:
  """The inverse of `stack_layers`."""
  out = dict(params)
  for stack in ("encoder", "decoder"):
    tree = dict(params[stack])
    layers = tree.pop("layers")
    for i in range(c[f"depth_{stack}"]):
      tree[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], layers)
    out[stack] = tree
  return out
