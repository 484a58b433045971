"""Decoding: KV cache == full recomputation, beam search vs greedy and exhaustive search,
sampling filters, EOS handling, cache layouts; everything under jax.jit."""
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax import decode
from vljax.models import lm
from vljax.nn import BlockConfig, Transformer

PAD, EOS, BOS = 0, 1, 2


def _random_params(model, seed):
  """Random weights drawn with NumPy (no XLA compilation of an initializer)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    normal = rng.standard_normal(leaf.shape).astype(np.float32)
    name = path[-1].key
    if name == "scale":
      return 1.0 + 0.1 * normal
    if name == "bias":
      return 0.1 * normal
    if name == "embedding":
      return normal
    if name == "pos_embedding":
      return 0.5 * normal
    # Attention output kernels are [heads, head_dim, width]: their fan-in is heads * head_dim.
    is_attention_out = len(path) > 1 and path[-2].key == "out"
    fan_in = np.prod(leaf.shape[:-1]) if is_attention_out else leaf.shape[0]
    return normal / np.sqrt(fan_in)
  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes["params"]))


@functools.lru_cache(maxsize=None)
def _lm(vocab_size, seed=3):
  """(logits_fn, kv_step_fn, init_kv_cache(batch, length)) of a random GPT-2-recipe
  `vljax.models.lm.LM` (width 32, 2 layers, 4 heads, learned positions, untied head)."""
  model = lm.LM(variant="mu", recipe="gpt2", vocab_size=vocab_size, max_len=16, tied_head=False)
  params = _random_params(model, seed)

  @jax.jit
  def logits_fn(tokens_bt):
    return model.apply({"params": params}, tokens_bt)["logits"]

  def init_kv_cache(batch_size, length):
    return lm.init_cache(model, params, batch_size, length)

  return logits_fn, lm.decode_step_fn(model, params), init_kv_cache


# Shapes shared by the tests on the random LM, so that they share compiled programs.
VOCAB, BATCH, PROMPT_LEN, NEW = 11, 6, 4, 8


def _prompts():
  """BOS-led random prompts of lengths 1..PROMPT_LEN (every length present)."""
  rng = np.random.default_rng(1)
  prompt_bl = rng.integers(3, VOCAB, size=(BATCH, PROMPT_LEN)).astype(np.int32)
  prompt_bl[:, 0] = BOS
  prompt_len_b = np.array([1, 4, 2, 3, 4, 1], np.int32)
  return jnp.asarray(prompt_bl), jnp.asarray(prompt_len_b)


def _initial_cache(kind, vocab_size=VOCAB, seed=3, batch_size=BATCH, prompt_len=PROMPT_LEN,
                   max_new_tokens=NEW):
  length = decode.cache_length(prompt_len, max_new_tokens)
  if kind == "kv":
    return _lm(vocab_size, seed)[2](batch_size, length)
  return decode.recompute_cache(batch_size, length)


@functools.lru_cache(maxsize=None)
def _decoder(method, kind, vocab_size=VOCAB, seed=3, max_new_tokens=NEW, **static):
  """A jitted decoder over the LM's KV-cache ("kv") or recomputing ("recompute") step fn:
  (cache, prompt_bl, prompt_len_b, *traced options) -> output."""
  logits_fn, kv_step_fn, _ = _lm(vocab_size, seed)
  step_fn = kv_step_fn if kind == "kv" else decode.recompute_step_fn(logits_fn)
  common = dict(max_new_tokens=max_new_tokens, eos_id=EOS, pad_id=PAD, **static)

  def start(cache, prompt_bl, lens):
    return decode.feed_prompt(step_fn, cache, prompt_bl, lens)

  if method == "greedy":
    return jax.jit(lambda cache, prompt_bl, lens: decode.greedy(
        step_fn, start(cache, prompt_bl, lens), **common))
  if method == "beam":
    return jax.jit(lambda cache, prompt_bl, lens, alpha: decode.beam_search(
        step_fn, start(cache, prompt_bl, lens), length_penalty=alpha, **common))
  return jax.jit(lambda cache, prompt_bl, lens, rng, temperature: decode.sample(
      step_fn, start(cache, prompt_bl, lens), rng=rng, temperature=temperature, **common))


def _teacher_forced(prompt_bl, prompt_len_b, tokens_bn, lengths_b):
  """Recomputes, in one parallel pass over each unpadded prompt + generated tokens, the model's
  log-probability of every generated sequence and whether each token was the argmax."""
  logits_fn = _lm(VOCAB)[0]
  prompt_bl, tokens_bn = np.asarray(prompt_bl), np.asarray(tokens_bn)
  batch_size, prompt_len = prompt_bl.shape
  max_new_tokens = tokens_bn.shape[1]
  # Each prompt followed by its generated tokens, right-padded (causal: padding is unseen).
  sequences_bt = np.full((batch_size, prompt_len + max_new_tokens), PAD, np.int32)
  for b in range(batch_size):
    sequences_bt[b, :prompt_len_b[b]] = prompt_bl[b, :prompt_len_b[b]]
    sequences_bt[b, prompt_len_b[b]:prompt_len_b[b] + max_new_tokens] = tokens_bn[b]
  log_probs_btv = np.asarray(jax.nn.log_softmax(logits_fn(jnp.asarray(sequences_bt))))
  totals, all_argmax = [], True
  for b in range(batch_size):
    positions = range(prompt_len_b[b], prompt_len_b[b] + lengths_b[b])
    totals.append(sum(log_probs_btv[b, t - 1, sequences_bt[b, t]] for t in positions))
    all_argmax &= all(np.argmax(log_probs_btv[b, t - 1]) == sequences_bt[b, t]
                      for t in positions)
  return np.array(totals), all_argmax


def test_kv_cache_greedy_equals_recomputation():
  prompt_bl, prompt_len_b = _prompts()
  out = _decoder("greedy", "kv")(_initial_cache("kv"), prompt_bl, prompt_len_b)
  ref = _decoder("greedy", "recompute")(_initial_cache("recompute"), prompt_bl, prompt_len_b)
  np.testing.assert_array_equal(out.tokens_bn, ref.tokens_bn)
  np.testing.assert_array_equal(out.lengths_b, ref.lengths_b)
  np.testing.assert_allclose(out.log_probs_b, ref.log_probs_b, rtol=1e-4, atol=1e-5)
  assert len(np.unique(out.tokens_bn)) > 3  # a non-degenerate output


def test_greedy_follows_each_unpadded_prompt():
  """Prompts of different lengths in one batch: every generated token is the argmax of the
  model run on that example's own prompt and previous tokens, and log-probs add up."""
  prompt_bl, prompt_len_b = _prompts()
  out = _decoder("greedy", "kv")(_initial_cache("kv"), prompt_bl, prompt_len_b)
  log_probs_b, all_argmax = _teacher_forced(prompt_bl, prompt_len_b, out.tokens_bn,
                                            out.lengths_b)
  assert all_argmax
  np.testing.assert_allclose(out.log_probs_b, log_probs_b, rtol=1e-4)


def test_beam_size_one_equals_greedy():
  prompt_bl, prompt_len_b = _prompts()
  greedy_out = _decoder("greedy", "kv")(_initial_cache("kv"), prompt_bl, prompt_len_b)
  beam = _decoder("beam", "kv", beam_size=1)
  for alpha in (0.0, 0.6):
    beam_out = beam(_initial_cache("kv"), prompt_bl, prompt_len_b, alpha).best()
    for got, want in zip(beam_out, greedy_out):
      np.testing.assert_array_equal(got, want)


def test_kv_cache_beams_equal_recomputation_and_beat_greedy():
  prompt_bl, prompt_len_b = _prompts()
  # Beam reordering of the KV cache (rows gathered) must
  # give exactly what recomputing every prefix gives.
  beam = _decoder("beam", "kv", beam_size=4)
  out = beam(_initial_cache("kv"), prompt_bl, prompt_len_b, 0.6)
  ref = _decoder("beam", "recompute", beam_size=4)(_initial_cache("recompute"), prompt_bl,
                                                   prompt_len_b, 0.6)
  np.testing.assert_array_equal(out.tokens_bkn, ref.tokens_bkn)
  np.testing.assert_allclose(out.scores_bk, ref.scores_bk, rtol=1e-4, atol=1e-5)
  assert np.all(np.diff(np.asarray(out.scores_bk), axis=1) <= 0)  # best first

  # The best beam is at least as likely as greedy's output, and its reported log-probability
  # is the model's, recomputed in one teacher-forced pass.
  greedy_out = _decoder("greedy", "kv")(_initial_cache("kv"), prompt_bl, prompt_len_b)
  best = beam(_initial_cache("kv"), prompt_bl, prompt_len_b, 0.0).best()
  assert np.all(np.asarray(best.log_probs_b) >= np.asarray(greedy_out.log_probs_b) - 1e-5)
  assert np.any(np.asarray(best.log_probs_b) > np.asarray(greedy_out.log_probs_b) + 1e-3)
  log_probs_b, _ = _teacher_forced(prompt_bl, prompt_len_b, best.tokens_bn, best.lengths_b)
  np.testing.assert_allclose(best.log_probs_b, log_probs_b, rtol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_wide_beam_equals_exhaustive_search(alpha):
  vocab, new, batch = 5, 3, 2
  prompt_bl = jnp.array([[BOS, 3], [BOS, 4]], jnp.int32)
  # 25 beams hold every live prefix of length 2, so the search cannot prune the optimum.
  beam = _decoder("beam", "kv", vocab_size=vocab, seed=3, max_new_tokens=new, beam_size=25)
  cache = _initial_cache("kv", vocab, 3, batch_size=batch, prompt_len=2, max_new_tokens=new)
  out = beam(cache, prompt_bl, None, alpha).best()
  logits_fn = _lm(vocab, seed=3)[0]

  # Every hypothesis: sequences truncated after their first EOS, then padded.
  hypotheses = set()
  for sequence in itertools.product(range(vocab), repeat=new):
    length = sequence.index(EOS) + 1 if EOS in sequence else new
    hypotheses.add(sequence[:length] + (PAD,) * (new - length))
  hypotheses = sorted(hypotheses)
  tokens_hn = np.array(hypotheses, np.int32)
  lengths_h = np.array([list(h).index(EOS) + 1 if EOS in h else new for h in hypotheses])
  for b in range(batch):
    sequences = np.concatenate([np.repeat(prompt_bl[b:b + 1], len(hypotheses), 0), tokens_hn],
                               axis=1)
    log_probs_htv = np.asarray(jax.nn.log_softmax(logits_fn(jnp.asarray(sequences))))
    token_log_probs_hn = np.take_along_axis(log_probs_htv[:, 1:-1], tokens_hn[..., None],
                                            axis=-1)[..., 0]
    valid_hn = np.arange(new)[None] < lengths_h[:, None]
    scores_h = (token_log_probs_hn * valid_hn).sum(1) / ((5 + lengths_h) / 6) ** alpha
    best = np.argmax(scores_h)
    np.testing.assert_array_equal(out.tokens_bn[b], tokens_hn[best])
    assert out.lengths_b[b] == lengths_h[best]
    score = out.log_probs_b[b] / ((5 + out.lengths_b[b]) / 6) ** alpha
    np.testing.assert_allclose(score, scores_h[best], rtol=1e-5)


def test_length_penalty_steers_the_search():
  """A bigram LM over {PAD, EOS, BOS, A, X} where the length penalty decides.

  From BOS: EOS .4, A .32, X .28; from A: A .5, X .45, EOS .05; from X: X .99, EOS .01.
  With 2 beams, X is pruned at step 1. Without a penalty, [EOS] (log .4) beats every longer
  sequence. With alpha = 6, penalties 1, 2.52, 5.62 for lengths 1-3 make the search drop
  [EOS] for AA and AX at step 2 and end on AXX (-1.95 / 5.62 = -0.35). Ranking without the
  penalty would keep [EOS] and end on AAA; bounding live beams by their current penalty
  instead of that of N tokens would stop after step 1 with [EOS].
  """
  probs_vv = np.full((5, 5), 1e-6)
  probs_vv[BOS, [EOS, 3, 4]] = [0.4, 0.32, 0.28]
  probs_vv[3, [3, 4, EOS]] = [0.5, 0.45, 0.05]
  probs_vv[4, [4, EOS]] = [0.99, 0.01]
  log_probs_vv = jnp.log(jnp.asarray(probs_vv, jnp.float32))

  def bigram_step_fn(tokens_b, cache, position):
    return log_probs_vv[tokens_b], cache

  start = decode.feed_prompt(bigram_step_fn, (), jnp.full((1, 1), BOS, jnp.int32))
  beam = jax.jit(lambda alpha: decode.beam_search(
      bigram_step_fn, start, max_new_tokens=3, beam_size=2, eos_id=EOS, pad_id=PAD,
      length_penalty=alpha))
  np.testing.assert_array_equal(beam(0.0).tokens_bkn[0, 0], [EOS, PAD, PAD])
  out = beam(6.0)
  np.testing.assert_array_equal(out.tokens_bkn[0, 0], [3, 4, 4])
  np.testing.assert_allclose(out.scores_bk[0, 0], np.log(0.32 * 0.45 * 0.99) / (8 / 6) ** 6,
                             rtol=1e-5)


def test_sampling_limits_equal_greedy():
  prompt_bl, prompt_len_b = _prompts()
  cache = _initial_cache("kv")
  expected = _decoder("greedy", "kv")(cache, prompt_bl, prompt_len_b).tokens_bn
  sample = _decoder("sample", "kv")
  sample_top1 = _decoder("sample", "kv", top_k=1)
  rng = jax.random.key(7)
  np.testing.assert_array_equal(
      sample_top1(cache, prompt_bl, prompt_len_b, rng, 1.0).tokens_bn, expected)
  for temperature in (1e-6, 0.0):
    np.testing.assert_array_equal(
        sample(cache, prompt_bl, prompt_len_b, rng, temperature).tokens_bn, expected)
  # Deterministic given the key; another key gives another sample.
  tokens = sample(cache, prompt_bl, prompt_len_b, rng, 1.0).tokens_bn
  np.testing.assert_array_equal(
      tokens, sample(cache, prompt_bl, prompt_len_b, rng, 1.0).tokens_bn)
  assert np.any(tokens != sample(cache, prompt_bl, prompt_len_b, jax.random.key(8),
                                 1.0).tokens_bn)
  assert np.any(tokens != expected)


FIXED_PROBS_V = np.array([0.05, 0.4, 0.25, 0.15, 0.1, 0.05])


@functools.lru_cache(maxsize=None)
def _fixed_distribution_sampler(top_k, batch_size=1024, max_new_tokens=8):
  """Jitted sampler over a step function that always returns log(FIXED_PROBS_V)."""
  logits_v = jnp.log(jnp.asarray(FIXED_PROBS_V, jnp.float32))

  def fixed_step_fn(tokens_b, cache, position):
    return jnp.broadcast_to(logits_v, (tokens_b.shape[0], len(FIXED_PROBS_V))), cache

  start = decode.feed_prompt(fixed_step_fn, (), jnp.full((batch_size, 1), BOS, jnp.int32))
  return jax.jit(lambda rng, temperature, top_p: decode.sample(
      fixed_step_fn, start, rng=rng,
      max_new_tokens=max_new_tokens, eos_id=99, temperature=temperature, top_k=top_k,
      top_p=top_p))


@pytest.mark.parametrize("temperature, top_k, top_p, support", [
    (1.0, 0, 0.75, [1, 2, 3]),  # mass before token 3 is 0.65 < 0.75; before token 4, 0.8
    (1.0, 0, 0.65, [1, 2]),
    (1.0, 0, 0.01, [1]),
    (1.0, 2, 1.0, [1, 2]),
    (2.0, 4, 0.8, [1, 2, 3]),  # top-4, then the nucleus of the tempered distribution
    (0.5, 0, 1.0, [0, 1, 2, 3, 4, 5]),
])
def test_sampling_draws_from_the_filtered_distribution(temperature, top_k, top_p, support):
  """Fixed logits: tokens stay in the filtered support, frequencies match it renormalised."""
  sample = _fixed_distribution_sampler(top_k)
  tokens = np.asarray(sample(jax.random.key(0), temperature, top_p).tokens_bn).ravel()
  tempered_v = FIXED_PROBS_V ** (1 / temperature)
  expected_v = np.zeros_like(tempered_v)
  expected_v[support] = tempered_v[support] / tempered_v[support].sum()
  frequencies_v = np.bincount(tokens, minlength=len(FIXED_PROBS_V)) / len(tokens)
  assert set(np.unique(tokens)) == set(support)
  np.testing.assert_allclose(frequencies_v, expected_v, atol=0.02)


def test_filter_logits_keeps_the_nucleus():
  logits_bv = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
  kept = np.isfinite(decode.filter_logits(logits_bv, top_p=0.8))
  np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [0, 0, 1, 1]])
  # top-p applies to the top-k distribution, renormalised: the third token is kept alone
  # (0.8 of the mass before it) but not after top-3 (0.8 / 0.95 = 0.84 before it).
  kept = np.isfinite(decode.filter_logits(logits_bv, top_p=0.83))
  np.testing.assert_array_equal(kept, [[1, 1, 1, 0], [0, 1, 1, 1]])
  kept = np.isfinite(decode.filter_logits(logits_bv, top_k=3, top_p=0.83))
  np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [0, 0, 1, 1]])
  kept = np.isfinite(decode.filter_logits(logits_bv, top_k=1, top_p=jnp.float32(1.0)))
  np.testing.assert_array_equal(kept, [[1, 0, 0, 0], [0, 0, 0, 1]])


def _scripted_step_fn(calls):
  """Emits token_map[script_bn[b, position]] with near certainty and counts its calls. The
  script lives in the cache, so beams see their own example's script; the shared leaves
  (token_map of leading size 6, a scalar) must reach the step function untouched."""
  def step_fn(tokens_b, cache, positions_b):
    jax.debug.callback(lambda p: calls.append(int(p[0])), positions_b)
    next_b = cache["script_bn"][jnp.arange(tokens_b.shape[0]), positions_b]
    logits_bv = 30.0 * jax.nn.one_hot(cache["token_map"][next_b], 6) + cache["offset"]
    return logits_bv, cache
  return step_fn


def _scripted_cache(script_bn):
  return {"script_bn": jnp.asarray(script_bn, jnp.int32), "token_map": jnp.arange(6),
          "offset": jnp.array(0.0)}


def _scripted_run(method, step_fn, prompt_bl, kwargs):
  def run(cache):
    start = decode.feed_prompt(step_fn, cache, prompt_bl)
    if method == "greedy":
      return decode.greedy(step_fn, start, **kwargs)
    if method == "beam":
      return decode.beam_search(step_fn, start, beam_size=3, **kwargs).best()
    return decode.sample(step_fn, start, rng=jax.random.key(0), top_p=0.9, **kwargs)
  return run


@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_any_of_several_stop_ids_ends_a_row(method):
  """Chat templates end a turn with one of several tokens: each row stops at the first."""
  script_bn = np.full((3, 6), 3, np.int32)
  script_bn[0, :2] = [3, 4]  # stop id 4 second
  script_bn[1, :3] = [3, 3, EOS]  # stop id EOS third
  calls = []
  step_fn = _scripted_step_fn(calls)
  kwargs = dict(max_new_tokens=6, eos_id=(4, EOS), pad_id=PAD)
  out = jax.jit(_scripted_run(method, step_fn, jnp.full((3, 1), BOS, jnp.int32), kwargs))(
      _scripted_cache(script_bn))
  np.testing.assert_array_equal(out.tokens_bn, [[3, 4, 0, 0, 0, 0], [3, 3, EOS, 0, 0, 0],
                                                [3] * 6])
  np.testing.assert_array_equal(out.lengths_b, [2, 3, 6])


@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_eos_pads_and_stops_early(method):
  new = 12
  script_bn = np.full((3, new), 3, np.int32)
  script_bn[0, :3] = [3, 4, EOS]       # EOS as the third token
  script_bn[1, :5] = [2, 3, 4, 5, EOS]  # EOS as the fifth
  script_bn[2, 0] = EOS               # EOS first
  cache = _scripted_cache(script_bn)
  calls = []
  step_fn = _scripted_step_fn(calls)
  prompt_bl = jnp.full((3, 1), BOS, jnp.int32)
  kwargs = dict(max_new_tokens=new, eos_id=EOS, pad_id=PAD)
  run = _scripted_run(method, step_fn, prompt_bl, kwargs)
  out = jax.jit(run)(cache)
  jax.effects_barrier()
  expected = np.zeros((3, new), np.int32)
  expected[0, :3] = [3, 4, EOS]
  expected[1, :5] = [2, 3, 4, 5, EOS]
  expected[2, 0] = EOS
  np.testing.assert_array_equal(out.tokens_bn, expected)
  np.testing.assert_array_equal(out.lengths_b, [3, 5, 1])
  np.testing.assert_allclose(out.log_probs_b, 0.0, atol=1e-6)
  # The loop stops once every sequence is finished (for beam search: once no live beam, all
  # far less likely, can overtake the finished one): 5 steps, not 12.
  assert len(calls) == 5


def test_no_eos_runs_to_max_new_tokens():
  calls = []
  cache = _scripted_cache(np.full((2, 4), 3))
  step_fn = _scripted_step_fn(calls)
  out = jax.jit(lambda c: decode.greedy(
      step_fn, decode.feed_prompt(step_fn, c, jnp.full((2, 1), BOS, jnp.int32)),
      max_new_tokens=4, eos_id=EOS, pad_id=PAD))(cache)
  np.testing.assert_array_equal(out.tokens_bn, np.full((2, 4), 3))
  np.testing.assert_array_equal(out.lengths_b, [4, 4])


def test_expand_and_gather_cache_touch_only_batch_leaves():
  cache = {"k_btd": jnp.arange(2 * 3).reshape(2, 3), "index": jnp.array(5),
           "table": jnp.arange(7)}
  expanded = decode.expand_cache(cache, 2, batch_size=2)
  np.testing.assert_array_equal(expanded["k_btd"], [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]])
  assert expanded["index"] == 5 and expanded["table"].shape == (7,)
  gathered = decode.gather_cache(expanded, jnp.array([3, 0, 0, 1]), batch_size=4)
  np.testing.assert_array_equal(gathered["k_btd"][:, 0], [3, 0, 0, 0])
  assert gathered["index"] == 5


def test_negative_length_penalty_is_rejected():
  with pytest.raises(ValueError, match="length_penalty"):
    start = decode.Prefilled(jnp.zeros((1, 5)), (), jnp.ones((1,), jnp.int32))
    decode.beam_search(lambda t, c, p: (None, c), start, max_new_tokens=2, beam_size=2,
                       eos_id=EOS, length_penalty=-1.0)


def test_batch_major_cache_round_trips_a_scanned_cache():
  """A scanned stack's flax cache ([depth, B, ...] keys and values) becomes batch-major
  ([B, depth, ...]) so beam search can gather rows, and comes back intact."""
  depth, batch, length, width = 3, 2, 5, 8
  stack = Transformer(depth, BlockConfig(num_heads=2, mlp_dim=16, decode=True), scan=True)
  x = jnp.zeros((batch, length, width))
  layer_major = jax.eval_shape(stack.init, jax.random.key(0), x,
                               positions_bt=jnp.arange(length)[None])["cache"]
  rng = np.random.default_rng(0)
  layer_major = jax.tree.map(lambda s: jnp.asarray(rng.integers(0, 9, s.shape), s.dtype),
                             layer_major)
  attention = layer_major["layers"]["self_attn"]
  batch_major = decode.batch_major_cache(layer_major, scanned=True)
  got = batch_major["layers"]["self_attn"]
  assert got["cached_key"].shape == (batch, depth, length, 2, 4)
  np.testing.assert_array_equal(got["cached_value"][1, 2], attention["cached_value"][2, 1])
  expanded = decode.expand_cache(batch_major, 3, batch_size=batch)
  assert expanded["layers"]["self_attn"]["cached_key"].shape == (3 * batch, depth, length, 2, 4)
  back = decode.layer_major_cache(batch_major, scanned=True)
  assert jax.tree.structure(back) == jax.tree.structure(layer_major)
  for want, have in zip(jax.tree.leaves(layer_major), jax.tree.leaves(back)):
    np.testing.assert_array_equal(have, want)
  # An unscanned cache is batch-major already.
  assert decode.batch_major_cache({"a": 1}, scanned=False) == {"a": 1}
  assert decode.layer_major_cache({"a": 1}, scanned=False) == {"a": 1}


def test_decode_mode_attention_needs_positions():
  stack = Transformer(1, BlockConfig(num_heads=2, mlp_dim=16, decode=True))
  with pytest.raises(ValueError, match="needs positions_bt"):
    stack.init(jax.random.key(0), jnp.zeros((1, 3, 8)))
