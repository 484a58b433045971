"""T5 against transformers' T5ForConditionalGeneration: small random models (gated-GELU v1.1
with an untied head; original T5 with ReLU and a tied, rescaled head) imported with
`from_hf_state_dict` give the same float32 logits and the same greedy generations; export is
the inverse of import and transformers loads it strictly. The relative position buckets
saturate on the test lengths (max_distance < sequence lengths), and the encoder input is padded."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vljax.models import t5 as t5_lib  # pylint: disable=wrong-import-position
from vljax.nn import relative_position_buckets  # pylint: disable=wrong-import-position

VOCAB = 48
SOURCE_LEN, TARGET_LEN = 19, 15
V11 = dict(vocab_size=VOCAB, d_model=24, d_kv=10, d_ff=40, num_heads=3, num_layers=2,
           num_decoder_layers=3, relative_attention_num_buckets=8,
           relative_attention_max_distance=12, feed_forward_proj="gated-gelu",
           tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0)
ORIGINAL = dict(V11, feed_forward_proj="relu", num_decoder_layers=2, tie_word_embeddings=True)


def _hf_model(config_kwargs: dict, seed: int = 0):
  """A random transformers T5 in eval mode: norm weights and, for v1.1, an lm_head of their
  own (transformers 5 ties every freshly built T5 to its embedding)."""
  torch.manual_seed(seed)
  config = transformers.T5Config(**config_kwargs)
  model = transformers.T5ForConditionalGeneration(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("layer_norm.weight"):
        param.copy_(1.0 + 0.2 * torch.randn_like(param))
    if not config_kwargs["tie_word_embeddings"]:
      model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.3)
  return model, config


def _state_dict(model) -> dict[str, np.ndarray]:
  return {key: value.detach().numpy() for key, value in model.state_dict().items()}


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, VOCAB, size=(3, SOURCE_LEN))
  mask = np.ones((3, SOURCE_LEN), bool)
  mask[1, 12:] = False  # padded encoder inputs
  mask[2, 5:] = False
  tokens = np.where(mask, tokens, 0)
  decoder_tokens = rng.integers(2, VOCAB, size=(3, TARGET_LEN))
  decoder_tokens[:, 0] = 0  # decoder_start_id
  return tokens, mask, decoder_tokens


def _hf_logits(model, tokens, mask, decoder_tokens, inputs_embeds=None) -> np.ndarray:
  with torch.no_grad():
    kw = (dict(inputs_embeds=torch.tensor(inputs_embeds)) if inputs_embeds is not None
          else dict(input_ids=torch.tensor(tokens)))
    out = model(attention_mask=torch.tensor(mask.astype(np.int64)),
                decoder_input_ids=torch.tensor(decoder_tokens), **kw)
  return out.logits.numpy()


@functools.lru_cache(maxsize=None)
def _v11():
  model, config = _hf_model(V11)
  return model, config, t5_lib.from_hf_state_dict(_state_dict(model), config)


def test_relative_position_buckets_match_transformers():
  relative = np.arange(-300, 300)
  T5Attention = transformers.models.t5.modeling_t5.T5Attention
  for num_buckets, max_distance in ((32, 128), (8, 12), (6, 20), (64, 256)):
    for bidirectional in (True, False):
      want = T5Attention._relative_position_bucket(  # pylint: disable=protected-access
          torch.tensor(relative), bidirectional=bidirectional, num_buckets=num_buckets,
          max_distance=max_distance).numpy()
      got = relative_position_buckets(relative, bidirectional=bidirectional,
                                      num_buckets=num_buckets, max_distance=max_distance)
      np.testing.assert_array_equal(np.asarray(got), want)


def test_v11_logits_match_transformers():
  hf_model, config, params = _v11()
  fields = t5_lib.config_from_hf(config)
  assert fields["gated_mlp"] and fields["act"] == "gelu_tanh" and not fields["tied_head"]
  tokens, mask, decoder_tokens = _inputs()
  want = _hf_logits(hf_model, tokens, mask, decoder_tokens)
  for scan in (False, True):
    model = t5_lib.T5(**fields, scan=scan)
    p = t5_lib.from_hf_state_dict(_state_dict(hf_model), config, scan=scan)
    got = model.apply({"params": p}, tokens, decoder_tokens, encoder_mask_bs=mask)["logits"]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
  del params


def test_v11_greedy_generation_matches_transformers():
  hf_model, config, params = _v11()
  tokens, mask, _ = _inputs(1)
  # transformers 5.24 sizes the default cache by the encoder's depth, which fails for a deeper
  # decoder; caches that grow a layer at a time work for any depth.
  cache = transformers.cache_utils.EncoderDecoderCache(transformers.cache_utils.DynamicCache(),
                                                       transformers.cache_utils.DynamicCache())
  with torch.no_grad():
    hf_out = hf_model.generate(input_ids=torch.tensor(tokens), cache=cache,
                               attention_mask=torch.tensor(mask.astype(np.int64)),
                               do_sample=False, num_beams=1, max_new_tokens=32, min_new_tokens=0,
                               decoder_start_token_id=0, eos_token_id=1, pad_token_id=0).numpy()
  want = np.zeros((3, 32), np.int64)
  want[:, :hf_out.shape[1] - 1] = hf_out[:, 1:]  # drop the start token; pad after EOS
  model = t5_lib.T5(**t5_lib.config_from_hf(config))
  generate = jax.jit(functools.partial(t5_lib.generate, model, max_new_tokens=32,
                                       decoder_start_id=0, eos_id=1, pad_id=0))
  got = np.asarray(generate(params, jnp.asarray(tokens), mask_bs=jnp.asarray(mask)))
  np.testing.assert_array_equal(got, want)
  assert len(np.unique(want)) > 3  # a real sequence, not one repeated token


def test_encoder_embeddings_equal_ids():
  hf_model, config, params = _v11()
  tokens, mask, decoder_tokens = _inputs(2)
  model = t5_lib.T5(**t5_lib.config_from_hf(config))
  embeds = np.asarray(params["token_embedding"]["embedding"])[tokens]
  from_ids = model.apply({"params": params}, tokens, decoder_tokens, encoder_mask_bs=mask)
  from_embeds = model.apply({"params": params}, None, decoder_tokens, encoder_embeds_bsd=embeds,
                            encoder_mask_bs=mask)
  np.testing.assert_allclose(from_embeds["logits"], from_ids["logits"], atol=1e-6, rtol=1e-6)
  want = _hf_logits(hf_model, None, mask, decoder_tokens, inputs_embeds=embeds)
  np.testing.assert_allclose(np.asarray(from_embeds["logits"]), want, atol=1e-4, rtol=1e-4)


def test_export_is_the_inverse_of_import_and_loads_strictly():
  hf_model, config, _ = _v11()
  fields = t5_lib.config_from_hf(config)
  state = _state_dict(hf_model)
  exported = t5_lib.to_hf_state_dict(t5_lib.from_hf_state_dict(state, config, scan=True), config)
  assert sorted(exported) == sorted(state)
  for key, value in state.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  # Fresh vljax weights, exported, load strictly into transformers and give the same logits.
  model = t5_lib.T5(**fields)
  tokens, mask, decoder_tokens = _inputs(3)
  params = jax.jit(model.init)(jax.random.key(4), tokens[:, :4], decoder_tokens[:, :4])
  params = jax.tree.map(np.asarray, nn.meta.unbox(params["params"]))
  fresh, _ = _hf_model(V11, seed=5)
  fresh.load_state_dict({k: torch.tensor(v) for k, v in t5_lib.to_hf_state_dict(
      params, config).items()}, strict=True)
  want = model.apply({"params": params}, tokens, decoder_tokens, encoder_mask_bs=mask)["logits"]
  np.testing.assert_allclose(_hf_logits(fresh, tokens, mask, decoder_tokens), np.asarray(want),
                             atol=1e-4, rtol=1e-4)


def test_original_t5_tied_head_logits_match_transformers():
  hf_model, config = _hf_model(ORIGINAL, seed=6)
  assert hf_model.lm_head.weight is hf_model.shared.weight
  fields = t5_lib.config_from_hf(config)
  assert fields["tied_head"] and fields["act"] == "relu" and not fields["gated_mlp"]
  state = _state_dict(hf_model)
  params = t5_lib.from_hf_state_dict(state, config)
  assert "head" not in params
  tokens, mask, decoder_tokens = _inputs(4)
  got = t5_lib.T5(**fields).apply({"params": params}, tokens, decoder_tokens,
                                  encoder_mask_bs=mask)["logits"]
  np.testing.assert_allclose(np.asarray(got), _hf_logits(hf_model, tokens, mask, decoder_tokens),
                             atol=1e-4, rtol=1e-4)
  exported = t5_lib.to_hf_state_dict(params, config)
  assert sorted(exported) == sorted(state)
  np.testing.assert_array_equal(exported["lm_head.weight"], state["shared.weight"])
