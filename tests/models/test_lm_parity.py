"""Parity with transformers: small random-weight LlamaForCausalLM (grouped- and multi-query
attention, head_dim * heads != width, untied and tied heads), OPTForCausalLM and GPT2LMHeadModel,
imported with `vljax.models.lm.from_hf_state_dict`, give the same float32 logits on right-padded
batches and the same 32 greedy tokens as `generate`; the state-dict mapping round-trips, and its
export loads into transformers. The sizes are chosen to break a wrong mapping: no projection is
square and no two of vocabulary, width, heads * head_dim and MLP width are equal."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402  (after the skips: without torch nothing here runs)
import jax.numpy as jnp  # noqa: E402

from vljax.models import lm  # noqa: E402
from vljax.nn.masks import attention_mask  # noqa: E402

COMMON = dict(attn_implementation="eager", bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _llama_gqa_untied():
  return transformers.LlamaForCausalLM, transformers.LlamaConfig(
      vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
      rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=False, **COMMON)


def _llama_mqa_tied():
  return transformers.LlamaForCausalLM, transformers.LlamaConfig(
      vocab_size=83, hidden_size=36, intermediate_size=44, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1, head_dim=20, max_position_embeddings=64,
      rms_norm_eps=1e-6, tie_word_embeddings=True, **COMMON)


def _opt():
  return transformers.OPTForCausalLM, transformers.OPTConfig(
      vocab_size=89, hidden_size=48, ffn_dim=80, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=64, word_embed_proj_dim=48, **COMMON)


def _gpt2():
  return transformers.GPT2LMHeadModel, transformers.GPT2Config(
      vocab_size=91, n_embd=48, n_inner=72, n_layer=2, n_head=3, n_positions=64, **COMMON)


CASES = {"llama_gqa_untied": ("llama", _llama_gqa_untied),
         "llama_mqa_tied": ("llama", _llama_mqa_tied), "opt": ("opt", _opt),
         "gpt2": ("gpt2", _gpt2)}


def _randomise(model, seed: int) -> None:
  """Weights far from transformers' init (std 0.02), so that logits spread over several units
  and norms and biases matter. Layers get twice the unit-variance scale and embeddings a small
  one: else a tied head mostly predicts the token it reads and greedy decoding repeats it."""
  generator = torch.Generator().manual_seed(seed)
  conv1d = isinstance(model, transformers.GPT2LMHeadModel)  # Conv1D weights are [in, out]
  with torch.no_grad():
    for name, param in model.named_parameters():
      normal = torch.randn(param.shape, generator=generator)
      if param.ndim == 1:
        is_norm_weight = name.endswith("weight")  # 1-D weights are the norms'
        param.copy_((1.0 if is_norm_weight else 0.0) + 0.1 * normal)
      elif any(part in name for part in ("embed", "wte", "wpe")):
        param.copy_(0.2 * normal)
      else:
        param.copy_(2.0 * normal / (param.shape[0] if conv1d else param.shape[1]) ** 0.5)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
  recipe, make = CASES[request.param]
  model_cls, hf_config = make()
  torch.manual_seed(0)
  hf_model = model_cls(hf_config).eval()
  _randomise(hf_model, seed=1)
  state = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
  params = lm.from_hf_state_dict(recipe, state, hf_config)
  model = lm.LM(**lm.config_from_hf(recipe, hf_config))
  return dict(name=request.param, recipe=recipe, model_cls=model_cls, hf_config=hf_config,
              hf_model=hf_model, state=state, model=model, params=params)


def _hf_logits(hf_model, tokens_bt, valid_bt):
  with torch.no_grad():
    return hf_model(input_ids=torch.from_numpy(tokens_bt.astype(np.int64)),
                    attention_mask=torch.from_numpy(valid_bt.astype(np.int64))).logits.numpy()


def test_logits_match_on_right_padded_batch(case):
  config = case["hf_config"]
  rng = np.random.default_rng(2)
  tokens_bt = rng.integers(3, config.vocab_size, size=(3, 12)).astype(np.int32)
  valid_bt = np.arange(12)[None, :] < np.array([12, 7, 3])[:, None]
  tokens_bt[~valid_bt] = 0
  ref = _hf_logits(case["hf_model"], tokens_bt, valid_bt)
  mask = attention_mask(jnp.ones(tokens_bt.shape, jnp.int32), jnp.asarray(valid_bt))
  positions_bt = None
  if case["recipe"] == "opt":  # OPT numbers positions by the attention mask (pads: -1)
    positions_bt = np.cumsum(valid_bt, axis=1) * valid_bt - 1
  out = jax.jit(case["model"].apply)({"params": case["params"]}, jnp.asarray(tokens_bt), mask=mask,
                                     positions_bt=positions_bt)
  assert out["logits"].shape == ref.shape
  assert np.abs(ref).max() > 3.0  # logits spread: the comparison is not of near-zeros
  np.testing.assert_allclose(np.asarray(out["logits"]), ref, rtol=1e-5, atol=1e-4)


def test_greedy_generation_matches_generate(case):
  """32 greedy tokens after prompts of 5 and 3 tokens: vljax decodes both in one ragged batch
  with its KV cache, transformers each prompt alone."""
  prompts = [[1, 17, 42, 8, 30], [1, 55, 9]]
  expected = []
  for prompt in prompts:
    with torch.no_grad():
      out = case["hf_model"].generate(
          torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
          max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected.append(out[0, len(prompt):].numpy())
  prompt_bl = np.zeros((2, 5), np.int32)
  for row, prompt in enumerate(prompts):
    prompt_bl[row, :len(prompt)] = prompt
  model = case["model"]
  generate = jax.jit(lambda params, prompt_bl, prompt_len_b: lm.generate(
      model, params, prompt_bl, prompt_len_b=prompt_len_b, max_new_tokens=32, eos_id=-1))
  tokens_bn = np.asarray(generate(case["params"], prompt_bl, np.array([5, 3], np.int32)))
  np.testing.assert_array_equal(tokens_bn, np.stack(expected))
  assert len(set(tokens_bn.ravel())) > 8  # not a degenerate repetition


def test_state_dict_round_trip_and_export(case):
  recipe, config, state = case["recipe"], case["hf_config"], case["state"]
  exported = lm.to_hf_state_dict(recipe, case["params"], config)
  assert sorted(exported) == sorted(state)
  for key, value in state.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  again = lm.from_hf_state_dict(recipe, exported, config)
  assert jax.tree.structure(again) == jax.tree.structure(case["params"])
  jax.tree.map(np.testing.assert_array_equal, again, case["params"])
  # The export loads into a fresh transformers model (strictly) and gives its logits.
  fresh = case["model_cls"](config).eval()
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  tokens_bt = np.arange(3, 11, dtype=np.int32)[None]
  valid_bt = np.ones_like(tokens_bt, bool)
  np.testing.assert_array_equal(_hf_logits(fresh, tokens_bt, valid_bt),
                                _hf_logits(case["hf_model"], tokens_bt, valid_bt))
