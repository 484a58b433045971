"""Single-device chunked contrastive losses: exact, with O(B + chunk^2 + chunk * D) temporaries.

Both losses are custom VJPs. Softmax runs one sweep for the row / column log-sum-exps and, in
the backward pass, a second sweep that recomputes each tile and accumulates the gradients.
Sigmoid pairs are independent, so under differentiation a single fused sweep computes loss
and gradients together (three matmuls per tile, the same count as naive autodiff) and the
backward pass only scales them by the cotangent.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vljax.losses import _tiles

F32 = jnp.float32
DEFAULT_CHUNK = 1024


def loss(kind, img_bd, txt_bd, scale, bias, *, chunk_size=None):
  """(loss, metrics) of `kind` ("softmax" / "sigmoid") computed tile by tile."""
  batch = img_bd.shape[0]
  chunk = min(chunk_size or DEFAULT_CHUNK, batch)
  return _loss_fn(kind, chunk, img_bd.dtype, txt_bd.dtype)(img_bd, txt_bd, scale, bias)


def pad_to_chunks(img_bd, txt_bd, chunk):
  """Pads the batch to a multiple of chunk (only when needed); returns ids with -1/-2 pads."""
  batch = img_bd.shape[0]
  padded = -(-batch // chunk) * chunk
  ids_n = jnp.arange(padded, dtype=jnp.int32)
  row_ids_n = jnp.where(ids_n < batch, ids_n, -1)
  col_ids_n = jnp.where(ids_n < batch, ids_n, -2)
  if padded != batch:
    pad = ((0, padded - batch), (0, 0))
    img_bd, txt_bd = jnp.pad(img_bd, pad), jnp.pad(txt_bd, pad)
  return img_bd, txt_bd, row_ids_n, col_ids_n


def sum_of_logits(img_bd, txt_bd, scale, bias, batch, total=jnp.sum):
  """sum_ij logits_ij without the matrix: scale * (sum_i x_i) . (sum_j y_j) + B^2 bias."""
  img_sum_d = total(img_bd.astype(F32), axis=0)
  txt_sum_d = total(txt_bd.astype(F32), axis=0)
  return scale * jnp.dot(img_sum_d, txt_sum_d) + float(batch) ** 2 * bias


def diagonal_dots(img_nd, txt_nd):
  """x_i . y_i for every pair, in float32."""
  return jnp.einsum("nd,nd->n", img_nd, txt_nd, preferred_element_type=F32)


@functools.lru_cache(maxsize=None)
def _loss_fn(kind, chunk, img_dtype, txt_dtype):
  """A custom-VJP function (img, txt, scale, bias) -> (loss, metrics) for static settings."""
  forward = _softmax_forward if kind == "softmax" else _sigmoid_forward

  @jax.custom_vjp
  def fn(img_bd, txt_bd, scale, bias):
    return forward(img_bd, txt_bd, scale, bias, chunk, with_grads=False)[0]

  def fn_fwd(img_bd, txt_bd, scale, bias):
    return forward(img_bd, txt_bd, scale, bias, chunk, with_grads=True)

  def fn_bwd(residuals, cotangents):
    ct = cotangents[0]  # metrics are not differentiated
    if kind == "softmax":
      return _softmax_backward(residuals, ct, chunk)
    dtypes = (img_dtype, txt_dtype, F32, F32)
    return tuple((ct * g).astype(dt) for g, dt in zip(residuals, dtypes))

  fn.defvjp(fn_fwd, fn_bwd)
  return fn


def _softmax_forward(img_bd, txt_bd, scale, bias, chunk, with_grads):
  """Loss and metrics; with_grads adds the residuals (inputs and both normalisers)."""
  batch, _ = img_bd.shape
  img_nd, txt_nd, row_ids_n, col_ids_n = pad_to_chunks(img_bd, txt_bd, chunk)
  n = row_ids_n.shape[0]
  ctx = _tiles.Ctx(scale, bias, jnp.zeros((), F32))
  row_st, col_st = _tiles.sweep(
      _tiles.softmax_forward_tile, ctx, {"x": img_nd, "ids": row_ids_n},
      {"y": txt_nd, "ids": col_ids_n}, _tiles.softmax_row_init(n),
      _tiles.softmax_col_init(n), chunk)
  valid_n = row_ids_n >= 0
  row_norm, row_ce_n = _tiles.softmax_finish(ctx, row_st, row_st["diag"], valid_n)
  col_norm, col_ce_n = _tiles.softmax_finish(ctx, col_st, row_st["diag"], valid_n)
  out = (0.5 * (jnp.sum(row_ce_n) + jnp.sum(col_ce_n)) / batch,
         _tiles.metrics(ctx, row_st["diag"], row_st["max"], col_st["max"], valid_n,
                        sum_of_logits(img_bd, txt_bd, scale, bias, batch), batch, jnp.sum))
  return out, (img_bd, txt_bd, scale, bias, row_norm, col_norm)


def _softmax_backward(residuals, ct, chunk):
  """Second sweep: recompute tiles, accumulate d/dimg, d/dtxt and d/dscale."""
  img_bd, txt_bd, scale, bias, row_norm, col_norm = residuals
  batch, width = img_bd.shape
  img_nd, txt_nd, row_ids_n, col_ids_n = pad_to_chunks(img_bd, txt_bd, chunk)
  n = row_ids_n.shape[0]
  ctx = _tiles.Ctx(scale, bias, (ct / batch).astype(F32))
  ddot_n = diagonal_dots(img_nd, txt_nd)
  row_st, col_st = _tiles.sweep(
      _tiles.softmax_backward_tile, ctx,
      {"x": img_nd, "ids": row_ids_n, "ddot": ddot_n, **row_norm,
       "gdiag": _tiles.softmax_diag_grad(ctx, row_norm, col_norm)},
      {"y": txt_nd, "ids": col_ids_n, "ddot": ddot_n, **col_norm},
      _tiles.grad_row_init(n, width), _tiles.grad_col_init(n, width), chunk)
  return (row_st["gx"][:batch].astype(img_bd.dtype), col_st["gy"][:batch].astype(txt_bd.dtype),
          jnp.sum(row_st["gscale"]), jnp.zeros_like(bias))


def _sigmoid_forward(img_bd, txt_bd, scale, bias, chunk, with_grads):
  """Loss and metrics; with_grads runs the fused sweep and keeps the gradients as residuals."""
  batch, width = img_bd.shape
  img_nd, txt_nd, row_ids_n, col_ids_n = pad_to_chunks(img_bd, txt_bd, chunk)
  n = row_ids_n.shape[0]
  rows, cols = {"x": img_nd, "ids": row_ids_n}, {"y": txt_nd, "ids": col_ids_n}
  if with_grads:
    ctx = _tiles.Ctx(scale, bias, jnp.asarray(1.0 / batch, F32))
    row_st, col_st = _tiles.sweep(
        _tiles.sigmoid_fused_tile, ctx, rows, cols, _tiles.grad_row_init(n, width, sigmoid=True),
        _tiles.grad_col_init(n, width, sigmoid=True), chunk)
  else:
    ctx = _tiles.Ctx(scale, bias, jnp.zeros((), F32))
    row_st, col_st = _tiles.sweep(
        _tiles.sigmoid_forward_tile, ctx, rows, cols, _tiles.sigmoid_row_init(n),
        _tiles.sigmoid_col_init(n), chunk)
  valid_n = row_ids_n >= 0
  value = jnp.sum(row_st["loss"]) / batch
  out = (value, _tiles.metrics(ctx, row_st["diag"], row_st["max"], col_st["max"], valid_n,
                               sum_of_logits(img_bd, txt_bd, scale, bias, batch), batch,
                               jnp.sum))
  if not with_grads:
    return out, None
  grads = (row_st["gx"][:batch], col_st["gy"][:batch], jnp.sum(row_st["gscale"]),
           jnp.sum(row_st["gbias"]))
  return out, grads
