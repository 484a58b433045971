"""Vision Transformer image encoder (Dosovitskiy et al. 2021) with big_vision's size table.

`ViT(variant="B/16")` decodes width / depth / MLP / heads / patch from VARIANTS; explicit
fields override the table. Returns `(out, aux)`: `out` is the pooled (and optionally
projected) embedding, `aux` holds "tokens", "pre_logits" and, with a head, "logits".
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vljax.models.sizes import resolve_sizes
from vljax.nn import (AttentionPool, BlockConfig, ConvStem, Dense, LayerNorm, LearnedPosEmbed,
                      PatchEmbed, Transformer, constrain, partitioned, pool_tokens, sincos_2d)

# name -> (width, depth, mlp_dim, num_heads). "mu" and "nano" are tiny presets for tests / CPU.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "mu": (64, 2, 256, 2),
    "nano": (128, 3, 512, 4),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}


def decode_variant(variant: str | None) -> dict[str, Any]:
  """"B/16" -> {"width": 768, "depth": 12, "mlp_dim": 3072, "num_heads": 12, "patch_size": 16}."""
  if variant is None:
    return {}
  name, _, patch = variant.partition("/")
  if name not in VARIANTS:
    raise ValueError(f"Unknown ViT variant {variant!r}; sizes are {sorted(VARIANTS)}")
  width, depth, mlp_dim, heads = VARIANTS[name]
  out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads)
  if patch:
    out["patch_size"] = int(patch)
  return out


class ViT(nn.Module):
  """ViT encoder: patchify, add position embeddings, transformer, pool, optional projection."""

  variant: str | None = None  # e.g. "B/16"; fills the size fields below that are None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  patch_size: int | None = None
  stem: str = "patch"  # "patch" (ViT) | "conv" (early convolutions, see nn.ConvStem)
  posemb: str = "learn"  # "learn" | "sincos2d"
  pool: str = "gap"  # "gap" | "cls" | "map" | "none"
  class_token: bool | None = None  # a learned token before the patches; None: with pool="cls"
  pre_norm: bool = False  # CLIP's ln_pre after the embeddings
  # The encoder's LayerNorm after the last layer; False for features read before it (LLaVA's
  # penultimate-layer features).
  final_norm: bool = True
  patch_bias: bool = True  # the patch embedding's bias (CLIP's has none)
  act: str = "gelu"
  map_act: str = "gelu"  # the MLP activation of the MAP head (SigLIP: "gelu_tanh")
  norm_eps: float = 1e-6
  dropout: float = 0.0
  out_dim: int | None = None  # linear projection of the pooled features (a head or CLIP's proj)
  out_bias: bool = True
  head_zero_init: bool = False
  scan: bool = False
  remat: str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def sizes(self) -> dict[str, int]:
    """The size fields, from the variant where not given explicitly."""
    return resolve_sizes("ViT", decode_variant(self.variant), self,
                         ("width", "depth", "mlp_dim", "num_heads", "patch_size"))

  @nn.compact
  def __call__(self, images_bhwc: jax.Array, train: bool = False):
    s = self.sizes()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    images_bhwc = constrain(images_bhwc.astype(self.dtype), ("batch", None, None, None))
    if self.stem == "patch":
      x = PatchEmbed(s["patch_size"], s["width"], use_bias=self.patch_bias, name="embedding",
                     **kw)(images_bhwc)
    elif self.stem == "conv":
      x = ConvStem(s["patch_size"], s["width"], name="conv_stem", **kw)(images_bhwc)
    else:
      raise ValueError(f"Unknown ViT stem {self.stem!r}; choose patch or conv")
    grid = images_bhwc.shape[1] // s["patch_size"], images_bhwc.shape[2] // s["patch_size"]
    aux = {}
    has_cls = self.class_token if self.class_token is not None else self.pool == "cls"
    if has_cls:
      cls = self.param("cls", partitioned(nn.initializers.zeros, (None, None, "embed")),
                       (1, 1, s["width"]), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, s["width"])).astype(x.dtype), x], 1)
    if self.posemb == "learn":
      x = LearnedPosEmbed(x.shape[1], init_std=1 / s["width"] ** 0.5, name="pos_embedding")(x)
    elif self.posemb == "sincos2d":
      table = jnp.asarray(sincos_2d(*grid, s["width"]), x.dtype)
      offset = 1 if has_cls else 0
      x = x.at[:, offset:].add(table[None])
    else:
      raise ValueError(f"Unknown posemb {self.posemb!r}; choose learn or sincos2d")
    if self.pre_norm:
      x = LayerNorm(self.norm_eps, name="pre_norm", **kw)(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    block = BlockConfig(s["num_heads"], s["mlp_dim"], act=self.act, dropout=self.dropout,
                        norm_eps=self.norm_eps, **kw)
    x = Transformer(s["depth"], block, final_norm=self.final_norm, scan=self.scan,
                    remat=self.remat, name="encoder")(x, deterministic=not train)
    aux["tokens"] = x
    if self.pool == "map":
      pooled = AttentionPool(s["num_heads"], mlp_dim=s["mlp_dim"], act=self.map_act,
                             norm_eps=self.norm_eps, name="map_head", **kw)(x)[:, 0]
    elif self.pool == "none":
      pooled = x
    else:
      pooled = pool_tokens(x, self.pool)
    aux["pre_logits"] = pooled
    out = pooled
    if self.out_dim is not None:
      init = nn.initializers.zeros if self.head_zero_init else nn.initializers.lecun_normal()
      out = Dense(self.out_dim, "embed", None, use_bias=self.out_bias, kernel_init=init,
                  name="head", **kw)(pooled)
      aux["logits"] = out
    return out, aux

