"""Hugging Face model directories: `config.json` plus safetensors weights, in one file or in
shards listed by `model.safetensors.index.json`, read to and written from NumPy arrays; and the
key check that the per-architecture mappings share.

Only safetensors is read. Pickle checkpoints (`pytorch_model.bin`, `.pt`, `.pth`, `.ckpt`) can
run arbitrary code when loaded, so they are refused without being opened, with the command that
converts them. bfloat16 and float8 tensors come back as `ml_dtypes` arrays (what JAX uses).
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np

from vljax.files import write_atomically

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Shards small enough to download and resume in pieces; transformers loads any shard size.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

# The safetensors dtype names and the NumPy dtypes they read as.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The safetensors library's NumPy loader reads these in every version; the ml_dtypes ones
# (BF16, F8_*) only in recent ones, so those are read from the file's bytes here.
_LIBRARY_DTYPES = frozenset({"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U64", "U32", "U16",
                             "U8", "BOOL"})

_SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class KeyMismatchError(ValueError):
  """The keys of a checkpoint are not the ones a mapping expects; `missing` and `unexpected`
  hold them, sorted."""

  def __init__(self, message: str, missing: list[str], unexpected: list[str]):
    super().__init__(message)
    self.missing = missing
    self.unexpected = unexpected


def _first_few(keys: list[str], limit: int = 5) -> str:
  """Up to `limit` keys, comma-separated, and how many more there are."""
  shown = ", ".join(keys[:limit])
  return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_keys(expected: Iterable[str], found: Iterable[str], what: str, *,
               allow_unexpected: Iterable[str] = ()) -> None:
  """Raises KeyMismatchError naming the keys of `expected` absent from `found` and the keys of
  `found` not in `expected` (the first few of each, and their counts). `what` names the
  checkpoint in the message; `allow_unexpected` holds regular expressions of extra keys to
  tolerate (matched in full, e.g. r".*\\.rotary_emb\\.inv_freq")."""
  expected, found = set(expected), set(found)
  patterns = [re.compile(pattern) for pattern in allow_unexpected]
  missing = sorted(expected - found)
  unexpected = sorted(key for key in found - expected
                      if not any(pattern.fullmatch(key) for pattern in patterns))
  if not missing and not unexpected:
    return
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing ({_first_few(missing)})")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected ({_first_few(unexpected)})")
  raise KeyMismatchError(f"{what}: the keys do not match: {'; '.join(problems)}", missing,
                         unexpected)


# --- Reading ---------------------------------------------------------------------------------


def read_hf_dir(
    path: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, dict[str, np.ndarray]]:
  """Reads a Hugging Face model directory: its `config.json` and every tensor of
  `model.safetensors`, or of the shards that `model.safetensors.index.json` lists.

  `path` may also be one `.safetensors` file; the config is then its sibling `config.json`, or
  None where there is none. A directory with only pickle weights is refused with the command
  that converts them; missing files and corrupt or truncated safetensors files raise naming the
  file and the problem.
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    if not path.endswith(".safetensors"):
      if path.endswith(_PICKLE_SUFFIXES):
        raise ValueError(_pickle_refusal(path))
      raise ValueError(f"{path} is not a .safetensors file; give a Hugging Face model directory "
                       "or a .safetensors file")
    sibling = os.path.join(os.path.dirname(path), CONFIG_NAME)
    config = _read_config(sibling) if os.path.isfile(sibling) else None
    return config, read_safetensors(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No Hugging Face model directory or .safetensors file at {path}")
  weights_path = _find_weights(path)
  config_path = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: a Hugging Face model directory holds "
                            "the model's config next to its weights")
  config = _read_config(config_path)
  if os.path.basename(weights_path) == INDEX_NAME:
    return config, _read_sharded(weights_path)
  return config, read_safetensors(weights_path)


def _find_weights(directory: str) -> str:
  """The path of `model.safetensors` or else of the shard index in `directory`; raises saying
  what the directory holds instead (pickles are refused, never opened)."""
  # transformers looks for the single file first, too.
  for name in (WEIGHTS_NAME, INDEX_NAME):
    if os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  names = sorted(os.listdir(directory))
  pickles = [name for name in names if name.endswith(_PICKLE_SUFFIXES)
             or name == "pytorch_model.bin.index.json"]
  if pickles:
    raise ValueError(_pickle_refusal(directory, pickles))
  others = [name for name in names if name.endswith(".safetensors")]
  if others:
    raise FileNotFoundError(
        f"{directory} has no {WEIGHTS_NAME} nor {INDEX_NAME}, but has {_first_few(others)}: "
        "pass the path of the .safetensors file to read it")
  raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME} nor {INDEX_NAME} (it holds: "
                          f"{_first_few(names) or 'nothing'})")


def _pickle_refusal(path: str, pickles: list[str] | None = None) -> str:
  """Why the pickle file `path`, or the `pickles` of the directory `path`, are refused, and how
  to turn them into safetensors."""
  if pickles is not None:
    model_class = "AutoModelForCausalLM"
    hint = "; a model that is not a causal LM needs its own class, as AutoModel drops task heads"
    try:
      architectures = _read_config(os.path.join(path, CONFIG_NAME)).get("architectures")
      if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        model_class, hint = architectures[0], ""
    except (OSError, ValueError):
      pass
    how = (f"with transformers: `from transformers import {model_class}; "
           f"{model_class}.from_pretrained({path!r}).save_pretrained(OUT_DIR)` (transformers 4.x: "
           f"add safe_serialization=True{hint})")
  else:
    how = ("with torch and safetensors for a flat state dict: `safetensors.torch.save_file("
           f"torch.load({path!r}, weights_only=True), 'model.safetensors')`")
  what = (f"{path} has PyTorch pickle weights ({_first_few(pickles)})" if pickles is not None else
          f"{path} is a PyTorch pickle checkpoint")
  return (f"{what}, which vljax never loads: unpickling can run arbitrary code. Convert it to "
          f"safetensors once, from a source you trust, {how}.")


def _read_json(path: str, what: str) -> Any:
  """The parsed JSON of `path`; ValueError naming the file when it is not JSON."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    return json.loads(data)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: the {what} is not valid JSON ({e})") from e


def _read_config(path: str) -> dict[str, Any]:
  config = _read_json(path, "model config")
  if not isinstance(config, dict):
    raise ValueError(f"{path}: the model config is a JSON {type(config).__name__}, not an object")
  return config


def _read_sharded(index_path: str) -> dict[str, np.ndarray]:
  """The tensors of every shard of an index, checked against the index's `weight_map`."""
  index = _read_json(index_path, "shard index")
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not all(
      isinstance(name, str) and isinstance(shard, str) for name, shard in weight_map.items()):
    raise ValueError(f"{index_path}: the shard index has no 'weight_map' object mapping tensor "
                     "names to shard file names")
  directory = os.path.dirname(index_path)
  shards: dict[str, list[str]] = {}
  for name, shard in weight_map.items():
    shards.setdefault(shard, []).append(name)
  for shard in shards:
    # A name such as "../x" would read outside the directory.
    if os.path.basename(shard) != shard or shard in ("", ".", ".."):
      raise ValueError(f"{index_path} names the shard {shard!r}, which is not a file name in "
                       "its directory")
  missing = [shard for shard in shards if not os.path.isfile(os.path.join(directory, shard))]
  if missing:
    raise FileNotFoundError(f"{index_path} lists {len(missing)} shard file(s) missing from "
                            f"{directory}: {_first_few(missing)}")
  tensors = {}
  for shard, names in shards.items():
    shard_path = os.path.join(directory, shard)
    header = _read_header(shard_path)
    absent = [name for name in names if name not in header.entries]
    if absent:
      raise ValueError(f"{shard_path} lacks {len(absent)} tensor(s) that {index_path} places "
                       f"in it: {_first_few(absent)}")
    unlisted = sorted(set(header.entries) - set(names))
    if unlisted:
      raise ValueError(f"{shard_path} holds {len(unlisted)} tensor(s) that {index_path} does "
                       f"not list: {_first_few(unlisted)}")
    tensors.update(_read_tensors(shard_path, header))
  return tensors


class _Header:
  """A safetensors file's parsed header: where the data starts and each tensor's entry."""

  def __init__(self, data_start: int, entries: dict[str, dict[str, Any]],
               metadata: dict[str, str] | None):
    self.data_start = data_start
    self.entries = entries
    self.metadata = metadata


def _read_header(path: str) -> _Header:
  """Parses and checks the header of a safetensors file: an 8-byte little-endian length, then
  that many bytes of JSON giving each tensor's dtype, shape and byte range in the data after it.
  Every range is checked against the file's size, so truncated files are caught here."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise ValueError(f"{path}: {size} bytes is too short for a safetensors file (which starts "
                       "with an 8-byte header length); it is truncated or not safetensors")
    header_length = int.from_bytes(prefix, "little")
    if header_length > size - 8:
      raise ValueError(f"{path}: the header length, {header_length} bytes, runs past the end of "
                       f"the {size}-byte file; it is truncated or not safetensors")
    raw = f.read(header_length)
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: the safetensors header is not valid JSON ({e}); the file is "
                     "corrupt or not safetensors") from e
  if not isinstance(header, dict):
    raise ValueError(f"{path}: the safetensors header is not a JSON object")
  metadata = header.pop("__metadata__", None)
  data_size = size - 8 - header_length
  for name, entry in header.items():
    _check_entry(path, name, entry, data_size)
  return _Header(8 + header_length, header, metadata)


def _check_entry(path: str, name: str, entry: Any, data_size: int) -> None:
  """Raises naming the file and tensor when a header entry is malformed or points outside the
  file's data."""
  if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
    raise ValueError(f"{path}: the header entry of tensor {name!r} lacks dtype, shape or "
                     "data_offsets")
  dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
  if dtype not in DTYPES:
    raise ValueError(f"{path}: tensor {name!r} has the dtype {dtype!r}, which vljax does not read "
                     f"(it reads {', '.join(DTYPES)})")
  if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
    raise ValueError(f"{path}: tensor {name!r} has the invalid shape {shape!r}")
  if not (isinstance(offsets, list) and len(offsets) == 2
          and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
    raise ValueError(f"{path}: tensor {name!r} has the invalid data_offsets {offsets!r}")
  begin, end = offsets
  if end > data_size:
    raise ValueError(f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] beyond the "
                     f"{data_size} bytes of data in the file; it is truncated or corrupt")
  expected = math.prod(shape) * DTYPES[dtype].itemsize
  if end - begin != expected:
    raise ValueError(f"{path}: tensor {name!r} ({dtype} {shape}) needs {expected} bytes, but its "
                     f"data_offsets [{begin}, {end}] span {end - begin}")


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Every tensor of one safetensors file, in the order of its header, checked first."""
  path = os.fspath(path)
  return _read_tensors(path, _read_header(path))


def _safetensors():
  """The safetensors library, imported when a file is read (the `hf` extra), so that vljax
  imports without it."""
  try:
    import safetensors  # pylint: disable=import-outside-toplevel
  except ModuleNotFoundError:
    raise ModuleNotFoundError("reading safetensors files needs the safetensors library: "
                              'pip install -e ".[hf]"') from None
  return safetensors


def _read_tensors(path: str, header: _Header) -> dict[str, np.ndarray]:
  """Reads the tensors of a checked header: NumPy dtypes with the safetensors library, the
  ml_dtypes ones (bfloat16, float8) from the bytes of their ranges."""
  tensors = {}
  library_names = [name for name, entry in header.entries.items()
                   if entry["dtype"] in _LIBRARY_DTYPES]
  if library_names:
    safetensors = _safetensors()
    try:
      with safetensors.safe_open(path, framework="numpy") as f:
        for name in library_names:
          tensors[name] = f.get_tensor(name)
    except safetensors.SafetensorError as e:
      raise ValueError(f"{path}: the safetensors library cannot read it: {e}") from e
  with open(path, "rb") as f:
    for name, entry in header.entries.items():
      if name in tensors:
        continue
      begin, end = entry["data_offsets"]
      data = np.empty(end - begin, np.uint8)
      f.seek(header.data_start + begin)
      if f.readinto(data) != end - begin:
        raise ValueError(f"{path}: tensor {name!r} ends past the end of the file; it is truncated")
      tensors[name] = data.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
  return {name: tensors[name] for name in header.entries}


# --- Writing ---------------------------------------------------------------------------------


def write_hf_dir(path: str | os.PathLike[str], config: Mapping[str, Any],
                 tensors: Mapping[str, Any], *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 overwrite: bool = False) -> list[str]:
  """Writes a model directory that transformers loads: `config.json` and `model.safetensors`, or,
  when the tensors take more than `max_shard_bytes`, shards `model-00001-of-0000N.safetensors`
  with `model.safetensors.index.json`. Returns the paths written.

  Tensors may be NumPy or JAX arrays of any dtype in `DTYPES` (bfloat16 is written as BF16); the
  shards split them in the given order, a tensor larger than `max_shard_bytes` alone in its
  shard. A directory that already holds model files (a config, safetensors weights or pickles)
  is refused unless `overwrite`, which replaces the config and the safetensors weights. Files are
  written under temporary names and renamed, so an interrupted write leaves no truncated file.
  """
  path = os.fspath(path)
  if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
  config_text = _config_text(config)
  arrays = _checked_arrays(tensors)
  if os.path.exists(path) and not os.path.isdir(path):
    raise FileExistsError(f"{path} exists and is not a directory")
  os.makedirs(path, exist_ok=True)
  existing = _model_files(path)
  if existing and not overwrite:
    raise FileExistsError(f"{path} already holds model files ({_first_few(existing)}); pass "
                          "overwrite=True to replace them")
  for name in existing:
    # Old weights of another shard count would otherwise be mixed with the new ones.
    if name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_PATTERN.fullmatch(name):
      os.remove(os.path.join(path, name))

  shards = _split_shards(arrays, max_shard_bytes)
  if len(shards) == 1:
    file_names = [WEIGHTS_NAME]
  else:
    file_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                  for i in range(len(shards))]
  written = []
  for file_name, shard in zip(file_names, shards):
    shard_path = os.path.join(path, file_name)
    write_atomically(shard_path, lambda f, shard=shard: _write_safetensors(f, shard))
    written.append(shard_path)
  if len(shards) > 1:
    weight_map = {name: file_name for file_name, shard in zip(file_names, shards)
                  for name in shard}
    index = {"metadata": {"total_size": sum(a.nbytes for a in arrays.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    index_text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    index_path = os.path.join(path, INDEX_NAME)
    write_atomically(index_path, lambda f: f.write(index_text.encode()))
    written.append(index_path)
  config_path = os.path.join(path, CONFIG_NAME)
  write_atomically(config_path, lambda f: f.write(config_text.encode()))
  written.append(config_path)
  return written


def _config_text(config: Mapping[str, Any]) -> str:
  """`config` as JSON text (NumPy scalars as numbers); TypeError naming what is not JSON."""
  if not isinstance(config, Mapping):
    raise TypeError(f"config must be a dict, got {type(config).__name__}")

  def to_json(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
      return value.tolist()
    raise TypeError(f"the config holds a {type(value).__name__}, which JSON cannot hold: "
                    f"{value!r}")

  try:
    return json.dumps(dict(config), indent=2, sort_keys=True, default=to_json) + "\n"
  except (TypeError, ValueError) as e:
    raise TypeError(f"config is not JSON-serialisable: {e}") from e


def _checked_arrays(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The tensors as contiguous little-endian NumPy arrays; raises naming a bad name or dtype."""
  if not isinstance(tensors, Mapping):
    raise TypeError(f"tensors must be a dict of name -> array, got {type(tensors).__name__}")
  if not tensors:
    raise ValueError("tensors is empty: there is nothing to write")
  arrays = {}
  for name, value in tensors.items():
    if not isinstance(name, str) or not name or name == "__metadata__":
      raise ValueError(f"Invalid tensor name {name!r}: names are non-empty strings other than "
                       "'__metadata__'")
    array = np.asarray(value)
    if array.dtype.byteorder == ">":
      array = array.astype(array.dtype.newbyteorder("<"))
    if array.dtype not in _DTYPE_NAMES:
      raise TypeError(f"Tensor {name!r} has the dtype {array.dtype}, which safetensors cannot "
                      f"hold; use one of {', '.join(str(d) for d in _DTYPE_NAMES)}")
    # Not np.ascontiguousarray, which turns 0-d arrays into 1-d ones.
    arrays[name] = array if array.flags.c_contiguous else array.copy(order="C")
  return arrays


def _model_files(directory: str) -> list[str]:
  """The files of `directory` that make up a model: its config, weights and shard indexes."""
  return sorted(name for name in os.listdir(directory)
                if name == CONFIG_NAME or name.endswith((".safetensors", ".index.json"))
                or name.endswith(_PICKLE_SUFFIXES))


def _split_shards(arrays: dict[str, np.ndarray],
                  max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
  """Consecutive groups of tensors of at most `max_shard_bytes` each (a larger tensor alone)."""
  shards: list[dict[str, np.ndarray]] = [{}]
  shard_bytes = 0
  for name, array in arrays.items():
    if shards[-1] and shard_bytes + array.nbytes > max_shard_bytes:
      shards.append({})
      shard_bytes = 0
    shards[-1][name] = array
    shard_bytes += array.nbytes
  return shards


def _write_safetensors(f, arrays: dict[str, np.ndarray]) -> None:
  """Writes one safetensors file with the metadata transformers requires ({"format": "pt"})."""
  # Widest dtypes first: each tensor then starts at a multiple of its item size (the header is
  # padded to 8 bytes), which loaders that map the file need.
  order = sorted(arrays, key=lambda name: -arrays[name].dtype.itemsize)
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name in order:
    array = arrays[name]
    header[name] = {"dtype": _DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  header_bytes = json.dumps(header, separators=(",", ":")).encode()
  header_bytes += b" " * (-len(header_bytes) % 8)
  f.write(len(header_bytes).to_bytes(8, "little"))
  f.write(header_bytes)
  for name in order:
    f.write(arrays[name].reshape(-1).view(np.uint8).data)
