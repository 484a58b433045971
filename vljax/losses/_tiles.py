"""Tile kernels shared by the chunked and ring contrastive losses.

A sweep visits every (row block, column block) pair of a rows x columns problem, chunk x chunk
logits at a time, and threads two states through it: a row state (one entry per image row)
and a column state (one entry per text column). Each tile kernel below reads its slice of
both and returns them updated, so no [rows, columns] array ever exists.

Rows and columns carry global ids; padding rows have id -1 and padding columns -2, so a pair
is valid when both ids are >= 0 and on the diagonal (a positive pair) when they are equal.
All arithmetic is float32; matmul operands keep the embedding dtype.

Numerics. Maxima are tracked in "dot space", u = sign(scale) * x.y, so that a shifted logit
|scale| * (u - u_max) is exactly 0 at the maximum whatever the compiler fuses: computing
scale * dot - max instead lets one pass contract it into a fused multiply-add and another
not, and a half-ulp difference at logit 100 (4e-6) would scale every softmax probability.
The softmax's diagonal gradient p_ii - 1 is likewise never formed directly (it cancels to a
few ulps when training has converged): it is minus the row's off-diagonal probability mass,
which the forward sweep accumulates separately from the diagonal term.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

F32 = jnp.float32
# Stand-in for -inf as a running maximum in dot space: finite, so rescalings never see
# inf - inf = nan; masked entries are excluded explicitly rather than through exp underflow.
NEG = -1e30


class Ctx(NamedTuple):
  """Scalars every tile needs. grad_weight multiplies d loss / d logits (cotangent / B)."""
  scale: jax.Array
  bias: jax.Array
  grad_weight: jax.Array


def sweep(tile_fn: Callable, ctx: Ctx, rows: dict, cols: dict, row_state: dict,
          col_state: dict, chunk: int):
  """Runs tile_fn over all chunk x chunk tiles; returns (row_state, col_state).

  rows / row_state (cols / col_state) are dicts of arrays whose leading dimension is the
  number of rows (columns), a multiple of chunk. The outer loop walks row blocks, the inner
  loop column blocks; both states are loop carries updated in place, so temporaries stay
  O(chunk^2 + chunk * D) beyond the states themselves.
  """
  n_rows = rows["ids"].shape[0] // chunk
  n_cols = cols["ids"].shape[0] // chunk
  block = lambda tree, n: jax.tree.map(lambda a: a.reshape(n, chunk, *a.shape[1:]), tree)
  take = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
  put = lambda tree, i, new: jax.tree.map(lambda a, u: a.at[i].set(u), tree, new)
  rows_b, cols_b = block(rows, n_rows), block(cols, n_cols)

  def row_step(carry, k):
    row_state_b, col_state_b = carry
    row_in = take(rows_b, k)

    def col_step(inner, l):
      row_blk, col_state_b = inner
      row_blk, col_blk = tile_fn(ctx, row_in, take(cols_b, l), row_blk, take(col_state_b, l))
      return (row_blk, put(col_state_b, l, col_blk)), None

    (row_blk, col_state_b), _ = jax.lax.scan(
        col_step, (take(row_state_b, k), col_state_b), jnp.arange(n_cols))
    return (put(row_state_b, k, row_blk), col_state_b), None

  (row_state_b, col_state_b), _ = jax.lax.scan(
      row_step, (block(row_state, n_rows), block(col_state, n_cols)), jnp.arange(n_rows))
  unblock = lambda tree: jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), tree)
  return unblock(row_state_b), unblock(col_state_b)


class _Tile(NamedTuple):
  """One tile of pairs, rows i (images) by columns j (texts)."""
  dots: jax.Array    # x_i . y_j, float32
  u: jax.Array       # sign(scale) * dots: orders pairs as the logits do
  valid: jax.Array   # both ids real
  diag: jax.Array    # positive pair
  off: jax.Array     # valid and not the positive pair


def _tile(ctx, row_in, col_in):
  """The tile's dots and masks (chunk x chunk); the only matmul of a forward tile."""
  dots_ij = jnp.einsum("id,jd->ij", row_in["x"], col_in["y"], preferred_element_type=F32)
  row_ids, col_ids = row_in["ids"][:, None], col_in["ids"][None, :]
  valid_ij = (row_ids >= 0) & (col_ids >= 0)
  diag_ij = row_ids == col_ids  # ids of padding rows and columns never match
  return _Tile(dots_ij, jnp.sign(ctx.scale) * dots_ij, valid_ij, diag_ij, valid_ij & ~diag_ij)


def _masked_max(t, axis):
  """Dot-space maximum over the valid pairs of a tile along `axis`."""
  return jnp.max(jnp.where(t.valid, t.u, NEG), axis=axis)


def _diagonal_dots(t):
  """Per-row dot of the positive pair (0 for rows whose positive is not in this tile)."""
  return jnp.sum(jnp.where(t.diag, t.dots, 0.0), axis=1)


def _grad_matmuls(ctx, row_in, col_in, gl_ij):
  """Given d loss / d logits g_ij of a tile, its share of both embedding gradients.

  d/dx_i = scale * sum_j g_ij y_j and d/dy_j = scale * sum_i g_ij x_i. Scale is folded in
  here so the accumulated states are the final gradients (no post-loop copy of [B, D]).
  """
  x, y = row_in["x"], col_in["y"]
  gx_id = jnp.einsum("ij,jd->id", gl_ij.astype(y.dtype), y, preferred_element_type=F32)
  gy_jd = jnp.einsum("ij,id->jd", gl_ij.astype(x.dtype), x, preferred_element_type=F32)
  return ctx.scale * gx_id, ctx.scale * gy_jd


def grad_row_init(n, width, sigmoid=False):
  """Row state of a gradient sweep: d/dimg rows and per-row d/dscale terms; the fused
  sigmoid sweep adds per-row d/dbias terms, loss sums and the metrics' summaries."""
  state = {"gx": jnp.zeros((n, width), F32), "gscale": jnp.zeros((n,), F32)}
  if sigmoid:
    state.update(sigmoid_row_init(n), gbias=jnp.zeros((n,), F32))
  return state


def grad_col_init(n, width, sigmoid=False):
  state = {"gy": jnp.zeros((n, width), F32)}
  if sigmoid:
    state.update(sigmoid_col_init(n))
  return state


# ----------------------------------------------------------------------------------------
# Softmax (CLIP). Row i's normaliser is r_i = |s| u_max_i + log S_i with
# S_i = sum_j exp(|s| (u_ij - u_max_i)) (columns alike, c_j), kept as (max, logsum). With
# p_ij = exp(l_ij - r_i) and q_ij = exp(l_ij - c_j), d loss / d logits_ij =
# (0.5 * (p_ij + q_ij) - [i == j]) / B. A bias would cancel in both softmaxes and is ignored.
# The forward sweep sums the off-diagonal terms of S only, so that 1 - p_ii (the off-diagonal
# mass) and -log p_ii come out accurately even when p_ii rounds to 1.
# ----------------------------------------------------------------------------------------

def softmax_row_init(n):
  return {"max": jnp.full((n,), NEG, F32), "sum": jnp.zeros((n,), F32),
          "diag": jnp.zeros((n,), F32)}


def softmax_col_init(n):
  return {"max": jnp.full((n,), NEG, F32), "sum": jnp.zeros((n,), F32)}


def _online_lse(ctx, state, t, axis):
  """Folds a tile into a running (max over all pairs, off-diagonal sum exp(|s| (u - max)))
  along `axis`, rescaling the old sum when the maximum grows (flash-style)."""
  abs_scale = jnp.abs(ctx.scale)
  new_max = jnp.maximum(state["max"], _masked_max(t, axis))
  shifted_ij = abs_scale * (t.u - jnp.expand_dims(new_max, axis))
  tile_sum = jnp.sum(jnp.where(t.off, jnp.exp(shifted_ij), 0.0), axis=axis)
  return {"max": new_max,
          "sum": state["sum"] * jnp.exp(abs_scale * (state["max"] - new_max)) + tile_sum}


def softmax_forward_tile(ctx, row_in, col_in, row_st, col_st):
  """Running row / column (max, off-diagonal sum-exp) and the diagonal dots."""
  t = _tile(ctx, row_in, col_in)
  row_st = dict(_online_lse(ctx, row_st, t, axis=1),
                diag=row_st["diag"] + _diagonal_dots(t))
  return row_st, _online_lse(ctx, col_st, t, axis=0)


def softmax_merge(ctx):
  """Combines two column states computed over disjoint row sets (log-sum-exp merge)."""
  abs_scale = jnp.abs(ctx.scale)

  def merge(a, b):
    new_max = jnp.maximum(a["max"], b["max"])
    return {"max": new_max,
            "sum": (a["sum"] * jnp.exp(abs_scale * (a["max"] - new_max))
                    + b["sum"] * jnp.exp(abs_scale * (b["max"] - new_max)))}
  return merge


def softmax_finish(ctx, state, diag_n, valid_n):
  """From a finished row (or column) state: the normaliser {max, logsum, off}, where off is
  the off-diagonal mass 1 - p_ii, and the cross-entropy -log p_ii of each pair.

  With gap = |s| (u_max - u_ii) >= 0 and S = off-diagonal sum + exp(-gap),
  -log p_ii = gap + log S, or log1p(off-diagonal sum) when the diagonal is the maximum.
  Padding entries are zeroed.
  """
  gap_n = jnp.abs(ctx.scale) * (state["max"] - jnp.sign(ctx.scale) * diag_n)
  total_n = state["sum"] + jnp.exp(-gap_n)
  neg_log_p_n = jnp.where(gap_n == 0.0, jnp.log1p(state["sum"]), gap_n + jnp.log(total_n))
  zero_pad = lambda a: jnp.where(valid_n, a, 0.0)
  norm = {"max": zero_pad(state["max"]), "logsum": zero_pad(jnp.log(total_n)),
          "off": zero_pad(state["sum"] / total_n)}
  return norm, zero_pad(neg_log_p_n)


def softmax_diag_grad(ctx, row_norm, col_norm):
  """d loss / d logits_ii = w (0.5 (p_ii + q_ii) - 1) = -0.5 w (off_row_i + off_col_i)."""
  return -0.5 * ctx.grad_weight * (row_norm["off"] + col_norm["off"])


def softmax_backward_tile(ctx, row_in, col_in, row_st, col_st):
  """Recomputes a tile and accumulates the gradients it contributes.

  The positive pairs take their gradient from row_in["gdiag"] (softmax_diag_grad) rather
  than from p_ii + q_ii - 2. d/dscale = sum_ij g_ij x_i . y_j cancels badly in float32 as
  written; since each softmax sums to one it equals
    0.5 / B * sum_{i != j} [p_ij (dot_ij - dot_ii) + q_ij (dot_ij - dot_jj)],
  with dot_ii brought by rows / columns as "ddot".
  """
  t = _tile(ctx, row_in, col_in)
  abs_scale = jnp.abs(ctx.scale)
  p_ij = jnp.exp(abs_scale * (t.u - row_in["max"][:, None]) - row_in["logsum"][:, None])
  q_ij = jnp.exp(abs_scale * (t.u - col_in["max"][None, :]) - col_in["logsum"][None, :])
  p_ij, q_ij = jnp.where(t.off, p_ij, 0.0), jnp.where(t.off, q_ij, 0.0)
  gl_ij = jnp.where(t.diag, row_in["gdiag"][:, None], 0.5 * ctx.grad_weight * (p_ij + q_ij))
  centred_ij = (p_ij * (t.dots - row_in["ddot"][:, None])
                + q_ij * (t.dots - col_in["ddot"][None, :]))
  gx_id, gy_jd = _grad_matmuls(ctx, row_in, col_in, gl_ij)
  row_st = {"gx": row_st["gx"] + gx_id,
            "gscale": row_st["gscale"] + 0.5 * ctx.grad_weight * jnp.sum(centred_ij, axis=1)}
  return row_st, {"gy": col_st["gy"] + gy_jd}


# ----------------------------------------------------------------------------------------
# Sigmoid (SigLIP). Every pair is an independent binary term, so one sweep gives the loss
# and, when differentiating, the gradients: with z_ij = +1 on the diagonal and -1 elsewhere,
#   loss term = softplus(-z_ij l_ij),   d term / d l_ij = -z_ij * sigmoid(-z_ij l_ij),
# i.e. sigmoid(l_ij) off the diagonal and -sigmoid(-l_ii) on it (no 1 - p cancellation).
# ----------------------------------------------------------------------------------------

def sigmoid_row_init(n):
  return {"loss": jnp.zeros((n,), F32), "max": jnp.full((n,), NEG, F32),
          "diag": jnp.zeros((n,), F32)}


def sigmoid_col_init(n):
  return {"max": jnp.full((n,), NEG, F32)}


def _sigmoid_terms(ctx, row_in, col_in, row_st, col_st):
  t = _tile(ctx, row_in, col_in)
  logits_ij = ctx.scale * t.dots + ctx.bias
  signed_ij = jnp.where(t.diag, -logits_ij, logits_ij)  # -z_ij * l_ij
  row_st = {"loss": row_st["loss"] + jnp.sum(
                jnp.where(t.valid, jax.nn.softplus(signed_ij), 0.0), axis=1),
            "max": jnp.maximum(row_st["max"], _masked_max(t, axis=1)),
            "diag": row_st["diag"] + _diagonal_dots(t)}
  col_st = {"max": jnp.maximum(col_st["max"], _masked_max(t, axis=0))}
  return row_st, col_st, t, signed_ij


def sigmoid_forward_tile(ctx, row_in, col_in, row_st, col_st):
  """Per-row loss sums, row / column maxima and diagonal dots."""
  row_st, col_st, _, _ = _sigmoid_terms(ctx, row_in, col_in, row_st, col_st)
  return row_st, col_st


def sigmoid_fused_tile(ctx, row_in, col_in, row_st, col_st):
  """The forward tile plus the gradients, in one pass over the tile."""
  loss_st, max_st, t, signed_ij = _sigmoid_terms(ctx, row_in, col_in, row_st, col_st)
  sig_ij = jax.nn.sigmoid(signed_ij)
  gl_ij = jnp.where(t.valid, jnp.where(t.diag, -sig_ij, sig_ij), 0.0) * ctx.grad_weight
  gx_id, gy_jd = _grad_matmuls(ctx, row_in, col_in, gl_ij)
  row_st = dict(loss_st, gx=row_st["gx"] + gx_id,
                gscale=row_st["gscale"] + jnp.sum(gl_ij * t.dots, axis=1),
                gbias=row_st["gbias"] + jnp.sum(gl_ij, axis=1))
  return row_st, dict(max_st, gy=col_st["gy"] + gy_jd)


def metrics(ctx, diag_n, row_max_n, col_max_n, valid_n, sum_all, batch, total):
  """Training metrics from per-row summaries; `total` sums over all rows (psum in a ring).

  diag_n are the positive pairs' dots, row/col_max_n the dot-space maxima; sum_all is the
  sum of every logit, scale * (sum_i x_i) . (sum_j y_j) + B^2 bias, O(B D).
  """
  valid = valid_n.astype(F32)
  u_diag_n = jnp.sign(ctx.scale) * diag_n
  diag_sum = ctx.scale * total(diag_n * valid) + batch * ctx.bias
  return {
      "pos_logit": diag_sum / batch,
      "neg_logit": (sum_all - diag_sum) / float(max(batch * batch - batch, 1)),
      "accuracy": total(valid * (u_diag_n >= row_max_n)) / batch,
      "accuracy_t2i": total(valid * (u_diag_n >= col_max_n)) / batch,
  }
