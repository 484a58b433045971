"""Position-embedding tables resampled to another image grid, as each original code does it.

A ViT's learned position embeddings form a grid (rows x columns of patches, after any prefix
tokens such as CLIP's CLS). Running a checkpoint at another image size resamples that grid, and
the codebases vljax imports from do it differently, so each is reproduced exactly:

- "bicubic": PyTorch `F.interpolate(mode="bicubic", align_corners=False)` without antialiasing,
  as transformers' CLIP / SigLIP `interpolate_pos_encoding` (cubic convolution with a = -0.75,
  edge pixels repeated).
- "bicubic_antialias": the same call with `antialias=True`, open_clip's `resize_pos_embed`
  default (PIL's filter: a = -0.5, the support widened by the scale when shrinking, weights
  renormalised at the borders).
- "bilinear_antialias": `F.interpolate(mode="bilinear", antialias=True, align_corners=False)`,
  how transformers' SigLIP 2 fits its position grid to each image's patch grid (PIL's triangle
  filter, widened and renormalised the same way).
- "bilinear_corners": `scipy.ndimage.zoom(order=1)`, big_vision's `resample_posemb` (linear,
  the corner samples of both grids aligned).

Every method is separable: one (new, old) weight matrix per axis, computed in float64.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np

METHODS = ("bicubic", "bicubic_antialias", "bilinear_antialias", "bilinear_corners")


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _bicubic_weights(old: int, new: int) -> np.ndarray:
  """torch bicubic, align_corners=False, no antialias: 4 taps, indices clamped to the edge."""
  scale = old / new
  src = (np.arange(new) + 0.5) * scale - 0.5  # not clamped at 0 for the cubic mode
  base = np.floor(src)
  frac = src - base
  weights = np.zeros((new, old))
  for tap in (-1, 0, 1, 2):
    index = np.clip(base + tap, 0, old - 1).astype(int)
    np.add.at(weights, (np.arange(new), index), _cubic(frac - tap, -0.75))
  return weights


def _triangle(x: np.ndarray) -> np.ndarray:
  return np.maximum(1.0 - np.abs(x), 0.0)


def _antialias_weights(old: int, new: int, kernel: Callable[[np.ndarray], np.ndarray],
                       radius: float) -> np.ndarray:
  """torch's antialiased interpolation (PIL's): `kernel`, nonzero within `radius` pixels, is
  stretched by the scale when shrinking; the weights of the taps inside the grid sum to 1."""
  scale = old / new
  stretch = max(scale, 1.0)
  support = radius * stretch
  weights = np.zeros((new, old))
  for i in range(new):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), old)
    taps = np.arange(lo, hi)
    w = kernel((taps - center + 0.5) / stretch)
    weights[i, lo:hi] = w / w.sum()
  return weights


def _bicubic_antialias_weights(old: int, new: int) -> np.ndarray:
  """torch bicubic with antialias=True: a = -0.5, support widened when shrinking."""
  return _antialias_weights(old, new, kernel=lambda x: _cubic(x, -0.5), radius=2.0)


def _bilinear_antialias_weights(old: int, new: int) -> np.ndarray:
  """torch bilinear with antialias=True: the triangle filter, as wide as the scale when
  shrinking (plain bilinear, edges clamped, when growing)."""
  return _antialias_weights(old, new, kernel=_triangle, radius=1.0)


def _corner_linear_weights(old: int, new: int) -> np.ndarray:
  """scipy.ndimage.zoom(order=1): sample i of the new grid at i * (old - 1) / (new - 1)."""
  weights = np.zeros((new, old))
  if new == 1 or old == 1:
    weights[:, 0] = 1.0
    return weights
  src = np.arange(new) * (old - 1) / (new - 1)
  base = np.minimum(np.floor(src).astype(int), old - 2)
  frac = src - base
  np.add.at(weights, (np.arange(new), base), 1 - frac)
  np.add.at(weights, (np.arange(new), base + 1), frac)
  return weights


_WEIGHTS = {"bicubic": _bicubic_weights, "bicubic_antialias": _bicubic_antialias_weights,
            "bilinear_antialias": _bilinear_antialias_weights,
            "bilinear_corners": _corner_linear_weights}


def resample_grid(grid_hwd: np.ndarray, new_hw: tuple[int, int], *, method: str) -> np.ndarray:
  """A (rows, cols, dim) grid resampled to new_hw rows and columns, in the grid's dtype."""
  if method not in _WEIGHTS:
    raise ValueError(f"Unknown position-embedding resampling {method!r}; choose one of {METHODS}")
  grid_hwd = np.asarray(grid_hwd)
  if grid_hwd.ndim != 3:
    raise ValueError(f"Expected a (rows, cols, dim) grid, got shape {grid_hwd.shape}")
  (h, w), (nh, nw) = grid_hwd.shape[:2], new_hw
  if (h, w) == (nh, nw):
    return grid_hwd
  rows, cols = _WEIGHTS[method](h, nh), _WEIGHTS[method](w, nw)
  out = np.einsum("ai,ijd,bj->abd", rows, grid_hwd.astype(np.float64), cols)
  return out.astype(grid_hwd.dtype)


def resample(table_ld: np.ndarray, new_hw: tuple[int, int], *, method: str,
             num_prefix: int = 0, old_hw: tuple[int, int] | None = None) -> np.ndarray:
  """A (prefix + rows * cols, dim) position table for the grid new_hw.

  The first num_prefix rows (CLS and other extra tokens) are kept as they are; the rest form
  the old grid, square unless old_hw says otherwise.
  """
  table_ld = np.asarray(table_ld)
  prefix, patches = table_ld[:num_prefix], table_ld[num_prefix:]
  if old_hw is None:
    side = math.isqrt(patches.shape[0])
    if side * side != patches.shape[0]:
      raise ValueError(f"A position table of {patches.shape[0]} patch rows (after {num_prefix} "
                       "prefix rows) is not a square grid; pass old_hw")
    old_hw = (side, side)
  if old_hw[0] * old_hw[1] != patches.shape[0]:
    raise ValueError(f"old_hw {old_hw} does not match the table's {patches.shape[0]} patch rows")
  grid = resample_grid(patches.reshape(*old_hw, -1), new_hw, method=method)
  return np.concatenate([prefix, grid.reshape(-1, table_ld.shape[-1])], 0)


def resize_image_tower(params: Mapping, tower: str | None, *, image_size: int, patch_size: int,
                       num_prefix: int, method: str) -> dict:
  """Params whose ViT (`params[tower]`, or `params` itself when tower is None) has its learned
  position table, [1, prefix + rows * cols, dim] at "pos_embedding/pos_embedding", resampled
  for square images of `image_size` pixels (a grid of image_size // patch_size)."""
  if image_size < patch_size:
    raise ValueError(f"image_size {image_size} is smaller than the patch size {patch_size}")
  vit = dict(params[tower] if tower is not None else params)
  table = np.asarray(vit["pos_embedding"]["pos_embedding"])
  grid = image_size // patch_size
  resized = resample(table[0], (grid, grid), method=method, num_prefix=num_prefix)[None]
  vit["pos_embedding"] = {**vit["pos_embedding"], "pos_embedding": resized}
  return {**params, tower: vit} if tower is not None else vit
