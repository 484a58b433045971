"""Hugging Face model directories: write / read round trips (one file and shards, every dtype),
files that the safetensors library and transformers read, and every refusal: pickles (never
unpickled), missing files, inconsistent indexes, truncated and corrupt files."""
from __future__ import annotations

import json
import os
import pickle

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from vljax.convert import hf


def _tensors() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {
      "embed.weight": rng.normal(size=(11, 8)).astype(np.float32),
      "layer.0.w": rng.normal(size=(8, 8)).astype(ml_dtypes.bfloat16),
      "layer.0.b": rng.normal(size=(8,)).astype(np.float16),
      "layer.1.w": rng.normal(size=(4, 2, 3)).astype(np.float64),
      "positions": np.arange(7, dtype=np.int64),
      "count": np.array(3, np.int32),  # 0-d
      "empty": np.zeros((0, 4), np.float32),
      "mask": np.array([True, False, True]),
      "bytes": np.arange(5, dtype=np.uint8),
      "f8": np.linspace(-2, 2, 6).astype(ml_dtypes.float8_e4m3fn),
  }


def _assert_same(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
  assert set(actual) == set(expected)
  for name, array in expected.items():
    assert actual[name].dtype == array.dtype, name
    assert actual[name].shape == array.shape, name
    np.testing.assert_array_equal(actual[name].astype(np.float64), array.astype(np.float64),
                                  err_msg=name)


def test_round_trip_one_file(tmp_path):
  config = {"model_type": "toy", "hidden_size": np.int64(8), "layers": [1, 2]}
  written = hf.write_hf_dir(tmp_path / "model", config, _tensors())
  assert sorted(os.path.basename(p) for p in written) == ["config.json", "model.safetensors"]
  read_config, tensors = hf.read_hf_dir(tmp_path / "model")
  assert read_config == {"model_type": "toy", "hidden_size": 8, "layers": [1, 2]}
  _assert_same(tensors, _tensors())
  # The safetensors library reads the file, with the metadata transformers requires.
  path = str(tmp_path / "model" / "model.safetensors")
  with safetensors.safe_open(path, framework="numpy") as f:
    assert f.metadata() == {"format": "pt"}
    np.testing.assert_array_equal(f.get_tensor("embed.weight"), _tensors()["embed.weight"])
  # Tensors start at multiples of their item size, as loaders that map the file need.
  with open(path, "rb") as f:
    header_length = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_length))
  assert header_length % 8 == 0
  for name, array in _tensors().items():
    assert header[name]["data_offsets"][0] % array.dtype.itemsize == 0


def test_round_trip_shards(tmp_path):
  tensors = _tensors()
  # 300 bytes: the 704-byte float64 tensor gets a shard of its own, the others share.
  written = hf.write_hf_dir(tmp_path, {"a": 1}, tensors, max_shard_bytes=300)
  names = sorted(os.path.basename(p) for p in written)
  shards = [n for n in names if n.endswith(".safetensors")]
  assert len(shards) > 2
  assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                    for i in range(1, len(shards) + 1)]
  with open(tmp_path / "model.safetensors.index.json") as f:
    index = json.load(f)
  assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
  assert set(index["weight_map"]) == set(tensors)
  for shard in shards:
    shard_bytes = sum(tensors[n].nbytes for n, s in index["weight_map"].items() if s == shard)
    in_shard = [n for n, s in index["weight_map"].items() if s == shard]
    assert shard_bytes <= 300 or len(in_shard) == 1
  config, read = hf.read_hf_dir(tmp_path)
  assert config == {"a": 1}
  _assert_same(read, tensors)


def test_reads_files_the_safetensors_library_writes(tmp_path):
  tensors = {name: a for name, a in _tensors().items() if not name.startswith("f8")}
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"x": 1}, f)
  _, read = hf.read_hf_dir(tmp_path)
  _assert_same(read, tensors)
  # One .safetensors file, with its sibling config or none.
  assert hf.read_hf_dir(tmp_path / "model.safetensors")[0] == {"x": 1}
  os.remove(tmp_path / "config.json")
  config, read = hf.read_hf_dir(tmp_path / "model.safetensors")
  assert config is None
  _assert_same(read, tensors)


def test_reads_bf16_that_torch_writes(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import safetensors.torch  # pylint: disable=import-outside-toplevel
  values = torch.randn(3, 5).to(torch.bfloat16)
  safetensors.torch.save_file({"w": values}, str(tmp_path / "w.safetensors"))
  _, read = hf.read_hf_dir(tmp_path / "w.safetensors")
  assert read["w"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(read["w"].astype(np.float32), values.float().numpy())


def _gpt2():
  import torch  # pylint: disable=import-outside-toplevel
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
                                   bos_token_id=0, eos_token_id=0)
  return torch, transformers, transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("max_shard_bytes", [hf.DEFAULT_MAX_SHARD_BYTES, 2000])
def test_transformers_loads_a_written_directory(tmp_path, max_shard_bytes):
  torch, transformers, model = _gpt2()
  state = {name: value.numpy() for name, value in model.state_dict().items()}
  config = json.loads(model.config.to_json_string())
  hf.write_hf_dir(tmp_path, config, state, max_shard_bytes=max_shard_bytes)
  assert os.path.isfile(tmp_path / "model.safetensors.index.json") == (max_shard_bytes == 2000)
  loaded, info = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path),
                                                             output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert not info["mismatched_keys"] and not info.get("error_msgs")
  for name, value in loaded.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), state[name], err_msg=name)
  tokens = torch.arange(10)[None]
  model.eval()  # A new model is in training mode, with dropout.
  with torch.no_grad():
    np.testing.assert_array_equal(loaded(tokens).logits.numpy(), model(tokens).logits.numpy())


def test_reads_what_transformers_writes(tmp_path):
  torch, _, model = _gpt2()
  model.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
  model.float().save_pretrained(str(tmp_path / "sharded"), max_shard_size="2KB")
  assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
  state = model.state_dict()
  config, tensors = hf.read_hf_dir(tmp_path / "bf16")
  assert config["n_embd"] == 16
  # transformers drops the lm_head tied to the embedding.
  assert set(tensors) <= set(state) and "transformer.wte.weight" in tensors
  for name, array in tensors.items():
    assert array.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(array.astype(np.float32),
                                  state[name].to(torch.bfloat16).float().numpy())
  _, tensors = hf.read_hf_dir(tmp_path / "sharded")
  for name, array in tensors.items():
    np.testing.assert_array_equal(array, state[name].numpy())


@pytest.fixture
def no_unpickling(monkeypatch):
  """Fails the test if anything unpickles or calls torch.load."""

  def refuse(*args, **kwargs):
    raise AssertionError("a pickle was loaded")

  monkeypatch.setattr(pickle, "load", refuse)
  monkeypatch.setattr(pickle, "loads", refuse)
  monkeypatch.setattr(pickle, "Unpickler", refuse)
  try:
    import torch  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(torch, "load", refuse)
  except ImportError:
    pass


def test_pickles_are_refused_unopened(tmp_path, no_unpickling):
  import torch  # pylint: disable=import-outside-toplevel
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"architectures": ["GPT2LMHeadModel"]}, f)
  torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
  with pytest.raises(ValueError, match=r"pytorch_model\.bin.*never loads.*GPT2LMHeadModel"
                     r"\.from_pretrained.*save_pretrained"):
    hf.read_hf_dir(tmp_path)
  with pytest.raises(ValueError, match="pickle"):
    hf.read_hf_dir(tmp_path / "pytorch_model.bin")
  for name in ("model.pt", "model.pth", "last.ckpt"):
    torch.save({"w": torch.ones(2)}, tmp_path / name)
    with pytest.raises(ValueError, match=rf"{name}.*safetensors\.torch\.save_file"):
      hf.read_hf_dir(tmp_path / name)


def test_sharded_pickles_without_config_are_refused(tmp_path, no_unpickling):
  for name in ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
               "pytorch_model.bin.index.json"):
    (tmp_path / name).write_bytes(b"\x80\x04not really")
  with pytest.raises(ValueError, match=r"pytorch_model-00001-of-00002\.bin.*"
                     r"AutoModelForCausalLM"):
    hf.read_hf_dir(tmp_path)


def _write_small(path, max_shard_bytes=hf.DEFAULT_MAX_SHARD_BYTES):
  tensors = {"a": np.ones((4, 4), np.float32), "b": np.zeros(8, np.float32)}
  hf.write_hf_dir(path, {"k": 1}, tensors, max_shard_bytes=max_shard_bytes)
  return tensors


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="No Hugging Face model directory"):
    hf.read_hf_dir(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="has no model.safetensors.*holds: nothing"):
    hf.read_hf_dir(tmp_path)
  _write_small(tmp_path / "model")
  os.remove(tmp_path / "model" / "config.json")
  with pytest.raises(FileNotFoundError, match=r"model has no config\.json"):
    hf.read_hf_dir(tmp_path / "model")
  (tmp_path / "other").mkdir()
  os.rename(tmp_path / "model" / "model.safetensors", tmp_path / "other" / "weights.safetensors")
  with pytest.raises(FileNotFoundError, match=r"weights\.safetensors: pass the path"):
    hf.read_hf_dir(tmp_path / "other")
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match=r"notes\.txt is not a \.safetensors file"):
    hf.read_hf_dir(tmp_path / "notes.txt")


def test_inconsistent_shard_index(tmp_path):
  tensors = {"a": np.ones(16, np.float32), "b": np.ones(8, np.float32), "c": np.ones(8, np.float32)}
  hf.write_hf_dir(tmp_path, {}, tensors, max_shard_bytes=64)
  index_path = tmp_path / "model.safetensors.index.json"
  index = json.loads(index_path.read_text())
  assert index["weight_map"] == {"a": "model-00001-of-00002.safetensors",
                                 "b": "model-00002-of-00002.safetensors",
                                 "c": "model-00002-of-00002.safetensors"}

  def rewrite(weight_map):
    index_path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

  rewrite({**index["weight_map"], "c": "model-00003-of-00003.safetensors"})
  with pytest.raises(FileNotFoundError, match=r"lists 1 shard file\(s\) missing.*"
                     r"model-00003-of-00003\.safetensors"):
    hf.read_hf_dir(tmp_path)
  rewrite({**index["weight_map"], "c": "model-00001-of-00002.safetensors"})
  with pytest.raises(ValueError, match=r"model-00001-of-00002\.safetensors lacks 1 tensor\(s\).*"
                     r": c$"):
    hf.read_hf_dir(tmp_path)
  rewrite({"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
  with pytest.raises(ValueError, match=r"model-00002-of-00002\.safetensors holds 1 tensor\(s\) "
                     r"that .* does not list: c"):
    hf.read_hf_dir(tmp_path)
  rewrite({"a": "../model-00001-of-00002.safetensors"})
  with pytest.raises(ValueError, match="not a file name in its directory"):
    hf.read_hf_dir(tmp_path)
  index_path.write_text(json.dumps({"metadata": {}}))
  with pytest.raises(ValueError, match="no 'weight_map'"):
    hf.read_hf_dir(tmp_path)
  index_path.write_text("{")
  with pytest.raises(ValueError, match="shard index is not valid JSON"):
    hf.read_hf_dir(tmp_path)


def _header_and_data(path) -> tuple[dict, bytes]:
  data = path.read_bytes()
  length = int.from_bytes(data[:8], "little")
  return json.loads(data[8:8 + length]), data[8 + length:]


def _with_header(path, header: dict, data: bytes) -> None:
  header_bytes = json.dumps(header).encode()
  path.write_bytes(len(header_bytes).to_bytes(8, "little") + header_bytes + data)


def test_truncated_and_corrupt_files(tmp_path):
  _write_small(tmp_path)
  path = tmp_path / "model.safetensors"
  intact = path.read_bytes()
  header, data = _header_and_data(path)

  path.write_bytes(intact[:-10])
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor '\w' has data_offsets "
                     r"\[\d+, \d+\] beyond the \d+ bytes of data.*truncated"):
    hf.read_hf_dir(tmp_path)
  path.write_bytes(intact[:100])
  with pytest.raises(ValueError, match=r"model\.safetensors: the header length, \d+ bytes, runs "
                     "past the end of the 100-byte file"):
    hf.read_hf_dir(tmp_path)
  path.write_bytes(intact[:5])
  with pytest.raises(ValueError, match="5 bytes is too short for a safetensors file"):
    hf.read_hf_dir(tmp_path)
  path.write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00{abc")
  with pytest.raises(ValueError, match="header is not valid JSON"):
    hf.read_hf_dir(tmp_path)
  _with_header(path, {**header, "a": {**header["a"], "dtype": "C64"}}, data)
  with pytest.raises(ValueError, match="tensor 'a' has the dtype 'C64', which vljax does not read"):
    hf.read_hf_dir(tmp_path)
  _with_header(path, {**header, "a": {**header["a"], "shape": [4, 5]}}, data)
  with pytest.raises(ValueError, match=r"tensor 'a' \(F32 \[4, 5\]\) needs 80 bytes, but its "
                     r"data_offsets \[\d+, \d+\] span 64"):
    hf.read_hf_dir(tmp_path)
  _with_header(path, {**header, "a": {"dtype": "F32"}}, data)
  with pytest.raises(ValueError, match="tensor 'a' lacks dtype, shape or data_offsets"):
    hf.read_hf_dir(tmp_path)
  _with_header(path, {**header, "a": {**header["a"], "data_offsets": [8, 4]}}, data)
  with pytest.raises(ValueError, match=r"tensor 'a' has the invalid data_offsets \[8, 4\]"):
    hf.read_hf_dir(tmp_path)
  (tmp_path / "config.json").write_text("[1]")
  path.write_bytes(intact)
  with pytest.raises(ValueError, match=r"config\.json: the model config is a JSON list"):
    hf.read_hf_dir(tmp_path)


def test_existing_model_files_are_not_overwritten(tmp_path):
  _write_small(tmp_path, max_shard_bytes=64)
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(FileExistsError, match=r"already holds model files \(config\.json, "
                     r"model-00001-of-00002\.safetensors.*overwrite=True"):
    hf.write_hf_dir(tmp_path, {}, {"x": np.ones(2)})
  assert sorted(os.listdir(tmp_path)) == before
  # overwrite=True replaces the shards by one file, leaving no stale shard or index.
  hf.write_hf_dir(tmp_path, {"new": True}, {"x": np.ones(2)}, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
  config, tensors = hf.read_hf_dir(tmp_path)
  assert config == {"new": True} and list(tensors) == ["x"]
  # Other files, such as a tokenizer's, do not count as model files.
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "tokenizer.json").write_text("{}")
  hf.write_hf_dir(tmp_path / "other", {}, {"x": np.ones(2)})
  (tmp_path / "file").write_text("")
  with pytest.raises(FileExistsError, match="is not a directory"):
    hf.write_hf_dir(tmp_path / "file", {}, {"x": np.ones(2)})


def test_write_refuses_bad_input(tmp_path):
  with pytest.raises(TypeError, match=r"Tensor 'c' has the dtype complex64"):
    hf.write_hf_dir(tmp_path, {}, {"c": np.ones(2, np.complex64)})
  with pytest.raises(TypeError, match="config is not JSON-serialisable.*object"):
    hf.write_hf_dir(tmp_path, {"f": object()}, {"x": np.ones(2)})
  with pytest.raises(ValueError, match="nothing to write"):
    hf.write_hf_dir(tmp_path, {}, {})
  with pytest.raises(ValueError, match="Invalid tensor name '__metadata__'"):
    hf.write_hf_dir(tmp_path, {}, {"__metadata__": np.ones(2)})
  with pytest.raises(ValueError, match="max_shard_bytes must be a positive int"):
    hf.write_hf_dir(tmp_path, {}, {"x": np.ones(2)}, max_shard_bytes=0)
  assert os.listdir(tmp_path) == []
  # Big-endian and non-contiguous arrays are written as little-endian, contiguous data.
  strided = np.arange(12, dtype=">i4").reshape(3, 4).T
  hf.write_hf_dir(tmp_path, {}, {"s": strided})
  np.testing.assert_array_equal(hf.read_hf_dir(tmp_path)[1]["s"], strided)


def test_jax_arrays_are_written(tmp_path):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  value = jnp.linspace(0, 1, 6, dtype=jnp.bfloat16).reshape(2, 3)
  hf.write_hf_dir(tmp_path, {}, {"w": value})
  read = hf.read_hf_dir(tmp_path)[1]["w"]
  assert read.dtype == jnp.bfloat16
  np.testing.assert_array_equal(read, np.asarray(value))


def test_check_keys():
  hf.check_keys({"a", "b"}, ["b", "a"], "LLaMA checkpoint")
  expected = {f"layers.{i}.w" for i in range(8)} | {"norm"}
  found = {f"layers.{i}.w" for i in range(1, 8)} | {f"extra.{i}" for i in range(7)}
  with pytest.raises(hf.KeyMismatchError) as info:
    hf.check_keys(expected, found, "LLaMA checkpoint")
  message = str(info.value)
  assert message.startswith("LLaMA checkpoint: the keys do not match: 2 missing (layers.0.w, "
                            "norm); 7 unexpected (extra.0, extra.1, extra.2, extra.3, extra.4, "
                            "... (2 more))")
  assert info.value.missing == ["layers.0.w", "norm"]
  assert len(info.value.unexpected) == 7
  assert isinstance(info.value, ValueError)
  hf.check_keys({"a"}, {"a", "layers.3.rotary_emb.inv_freq"}, "x",
                allow_unexpected=[r"layers\.\d+\.rotary_emb\.inv_freq"])
  with pytest.raises(hf.KeyMismatchError, match="1 unexpected"):
    hf.check_keys({"a"}, {"a", "layers.3.rotary_emb.inv_freq.extra"}, "x",
                  allow_unexpected=[r"layers\.\d+\.rotary_emb\.inv_freq"])


def test_vljax_trains_without_the_hf_extra():
  """`pip install -e .` has no safetensors, tokenizers, transformers or torch: the training
  loop, the families and config.init import without them; reading a safetensors file says
  which extra it needs."""
  import subprocess
  import sys
  code = ("import sys\n"
          "for name in ('safetensors', 'tokenizers', 'transformers', 'torch'):\n"
          "  sys.modules[name] = None\n"
          "import vljax.train.loop, vljax.train.initialise, vljax.families, vljax.convert.hf_lm\n"
          "from vljax.convert import hf\n"
          "try:\n"
          "  hf._safetensors()\n"
          "except ModuleNotFoundError as e:\n"
          "  print(e)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert 'pip install -e ".[hf]"' in out.stdout
