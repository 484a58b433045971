"""T5 without transformers: preset sizes, the relative position bias, masks (encoder padding,
causal decoder), KV-cached generation against full recomputation, scanned layers, the tied
head's rescaling, and the checkpoint mapping's errors. Parity with transformers is in
test_t5_parity.py."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax import decode
from vljax.models import t5 as t5_lib
from vljax.nn import RelativePositionBias, dot_product_attention, relative_position_buckets

VOCAB = 40
MODEL = t5_lib.T5(variant="mu", vocab_size=VOCAB)


def _batch(seed: int = 0, source_len: int = 20, target_len: int = 9):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, VOCAB, size=(2, source_len))
  mask = np.ones((2, source_len), bool)
  mask[1, 13:] = False
  decoder_tokens = rng.integers(2, VOCAB, size=(2, target_len))
  decoder_tokens[:, 0] = 0
  return tokens, mask, decoder_tokens


@functools.lru_cache(maxsize=None)
def _params():
  tokens, _, decoder_tokens = _batch()
  params = jax.jit(MODEL.init)(jax.random.key(0), tokens, decoder_tokens)["params"]
  return jax.tree.map(np.asarray, nn.meta.unbox(params))


def _num_params(variant: str) -> int:
  model = t5_lib.T5(variant=variant, scan=True)
  tokens = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens, tokens)["params"]
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes)))


@pytest.mark.parametrize("variant,released", [("flan-t5-xl", 2.85e9), ("flan-t5-base", 247.6e6),
                                              ("flan-t5-small", 77.0e6)])
def test_presets_have_the_released_parameter_counts(variant, released):
  assert abs(_num_params(variant) / released - 1) < 0.01


def test_presets_and_fields():
  c = t5_lib.T5(variant="flan-t5-xl").config()
  assert (c["width"], c["mlp_dim"], c["head_dim"], c["num_heads"], c["depth_encoder"],
          c["depth_decoder"], c["vocab_size"]) == (2048, 5120, 64, 32, 24, 24, 32_128)
  assert (c["act"], c["gated_mlp"], c["tied_head"], c["num_buckets"], c["max_distance"],
          c["norm_eps"]) == ("gelu_tanh", True, False, 32, 128, 1e-6)
  original = t5_lib.T5(variant="t5-small").config()
  assert (original["act"], original["gated_mlp"], original["tied_head"]) == ("relu", False, True)
  assert t5_lib.T5(variant="flan-t5-small", depth_decoder=3).config()["depth_decoder"] == 3
  with pytest.raises(ValueError, match="Unknown T5 variant"):
    t5_lib.T5(variant="t5-huge").config()
  with pytest.raises(ValueError, match="needs 'mlp_dim'"):
    t5_lib.T5(vocab_size=8, width=8, depth_encoder=1, depth_decoder=1, num_heads=2).config()


def test_parameter_tree_one_bias_table_per_stack_and_no_biases():
  params = _params()
  assert set(params) == {"token_embedding", "encoder", "decoder", "head"}
  assert set(params["encoder"]) == {"relative_bias", "layer_0", "layer_1", "final_norm"}
  assert params["encoder"]["relative_bias"]["embedding"].shape == (8, 4)
  assert set(params["decoder"]["layer_0"]) == {"self_attn_norm", "self_attn", "cross_attn_norm",
                                               "cross_attn", "mlp_norm", "mlp"}
  assert set(params["decoder"]["layer_0"]["mlp"]) == {"gate", "up", "down"}
  assert params["decoder"]["layer_0"]["cross_attn"]["query"]["kernel"].shape == (32, 4, 6)
  paths = ["/".join(p.key for p in path) for path, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  assert not [p for p in paths if p.endswith("bias") and "relative_bias" not in p]
  assert sum("relative_bias" in p for p in paths) == 2
  # Every weight has logical axis names.
  boxed = jax.eval_shape(MODEL.init, jax.random.key(0), *_batch()[::2])["params"]
  specs = jax.tree.leaves(nn.get_partition_spec(boxed),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(specs) == len(paths) and all(len(s) for s in specs)


def test_attention_with_bias_and_no_scaling_matches_numpy():
  """T5 attention: softmax(q k^T + bias) v (no 1 / sqrt(d)), masked keys excluded."""
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, n, 3, 5)).astype(np.float32) for n in (4, 6, 6))
  bias = rng.normal(size=(1, 3, 4, 6)).astype(np.float32)
  valid = np.ones((2, 6), bool)
  valid[1, 4:] = False
  got = dot_product_attention(q, k, v, jnp.asarray(valid)[:, None, None, :], bias=bias,
                              scale_logits=False)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k).astype(np.float64) + bias
  logits = np.where(valid[:, None, None, :], logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  np.testing.assert_allclose(got, np.einsum("bhqk,bkhd->bqhd", weights, v), rtol=1e-5, atol=1e-6)


def test_relative_position_bias_buckets():
  """Encoder buckets tell apart keys before and after the query; decoder ones do not; distances
  beyond max_distance share the last bucket."""
  bucket = functools.partial(relative_position_buckets, num_buckets=8, max_distance=12)
  rel = np.array([-40, -12, -11, -3, -2, -1, 0, 1, 2, 3, 12, 40])
  np.testing.assert_array_equal(bucket(rel, bidirectional=True),
                                [3, 3, 3, 2, 2, 1, 0, 5, 6, 6, 7, 7])
  np.testing.assert_array_equal(bucket(rel, bidirectional=False),
                                [7, 7, 7, 3, 2, 1, 0, 0, 0, 0, 0, 0])
  table = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)
  bias = RelativePositionBias(num_heads=2, num_buckets=8, max_distance=12).apply(
      {"params": {"embedding": table}}, jnp.arange(3), jnp.arange(5))
  assert bias.shape == (1, 2, 3, 5)
  np.testing.assert_array_equal(bias[0, 1], table[bucket(np.arange(5)[None] - np.arange(3)[:, None],
                                                         bidirectional=True), 1])


def test_encoder_padding_and_decoder_causality():
  params = _params()
  tokens, mask, decoder_tokens = _batch()
  apply = jax.jit(lambda t, d: MODEL.apply({"params": params}, t, d, encoder_mask_bs=mask))
  out = apply(tokens, decoder_tokens)
  # Other tokens under the padding change nothing of example 1; real ones change example 0.
  changed = tokens.copy()
  changed[:, 15:] = (changed[:, 15:] + 1) % VOCAB
  out2 = apply(changed, decoder_tokens)
  np.testing.assert_allclose(out2["logits"][1], out["logits"][1], atol=1e-6)
  np.testing.assert_allclose(out2["encoder_out"][1, :13], out["encoder_out"][1, :13], atol=1e-6)
  assert not np.allclose(out2["logits"][0], out["logits"][0], atol=1e-3)
  # A later decoder token changes no earlier logits.
  later = decoder_tokens.copy()
  later[:, 6] = (later[:, 6] + 1) % VOCAB
  out3 = apply(tokens, later)
  np.testing.assert_allclose(out3["logits"][:, :6], out["logits"][:, :6], atol=1e-6)
  assert not np.allclose(out3["logits"][:, 6:], out["logits"][:, 6:], atol=1e-3)


def test_scanned_equals_unrolled_and_tied_head_rescales():
  params = _params()
  tokens, mask, decoder_tokens = _batch()
  want = MODEL.apply({"params": params}, tokens, decoder_tokens, encoder_mask_bs=mask)
  scanned = t5_lib.stack_layers(params, MODEL.config())
  assert scanned["decoder"]["layers"]["cross_attn"]["key"]["kernel"].shape == (2, 32, 4, 6)
  got = MODEL.clone(scan=True).apply({"params": scanned}, tokens, decoder_tokens,
                                     encoder_mask_bs=mask)
  np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-5)
  tied = MODEL.clone(tied_head=True)
  tied_params = {k: v for k, v in params.items() if k != "head"}
  out = tied.apply({"params": tied_params}, tokens, decoder_tokens, encoder_mask_bs=mask)
  embedding = params["token_embedding"]["embedding"]
  np.testing.assert_allclose(out["logits"], out["hidden"] @ embedding.T / np.sqrt(32),
                             rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training():
  params = _params()
  tokens, mask, decoder_tokens = _batch()
  model = MODEL.clone(dropout=0.1)
  run = jax.jit(lambda train, seed: model.apply(
      {"params": params}, tokens, decoder_tokens, encoder_mask_bs=mask, train=train,
      rngs={"dropout": jax.random.key(seed)})["logits"], static_argnums=0)
  np.testing.assert_allclose(run(False, 0), run(False, 1))
  assert not np.allclose(run(True, 0), run(True, 1), atol=1e-3)


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_equals_full_recomputation(scan):
  """The KV cache (cross-attention keys and values projected once by the prefill, steps without
  the encoder output) gives the full forward's logits, and greedy and beam decoding of ragged
  forced prefixes with two stop ids give the tokens of rerunning the decoder on the whole
  prefix every step. 20 steps pass the relative buckets' max_distance."""
  model = MODEL.clone(scan=scan)
  params = t5_lib.stack_layers(_params(), MODEL.config()) if scan else _params()
  tokens, mask, decoder_tokens = _batch(1)
  full = model.apply({"params": params}, tokens, decoder_tokens, encoder_mask_bs=mask)
  encoder_out = full["encoder_out"]
  cache = t5_lib.init_cache(model, params, encoder_out, max_len=24)
  start = t5_lib.prefill(model, params, cache, encoder_out, mask, decoder_tokens[:, :1])
  step_fn = jax.jit(t5_lib.decode_step_fn(model, params))
  steps, cache = [start.logits_bv], start.cache
  for t in range(1, decoder_tokens.shape[1]):
    logits_bv, cache = step_fn(jnp.asarray(decoder_tokens[:, t]), cache, jnp.full((2,), t))
    steps.append(logits_bv)
  np.testing.assert_allclose(np.stack(steps, 1), full["logits"], rtol=1e-5, atol=1e-5)

  num_new = 20
  prefix_bl = jnp.asarray(np.concatenate([np.zeros((2, 1), np.int32), decoder_tokens[:, 1:3]], 1))
  prefix_len_b = jnp.array([3, 1], jnp.int32)

  def logits_fn(decoder_bt):  # beams are example-major copies of each example
    copies = decoder_bt.shape[0] // 2
    return model.apply({"params": params}, decoder_bt, jnp.repeat(encoder_out, copies, axis=0),
                       jnp.repeat(mask, copies, axis=0), method=t5_lib.T5.decode_logits)

  @functools.partial(jax.jit, static_argnums=1)
  def reference(stop_ids, beams):
    step_fn = decode.recompute_step_fn(logits_fn)
    start = decode.feed_prompt(step_fn, decode.recompute_cache(2, num_new + 2), prefix_bl,
                               prefix_len_b)
    kw = dict(max_new_tokens=num_new, eos_id=stop_ids)
    if beams == 1:
      return decode.greedy(step_fn, start, **kw).tokens_bn
    return decode.beam_search(step_fn, start, beam_size=beams, **kw).best().tokens_bn

  free = reference(jnp.array([-1, -1]), 1)
  stop_ids = jnp.array([free[0, 4], free[1, 7]], jnp.int32)
  for beams in (1, 3) if scan else (1,):  # beams once: the cache layout is the scan's concern
    cached = jax.jit(functools.partial(t5_lib.generate, model, max_new_tokens=num_new,
                                       beam_size=beams))(
        params, jnp.asarray(tokens), mask_bs=jnp.asarray(mask), prompt_bl=prefix_bl,
        prompt_len_b=prefix_len_b, eos_id=stop_ids)
    np.testing.assert_array_equal(cached, reference(stop_ids, beams))
    assert len(np.unique(np.asarray(cached))) > 2
    if beams == 1:
      assert np.all(np.asarray(cached)[:, -1] == 0)  # both rows stopped


def test_generate_from_embeddings_and_sampling():
  params = _params()
  tokens, mask, _ = _batch(2)
  embeds = params["token_embedding"]["embedding"][tokens]
  run = jax.jit(functools.partial(t5_lib.generate, MODEL, params, max_new_tokens=6, eos_id=-1),
                static_argnames="top_k")
  from_ids = run(jnp.asarray(tokens), mask_bs=mask)
  np.testing.assert_array_equal(run(embeds_bsd=jnp.asarray(embeds), mask_bs=mask), from_ids)
  # (Temperature 0 equals greedy: tests/test_decode.py.)
  sampled = run(jnp.asarray(tokens), mask_bs=mask, rng=jax.random.key(0), temperature=1.5,
                top_k=5, top_p=0.9)
  assert sampled.shape == from_ids.shape and not np.array_equal(sampled, from_ids)
  # A forced decoder prefix continues after its own tokens (which the output leaves out).
  prefix = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), from_ids[:, :2]], axis=1)
  continued = run(jnp.asarray(tokens), mask_bs=mask, prompt_bl=prefix)
  np.testing.assert_array_equal(continued[:, :4], from_ids[:, 2:])
  # Steps read the cross-attention keys and values from the cache, never the encoder output.
  cache = t5_lib.init_cache(MODEL, params, jnp.zeros((2, 5, 32)), max_len=4)
  for layer in cache["kv"]["decoder"].values():
    layer["cross_attn"] = {}
  with pytest.raises(ValueError, match="cross-attention has no cached context"):
    t5_lib.decode_step_fn(MODEL, params)(jnp.zeros((2,), jnp.int32), cache,
                                         jnp.zeros((2,), jnp.int32))


def test_checkpoint_mapping_round_trip_and_errors():
  hf_config = {"model_type": "t5", "vocab_size": VOCAB, "d_model": 32, "d_kv": 6, "d_ff": 64,
               "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2,
               "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
               "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
  fields = t5_lib.config_from_hf(hf_config)
  assert t5_lib.T5(**fields).config() == MODEL.config()
  params = _params()
  state = t5_lib.to_hf_state_dict(params, hf_config)
  assert state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape == (24, 32)
  assert state["decoder.block.1.layer.2.DenseReluDense.wo.weight"].shape == (32, 64)
  back = t5_lib.from_hf_state_dict(state, hf_config)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # Optional aliases of the embedding; transformers' ignored decoder cross-attention bias.
  trimmed = {k: v for k, v in state.items() if not k.endswith("embed_tokens.weight")}
  trimmed["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = np.zeros(
      (8, 4), np.float32)
  jax.tree.map(np.testing.assert_array_equal, t5_lib.from_hf_state_dict(trimmed, hf_config),
               params)
  broken = dict(state)
  del broken["decoder.block.1.layer.0.SelfAttention.k.weight"]
  broken["encoder.block.7.layer.0.SelfAttention.q.weight"] = np.zeros((24, 32), np.float32)
  broken["lm_head.weight"] = np.zeros((VOCAB + 1, 32), np.float32)
  with pytest.raises(ValueError) as error:
    t5_lib.from_hf_state_dict(broken, hf_config)
  message = str(error.value)
  assert "missing keys (1): ['decoder.block.1.layer.0.SelfAttention.k.weight']" in message
  assert "unused keys (1): ['encoder.block.7.layer.0.SelfAttention.q.weight']" in message
  assert f"lm_head.weight: ({VOCAB + 1}, 32), expected ({VOCAB}, 32)" in message
  with pytest.raises(NotImplementedError, match="umt5"):
    t5_lib.config_from_hf({**hf_config, "model_type": "umt5"})
