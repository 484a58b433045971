"""Greedy decoding speed with a KV cache vs. full recomputation of the prefix at every step.

    python experiments/bench_decode.py --out /tmp/bench_decode.json [--plot /tmp/bench_decode.png]

The benchmark is written against a pair of step functions for one model (`StepFnPair`): the
KV-cached one, and a causal full-sequence forward from which `vljax.decode.recompute_step_fn`
builds the reference. Each decoding length is compiled once (compile time excluded) and timed
as the median of several runs; EOS is disabled so that every run generates exactly N tokens.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from vljax import decode

BOS = 1
NO_EOS = -1  # never produced, so every sequence runs to max_new_tokens


class DecoderLM(nn.Module):
  """Pre-LN causal transformer decoder; `decode=True` feeds one token per call with a KV cache."""
  vocab_size: int  # output vocabulary
  width: int  # model dimension
  depth: int  # number of blocks
  num_heads: int  # attention heads
  max_len: int  # learned positional embeddings
  decode: bool = False  # one token per call with flax's autoregressive "cache" collection

  @nn.compact
  def __call__(self, tokens_bl: jax.Array, position: jax.Array | int = 0) -> jax.Array:
    x_bld = nn.Embed(self.vocab_size, self.width)(tokens_bl)
    pos_ld = self.param("pos_embed", nn.initializers.normal(0.02), (self.max_len, self.width))
    x_bld = x_bld + lax.dynamic_slice_in_dim(pos_ld, position, tokens_bl.shape[1])[None]
    # Decode mode masks the cache positions not yet written; full mode needs a causal mask.
    mask = None if self.decode else nn.make_causal_mask(tokens_bl)
    for _ in range(self.depth):
      x_bld = x_bld + nn.MultiHeadDotProductAttention(self.num_heads, decode=self.decode)(
          nn.LayerNorm()(x_bld), mask=mask)
      hidden_bld = nn.gelu(nn.Dense(4 * self.width)(nn.LayerNorm()(x_bld)))
      x_bld = x_bld + nn.Dense(self.width)(hidden_bld)
    return nn.Dense(self.vocab_size)(nn.LayerNorm()(x_bld))


class StepFnPair(NamedTuple):
  """What the benchmark needs from a model: params, a KV-cached step and a full forward."""
  params: Any
  cached_step_fn: Callable  # (params, tokens_b, cache, position) -> (logits_bv, cache)
  init_cache: Callable  # (batch_size, length) -> cache
  logits_fn: Callable  # (params, tokens_bt) -> logits_btv, causally masked


def tiny_decoder_pair(vocab_size: int, width: int, depth: int, num_heads: int,
                      max_len: int) -> StepFnPair:
  """A randomly initialised `DecoderLM` exposed as a `StepFnPair`."""
  config = dict(vocab_size=vocab_size, width=width, depth=depth, num_heads=num_heads,
                max_len=max_len)
  model, decoder = DecoderLM(**config), DecoderLM(**config, decode=True)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]

  def cached_step_fn(params, tokens_b, cache, position):
    logits_b1v, variables = decoder.apply({"params": params, "cache": cache},
                                          tokens_b[:, None], position, mutable=["cache"])
    return logits_b1v[:, 0], variables["cache"]

  def init_cache(batch_size, length):
    # The cache starts as zeros (index 0): only the shapes of a decode-mode init are needed.
    shapes = jax.eval_shape(decoder.init, jax.random.key(0),
                            jnp.zeros((batch_size, length), jnp.int32))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def logits_fn(params, tokens_bt):
    return model.apply({"params": params}, tokens_bt)

  return StepFnPair(params, cached_step_fn, init_cache, logits_fn)


def _median_seconds(compiled: Callable, args: tuple, repeats: int) -> float:
  """Median wall time of `repeats` runs of a compiled function (after one warm-up run)."""
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_length(pair: StepFnPair, batch_size: int, max_new_tokens: int,
                 repeats: int) -> dict:
  """Tokens/s of greedy decoding of `max_new_tokens` tokens, with the cache and without."""
  prompt_bl = jnp.full((batch_size, 1), BOS, jnp.int32)
  length = decode.cache_length(1, max_new_tokens)

  def cached(params, cache, prompt_bl):
    step_fn = functools.partial(pair.cached_step_fn, params)
    return decode.greedy(step_fn, cache, prompt_bl, max_new_tokens=max_new_tokens,
                         eos_id=NO_EOS)

  def recomputed(params, cache, prompt_bl):
    step_fn = decode.recompute_step_fn(functools.partial(pair.logits_fn, params))
    return decode.greedy(step_fn, cache, prompt_bl, max_new_tokens=max_new_tokens,
                         eos_id=NO_EOS)

  results = {"new_tokens": max_new_tokens}
  outputs = {}
  for name, fn, cache in [("cached", cached, pair.init_cache(batch_size, length)),
                          ("recompute", recomputed, decode.recompute_cache(batch_size, length))]:
    args = (pair.params, cache, prompt_bl)
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = _median_seconds(compiled, args, repeats)
    outputs[name] = compiled(*args).tokens_bn
    results[f"{name}_seconds"] = seconds
    results[f"{name}_tokens_per_s"] = batch_size * max_new_tokens / seconds
  results["speedup"] = results["recompute_seconds"] / results["cached_seconds"]
  # Both paths must decode the same tokens, or the comparison is meaningless.
  results["same_tokens"] = bool(jnp.all(outputs["cached"] == outputs["recompute"]))
  return results


def markdown_table(rows: list[dict]) -> str:
  lines = ["| new tokens | cached tok/s | recompute tok/s | speedup | same tokens |",
           "|---:|---:|---:|---:|:---:|"]
  for row in rows:
    lines.append(f"| {row['new_tokens']} | {row['cached_tokens_per_s']:.0f} | "
                 f"{row['recompute_tokens_per_s']:.0f} | {row['speedup']:.1f}x | "
                 f"{'yes' if row['same_tokens'] else 'NO'} |")
  return "\n".join(lines)


def _plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  lengths = [row["new_tokens"] for row in rows]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name in ("cached", "recompute"):
    ax.plot(lengths, [row[f"{name}_tokens_per_s"] for row in rows], marker="o", label=name)
  ax.set(xscale="log", yscale="log", xlabel="new tokens", ylabel="tokens / s",
         title="greedy decoding")
  ax.set_xticks(lengths, [str(n) for n in lengths])
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", help="write the results as JSON to this file")
  parser.add_argument("--plot", help="write a PNG plot of tokens/s to this file")
  args = parser.parse_args()

  pair = tiny_decoder_pair(args.vocab, args.width, args.depth, args.heads,
                           max_len=max(args.lengths))
  rows = [bench_length(pair, args.batch, n, args.repeats) for n in args.lengths]
  device = jax.devices()[0]
  print(f"greedy decoding, batch {args.batch}, width {args.width}, depth {args.depth}, "
        f"vocab {args.vocab}, on {device.platform} ({device.device_kind}); "
        f"median of {args.repeats} runs\n")
  print(markdown_table(rows))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"config": vars(args), "device": f"{device.platform}:{device.device_kind}",
                 "results": rows}, f, indent=2)
  if args.plot:
    _plot(rows, args.plot)


if __name__ == "__main__":
  main()
