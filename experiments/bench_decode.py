"""Greedy decoding speed: vljax's KV-cached decoding against transformers' `generate`, and a
parallel prefill against feeding the prompt one token at a time.

    python experiments/bench_decode.py --out /tmp/bench_decode.json [--plot /tmp/bench_decode.png]

One architecture, `vljax.models.lm.LM` with the LLaMA recipe (RMSNorm, rotary positions,
SwiGLU MLP, grouped-query attention, untied head), random weights drawn once with NumPy. The same
weights go to transformers' `LlamaForCausalLM` through `lm.to_hf_state_dict` (strict loading),
and before anything is timed both implementations must produce the same greedy tokens. Default
size (FULL): vocab 32,000 (LLaMA's), width 512, 8 layers, 8 query / 4 key-value heads of 64, MLP
1408; 56.4M parameters in float32, so that a step's cost is the model's matmuls, not Python.

* decode: batch `--batch` prompts of `--prompt_len` tokens, `--new_tokens` new tokens each (EOS
  disabled, so every run generates exactly N). vljax: `lm.generate` (prefill, then the
  `vljax.decode` greedy while-loop) under one `jax.jit`, compiled before timing (compile time
  reported apart). transformers: `model.generate(do_sample=False, num_beams=1, use_cache=True,
  max_new_tokens=N, min_new_tokens=N)` under `torch.no_grad()`, default (sdpa) attention, once
  with torch's default intra-op thread count (the CPU count) and once with 1 thread
  (`--torch_threads`, 0 = the default): on a shared 2-core machine torch's 2 OpenMP threads can
  run many times slower than 1 when another process holds a core. tokens/s = batch * N / seconds
  (prompt processing included in both).
* prefill: `--prefill_batch` rows of a `--prefix_len`-token prefix (LLaVA-1.5's 576 image
  tokens; token ids here): `lm.prefill` in one parallel pass against `decode.feed_prompt` with
  `lm.decode_step_fn` (one token per step in a `fori_loop`), both jitted and compiled before
  timing, both filling a cache and giving the same next-token logits (checked).

Every measurement is the median of `--repeats` runs; the implementations being compared run in
alternation (one run each per round), so that load from other processes falls on both alike.
`--quick` shrinks everything (tests use it). `--out` writes a JSON list of records with `impl`
("vljax" | "transformers"), `mode` ("decode" | "prefill" | "token_by_token"), `batch`,
`prompt_len`, `new_tokens`, `seconds`, `tokens_per_s` and the model config.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vljax import decode
from vljax.models import lm

NO_EOS = -1  # vljax: a stop id never produced, so every row generates exactly N tokens
PAD = 0

FULL = dict(vocab_size=32_000, width=512, depth=8, num_heads=8, num_kv_heads=4, mlp_dim=1408,
            max_len=1024, batch=8, prompt_len=8, new_tokens=[64, 128], prefill_batch=1,
            prefix_len=576, repeats=3, torch_threads=[0, 1])
QUICK = dict(vocab_size=512, width=64, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=96,
             max_len=128, batch=2, prompt_len=4, new_tokens=[8], prefill_batch=1,
             prefix_len=32, repeats=1, torch_threads=[0])
MODEL_FIELDS = ("vocab_size", "width", "depth", "num_heads", "num_kv_heads", "mlp_dim", "max_len")


def build_models(config: dict[str, Any], seed: int = 0):
  """(vljax LM, its params, transformers LlamaForCausalLM) with the same random weights."""
  import torch
  import transformers

  model = lm.LM(recipe="llama", **{k: config[k] for k in MODEL_FIELDS})
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    """Unit-variance activations: kernels N(0, 1 / fan_in), norms near 1, embeddings N(0, 1),
    so that the logits spread over several units and greedy choices are not near-ties."""
    normal = rng.standard_normal(leaf.shape).astype(np.float32)
    name = path[-1].key
    if name == "scale":
      return 1.0 + 0.1 * normal
    if name == "embedding":
      return normal
    is_attention_out = len(path) > 1 and path[-2].key == "out"  # [heads, head_dim, width]
    fan_in = np.prod(leaf.shape[:-1]) if is_attention_out else leaf.shape[0]
    return normal / np.sqrt(fan_in)

  params = jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes["params"]))
  c = model.config()
  hf_config = transformers.LlamaConfig(
      vocab_size=c["vocab_size"], hidden_size=c["width"], intermediate_size=c["mlp_dim"],
      num_hidden_layers=c["depth"], num_attention_heads=c["num_heads"],
      num_key_value_heads=c["num_kv_heads"], head_dim=c["head_dim"],
      max_position_embeddings=c["max_len"], rms_norm_eps=c["norm_eps"],
      rope_theta=c["rope_base"], tie_word_embeddings=False, bos_token_id=1, eos_token_id=None,
      pad_token_id=PAD)
  torch.manual_seed(seed)
  hf_model = transformers.LlamaForCausalLM(hf_config).eval()
  state = lm.to_hf_state_dict("llama", params, hf_config)
  hf_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  params = jax.tree.map(jnp.asarray, params)
  return model, params, hf_model


def alternate(fns: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
  """Median wall seconds of each function, over `repeats` rounds that call each once in turn
  (after one warm-up call each)."""
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, t in zip(fns, times):
      start = time.perf_counter()
      fn()
      t.append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def bench_decode(model, params, hf_model, *, batch: int, prompt_len: int, new_tokens: int,
                 repeats: int, torch_threads: Sequence[int], seed: int = 1) -> list[dict]:
  """Greedy decoding of `new_tokens` tokens after random prompts, vljax vs transformers with
  each of `torch_threads` intra-op threads (0: torch's default)."""
  import torch

  default_threads = torch.get_num_threads()
  torch_threads = [t or default_threads for t in torch_threads]

  rng = np.random.default_rng(seed)
  vocab = model.config()["vocab_size"]
  prompt_bl = rng.integers(3, vocab, size=(batch, prompt_len)).astype(np.int32)
  prompt_bl[:, 0] = 1  # BOS

  generate = functools.partial(lm.generate, model, max_new_tokens=new_tokens, eos_id=NO_EOS,
                               pad_id=PAD)
  start = time.perf_counter()
  compiled = jax.jit(generate).lower(params, jnp.asarray(prompt_bl)).compile()
  compile_seconds = time.perf_counter() - start
  prompt_dev = jnp.asarray(prompt_bl)

  def run_vljax():
    return np.asarray(jax.block_until_ready(compiled(params, prompt_dev)))

  input_ids = torch.from_numpy(prompt_bl.astype(np.int64))
  attention_mask = torch.ones_like(input_ids)

  def run_transformers(threads=default_threads):
    torch.set_num_threads(threads)
    with torch.no_grad():
      out = hf_model.generate(input_ids, attention_mask=attention_mask, do_sample=False,
                              num_beams=1, use_cache=True, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=PAD)
    return out[:, prompt_len:].numpy()

  ours, theirs = run_vljax(), run_transformers()
  if ours.shape != theirs.shape or not np.array_equal(ours, theirs):
    mismatch = np.argwhere(ours != theirs) if ours.shape == theirs.shape else "shapes"
    raise AssertionError(f"vljax and transformers decode different tokens (N={new_tokens}); "
                         f"first differences (row, step): {mismatch[:5]}")
  distinct = len(np.unique(ours))
  runs = [run_vljax] + [functools.partial(run_transformers, t) for t in torch_threads]
  vljax_s, *hf_s = alternate(runs, repeats)
  torch.set_num_threads(default_threads)
  common = dict(mode="decode", batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                same_tokens=True, distinct_tokens=distinct)
  ours = dict(impl="vljax", **common, seconds=vljax_s, compile_seconds=compile_seconds,
              tokens_per_s=batch * new_tokens / vljax_s)
  rows = [ours]
  for threads, seconds in zip(torch_threads, hf_s):
    rows.append(dict(impl="transformers", **common, seconds=seconds, torch_threads=threads,
                     tokens_per_s=batch * new_tokens / seconds))
    # vljax's tokens/s over transformers' (the first is torch's default thread count).
    ours.setdefault("vs_transformers", ours["tokens_per_s"] / rows[-1]["tokens_per_s"])
    ours[f"vs_transformers_{threads}_threads"] = ours["tokens_per_s"] / rows[-1]["tokens_per_s"]
  return rows


def bench_prefill(model, params, *, batch: int, prefix_len: int, repeats: int,
                  seed: int = 2) -> list[dict]:
  """A `prefix_len`-token prompt: one parallel `lm.prefill` vs `decode.feed_prompt`."""
  rng = np.random.default_rng(seed)
  vocab = model.config()["vocab_size"]
  tokens_bt = jnp.asarray(rng.integers(3, vocab, size=(batch, prefix_len)), jnp.int32)
  length = decode.cache_length(prefix_len, 1)  # the prefix, then room for a first new token

  def parallel(params, tokens_bt):
    cache = lm.init_cache(model, params, batch, length)
    return lm.prefill(model, params, cache, tokens_bt)

  def sequential(params, tokens_bt):
    cache = lm.init_cache(model, params, batch, length)
    return decode.feed_prompt(lm.decode_step_fn(model, params), cache, tokens_bt)

  rows, runs, outputs = [], [], []
  for mode, fn in [("prefill", parallel), ("token_by_token", sequential)]:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(params, tokens_bt).compile()
    compile_seconds = time.perf_counter() - start
    run = functools.partial(lambda c: jax.block_until_ready(c(params, tokens_bt)), compiled)
    outputs.append(run())
    runs.append(run)
    rows.append(dict(impl="vljax", mode=mode, batch=batch, prompt_len=prefix_len, new_tokens=0,
                     compile_seconds=compile_seconds))
  # Same next-token logits and the same cache contents, or the comparison is meaningless.
  (a, b) = outputs
  np.testing.assert_allclose(np.asarray(a.logits_bv), np.asarray(b.logits_bv), rtol=1e-3,
                             atol=1e-3)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3,
                                                       atol=1e-3), a.cache, b.cache)
  np.testing.assert_array_equal(np.asarray(a.positions_b), np.asarray(b.positions_b))
  max_diff = float(np.max(np.abs(np.asarray(a.logits_bv) - np.asarray(b.logits_bv))))
  for row, seconds in zip(rows, alternate(runs, repeats)):
    row.update(seconds=seconds, tokens_per_s=batch * prefix_len / seconds,
               same_logits=True, max_logit_diff=max_diff)
  rows[0]["vs_token_by_token"] = rows[1]["seconds"] / rows[0]["seconds"]
  return rows


def markdown_tables(records: list[dict]) -> str:
  decode_rows = [r for r in records if r["mode"] == "decode"]
  threads = list(dict.fromkeys(r["torch_threads"] for r in decode_rows
                               if r["impl"] == "transformers"))
  head = "| new tokens | vljax tokens/s |"
  for t in threads:
    head += f" transformers, {t} thread{'s' if t > 1 else ''}: tokens/s | vljax / it |"
  lines = [head + " same tokens | vljax compile (s) |",
           "|---:|---:|" + "---:|---:|" * len(threads) + ":---:|---:|"]
  for n in sorted({r["new_tokens"] for r in decode_rows}):
    ours = next(r for r in decode_rows if r["new_tokens"] == n and r["impl"] == "vljax")
    line = f"| {n} | {ours['tokens_per_s']:.0f} |"
    for t in threads:
      theirs = next(r for r in decode_rows if r["new_tokens"] == n
                    and r["impl"] == "transformers" and r["torch_threads"] == t)
      ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
      line += f" {theirs['tokens_per_s']:.0f} | {ratio:.2f}x |"
    lines.append(line + f" {'yes' if ours['same_tokens'] else 'NO'} | "
                 f"{ours['compile_seconds']:.1f} |")
  by_mode = {r["mode"]: r for r in records if r["mode"] in ("prefill", "token_by_token")}
  if by_mode:
    p, s = by_mode["prefill"], by_mode["token_by_token"]
    lines += ["", f"| {p['prompt_len']}-token prefix, batch {p['batch']} | seconds | tokens/s | "
              "speed-up |", "|---|---:|---:|---:|",
              f"| `lm.prefill` (one pass) | {p['seconds']:.3f} | {p['tokens_per_s']:.0f} | "
              f"{p['vs_token_by_token']:.1f}x |",
              f"| `decode.feed_prompt` (token by token) | {s['seconds']:.3f} | "
              f"{s['tokens_per_s']:.0f} | 1x |"]
  return "\n".join(lines)


def _plot(records: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  decode_rows = [r for r in records if r["mode"] == "decode"]
  lengths = sorted({r["new_tokens"] for r in decode_rows})
  fig, ax = plt.subplots(figsize=(5, 3.5))
  series = [("vljax", None)] + [("transformers", t) for t in dict.fromkeys(
      r["torch_threads"] for r in decode_rows if r["impl"] == "transformers")]
  width = 0.8 / len(series)
  for i, (impl, threads) in enumerate(series):
    values = [next(r["tokens_per_s"] for r in decode_rows if r["impl"] == impl
                   and r["new_tokens"] == n and r.get("torch_threads") == threads)
              for n in lengths]
    label = impl if threads is None else f"{impl} ({threads} torch threads)"
    ax.bar(np.arange(len(lengths)) + (i - (len(series) - 1) / 2) * width, values, width=width,
           label=label)
  ax.set_xticks(np.arange(len(lengths)), [str(n) for n in lengths])
  ax.set(xlabel="new tokens", ylabel="tokens / s", title="greedy decoding (CPU)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
  for name, value in FULL.items():
    if isinstance(value, list):
      parser.add_argument(f"--{name}", type=int, nargs="+")
    else:
      parser.add_argument(f"--{name}", type=type(value))
  parser.add_argument("--skip_prefill", action="store_true")
  parser.add_argument("--out", help="write the records as a JSON list to this file")
  parser.add_argument("--plot", help="write a PNG bar chart of decoding tokens/s to this file")
  args = parser.parse_args(argv)
  config = dict(QUICK if args.quick else FULL)
  config.update({k: v for k, v in vars(args).items() if k in config and v is not None})

  import torch
  import transformers

  model, params, hf_model = build_models(config)
  c = model.config()
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  device = jax.devices()[0]
  env = dict(recipe="llama", **{k: c[k] for k in MODEL_FIELDS}, head_dim=c["head_dim"],
             num_params=num_params, repeats=config["repeats"],
             jax_device=f"{device.platform}:{device.device_kind}", cpu_count=os.cpu_count(),
             torch_default_threads=torch.get_num_threads(), torch=torch.__version__,
             transformers=transformers.__version__, jax=jax.__version__,
             hf_attn_implementation=hf_model.config._attn_implementation,
             machine=platform.processor() or platform.machine())
  print(f"LLaMA-recipe LM: vocab {c['vocab_size']}, width {c['width']}, depth {c['depth']}, "
        f"{c['num_heads']} heads ({c['num_kv_heads']} kv, head_dim {c['head_dim']}), MLP "
        f"{c['mlp_dim']}; {num_params / 1e6:.1f}M params, float32. jax {jax.__version__} on "
        f"{env['jax_device']}; torch {torch.__version__} (default {env['torch_default_threads']} "
        f"threads), "
        f"transformers {transformers.__version__} ({env['hf_attn_implementation']} attention); "
        f"{os.cpu_count()} CPUs; median of {config['repeats']} alternating runs.\n", flush=True)

  records = []
  for n in config["new_tokens"]:
    records += bench_decode(model, params, hf_model, batch=config["batch"],
                            prompt_len=config["prompt_len"], new_tokens=n,
                            repeats=config["repeats"], torch_threads=config["torch_threads"])
  if not args.skip_prefill:
    records += bench_prefill(model, params, batch=config["prefill_batch"],
                             prefix_len=config["prefix_len"], repeats=config["repeats"])
  records = [{**env, **r} for r in records]
  print(f"greedy decoding, batch {config['batch']}, {config['prompt_len']}-token prompts:\n")
  print(markdown_tables(records))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(records, f, indent=2)
  if args.plot:
    _plot(records, args.plot)
  return records


if __name__ == "__main__":
  main()
