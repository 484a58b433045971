"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): fine-tuning a
transformer stack through low-rank adapters on chosen projections, its base weights frozen.

An adapted projection computes x W + b + (alpha / rank) (x A) B; its parameters are the base
"kernel" (and "bias") with "lora_a" [in..., rank] and "lora_b" [rank, out...] beside them
(`vljax.nn.layers.LoraDenseGeneral`). Every `BlockConfig` stack takes them from three fields,
which `vljax.models.lm.LM` (and T5) expose, so a config turns them on:

    config.model.lora_rank = 8  # 0 (the default): no adapters, the usual parameter tree
    config.model.lora_alpha = 16.0  # the adapters' output is scaled by alpha / rank
    config.model.lora_targets = ("query", "value")  # or more of LORA_TARGETS
    config.optim.freeze = "(?!(?:.*/)?lora_[ab]$).*"  # = lora.frozen_regex(): train adapters only

The freeze pattern fully matches every parameter path except the adapters', so the base
weights get no gradient, no optimizer state and stay bitwise unchanged (`vljax.train.optim`).
Parameters trained beside the adapters (LLaVA's projector) are left out with
`lora.frozen_regex("projector/.*")`. For export, `merge` folds each adapter into its kernel;
the merged tree is the params of the same model with lora_rank=0:

    merged = lora.merge(params, alpha=model.lora_alpha, rank=model.lora_rank)
    hf_lm.save("/tmp/out", model.clone(lora_rank=0), merged)  # vljax.convert.hf_lm
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ATTENTION_TARGETS = ("query", "key", "value", "out")
MLP_TARGETS = ("fc1", "fc2")
GATED_MLP_TARGETS = ("gate", "up", "down")
# Projection names that may get adapters (in self- and cross-attention, and the MLP).
LORA_TARGETS = ATTENTION_TARGETS + MLP_TARGETS + GATED_MLP_TARGETS
ADAPTER_NAMES = ("lora_a", "lora_b")


def lora_param_regex() -> str:
  """The regex (full match on "a/b/c" parameter paths, as `vljax.train.optim.path_mask`) of
  the adapter parameters."""
  return r"(?:.*/)?lora_[ab]"


def frozen_regex(*trainable: str) -> str:
  """A `config.optim.freeze` pattern that freezes every parameter but the adapters and those
  whose path fully matches one of the `trainable` regexes (e.g. "projector/.*")."""
  for pattern in trainable:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"trainable pattern {pattern!r} is not a valid regex: {e}") from None
  keep = "".join(f"(?!(?:{pattern})$)" for pattern in trainable)
  return f"(?!{lora_param_regex()}$){keep}.*"


def _value(leaf: Any) -> Any:
  return leaf.value if isinstance(leaf, nn.Partitioned) else leaf


def _rebox(like: Any, value: Any) -> Any:
  return like.replace_boxed(value) if isinstance(like, nn.Partitioned) else value


def _merged_kernel(path: str, kernel, lora_a, lora_b, scale: float, rank: int):
  """kernel + scale * A B, in float32 (or wider) and then the kernel's dtype. A layer-stacked
  (scanned) tree has leading layer axes on all three, which the product keeps."""
  kernel, a, b = _value(kernel), _value(lora_a), _value(lora_b)
  stacked = a.ndim + b.ndim - 2 - kernel.ndim  # leading layer axes (scan)
  lead = tuple(a.shape[:max(stacked, 0)])
  fits = (stacked >= 0 and tuple(b.shape[:stacked]) == lead
          and lead + tuple(a.shape[stacked:-1]) + tuple(b.shape[stacked + 1:]) == kernel.shape)
  if not fits or a.shape[-1] != rank or b.shape[stacked] != rank:
    raise ValueError(f"{path}: lora_a {a.shape} and lora_b {b.shape} of rank {rank} do not fit "
                     f"kernel {kernel.shape}")
  wide = jnp.promote_types(kernel.dtype, jnp.float32)
  a_lir = jnp.asarray(a, wide).reshape(lead + (-1, rank))
  b_lro = jnp.asarray(b, wide).reshape(lead + (rank, -1))
  delta_lio = jnp.matmul(a_lir, b_lro, precision=jax.lax.Precision.HIGHEST)
  delta = delta_lio.reshape(kernel.shape)
  return (jnp.asarray(kernel, wide) + scale * delta).astype(kernel.dtype)


def merge(params: Mapping, *, alpha: float, rank: int) -> dict:
  """`params` with every adapter folded into its kernel (W + (alpha / rank) A B) and the
  "lora_a" / "lora_b" leaves dropped: the parameters of the same model with lora_rank=0, which
  computes what the adapted one does (up to float rounding). `alpha` and `rank` are the model's
  lora_alpha and lora_rank; logical-axis boxes, if any, are kept."""
  if rank < 1:
    raise ValueError(f"merge needs the adapters' rank (>= 1), got {rank}")
  scale = alpha / rank

  def walk(tree: Any, path: str) -> Any:
    if not isinstance(tree, Mapping):
      return tree
    out = {name: walk(child, f"{path}/{name}" if path else name)
           for name, child in tree.items() if name not in ADAPTER_NAMES}
    present = [name for name in ADAPTER_NAMES if name in tree]
    if not present:
      return out
    if len(present) == 1 or "kernel" not in tree:
      raise ValueError(f"{path}: an adapter needs lora_a, lora_b and the kernel beside them; "
                       f"found {sorted(tree)}")
    kernel = tree["kernel"]
    merged = _merged_kernel(path, kernel, tree["lora_a"], tree["lora_b"], scale, rank)
    out["kernel"] = _rebox(kernel, merged)
    return out

  return walk(params, "")


def count_params(params: Any) -> tuple[int, int]:
  """(adapter parameters, all parameters) of a tree: the share that LoRA trains."""
  regex = re.compile(lora_param_regex())
  adapters = total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]:
    size = int(np.prod(np.shape(leaf)))
    total += size
    names = "/".join(str(getattr(key, "key", key)) for key in path)
    adapters += size if regex.fullmatch(names) else 0
  return adapters, total
