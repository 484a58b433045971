"""Decoder-only language models: LLaMA / Vicuna, OPT and GPT-2, layer for layer as transformers'
LlamaForCausalLM, OPTForCausalLM and GPT2LMHeadModel, so that their checkpoints import
(`from_hf_state_dict`) and give the same logits.

A recipe fixes what the three differ in (RECIPES); every entry can be overridden by a field:

                 llama (LLaMA, Vicuna)     opt                        gpt2
  norm           RMSNorm, eps 1e-6         LayerNorm, eps 1e-5        LayerNorm, eps 1e-5
  positions      rotary, rotate-half       learned, rows offset by 2  learned
  MLP            SwiGLU (gate, up, down)   ReLU                       GELU, tanh ("gelu_new")
  biases         none                      everywhere                 everywhere
  output head    separate matrix           tied to the embedding      tied to the embedding

All three are pre-norm stacks with a final norm; LLaMA may share key/value heads (grouped-query
attention) and use a head_dim other than width / num_heads. OPT-350m (post-LayerNorm,
project_in / project_out around a narrower embedding) is refused by `config_from_hf`.

`LM(...)(tokens_bt)` -> {"logits": [B, T, V], "hidden": [B, T, D] (after the final norm)}.
A bridge (LLaVA, BLIP-2) builds inputs with `embed`, splices its own vectors in and passes
`embeds_btd`. `mask` is a boolean [B, 1, T, T] attention mask (`vljax.nn.masks.attention_mask`
gives causal, prefix-LM and padding masks; default causal) and `positions_bt` the position of
each token (default 0..T-1; left-padded prompts pass cumsum(valid) - 1). Generation runs with
a KV cache: `init_cache`, then `prefill` (the whole prompt, token ids or embeddings, ragged
lengths, in one parallel pass; cross-attention keys and values computed once), then the
`vljax.decode` decoders over `decode_step_fn`; `generate` does all three.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from vljax import decode
from vljax.models.sizes import resolve_sizes
from vljax.nn import (BlockConfig, Dense, TokenEmbed, Transformer, causal_mask, constrain,
                      partitioned)

RECIPES: dict[str, dict[str, Any]] = {
    "llama": dict(norm="rms", norm_eps=1e-6, positions="rotary", position_offset=0,
                  rope_base=10_000.0, act="silu", gated_mlp=True, use_bias=False, tied_head=False),
    # OPT's learned table has 2 extra leading rows: position p reads row p + 2.
    "opt": dict(norm="layer", norm_eps=1e-5, positions="learned", position_offset=2,
                rope_base=None, act="relu", gated_mlp=False, use_bias=True, tied_head=True),
    "gpt2": dict(norm="layer", norm_eps=1e-5, positions="learned", position_offset=0,
                 rope_base=None, act="gelu_tanh", gated_mlp=False, use_bias=True, tied_head=True),
}
_RECIPE_FIELDS = tuple(RECIPES["llama"])
_SIZE_FIELDS = ("vocab_size", "width", "depth", "num_heads", "mlp_dim", "max_len")

# Released sizes (the checkpoints' config.json). "mu" and "nano" are tiny presets for tests and
# CPU demos; they give sizes only, the recipe comes from the `recipe` field.
LM_VARIANTS: dict[str, dict[str, Any]] = {
    "mu": dict(width=32, depth=2, num_heads=4, mlp_dim=64, max_len=64),
    "nano": dict(width=128, depth=4, num_heads=4, mlp_dim=512, max_len=256),
    # huggyllama/llama-7b (LLaMA-1).
    "llama-7b": dict(recipe="llama", vocab_size=32_000, width=4096, depth=32, num_heads=32,
                     mlp_dim=11_008, max_len=2048, norm_eps=1e-6),
    # lmsys/vicuna-7b-v1.5 and -13b-v1.5 (LLaVA-1.5's language models), fine-tuned Llama-2.
    "vicuna-7b": dict(recipe="llama", vocab_size=32_000, width=4096, depth=32, num_heads=32,
                      mlp_dim=11_008, max_len=4096, norm_eps=1e-5),
    "vicuna-13b": dict(recipe="llama", vocab_size=32_000, width=5120, depth=40, num_heads=40,
                       mlp_dim=13_824, max_len=4096, norm_eps=1e-5),
    "opt-2.7b": dict(recipe="opt", vocab_size=50_272, width=2560, depth=32, num_heads=32,
                     mlp_dim=10_240, max_len=2048),
    "opt-6.7b": dict(recipe="opt", vocab_size=50_272, width=4096, depth=32, num_heads=32,
                     mlp_dim=16_384, max_len=2048),
    "gpt2": dict(recipe="gpt2", vocab_size=50_257, width=768, depth=12, num_heads=12,
                 mlp_dim=3072, max_len=1024),
    "gpt2-large": dict(recipe="gpt2", vocab_size=50_257, width=1280, depth=36, num_heads=20,
                       mlp_dim=5120, max_len=1024),
}


class LM(nn.Module):
  """Token (+ learned position) embeddings, a pre-norm decoder stack with a final norm, and a
  vocabulary projection (tied or not). Fields left None come from the variant, then the recipe."""

  variant: str | None = None  # an LM_VARIANTS key
  recipe: str | None = None  # a RECIPES key: "llama" | "opt" | "gpt2"
  vocab_size: int | None = None
  width: int | None = None
  depth: int | None = None
  num_heads: int | None = None
  num_kv_heads: int | None = None  # None: num_heads; fewer: grouped-query attention
  head_dim: int | None = None  # None: width // num_heads
  mlp_dim: int | None = None
  max_len: int | None = None  # positions 0..max_len-1 (the learned table's rows)
  # Recipe overrides (None: the recipe's value).
  norm: str | None = None  # "rms" | "layer"
  norm_eps: float | None = None
  positions: str | None = None  # "rotary" | "learned"
  position_offset: int | None = None  # learned row of position p is p + offset (OPT: 2)
  rope_base: float | None = None  # rotary base theta
  act: str | None = None  # a key of vljax.nn.layers.ACTIVATIONS
  gated_mlp: bool | None = None
  use_bias: bool | None = None
  tied_head: bool | None = None  # logits = hidden @ token embedding^T
  # Cross-attention to `context_bsd` in layers k-1, 2k-1, .. (open_flamingo's placement), for
  # k = cross_attention_every > 0. Ungated: the context changes the outputs from the start.
  cross_attention_every: int = 0
  dropout: float = 0.0  # embeddings, attention and MLP outputs (GPT-2's pdrop)
  scan: bool = False
  remat: str = "none"
  decode: bool = False  # KV-cached self-attention; see init_cache / decode_step_fn
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # LoRA adapters on the decoder's projections (vljax.nn.lora); lora_rank 0: none.
  lora_rank: int = 0
  lora_alpha: float = 16.0  # adapters are scaled by lora_alpha / lora_rank
  lora_targets: Sequence[str] = ("query", "value")  # see vljax.nn.lora.LORA_TARGETS

  def config(self) -> dict[str, Any]:
    """Every size and recipe option: explicit fields over the variant over the recipe."""
    if self.variant is not None and self.variant not in LM_VARIANTS:
      raise ValueError(f"Unknown LM variant {self.variant!r}; choose one of {sorted(LM_VARIANTS)}")
    c = resolve_sizes("LM", LM_VARIANTS.get(self.variant, {}), self, ("recipe",) + _SIZE_FIELDS)
    if c["recipe"] not in RECIPES:
      raise ValueError(f"Unknown LM recipe {c['recipe']!r}; choose one of {sorted(RECIPES)}")
    c = {**RECIPES[c["recipe"]], **c}
    for field in _RECIPE_FIELDS + ("num_kv_heads", "head_dim"):
      if getattr(self, field) is not None:
        c[field] = getattr(self, field)
    c.setdefault("num_kv_heads", None)
    c["num_kv_heads"] = c["num_kv_heads"] or c["num_heads"]
    if c.get("head_dim") is None:
      if c["width"] % c["num_heads"]:
        raise ValueError(f"width {c['width']} is not divisible by num_heads {c['num_heads']}; "
                         "give head_dim")
      c["head_dim"] = c["width"] // c["num_heads"]
    if c["num_heads"] % c["num_kv_heads"]:
      raise ValueError(f"num_heads {c['num_heads']} is not a multiple of num_kv_heads "
                       f"{c['num_kv_heads']}")
    if c["norm"] not in ("rms", "layer"):
      raise ValueError(f"Unknown norm {c['norm']!r}; choose rms or layer")
    if c["positions"] not in ("rotary", "learned"):
      raise ValueError(f"Unknown positions {c['positions']!r}; choose rotary or learned")
    if c["positions"] == "rotary" and c["head_dim"] % 2:
      raise ValueError(f"rotary embeddings need an even head_dim, got {c['head_dim']}")
    if self.cross_attention_every < 0:
      raise ValueError(f"cross_attention_every must be >= 0, got {self.cross_attention_every}")
    return c

  def setup(self):
    c = self.config()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.token_embedding = TokenEmbed(c["vocab_size"], c["width"], **kw)
    if c["positions"] == "learned":
      self.pos_embedding = self.param(
          "pos_embedding", partitioned(nn.initializers.normal(0.02), (None, "embed")),
          (c["max_len"] + c["position_offset"], c["width"]), self.param_dtype)
    self.embed_dropout = nn.Dropout(self.dropout)
    block = BlockConfig(
        c["num_heads"], c["mlp_dim"], act=c["act"], dropout=self.dropout, norm_eps=c["norm_eps"],
        rms_norm=c["norm"] == "rms", decode=self.decode, num_kv_heads=c["num_kv_heads"],
        head_dim=c["head_dim"], rope_base=c["rope_base"] if c["positions"] == "rotary" else None,
        gated_mlp=c["gated_mlp"], use_bias=c["use_bias"],
        cache_context=self.cross_attention_every > 0, lora_rank=self.lora_rank,
        lora_alpha=self.lora_alpha, lora_targets=self.lora_targets, **kw)
    self.decoder = Transformer(c["depth"], block, cross_attention=self.cross_attention_every > 0,
                               cross_attention_every=max(self.cross_attention_every, 1),
                               scan=self.scan, remat=self.remat)
    if not c["tied_head"]:
      self.head = Dense(c["vocab_size"], "embed", "vocab", use_bias=False,
                        kernel_init=nn.initializers.normal(0.02), **kw)

  def embed(self, tokens_bt: jax.Array) -> jax.Array:
    """Token embeddings [B, T, D] (no positions), for bridges that splice in other vectors."""
    return self.token_embedding(constrain(tokens_bt, ("batch", "seq")))

  def __call__(self, tokens_bt: jax.Array | None = None, *, embeds_btd: jax.Array | None = None,
               mask: jax.Array | None = None, positions_bt: jax.Array | None = None,
               context_bsd: jax.Array | None = None, context_mask: jax.Array | None = None,
               train: bool = False, hidden_only: bool = False) -> dict[str, jax.Array]:
    """Token ids [B, T] or input embeddings [B, T, D] -> {"logits": [B, T, V], "hidden": [B, T, D]}.

    The logits at t predict token t + 1. With decode=True the tokens go to each row's
    `positions_bt` (required; also their KV cache slots), `mask` defaults to causal over the
    cache, and the cross-attention context is projected when given and read from the cache
    when not. `hidden_only` skips the vocabulary projection (see `logits`).
    """
    c = self.config()
    if (tokens_bt is None) == (embeds_btd is None):
      raise ValueError("give exactly one of tokens_bt and embeds_btd")
    x_btd = self.embed(tokens_bt) if embeds_btd is None else embeds_btd.astype(self.dtype)
    batch, length = x_btd.shape[:2]
    if positions_bt is None:
      if self.decode:
        raise ValueError("a decode=True LM needs positions_bt (where its tokens continue the "
                         "cache)")
      if length > c["max_len"]:
        raise ValueError(f"sequence length {length} exceeds max_len {c['max_len']}")
      positions_bt = jnp.arange(length)[None, :]
    positions_bt = jnp.broadcast_to(jnp.asarray(positions_bt, jnp.int32), (batch, length))
    if c["positions"] == "learned":
      rows_btd = jnp.take(self.pos_embedding, positions_bt + c["position_offset"], axis=0,
                          mode="clip")
      x_btd = x_btd + rows_btd.astype(x_btd.dtype)
    x_btd = self.embed_dropout(x_btd, deterministic=not train)
    if mask is None and not self.decode:
      mask = causal_mask(length)
    if context_bsd is not None and not self.cross_attention_every:
      raise ValueError("context_bsd was given to an LM without cross-attention "
                       "(cross_attention_every=0)")
    hidden_btd = self.decoder(x_btd, mask, context_bsd, context_mask, deterministic=not train,
                              positions_bt=positions_bt)
    if hidden_only:
      return {"hidden": hidden_btd}
    return {"logits": self.logits(hidden_btd), "hidden": hidden_btd}

  def logits(self, hidden_btd: jax.Array) -> jax.Array:
    """The vocabulary projection [B, T, V] of final hidden states (tied or not)."""
    if self.config()["tied_head"]:
      return self.token_embedding.attend(hidden_btd)
    return self.head(hidden_btd)


# ---------------------------------------------------------------------------------------------
# Generation with a KV cache.


def init_cache(model: LM, params, batch_size: int, max_len: int, *,
               context_bsd: jax.Array | None = None) -> dict:
  """The empty `vljax.decode` cache of `model` for `max_len` positions (every leaf batch-first):
  self-attention KV caches and, with cross-attention (shapes from `context_bsd`), the slots of
  every cross-attending layer's context keys and values, which `prefill` fills once."""
  c = model.config()
  if c["positions"] == "learned" and max_len > c["max_len"]:
    raise ValueError(f"cache length {max_len} exceeds the model's max_len {c['max_len']}")
  if (context_bsd is None) != (model.cross_attention_every == 0):
    raise ValueError("give context_bsd exactly when the LM has cross-attention "
                     f"(cross_attention_every={model.cross_attention_every})")
  decoder = model.clone(decode=True)

  def declare(params):
    tokens_bt = jnp.zeros((batch_size, max_len), jnp.int32)
    _, variables = decoder.apply({"params": params}, tokens_bt,
                                 positions_bt=jnp.arange(max_len)[None], context_bsd=context_bsd,
                                 hidden_only=True, mutable=["cache"])
    return variables["cache"]

  # A cache starts as zeros, so only its shapes are needed.
  kv = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(declare, params))
  cache = {"kv": decode.batch_major_cache(kv, model.scan)}
  if context_bsd is not None:
    cache["context_mask"] = jnp.ones((batch_size, 1, 1, context_bsd.shape[1]), bool)
  return cache


def prefill(model: LM, params, cache: Mapping, tokens_bt: jax.Array | None = None, *,
            embeds_btd: jax.Array | None = None, prompt_len_b: jax.Array | None = None,
            context_bsd: jax.Array | None = None,
            context_mask: jax.Array | None = None) -> decode.Prefilled:
  """One parallel pass over right-padded prompts (token ids [B, P] or embeddings [B, P, D],
  e.g. image tokens spliced into text; lengths `prompt_len_b`, default all P) that fills the
  empty `cache` from `init_cache`: every layer's keys and values at positions 0..P-1 and the
  cross-attention context's keys and values (once per sequence). Returns the logits after each
  row's prompt, ready for the `vljax.decode` decoders."""
  x = tokens_bt if embeds_btd is None else embeds_btd
  batch, prompt_len = x.shape[:2]
  prompt_len_b = decode.prompt_lengths(x, prompt_len_b)
  decoder = model.clone(decode=True)
  variables = {"params": params, "cache": decode.layer_major_cache(cache["kv"], model.scan)}
  if context_mask is not None:  # [B, S] validity or a full [B, 1, 1|T, S] mask
    context_mask = jnp.asarray(context_mask, bool)
    if context_mask.ndim == 2:
      context_mask = context_mask[:, None, None, :]
    context_mask = jnp.broadcast_to(context_mask, cache["context_mask"].shape)
  out, mutated = decoder.apply(
      variables, tokens_bt, embeds_btd=embeds_btd,
      positions_bt=jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len)),
      context_bsd=context_bsd, context_mask=context_mask, hidden_only=True, mutable=["cache"])
  last_b1d = decode.last_prompt_logits(out["hidden"], prompt_len_b)[:, None]
  logits_bv = decoder.apply({"params": params}, last_b1d, method=LM.logits)[:, 0]
  new_cache = {**cache, "kv": decode.batch_major_cache(mutated["cache"], model.scan)}
  if context_mask is not None:
    new_cache["context_mask"] = context_mask
  return decode.Prefilled(logits_bv, new_cache, prompt_len_b)


def decode_step_fn(model: LM, params) -> decode.StepFn:
  """`step_fn(tokens_b, cache, positions_b) -> (logits_bv, cache)` for vljax.decode, from a
  cache that `prefill` (or `decode.feed_prompt` through this step function) filled."""
  decoder = model.clone(decode=True)

  def step_fn(tokens_b, cache, positions_b):
    variables = {"params": params, "cache": decode.layer_major_cache(cache["kv"], model.scan)}
    out, mutated = decoder.apply(variables, tokens_b[:, None], positions_bt=positions_b[:, None],
                                 context_mask=cache.get("context_mask"), mutable=["cache"])
    return out["logits"][:, 0], {**cache, "kv": decode.batch_major_cache(mutated["cache"],
                                                                         model.scan)}

  return step_fn


def generate(model: LM, params, prompt_bl: jax.Array | None = None, *,
             embeds_bld: jax.Array | None = None, prompt_len_b: jax.Array | None = None,
             max_new_tokens: int, eos_id: int | Sequence[int], pad_id: int = 0,
             beam_size: int = 1, length_penalty: float = 0.0,
             context_bsd: jax.Array | None = None, context_mask: jax.Array | None = None,
             rng: jax.Array | None = None, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0) -> jax.Array:
  """Continuations int32 [B, max_new_tokens] (pad_id after the stop token) of right-padded
  prompts, token ids [B, P] or embeddings [B, P, D], with lengths `prompt_len_b` (default all
  P), prefilled in one pass: greedy by default, the best of `beam_size` > 1 beams, or, given
  `rng`, sampled (temperature, top_k, top_p)."""
  x = prompt_bl if embeds_bld is None else embeds_bld
  if x is None:
    raise ValueError("give prompt_bl (token ids) or embeds_bld (input embeddings)")
  if prompt_bl is not None:
    prompt_bl = jnp.asarray(prompt_bl, jnp.int32)
  cache = init_cache(model, params, x.shape[0], decode.cache_length(x.shape[1], max_new_tokens),
                     context_bsd=context_bsd)
  start = prefill(model, params, cache, prompt_bl, embeds_btd=embeds_bld,
                  prompt_len_b=prompt_len_b, context_bsd=context_bsd, context_mask=context_mask)
  return decode.run(decode_step_fn(model, params), start, max_new_tokens=max_new_tokens,
                    eos_id=eos_id, pad_id=pad_id, beam_size=beam_size,
                    length_penalty=length_penalty, rng=rng, temperature=temperature,
                    top_k=top_k, top_p=top_p)


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers checkpoints (pure NumPy: state dicts of arrays, configs as objects
# or config.json dicts).

_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu",
                   "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# The prefix of the base model's keys in the *ForCausalLM / LMHeadModel state dict.
_HF_PREFIX = {"llama": "model.", "opt": "model.", "gpt2": "transformer."}
# Non-parameter buffers that some checkpoints hold (GPT-2's causal-mask constants, cached
# rotary frequencies); they carry nothing to import.
_HF_BUFFERS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")


def _hf_get(hf_config, name: str, default: Any = None) -> Any:
  if isinstance(hf_config, Mapping):
    return hf_config.get(name, default)
  return getattr(hf_config, name, default)


def _hf_activation(name: str) -> str:
  if name not in _HF_ACTIVATIONS:
    raise NotImplementedError(f"activation {name!r} has no vljax equivalent")
  return _HF_ACTIVATIONS[name]


def _llama_rope_base(hf_config) -> float:
  """rope_theta from a transformers 5 `rope_parameters` or a 4.x `rope_theta` / `rope_scaling`."""
  parameters = _hf_get(hf_config, "rope_parameters") or {}
  scaling = _hf_get(hf_config, "rope_scaling") or {}
  rope_type = (parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
               or "default")
  if rope_type != "default":
    raise NotImplementedError(f"rope type {rope_type!r} (scaled RoPE, e.g. Llama 3.1) is not "
                              "implemented; only the default rotary embedding is")
  return float(parameters.get("rope_theta", _hf_get(hf_config, "rope_theta", 10_000.0)))


def config_from_hf(recipe: str, hf_config) -> dict[str, Any]:
  """LM fields (sizes and recipe) of a transformers LlamaConfig / OPTConfig / GPT2Config, or of
  the checkpoint's config.json dict. Layouts vljax does not implement raise NotImplementedError."""
  if recipe not in RECIPES:
    raise ValueError(f"Unknown LM recipe {recipe!r}; choose one of {sorted(RECIPES)}")
  get = lambda name, default=None: _hf_get(hf_config, name, default)
  model_type = get("model_type")
  if model_type is not None and model_type != recipe:
    raise ValueError(f"a {model_type!r} config does not describe recipe {recipe!r}")
  if recipe == "llama":
    if bool(get("attention_bias", False)) != bool(get("mlp_bias", False)):
      raise NotImplementedError("LLaMA with attention_bias != mlp_bias is not implemented")
    width, heads = get("hidden_size"), get("num_attention_heads")
    return dict(recipe="llama", vocab_size=get("vocab_size"), width=width,
                depth=get("num_hidden_layers"), num_heads=heads,
                num_kv_heads=get("num_key_value_heads") or heads,
                head_dim=get("head_dim") or width // heads, mlp_dim=get("intermediate_size"),
                max_len=get("max_position_embeddings"), norm_eps=float(get("rms_norm_eps")),
                rope_base=_llama_rope_base(hf_config), act=_hf_activation(get("hidden_act")),
                use_bias=bool(get("attention_bias", False)),
                tied_head=bool(get("tie_word_embeddings", False)))
  if recipe == "opt":
    width = get("hidden_size")
    if (get("word_embed_proj_dim", width) != width or not get("do_layer_norm_before", True)
        or get("_remove_final_layer_norm", False)):
      raise NotImplementedError(
          "this OPT layout (OPT-350m: post-LayerNorm, project_in / project_out between a "
          f"{get('word_embed_proj_dim')}-wide embedding and the {width}-wide stack) is not "
          "implemented; every other released OPT size is pre-LayerNorm and imports")
    if not get("layer_norm_elementwise_affine", True):
      raise NotImplementedError("OPT without LayerNorm weights is not implemented")
    return dict(recipe="opt", vocab_size=get("vocab_size"), width=width,
                depth=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
                mlp_dim=get("ffn_dim"), max_len=get("max_position_embeddings"),
                act=_hf_activation(get("activation_function")),
                use_bias=bool(get("enable_bias", True)),
                tied_head=bool(get("tie_word_embeddings", True)))
  if not get("scale_attn_weights", True) or get("scale_attn_by_inverse_layer_idx", False):
    raise NotImplementedError("GPT-2 attention scaling other than 1 / sqrt(head_dim) is not "
                              "implemented")
  if get("add_cross_attention", False):
    raise NotImplementedError("GPT-2 with cross-attention layers is not implemented")
  width = get("n_embd")
  return dict(recipe="gpt2", vocab_size=get("vocab_size"), width=width, depth=get("n_layer"),
              num_heads=get("n_head"), mlp_dim=get("n_inner") or 4 * width,
              max_len=get("n_positions"), norm_eps=float(get("layer_norm_epsilon", 1e-5)),
              act=_hf_activation(get("activation_function", "gelu_new")),
              tied_head=bool(get("tie_word_embeddings", True)))


_Entry = tuple[str, tuple[str, ...], bool, tuple[int, ...], tuple[int, ...]]


def _hf_entries(recipe: str, c: Mapping[str, Any]) -> list[_Entry]:
  """(hf key, vljax path, transposed, hf shape, vljax shape) of every parameter of an unscanned
  LM. torch Linear weights are [out, in] (transposed); GPT-2's Conv1D weights are [in, out], and
  its fused c_attn is split into "...c_attn:q.weight", ":k", ":v" (see _split_qkv)."""
  width, heads, kv_heads, head_dim = c["width"], c["num_heads"], c["num_kv_heads"], c["head_dim"]
  vocab, mlp = c["vocab_size"], c["mlp_dim"]
  entries = []

  def add(key, path, transposed, hf_shape, shape):
    entries.append((key, path, transposed, tuple(hf_shape), tuple(shape)))

  def norm(key, path, bias=True):
    add(key + ".weight", path + ("norm", "scale"), False, (width,), (width,))
    if bias:
      add(key + ".bias", path + ("norm", "bias"), False, (width,), (width,))

  def dense(key, path, fan_in, fan_out, kernel_shape, bias_shape, bias, conv1d=False):
    """A torch Linear [out, in] (or a GPT-2 Conv1D [in, out]) onto a vljax kernel / bias."""
    hf_shape = (fan_in, fan_out) if conv1d else (fan_out, fan_in)
    add(key + ".weight", path + ("kernel",), not conv1d, hf_shape, kernel_shape)
    if bias:
      add(key + ".bias", path + ("bias",), False, (fan_out,), bias_shape)

  def attention(key, path, names, kv, bias, conv1d=False):
    """Query, key, value and output projections; `names` are the four hf module names."""
    for name, target, num in zip(names[:3], ("query", "key", "value"), (heads, kv, kv)):
      dense(key + name, path + (target,), width, num * head_dim, (width, num, head_dim),
            (num, head_dim), bias, conv1d)
    dense(key + names[3], path + ("out",), heads * head_dim, width, (heads, head_dim, width),
          (width,), bias, conv1d)

  def mlp_pair(key, path, names, bias, conv1d=False):
    """The plain MLP's fc1 / fc2 (`names` in hf)."""
    dense(key + names[0], path + ("fc1", "dense"), width, mlp, (width, mlp), (mlp,), bias, conv1d)
    dense(key + names[1], path + ("fc2", "dense"), mlp, width, (mlp, width), (width,), bias,
          conv1d)

  prefix, bias = _HF_PREFIX[recipe], c["use_bias"]
  for i in range(c["depth"]):
    layer = ("decoder", f"layer_{i}")
    attn, mlp_path = layer + ("self_attn",), layer + ("mlp",)
    if recipe == "llama":
      key = f"{prefix}layers.{i}."
      norm(key + "input_layernorm", layer + ("self_attn_norm",), bias=False)
      attention(key + "self_attn.", attn, ("q_proj", "k_proj", "v_proj", "o_proj"), kv_heads,
                bias)
      norm(key + "post_attention_layernorm", layer + ("mlp_norm",), bias=False)
      for name in ("gate", "up"):
        dense(f"{key}mlp.{name}_proj", mlp_path + (name, "dense"), width, mlp, (width, mlp),
              (mlp,), bias)
      dense(key + "mlp.down_proj", mlp_path + ("down", "dense"), mlp, width, (mlp, width),
            (width,), bias)
    elif recipe == "opt":
      key = f"{prefix}decoder.layers.{i}."
      norm(key + "self_attn_layer_norm", layer + ("self_attn_norm",))
      attention(key + "self_attn.", attn, ("q_proj", "k_proj", "v_proj", "out_proj"), heads,
                bias)
      norm(key + "final_layer_norm", layer + ("mlp_norm",))  # OPT's name for the MLP's norm
      mlp_pair(key, mlp_path, ("fc1", "fc2"), bias)
    else:
      key = f"{prefix}h.{i}."
      norm(key + "ln_1", layer + ("self_attn_norm",))
      attention(key + "attn.", attn, ("c_attn:q", "c_attn:k", "c_attn:v", "c_proj"), heads,
                bias, conv1d=True)
      norm(key + "ln_2", layer + ("mlp_norm",))
      mlp_pair(key + "mlp.", mlp_path, ("c_fc", "c_proj"), bias, conv1d=True)

  embedding = ("token_embedding", "embedding")
  positions = c["max_len"] + c["position_offset"]
  if recipe == "llama":
    add(prefix + "embed_tokens.weight", embedding, False, (vocab, width), (vocab, width))
    norm(prefix + "norm", ("decoder", "final_norm"), bias=False)
  elif recipe == "opt":
    add(prefix + "decoder.embed_tokens.weight", embedding, False, (vocab, width), (vocab, width))
    add(prefix + "decoder.embed_positions.weight", ("pos_embedding",), False, (positions, width),
        (positions, width))
    norm(prefix + "decoder.final_layer_norm", ("decoder", "final_norm"))
  else:
    add(prefix + "wte.weight", embedding, False, (vocab, width), (vocab, width))
    add(prefix + "wpe.weight", ("pos_embedding",), False, (positions, width), (positions, width))
    norm(prefix + "ln_f", ("decoder", "final_norm"))
  if c["tied_head"]:
    add("lm_head.weight", embedding, False, (vocab, width), (vocab, width))
  else:
    add("lm_head.weight", ("head", "dense", "kernel"), True, (vocab, width), (width, vocab))
  return entries


def _lm_config(recipe: str, hf_config) -> dict[str, Any]:
  return LM(**config_from_hf(recipe, hf_config)).config()


def _split_qkv(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """GPT-2's fused "attn.c_attn.weight" [D, 3D] (bias [3D]) -> "attn.c_attn:q.weight" [D, D],
  ":k", ":v" (bias [D] each); `_merge_qkv` undoes it."""
  out = {}
  for key, value in state.items():
    match = re.fullmatch(r"(.*attn\.c_attn)\.(weight|bias)", key)
    if match:
      if value.shape[-1] % 3:
        raise ValueError(f"{key}: shape {value.shape}, expected a last axis of 3 * width")
      for name, part in zip("qkv", np.split(value, 3, axis=-1)):
        out[f"{match[1]}:{name}.{match[2]}"] = part
    else:
      out[key] = value
  return out


def _merge_qkv(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for key, value in state.items():
    match = re.fullmatch(r"(.*attn\.c_attn):([qkv])\.(weight|bias)", key)
    if not match:
      out[key] = value
    elif match[2] == "q":
      out[f"{match[1]}.{match[3]}"] = np.concatenate(
          [state[f"{match[1]}:{name}.{match[3]}"] for name in "qkv"], axis=-1)
  return out


def from_hf_state_dict(recipe: str, state_dict: Mapping[str, Any], hf_config, *,
                       scan: bool = False) -> dict:
  """vljax params of `LM(**config_from_hf(recipe, hf_config), scan=scan)` from a transformers
  state dict of NumPy arrays (LlamaForCausalLM / OPTForCausalLM / GPT2LMHeadModel keys, with
  or without the base model's "model." / "transformer." prefix; dtypes are kept).

  Every key must be used (buffers aside) and every shape must match, else a ValueError names
  them. A tied head's "lm_head.weight" may be absent; if present it must equal the embedding.
  """
  c = _lm_config(recipe, hf_config)
  prefix = _HF_PREFIX[recipe]
  state = {}
  for key, value in state_dict.items():
    if _HF_BUFFERS.search(key):
      continue
    if not key.startswith(prefix) and key != "lm_head.weight":
      key = prefix + key
    state[key] = np.asarray(value)
  state = _split_qkv(state) if recipe == "gpt2" else state
  flat: dict[tuple[str, ...], np.ndarray] = {}  # parameter path -> value
  used = set()
  for key, path, transposed, hf_shape, shape in _hf_entries(recipe, c):
    if key == "lm_head.weight" and c["tied_head"]:
      if key in state and not np.array_equal(state[key], flat[path]):
        raise ValueError("the head is tied but lm_head.weight differs from the token embedding")
      used.add(key)
      continue
    if key not in state:
      raise ValueError(f"{recipe} state dict lacks {key!r}")
    value = state[key]
    if value.shape != hf_shape:
      raise ValueError(f"{key}: shape {value.shape}, expected {hf_shape} from the config")
    flat[path] = (value.T if transposed else value).reshape(shape)
    used.add(key)
  unused = sorted(set(state) - used)
  if unused:
    raise ValueError(f"{len(unused)} state dict keys have no place in the {recipe} LM: "
                     f"{unused[:5]}")
  params = traverse_util.unflatten_dict(flat)
  return stack_layers(params, c["depth"]) if scan else params


def to_hf_state_dict(recipe: str, params: Mapping, hf_config) -> dict[str, np.ndarray]:
  """The inverse of `from_hf_state_dict`: a *ForCausalLM / GPT2LMHeadModel state dict of NumPy
  arrays (a tied head's "lm_head.weight" included, as torch's `state_dict()` lists it)."""
  c = _lm_config(recipe, hf_config)
  params = jax.tree.map(np.asarray, nn.meta.unbox(params))
  if "layers" in params["decoder"]:
    params = unstack_layers(params, c["depth"])
  flat, state = traverse_util.flatten_dict(params), {}
  for key, path, transposed, hf_shape, _ in _hf_entries(recipe, c):
    value = flat[path]
    hf_value = value.reshape(hf_shape[::-1]).T if transposed else value.reshape(hf_shape)
    state[key] = np.ascontiguousarray(hf_value)
  return _merge_qkv(state) if recipe == "gpt2" else state


def stack_layers(params: Mapping, depth: int) -> dict:
  """Unscanned LM params ("decoder/layer_i") -> scanned ("decoder/layers", leading depth axis)."""
  decoder = dict(params["decoder"])
  layers = [decoder.pop(f"layer_{i}") for i in range(depth)]
  decoder["layers"] = jax.tree.map(lambda *x: np.stack(x), *layers)
  return {**params, "decoder": decoder}


def unstack_layers(params: Mapping, depth: int) -> dict:
  """The inverse of `stack_layers`."""
  decoder = dict(params["decoder"])
  layers = decoder.pop("layers")
  for i in range(depth):
    decoder[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], layers)
  return {**params, "decoder": decoder}
