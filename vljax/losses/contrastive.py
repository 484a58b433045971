"""Contrastive image-text losses: CLIP's softmax and SigLIP's sigmoid, naive / chunked / ring.

Both losses take L2-normalised embeddings img_bd, txt_bd ([B, D], row i of each is a positive
pair), a scale (the exp of the learned log-temperature) and, for the sigmoid, a bias:

    logits_bc = scale * img_bd @ txt_bd.T (+ bias)

  softmax (CLIP, Radford et al. 2021): 0.5 * (CE over rows + CE over columns), each the mean
      over B of -log softmax at the diagonal.
  sigmoid (SigLIP, Zhai et al. 2023): -sum_ij log sigmoid(z_ij * logits_ij) / B, z_ij = +1 on
      the diagonal and -1 elsewhere.

Three implementations give the same numbers:

  "naive"    materialises the B x B logits; the reference, fine up to a few thousand pairs.
  "chunked"  one device; tiles of chunk x chunk logits with online log-sum-exp and a custom VJP
             that recomputes tiles in the backward pass. Temporaries O(B + chunk^2 + chunk * D).
  "ring"     a mesh axis under shard_map; each device keeps its images while text blocks (with
             their partial normalisers and gradients) travel round the ring by ppermute.
             Per-device temporaries O(B / n + chunk^2 + chunk * D); no all-gather of the batch.

Arithmetic is float32 whatever the embedding dtype: matmul operands stay in the input dtype
(bfloat16 products are exact in float32) and accumulate in float32. The tiled versions are,
if anything, more accurate than naive: they never form the cancelling softmax term p_ii - 1
(see _tiles), so they stay exact when the positives dominate (scale 100, a trained model),
where naive autodiff loses the diagonal gradient.

Ring with B not divisible by the number of devices pads the batch internally and masks the
padding out of every sum (so any B works); so does chunked with B not a multiple of the chunk.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from vljax.losses import _chunked, _ring

IMPLS = ("naive", "chunked", "ring")
AxisNames = Union[str, Sequence[str]]


def softmax_loss(img_bd, txt_bd, scale, *, impl: str = "naive",
                 chunk_size: Optional[int] = None, mesh: Optional[jax.sharding.Mesh] = None,
                 axis: Optional[AxisNames] = None):
  """CLIP's symmetric cross-entropy; returns (loss, metrics).

  img_bd, txt_bd: [B, D] L2-normalised embeddings (for impl="ring", global arrays sharded over
  `axis` of `mesh`). scale: scalar multiplier of the cosine similarities. chunk_size: tile
  side for "chunked" / "ring" (None: 1024, capped at the rows per device). mesh / axis are
  only used by "ring" (and ignored otherwise, so a config can always pass them); axis is a
  mesh axis name or a tuple of names the batch is sharded over jointly. All keyword
  arguments are static under jax.jit.
  metrics: pos_logit, neg_logit (mean logit of positive / negative pairs), accuracy (i2t) and
  accuracy_t2i; a row counts as correct when its diagonal logit attains the row maximum.
  """
  _check_inputs(img_bd, txt_bd, impl, chunk_size, mesh, axis, scale=scale)
  bias = jnp.zeros((), jnp.float32)
  return _dispatch("softmax", img_bd, txt_bd, scale, bias, impl, chunk_size, mesh, axis)


def sigmoid_loss(img_bd, txt_bd, scale, bias, *, impl: str = "naive",
                 chunk_size: Optional[int] = None, mesh: Optional[jax.sharding.Mesh] = None,
                 axis: Optional[AxisNames] = None):
  """SigLIP's pairwise sigmoid loss, summed over all B^2 pairs and divided by B.

  Same arguments as `softmax_loss` plus `bias`, the scalar added to every logit. Returns
  (loss, metrics) with the same metrics (logits include the bias).
  """
  _check_inputs(img_bd, txt_bd, impl, chunk_size, mesh, axis, scale=scale, bias=bias)
  return _dispatch("sigmoid", img_bd, txt_bd, scale, bias, impl, chunk_size, mesh, axis)


def _dispatch(kind, img_bd, txt_bd, scale, bias, impl, chunk_size, mesh, axis):
  """Scalars to float32 arrays (so they can be differentiated), then the implementation."""
  scale = jnp.asarray(scale, jnp.float32)
  bias = jnp.asarray(bias, jnp.float32)
  if impl == "naive":
    return _naive(kind, img_bd, txt_bd, scale, bias)
  if impl == "chunked":
    return _chunked.loss(kind, img_bd, txt_bd, scale, bias, chunk_size=chunk_size)
  return _ring.loss(kind, img_bd, txt_bd, scale, bias, chunk_size=chunk_size,
                    mesh=mesh, axis=axis)


def _naive(kind, img_bd, txt_bd, scale, bias):
  """The reference: materialise all B x B logits in float32."""
  batch = img_bd.shape[0]
  dots_bc = jnp.einsum("bd,cd->bc", img_bd, txt_bd, preferred_element_type=jnp.float32)
  logits_bc = scale * dots_bc + bias
  diag_b = jnp.diagonal(logits_bc)
  if kind == "softmax":
    row_lse_b = jax.nn.logsumexp(logits_bc, axis=1)
    col_lse_b = jax.nn.logsumexp(logits_bc, axis=0)
    loss = 0.5 * (jnp.mean(row_lse_b - diag_b) + jnp.mean(col_lse_b - diag_b))
  else:
    # -log sigmoid(z * l) = softplus(-z * l); the diagonal has z = +1, the rest z = -1.
    sign_bc = 2.0 * jnp.eye(batch, dtype=jnp.float32) - 1.0
    loss = jnp.sum(jax.nn.softplus(-sign_bc * logits_bc)) / batch
  logits_bc = jax.lax.stop_gradient(logits_bc)
  diag_b = jnp.diagonal(logits_bc)
  n_neg = float(max(batch * batch - batch, 1))
  # Rank in dot space (sign(scale) * dot orders pairs as the logits do) so that rounding of
  # scale * dot + bias cannot make the diagonal miss its own row maximum.
  u_bc = jax.lax.stop_gradient(jnp.sign(scale) * dots_bc)
  u_diag_b = jnp.diagonal(u_bc)
  metrics = {
      "pos_logit": jnp.mean(diag_b),
      "neg_logit": (jnp.sum(logits_bc) - jnp.sum(diag_b)) / n_neg,
      "accuracy": jnp.mean((u_diag_b >= jnp.max(u_bc, axis=1)).astype(jnp.float32)),
      "accuracy_t2i": jnp.mean((u_diag_b >= jnp.max(u_bc, axis=0)).astype(jnp.float32)),
  }
  return loss, metrics


def _check_inputs(img_bd, txt_bd, impl, chunk_size, mesh, axis, *, scale, bias=None):
  """Fail early, before tracing, with a message that names the offending argument."""
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  for name, x in (("img", img_bd), ("txt", txt_bd)):
    if jnp.ndim(x) != 2:
      raise ValueError(f"{name} must be a 2-D [batch, dim] array, got shape {jnp.shape(x)}")
  if img_bd.shape[0] != txt_bd.shape[0]:
    raise ValueError(f"img and txt batch sizes differ: {img_bd.shape[0]} vs {txt_bd.shape[0]}")
  if img_bd.shape[1] != txt_bd.shape[1]:
    raise ValueError(f"img and txt widths differ: {img_bd.shape[1]} vs {txt_bd.shape[1]}")
  if img_bd.shape[0] == 0:
    raise ValueError("batch size must be at least 1")
  for name, x in (("scale", scale), ("bias", bias)):
    if x is not None and jnp.ndim(x) != 0:
      raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(x)}")
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
  if impl == "ring":
    if mesh is None:
      raise ValueError("impl='ring' needs mesh= (a jax.sharding.Mesh) and axis= (its batch axes)")
    names = (axis,) if isinstance(axis, str) else tuple(axis or ())
    if not names:
      raise ValueError("impl='ring' needs axis=, a mesh axis name or a tuple of names")
    unknown = [a for a in names if a not in mesh.axis_names]
    if unknown:
      raise ValueError(f"axis {unknown} not in mesh axes {mesh.axis_names}")
