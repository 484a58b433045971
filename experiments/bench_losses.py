"""Benchmark of the contrastive losses: compiled memory, speed, and an exact run at B = 2^17.

  python experiments/bench_losses.py --out /tmp/bench_losses.json         # full, ~15 min
  python experiments/bench_losses.py --quick                              # ~1 min
  python experiments/bench_losses.py --big --out /tmp/bench_losses.json   # B = 2^17, ~40 min

(times on 2 CPU cores).

For every loss (softmax, sigmoid), implementation (naive, chunked, ring on 8 devices) and
batch B = 2^12 ... 2^20 at width 512 it records the temporary memory of the compiled
loss-and-gradient program (memory_analysis(), from abstract inputs, so sizes that could never
run are covered; for the ring it is per device), and where the program fits this machine its
wall time (median of several runs after a warm-up, configurations interleaved round-robin so
load from other processes hits them alike) and achieved FLOP/s. FLOPs are the model FLOPs of
loss-and-gradient, 6 B^2 D (logits plus the two gradient matmuls); recomputation in the
backward pass is not counted. The ceiling is a dense [B, D] x [D, B] float32 matmul timed in
the same rounds. Each record also keeps the per-round wall times and the median process CPU
time: on a shared machine the CPU time and the per-round ratios are the steadier comparison.

The 8 ring devices are fake CPU devices: XLA_FLAGS is set below, before jax is imported, for
the whole process (single-device programs run on device 0 and are unaffected).

--big runs only chunked loss-and-gradient at B = 2^17 (naive would need ~384 GiB) for both
losses, so that the process's peak resident memory (ru_maxrss, read before the reference is
computed) is this run's own, and compares the loss with a float64 NumPy reference computed
block by block. Its records are merged into --out (replacing earlier --big records; a later
sweep keeps them).
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vljax.losses import contrastive

WIDTH = 512
CHUNK = 1024
SCALE, SIGMOID_BIAS = 10.0, -10.0  # SigLIP's initialisation; also a CLIP-like temperature
KINDS = ("softmax", "sigmoid")
IMPLS = ("naive", "chunked", "ring")


def _ring_mesh():
  return Mesh(np.array(jax.devices()[:8]), ("data",))


def _grad_fn(kind, impl, mesh):
  """jit(value_and_grad) of the loss wrt embeddings, scale and bias."""
  kwargs = {"impl": impl}
  if impl != "naive":
    kwargs["chunk_size"] = CHUNK
  if impl == "ring":
    kwargs.update(mesh=mesh, axis="data")

  def f(img, txt, scale, bias):
    if kind == "softmax":
      return contrastive.softmax_loss(img, txt, scale, **kwargs)[0]
    return contrastive.sigmoid_loss(img, txt, scale, bias, **kwargs)[0]
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))


def _emb_sharding(impl, mesh):
  return NamedSharding(mesh, P("data", None)) if impl == "ring" else None


def temp_bytes(kind, impl, batch, mesh):
  """Temporary bytes of the compiled loss-and-gradient (per device for the ring)."""
  emb = jax.ShapeDtypeStruct((batch, WIDTH), jnp.float32, sharding=_emb_sharding(impl, mesh))
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  compiled = _grad_fn(kind, impl, mesh).lower(emb, emb, scalar, scalar).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def embeddings(batch, seed=0):
  """L2-normalised float32 pairs with correlated positives, built without float64 copies."""
  rng = np.random.default_rng(seed)
  img = rng.standard_normal((batch, WIDTH), dtype=np.float32)
  txt = img + 1.5 * rng.standard_normal((batch, WIDTH), dtype=np.float32)
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  return img, txt


def time_round_robin(fns, args_for, reps):
  """Wall and process-CPU seconds of each fn: one warm-up each, then `reps` interleaved
  rounds. Returns {name: {"wall": [...], "cpu": [...]}}, one entry per round."""
  for name, fn in fns.items():
    jax.block_until_ready(fn(*args_for(name)))
  times = {name: {"wall": [], "cpu": []} for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      args = args_for(name)
      wall, cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      times[name]["wall"].append(time.perf_counter() - wall)
      times[name]["cpu"].append(time.process_time() - cpu)
  return times


def _record(kind, impl, batch, temp, times=None):
  """One JSON record; seconds is the median wall time, cpu_seconds the median process CPU
  time (less sensitive to other jobs on a shared machine), rounds the wall time per round."""
  flops = 6.0 * batch * batch * WIDTH
  seconds = None if times is None else float(np.median(times["wall"]))
  return {"loss": kind, "impl": impl, "batch": batch, "width": WIDTH,
          "devices": 8 if impl == "ring" else 1, "chunk": None if impl == "naive" else CHUNK,
          "temp_bytes": temp, "seconds": seconds,
          "flops_per_s": None if seconds is None else flops / seconds,
          "cpu_seconds": None if times is None else float(np.median(times["cpu"])),
          "rounds": None if times is None else [float(t) for t in times["wall"]]}


def run_sweep(quick):
  """Memory for every (loss, impl, batch); timings where they fit; the matmul ceiling."""
  mesh = _ring_mesh()
  mem_batches = [2**12, 2**16, 2**20] if quick else [2**k for k in range(12, 21)]
  # Largest batch timed per implementation (naive at 2^14 would need ~6 GiB and minutes).
  time_limit = ({"naive": 2**12, "chunked": 2**12, "ring": 2**12} if quick else
                {"naive": 2**13, "chunked": 2**14, "ring": 2**13})
  ceiling_batch = 2**12 if quick else 2**13
  timed_batches = sorted(set(time_limit.values()) | {2**12})
  times, ceiling = {}, None
  for batch in timed_batches:
    img, txt = embeddings(batch)
    fns, inputs = {}, {}
    for impl in IMPLS:
      if batch > time_limit[impl]:
        continue
      sharding = _emb_sharding(impl, mesh)
      put = (lambda a, s=sharding: jax.device_put(a, s)) if sharding else jnp.asarray
      inputs[impl] = (put(img), put(txt), jnp.float32(SCALE), jnp.float32(SIGMOID_BIAS))
      for kind in KINDS:
        fns[(kind, impl)] = _grad_fn(kind, impl, mesh)
    if batch == ceiling_batch:
      inputs["matmul"] = (jnp.asarray(img), jnp.asarray(txt))
      fns[("matmul", "matmul")] = jax.jit(lambda a, b: a @ b.T)
    reps = 3 if quick or batch > 2**13 else 7
    print(f"timing B={batch} x{reps}: {sorted(fns)}", flush=True)
    for (kind, impl), t in time_round_robin(fns, lambda name: inputs[name[1]], reps).items():
      if kind == "matmul":
        flops = 2.0 * batch * batch * WIDTH
        ceiling = {"impl": "matmul_ceiling", "batch": batch, "width": WIDTH,
                   "flops_per_s": flops / float(np.median(t["wall"])),
                   "cpu_flops_per_s": flops / float(np.median(t["cpu"]))}
      else:
        times[(kind, impl, batch)] = t
  records = []
  for kind in KINDS:
    for impl in IMPLS:
      for batch in sorted(set(mem_batches) | {b for (_, _, b) in times}):
        temp = temp_bytes(kind, impl, batch, mesh)
        records.append(_record(kind, impl, batch, temp, times.get((kind, impl, batch))))
        print(f"memory {kind} {impl} B={batch}: {temp / 2**20:.1f} MiB", flush=True)
  records.append(ceiling)
  return records


def float64_reference(img, txt, scale, bias, block=512):
  """Both losses in float64, one [block, B] slab of logits at a time.

  One exp per logit serves both losses: with normalised rows |scale * x.y| <= shift, so
  exp(scale * x.y - shift) neither overflows nor underflows (asserted), the softmax
  normalisers are shift + log of its row / column sums, and the sigmoid's softplus(l) is
  log1p(exp(l)) = log1p(that exp * e^(shift + bias)).
  """
  batch = img.shape[0]
  x64, y64 = img.astype(np.float64), txt.astype(np.float64)
  shift = abs(scale) * np.linalg.norm(x64, axis=1).max() * np.linalg.norm(y64, axis=1).max()
  assert 2 * shift < 600 and shift + abs(bias) < 600, "reference assumes moderate logits"
  diag = np.einsum("nd,nd->n", x64, y64)
  row_lse = np.empty(batch)
  col_sum = np.zeros(batch)
  softplus_sum = 0.0
  slab = np.empty((block, batch))
  for start in range(0, batch, block):
    rows = slice(start, min(start + block, batch))
    out = slab[:rows.stop - rows.start]
    np.matmul(x64[rows], y64.T, out=out)
    out *= scale
    out -= shift
    np.exp(out, out=out)
    row_lse[rows] = shift + np.log(out.sum(axis=1))
    col_sum += out.sum(axis=0)
    out *= np.exp(shift + bias)
    np.log1p(out, out=out)
    softplus_sum += out.sum()
  col_lse = shift + np.log(col_sum)
  softmax = 0.5 * (np.sum(row_lse) + np.sum(col_lse) - 2 * scale * diag.sum()) / batch
  # -log sigmoid(z l) = softplus(l) - [i == j] l.
  sigmoid = (softplus_sum - np.sum(scale * diag + bias)) / batch
  return {"softmax": softmax, "sigmoid": sigmoid}


def run_big(batch=2**17):
  """Chunked loss-and-gradient at a batch naive could never hold, checked against float64."""
  img, txt = embeddings(batch, seed=1)
  img_j, txt_j = jnp.asarray(img), jnp.asarray(txt)
  records = []
  for kind in KINDS:
    fn = _grad_fn(kind, "chunked", None)
    args = (img_j, txt_j, jnp.float32(SCALE), jnp.float32(SIGMOID_BIAS))
    compiled = fn.lower(*args).compile()
    start, cpu_start = time.perf_counter(), time.process_time()
    (value, grads) = jax.block_until_ready(compiled(*args))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    del grads
    rec = _record(kind, "chunked", batch, int(compiled.memory_analysis().temp_size_in_bytes),
                  {"wall": [seconds], "cpu": [cpu_seconds]})
    rec.update(big=True, value=float(value),
               peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    records.append(rec)
    print(f"big {kind}: loss {float(value):.8f} in {seconds:.0f} s, peak RSS "
          f"{rec['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
  start = time.perf_counter()
  reference = float64_reference(img, txt, SCALE, SIGMOID_BIAS)
  print(f"float64 reference in {time.perf_counter() - start:.0f} s", flush=True)
  for rec in records:
    rec["reference_f64"] = float(reference[rec["loss"]])
    rec["rel_err"] = abs(rec["value"] - rec["reference_f64"]) / abs(rec["reference_f64"])
  return records


def markdown_table(records):
  """One row per record: memory, median wall time, model FLOP/s and its share of the ceiling."""
  ceiling = next((r["flops_per_s"] for r in records if r["impl"] == "matmul_ceiling"), None)
  lines = ["| loss | impl | B | devices | temp memory | seconds | GFLOP/s | of ceiling |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in records:
    if r["impl"] == "matmul_ceiling":
      continue
    temp = r["temp_bytes"]
    mem = f"{temp / 2**30:.3f} GiB" if temp >= 2**30 else f"{temp / 2**20:.1f} MiB"
    sec = "" if r["seconds"] is None else f"{r['seconds']:.3f}"
    gflops = "" if r["flops_per_s"] is None else f"{r['flops_per_s'] / 1e9:.1f}"
    frac = ("" if r["flops_per_s"] is None or not ceiling
            else f"{r['flops_per_s'] / ceiling:.2f}")
    lines.append(f"| {r['loss']} | {r['impl']} | 2^{int(np.log2(r['batch']))} | "
                 f"{r['devices']} | {mem} | {sec} | {gflops} | {frac} |")
  if ceiling:
    lines.append(f"\nmatmul ceiling: {ceiling / 1e9:.1f} GFLOP/s")
  return "\n".join(lines)


def speed_summary(records):
  """Chunked against naive at the largest batch both ran: ratio of median wall times, median
  of the per-round ratios (each round runs both back to back, so load from other jobs hits
  them alike), ratio of CPU times; and chunked against the matmul ceiling."""
  ceiling = next((r for r in records if r["impl"] == "matmul_ceiling"), None)
  timed = {(r["loss"], r["impl"], r["batch"]): r for r in records
           if r.get("seconds") is not None and not r.get("big")}
  lines = []
  for kind in KINDS:
    shared = [b for (k, i, b) in timed if k == kind and i == "naive"
              and (kind, "chunked", b) in timed]
    if not shared:
      continue
    batch = max(shared)
    chunked, naive = timed[(kind, "chunked", batch)], timed[(kind, "naive", batch)]
    paired = np.median(np.asarray(chunked["rounds"]) / np.asarray(naive["rounds"]))
    line = (f"{kind} B={batch}: chunked / naive time = {chunked['seconds'] / naive['seconds']:.2f}"
            f" (median of per-round ratios {paired:.2f}, CPU time "
            f"{chunked['cpu_seconds'] / naive['cpu_seconds']:.2f})")
    if ceiling:
      flops = 6.0 * batch * batch * WIDTH
      line += (f"; chunked at {chunked['flops_per_s'] / ceiling['flops_per_s']:.2f} of the "
               f"matmul ceiling ({flops / chunked['cpu_seconds'] / ceiling['cpu_flops_per_s']:.2f}"
               " in CPU time)")
    lines.append(line)
  return "\n".join(lines)


def plot(records, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 5))
  colors = dict(zip(IMPLS, ("tab:red", "tab:blue", "tab:green")))
  for kind, style in zip(KINDS, ("-", "--")):
    for impl in IMPLS:
      pts = sorted((r["batch"], r["temp_bytes"]) for r in records
                   if r.get("loss") == kind and r["impl"] == impl and not r.get("big"))
      if pts:
        label = f"{kind} {impl}" + (" (per device, 8 devices)" if impl == "ring" else "")
        ax.plot(*zip(*pts), style, color=colors[impl], marker="o", label=label)
  ax.axhline(2**30, color="gray", lw=0.8, ls=":", label="1 GiB")
  ax.set(xscale="log", yscale="log", xlabel="global batch B", ylabel="temporary bytes",
         title=f"Contrastive loss-and-gradient memory (width {WIDTH})")
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=120, bbox_inches="tight")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="JSON file for the records (and a .png plot beside it)")
  parser.add_argument("--quick", action="store_true", help="a one-minute subset")
  parser.add_argument("--big", action="store_true", help="only the B = 2^17 exact run")
  args = parser.parse_args()
  if args.big:
    records = run_big()
    if args.out and os.path.exists(args.out):
      with open(args.out) as f:
        records = [r for r in json.load(f) if not r.get("big")] + records
  else:
    records = run_sweep(args.quick)
    if args.out and os.path.exists(args.out):  # keep an earlier --big result
      with open(args.out) as f:
        records += [r for r in json.load(f) if r.get("big")]
  print(markdown_table(records))
  print(speed_summary(records))
  for r in records:
    if r.get("big"):
      print(f"B=2^17 {r['loss']}: loss {r['value']:.8f}, float64 {r['reference_f64']:.8f}, "
            f"relative error {r['rel_err']:.1e}, {r['seconds']:.0f} s, peak RSS "
            f"{r['peak_rss_bytes'] / 2**30:.2f} GiB")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(records, f, indent=1)
    plot(records, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
  main()
