"""Ring contrastive losses over a mesh axis: exact, per-device memory linear in B / n.

Each of the n devices on the ring axis keeps its b = B / n images. Text blocks travel: at
step t device d holds the block of device d - t, sweeps its images against it tile by tile
(see _tiles.sweep) and passes the block on. The column quantities of a block (softmax
normalisers, text gradients, column maxima) travel in a packet next to it; each device folds
its share in, and after n hops the packet is home, complete. Nothing of size B is gathered.

Overlap: a step sends the text block on before sweeping it, and sweeps into a fresh column
state that is merged with the arriving packet only at the end, so both transfers can run
under the step's matmuls.

B not divisible by n is padded to n * ceil(B / n) rows, and each device's rows to a multiple
of the chunk; padding rows carry id -1 (-2 as columns) and are masked out of every sum.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vljax.losses import _chunked, _tiles

F32 = jnp.float32


def loss(kind, img_bd, txt_bd, scale, bias, *, chunk_size, mesh, axis):
  """(loss, metrics) of `kind` with the batch sharded over `axis` (str or tuple) of `mesh`."""
  axes = (axis,) if isinstance(axis, str) else tuple(axis)
  batch = img_bd.shape[0]
  n_dev = math.prod(mesh.shape[a] for a in axes)
  per_dev = -(-batch // n_dev)
  chunk = min(chunk_size or _chunked.DEFAULT_CHUNK, per_dev)
  fn = _loss_fn(kind, chunk, mesh, axes, batch, img_bd.dtype, txt_bd.dtype)
  if per_dev * n_dev != batch:  # uneven split: pad globally, the padding is masked out
    pad = ((0, per_dev * n_dev - batch), (0, 0))
    img_bd, txt_bd = jnp.pad(img_bd, pad), jnp.pad(txt_bd, pad)
  return fn(img_bd, txt_bd, scale, bias)


class _Ring:
  """Static description of one ring: devices, local sizes and the ids of local rows."""

  def __init__(self, axes, n_dev, batch, per_dev, chunk):
    self.axes, self.n_dev, self.batch, self.per_dev, self.chunk = (
        axes, n_dev, batch, per_dev, chunk)
    self.padded = -(-per_dev // chunk) * chunk  # local rows after padding to the chunk

  def local(self, x_bd, y_bd):
    """This device's rows padded to a multiple of chunk, with global row / column ids."""
    local_n = jnp.arange(self.padded, dtype=jnp.int32)
    global_n = jax.lax.axis_index(self.axes) * self.per_dev + local_n
    valid_n = (local_n < self.per_dev) & (global_n < self.batch)
    if self.padded != self.per_dev:
      pad = ((0, self.padded - self.per_dev), (0, 0))
      x_bd, y_bd = jnp.pad(x_bd, pad), jnp.pad(y_bd, pad)
    return x_bd, y_bd, jnp.where(valid_n, global_n, -1), jnp.where(valid_n, global_n, -2)

  def hop(self, tree):
    """Sends a pytree one device along the ring (device d to d + 1)."""
    perm = [(i, (i + 1) % self.n_dev) for i in range(self.n_dev)]
    return jax.lax.ppermute(tree, self.axes, perm)

  def total(self, x_n):
    """Sum over every device's rows."""
    return jax.lax.psum(jnp.sum(x_n), self.axes)

  def run(self, tile_fn, ctx, rows, cols, row_state, fresh_cols, merge):
    """n ring steps; returns the final row state and the column packet, back home."""
    def step(carry, _):
      row_state, cols, packet = carry
      cols_next = self.hop(cols)  # independent of this step's sweep: can overlap it
      row_state, partial = _tiles.sweep(tile_fn, ctx, rows, cols, row_state, fresh_cols,
                                        self.chunk)
      packet_next = self.hop(merge(packet, partial))
      return (row_state, cols_next, packet_next), None

    (row_state, _, packet), _ = jax.lax.scan(step, (row_state, cols, fresh_cols), None,
                                             length=self.n_dev)
    return row_state, packet


def _add_or_max(a, b):
  """Merge of gradient packets: gradients add, column maxima take the maximum."""
  return {k: jnp.maximum(a[k], b[k]) if k == "max" else a[k] + b[k] for k in a}


@functools.lru_cache(maxsize=None)
def _loss_fn(kind, chunk, mesh, axes, batch, img_dtype, txt_dtype):
  """Custom-VJP global function (img, txt, scale, bias) -> (loss, metrics) for a ring."""
  n_dev = math.prod(mesh.shape[a] for a in axes)
  ring = _Ring(axes, n_dev, batch, -(-batch // n_dev), chunk)
  rows_spec = P(axes if len(axes) > 1 else axes[0])
  emb_spec = P(rows_spec[0], None)
  metric_specs = {k: P() for k in ("pos_logit", "neg_logit", "accuracy", "accuracy_t2i")}
  shard = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)

  def finish(x_bd, y_bd, ctx, row_st, col_st, valid_n):
    """Metrics from the per-row summaries of this device (psum over the ring)."""
    sum_all = _chunked.sum_of_logits(x_bd, y_bd, ctx.scale, ctx.bias, batch,
                                     lambda a, axis: jax.lax.psum(jnp.sum(a, axis), axes))
    return _tiles.metrics(ctx, row_st["diag"], row_st["max"], col_st["max"], valid_n, sum_all,
                          batch, ring.total)

  def softmax_forward(x_bd, y_bd, scale, bias):
    x_nd, y_nd, row_ids_n, col_ids_n = ring.local(x_bd, y_bd)
    ctx = _tiles.Ctx(scale, bias, jnp.zeros((), F32))
    row_st, col_st = ring.run(
        _tiles.softmax_forward_tile, ctx, {"x": x_nd, "ids": row_ids_n},
        {"y": y_nd, "ids": col_ids_n}, _tiles.softmax_row_init(ring.padded),
        _tiles.softmax_col_init(ring.padded), _tiles.softmax_merge(ctx))
    valid_n = row_ids_n >= 0
    row_norm, row_ce_n = _tiles.softmax_finish(ctx, row_st, row_st["diag"], valid_n)
    col_norm, col_ce_n = _tiles.softmax_finish(ctx, col_st, row_st["diag"], valid_n)
    return ((0.5 * ring.total(row_ce_n + col_ce_n) / batch,
             finish(x_bd, y_bd, ctx, row_st, col_st, valid_n)), row_norm, col_norm)

  def softmax_backward(x_bd, y_bd, scale, bias, row_norm, col_norm, ct):
    x_nd, y_nd, row_ids_n, col_ids_n = ring.local(x_bd, y_bd)
    ddot_n = _chunked.diagonal_dots(x_nd, y_nd)
    width = x_bd.shape[1]
    ctx = _tiles.Ctx(scale, bias, (ct / batch).astype(F32))
    row_st, col_st = ring.run(
        _tiles.softmax_backward_tile, ctx,
        {"x": x_nd, "ids": row_ids_n, "ddot": ddot_n, **row_norm,
         "gdiag": _tiles.softmax_diag_grad(ctx, row_norm, col_norm)},
        {"y": y_nd, "ids": col_ids_n, "ddot": ddot_n, **col_norm},
        _tiles.grad_row_init(ring.padded, width), _tiles.grad_col_init(ring.padded, width),
        _add_or_max)
    return (row_st["gx"][:ring.per_dev].astype(img_dtype),
            col_st["gy"][:ring.per_dev].astype(txt_dtype),
            ring.total(row_st["gscale"]))

  def sigmoid_forward(x_bd, y_bd, scale, bias, with_grads):
    x_nd, y_nd, row_ids_n, col_ids_n = ring.local(x_bd, y_bd)
    width = x_bd.shape[1]
    rows, cols = {"x": x_nd, "ids": row_ids_n}, {"y": y_nd, "ids": col_ids_n}
    if with_grads:
      ctx = _tiles.Ctx(scale, bias, jnp.asarray(1.0 / batch, F32))
      row_st, col_st = ring.run(
          _tiles.sigmoid_fused_tile, ctx, rows, cols,
          _tiles.grad_row_init(ring.padded, width, sigmoid=True),
          _tiles.grad_col_init(ring.padded, width, sigmoid=True), _add_or_max)
    else:
      ctx = _tiles.Ctx(scale, bias, jnp.zeros((), F32))
      row_st, col_st = ring.run(
          _tiles.sigmoid_forward_tile, ctx, rows, cols, _tiles.sigmoid_row_init(ring.padded),
          _tiles.sigmoid_col_init(ring.padded), _add_or_max)
    valid_n = row_ids_n >= 0
    out = (ring.total(row_st["loss"]) / batch,
           finish(x_bd, y_bd, ctx, row_st, col_st, valid_n))
    if not with_grads:
      return out
    return out, (row_st["gx"][:ring.per_dev], col_st["gy"][:ring.per_dev],
                 ring.total(row_st["gscale"]), ring.total(row_st["gbias"]))

  out_specs = (P(), metric_specs)
  in_specs = (emb_spec, emb_spec, P(), P())
  grads_spec = (emb_spec, emb_spec, P(), P())
  if kind == "softmax":
    forward_map = shard(softmax_forward, in_specs=in_specs,
                        out_specs=(out_specs, rows_spec, rows_spec))
    backward_map = shard(softmax_backward,
                         in_specs=in_specs + (rows_spec, rows_spec, P()),
                         out_specs=grads_spec[:3])
  else:
    primal_map = shard(functools.partial(sigmoid_forward, with_grads=False),
                       in_specs=in_specs, out_specs=out_specs)
    fused_map = shard(functools.partial(sigmoid_forward, with_grads=True),
                      in_specs=in_specs, out_specs=(out_specs, grads_spec))

  @jax.custom_vjp
  def fn(img_bd, txt_bd, scale, bias):
    if kind == "softmax":
      return forward_map(img_bd, txt_bd, scale, bias)[0]
    return primal_map(img_bd, txt_bd, scale, bias)

  def fn_fwd(img_bd, txt_bd, scale, bias):
    if kind == "softmax":
      out, row_norm, col_norm = forward_map(img_bd, txt_bd, scale, bias)
      return out, (img_bd, txt_bd, scale, bias, row_norm, col_norm)
    return fused_map(img_bd, txt_bd, scale, bias)

  def fn_bwd(residuals, cotangents):
    ct = cotangents[0]
    if kind == "softmax":
      img_bd, txt_bd, scale, bias, row_norm, col_norm = residuals
      gx, gy, gscale = backward_map(img_bd, txt_bd, scale, bias, row_norm, col_norm, ct)
      grads = (gx, gy, gscale, jnp.zeros_like(bias))
    else:
      grads = tuple(ct * g for g in residuals)
    dtypes = (img_dtype, txt_dtype, F32, F32)
    return tuple(g.astype(dt) for g, dt in zip(grads, dtypes))

  fn.defvjp(fn_fwd, fn_bwd)
  return fn
