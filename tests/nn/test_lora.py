"""LoRA adapters: a float64 reference of the adapted projection, an LM whose new adapters change
nothing, merging that keeps the outputs, gradients, scanned stacks, config errors, and training
with the base weights frozen."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax.convert import hf_lm
from vljax.models.lm import LM, stack_layers
from vljax.nn import BlockConfig, lora
from vljax.nn.layers import LoraDenseGeneral
from vljax.train import optim

# A tiny LLaMA: RMSNorm, rotary, SwiGLU, grouped-query attention (4 query, 2 key/value heads).
LLAMA = dict(recipe="llama", vocab_size=50, width=32, depth=2, num_heads=4, num_kv_heads=2,
             mlp_dim=64, max_len=16)
ALL_LLAMA = ("query", "key", "value", "out", "gate", "up", "down")
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(2, 9)), jnp.int32)


def _flat(params) -> dict:
  return flax.traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")


# Op by op, not jitted: these tiny models share their compiled operations, which on a CPU is
# much cheaper than compiling each whole model.
def _init(model: LM, seed: int = 0, shapes_only: bool = False):
  """Boxed params of `model`, or only their shapes."""
  init = lambda key: model.init(key, TOKENS)["params"]
  return jax.eval_shape(init, jax.random.key(seed)) if shapes_only else init(jax.random.key(seed))


def _apply(model: LM, params) -> dict:
  return model.apply({"params": params}, TOKENS)


def _adapted(model: LM, base_params, seed: int = 1, perturb: bool = False) -> dict:
  """`model`'s params (adapters included) with the base weights `base_params`; with `perturb`
  the adapters (B included) are random, so they change the outputs."""
  flat = _flat(_init(model, seed))
  base = _flat(base_params)
  assert set(base) == {k for k in flat if not k.endswith(("/lora_a", "/lora_b"))}
  rng = np.random.default_rng(seed)
  for key in flat:
    if key in base:
      flat[key] = base[key]
    elif perturb:
      flat[key] = jnp.asarray(rng.normal(scale=0.3, size=flat[key].shape), jnp.float32)
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def test_adapted_projection_matches_float64_reference():
  """The attention output projection's layout: x [B, T, H, K], W [H, K, D], A [H, K, r],
  B [r, D]."""
  layer = LoraDenseGeneral((6,), (-2, -1), ("heads", "kv", "embed"), rank=3, alpha=5.0)
  x = np.random.default_rng(0).normal(size=(2, 4, 2, 5)).astype(np.float32)
  params = nn.meta.unbox(layer.init(jax.random.key(0), x)["params"])
  assert {k: v.shape for k, v in params.items()} == {
      "kernel": (2, 5, 6), "bias": (6,), "lora_a": (2, 5, 3), "lora_b": (3, 6)}
  bound = 1 / np.sqrt(10)  # peft's kaiming-uniform: U(+-1 / sqrt(fan_in)), fan_in = H * K
  assert 0.5 * bound < np.abs(params["lora_a"]).max() <= bound
  assert not np.any(params["lora_b"])
  rng = np.random.default_rng(1)
  params = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
  p = {k: v.astype(np.float64) for k, v in params.items()}
  x64 = x.astype(np.float64)
  want = (np.einsum("bthk,hkd->btd", x64, p["kernel"]) + p["bias"]
          + 5.0 / 3 * np.einsum("bthk,hkr,rd->btd", x64, p["lora_a"], p["lora_b"]))
  got = layer.apply({"params": params}, x)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_new_adapters_change_nothing_and_carry_logical_names():
  base_model = LM(**LLAMA)
  base_params = _init(base_model)
  model = LM(**LLAMA, lora_rank=4, lora_targets=ALL_LLAMA)
  params = _adapted(model, base_params)
  want = _apply(base_model, base_params)
  got = _apply(model, params)
  for key in ("logits", "hidden"):
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))

  specs = nn.get_partition_spec(_init(model, shapes_only=True))
  layer = specs["decoder"]["layer_0"]
  assert tuple(layer["self_attn"]["query"]["lora_a"]) == ("embed", None)
  assert tuple(layer["self_attn"]["key"]["lora_b"]) == (None, "heads", "kv")
  assert tuple(layer["self_attn"]["out"]["lora_a"]) == ("heads", "kv", None)
  assert tuple(layer["self_attn"]["out"]["lora_b"]) == (None, "embed")
  assert tuple(layer["mlp"]["down"]["dense"]["lora_a"]) == ("mlp", None)
  # Only the targets get adapters: the default targets are query and value.
  default = _flat(_init(LM(**LLAMA, lora_rank=2), shapes_only=True))
  adapted = sorted({k.split("/")[-2] for k in default if k.endswith("/lora_a")})
  assert adapted == ["query", "value"]
  assert default["decoder/layer_1/self_attn/value/lora_b"].shape == (2, 2, 8)
  assert lora.count_params(default) == (2 * (32 * 2 + 2 * 32 + 32 * 2 + 2 * 16),
                                        sum(int(np.prod(v.shape)) for v in default.values()))


@pytest.mark.parametrize("recipe", ["llama", "gpt2"])
def test_merged_adapters_give_the_adapted_outputs(recipe):
  """Random (non-zero) adapters, folded into the kernels: the lora_rank=0 model with the merged
  params computes what the adapted model does. A scanned stack gives the same outputs and
  merges along its layer axis."""
  sizes = LLAMA if recipe == "llama" else {**LLAMA, "recipe": "gpt2", "num_kv_heads": None}
  targets = ALL_LLAMA if recipe == "llama" else ("query", "key", "value", "out", "fc1", "fc2")
  base_model = LM(**sizes)
  base_params = _init(base_model)
  model = LM(**sizes, lora_rank=4, lora_alpha=8.0, lora_targets=targets)
  params = _adapted(model, base_params, perturb=True)
  adapted = np.asarray(_apply(model, params)["logits"])
  before = np.asarray(_apply(base_model, base_params)["logits"])
  assert np.abs(adapted - before).max() > 1e-2  # the adapters matter

  merged = lora.merge(params, alpha=8.0, rank=4)
  assert set(_flat(merged)) == set(_flat(base_params))
  got = np.asarray(_apply(base_model, merged)["logits"])
  np.testing.assert_allclose(got, adapted, rtol=1e-5, atol=1e-5)
  if recipe != "llama":
    return
  # Exported for transformers only once merged: the unmerged adapters are refused by name.
  with pytest.raises(ValueError, match="has LoRA adapters .* merge them first"):
    hf_lm.to_hf(model, params)
  assert set(hf_lm.to_hf(base_model, merged)) == set(hf_lm.to_hf(base_model, base_params))
  scanned = model.clone(scan=True)
  stacked = stack_layers(params, LLAMA["depth"])
  shapes = jax.tree.map(np.shape, _flat(_init(scanned, shapes_only=True)))
  assert shapes == jax.tree.map(np.shape, _flat(stacked))
  assert shapes["decoder/layers/self_attn/query/lora_a"] == (2, 32, 4)
  np.testing.assert_allclose(np.asarray(_apply(scanned, stacked)["logits"]), adapted,
                             rtol=1e-5, atol=1e-5)
  merged_stack = _flat(lora.merge(stacked, alpha=8.0, rank=4))
  for key, value in _flat(stack_layers(merged, LLAMA["depth"])).items():
    np.testing.assert_allclose(merged_stack[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


def test_merge_keeps_boxes_and_names_bad_adapters():
  model = LM(**LLAMA, lora_rank=2)
  boxed = _init(model)
  merged = lora.merge(boxed, alpha=16.0, rank=2)
  kernel = merged["decoder"]["layer_0"]["self_attn"]["query"]["kernel"]
  assert isinstance(kernel, nn.Partitioned) and kernel.names == ("embed", "heads", "kv")
  with pytest.raises(ValueError, match=r"query: lora_a .* of rank 3 do not fit"):
    lora.merge(nn.meta.unbox(boxed), alpha=16.0, rank=3)
  broken = nn.meta.unbox(boxed)
  del broken["decoder"]["layer_1"]["self_attn"]["value"]["lora_b"]
  with pytest.raises(ValueError, match=r"decoder/layer_1/self_attn/value: an adapter needs"):
    lora.merge(broken, alpha=16.0, rank=2)


def test_gradients_reach_the_adapters():
  """At initialisation B = 0, so only B has a gradient (as in LoRA); once B is not zero, A has
  one too, in every adapter."""
  base_params = _init(LM(**LLAMA))
  model = LM(**LLAMA, lora_rank=4, lora_targets=ALL_LLAMA)

  def loss(params):
    return jnp.mean(jnp.square(model.apply({"params": params}, TOKENS)["logits"]))

  grad = jax.jit(jax.grad(loss))
  for perturb in (False, True):
    grads = _flat(grad(_adapted(model, base_params, perturb=perturb)))
    adapters = [k for k in grads if k.endswith(("/lora_a", "/lora_b"))]
    assert len(adapters) == 2 * 2 * len(ALL_LLAMA)
    for key in adapters:
      nonzero = bool(np.any(np.asarray(grads[key])))
      assert nonzero == (perturb or key.endswith("/lora_b")), key


def test_lora_config_errors():
  with pytest.raises(ValueError, match=r"Unknown lora_targets \['q_proj'\]"):
    BlockConfig(4, 64, lora_rank=4, lora_targets=("query", "q_proj"))
  with pytest.raises(ValueError, match=r"lora_targets \['fc1'\] are not in this block: its gated"):
    BlockConfig(4, 64, gated_mlp=True, lora_rank=4, lora_targets=("fc1",))
  with pytest.raises(ValueError, match="must be a tuple"):
    BlockConfig(4, 64, lora_rank=4, lora_targets="query")
  with pytest.raises(ValueError, match="lora_rank must be >= 0"):
    BlockConfig(4, 64, lora_rank=-1)
  with pytest.raises(ValueError, match="lora_targets is empty"):
    BlockConfig(4, 64, lora_rank=4, lora_targets=())
  assert BlockConfig(4, 64, lora_rank=4, lora_targets=["key"]).lora_targets == ("key",)
  with pytest.raises(ValueError, match="Unknown lora_targets"):
    _init(LM(**LLAMA, lora_rank=4, lora_targets=("v_proj",)), shapes_only=True)


def test_freeze_regex_keeps_only_adapters_trainable():
  assert lora.frozen_regex() == "(?!(?:.*/)?lora_[ab]$).*"  # as the module docstring says
  params = nn.meta.unbox(_init(LM(**LLAMA, lora_rank=2), shapes_only=True))
  frozen = _flat(optim.path_mask(params, lora.frozen_regex()))
  assert {k for k, f in frozen.items() if not f} == {
      k for k in frozen if k.endswith(("/lora_a", "/lora_b"))}
  frozen = _flat(optim.path_mask(params, lora.frozen_regex("head/.*")))
  assert not frozen["head/dense/kernel"] and frozen["token_embedding/embedding"]
  adapters = _flat(optim.path_mask(params, lora.lora_param_regex()))
  assert sum(adapters.values()) == 2 * 2 * 2
  with pytest.raises(ValueError, match="not a valid regex"):
    lora.frozen_regex("head/[")


def test_training_with_frozen_base_changes_only_the_adapters():
  """The "lm" family through the shared step, config.optim.freeze = lora.frozen_regex(): the base
  weights stay bitwise unchanged and have no optimizer state; the adapters train."""
  from vljax.data.pipeline import global_batch, train_iterator
  from vljax.data.tokenizer import shapes_tokenizer
  from vljax.train.config import base_config
  from vljax.train.loop import build_experiment

  c = base_config()
  c.family = "lm"
  c.total_steps, c.batch_size, c.log_every, c.eval_every, c.checkpoint_every = 2, 8, 1, 0, 0
  c.model = dict(variant="mu", recipe="llama", depth=1, lora_rank=4,
                 lora_targets=("value", "down"))
  c.data = dict(view="text", max_text_len=17, text_bos=True)
  c.optim.lr, c.optim.warmup_steps = 1e-2, 0
  c.optim.freeze = lora.frozen_regex()
  c.evals = {}
  exp = build_experiment(c, devices=jax.devices()[:1], tokenizer=shapes_tokenizer())
  with exp.context():
    state = exp.init()
    before = jax.tree.map(np.asarray, _flat(state.params))
    it = train_iterator(exp.data_cfg, exp.tokenizer, seed=0, global_batch_size=c.batch_size)
    for _ in range(2):
      local = {k: v for k, v in next(it).items() if k in exp.batch_spec}
      state, _ = exp.train_step(state, global_batch(local, exp.mesh, exp.rules))
    after = jax.tree.map(np.asarray, _flat(state.params))
  adapters = {k for k in before if k.endswith(("/lora_a", "/lora_b"))}
  assert len(adapters) == 2 * 2
  for key in before:
    if key in adapters:
      assert not np.array_equal(after[key], before[key]), key
    else:
      np.testing.assert_array_equal(after[key], before[key], err_msg=key)
  # Optimizer state (Adam's moments) exists for the adapters only.
  opt_leaves = jax.tree_util.tree_flatten_with_path(exp.abstract_state.opt_state)[0]
  moment_paths = {"/".join(str(getattr(k, "key", "")) for k in path if hasattr(k, "key"))
                  for path, leaf in opt_leaves if np.ndim(leaf) > 0}
  assert moment_paths and all(p.endswith(("lora_a", "lora_b")) for p in moment_paths), moment_paths
