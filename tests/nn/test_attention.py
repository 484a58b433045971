"""Attention against a float64 NumPy reference; the KV cache against full causal attention;
scanned stacks, block configuration and attention pooling."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vljax.nn import (AttentionPool, BlockConfig, MultiHeadAttention, Transformer, causal_mask,
                      padding_mask, sincos_1d, sincos_2d)
from vljax.sharding import DEFAULT_RULES, make_mesh


def _numpy_mha(params, x_q, x_kv, mask):
  """float64 reference of MultiHeadAttention with the same parameter layout."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  q = np.einsum("bsd,dhk->bshk", x_q, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bsd,dhk->bshk", x_kv, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("bsd,dhk->bshk", x_kv, p["value"]["kernel"]) + p["value"]["bias"]
  logits = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(np.broadcast_to(mask, logits.shape), logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bhqt,bthk->bqhk", weights, v)
  return np.einsum("bqhk,hkd->bqd", out, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("cross", [False, True])
def test_attention_matches_float64_reference(cross):
  rng = np.random.default_rng(0)
  x_q = rng.normal(size=(2, 5, 16)).astype(np.float32)
  x_kv = rng.normal(size=(2, 7, 16)).astype(np.float32) if cross else None
  kv_len = 7 if cross else 5
  valid = np.ones((2, kv_len), bool)
  valid[1, -2:] = False  # padded keys in the second example
  mask = padding_mask(jnp.asarray(valid))
  if not cross:
    mask = jnp.logical_and(mask, causal_mask(5))
  module = MultiHeadAttention(num_heads=4)
  params = module.init(jax.random.key(1), x_q, x_kv, mask)["params"]
  params = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32),
                        jax.device_get(nn.meta.unbox(params)))
  out = module.apply({"params": params}, x_q, x_kv, mask)
  ref = _numpy_mha(params, x_q.astype(np.float64),
                   (x_kv if cross else x_q).astype(np.float64), np.asarray(mask))
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_equals_full_causal_pass():
  """Feeding tokens one at a time through the cache reproduces the full causal forward pass; each
  row writes at its own positions, and a slot written later is overwritten before it is seen."""
  block = BlockConfig(num_heads=2, mlp_dim=32)
  model = Transformer(depth=2, block=block)
  cached = Transformer(depth=2, block=block.replace(decode=True))
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  params = model.init(jax.random.key(1), x, causal_mask(6))["params"]
  full = model.apply({"params": params}, x, causal_mask(6))
  positions = jnp.arange(6)[None]
  empty = cached.init(jax.random.key(1), x, positions_bt=positions)["cache"]  # 6 slots
  cache, steps = empty, []
  for t in range(6):
    out, mutated = cached.apply({"params": params, "cache": cache}, x[:, t:t + 1],
                                positions_bt=jnp.full((2, 1), t), mutable=["cache"])
    cache = mutated["cache"]
    steps.append(out)
  np.testing.assert_allclose(np.concatenate(steps, 1), full, rtol=1e-5, atol=1e-5)
  # A prompt of 3 tokens at once, then one token per row at the row's own position: row 0
  # continues at 3, row 1 rewrites slot 1 (its slots 1-2 held tokens it now replaces).
  out3, mutated = cached.apply({"params": params, "cache": empty}, x[:, :3], causal_mask(3),
                               positions_bt=positions[:, :3], mutable=["cache"])
  np.testing.assert_allclose(out3, full[:, :3], rtol=1e-5, atol=1e-5)
  next_x = jnp.stack([x[0, 3:4], x[1, 1:2]])
  out, _ = cached.apply({"params": params, "cache": mutated["cache"]}, next_x,
                        positions_bt=jnp.array([[3], [1]]), mutable=["cache"])
  np.testing.assert_allclose(out[:, 0], jnp.stack([full[0, 3], full[1, 1]]), rtol=1e-5,
                             atol=1e-5)


def test_scanned_stack_equals_unrolled_stack():
  x = jax.random.normal(jax.random.key(0), (2, 4, 16))
  block = BlockConfig(num_heads=2, mlp_dim=32)
  unrolled = Transformer(depth=3, block=block)
  scanned = Transformer(depth=3, block=block, scan=True, remat="full")
  params = nn.meta.unbox(unrolled.init(jax.random.key(1), x)["params"])
  layers = [params[f"layer_{i}"] for i in range(3)]
  stacked = {"layers": jax.tree.map(lambda *a: jnp.stack(a), *layers), "final_norm": params["final_norm"]}
  np.testing.assert_allclose(scanned.apply({"params": stacked}, x), unrolled.apply({"params": params}, x),
                             rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda p: scanned.apply({"params": p}, x).sum())(stacked)
  assert grads["layers"]["mlp"]["fc1"]["dense"]["kernel"].shape == (3, 16, 32)


def test_block_config_names_bad_values():
  with pytest.raises(ValueError, match="Unknown norm_position 'middle'"):
    BlockConfig(num_heads=2, mlp_dim=8, norm_position="middle")
  with pytest.raises(ValueError, match="Unknown activation 'swish'"):
    BlockConfig(num_heads=2, mlp_dim=8, act="swish")
  block = BlockConfig(num_heads=2, mlp_dim=8)
  assert hash(block) == hash(BlockConfig(num_heads=2, mlp_dim=8))  # usable as a module field
  assert block.replace(decode=True).decode and not block.decode


def test_post_norm_stack_has_no_final_norm():
  """BERT's layout, LN(x + f(x)): each sublayer's norm follows its residual, no final norm."""
  x = jax.random.normal(jax.random.key(0), (2, 4, 16))
  stack = Transformer(depth=1, block=BlockConfig(num_heads=2, mlp_dim=32, norm_position="post"))
  params = nn.meta.unbox(stack.init(jax.random.key(1), x)["params"])
  assert "final_norm" not in params
  out = np.asarray(stack.apply({"params": params}, x))
  np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-5)  # the MLP's norm comes last
  np.testing.assert_allclose(out.var(-1), 1.0, rtol=1e-3)


def test_attention_pool_queries_of_another_width():
  """CoCa's pooler: Q learned queries of width W attend to tokens of width D -> [B, Q, W],
  LayerNorm'd; the probe is drawn from the given initializer."""
  tokens = jax.random.normal(jax.random.key(0), (2, 5, 24))
  pool = AttentionPool(num_heads=2, num_queries=3, width=16,
                       probe_init=nn.initializers.normal(16 ** -0.5))
  variables = pool.init(jax.random.key(1), tokens)
  params = nn.meta.unbox(variables["params"])
  assert params["probe"].shape == (1, 3, 16)
  assert params["attn"]["query"]["kernel"].shape == (16, 2, 8)
  assert params["attn"]["key"]["kernel"].shape == (24, 2, 8)
  assert set(params) == {"probe", "attn", "norm"}
  np.testing.assert_allclose(np.std(params["probe"]), 0.25, rtol=0.5)
  out = np.asarray(pool.apply(variables, tokens))
  assert out.shape == (2, 3, 16)
  np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-5)
  # Masking a key changes the pooled output; examples are pooled independently.
  valid = np.ones((2, 5), bool)
  valid[0, -1] = False
  masked = np.asarray(pool.apply(variables, tokens, padding_mask(jnp.asarray(valid))))
  assert not np.allclose(masked[0], out[0], atol=1e-5)
  np.testing.assert_allclose(masked[1], out[1], atol=1e-6)


def test_sincos_tables():
  table = sincos_1d(5, 8)
  omega = 1 / 10_000 ** (np.arange(4) / 4)
  np.testing.assert_allclose(table[3, :4], np.sin(3 * omega), rtol=1e-6)
  np.testing.assert_allclose(table[3, 4:], np.cos(3 * omega), rtol=1e-6)
  grid = sincos_2d(2, 3, 8)
  assert grid.shape == (6, 8)
  # Patch (row 1, col 2) is index 5: x-frequencies use col 2, y-frequencies use row 1.
  omega2 = 1 / 10_000 ** (np.arange(2) / 2)
  np.testing.assert_allclose(grid[5], np.concatenate([np.sin(2 * omega2), np.cos(2 * omega2),
                                                      np.sin(1 * omega2), np.cos(1 * omega2)]), rtol=1e-6)


def test_boxed_parameters_initialise_under_a_mesh():
  """Under `jax.set_mesh`, the [embed, heads, kv] kernels (which nn.DenseGeneral initialises
  flat, google/flax#3676) and shapes from eval_shape unbox, and init shards by the rules."""
  mesh = make_mesh([("data", 2), ("fsdp", 4), ("tensor", 1)])
  attention = MultiHeadAttention(num_heads=2)
  x = jnp.ones((8, 4, 16))
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    shapes = nn.meta.unbox(jax.eval_shape(attention.init, jax.random.key(0), x))["params"]
    params = jax.jit(lambda key: nn.meta.unbox(attention.init(key, x)))(jax.random.key(0))["params"]
  assert shapes["query"]["kernel"].shape == params["query"]["kernel"].shape == (16, 2, 8)
  assert params["query"]["kernel"].sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp")), 3)
  assert params["out"]["kernel"].sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, "fsdp")), 3)
