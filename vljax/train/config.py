"""The config schema shared by every experiment, its validation and command-line overrides.

Every experiment config is `base_config()` with changes; a key that the base does not have is a
typo or a stale option, so `validate` rejects it (naming it, with the closest valid key), and
checks each value's range, before anything is built or compiled. The keys of `data` are those of
DATA_DEFAULTS; each entry of `evals` is checked against its evaluator type (`vljax.evals.base`);
`model` is checked against the family's module (`vljax.families.base.model_config`). `apply_overrides` sets any field from `path=value` strings, as
`experiments/main.py --config.path=value` does.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import math
import os
import re
from typing import Any, Iterable

import jax
import ml_collections

from vljax.data.pipeline import DATA_DEFAULTS, SOURCES, moved_key_message
from vljax.errors import ConfigError
from vljax.losses.contrastive import IMPLS
from vljax.sharding import DEFAULT_RULES, batch_sharding
from vljax.families import FAMILIES
from vljax.families.base import CONTRASTIVE_LOSSES
from vljax.train.evaluation import check_evals
from vljax.train.tpu import parse_slice

REQUIRED_TOP_LEVEL = ("total_steps", "log_every", "eval_every", "checkpoint_every", "seed")
MESH_AXES = ("data", "fsdp", "tensor")
SCHEDULES = ("cosine", "linear", "constant")  # vljax.train.optim.schedule
# Fields that take values of several types (type checks of overrides accept any of them).
MULTI_TYPE_FIELDS = {"config.data.webdataset.shards": (str, list, tuple),  # one brace pattern or a list
                     "config.init": (list, tuple, dict)}  # entries, or the old single dict
INIT_KEYS = ("checkpoint", "params", "to", "dtype")  # of each config.init entry
INIT_DTYPES = ("float32", "bfloat16")


def base_config() -> ml_collections.ConfigDict:
  """Defaults for every key the training loop reads."""
  c = ml_collections.ConfigDict()
  c.family = "two_tower"  # vljax.families: the model (config.model holds its fields) and loss
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 128  # global, over all processes and devices
  # Gradient accumulation: each step's global batch runs as this many sequential microbatches
  # inside the step, with the loss and gradient of the whole batch (vljax.train.accumulate).
  c.microbatches = 1
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.compute_dtype = "float32"  # or "bfloat16": activations and matmuls; parameters stay float32
  c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  c.sharding_rules = [list(r) for r in DEFAULT_RULES]

  c.model = ml_collections.ConfigDict()
  # contrastive: "softmax" (CLIP) | "sigmoid" (SigLIP), for every family with a contrastive
  # term; impl: "naive" | "chunked" | "ring" (vljax.losses.contrastive); CoCa weighs its losses.
  # ce_chunk_len: text positions per chunk of a chunked cross-entropy that never materialises the
  # [tokens, vocab] logits (0: plain, full logits).
  c.loss = ml_collections.ConfigDict(dict(contrastive="softmax", impl="naive", chunk_size=0,
                                          contrastive_weight=1.0, caption_weight=2.0,
                                          ce_chunk_len=0))

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.schedule = "cosine"  # "cosine" | "constant" | "linear"
  c.optim.warmup_steps = 100
  c.optim.end_lr_fraction = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.optim.weight_decay = 1e-4
  # Regexes match whole parameter paths ("img/encoder/layer_0/mlp/fc1/bias").
  c.optim.wd_exclude = r"(.*/)?(bias|scale|pos_embedding|cls|probe|t|b)"  # no weight decay
  # ((regex, factor), ...): those parameters' updates are scaled by factor (as big_vision's
  # lr_mults), e.g. (("t|b", 10.0),) lets a short run move the contrastive scale and bias.
  c.optim.lr_multipliers = ()
  c.optim.grad_clip_norm = 1.0
  c.optim.freeze = ""  # regex on param paths ("img/.*" locks the image tower, as LiT)
  # Adam's moments stored in "bfloat16" (updates still computed in float32) halve their memory.
  c.optim.state_dtype = "float32"
  # Keep the optimizer state in host memory between steps (TPU / GPU; moved to the device for
  # the update), leaving HBM to the forward and backward passes.
  c.optim.offload = False

  # The Cloud TPU slice the config is sized for (e.g. "v5p-32"; "" for none): the TPU dry run's
  # default --topology and `tpu/vljax-tpu.sh create`'s default accelerator type.
  c.tpu = ml_collections.ConfigDict(dict(topology=""))

  # Multi-host start-up (see vljax.train.distributed); VLJAX_* environment variables override.
  c.distributed = ml_collections.ConfigDict(dict(
      mode="off", coordinator_address="", num_processes=1, process_id=0, cpu_collectives="gloo"))

  c.data = ml_collections.ConfigDict()
  c.evals = ml_collections.ConfigDict()
  # Initialisation from other runs: None (or []) for none, else a list of entries, applied in order
  # (see init_entries and vljax.train.loop):
  #   [dict(checkpoint="workdirs/clip_tiny", params="img/.*"),  # vljax workdir / checkpoints / step dir
  #    dict(checkpoint="workdirs/lm", params="dec/(.*)", to=("dec/(.*)", r"txt/\1"),
  #         dtype="bfloat16")]
  # `params` is a regex over the source's parameter paths (fullmatch); `to` an optional
  # (regex, replacement) whose first match in each selected path is replaced (re.sub, count=1)
  # to name the parameter in this model;
  # `dtype` "bfloat16" holds those parameters in bfloat16 (only ones config.optim.freeze freezes).
  # Deprecated, still accepted: the old single dict(checkpoint=..., params=...) (one entry; an
  # empty checkpoint means none).
  c.init = None
  # Resume from the newest checkpoint's model even if it lacks the input state (data order
  # starts again); see vljax.train.checkpoint.
  c.restart_data_order = False
  return c


def _reference() -> dict[str, Any]:
  """The schema as nested dicts: base_config() with data holding its defaults. An empty dict
  (model, evals) is open: any key may be added there, and its consumer checks it."""
  ref = base_config().to_dict()
  ref["data"] = dict(DATA_DEFAULTS)
  return ref


def _is_dict(value: Any) -> bool:
  return isinstance(value, (dict, ml_collections.ConfigDict))


def _unknown_key(prefix: str, key: str, valid: Iterable[str]) -> ConfigError:
  if prefix == "config.data" and moved_key_message(str(key)):
    return ConfigError(moved_key_message(str(key)))
  valid = sorted(str(k) for k in valid)
  close = difflib.get_close_matches(str(key), valid, n=1)
  hint = f"; did you mean {prefix}.{close[0]}?" if close else f"; valid keys: {', '.join(valid)}"
  return ConfigError(f"Unknown config key {prefix}.{key}{hint}")


def _check_keys(config: Any, ref: dict[str, Any], prefix: str) -> None:
  for key in config.keys():
    if key not in ref:
      raise _unknown_key(prefix, key, ref)
    if _is_dict(config[key]) and _is_dict(ref[key]) and ref[key]:
      _check_keys(config[key], ref[key], f"{prefix}.{key}")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _need(config: ml_collections.ConfigDict, key: str, ok, requirement: str) -> None:
  value = config
  for part in key.split("."):
    if not _is_dict(value) or part not in value:
      raise ConfigError(f"config.{key} is missing (base_config() has it; was its dict replaced?)")
    value = value[part]
  if not ok(value):
    raise ConfigError(f"config.{key} must be {requirement}, got {value!r}")


def _check_regex(key: str, pattern: Any) -> None:
  if not isinstance(pattern, str):
    raise ConfigError(f"config.{key} must be a regex string, got {pattern!r}")
  try:
    re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"config.{key}={pattern!r} is not a valid regex: {e}") from None


def _check_mesh_axes(mesh: Any) -> None:
  example = "[('data', -1), ('fsdp', 1), ('tensor', 1)]"
  if not isinstance(mesh, (list, tuple)) or not mesh or not all(
      isinstance(a, (list, tuple)) and len(a) == 2 for a in mesh):
    raise ConfigError(f"config.mesh must be a list of (axis name, size) pairs such as {example}, "
                      f"got {mesh!r}")
  names = [name for name, _ in mesh]
  for name, size in mesh:
    if name not in MESH_AXES:
      raise ConfigError(f"config.mesh axis {name!r} is not a mesh axis; choose among "
                        f"{', '.join(MESH_AXES)}")
    if names.count(name) > 1:
      raise ConfigError(f"config.mesh names axis {name!r} twice: {mesh!r}")
    if not _is_int(size) or (size < 1 and size != -1):
      raise ConfigError(f"config.mesh size of {name!r} must be an int >= 1, or -1 for all "
                        f"remaining devices, got {size!r}")
  if [size for _, size in mesh].count(-1) > 1:
    raise ConfigError(f"config.mesh may size at most one axis -1 (all remaining devices), got {mesh!r}")


def _check_sharding_rules(rules: Any) -> None:
  if not isinstance(rules, (list, tuple)) or not all(
      isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) for r in rules):
    raise ConfigError("config.sharding_rules must be a list of (logical name, mesh axes) pairs "
                      f"such as ('batch', ('data', 'fsdp')), got {rules!r}")
  for logical, axes in rules:
    named = () if axes is None else (axes,) if isinstance(axes, str) else axes
    if not isinstance(named, (list, tuple)) or any(a not in MESH_AXES for a in named):
      raise ConfigError(f"config.sharding_rules maps {logical!r} to {axes!r}; use None, a mesh "
                        f"axis or a tuple of mesh axes among {', '.join(MESH_AXES)}")


def _check_values(config: ml_collections.ConfigDict) -> None:
  """Range checks of every schema value, each naming the key and what it must be."""
  for key in ("total_steps", "eval_every", "checkpoint_every"):
    _need(config, key, lambda v: _is_int(v) and v >= 0, "a non-negative int")
  for key in ("batch_size", "log_every", "keep_checkpoints"):
    _need(config, key, lambda v: _is_int(v) and v >= 1, "a positive int")
  _need(config, "seed", _is_int, "an int")
  _need(config, "family", lambda v: v in FAMILIES, f"one of {', '.join(sorted(FAMILIES))}")
  _need(config, "compute_dtype", lambda v: v in ("float32", "bfloat16"), "float32 or bfloat16")
  _check_mesh_axes(config.mesh)
  _check_sharding_rules(config.sharding_rules)
  _need(config, "loss.contrastive", lambda v: v in CONTRASTIVE_LOSSES,
        f"one of {', '.join(CONTRASTIVE_LOSSES)}")
  _need(config, "loss.impl", lambda v: v in IMPLS, f"one of {', '.join(IMPLS)}")
  _need(config, "loss.chunk_size", lambda v: _is_int(v) and v >= 0, "a non-negative int (0: default)")
  _need(config, "loss.ce_chunk_len", lambda v: _is_int(v) and v >= 0,
        "a non-negative int (0: full logits)")
  _need(config, "microbatches", lambda v: _is_int(v) and v >= 1, "a positive int (1: none)")
  _need(config, "optim.state_dtype", lambda v: v in ("float32", "bfloat16"), "float32 or bfloat16")
  _need(config, "optim.offload", lambda v: isinstance(v, bool), "True or False")
  if config.tpu.topology:
    parse_slice(config.tpu.topology)  # raises naming the valid slices

  _need(config, "optim.name", lambda v: v == "adamw", "adamw (the only optimizer)")
  _need(config, "optim.lr", lambda v: _is_number(v) and v > 0, "> 0")
  _need(config, "optim.schedule", lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES)}")
  _need(config, "optim.warmup_steps", lambda v: _is_int(v) and v >= 0, "a non-negative int")
  # A warm-up as long as the run is allowed (lr then peaks at the last step); a longer one is not.
  if config.optim.warmup_steps > config.total_steps:
    raise ConfigError(f"config.optim.warmup_steps={config.optim.warmup_steps} is longer than the "
                      f"run (config.total_steps={config.total_steps}); set it to at most "
                      f"{config.total_steps}")
  _need(config, "optim.end_lr_fraction", lambda v: _is_number(v) and 0 <= v <= 1, "in [0, 1]")
  for key in ("optim.b1", "optim.b2"):
    _need(config, key, lambda v: _is_number(v) and 0 <= v < 1, "in [0, 1)")
  _need(config, "optim.eps", lambda v: _is_number(v) and v > 0, "> 0")
  _need(config, "optim.weight_decay", lambda v: _is_number(v) and v >= 0, ">= 0")
  _need(config, "optim.grad_clip_norm", lambda v: _is_number(v) and v >= 0, ">= 0 (0: no clipping)")
  for key in ("wd_exclude", "freeze"):
    _check_regex(f"optim.{key}", config.optim[key])
  multipliers = config.optim.lr_multipliers
  if not isinstance(multipliers, (list, tuple)) or not all(
      isinstance(m, (list, tuple)) and len(m) == 2 and _is_number(m[1]) for m in multipliers):
    raise ConfigError("config.optim.lr_multipliers must be a tuple of (regex, factor) pairs such "
                      f"as (('t|b', 10.0),), got {multipliers!r}")
  for pattern, _ in multipliers:
    _check_regex("optim.lr_multipliers pattern", pattern)
  _check_init(config)

  data = {**DATA_DEFAULTS, **config.data}
  if data["source"] not in ("",) + SOURCES:
    raise ConfigError(f"config.data.source must be one of {', '.join(SOURCES)}, got "
                      f"{data['source']!r}")
  if not (_is_number(data["max_bad_fraction"]) and 0 <= data["max_bad_fraction"] <= 1):
    raise ConfigError(f"config.data.max_bad_fraction must be in [0, 1], got "
                      f"{data['max_bad_fraction']!r}")


def init_entries(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """config.init as a list of entries with every key of INIT_KEYS (`to`, `dtype`: None when not
  given). The old single dict(checkpoint=..., params=...) becomes one entry (params "" = ".*"), or
  none when its checkpoint is empty. Assumes `validate` passed."""
  init = config.get("init")
  if not init:
    return []
  if _is_dict(init):
    if not init.get("checkpoint"):
      return []
    init = [dict(init, params=init.get("params") or ".*")]
  entries = []
  for entry in init:
    entry = dict(entry)
    to = entry.get("to")
    entries.append(dict(checkpoint=entry["checkpoint"], params=entry["params"],
                        to=tuple(to) if to is not None else None, dtype=entry.get("dtype")))
  return entries


def _check_init(config: ml_collections.ConfigDict) -> None:
  init = config.get("init")
  if init is None or (isinstance(init, (list, tuple)) and not init):
    return
  if _is_dict(init):  # the old single-entry form
    for key in init.keys():
      if key not in INIT_KEYS:
        raise _unknown_key("config.init", key, INIT_KEYS)
    entries, names = [init], ["config.init"]
    if not init.get("checkpoint"):
      return
  elif isinstance(init, (list, tuple)):
    entries, names = init, [f"config.init[{i}]" for i in range(len(init))]
  else:
    raise ConfigError(f"config.init must be a list of dict(checkpoint=..., params=...) entries "
                      f"(or None), got {init!r}")
  for entry, name in zip(entries, names):
    if not _is_dict(entry):
      raise ConfigError(f"{name} must be a dict(checkpoint=..., params=...), got {entry!r}")
    for key in entry.keys():
      if key not in INIT_KEYS:
        raise _unknown_key(name, key, INIT_KEYS)
    checkpoint = entry.get("checkpoint")
    if not isinstance(checkpoint, str) or not checkpoint:
      raise ConfigError(f"{name}.checkpoint must be the path of a vljax workdir, checkpoints dir "
                        f"or step dir, got {checkpoint!r}")
    if name != "config.init" and "params" not in entry:
      raise ConfigError(f"{name}.params is missing: a regex over the source's parameter paths, "
                        f"such as 'img/.*'")
    _check_regex(f"{name[len('config.'):]}.params", entry.get("params", ""))
    to = entry.get("to")
    if to is not None:
      if not (isinstance(to, (list, tuple)) and len(to) == 2 and all(isinstance(t, str) for t in to)):
        raise ConfigError(f"{name}.to must be a (regex, replacement) pair such as "
                          f"('img/(.*)', r'vision/\\1'), got {to!r}")
      _check_regex(f"{name[len('config.'):]}.to pattern", to[0])
    dtype = entry.get("dtype")
    if dtype is not None and dtype not in INIT_DTYPES:
      raise ConfigError(f"{name}.dtype must be one of {', '.join(INIT_DTYPES)}, got {dtype!r}")
    if dtype == "bfloat16" and not config.optim.freeze:
      raise ConfigError(f"{name}.dtype='bfloat16' is only for frozen parameters (they have no "
                        f"optimizer state), but config.optim.freeze is empty")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Rejects unknown keys, missing required ones and values out of range, with a message naming
  the key (ConfigError, a ValueError). Changes nothing, so it may run any number of times."""
  _check_keys(config, _reference(), "config")
  for key in REQUIRED_TOP_LEVEL:
    if key not in config:
      raise ConfigError(f"config.{key} is required")
  _check_values(config)
  check_evals(config.evals)
  return config


def _batch_axes(config: ml_collections.ConfigDict, mesh) -> tuple[str, ...]:
  """The mesh axes the logical "batch" axis is split over."""
  spec = batch_sharding(mesh, [tuple(r) for r in config.sharding_rules]).spec
  return () if not spec or spec[0] is None else (spec[0],) if isinstance(spec[0], str) else spec[0]


def _batch_devices(config: ml_collections.ConfigDict, mesh) -> int:
  return math.prod(mesh.shape[a] for a in _batch_axes(config, mesh))


def check_mesh(config: ml_collections.ConfigDict, mesh) -> None:
  """Raises, naming config.batch_size and the mesh, when the batch cannot be split evenly over the
  devices that the logical axis "batch" maps to (config.sharding_rules) and over the processes."""
  axes = _batch_axes(config, mesh)
  devices = _batch_devices(config, mesh)
  processes = jax.process_count()
  multiple = math.lcm(devices, processes)
  batch = config.batch_size
  if batch % multiple == 0:
    return
  reasons = []
  if batch % devices:
    described = ", ".join(f"{a}={mesh.shape[a]}" for a in axes)
    reasons.append(f"the {devices} devices the batch is split over (mesh {described})")
  if batch % processes:
    reasons.append(f"the {processes} processes")
  lower = batch // multiple * multiple
  examples = f"{lower} or {lower + multiple}" if lower else f"{multiple}"
  raise ConfigError(f"config.batch_size={batch} is not divisible by {' nor by '.join(reasons)}; "
                    f"use a multiple of {multiple} such as {examples}")


def check_microbatches(config: ml_collections.ConfigDict, mesh) -> None:
  """Raises, naming both, when config.microbatches does not split config.batch_size into
  microbatches that still divide evenly over the devices the batch is split over."""
  k, batch = config.microbatches, config.batch_size
  devices = _batch_devices(config, mesh)
  if k > 1 and batch % (k * devices):
    raise ConfigError(
        f"config.microbatches={k} splits config.batch_size={batch} into microbatches that the "
        f"{devices} devices the batch is split over cannot share evenly; the batch size must be "
        f"a multiple of microbatches x devices = {k * devices}")


def _parse_literal(raw: str) -> Any:
  """A Python literal, true / false in any case, or else the text itself."""
  try:
    return ast.literal_eval(raw.strip())
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    if raw.strip().lower() in ("true", "false"):
      return raw.strip().lower() == "true"
    return raw


def _type_name(value: Any) -> str:
  """"an int", "a float", "a dict", ... for messages."""
  if value is None:
    return "None"
  name = "dict" if _is_dict(value) else type(value).__name__
  return ("an " if name[0] in "aeiou" else "a ") + name


_MISSING = object()


def _convert(raw: str, current: Any, where: str, allow_none: bool) -> Any:
  """`raw` parsed as a value for the field `where`, whose present value (or default) is `current`."""
  value = _parse_literal(raw)
  if current is _MISSING or current is None or (value is None and allow_none):
    return value
  allowed = MULTI_TYPE_FIELDS.get(where)
  if allowed is not None:
    if isinstance(value, allowed):
      return value
    if str in allowed:
      return raw
  elif isinstance(current, str):
    return value if isinstance(value, str) else raw  # "123" is text in a text field
  elif isinstance(current, bool):
    if isinstance(value, bool):
      return value
  elif _is_int(current):
    if _is_int(value):
      return value
  elif isinstance(current, float):
    if _is_number(value):
      return float(value)
    if raw.strip().lower() in ("inf", "+inf", "-inf", "nan"):
      return float(raw)
  elif isinstance(current, (list, tuple)):
    if isinstance(value, (list, tuple)):
      return type(current)(value)
  elif _is_dict(current):
    if isinstance(value, dict):
      return value
  elif isinstance(value, type(current)):
    return value
  raise ConfigError(f"{where}={raw} is {_type_name(value)}, but the field is {_type_name(current)}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """Sets fields of `config` from "path=value" strings, in order (`--config.path=value`).

  Values are Python literals (`1e-3`, `[('data', 2), ('fsdp', 4)]`, `True` / `true`), or plain
  text for text fields. A value must have its field's type (or its default's, for keys of `data`
  and `evals` the config leaves out); an int may set a float. Lists, tuples and dicts are
  replaced whole: `--config.init="[{'checkpoint': '/w', 'params': 'img/.*'}]"` (dict literals, as
  ast.literal_eval reads no dict(...) calls). `--config.init.checkpoint=/w` (and `.params`) still
  sets the deprecated single-entry form when the config has no init list. Keys are those of the schema (see `validate`); under `model` and other open
  dicts any key may be added, and its consumer checks it. Raises ConfigError naming the key.
  """
  for override in overrides:
    path, sep, raw = override.partition("=")
    path = path.strip()
    path = path[len("config."):] if path.startswith("config.") else path
    if not sep:
      raise ConfigError(f"--config.{path} needs a value: --config.{path}=VALUE")
    keys = path.split(".")
    if not all(keys):
      raise ConfigError(f"--config.{path} is not a config field path")
    if keys[0] == "init" and len(keys) > 1 and (config.get("init") is None or _is_dict(config.init)):
      if keys[1] not in INIT_KEYS:
        raise _unknown_key("config.init", keys[1], INIT_KEYS)
      if config.get("init") is None:
        config.init = dict(checkpoint="", params="")  # --config.init.checkpoint=...: the old form
    node, ref, where = config, _reference(), "config"
    for i, key in enumerate(keys):
      if ref and key not in ref:
        raise _unknown_key(where, key, ref)
      here, key_ref = f"{where}.{key}", ref.get(key, _MISSING) if ref else _MISSING
      if i == len(keys) - 1:
        current = node[key] if key in node else key_ref
        value = _convert(raw, current, here, allow_none=not ref)
        if key in node and type(node[key]) is not type(value):
          del node[key]  # ConfigDict keeps a field's type; this one was checked above
        node[key] = value
        break
      if key not in node and (key_ref is _MISSING or _is_dict(key_ref)):
        node[key] = {}  # a sub-dict of an open dict, e.g. model.image on a config without one
      child = node[key] if key in node else key_ref
      if not _is_dict(child):
        raise ConfigError(f"{here} is {_type_name(child)}, not a dict, so it has no field "
                          f"{keys[i + 1]!r}; set it whole with --{here}=VALUE")
      node, ref, where = child, key_ref if _is_dict(key_ref) else {}, here
  return config


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "experiments", "configs")


def resolve_config_path(name: str) -> str:
  """`clip_tiny.py` (or `clip_tiny`) -> experiments/configs/clip_tiny.py; paths are kept."""
  path = name.split(":", 1)[0]
  if os.path.exists(path):
    return path
  candidate = os.path.join(CONFIG_DIR, path if path.endswith(".py") else path + ".py")
  if os.path.exists(candidate):
    return candidate
  available = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))
  raise FileNotFoundError(f"No config {name!r}: not a file, and not in {CONFIG_DIR} "
                          f"(available: {', '.join(available)})")


def load_config(name: str) -> ml_collections.ConfigDict:
  """Imports a config file and calls its `get_config(arg)`; `file.py:arg` passes `arg`."""
  path = resolve_config_path(name)
  arg = name.split(":", 1)[1] if ":" in name else None
  spec = importlib.util.spec_from_file_location(f"vljax_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """(argv without its `--config.PATH=VALUE` arguments, their "PATH=VALUE" strings): absl would
  reject them as unknown flags."""
  rest, overrides = [], []
  for i, arg in enumerate(argv):
    if arg == "--":
      rest += argv[i:]
      break
    if arg.startswith("--config."):
      overrides.append(arg[len("--config."):])
    else:
      rest.append(arg)
  return rest, overrides
