r"""Hugging Face language-model directories to and from vljax: `load` reads a transformers
directory (config.json and safetensors, one file or shards) of LLaMA / Vicuna, OPT, GPT-2 or T5
into the vljax module (`vljax.models.lm.LM` or `vljax.models.t5.T5`) and its params; `save`
writes a vljax LM or T5 as a directory that transformers' `from_pretrained` loads, with the
config.json `hf_config` derives from the module.

  model, params = hf_lm.load("/ckpt/vicuna-7b-v1.5")
  hf_lm.save("/tmp/out", model, params, dtype="bfloat16")

Exporting a trained vljax LM from its workdir (the newest readable checkpoint; the config
builds the module, its tokenizer gives the bos / eos / pad ids):

  python -m vljax.convert.hf_lm export --config=lm_tiny.py --checkpoint=workdirs/lm_tiny \
      --out=/tmp/lm_tiny_hf [--dtype=bfloat16] [--overwrite] [--config.model.depth=4 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from vljax.convert import hf
from vljax.models import lm, t5

# config.json's model_type -> the vljax recipe ("t5": the T5 module).
SUPPORTED_MODEL_TYPES = ("llama", "opt", "gpt2", "t5")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "opt": "OPTForCausalLM",
                  "gpt2": "GPT2LMHeadModel", "t5": "T5ForConditionalGeneration"}
# vljax activations -> the transformers names that `config_from_hf` maps back to them.
_HF_ACTIVATIONS = {"silu": "silu", "relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}
_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
           "bfloat16": np.dtype(ml_dtypes.bfloat16)}


# --- Reading ---------------------------------------------------------------------------------


def model_type_of(config: Mapping[str, Any] | None, path: str = "the directory") -> str:
  """The supported model_type of a config.json dict; ValueError naming it otherwise."""
  if config is None:
    raise FileNotFoundError(f"{path} has no config.json next to its weights: the architecture "
                            "and sizes come from it")
  model_type = config.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    what = (f"model_type {model_type!r}" if model_type is not None
            else "a config.json without model_type")
    raise ValueError(f"{path}: {what} is not supported; supported: "
                     f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  return model_type


def from_hf(config: Mapping[str, Any], tensors: Mapping[str, Any], *, scan: bool = False,
            dtype: Any = None) -> tuple[nn.Module, dict]:
  """(module, params) of a config.json dict and a state dict of arrays (what `read_hf_dir`
  returns); `dtype` casts the floating params (default: as stored)."""
  model_type = model_type_of(config)
  if model_type == "t5":
    model = t5.T5(**t5.config_from_hf(config), scan=scan)
    params = t5.from_hf_state_dict(tensors, config, scan=scan)
  else:
    model = lm.LM(**lm.config_from_hf(model_type, config), scan=scan)
    params = lm.from_hf_state_dict(model_type, tensors, config, scan=scan)
  if dtype is not None:
    params = _cast(params, dtype)
  return model, params


def load(path: str | os.PathLike[str], *, scan: bool = False,
         dtype: Any = None) -> tuple[nn.Module, dict]:
  """(module, params) of a Hugging Face model directory: `lm.LM` for model_type llama / opt /
  gpt2, `t5.T5` for t5, built from its config.json (with `scan`), and its params as NumPy
  arrays (scanned layers stacked when `scan`; `dtype` casts the floating ones, default: as
  stored). Unsupported model types, missing files, pickle-only directories, keys the mapping
  does not expect or lacks and shape mismatches raise naming the problem."""
  path = os.fspath(path)
  config_path = os.path.join(path, hf.CONFIG_NAME)
  if os.path.isdir(path) and os.path.isfile(config_path):
    # Refuses an unsupported model before reading gigabytes of its weights.
    with open(config_path, "rb") as f:
      try:
        early = json.load(f)
      except ValueError:
        early = None  # read_hf_dir says what is wrong with it
    if isinstance(early, dict):
      model_type_of(early, path)
  config, tensors = hf.read_hf_dir(path)
  model_type_of(config, path)
  try:
    return from_hf(config, tensors, scan=scan, dtype=dtype)
  except NotImplementedError as e:
    raise NotImplementedError(f"{path}: {e}") from e
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


def scan_params(model: nn.Module, params: Mapping) -> dict:
  """Unscanned params of `model` (an LM or T5) in the scanned layout (layers stacked)."""
  c = model.config()
  if isinstance(model, t5.T5):
    return t5.stack_layers(params, c)
  return lm.stack_layers(params, c["depth"])


# --- Writing ---------------------------------------------------------------------------------


def _refuse(model: nn.Module, reason: str) -> None:
  raise ValueError(f"transformers cannot express this vljax {type(model).__name__}: {reason}")


def _hf_activation(model: nn.Module, act: str) -> str:
  if act not in _HF_ACTIVATIONS:
    _refuse(model, f"act={act!r} has no transformers name that vljax reads back (it exports "
            f"{', '.join(_HF_ACTIVATIONS)})")
  return _HF_ACTIVATIONS[act]


def _require(model: nn.Module, c: Mapping[str, Any], recipe: str, **expected) -> None:
  """Refuses a config whose fields differ from what transformers' `recipe` model hard-codes."""
  for field, value in expected.items():
    if c[field] != value:
      _refuse(model, f"{field}={c[field]!r}, but transformers' {recipe} has {field}={value!r}")


def _lm_hf_config(model: lm.LM) -> dict[str, Any]:
  c = model.config()
  recipe = c["recipe"]
  if model.cross_attention_every:
    _refuse(model, f"cross_attention_every={model.cross_attention_every} (cross-attention "
            "layers) has no place in a transformers causal LM")
  act = _hf_activation(model, c["act"])
  common = dict(vocab_size=c["vocab_size"], tie_word_embeddings=bool(c["tied_head"]))
  if recipe == "llama":
    _require(model, c, recipe, norm="rms", positions="rotary", position_offset=0, gated_mlp=True)
    return dict(
        common, hidden_size=c["width"], intermediate_size=c["mlp_dim"],
        num_hidden_layers=c["depth"], num_attention_heads=c["num_heads"],
        num_key_value_heads=c["num_kv_heads"], head_dim=c["head_dim"],
        max_position_embeddings=c["max_len"], rms_norm_eps=c["norm_eps"], hidden_act=act,
        attention_bias=bool(c["use_bias"]), mlp_bias=bool(c["use_bias"]),
        attention_dropout=0.0,
        # transformers 5 reads rope_parameters, 4.x rope_theta.
        rope_parameters={"rope_type": "default", "rope_theta": float(c["rope_base"])},
        rope_theta=float(c["rope_base"]))
  plain = dict(norm="layer", positions="learned", gated_mlp=False, num_kv_heads=c["num_heads"],
               head_dim=c["width"] // c["num_heads"])
  if recipe == "opt":
    _require(model, c, recipe, **plain, position_offset=2, norm_eps=1e-5)
    return dict(
        common, hidden_size=c["width"], word_embed_proj_dim=c["width"], ffn_dim=c["mlp_dim"],
        num_hidden_layers=c["depth"], num_attention_heads=c["num_heads"],
        max_position_embeddings=c["max_len"], activation_function=act,
        enable_bias=bool(c["use_bias"]), do_layer_norm_before=True,
        layer_norm_elementwise_affine=True, _remove_final_layer_norm=False,
        dropout=float(model.dropout), attention_dropout=0.0, layerdrop=0.0)
  _require(model, c, recipe, **plain, position_offset=0, use_bias=True)
  return dict(
      common, n_embd=c["width"], n_inner=c["mlp_dim"], n_layer=c["depth"], n_head=c["num_heads"],
      n_positions=c["max_len"], layer_norm_epsilon=c["norm_eps"], activation_function=act,
      scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False,
      resid_pdrop=float(model.dropout), embd_pdrop=float(model.dropout), attn_pdrop=0.0)


def _t5_hf_config(model: t5.T5) -> dict[str, Any]:
  c = model.config()
  act = _hf_activation(model, c["act"])
  if c["gated_mlp"]:
    # transformers reads "gated-gelu" as gelu_new (tanh) and has no name for a gated exact GELU.
    if c["act"] == "gelu":
      _refuse(model, "a gated MLP with exact GELU: transformers' 'gated-gelu' is the tanh "
              "approximation (act='gelu_tanh')")
    projection = "gated-gelu" if c["act"] == "gelu_tanh" else f"gated-{act}"
  else:
    projection = act
  tied = bool(c["tied_head"])
  return dict(
      vocab_size=c["vocab_size"], d_model=c["width"], d_kv=c["head_dim"], d_ff=c["mlp_dim"],
      num_layers=c["depth_encoder"], num_decoder_layers=c["depth_decoder"],
      num_heads=c["num_heads"], relative_attention_num_buckets=c["num_buckets"],
      relative_attention_max_distance=c["max_distance"], layer_norm_epsilon=c["norm_eps"],
      feed_forward_proj=projection, dropout_rate=float(model.dropout),
      is_encoder_decoder=True,
      # transformers 4.x (and the released configs) say tie_word_embeddings; transformers 5
      # keeps the v1.1 distinction as scale_decoder_outputs.
      tie_word_embeddings=tied, scale_decoder_outputs=tied)


def hf_config(model: nn.Module, **extra: Any) -> dict[str, Any]:
  """The transformers config.json dict of a vljax `lm.LM` (llama / opt / gpt2 recipe) or
  `t5.T5`: model_type, architectures and every size and option transformers reads, such that
  `config_from_hf` gives the module's config back. `extra` adds or overrides entries (e.g.
  bos_token_id / eos_token_id / pad_token_id: a vljax module does not know them; left out, they
  are transformers' defaults). Configs transformers cannot express raise a ValueError naming
  the field (cross-attention layers, a llama recipe with learned positions, a gated GPT-2, ...)."""
  if isinstance(model, t5.T5):
    model_type, config = "t5", _t5_hf_config(model)
    back = t5.T5(**t5.config_from_hf(config)).config()
  elif isinstance(model, lm.LM):
    config = _lm_hf_config(model)
    model_type = model.config()["recipe"]
    back = lm.LM(**lm.config_from_hf(model_type, config)).config()
  else:
    raise TypeError(f"hf_config exports vljax LM and T5 modules, got {type(model).__name__}")
  # Whatever the checks above miss: transformers' reading of the config must be this model.
  differing = sorted(k for k in set(back) | set(model.config())
                     if back.get(k) != model.config().get(k))
  if differing:
    _refuse(model, ", ".join(f"{k}={model.config().get(k)!r} (transformers would read "
                             f"{back.get(k)!r})" for k in differing))
  return {"model_type": model_type, "architectures": [_ARCHITECTURES[model_type]], **config,
          **extra}


def _dtype(dtype: Any) -> np.dtype:
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]
  return np.dtype(dtype)


def _cast(params: Any, dtype: Any) -> Any:
  """Floating arrays of a tree cast to `dtype`; others untouched."""
  target = _dtype(dtype)

  def cast(x):
    x = np.asarray(x)
    floating = np.issubdtype(x.dtype, np.floating) or x.dtype in _DTYPES.values()
    return x.astype(target) if floating and x.dtype != target else x

  return jax.tree.map(cast, params)


def _dtype_name(tensors: Mapping[str, np.ndarray]) -> str | None:
  for value in tensors.values():
    for name, dtype in _DTYPES.items():
      if value.dtype == dtype:
        return name
  return None


def _check_params(model: nn.Module, params: Mapping) -> None:
  """Raises a ValueError naming the missing, unexpected and misshapen parameters when `params`
  (scanned or not, whatever `model.scan` says) are not those of `model`."""
  scanned = "layers" in params.get("encoder" if isinstance(model, t5.T5) else "decoder", {})
  tokens = jnp.zeros((1, 1), jnp.int32)
  inputs = (tokens, tokens) if isinstance(model, t5.T5) else (tokens,)
  abstract = jax.eval_shape(lambda: model.clone(scan=scanned).init(jax.random.PRNGKey(0),
                                                                     *inputs)["params"])
  want = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract), sep="/")
  got = flax.traverse_util.flatten_dict(params, sep="/")
  hf.check_keys(want, got, f"the params of this {type(model).__name__}")
  misshapen = [f"{k}: {tuple(np.shape(got[k]))}, expected {tuple(want[k].shape)}" for k in want
               if tuple(np.shape(got[k])) != tuple(want[k].shape)]
  if misshapen:
    raise ValueError(f"the params of this {type(model).__name__} have {len(misshapen)} wrong "
                     f"shape(s): {'; '.join(misshapen[:5])}")


def to_hf(model: nn.Module, params: Mapping) -> dict[str, np.ndarray]:
  """The transformers state dict (NumPy) of `params` of `model`, scanned or not."""
  params = nn.meta.unbox(params)
  if set(params) == {"params"}:  # the variables dict of `model.init`
    params = params["params"]
  adapters = [k for k in flax.traverse_util.flatten_dict(params, sep="/")
              if k.rsplit("/", 1)[-1] in ("lora_a", "lora_b")]
  if getattr(model, "lora_rank", 0) or adapters:
    raise ValueError(f"this {type(model).__name__} has LoRA adapters ({len(adapters)} arrays, "
                     f"e.g. {adapters[:1]}), which transformers' model has no place for: merge "
                     "them first, `hf_lm.save(path, model.clone(lora_rank=0), lora.merge(params, "
                     "alpha=model.lora_alpha, rank=model.lora_rank))` (vljax.nn.lora)")
  config = hf_config(model)
  _check_params(model, params)
  if isinstance(model, t5.T5):
    return t5.to_hf_state_dict(params, config)
  return lm.to_hf_state_dict(model.config()["recipe"], params, config)


def save(path: str | os.PathLike[str], model: nn.Module, params: Mapping, *, dtype: Any = None,
         max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
         extra_config: Mapping[str, Any] | None = None) -> list[str]:
  """Writes `params` of `model` (an `lm.LM` or `t5.T5`; scanned params too) as a transformers
  model directory: config.json (`hf_config(model, **extra_config)`) and safetensors, sharded
  above `max_shard_bytes`. `dtype` ("bfloat16", "float16", "float32") casts the floating
  tensors. Returns the paths written; an existing model directory needs `overwrite`."""
  tensors = to_hf(model, params)
  if dtype is not None:
    tensors = _cast(tensors, dtype)
  config = hf_config(model, **dict(extra_config or {}))
  name = _dtype_name(tensors)
  if name is not None:
    config.setdefault("dtype", name)  # transformers 5 (4.x: torch_dtype)
    config.setdefault("torch_dtype", name)
  return hf.write_hf_dir(path, config, tensors, max_shard_bytes=max_shard_bytes,
                         overwrite=overwrite)


def is_hf_dir(path: str | os.PathLike[str]) -> bool:
  """Whether `path` looks like a Hugging Face model directory (config.json or transformers'
  weight files; pickle ones too, so that reading it refuses them by name) or a safetensors file."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return path.endswith(".safetensors")
  if not os.path.isdir(path):
    return False
  names = (hf.CONFIG_NAME, hf.WEIGHTS_NAME, hf.INDEX_NAME, "pytorch_model.bin",
           "pytorch_model.bin.index.json")
  return any(os.path.isfile(os.path.join(path, name)) for name in names)


# --- Command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
  """`python -m vljax.convert.hf_lm export ...`: `python -m vljax.convert.export` (see there)
  for LM and T5 models."""
  # Imported here: export imports this module.
  from vljax.convert import export  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["export"]:
    return export.main(argv[1:], prog="python -m vljax.convert.hf_lm export",
                       only=(lm.LM, t5.T5))
  parser = argparse.ArgumentParser(
      prog="python -m vljax.convert.hf_lm",
      description="Export a trained vljax LM / T5 as a Hugging Face transformers directory "
                  "(python -m vljax.convert.export for every exportable model).")
  parser.add_argument("command", choices=["export"],
                      help="config + vljax checkpoint -> config.json + safetensors; "
                           "export --help for its arguments")
  parser.parse_args(argv)  # exits with the usage: argv does not start with the command
  return 2


if __name__ == "__main__":
  sys.exit(main())
