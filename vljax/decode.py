"""Autoregressive decoding shared by every generative family: greedy, sampling and beam search.

The decoders know nothing about models. They drive a pure step function

    step_fn(tokens_b: int32[B], cache: PyTree, position: int32[]) -> (logits_bv: float[B, V], cache)

that feeds one token per sequence, at sequence index `position` (shared by the whole batch,
counted from 0 for the first token fed), and returns the logits of the next token together
with the updated cache (a KV cache of static length for real models, see `recompute_step_fn`
for a cache-free reference).

Cache contract: the cache is any pytree. A leaf whose leading dimension equals the batch the
step function sees is per-example state; beam search repeats those rows for every beam
(`expand_cache`) and reorders them as beams are re-ranked (`gather_cache`). Every other leaf
(a scalar cache index, a leaf of another leading size) is shared and left untouched. So:
  * per-example conditioning that the step function needs (image embeddings for
    cross-attention, prefix masks) belongs in the cache, so that beams see their own example;
  * cache leaves must be batch-major ([B, ...]); a scanned layer stack whose leaves are
    [depth, B, ...] moves the batch axis first in its step function wrapper
    (`batch_major_cache` / `layer_major_cache`);
  * a shared leaf must not have a leading size equal to the (beam-expanded) batch.

Prompts: `prompt_bl` holds at least one token per example (e.g. BOS) and `prompt_len_b` its
length (default: all L). Prompt tokens are fed through `step_fn` one at a time (teacher
forcing) and generation of example b starts right after its own prompt, so prompts of different
lengths need no padding inside the sequence. A model that pre-fills its cache in one parallel
pass hands in that cache, passes the last prompt token as a [B, 1] prompt and adds the prefix
length to `position` in its step function. The cache must hold `cache_length(L, N)` positions.

Outputs hold N = max_new_tokens tokens per sequence, `pad_id` after an EOS; lengths count the
generated tokens including the EOS. All functions are traceable: call them inside `jax.jit`
with `max_new_tokens`, `beam_size` and `top_k` static (temperature, top_p and length_penalty may
be traced). Model parameters should reach `step_fn` through the jitted function's arguments,
not be closed over outside it, or they get baked into the program as constants.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any
StepFn = Callable[[jax.Array, PyTree, jax.Array], tuple[jax.Array, PyTree]]


class DecodeOutput(NamedTuple):
  """One generated sequence per example."""
  tokens_bn: jax.Array  # int32[B, N]: generated tokens, pad_id after EOS.
  lengths_b: jax.Array  # int32[B]: generated tokens including the EOS (N if none).
  log_probs_b: jax.Array  # float32[B]: sum of the model's log-probabilities of those tokens.


class BeamOutput(NamedTuple):
  """All beams of every example, best first (by length-penalized score)."""
  tokens_bkn: jax.Array  # int32[B, K, N]
  lengths_bk: jax.Array  # int32[B, K]
  scores_bk: jax.Array  # float32[B, K]: log_probs / length penalty; the ranking criterion.
  log_probs_bk: jax.Array  # float32[B, K]: sum of the model's log-probabilities.

  def best(self) -> DecodeOutput:
    """The highest-scoring beam of every example."""
    return DecodeOutput(self.tokens_bkn[:, 0], self.lengths_bk[:, 0], self.log_probs_bk[:, 0])


def cache_length(prompt_len: int, max_new_tokens: int) -> int:
  """Number of positions a cache must hold: every prompt and generated token but the last."""
  return prompt_len + max_new_tokens - 1


def _map_batch_leaves(fn: Callable, cache: PyTree, batch_size: int) -> PyTree:
  """Applies `fn` to the per-example leaves (leading dim == batch_size) of a cache."""
  def apply(leaf):
    is_per_example = jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[0] == batch_size
    return fn(leaf) if is_per_example else leaf
  return jax.tree.map(apply, cache)


def expand_cache(cache: PyTree, n: int, batch_size: int) -> PyTree:
  """Repeats each example's cache rows n times: example b becomes rows b*n ... b*n + n - 1."""
  return _map_batch_leaves(lambda x: jnp.repeat(x, n, axis=0), cache, batch_size)


def gather_cache(cache: PyTree, indices_n: jax.Array, batch_size: int) -> PyTree:
  """Takes rows `indices_n` (int[N]) of every per-example cache leaf of batch `batch_size`."""
  return _map_batch_leaves(lambda x: jnp.take(x, indices_n, axis=0), cache, batch_size)


def map_attention_caches(fn: Callable[[dict], dict], cache: Mapping) -> dict:
  """Applies `fn` to every attention layer's {cached_key, cached_value, cache_index} dict of a
  flax "cache" collection (as `vljax.nn.MultiHeadAttention` writes it), keeping the nesting."""
  if "cached_key" in cache:
    return fn(dict(cache))
  return {name: map_attention_caches(fn, sub) for name, sub in cache.items()}


def batch_major_cache(cache: Mapping, scanned: bool) -> dict:
  """A model's flax KV cache in the batch-major layout the decoders need (see the module doc).

  A scanned layer stack (`Transformer(scan=True)`) stores keys and values [depth, B, L, H, K]
  and one cache index per layer [depth]; here they become [B, depth, L, H, K] and one scalar
  index (all layers advance together). An unscanned cache is batch-major already and is
  returned as is. `layer_major_cache` undoes this before the model is applied.
  """
  if not scanned:
    return dict(cache)
  return map_attention_caches(lambda c: {
      "cached_key": jnp.moveaxis(c["cached_key"], 0, 1),
      "cached_value": jnp.moveaxis(c["cached_value"], 0, 1),
      "cache_index": c["cache_index"][0]}, cache)


def layer_major_cache(cache: Mapping, scanned: bool) -> dict:
  """Inverse of `batch_major_cache`: the layout the model's flax modules read and write."""
  if not scanned:
    return dict(cache)
  return map_attention_caches(lambda c: {
      "cached_key": jnp.moveaxis(c["cached_key"], 1, 0),
      "cached_value": jnp.moveaxis(c["cached_value"], 1, 0),
      "cache_index": jnp.broadcast_to(c["cache_index"], c["cached_key"].shape[1:2])}, cache)


def recompute_step_fn(logits_fn: Callable[[jax.Array], jax.Array]) -> StepFn:
  """A cache-free step function: reruns `logits_fn` on the whole token prefix every step.

  `logits_fn(tokens_bt) -> logits_btv` is a causally masked model. The cache is the token
  buffer int32[B, T] (start from `recompute_cache`); step `position` writes its token there
  and returns the logits at `position`. Decoding with a model's KV cache must give the same
  tokens as decoding with this, at O(T) times the cost per step.
  """
  def step_fn(tokens_b, tokens_bt, position):
    tokens_bt = lax.dynamic_update_index_in_dim(tokens_bt, tokens_b, position, axis=1)
    logits_btv = logits_fn(tokens_bt)
    return lax.dynamic_index_in_dim(logits_btv, position, axis=1, keepdims=False), tokens_bt
  return step_fn


def recompute_cache(batch_size: int, max_len: int) -> jax.Array:
  """The initial (empty) token buffer used as cache by `recompute_step_fn`."""
  return jnp.zeros((batch_size, max_len), jnp.int32)


def _prompt_lengths(prompt_bl: jax.Array, prompt_len_b: jax.Array | None) -> jax.Array:
  batch_size, prompt_len = prompt_bl.shape
  if prompt_len_b is None:
    return jnp.full((batch_size,), prompt_len, jnp.int32)
  return jnp.asarray(prompt_len_b, jnp.int32)


def _token_buffer(prompt_bl: jax.Array, prompt_len_b: jax.Array, max_new_tokens: int,
                  pad_id: int) -> jax.Array:
  """int32[B, L + N]: each prompt, then pad_id where generated tokens will be written."""
  prompt_len = prompt_bl.shape[1]
  in_prompt_bl = jnp.arange(prompt_len)[None, :] < prompt_len_b[:, None]
  prompt_bl = jnp.where(in_prompt_bl, prompt_bl.astype(jnp.int32), pad_id)
  return jnp.pad(prompt_bl, ((0, 0), (0, max_new_tokens)), constant_values=pad_id)


def _generated(buffer_bt: jax.Array, prompt_len_b: jax.Array, max_new_tokens: int) -> jax.Array:
  """The N buffer entries after each example's prompt: int32[..., N]."""
  index_bn = prompt_len_b[:, None] + jnp.arange(max_new_tokens)[None, :]
  if buffer_bt.ndim == 3:  # beams: [B, K, T]
    index_bn = index_bn[:, None, :]
  return jnp.take_along_axis(buffer_bt, index_bn, axis=-1)


def _token_log_probs(logits_bv: jax.Array, tokens_b: jax.Array) -> jax.Array:
  log_probs_bv = jax.nn.log_softmax(logits_bv, axis=-1)
  return jnp.take_along_axis(log_probs_bv, tokens_b[:, None], axis=-1)[:, 0]


def _decode(step_fn: StepFn, cache: PyTree, prompt_bl: jax.Array,
            prompt_len_b: jax.Array | None, max_new_tokens: int, eos_id: int, pad_id: int,
            choose_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> DecodeOutput:
  """One-sequence-per-example loop; `choose_fn(logits_bv, step) -> tokens_b` picks tokens."""
  batch_size, prompt_len = prompt_bl.shape
  prompt_len_b = _prompt_lengths(prompt_bl, prompt_len_b)
  buffer_len = prompt_len + max_new_tokens

  def cond_fn(state):
    step, _, _, done_b, _, _ = state
    return (step < buffer_len - 1) & ~jnp.all(done_b)

  def body_fn(state):
    step, buffer_bt, cache, done_b, lengths_b, log_probs_b = state
    logits_bv, cache = step_fn(buffer_bt[:, step], cache, step)
    logits_bv = logits_bv.astype(jnp.float32)
    chosen_b = choose_fn(logits_bv, step).astype(jnp.int32)
    position = step + 1
    # Examples still inside their prompt keep the prompt token already in the buffer.
    generating_b = (position >= prompt_len_b) & ~done_b
    column_b = jnp.where(generating_b, chosen_b, buffer_bt[:, position])
    buffer_bt = lax.dynamic_update_index_in_dim(buffer_bt, column_b, position, axis=1)
    lengths_b = lengths_b + generating_b
    log_probs_b = log_probs_b + jnp.where(
        generating_b, _token_log_probs(logits_bv, chosen_b), 0.0)
    done_b = done_b | (generating_b & ((chosen_b == eos_id) | (lengths_b == max_new_tokens)))
    return step + 1, buffer_bt, cache, done_b, lengths_b, log_probs_b

  buffer_bt = _token_buffer(prompt_bl, prompt_len_b, max_new_tokens, pad_id)
  state = (jnp.array(0, jnp.int32), buffer_bt, cache, jnp.zeros((batch_size,), bool),
           jnp.zeros((batch_size,), jnp.int32), jnp.zeros((batch_size,), jnp.float32))
  _, buffer_bt, _, _, lengths_b, log_probs_b = lax.while_loop(cond_fn, body_fn, state)
  return DecodeOutput(_generated(buffer_bt, prompt_len_b, max_new_tokens), lengths_b,
                      log_probs_b)


def greedy(step_fn: StepFn, cache: PyTree, prompt_bl: jax.Array, *, max_new_tokens: int,
           eos_id: int, pad_id: int = 0, prompt_len_b: jax.Array | None = None) -> DecodeOutput:
  """Greedy decoding: the most likely next token at every step, until EOS or N tokens."""
  return _decode(step_fn, cache, prompt_bl, prompt_len_b, max_new_tokens, eos_id, pad_id,
                 lambda logits_bv, step: jnp.argmax(logits_bv, axis=-1))


def filter_logits(logits_bv: jax.Array, top_k: int = 0, top_p: float | jax.Array = 1.0,
                  ) -> jax.Array:
  """Sets to -inf the logits outside the top-k tokens and outside the top-p nucleus.

  top_k = 0 keeps every token. The nucleus is the smallest set of most likely tokens whose
  probability reaches top_p (the most likely token is always kept); top_p = 1 keeps all.
  Tokens tied with the last kept one are kept too.
  """
  if top_k:
    kth_largest_b1 = lax.top_k(logits_bv, min(top_k, logits_bv.shape[-1]))[0][:, -1:]
    logits_bv = jnp.where(logits_bv < kth_largest_b1, -jnp.inf, logits_bv)
  if not (isinstance(top_p, (int, float)) and top_p >= 1.0):
    descending_bv = -jnp.sort(-logits_bv, axis=-1)
    probs_bv = jax.nn.softmax(descending_bv, axis=-1)
    # Keep a token while the mass of the more likely tokens is still below top_p.
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    num_kept_b = jnp.maximum(jnp.sum(mass_before_bv < top_p, axis=-1), 1)
    cutoff_b1 = jnp.take_along_axis(descending_bv, num_kept_b[:, None] - 1, axis=-1)
    logits_bv = jnp.where(logits_bv < cutoff_b1, -jnp.inf, logits_bv)
  return logits_bv


def sample(step_fn: StepFn, cache: PyTree, prompt_bl: jax.Array, *, rng: jax.Array,
           max_new_tokens: int, eos_id: int, pad_id: int = 0,
           prompt_len_b: jax.Array | None = None, temperature: float | jax.Array = 1.0,
           top_k: int = 0, top_p: float | jax.Array = 1.0) -> DecodeOutput:
  """Ancestral sampling from softmax(logits / temperature), restricted to top-k / top-p.

  Temperature 0 is greedy decoding. The result is a deterministic function of `rng`; draws are
  independent across examples and steps. `log_probs_b` is under the unmodified model.
  """
  def choose_fn(logits_bv, step):
    scaled_bv = logits_bv / jnp.maximum(temperature, 1e-30)
    sampled_b = jax.random.categorical(
        jax.random.fold_in(rng, step), filter_logits(scaled_bv, top_k, top_p), axis=-1)
    return jnp.where(temperature > 0, sampled_b, jnp.argmax(logits_bv, axis=-1))

  return _decode(step_fn, cache, prompt_bl, prompt_len_b, max_new_tokens, eos_id, pad_id,
                 choose_fn)


def length_penalty_gnmt(lengths: jax.Array, alpha: float | jax.Array) -> jax.Array:
  """GNMT length penalty ((5 + length) / 6) ** alpha (Wu et al. 2016); 1 when alpha = 0."""
  return ((5.0 + lengths) / 6.0) ** alpha


def beam_search(step_fn: StepFn, cache: PyTree, prompt_bl: jax.Array, *, max_new_tokens: int,
                beam_size: int, eos_id: int, pad_id: int = 0,
                prompt_len_b: jax.Array | None = None,
                length_penalty: float | jax.Array = 0.0) -> BeamOutput:
  """Beam search ranking hypotheses by log_prob / ((5 + length) / 6) ** length_penalty.

  Finished hypotheses (ended by EOS) keep their beam and compete with the live ones at each
  step, but are never extended. An example stops after N tokens, or as soon as no live beam
  can beat its best finished one (then its other beams are returned as they stand, possibly
  unfinished). With beam_size = 1 this is greedy decoding. `cache` has batch B: it is
  expanded to B * beam_size rows (example-major) before the first step.
  """
  if isinstance(length_penalty, (int, float)) and length_penalty < 0:
    raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")
  batch_size, prompt_len = prompt_bl.shape
  num_beams = beam_size
  prompt_len_b = _prompt_lengths(prompt_bl, prompt_len_b)
  buffer_len = prompt_len + max_new_tokens
  beam_ids_k = jnp.arange(num_beams)

  def cond_fn(state):
    return (state[0] < buffer_len - 1) & ~jnp.all(state[-1])

  def body_fn(state):
    step, buffer_bkt, cache, log_probs_bk, lengths_bk, finished_bk, done_b = state
    logits, cache = step_fn(buffer_bkt[:, :, step].reshape(-1), cache, step)
    token_log_probs_bkv = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(
        batch_size, num_beams, -1)
    vocab_size = token_log_probs_bkv.shape[-1]

    # Candidates per beam: its V one-token extensions, and a last column that carries a
    # finished beam forward unchanged (the only candidate a finished beam has).
    extended_bkv = jnp.where(finished_bk[..., None], -jnp.inf,
                             log_probs_bk[..., None] + token_log_probs_bkv)
    carried_bk1 = jnp.where(finished_bk, log_probs_bk, -jnp.inf)[..., None]
    cand_log_probs_bkc = jnp.concatenate([extended_bkv, carried_bk1], axis=-1)
    cand_lengths_bkc = jnp.concatenate([
        jnp.broadcast_to(lengths_bk[..., None] + 1, extended_bkv.shape),
        lengths_bk[..., None]], axis=-1)
    cand_scores_bkc = cand_log_probs_bkc / length_penalty_gnmt(cand_lengths_bkc,
                                                               length_penalty)
    num_cands = vocab_size + 1
    _, pick_bk = lax.top_k(cand_scores_bkc.reshape(batch_size, -1), num_beams)
    parent_bk, column_bk = pick_bk // num_cands, pick_bk % num_cands
    is_carried_bk = column_bk == vocab_size
    new_tokens_bk = jnp.where(is_carried_bk, pad_id, column_bk)
    new_log_probs_bk = jnp.take_along_axis(
        cand_log_probs_bkc.reshape(batch_size, -1), pick_bk, axis=-1)
    new_lengths_bk = jnp.take_along_axis(
        cand_lengths_bkc.reshape(batch_size, -1), pick_bk, axis=-1)
    new_finished_bk = is_carried_bk | (new_tokens_bk == eos_id)
    new_buffer_bkt = lax.dynamic_update_index_in_dim(
        jnp.take_along_axis(buffer_bkt, parent_bk[..., None], axis=1), new_tokens_bk,
        step + 1, axis=2)

    # Only examples past their prompt and not done search; the others keep their beams
    # (during the prompt all beams of an example hold the same tokens).
    generated_index_b = step + 1 - prompt_len_b
    active_b = (generated_index_b >= 0) & ~done_b
    # Stop when no live beam can overtake the best finished one: a live beam's log-prob only
    # falls, and its length penalty is at most that of N tokens (alpha >= 0), so
    # log_prob / penalty(N) bounds its final score. (Trivially true once all are finished.)
    best_finished_b = jnp.max(jnp.where(
        new_finished_bk,
        new_log_probs_bk / length_penalty_gnmt(new_lengths_bk, length_penalty), -jnp.inf),
        axis=-1)
    best_live_bound_b = jnp.max(jnp.where(
        new_finished_bk, -jnp.inf,
        new_log_probs_bk / length_penalty_gnmt(max_new_tokens, length_penalty)), axis=-1)
    settled_b = best_finished_b >= best_live_bound_b
    done_b = done_b | (active_b & (settled_b | (generated_index_b == max_new_tokens - 1)))

    def select(new, old):
      return jnp.where(active_b.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

    parent_bk = select(parent_bk, jnp.broadcast_to(beam_ids_k, parent_bk.shape))
    rows_n = (jnp.arange(batch_size)[:, None] * num_beams + parent_bk).reshape(-1)
    cache = gather_cache(cache, rows_n, batch_size * num_beams)
    return (step + 1, select(new_buffer_bkt, buffer_bkt), cache,
            select(new_log_probs_bk, log_probs_bk), select(new_lengths_bk, lengths_bk),
            select(new_finished_bk, finished_bk), done_b)

  buffer_bkt = jnp.repeat(
      _token_buffer(prompt_bl, prompt_len_b, max_new_tokens, pad_id)[:, None], num_beams, axis=1)
  # Only beam 0 is alive at first, so the first step does not pick K copies of one token.
  log_probs_bk = jnp.broadcast_to(jnp.where(beam_ids_k == 0, 0.0, -jnp.inf),
                                  (batch_size, num_beams))
  state = (jnp.array(0, jnp.int32), buffer_bkt, expand_cache(cache, num_beams, batch_size),
           log_probs_bk, jnp.zeros((batch_size, num_beams), jnp.int32),
           jnp.zeros((batch_size, num_beams), bool), jnp.zeros((batch_size,), bool))
  _, buffer_bkt, _, log_probs_bk, lengths_bk, _, _ = lax.while_loop(cond_fn, body_fn, state)

  scores_bk = log_probs_bk / length_penalty_gnmt(lengths_bk, length_penalty)
  # Each step leaves the beams ranked; sorting the final scores makes "best first" explicit.
  _, order_bk = lax.top_k(scores_bk, num_beams)

  def sort(x):
    return jnp.take_along_axis(x, order_bk.reshape(order_bk.shape + (1,) * (x.ndim - 2)),
                               axis=1)
  tokens_bkn = _generated(buffer_bkt, prompt_len_b, max_new_tokens)
  return BeamOutput(sort(tokens_bkn), sort(lengths_bk), sort(scores_bk), sort(log_probs_bk))
