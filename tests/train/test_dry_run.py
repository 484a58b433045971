"""--dry_run reports parameters, FLOPs and compiled per-device memory without allocating."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.train.helpers import tiny_config, xla_flags
from vljax.nn import constrain
from vljax.train.dry_run import CPU_MEMORY_NOTE, abstract_inputs, dry_run, format_report
from vljax.train.loop import build_experiment

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_dry_run_counts_flops_and_memory():
  config = tiny_config()
  config.mesh = [("data", 2), ("fsdp", 4), ("tensor", 1)]
  report = dry_run(config)
  assert report["params/total"] == report["params/img"] + report["params/txt"] + report["params/t"]
  assert report["memory/temp_bytes_per_device"] > 0
  assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert report["backend"] == "cpu"
  # FLOPs come from the unrolled program, so a scanned model reports the same count.
  scanned = tiny_config()
  scanned.mesh = config.mesh
  scanned.model["image"]["scan"] = True
  scanned.model["image"]["depth"] = 1
  assert dry_run(scanned)["flops_per_step"] == pytest.approx(report["flops_per_step"], rel=1e-3)
  # Doubling the image tower depth adds FLOPs (the scan body is not counted once only).
  deeper = tiny_config()
  deeper.mesh = config.mesh
  deeper.model["image"].update(scan=True, depth=3)
  assert dry_run(deeper)["flops_per_step"] > 1.2 * report["flops_per_step"]


def test_report_labels_cpu_compiled_memory():
  """Memory compiled on the CPU backend says so, and why a TPU or GPU needs less."""
  report = {"params/img": 3_000_000, "params/total": 3_000_000, "mesh": {"data": 2},
            "batch_size": 8, "flops_per_step": 2e12,
            **{f"memory/{k}_bytes_per_device": 2**30 for k in
               ("argument", "output", "temp", "alias", "total")}}
  cpu = format_report({**report, "backend": "cpu"}, "clip")
  memory_lines = [line for line in cpu.splitlines() if "per-device memory" in line]
  assert len(memory_lines) == 5
  assert all("per-device memory (CPU-compiled)" in line for line in memory_lines)
  assert "compiled for the cpu backend" in cpu.splitlines()[0]
  assert cpu.endswith(CPU_MEMORY_NOTE)
  for words in ("float32 copies", "typically lower", "92.9 GiB", "~55 GiB", "~44 GiB",
                "--topology"):
    assert words in CPU_MEMORY_NOTE, words
  tpu = format_report({**report, "backend": "tpu"}, "clip")
  assert "CPU" not in tpu and "  per-device memory     total:     1.00 GiB" in tpu


def test_main_dry_run_and_missing_data_source():
  """The accelerator configs dry-run on a CPU host, and refuse to train without real data."""
  env = dict(os.environ, XLA_FLAGS=xla_flags())
  proc = subprocess.run([sys.executable, "experiments/main.py", "--config=clip_b16.py", "--dry_run",
                         "--topology=none", "--config.batch_size=16", "--config.microbatches=1",
                         "--config.model.image.variant=mu/16",
                         "--config.model.text.variant=mu"],
                        capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "per-device memory (CPU-compiled)" in proc.stdout and "FLOPs per step" in proc.stdout
  assert "compiled for the CPU backend" in proc.stdout
  proc = subprocess.run([sys.executable, "experiments/main.py", "--config=clip_b16.py",
                         "--workdir=/tmp/vljax_never_trains"],
                        capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
  assert proc.returncode != 0
  assert "config.data.source" in proc.stderr + proc.stdout


def test_train_step_keeps_one_batch_shard_per_device():
  """Activations stay split over ("data", "fsdp") like the batch inside the compiled step.

  Regression: the experiment context entered the mesh with `with mesh:`, which no longer sets
  the context mesh that `nn.with_logical_constraint` reads (JAX 0.10), so every activation
  constraint was a silent no-op and XLA gathered the whole batch onto each fsdp device (the
  coca_large dry run: 1160 GiB of temporaries per device instead of 93).
  """
  config = tiny_config(batch_size=16, family="coca", mesh=[("data", 1), ("fsdp", 8), ("tensor", 1)])
  config.model = dict(width=32, num_heads=2, mlp_dim=64, unimodal_depth=1,
                      multimodal_depth=1, num_caption_queries=4, scan=True, remat="dots_no_batch",
                      image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8,
                                 scan=True, remat="dots_no_batch"))
  config.data = dict(image_size=32, max_text_len=17, text_bos=True)
  exp = build_experiment(config)
  batch, length, vocab = config.batch_size, config.data["max_text_len"] - 1, exp.tokenizer.vocab_size
  with exp.context():
    pin = jax.jit(lambda x: constrain(x, ("batch", "seq", "act_embed")))
    sharding = pin.lower(jax.ShapeDtypeStruct((batch, 4, 8), jnp.float32)).compile().output_shardings
    assert sharding.is_equivalent_to(NamedSharding(exp.mesh, P(("data", "fsdp"))), 3), sharding
    # LLVM optimisation does not change the buffers; level 0 halves the compile time.
    hlo = exp.train_step.lower(*abstract_inputs(exp)).compile(
        {"xla_backend_optimization_level": 0}).as_text()
  # The per-device program computes the captioning logits of its batch / 8 examples only.
  assert f"[{batch // 8},{length},{vocab}]" in hlo
  assert f"[{batch},{length},{vocab}]" not in hlo
