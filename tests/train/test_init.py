"""config.init: initialisation from several checkpoints (entries, `to` rewrites, bfloat16 holding
of frozen parameters, the old single-dict form) and the errors naming the entry at fault."""
import copy
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.helpers import random_batch, tiny_config
from vljax.data.pipeline import global_batch
from vljax.convert import checkpoints
from vljax.errors import ConfigError
from vljax.train import initialise
from vljax.train.checkpoint import Checkpointer, load_params
from vljax.train.config import apply_overrides, base_config, init_entries, validate
from vljax.train.loop import build_experiment


def flat(tree):
  return flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """(experiment whose image tower is frozen, its initial state, {"a": dir, "b": dir}): two
  checkpoints of that model, A its initial state and B different in every parameter; written
  without training. Tests swap in their own config.init."""
  config = tiny_config()
  config.optim.freeze = "img/.*"
  exp = build_experiment(config)
  dirs = {name: str(tmp_path_factory.mktemp(name)) for name in ("a", "b")}
  with exp.context():
    state = exp.init()
    other = state.replace(params=jax.tree.map(
        lambda x: jax.device_put(np.asarray(x) * 0.5 + 0.25, x.sharding), state.params))
    for name, saved in (("a", state), ("b", other)):
      checkpointer = Checkpointer(dirs[name])
      checkpointer.save(1, saved)
      checkpointer.close()
  return exp, state, dirs


def with_init(config, entries):
  config = copy.deepcopy(config)
  config.init = entries
  return validate(config)


def load(exp, params, entries):
  """Host params after loading config.init = entries into `params` (no compilation)."""
  config = with_init(exp.config, entries)
  with exp.context():
    return flat(initialise.load_init_params(config, params, exp.shardings.params, exp.frozen))


def count_reads(monkeypatch):
  reads = []
  read = checkpoints.read
  def counting(path):
    reads.append(path)
    return read(path)
  monkeypatch.setattr(checkpoints, "read", counting)
  return reads


def test_two_sources_load_bitwise_into_one_model(sources, monkeypatch):
  exp, state, dirs = sources
  reads = count_reads(monkeypatch)
  got = load(exp, state.params, [dict(checkpoint=dirs["a"], params="img/.*"),
                                 dict(checkpoint=os.path.join(dirs["b"], "checkpoints"), params="txt/.*")])
  assert len(reads) == 2
  a, b = flat(load_params(dirs["a"])), flat(load_params(dirs["b"]))
  assert not np.array_equal(a["img/head/dense/kernel"], b["img/head/dense/kernel"])
  for key, value in got.items():
    if key.startswith("img/"):
      np.testing.assert_array_equal(value, a[key], err_msg=key)
    elif key.startswith("txt/"):
      np.testing.assert_array_equal(value, b[key], err_msg=key)
  # The old single-dict form is one entry.
  old = load(exp, state.params, dict(checkpoint=dirs["b"], params="img/.*"))
  for key in old:
    np.testing.assert_array_equal(old[key], (b if key.startswith("img/") else a)[key], err_msg=key)


def test_to_rewrites_paths_and_each_checkpoint_is_read_once(sources, monkeypatch):
  _, _, dirs = sources
  config = tiny_config()
  config.model["image"]["depth"] = 2
  exp = build_experiment(config)
  zeros = jax.tree.map(lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s),
                       exp.abstract_state.params, exp.shardings.params)
  reads = count_reads(monkeypatch)
  got = load(exp, zeros, [
      dict(checkpoint=dirs["a"], params="img/.*"),  # layer_0 and the rest ...
      dict(checkpoint=dirs["a"], params="img/encoder/layer_0/(.*)",  # ... and layer_0 again
           to=("img/encoder/layer_0/(.*)", r"img/encoder/layer_1/\1"))])
  assert len(reads) == 1
  a = flat(load_params(dirs["a"]))
  for key in a:
    if key.startswith("img/"):
      np.testing.assert_array_equal(got[key], a[key], err_msg=key)
    if key.startswith("img/encoder/layer_0/"):
      np.testing.assert_array_equal(got[key.replace("layer_0", "layer_1")], a[key], err_msg=key)


def test_frozen_parameters_held_in_bfloat16_train_and_stay_put(sources, tmp_path):
  """A's frozen image tower held in bfloat16, B's text tower in float32: train steps run on them,
  leave the image tower bitwise and in bfloat16, and train the text tower."""
  exp, state, dirs = sources
  entries = [dict(checkpoint=dirs["a"], params="img/.*", dtype="bfloat16"),
             dict(checkpoint=dirs["b"], params="txt/.*")]
  config = with_init(exp.config, entries)
  with exp.context():
    state = jax.tree.map(lambda x: jax.device_put(np.asarray(x), x.sharding), state)  # donated below
    state = state.replace(params=initialise.load_init_params(config, state.params, exp.shardings.params,
                                                        exp.frozen))
    start = flat(state.params)
    for i in range(2):
      state, metrics = exp.train_step(state, global_batch(random_batch(config, seed=i), exp.mesh, exp.rules))
      assert np.isfinite(float(metrics["train/loss"]))
  end, a = flat(state.params), flat(load_params(dirs["a"]))
  for key in start:
    if key.startswith("img/"):
      assert start[key].dtype == end[key].dtype == jnp.bfloat16, key
      np.testing.assert_array_equal(end[key], a[key].astype(jnp.bfloat16), err_msg=key)
    else:
      assert end[key].dtype == np.float32, key
  assert not np.array_equal(end["txt/head/dense/kernel"], start["txt/head/dense/kernel"])
  # A resume restores them in bfloat16 (not in the float32 of the abstract state).
  workdir = str(tmp_path)
  with exp.context():
    Checkpointer(workdir).save(2, state)
    step, restored = Checkpointer(workdir).restore_latest(exp.abstract_state, exp.shardings)
  assert step == 2
  for key, value in flat(restored.params).items():
    assert value.dtype == end[key].dtype, key
    np.testing.assert_array_equal(value, end[key], err_msg=key)


def test_init_errors_name_the_entry(sources, tmp_path):
  exp, state, dirs = sources
  a, b = dirs["a"], dirs["b"]
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  cases = [
      (FileNotFoundError, [dict(checkpoint=a, params="img/.*"),
                           dict(checkpoint=str(tmp_path / "nowhere"), params="txt/.*")],
       r"^config\.init\[1\]\.checkpoint='.*nowhere' does not exist$"),
      (FileNotFoundError, [dict(checkpoint=empty, params="img/.*")],
       r"^config\.init\[0\]\.checkpoint='.*empty' holds no vljax checkpoint \(No readable"),
      (ValueError, [dict(checkpoint=a, params="img/.*"), dict(checkpoint=b, params="vision/.*")],
       r"^config\.init\[1\]\.params='vision/\.\*' matches no parameter of '.*' \(its parameters: "),
      (ValueError, [dict(checkpoint=a, params="img/(.*)", to=("img/(.*)", r"vision/\1"))],
       r"^config\.init\[0\] puts img/\S+ at vision/\S+, which this model does not have \(check "
       r"config\.init\[0\]\.to="),
      (ValueError, [dict(checkpoint=a, params="img/encoder/layer_0/mlp/fc1/dense/kernel",
                         to=("fc1", "fc2"))],
       r"^config\.init\[0\]: img/encoder/layer_0/mlp/fc1/dense/kernel has shape \(32, 64\) in "
       r"'.*', but img/encoder/layer_0/mlp/fc2/dense/kernel has shape \(64, 32\) in this model$"),
      (ValueError, [dict(checkpoint=a, params="img/.*"), dict(checkpoint=b, params="img/head/.*")],
       r"^config\.init\[0\] and config\.init\[1\] both write img/head/dense/\w+$"),
      (ValueError, [dict(checkpoint=a, params="img/encoder/layer_0/self_attn/(key|query)/kernel",
                         to=("key|query", "value"))],
       r"^config\.init\[0\] writes img/encoder/layer_0/self_attn/value/kernel twice \(from "
       r"img/encoder/layer_0/self_attn/key/kernel and img/encoder/layer_0/self_attn/query/kernel\)$"),
      (ValueError, [dict(checkpoint=a, params="img/.*"),
                    dict(checkpoint=b, params="txt/.*", dtype="bfloat16")],
       r"^config\.init\[1\]\.dtype='bfloat16' would hold txt/\S+ in bfloat16, but "
       r"config\.optim\.freeze='img/\.\*' does not freeze it"),
  ]
  for error, entries, message in cases:
    with pytest.raises(error, match=message):
      load(exp, state.params, entries)


@pytest.mark.parametrize("init, message", [
    ([dict(checkpoint="/w")], r"config\.init\[0\]\.params is missing"),
    ([dict(checkpoint="/w", params="img/.*", too=("a", "b"))],
     r"Unknown config key config\.init\[0\]\.too; did you mean config\.init\[0\]\.to\?"),
    ([dict(checkpoint="", params="img/.*")], r"config\.init\[0\]\.checkpoint must be the path"),
    ([dict(checkpoint="/w", params="img/(")], r"config\.init\[0\]\.params='img/\(' is not a valid regex"),
    ([dict(checkpoint="/w", params="img/.*", to="vision")], r"config\.init\[0\]\.to must be a \(regex, "),
    ([dict(checkpoint="/w", params="img/.*", dtype="float16")],
     r"config\.init\[0\]\.dtype must be one of float32, bfloat16"),
    ([dict(checkpoint="/w", params="img/.*", dtype="bfloat16")],
     r"config\.init\[0\]\.dtype='bfloat16' is only for frozen parameters .* config\.optim\.freeze is empty"),
    ("/w", r"config\.init must be a list of dict\(checkpoint=\.\.\., params=\.\.\.\) entries"),
    (dict(checkpoint="/w", param="img/.*"), r"Unknown config key config\.init\.param"),
])
def test_init_config_errors(init, message):
  config = base_config()
  config.init = init
  with pytest.raises(ConfigError, match=message):
    validate(config)


def test_init_forms_and_overrides():
  assert init_entries(validate(base_config())) == []
  for empty in ([], dict(checkpoint="", params="img/.*")):
    config = base_config()
    config.init = empty
    assert init_entries(validate(config)) == []
  entry = dict(checkpoint="/w", params="img/.*", to=None, dtype=None)
  config = apply_overrides(base_config(), ["init=[{'checkpoint': '/w', 'params': 'img/.*'}]"])
  assert init_entries(validate(config)) == [entry]
  config = apply_overrides(base_config(), [
      r"init=[{'checkpoint': '/w', 'params': 'img/(.*)', 'to': ('img/(.*)', r'vision/\1')}]"])
  assert init_entries(validate(config))[0]["to"] == ("img/(.*)", r"vision/\1")
  # The old forms: one dict (params "" = every parameter), or its fields one at a time.
  config = apply_overrides(base_config(), ["init={'checkpoint': '/w'}"])
  assert init_entries(validate(config)) == [dict(entry, params=".*")]
  config = apply_overrides(base_config(), ["init.checkpoint=/w", "init.params=img/.*"])
  assert init_entries(validate(config)) == [entry]
  with pytest.raises(ConfigError, match=r"Unknown config key config\.init\.chekpoint; did you mean "):
    validate(apply_overrides(base_config(), ["init.chekpoint=/w"]))
  # A list set in a config file is replaced whole, by a list or by the old dict.
  config = base_config()
  config.init = [dict(checkpoint="/v", params="txt/.*")]
  with pytest.raises(ConfigError, match=r"config\.init is a list, not a dict"):
    apply_overrides(config, ["init.checkpoint=/w"])
  config = apply_overrides(config, ["init={'checkpoint': '/w', 'params': 'img/.*'}"])
  assert init_entries(validate(config)) == [entry]
