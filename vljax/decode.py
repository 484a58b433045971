"""Autoregressive decoding shared by every generative family: greedy, sampling and beam search.

The decoders know nothing about models. They continue a `Prefilled` state (the next-token
logits after each row's prompt, the cache, and each row's next position) by driving a pure step
function

    step_fn(tokens_b: int32[B], cache: PyTree, positions_b: int32[B]) -> (logits_bv: float[B, V], cache)

that feeds one token per row, at that row's own position (counted from 0 for the first prompt
token), and returns the logits of the next token with the updated cache (a KV cache of static
length for real models; see `recompute_step_fn` for a cache-free reference).

Prompts are ragged: row b's prompt has its own length, and generation of row b continues right
after it, at position prompt_len_b, with no padding inside the sequence. A `Prefilled` state
comes from a model's parallel prefill (e.g. `vljax.models.lm.prefill`: the whole prompt, token
ids or embeddings such as 576 image tokens plus text, in one pass that fills the KV cache) or
from `feed_prompt`, which feeds a token prompt through `step_fn` one token at a time. The KV
caches of vljax's attention (`vljax.nn.MultiHeadAttention`) store a token at the slot of its
position, row by row, so a row whose prompt is shorter than the padded batch overwrites its
padding's slots as it generates, before any query can see them. A cache must hold
`cache_length(P, N)` positions for prompts of at most P tokens and N new tokens.

Cache contract: the cache is any pytree. A leaf whose leading dimension equals the batch the
step function sees is per-example state; beam search repeats those rows for every beam
(`expand_cache`) and reorders them as beams are re-ranked (`gather_cache`). Every other leaf
(a leaf of another leading size) is shared and left untouched. So:
  * per-example conditioning that the step function needs (cross-attention keys and values of
    an image, prefix masks) belongs in the cache, so that beams see their own example;
  * cache leaves must be batch-major ([B, ...]); a scanned layer stack whose leaves are
    [depth, B, ...] moves the batch axis first in its step function wrapper
    (`batch_major_cache` / `layer_major_cache`);
  * a shared leaf must not have a leading size equal to the (beam-expanded) batch.

Stopping: `eos_id` is one id or several (chat templates end a turn with any of a few tokens),
as Python ints or an int array (which may be traced); a row stops at the first of them. Outputs hold N = max_new_tokens tokens per row, `pad_id`
after the stop token; lengths count the generated tokens including it. All functions are
traceable: call them inside `jax.jit` with `max_new_tokens`, `beam_size` and `top_k` static
(temperature, top_p, length_penalty and an array of stop ids may be traced). Model parameters should reach
`step_fn` through the jitted function's arguments, not be closed over outside it, or they get
baked into the program as constants.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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


class Prefilled(NamedTuple):
  """The decoding state after the prompts: what every decoder starts from."""
  logits_bv: jax.Array  # float[B, V]: next-token logits after each row's last prompt token.
  cache: PyTree  # the cache holding the prompts (batch B).
  positions_b: jax.Array  # int32[B]: position of each row's first generated token (its prompt
  # length, counting any prefix such as image tokens).


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


def batch_major_cache(cache: Mapping, scanned: bool) -> dict:
  """A model's flax "cache" collection in the batch-major layout the decoders need.

  A scanned layer stack (`Transformer(scan=True)`) stores every cache leaf (keys, values,
  cached cross-attention context) as [depth, B, ...]; here they become [B, depth, ...]. An
  unscanned cache is batch-major already and is returned as is. `layer_major_cache` undoes this
  before the model is applied.
  """
  if not scanned:
    return dict(cache)
  return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), dict(cache))


def layer_major_cache(cache: Mapping, scanned: bool) -> dict:
  """Inverse of `batch_major_cache`: the layout the model's flax modules read and write."""
  if not scanned:
    return dict(cache)
  return jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), dict(cache))


def recompute_step_fn(logits_fn: Callable[[jax.Array], jax.Array]) -> StepFn:
  """A cache-free step function: reruns `logits_fn` on the whole token prefix every step.

  `logits_fn(tokens_bt) -> logits_btv` is a causally masked model. The cache is the token
  buffer int32[B, T] (start from `recompute_cache`); a step writes each row's token at that
  row's position and returns the logits there. Decoding with a model's KV cache must give the
  same tokens as decoding with this, at O(T) times the cost per step.
  """
  def step_fn(tokens_b, tokens_bt, positions_b):
    rows_b = jnp.arange(tokens_bt.shape[0])
    tokens_bt = tokens_bt.at[rows_b, positions_b].set(tokens_b.astype(tokens_bt.dtype))
    logits_btv = logits_fn(tokens_bt)
    return logits_btv[rows_b, positions_b], tokens_bt
  return step_fn


def recompute_cache(batch_size: int, max_len: int) -> jax.Array:
  """The initial (empty) token buffer used as cache by `recompute_step_fn`."""
  return jnp.zeros((batch_size, max_len), jnp.int32)


def prompt_lengths(prompt_bl: jax.Array, prompt_len_b: jax.Array | None) -> jax.Array:
  """int32[B]: `prompt_len_b`, or every row's full length L when None."""
  batch_size, prompt_len = prompt_bl.shape[:2]
  if prompt_len_b is None:
    return jnp.full((batch_size,), prompt_len, jnp.int32)
  return jnp.asarray(prompt_len_b, jnp.int32)


def last_prompt_logits(logits_blv: jax.Array, prompt_len_b: jax.Array) -> jax.Array:
  """float[B, V]: the logits at each row's last prompt position (a parallel prefill's output)."""
  return jnp.take_along_axis(logits_blv, (prompt_len_b - 1)[:, None, None], axis=1)[:, 0]


def feed_prompt(step_fn: StepFn, cache: PyTree, prompt_bl: jax.Array,
                prompt_len_b: jax.Array | None = None) -> Prefilled:
  """Feeds right-padded token prompts [B, P] (lengths `prompt_len_b` >= 1, default all P)
  through `step_fn` one token at a time: the sequential counterpart of a parallel prefill.

  Step s feeds column s to every row at position s; a row past its prompt feeds its padding,
  whose cache slots its own generated tokens overwrite later (see the module doc).
  """
  batch_size, prompt_len = prompt_bl.shape
  prompt_bl = jnp.asarray(prompt_bl, jnp.int32)
  prompt_len_b = prompt_lengths(prompt_bl, prompt_len_b)

  def feed(s, cache):
    return step_fn(prompt_bl[:, s], cache, jnp.full((batch_size,), s, jnp.int32))

  def body(s, carry):
    kept_bv, cache = carry
    logits_bv, cache = feed(s, cache)
    return jnp.where((s == prompt_len_b - 1)[:, None], logits_bv, kept_bv), cache

  logits_bv, cache = feed(0, cache)
  logits_bv, cache = lax.fori_loop(1, prompt_len, body, (logits_bv, cache))
  return Prefilled(logits_bv, cache, prompt_len_b)


def _stop_ids(eos_id: int | Sequence[int] | jax.Array) -> jax.Array:
  if isinstance(eos_id, (jax.Array, np.ndarray)):  # may be traced
    return jnp.atleast_1d(jnp.asarray(eos_id, jnp.int32))
  ids = (eos_id,) if isinstance(eos_id, (int, np.integer)) else tuple(eos_id)
  if not ids:
    raise ValueError("eos_id must name at least one stop id")
  return jnp.asarray(ids, jnp.int32)


def _token_log_probs(logits_bv: jax.Array, tokens_b: jax.Array) -> jax.Array:
  log_probs_bv = jax.nn.log_softmax(logits_bv, axis=-1)
  return jnp.take_along_axis(log_probs_bv, tokens_b[:, None], axis=-1)[:, 0]


def _decode(step_fn: StepFn, start: Prefilled, max_new_tokens: int,
            eos_id: int | Sequence[int], pad_id: int,
            choose_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> DecodeOutput:
  """One-sequence-per-row loop; `choose_fn(logits_bv, t) -> tokens_b` picks the t-th token."""
  batch_size = start.logits_bv.shape[0]
  stop_ids = _stop_ids(eos_id)

  def choose(t, logits_bv, tokens_bn, done_b, lengths_b, log_probs_b):
    logits_bv = logits_bv.astype(jnp.float32)
    chosen_b = choose_fn(logits_bv, t).astype(jnp.int32)
    live_b = ~done_b
    tokens_bn = tokens_bn.at[:, t].set(jnp.where(live_b, chosen_b, pad_id))
    lengths_b = lengths_b + live_b
    log_probs_b = log_probs_b + jnp.where(live_b, _token_log_probs(logits_bv, chosen_b), 0.0)
    done_b = done_b | (live_b & (jnp.isin(chosen_b, stop_ids) | (t == max_new_tokens - 1)))
    return tokens_bn, done_b, lengths_b, log_probs_b

  def cond_fn(state):
    t, _, _, done_b, _, _ = state
    return (t < max_new_tokens) & ~jnp.all(done_b)

  def body_fn(state):
    t, cache, tokens_bn, done_b, lengths_b, log_probs_b = state
    logits_bv, cache = step_fn(tokens_bn[:, t - 1], cache, start.positions_b + t - 1)
    return (t + 1, cache) + choose(t, logits_bv, tokens_bn, done_b, lengths_b, log_probs_b)

  initial = choose(jnp.array(0, jnp.int32), start.logits_bv,
                   jnp.full((batch_size, max_new_tokens), pad_id, jnp.int32),
                   jnp.zeros((batch_size,), bool), jnp.zeros((batch_size,), jnp.int32),
                   jnp.zeros((batch_size,), jnp.float32))
  state = (jnp.array(1, jnp.int32), start.cache) + initial
  _, _, tokens_bn, _, lengths_b, log_probs_b = lax.while_loop(cond_fn, body_fn, state)
  return DecodeOutput(tokens_bn, lengths_b, log_probs_b)


def greedy(step_fn: StepFn, start: Prefilled, *, max_new_tokens: int,
           eos_id: int | Sequence[int], pad_id: int = 0) -> DecodeOutput:
  """Greedy decoding: the most likely next token at every step, until a stop id or N tokens."""
  return _decode(step_fn, start, max_new_tokens, eos_id, pad_id,
                 lambda logits_bv, t: jnp.argmax(logits_bv, axis=-1))


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


def sample(step_fn: StepFn, start: Prefilled, *, rng: jax.Array, max_new_tokens: int,
           eos_id: int | Sequence[int], pad_id: int = 0, temperature: float | jax.Array = 1.0,
           top_k: int = 0, top_p: float | jax.Array = 1.0) -> DecodeOutput:
  """Ancestral sampling from softmax(logits / temperature), restricted to top-k / top-p.

  Temperature 0 is greedy decoding. The result is a deterministic function of `rng`; draws are
  independent across rows and steps. `log_probs_b` is under the unmodified model.
  """
  def choose_fn(logits_bv, t):
    scaled_bv = logits_bv / jnp.maximum(temperature, 1e-30)
    sampled_b = jax.random.categorical(
        jax.random.fold_in(rng, t), filter_logits(scaled_bv, top_k, top_p), axis=-1)
    return jnp.where(temperature > 0, sampled_b, jnp.argmax(logits_bv, axis=-1))

  return _decode(step_fn, start, max_new_tokens, eos_id, pad_id, choose_fn)


def length_penalty_gnmt(lengths: jax.Array, alpha: float | jax.Array) -> jax.Array:
  """GNMT length penalty ((5 + length) / 6) ** alpha (Wu et al. 2016); 1 when alpha = 0."""
  return ((5.0 + lengths) / 6.0) ** alpha


def beam_search(step_fn: StepFn, start: Prefilled, *, max_new_tokens: int, beam_size: int,
                eos_id: int | Sequence[int], pad_id: int = 0,
                length_penalty: float | jax.Array = 0.0) -> BeamOutput:
  """Beam search ranking hypotheses by log_prob / ((5 + length) / 6) ** length_penalty.

  Finished hypotheses (ended by a stop id) keep their beam and compete with the live ones at
  each step, but are never extended. A row stops after N tokens, or as soon as no live beam
  can beat its best finished one (then its other beams are returned as they stand, possibly
  unfinished). With beam_size = 1 this is greedy decoding. The prefilled cache has batch B: it
  is expanded to B * beam_size rows (example-major) before the first step.
  """
  if isinstance(length_penalty, (int, float)) and length_penalty < 0:
    raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")
  batch_size, num_beams = start.logits_bv.shape[0], beam_size
  stop_ids = _stop_ids(eos_id)
  beam_ids_k = jnp.arange(num_beams)
  positions_n = jnp.repeat(start.positions_b, num_beams)

  def choose(t, logits_nv, cache, tokens_bkn, log_probs_bk, lengths_bk, finished_bk, done_b):
    token_log_probs_bkv = jax.nn.log_softmax(logits_nv.astype(jnp.float32), axis=-1).reshape(
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
    new_finished_bk = is_carried_bk | jnp.isin(new_tokens_bk, stop_ids)
    new_tokens_bkn = jnp.take_along_axis(tokens_bkn, parent_bk[..., None], axis=1).at[
        :, :, t].set(new_tokens_bk)

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
    # Rows already done keep their beams (and cache rows) as they are.
    active_b = ~done_b
    new_done_b = done_b | (active_b & (settled_b | (t == max_new_tokens - 1)))

    def select(new, old):
      return jnp.where(active_b.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

    parent_bk = select(parent_bk, jnp.broadcast_to(beam_ids_k, parent_bk.shape))
    rows_n = (jnp.arange(batch_size)[:, None] * num_beams + parent_bk).reshape(-1)
    cache = gather_cache(cache, rows_n, batch_size * num_beams)
    return (cache, select(new_tokens_bkn, tokens_bkn), select(new_log_probs_bk, log_probs_bk),
            select(new_lengths_bk, lengths_bk), select(new_finished_bk, finished_bk),
            new_done_b)

  def cond_fn(state):
    return (state[0] < max_new_tokens) & ~jnp.all(state[-1])

  def body_fn(state):
    t, cache, tokens_bkn = state[:3]
    logits_nv, cache = step_fn(tokens_bkn[:, :, t - 1].reshape(-1), cache, positions_n + t - 1)
    return (t + 1,) + choose(t, logits_nv, cache, tokens_bkn, *state[3:])

  # Only beam 0 is alive at first, so the first step does not pick K copies of one token.
  log_probs_bk = jnp.broadcast_to(jnp.where(beam_ids_k == 0, 0.0, -jnp.inf),
                                  (batch_size, num_beams))
  initial = choose(jnp.array(0, jnp.int32), jnp.repeat(start.logits_bv, num_beams, axis=0),
                   expand_cache(start.cache, num_beams, batch_size),
                   jnp.full((batch_size, num_beams, max_new_tokens), pad_id, jnp.int32),
                   log_probs_bk, jnp.zeros((batch_size, num_beams), jnp.int32),
                   jnp.zeros((batch_size, num_beams), bool), jnp.zeros((batch_size,), bool))
  state = (jnp.array(1, jnp.int32),) + initial
  _, _, tokens_bkn, log_probs_bk, lengths_bk, _, _ = lax.while_loop(cond_fn, body_fn, state)

  scores_bk = log_probs_bk / length_penalty_gnmt(lengths_bk, length_penalty)
  # Each step leaves the beams ranked; sorting the final scores makes "best first" explicit.
  _, order_bk = lax.top_k(scores_bk, num_beams)

  def sort(x):
    return jnp.take_along_axis(x, order_bk.reshape(order_bk.shape + (1,) * (x.ndim - 2)),
                               axis=1)
  return BeamOutput(sort(tokens_bkn), sort(lengths_bk), sort(scores_bk), sort(log_probs_bk))


def run(step_fn: StepFn, start: Prefilled, *, max_new_tokens: int,
        eos_id: int | Sequence[int], pad_id: int = 0, beam_size: int = 1,
        length_penalty: float | jax.Array = 0.0, rng: jax.Array | None = None,
        temperature: float | jax.Array = 1.0, top_k: int = 0,
        top_p: float | jax.Array = 1.0) -> jax.Array:
  """Generated tokens int32[B, N] (pad_id after the stop token): greedy by default, the best
  of `beam_size` > 1 beams, or, given `rng`, sampled with temperature / top-k / top-p. The one
  entry point the models' `generate` functions share."""
  kw = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
  if beam_size > 1:
    if rng is not None:
      raise ValueError("beam search is deterministic: give rng or beam_size > 1, not both")
    return beam_search(step_fn, start, beam_size=beam_size, length_penalty=length_penalty,
                       **kw).best().tokens_bn
  if rng is not None:
    return sample(step_fn, start, rng=rng, temperature=temperature, top_k=top_k, top_p=top_p,
                  **kw).tokens_bn
  return greedy(step_fn, start, **kw).tokens_bn
