"""A NumPy (float64) forward of big_vision's SigLIP two towers, for parity tests.

Written from big_vision's model code (github.com/google-research/big_vision, commit 0127fb6 of
May 2025): models/vit.py (ViT, Encoder, Encoder1DBlock, MlpBlock, MAPHead),
models/proj/image_text/text_transformer.py, models/proj/image_text/two_towers.py and
trainers/proj/image_text/siglip.py. It reads the flat .npz dict ("params/img/...") by
big_vision's own module names, as utils.load_params / recover_tree nest them, so it shares
nothing with vljax's mapping. flax defaults that matter are noted where they apply.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def nest(flat: Mapping[str, Any]) -> dict:
  """utils.recover_tree: "a/b/c" keys -> nested dicts; then utils.load_params takes the
  "params" subtree when there is one (released files hold only "params/...")."""
  tree: dict = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = np.asarray(value, np.float64)
  return tree.get("params", tree)


def layer_norm(x, p, eps=1e-6):
  """flax nn.LayerNorm(): epsilon 1e-6, scale and bias, over the last axis."""
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def gelu(x):
  """flax nn.gelu, whose default is approximate=True: the tanh approximation."""
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def dense(x, p):
  """flax nn.Dense: kernel [in, out], bias [out]."""
  return x @ p["kernel"] + p["bias"]


def softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def attention(x_q, x_kv, p):
  """flax nn.MultiHeadDotProductAttention(num_heads)(inputs_q, inputs_kv), no mask: query /
  key / value DenseGeneral kernels [D, heads, head_dim] with biases [heads, head_dim];
  dot_product_attention divides the query by sqrt(head_dim) and softmaxes over the keys; the
  "out" DenseGeneral contracts (heads, head_dim) with a [heads, head_dim, D] kernel."""
  q = np.einsum("bqd,dhk->bqhk", x_q, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bsd,dhk->bshk", x_kv, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("bsd,dhk->bshk", x_kv, p["value"]["kernel"]) + p["value"]["bias"]
  q = q / np.sqrt(q.shape[-1])
  weights = softmax(np.einsum("bqhk,bshk->bhqs", q, k), axis=-1)
  out = np.einsum("bhqs,bshk->bqhk", weights, v)
  return np.einsum("bqhk,hkd->bqd", out, p["out"]["kernel"]) + p["out"]["bias"]


def mlp_block(x, p):
  """vit.MlpBlock: Dense_0 (mlp_dim) -> nn.gelu -> (dropout) -> Dense_1 (back to the width)."""
  return dense(gelu(dense(x, p["Dense_0"])), p["Dense_1"])


def encoder_block(x, p):
  """vit.Encoder1DBlock, pre-LayerNorm: x + MHSA(LayerNorm_0(x)), then + MlpBlock_0(
  LayerNorm_1(x)); self-attention without a mask (the text tower masks nothing either)."""
  y = layer_norm(x, p["LayerNorm_0"])
  x = x + attention(y, y, p["MultiHeadDotProductAttention_0"])
  y = layer_norm(x, p["LayerNorm_1"])
  return x + mlp_block(y, p["MlpBlock_0"])


def encoder(x, p):
  """vit.Encoder: the blocks "encoderblock_i" (or, scanned, "encoderblock" with a leading
  layer axis), then LayerNorm "encoder_norm" on every token (so before any pooling)."""
  if "encoderblock" in p:
    stacked = p["encoderblock"]
    depth = stacked["LayerNorm_0"]["scale"].shape[0]
    blocks = [_index(stacked, i) for i in range(depth)]
  else:
    depth = len([k for k in p if k.startswith("encoderblock_")])
    blocks = [p[f"encoderblock_{i}"] for i in range(depth)]
  for block in blocks:
    x = encoder_block(x, block)
  return layer_norm(x, p["encoder_norm"])


def _index(tree, i):
  return {k: _index(v, i) if isinstance(v, dict) else v[i] for k, v in tree.items()}


def map_head(x, p):
  """vit.MAPHead: a [1, 1, D] probe tiled over the batch attends to the tokens (same num_heads
  as the encoder), then x + MlpBlock_0(LayerNorm_0(x)) (same mlp_dim), first query."""
  probe = np.tile(p["probe"], (x.shape[0], 1, 1))
  x = attention(probe, x, p["MultiHeadDotProductAttention_0"])
  y = layer_norm(x, p["LayerNorm_0"])
  x = x + mlp_block(y, p["MlpBlock_0"])
  return x[:, 0]


def vit(p, images_bhwc):
  """vit._Model (pool_type "map", or "gap" where the file has no MAPHead_0): patches by a
  VALID conv with stride = patch ("embedding", with bias; a border narrower than a patch is
  dropped), reshaped to [n, h * w, c]; the learned "pos_embedding" [1, h * w, c] added (before
  any CLS token; SigLIP has none); Encoder "Transformer"; pooling; the "head" Dense when
  num_classes is set (SigLIP's image tower has out_dim None: no head)."""
  kernel = p["embedding"]["kernel"]  # [ph, pw, 3, c]
  ph, pw, _, c = kernel.shape
  n, height, width, _ = images_bhwc.shape
  h, w = height // ph, width // pw
  x = images_bhwc[:, :h * ph, :w * pw]
  x = x.reshape(n, h, ph, w, pw, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, h * w, ph * pw * 3)
  x = x @ kernel.reshape(ph * pw * 3, c) + p["embedding"]["bias"]
  x = x + p["pos_embedding"]
  x = encoder(x, p["Transformer"])
  x = map_head(x, p["MAPHead_0"]) if "MAPHead_0" in p else x.mean(axis=1)
  return dense(x, p["head"]) if "head" in p else x


def text_transformer(p, tokens_bt):
  """text_transformer._Model (pool_type "last"): nn.Embed "Embed_0"; "pos_embedding" of shape
  [1, l, d] for inputs of length l (so the texts have exactly the file's length); vit.Encoder
  "Encoder_0" with no attention mask: SigLIP's pads (1, its sticky EOS) are ordinary tokens;
  the last token after encoder_norm; the biased "head" Dense when num_classes is set."""
  x = p["Embed_0"]["embedding"][tokens_bt]
  x = x + p["pos_embedding"]
  x = encoder(x, p["Encoder_0"])[:, -1]
  return dense(x, p["head"]) if "head" in p else x


def two_towers(flat: Mapping[str, Any], images_bhwc, tokens_bt) -> dict[str, np.ndarray]:
  """two_towers.Model then the SigLIP loss's logits: each embedding divided by (its L2 norm +
  1e-8); t' ("t", [1]) gives the scale exp(t'); logits[i, j] = zimg_i . ztxt_j * exp(t') + b,
  images along rows (trainers/proj/image_text/siglip.py: jnp.dot(zimg, ztxt.T) * t + b, as in
  SigLIP_demo.ipynb); "b" is absent for the softmax loss."""
  p = nest(flat)
  images, tokens = np.asarray(images_bhwc, np.float64), np.asarray(tokens_bt)
  zimg = vit(p["img"], images)
  zimg = zimg / (np.linalg.norm(zimg, axis=1, keepdims=True) + 1e-8)
  ztxt = text_transformer(p["txt"], tokens)
  ztxt = ztxt / (np.linalg.norm(ztxt, axis=1, keepdims=True) + 1e-8)
  scale = np.exp(p["t"]).reshape(())
  bias = p["b"].reshape(()) if "b" in p else 0.0
  return {"zimg": zimg, "ztxt": ztxt, "logits": zimg @ ztxt.T * scale + bias, "scale": scale}
