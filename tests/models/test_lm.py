"""Decoder LMs (vljax.models.lm): preset parameter counts against the published ones, KV-cached
greedy decoding against full recomputation, grouped-query attention, rotary embeddings and
RMSNorm against NumPy references, input embeddings and explicit positions, cross-attention
placement, and the transformers state-dict mapping's round trip. Parity with transformers
itself is in test_lm_parity.py (it needs torch)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax import decode
from vljax.models import lm
from vljax.nn import MultiHeadAttention, RMSNorm, apply_rotary
from vljax.nn.masks import attention_mask


def count_params(model: lm.LM) -> int:
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


# Published sizes (millions): the model cards / papers (LLaMA Table 2 as released 6.74B; OPT
# Table 1; GPT-2 124M / 774M as released); every count includes embeddings and the head.
PRESETS = [("llama-7b", 6740.0), ("vicuna-7b", 6740.0), ("vicuna-13b", 13_000.0),
           ("opt-2.7b", 2650.0), ("opt-6.7b", 6660.0), ("gpt2", 124.0), ("gpt2-large", 774.0)]


@pytest.mark.parametrize("variant,published", PRESETS, ids=[p[0] for p in PRESETS])
def test_preset_param_count_matches_published(variant, published):
  count = count_params(lm.LM(variant=variant, scan=True)) / 1e6
  assert abs(count - published) / published < 0.01, f"{variant}: {count:.1f}M vs {published}M"


def test_config_resolves_variant_recipe_and_overrides():
  c = lm.LM(variant="vicuna-7b").config()
  assert (c["recipe"], c["norm"], c["positions"], c["act"], c["gated_mlp"]) == (
      "llama", "rms", "rotary", "silu", True)
  assert (c["num_kv_heads"], c["head_dim"], c["norm_eps"], c["tied_head"]) == (32, 128, 1e-5, False)
  c = lm.LM(variant="gpt2", depth=2, tied_head=False).config()
  assert (c["depth"], c["tied_head"], c["position_offset"], c["act"]) == (2, False, 0, "gelu_tanh")
  assert lm.LM(variant="mu", recipe="opt", vocab_size=9).config()["position_offset"] == 2
  with pytest.raises(ValueError, match="Unknown LM variant 'llama-9b'"):
    lm.LM(variant="llama-9b").config()
  with pytest.raises(ValueError, match="Unknown LM recipe 'bloom'"):
    lm.LM(variant="mu", recipe="bloom", vocab_size=9).config()
  with pytest.raises(ValueError, match="LM needs 'recipe'"):
    lm.LM(variant="mu").config()
  with pytest.raises(ValueError, match="LM needs 'vocab_size'"):
    lm.LM(variant="mu", recipe="llama").config()
  with pytest.raises(ValueError, match="even head_dim"):
    lm.LM(variant="mu", recipe="llama", vocab_size=9, head_dim=7).config()
  with pytest.raises(ValueError, match="not a multiple of num_kv_heads 3"):
    lm.LM(variant="mu", recipe="llama", vocab_size=9, num_kv_heads=3).config()


def _random_params(model: lm.LM, seed: int, **inputs):
  """Weights drawn with NumPy, scaled so that logits spread over several units (no near-ties
  for argmax to break differently under different summation orders)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                             **inputs))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    normal = rng.standard_normal(leaf.shape).astype(np.float32)
    if name == "scale":
      return 1.0 + 0.1 * normal
    if name == "bias":
      return 0.1 * normal
    if name in ("embedding", "pos_embedding"):
      return 0.5 * normal
    shape = leaf.shape[1:] if any(p.key == "layers" for p in path) else leaf.shape
    # Attention output kernels are [heads, head_dim, width]: their fan-in is heads * head_dim.
    fan_in = np.prod(shape[:-1]) if path[-2].key == "out" else shape[0]
    return normal / np.sqrt(fan_in)
  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes["params"]))


VOCAB = 53
# recipe, extra LM fields. Chosen to break a wrong layout: head_dim * heads != width, fewer
# key/value heads, cross-attention every 2nd layer scanned as groups of 2.
DECODE_CASES = {
    "llama_gqa": ("llama", dict(num_kv_heads=2, head_dim=12)),
    "llama_scanned_cross": ("llama", dict(depth=4, num_kv_heads=1, scan=True,
                                          cross_attention_every=2)),
    "opt_scanned": ("opt", dict(scan=True)),
}  # tests/test_decode.py decodes a GPT-2-recipe LM throughout


def _context(batch: int):
  rng = np.random.default_rng(7)
  context_bsd = jnp.asarray(rng.standard_normal((batch, 5, 24)), jnp.float32)
  valid_bs = np.ones((batch, 5), bool)
  valid_bs[0, -2:] = False
  return context_bsd, jnp.asarray(valid_bs)[:, None, None, :]


def _decoders(model, ctx, batch, prompt_bl, prompt_len_b, new, beams=3):
  """Jitted (cached, recomputed) decoders of (params, stop_ids): each gives (greedy, beam)
  outputs; the cached one also greedy from a prompt fed token by token (None with
  cross-attention)."""
  length = decode.cache_length(prompt_bl.shape[1], new)

  @jax.jit
  def cached(params, stop_ids):
    kw = dict(max_new_tokens=new, eos_id=stop_ids, pad_id=0)
    cache = lm.init_cache(model, params, batch, length, context_bsd=ctx.get("context_bsd"))
    step_fn = lm.decode_step_fn(model, params)
    start = lm.prefill(model, params, cache, prompt_bl, prompt_len_b=prompt_len_b, **ctx)
    fed = None
    if not ctx:
      fed = decode.greedy(step_fn, decode.feed_prompt(step_fn, cache, prompt_bl, prompt_len_b),
                          **kw)
    return (decode.greedy(step_fn, start, **kw),
            decode.beam_search(step_fn, start, beam_size=beams, **kw), fed)

  @jax.jit
  def recomputed(params, stop_ids):
    kw = dict(max_new_tokens=new, eos_id=stop_ids, pad_id=0)

    def logits_fn(tokens_bt):  # beams are example-major copies: repeat each example's context
      rows = {k: jnp.repeat(v, tokens_bt.shape[0] // batch, axis=0) for k, v in ctx.items()}
      return model.apply({"params": params}, tokens_bt, **rows)["logits"]

    step_fn = decode.recompute_step_fn(logits_fn)
    start = decode.feed_prompt(step_fn, decode.recompute_cache(batch, length), prompt_bl,
                               prompt_len_b)
    return (decode.greedy(step_fn, start, **kw),
            decode.beam_search(step_fn, start, beam_size=beams, **kw))

  return cached, recomputed


@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_cached_decoding_equals_recomputation(case):
  """A parallel prefill of ragged prompts, then KV-cached greedy and beam decoding with a set of
  stop ids, gives the tokens of recomputing the whole prefix at every step; feeding the prompt
  token by token instead of prefilling gives them too."""
  recipe, fields = DECODE_CASES[case]
  model = lm.LM(variant="mu", recipe=recipe, vocab_size=VOCAB, **fields)
  batch, new = 3, 8
  ctx = {}
  if model.cross_attention_every:
    context_bsd, context_mask = _context(batch)
    ctx = dict(context_bsd=context_bsd, context_mask=context_mask)
  params = _random_params(model, 0, **{k: v[:1] for k, v in ctx.items()})
  rng = np.random.default_rng(1)
  prompt_bl = jnp.asarray(rng.integers(3, VOCAB, size=(batch, 4)), jnp.int32)
  prompt_len_b = jnp.array([4, 1, 2], jnp.int32)
  cached, recomputed = _decoders(model, ctx, batch, prompt_bl, prompt_len_b, new)
  # Stop ids that occur: tokens the unstopped decoding produces mid-way in rows 0 and 1.
  free = recomputed(params, jnp.array([-1, -1]))[0]
  stop_ids = jnp.array([free.tokens_bn[0, 3], free.tokens_bn[1, 5]], jnp.int32)
  (greedy, beam, fed), (ref_greedy, ref_beam) = cached(params, stop_ids), recomputed(params,
                                                                                    stop_ids)
  assert np.all(np.asarray(ref_greedy.lengths_b)[:2] < new)  # the stop ids ended rows 0 and 1
  for out, ref in [(greedy, ref_greedy), (beam, ref_beam)] + [(fed, ref_greedy)] * (fed is not None):
    np.testing.assert_array_equal(out.tokens_bn if hasattr(out, "tokens_bn") else out.tokens_bkn,
                                  ref.tokens_bn if hasattr(ref, "tokens_bn") else ref.tokens_bkn)
    lengths = (out.lengths_b, ref.lengths_b) if hasattr(out, "lengths_b") else (
        out.lengths_bk, ref.lengths_bk)
    np.testing.assert_array_equal(*lengths)
  np.testing.assert_allclose(greedy.log_probs_b, ref_greedy.log_probs_b, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(beam.scores_bk, ref_beam.scores_bk, rtol=1e-4, atol=1e-4)
  assert len(set(np.asarray(greedy.tokens_bn).ravel())) > 3  # a real continuation


def test_prefill_from_embeddings_equals_recomputation():
  """A visual prefix spliced into the input embeddings (6 image vectors, then ragged text) is
  prefilled in one pass; greedy and sampled continuations equal those of rerunning the full
  forward on the embeddings of the whole prefix at every step (beams: the test above)."""
  model = lm.LM(variant="mu", recipe="llama", vocab_size=VOCAB, num_kv_heads=2, head_dim=12)
  params = _random_params(model, 8)
  rng = np.random.default_rng(3)
  batch, text_len, new = 3, 5, 7
  image_bpd = jnp.asarray(rng.standard_normal((batch, 6, 32)), jnp.float32)
  text_bt = jnp.asarray(rng.integers(3, VOCAB, size=(batch, text_len)), jnp.int32)
  text_len_b = np.array([5, 2, 3])
  prompt_len_b = jnp.asarray(6 + text_len_b, jnp.int32)

  def embed(tokens):
    return model.apply({"params": params}, tokens, method=lm.LM.embed)

  embeds_bpd = jnp.concatenate([image_bpd, embed(text_bt)], axis=1)
  kw = dict(max_new_tokens=new, eos_id=(1, 2))
  greedy = lm.generate(model, params, embeds_bld=embeds_bpd, prompt_len_b=prompt_len_b, **kw)
  sampling = dict(rng=jax.random.key(4), temperature=0.8, top_k=10, top_p=0.9)
  sampled = lm.generate(model, params, embeds_bld=embeds_bpd, prompt_len_b=prompt_len_b,
                        **sampling, **kw)

  # Reference: a step function over a buffer of embeddings, rerunning the full forward.
  forward = jax.jit(lambda x_btd: model.apply({"params": params}, embeds_btd=x_btd)["logits"])

  def step_fn(tokens_b, buffer_btd, positions_b):
    rows_b = jnp.arange(tokens_b.shape[0])
    buffer_btd = buffer_btd.at[rows_b, positions_b].set(embed(tokens_b))
    return forward(buffer_btd)[rows_b, positions_b], buffer_btd

  buffer_btd = jnp.zeros((batch, embeds_bpd.shape[1] + new, 32)).at[:, :embeds_bpd.shape[1]].set(
      embeds_bpd)
  first_bv = decode.last_prompt_logits(forward(buffer_btd), prompt_len_b)
  start = decode.Prefilled(first_bv, buffer_btd, prompt_len_b)
  np.testing.assert_array_equal(greedy, decode.greedy(step_fn, start, **kw).tokens_bn)
  np.testing.assert_array_equal(
      sampled, decode.sample(step_fn, start, **sampling, **kw).tokens_bn)
  assert not np.array_equal(sampled, greedy)


def test_grouped_query_attention_equals_repeated_key_value_heads():
  """Query head h reads key/value head h // (H / G) (transformers' repeat_kv): G = 2 shared
  heads equal H = 4 heads whose key/value kernels repeat each shared one twice."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  positions_bt = jnp.array([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
  grouped = MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=6, rope_base=100.0)
  full = MultiHeadAttention(num_heads=4, head_dim=6, rope_base=100.0)
  mask = attention_mask(jnp.ones((2, 5), jnp.int32))
  params = _perturb(grouped.init(jax.random.key(1), x, None, mask)["params"])
  assert params["key"]["kernel"].shape == (16, 2, 6)
  assert params["query"]["kernel"].shape == (16, 4, 6)
  repeated = dict(params)
  for name in ("key", "value"):
    repeated[name] = {k: np.repeat(v, 2, axis=1 if k == "kernel" else 0)
                      for k, v in params[name].items()}
  out = grouped.apply({"params": params}, x, None, mask, positions_bt=positions_bt)
  ref = full.apply({"params": repeated}, x, None, mask, positions_bt=positions_bt)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def _perturb(params):
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda a: np.asarray(a) + 0.3 * rng.standard_normal(a.shape).astype(np.float32),
      nn.meta.unbox(params))


def test_rotary_embedding_matches_rotate_half_reference():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 2, 8))
  positions = np.array([[0, 5, 17], [2, 3, 400]])
  base = 500.0
  inv_freq = base ** (-np.arange(0, 8, 2) / 8)
  angles = positions[..., None, None] * np.concatenate([inv_freq, inv_freq])
  rotate_half = np.concatenate([-x[..., 4:], x[..., :4]], axis=-1)
  ref = x * np.cos(angles) + rotate_half * np.sin(angles)
  out = apply_rotary(jnp.asarray(x, jnp.float32), jnp.asarray(positions), base)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
  # q.k after rotation depends on positions only through their difference.
  q, k = jnp.asarray(x[:1, :1], jnp.float32), jnp.asarray(x[1:, :1], jnp.float32)
  score = lambda i, j: jnp.sum(apply_rotary(q, jnp.array([[i]]), base) *
                               apply_rotary(k, jnp.array([[j]]), base))
  np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-4)
  assert not np.isclose(score(7, 3), score(7, 4), rtol=1e-3)


def test_rms_norm_rounds_as_transformers():
  """float32 mean square and normalisation, cast to the input dtype, then the scale."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 16)) * 3
  scale = 1 + 0.1 * rng.standard_normal(16)
  norm = RMSNorm(1e-5)
  out = norm.apply({"params": {"scale": scale.astype(np.float32)}}, jnp.asarray(x, jnp.float32))
  ref = scale * x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  x16 = jnp.asarray(x, jnp.bfloat16)
  norm16 = RMSNorm(1e-5, dtype=jnp.bfloat16)
  out16 = norm16.apply({"params": {"scale": scale.astype(np.float32)}}, x16)
  x32 = x16.astype(jnp.float32)
  normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 ** 2, -1, keepdims=True) + 1e-5)).astype(jnp.bfloat16)
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out16, jnp.asarray(scale, jnp.bfloat16) * normed)


@pytest.mark.parametrize("recipe", ["llama", "opt"])
def test_embeddings_input_and_left_padding_with_positions(recipe):
  """Input embeddings give the token path's outputs; a left-padded row with positions
  cumsum(valid) - 1 and a padding mask gives the unpadded row's logits."""
  model = lm.LM(variant="mu", recipe=recipe, vocab_size=VOCAB, num_kv_heads=2)
  params = _random_params(model, 3)
  variables = {"params": params}
  tokens_bt = jnp.asarray(np.random.default_rng(2).integers(2, VOCAB, size=(2, 6)), jnp.int32)
  out = jax.jit(model.apply)(variables, tokens_bt)
  assert out["logits"].shape == (2, 6, VOCAB) and out["hidden"].shape == (2, 6, 32)
  embeds_btd = model.apply(variables, tokens_bt, method=lm.LM.embed)
  from_embeds = model.apply(variables, embeds_btd=embeds_btd)
  np.testing.assert_allclose(from_embeds["logits"], out["logits"], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="exactly one of tokens_bt and embeds_btd"):
    model.apply(variables, tokens_bt, embeds_btd=embeds_btd)

  padded_bt = jnp.concatenate([jnp.zeros((2, 3), jnp.int32), tokens_bt], axis=1)
  valid_bt = padded_bt != 0
  positions_bt = jnp.maximum(jnp.cumsum(valid_bt, axis=1) - 1, 0)
  mask = attention_mask(jnp.ones_like(padded_bt), valid_bt)
  padded = model.apply(variables, padded_bt, mask=mask, positions_bt=positions_bt)
  np.testing.assert_allclose(padded["logits"][:, 3:], out["logits"], rtol=1e-4, atol=1e-4)
  # Without the positions the rows are shifted by 3: rotary attention only sees relative
  # positions, learned positions change.
  shifted = model.apply(variables, padded_bt, mask=mask)["logits"][:, 3:]
  assert np.allclose(shifted, out["logits"], atol=1e-4) == (recipe == "llama")


def test_cross_attention_every_second_layer_scanned_equals_unrolled():
  fields = dict(variant="mu", recipe="gpt2", vocab_size=VOCAB, depth=4, cross_attention_every=2)
  unrolled, scanned = lm.LM(**fields), lm.LM(**fields, scan=True)
  context_bsd, context_mask = _context(2)
  ctx = dict(context_bsd=context_bsd, context_mask=context_mask)
  params = _random_params(unrolled, 4, **{k: v[:1] for k, v in ctx.items()})
  layers = params["decoder"]
  assert ["cross_attn" in layers[f"layer_{i}"] for i in range(4)] == [False, True, False, True]
  assert layers["layer_1"]["cross_attn"]["key"]["kernel"].shape == (24, 4, 8)
  stacked = {**params, "decoder": {
      "final_norm": layers["final_norm"],
      "layers": {f"block_{j}": jax.tree.map(lambda *x: np.stack(x), layers[f"layer_{j}"],
                                            layers[f"layer_{j + 2}"]) for j in range(2)}}}
  tokens_bt = jnp.asarray(np.random.default_rng(5).integers(2, VOCAB, size=(2, 6)), jnp.int32)
  out = unrolled.apply({"params": params}, tokens_bt, **ctx)["logits"]
  np.testing.assert_allclose(scanned.apply({"params": stacked}, tokens_bt, **ctx)["logits"], out,
                             rtol=1e-5, atol=1e-5)
  other = unrolled.apply({"params": params}, tokens_bt, context_bsd=context_bsd + 1.0,
                         context_mask=context_mask)["logits"]
  assert not np.allclose(other, out, atol=1e-3)  # the context is read
  with pytest.raises(ValueError, match="cross-attention but no context"):
    unrolled.apply({"params": params}, tokens_bt)
  with pytest.raises(ValueError, match="without cross-attention"):
    lm.LM(variant="mu", recipe="gpt2", vocab_size=VOCAB).init(jax.random.key(0), tokens_bt,
                                                              context_bsd=context_bsd)


HF_CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=10,
                  max_position_embeddings=64, rms_norm_eps=1e-5, hidden_act="silu",
                  rope_theta=1000.0, tie_word_embeddings=False),
    "opt": dict(model_type="opt", vocab_size=VOCAB, hidden_size=32, ffn_dim=48,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                word_embed_proj_dim=32, do_layer_norm_before=True, activation_function="relu"),
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=32, n_inner=48, n_layer=2,
                 n_head=2, n_positions=64, layer_norm_epsilon=1e-5,
                 activation_function="gelu_new"),
}


@pytest.mark.parametrize("recipe", sorted(HF_CONFIGS))
def test_hf_state_dict_round_trip(recipe):
  """to_hf_state_dict and from_hf_state_dict are inverse (scanned too); unknown keys, missing
  keys and wrong shapes are named; GPT-2 keys without the "transformer." prefix and its
  causal-mask buffers import."""
  hf_config = HF_CONFIGS[recipe]
  model = lm.LM(**lm.config_from_hf(recipe, hf_config))
  params = _random_params(model, 6)
  state = lm.to_hf_state_dict(recipe, params, hf_config)
  assert "lm_head.weight" in state
  back = lm.from_hf_state_dict(recipe, state, hf_config)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  scanned = lm.from_hf_state_dict(recipe, state, hf_config, scan=True)
  assert jax.tree.structure(scanned) == jax.tree.structure(nn.meta.unbox(jax.eval_shape(
      lambda: lm.LM(**lm.config_from_hf(recipe, hf_config), scan=True).init(
          jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]))
  again = lm.to_hf_state_dict(recipe, scanned, hf_config)
  assert sorted(again) == sorted(state)
  for key in state:
    np.testing.assert_array_equal(again[key], state[key], err_msg=key)

  some_key = sorted(k for k in state if "layers.1" in k or "h.1" in k)[0]
  with pytest.raises(ValueError, match="lacks"):
    lm.from_hf_state_dict(recipe, {k: v for k, v in state.items() if k != some_key}, hf_config)
  with pytest.raises(ValueError, match="expected"):
    lm.from_hf_state_dict(recipe, {**state, some_key: state[some_key][..., :-1]}, hf_config)
  with pytest.raises(ValueError, match="no place"):
    lm.from_hf_state_dict(recipe, {**state, "model.extra.weight": np.zeros(3)}, hf_config)
  if recipe == "gpt2":
    bare = {k.removeprefix("transformer."): v for k, v in state.items()}
    bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), bool))
    jax.tree.map(np.testing.assert_array_equal, lm.from_hf_state_dict(recipe, bare, hf_config),
                 params)
  else:
    assert model.config()["tied_head"] == (recipe == "opt")


def test_unsupported_hf_layouts_are_refused():
  opt_350m = dict(HF_CONFIGS["opt"], word_embed_proj_dim=16, do_layer_norm_before=False)
  with pytest.raises(NotImplementedError, match="OPT-350m"):
    lm.config_from_hf("opt", opt_350m)
  llama31 = dict(HF_CONFIGS["llama"], rope_scaling={"rope_type": "llama3", "factor": 8.0})
  with pytest.raises(NotImplementedError, match="rope type 'llama3'"):
    lm.config_from_hf("llama", llama31)
  with pytest.raises(ValueError, match="does not describe recipe 'llama'"):
    lm.config_from_hf("llama", HF_CONFIGS["gpt2"])
