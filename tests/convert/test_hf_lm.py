"""vljax.convert.hf_lm: vljax LMs and T5s saved as Hugging Face directories load strictly into
transformers and give vljax's float32 logits; directories transformers writes load into vljax
with its logits; hf_config round-trips through config_from_hf and refuses what transformers
cannot express; sharding, dtype casts, the errors; config.init from a Hugging Face directory;
the export command line."""
import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import torch
import transformers

from vljax.convert import hf, hf_lm
from vljax.models import lm, t5
from vljax.train import initialise

# Sizes that break a wrong mapping: no projection square, heads * head_dim != width.
LM_MODELS = {
    "llama_gqa_untied": dict(recipe="llama", vocab_size=97, width=40, depth=2, num_heads=4,
                             num_kv_heads=2, head_dim=12, mlp_dim=56, max_len=64, norm_eps=1e-5,
                             rope_base=500.0, tied_head=False),
    "opt": dict(recipe="opt", vocab_size=89, width=48, depth=2, num_heads=4, mlp_dim=80,
                max_len=64),
    "gpt2": dict(recipe="gpt2", vocab_size=91, width=48, depth=2, num_heads=3, mlp_dim=72,
                 max_len=64),
}
T5_MODELS = {
    "t5_v11": dict(vocab_size=48, width=24, depth_encoder=2, depth_decoder=3, num_heads=3,
                   head_dim=10, mlp_dim=40, num_buckets=8, max_distance=12),
    "t5_original": dict(vocab_size=48, width=24, depth_encoder=2, depth_decoder=2, num_heads=3,
                        head_dim=10, mlp_dim=40, num_buckets=8, max_distance=12, act="relu",
                        gated_mlp=False, tied_head=True),
}
# Token ids inside the tiny vocabularies (GPT-2's and OPT's defaults are not).
LM_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
HF_CLASSES = {"llama": "LlamaForCausalLM", "opt": "OPTForCausalLM", "gpt2": "GPT2LMHeadModel",
              "t5": "T5ForConditionalGeneration"}


def _module(name: str, scan: bool = False):
  if name in LM_MODELS:
    return lm.LM(**LM_MODELS[name], scan=scan)
  return t5.T5(**T5_MODELS[name], scan=scan)


def _random_params(model, seed: int = 0):
  """Params of `model` (shapes from eval_shape, nothing run) far from the initialisation, so
  that logits spread over several units and norms and biases matter: norm scales 1 + 0.1 N,
  biases 0.1 N, embeddings 0.3 N (T5's, whose tied head rescales, N), kernels with unit
  variance outputs."""
  tokens = jnp.zeros((1, 4), jnp.int32)
  inputs = (tokens, tokens) if isinstance(model, t5.T5) else (tokens,)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs)["params"])
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract))
  rng = np.random.default_rng(seed)
  for path, value in flat.items():
    normal = rng.standard_normal(value.shape).astype(np.float32)
    if path[-1] == "scale":
      flat[path] = 1.0 + 0.1 * normal
    elif path[-1] == "bias":
      flat[path] = 0.1 * normal
    elif path[-1] in ("embedding", "pos_embedding"):
      flat[path] = (1.0 if isinstance(model, t5.T5) else 0.3) * normal
    else:
      fan_in = value.shape[1] if "layers" in path else value.shape[0]
      if path[-2] == "out":  # [(depth,) heads, head_dim, width]
        fan_in *= value.shape[-2]
      flat[path] = normal / np.sqrt(fan_in)
    flat[path] = flat[path].astype(np.float32)
  return flax.traverse_util.unflatten_dict(flat)


def _tokens(vocab: int, shape=(2, 11), seed: int = 3) -> np.ndarray:
  return np.random.default_rng(seed).integers(3, vocab, size=shape).astype(np.int32)


def _vljax_logits(model, params, tokens, decoder_tokens=None) -> np.ndarray:
  args = (tokens,) if decoder_tokens is None else (tokens, decoder_tokens)
  apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a)["logits"])
  return np.asarray(apply(params, *map(jnp.asarray, args)))


def _hf_logits(hf_model, tokens, decoder_tokens=None) -> np.ndarray:
  kw = {} if decoder_tokens is None else dict(
      decoder_input_ids=torch.from_numpy(decoder_tokens.astype(np.int64)))
  with torch.no_grad():
    return hf_model(input_ids=torch.from_numpy(tokens.astype(np.int64)), **kw).logits.numpy()


def _decoder_tokens(model):
  if not isinstance(model, t5.T5):
    return None
  tokens = _tokens(model.config()["vocab_size"], (2, 7), seed=4)
  tokens[:, 0] = 0
  return tokens


def _from_pretrained(directory: str):
  """transformers' model of a directory, loaded strictly (no missing / unexpected keys)."""
  config = json.load(open(os.path.join(directory, "config.json")))
  model_cls = getattr(transformers, HF_CLASSES[config["model_type"]])
  model, info = model_cls.from_pretrained(directory, output_loading_info=True,
                                          attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"] and not info["error_msgs"], info
  return model.eval()


@pytest.mark.parametrize("name", sorted(LM_MODELS) + sorted(T5_MODELS))
def test_save_loads_strictly_in_transformers_with_the_same_logits(name, tmp_path):
  scan = name in ("llama_gqa_untied", "t5_v11")  # scanned params are exported too
  model = _module(name, scan=scan)
  params = _random_params(model)
  ids = {} if isinstance(model, t5.T5) else LM_IDS
  written = hf_lm.save(tmp_path / "out", model, params, extra_config=ids)
  assert sorted(os.path.basename(p) for p in written) == ["config.json", "model.safetensors"]
  hf_model = _from_pretrained(str(tmp_path / "out"))
  # transformers reads the sizes and options vljax meant.
  if isinstance(model, t5.T5):
    assert t5.T5(**t5.config_from_hf(hf_model.config)).config() == model.config()
  else:
    recipe = model.config()["recipe"]
    assert lm.LM(**lm.config_from_hf(recipe, hf_model.config)).config() == model.config()
  tokens = _tokens(model.config()["vocab_size"])
  decoder_tokens = _decoder_tokens(model)
  want = _vljax_logits(model, params, tokens, decoder_tokens)
  got = _hf_logits(hf_model, tokens, decoder_tokens)
  assert np.abs(want).max() > 1.0  # not a comparison of near-zeros
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def _hf_random(name: str):
  """A random transformers model with the config of vljax model `name` (through hf_config),
  weights away from transformers' initialisation."""
  config_dict = hf_lm.hf_config(_module(name), **({} if name.startswith("t5") else LM_IDS))
  model_type = config_dict.pop("model_type")
  config_dict.pop("architectures")
  config = transformers.AutoConfig.for_model(model_type, **config_dict)
  torch.manual_seed(0)
  model = getattr(transformers, HF_CLASSES[model_type])(config).eval()
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for key, param in model.named_parameters():
      normal = torch.randn(param.shape, generator=generator)
      if param.ndim == 1:
        param.copy_((1.0 if key.endswith("weight") else 0.0) + 0.1 * normal)
      else:
        param.copy_(normal * 0.5 / min(param.shape) ** 0.5)
    if model_type == "t5" and not config_dict["tie_word_embeddings"]:
      # transformers 5 ties a freshly built T5's head to its embedding.
      model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.3)
  return model


@pytest.mark.parametrize("name", ["llama_gqa_untied", "opt", "gpt2", "t5_v11", "t5_original"])
def test_load_reads_what_transformers_saves(name, tmp_path):
  hf_model = _hf_random(name)
  hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  model, params = hf_lm.load(tmp_path / "hf")
  assert model.config() == _module(name).config()
  state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  if isinstance(model, t5.T5):
    want_params = t5.from_hf_state_dict(state, hf_model.config)
  else:
    want_params = lm.from_hf_state_dict(model.config()["recipe"], state, hf_model.config)
  jax.tree.map(np.testing.assert_array_equal, params, want_params)
  tokens = _tokens(model.config()["vocab_size"])
  decoder_tokens = _decoder_tokens(model)
  want = _hf_logits(hf_model, tokens, decoder_tokens)
  np.testing.assert_allclose(_vljax_logits(model, params, tokens, decoder_tokens), want,
                             rtol=1e-5, atol=1e-4)


def test_sharded_round_trip_scan_and_dtype(tmp_path):
  model = _module("llama_gqa_untied")
  params = _random_params(model)
  written = hf_lm.save(tmp_path / "sharded", model, params, max_shard_bytes=20_000,
                       extra_config=LM_IDS)
  names = sorted(os.path.basename(p) for p in written)
  assert hf.INDEX_NAME in names and len([n for n in names if n.startswith("model-")]) > 2
  loaded_model, loaded = hf_lm.load(tmp_path / "sharded")
  assert loaded_model.config() == model.config()
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  # scan=True: the same params with the layers stacked, and a scanned module.
  scanned_model, scanned = hf_lm.load(tmp_path / "sharded", scan=True)
  assert scanned_model.scan
  jax.tree.map(np.testing.assert_array_equal, scanned, lm.stack_layers(params, 2))
  # transformers reads the shards.
  tokens = _tokens(97)
  np.testing.assert_allclose(_hf_logits(_from_pretrained(str(tmp_path / "sharded")), tokens),
                             _vljax_logits(model, params, tokens), rtol=1e-5, atol=1e-4)
  # bfloat16: every tensor stored as BF16, the config says so, load keeps it (or casts).
  hf_lm.save(tmp_path / "bf16", model, params, dtype="bfloat16")
  config, tensors = hf.read_hf_dir(tmp_path / "bf16")
  assert config["dtype"] == "bfloat16"
  assert {str(v.dtype) for v in tensors.values()} == {"bfloat16"}
  _, bf16 = hf_lm.load(tmp_path / "bf16")
  assert {str(x.dtype) for x in jax.tree.leaves(bf16)} == {"bfloat16"}
  _, f32 = hf_lm.load(tmp_path / "bf16", dtype="float32")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2), f32, params)
  # An existing directory is not overwritten unless asked.
  with pytest.raises(FileExistsError, match="overwrite=True"):
    hf_lm.save(tmp_path / "bf16", model, params)
  hf_lm.save(tmp_path / "bf16", model, params, overwrite=True)


# hf_config -> config_from_hf gives the config back, and transformers' own config class reads it
# the same way.
ROUND_TRIP = {
    "llama_mu": lambda: lm.LM(variant="mu", recipe="llama", vocab_size=50),
    "llama_gqa_untied": lambda: _module("llama_gqa_untied"),
    "llama_tied_gelu_bias": lambda: lm.LM(variant="mu", recipe="llama", vocab_size=50,
                                          num_kv_heads=1, head_dim=10, tied_head=True,
                                          act="gelu_tanh", use_bias=True, max_len=128),
    "opt": lambda: _module("opt"),
    "opt_untied_gelu": lambda: lm.LM(variant="mu", recipe="opt", vocab_size=50, tied_head=False,
                                     act="gelu"),
    "gpt2": lambda: _module("gpt2"),
    "gpt2_eps_untied": lambda: lm.LM(variant="mu", recipe="gpt2", vocab_size=50, norm_eps=1e-6,
                                     tied_head=False, act="relu"),
    "t5_v11": lambda: _module("t5_v11"),
    "t5_original": lambda: _module("t5_original"),
    "t5_gated_silu": lambda: t5.T5(variant="mu", vocab_size=50, act="silu", norm_eps=1e-5),
    "t5_relu_untied": lambda: t5.T5(variant="mu", vocab_size=50, act="relu", gated_mlp=False),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_hf_config_round_trips(name):
  model = ROUND_TRIP[name]()
  config = hf_lm.hf_config(model, bos_token_id=5)
  assert config["bos_token_id"] == 5
  json.dumps(config)  # config.json material
  model_type = config["model_type"]
  kwargs = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
  hf_object = transformers.AutoConfig.for_model(model_type, **kwargs)
  for source in (config, json.loads(json.dumps(config)), hf_object):
    if model_type == "t5":
      assert t5.T5(**t5.config_from_hf(source)).config() == model.config()
    else:
      assert lm.LM(**lm.config_from_hf(model_type, source)).config() == model.config()


@pytest.mark.parametrize("model, message", [
    (lm.LM(variant="mu", recipe="llama", vocab_size=50, cross_attention_every=1),
     r"cross_attention_every=1 \(cross-attention layers\)"),
    (lm.LM(variant="mu", recipe="gpt2", vocab_size=50, gated_mlp=True),
     r"gated_mlp=True, but transformers' gpt2 has gated_mlp=False"),
    (lm.LM(variant="mu", recipe="llama", vocab_size=50, positions="learned"),
     r"positions='learned', but transformers' llama has positions='rotary'"),
    (lm.LM(variant="mu", recipe="opt", vocab_size=50, num_kv_heads=2),
     r"num_kv_heads=2, but transformers' opt has num_kv_heads=4"),
    (lm.LM(variant="mu", recipe="opt", vocab_size=50, norm_eps=1e-6), r"norm_eps=1e-06"),
    (lm.LM(variant="mu", recipe="gpt2", vocab_size=50, use_bias=False), r"use_bias=False"),
    (lm.LM(variant="mu", recipe="llama", vocab_size=50, act="quick_gelu"), r"act='quick_gelu'"),
    (lm.LM(variant="mu", recipe="opt", vocab_size=50, rope_base=500.0),
     r"rope_base=500.0 \(transformers would read None\)"),
    (t5.T5(variant="mu", vocab_size=50, act="gelu"), r"a gated MLP with exact GELU"),
])
def test_hf_config_refuses_what_transformers_cannot_express(model, message):
  with pytest.raises(ValueError, match=r"^transformers cannot express this vljax (LM|T5): "
                     + message):
    hf_lm.hf_config(model)


def test_load_errors_name_the_problem(tmp_path):
  model = _module("gpt2")
  params = _random_params(model)
  good = tmp_path / "good"
  hf_lm.save(good, model, params)
  config, tensors = hf.read_hf_dir(good)

  unsupported = tmp_path / "mistral"
  hf.write_hf_dir(unsupported, dict(config, model_type="mistral"), tensors)
  with pytest.raises(ValueError, match=r"model_type 'mistral' is not supported; supported: "
                     r"llama, opt, gpt2, t5$"):
    hf_lm.load(unsupported)

  pickle_only = tmp_path / "pickle"
  pickle_only.mkdir()
  (pickle_only / "config.json").write_text(json.dumps(config))
  (pickle_only / "pytorch_model.bin").write_bytes(b"not opened")
  with pytest.raises(ValueError, match=r"PyTorch pickle weights \(pytorch_model\.bin\), which "
                     r"vljax never loads.*GPT2LMHeadModel\.from_pretrained"):
    hf_lm.load(pickle_only)

  no_config = tmp_path / "no_config"
  no_config.mkdir()
  os.link(good / "model.safetensors", no_config / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    hf_lm.load(no_config)

  extra = tmp_path / "extra"
  hf.write_hf_dir(extra, config, {**tensors, "transformer.h.9.ln_1.weight": np.ones(48)})
  with pytest.raises(ValueError, match=r"extra: 1 state dict keys have no place in the gpt2 LM: "
                     r"\['transformer\.h\.9\.ln_1\.weight'\]"):
    hf_lm.load(extra)

  missing = tmp_path / "missing"
  hf.write_hf_dir(missing, config, {k: v for k, v in tensors.items() if "ln_f.bias" not in k})
  with pytest.raises(ValueError, match=r"lacks 'transformer\.ln_f\.bias'"):
    hf_lm.load(missing)

  misshapen = tmp_path / "misshapen"
  hf.write_hf_dir(misshapen, dict(config, n_inner=64), tensors)
  with pytest.raises(ValueError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight: shape \(48, 72\), "
                     r"expected \(48, 64\)"):
    hf_lm.load(misshapen)


# --- config.init ----------------------------------------------------------------------------


def _init_config(entries, freeze=""):
  return ml_collections.ConfigDict(dict(init=entries, optim=dict(freeze=freeze)))


def _load_init(entries, params):
  device = jax.local_devices()[0]
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), params)
  frozen = jax.tree.map(lambda _: False, params)
  out = initialise.load_init_params(_init_config(entries), params, shardings, frozen)
  return flax.traverse_util.flatten_dict(jax.device_get(out), sep="/")


@pytest.mark.parametrize("name, scan", [("llama_gqa_untied", False), ("llama_gqa_untied", True),
                                        ("t5_v11", True)])
def test_config_init_from_hf_directory(name, scan, tmp_path):
  """A bridge-like target {"lm": ..., "vision": ...} takes its language model from a Hugging Face
  directory; the stacked layout is used where the target scans its layers."""
  source_model = _module(name)
  source_params = _random_params(source_model, seed=1)
  hf_lm.save(tmp_path / "hf", source_model, source_params)
  target_params = {"lm": jax.tree.map(np.zeros_like, _random_params(_module(name, scan=scan))),
                   "vision": {"kernel": np.ones((3, 4), np.float32)}}
  out = _load_init([dict(checkpoint=str(tmp_path / "hf"), params="(.*)", to=("(.*)", r"lm/\1"))],
                   target_params)
  if scan:
    stacked = (t5.stack_layers(source_params, source_model.config())
               if name.startswith("t5") else lm.stack_layers(source_params, 2))
    want = flax.traverse_util.flatten_dict(stacked, sep="/")
  else:
    want = flax.traverse_util.flatten_dict(source_params, sep="/")
  assert sorted(out) == sorted([f"lm/{k}" for k in want] + ["vision/kernel"])
  for key, value in want.items():
    np.testing.assert_array_equal(out[f"lm/{key}"], value)
  np.testing.assert_array_equal(out["vision/kernel"], np.ones((3, 4)))


def test_config_init_hf_errors_name_the_entry(tmp_path):
  model = _module("gpt2")
  params = _random_params(model)
  hf_lm.save(tmp_path / "hf", model, params)
  target = {"lm": jax.tree.map(np.zeros_like, params)}
  # A part of the source into the target; a regex that selects nothing names the entry.
  out = _load_init([dict(checkpoint=str(tmp_path / "hf"), params="decoder/(.*)",
                         to=("(.*)", r"lm/\1"))], target)
  np.testing.assert_array_equal(out["lm/decoder/final_norm/norm/scale"],
                                params["decoder"]["final_norm"]["norm"]["scale"])
  np.testing.assert_array_equal(out["lm/token_embedding/embedding"], 0.0)
  with pytest.raises(ValueError, match=r"^config\.init\[0\]\.params='vision/\.\*' matches no "
                     r"parameter of '.*hf' \(its parameters: "):
    _load_init([dict(checkpoint=str(tmp_path / "hf"), params="vision/.*", to=None)], target)
  # A smaller target: the shape mismatch names both sides.
  small = {"lm": jax.tree.map(np.zeros_like, _random_params(
      lm.LM(**dict(LM_MODELS["gpt2"], mlp_dim=64))))}
  with pytest.raises(ValueError, match=r"^config\.init\[0\]: decoder/layer_0/mlp/fc1/dense/"
                     r"kernel has shape \(48, 72\) in '.*hf', but lm/decoder/layer_0/mlp/fc1/"
                     r"dense/kernel has shape \(48, 64\) in this model$"):
    _load_init([dict(checkpoint=str(tmp_path / "hf"), params="(decoder/layer_0/mlp/.*)",
                     to=("(.*)", r"lm/\1"))], small)
  pickle_only = tmp_path / "pickle"
  pickle_only.mkdir()
  (pickle_only / "config.json").write_text(json.dumps(hf_lm.hf_config(model)))
  (pickle_only / "pytorch_model.bin").write_bytes(b"not opened")
  with pytest.raises(ValueError, match=r"^config\.init\[0\]\.checkpoint='.*pickle' is not a "
                     r"Hugging Face model vljax reads \(.*PyTorch pickle weights"):
    _load_init([dict(checkpoint=str(pickle_only), params="(.*)", to=("(.*)", r"lm/\1"))],
               target)
  hf.write_hf_dir(tmp_path / "mistral", {"model_type": "mistral"}, {"x": np.ones(2)})
  with pytest.raises(ValueError, match=r"^config\.init\[0\]\.checkpoint=.*model_type 'mistral' "
                     r"is not supported; supported: llama, opt, gpt2, t5\)$"):
    _load_init([dict(checkpoint=str(tmp_path / "mistral"), params="(.*)",
                     to=("(.*)", r"lm/\1"))], target)


# --- The export command line ----------------------------------------------------------------


def test_export_command_line_writes_what_transformers_loads(tmp_path):
  from vljax.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  config_path = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "configs",
                             "lm_tiny.py")
  # A workdir whose checkpoint holds params of lm_tiny's model (built as the family builds it).
  from vljax.data.pipeline import build_tokenizer, data_config  # pylint: disable=import-outside-toplevel
  from vljax.families import get_family  # pylint: disable=import-outside-toplevel
  from vljax.families.base import build_model  # pylint: disable=import-outside-toplevel
  from vljax.train.config import load_config, validate  # pylint: disable=import-outside-toplevel
  config = validate(load_config(config_path))
  config.model.depth = 1  # the override below must reach the model
  tokenizer = build_tokenizer(data_config(config.data))
  model = build_model(get_family(config.family), config, tokenizer)
  params = _random_params(model)
  checkpointer = Checkpointer(str(tmp_path / "work"))
  checkpointer.save(7, {"params": params, "step": np.int32(7)})
  checkpointer.close()
  out = tmp_path / "exported"
  rc = hf_lm.main(["export", f"--config={config_path}", f"--checkpoint={tmp_path / 'work'}",
                   f"--out={out}", "--config.model.depth=1"])
  assert rc == 0
  exported = json.load(open(out / "config.json"))
  assert exported["num_hidden_layers"] == 1
  assert (exported["bos_token_id"], exported["eos_token_id"], exported["pad_token_id"]) == (
      tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
  tokens = _tokens(model.config()["vocab_size"], (2, 9))
  np.testing.assert_allclose(_hf_logits(_from_pretrained(str(out)), tokens),
                             _vljax_logits(model, params, tokens), rtol=1e-5, atol=1e-4)
  # Without the override the checkpoint is another model's: the error says so, no traceback.
  rc = hf_lm.main(["export", f"--config={config_path}", f"--checkpoint={tmp_path / 'work'}",
                   f"--out={tmp_path / 'again'}"])
  assert rc == 1
