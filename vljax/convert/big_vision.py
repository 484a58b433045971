r"""big_vision SigLIP parameter files (.npz) to and from vljax's `TwoTower`: `load` reads a
released `webli_*.npz` (or any big_vision two-towers ViT + text-transformer file) into the
TwoTower module and its params, inferring every size from the array shapes; `save` writes a
TwoTower as the .npz that big_vision's `utils.load_params` reads.

  model, params = big_vision.load("webli_en_b16_224_63724782.npz")
  out = model.apply({"params": params}, images_bhwc, tokens_bt)  # images in [-1, 1]
  logits = out["scale"] * out["zimg"] @ out["ztxt"].T + out["bias"]  # [images, texts]
  big_vision.save("/tmp/siglip.npz", model, params)

The file is the flat dict of big_vision's `tree_flatten_with_names` saved with `np.savez`: keys
"params/img/...", "params/txt/...", "params/t", "params/b" (a file of the params alone, without
the "params/" prefix, reads too). It is read with `allow_pickle=False`: object arrays are refused,
never unpickled. bfloat16 arrays, which NumPy stores as 2-byte void, come back as bfloat16.

How big_vision's modules map onto TwoTower options (models/vit.py, models/proj/image_text/
text_transformer.py and two_towers.py):
- Image tower: patch convolution with bias ("embedding"), learned position table added before
  the encoder ("pos_embedding", [1, grid * grid, D]), pre-LayerNorm blocks ("Transformer/
  encoderblock_i": LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0), the
  final "encoder_norm", then the MAP head ("MAPHead_0": probe, attention, LayerNorm + MLP
  residual) or, without one, the mean of the tokens; an optional "head" Dense. flax's
  `nn.gelu` is the tanh approximation (`act="gelu_tanh"`, `map_act` too); LayerNorm eps 1e-6.
- Text tower ("Embed_0", "pos_embedding", "Encoder_0"): bidirectional, no padding mask (pads,
  id 1 in SigLIP's tokenisation, are ordinary tokens: `mask_padding=False`, and pass no
  `text_valid_bt`), pooled at the last position after the final norm (`pool="last"`), with a
  biased "head" Dense when the file has one (So400m/16-i18n has none).
- "t" and "b" ([1] each) are t' and the sigmoid loss's bias; no "b" means the softmax loss.
  big_vision does not clamp exp(t'): `max_scale=None`.
- Scanned files ("encoderblock" with a leading layer axis) read as well as unscanned ones
  ("encoderblock_0", ...); `save` writes the unscanned layout of the released files, or the
  scanned one with `scan=True`.
"""
from __future__ import annotations

import math
import os
import re
import zipfile
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from vljax.convert import hf, posemb
from vljax.files import write_atomically
from vljax.models.text import TextTransformer
from vljax.models.two_tower import TwoTower
from vljax.models.vit import ViT, decode_variant

PREFIX = "params/"
PAD_ID = 1  # SigLIP's tokenisation pads with 1 (= its sticky EOS); the towers never mask it.
ACT = "gelu_tanh"  # flax's nn.gelu default, approximate=True
NORM_EPS = 1e-6  # flax's nn.LayerNorm default

# The released SigLIP files (big_vision's SigLIP_demo.ipynb): name -> (image variant, image
# size, text variant, text length, vocabulary, text head width or None, file name).
RELEASED: dict[str, tuple[str, int, str, int, int, int | None, str]] = {
    "B/16 224": ("B/16", 224, "B", 64, 32_000, 768, "webli_en_b16_224_63724782.npz"),
    "B/16 256": ("B/16", 256, "B", 64, 32_000, 768, "webli_en_b16_256_60500360.npz"),
    "B/16 384": ("B/16", 384, "B", 64, 32_000, 768, "webli_en_b16_384_68578854.npz"),
    "B/16 512": ("B/16", 512, "B", 64, 32_000, 768, "webli_en_b16_512_68580893.npz"),
    "L/16 256": ("L/16", 256, "L", 64, 32_000, 1024, "webli_en_l16_256_60552751.npz"),
    "L/16 384": ("L/16", 384, "L", 64, 32_000, 1024, "webli_en_l16_384_63634585.npz"),
    "So400m/14 224": ("So400m/14", 224, "So400m", 16, 32_000, 1152,
                      "webli_en_so400m_224_57633886.npz"),
    "So400m/14 384": ("So400m/14", 384, "So400m", 64, 32_000, 1152,
                      "webli_en_so400m_384_58765454.npz"),
    "B/16-i18n 256": ("B/16", 256, "B", 64, 250_000, 768, "webli_i18n_b16_256_66117334.npz"),
    "So400m/16-i18n 256": ("So400m/16", 256, "So400m", 64, 250_000, None,
                           "webli_i18n_so400m_16_256_78061115.npz"),
}

# The encoder's module name in each of big_vision's towers.
_ENCODERS = {"img": "Transformer", "txt": "Encoder_0"}
# Encoder1DBlock's submodules (vit.py) -> vljax Block's.
_BLOCK = {"LayerNorm_0": ("self_attn_norm", "norm"), "MultiHeadDotProductAttention_0":
          ("self_attn",), "LayerNorm_1": ("mlp_norm", "norm"), "MlpBlock_0": ("mlp",)}
# MAPHead's submodules (vit.py) -> vljax AttentionPool's.
_MAP_HEAD = {"MultiHeadDotProductAttention_0": ("attn",), "LayerNorm_0": ("norm", "norm"),
             "MlpBlock_0": ("mlp",)}
_MLP = {"Dense_0": ("fc1", "dense"), "Dense_1": ("fc2", "dense")}


# --- Names -----------------------------------------------------------------------------------


def _invert(table: Mapping[str, tuple[str, ...]]) -> dict[tuple[str, ...], str]:
  return {v: k for k, v in table.items()}


def _sub_name(path: tuple[str, ...], table: Mapping[str, tuple[str, ...]]) -> str | None:
  """big_vision's name of a path inside a Block or an AttentionPool (`table` says which)."""
  for vljax_prefix, name in _invert(table).items():
    n = len(vljax_prefix)
    if path[:n] != vljax_prefix:
      continue
    rest = path[n:]
    if name == "MlpBlock_0":
      sub = _invert(_MLP).get(rest[:2])
      return None if sub is None or len(rest) != 3 else f"{name}/{sub}/{rest[2]}"
    if name.startswith("MultiHead"):
      ok = len(rest) == 2 and rest[0] in ("query", "key", "value", "out")
      return f"{name}/{rest[0]}/{rest[1]}" if ok else None
    return f"{name}/{rest[0]}" if len(rest) == 1 else None
  return None


def npz_name(path: tuple[str, ...]) -> str | None:
  """big_vision's name (without "params/") of a vljax TwoTower parameter path, e.g.
  ("img", "encoder", "layer_0", "mlp", "fc1", "dense", "kernel") ->
  "img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"; None where big_vision has none."""
  if path in (("t",), ("b",)):
    return path[0]
  if len(path) < 2 or path[0] not in _ENCODERS:
    return None
  tower, rest = path[0], path[1:]
  encoder = _ENCODERS[tower]
  if rest == ("pos_embedding", "pos_embedding"):
    return f"{tower}/pos_embedding"
  if len(rest) == 3 and rest[:2] == ("head", "dense"):
    return f"{tower}/head/{rest[2]}"
  if rest[0] == "encoder" and len(rest) > 2:
    if rest[1] == "final_norm" and rest[2:3] == ("norm",) and len(rest) == 4:
      return f"{tower}/{encoder}/encoder_norm/{rest[3]}"
    match = re.fullmatch(r"layer_(\d+)", rest[1])
    block = (f"encoderblock_{match[1]}" if match else
             "encoderblock" if rest[1] == "layers" else None)
    sub = _sub_name(rest[2:], _BLOCK)
    return None if block is None or sub is None else f"{tower}/{encoder}/{block}/{sub}"
  if tower == "img":
    if len(rest) == 3 and rest[:2] == ("embedding", "conv"):
      return f"img/embedding/{rest[2]}"
    if rest == ("map_head", "probe"):
      return "img/MAPHead_0/probe"
    if rest[0] == "map_head":
      sub = _sub_name(rest[1:], _MAP_HEAD)
      return None if sub is None else f"img/MAPHead_0/{sub}"
  if tower == "txt" and rest == ("token_embedding", "embedding"):
    return "txt/Embed_0/embedding"
  return None


# --- Sizes -----------------------------------------------------------------------------------


def _fields(image: Mapping[str, Any], text: Mapping[str, Any], *, pool: str,
            image_out: int | None, text_out: int | None, vocab_size: int, max_len: int,
            contrastive: str) -> dict[str, Any]:
  """TwoTower fields of big_vision's two towers with these sizes (explicit sizes or variants)."""
  image_fields = dict(image, stem="patch", posemb="learn", pool=pool, pre_norm=False,
                      patch_bias=True, act=ACT, map_act=ACT, norm_eps=NORM_EPS,
                      out_dim=image_out, out_bias=True)
  text_fields = dict(text, vocab_size=vocab_size, max_len=max_len, causal=False, pool="last",
                     pad_id=PAD_ID, mask_padding=False, act=ACT, norm_eps=NORM_EPS,
                     norm_position="pre", out_dim=text_out, out_bias=True)
  embed_dim = text_out or text.get("width") or decode_variant(text.get("variant"))["width"]
  return dict(image=image_fields, text=text_fields, embed_dim=embed_dim, contrastive=contrastive,
              max_scale=None)


def _shape(arrays: Mapping[str, Any], key: str) -> tuple[int, ...]:
  return tuple(int(n) for n in np.shape(arrays[key]))


def _layout(arrays: Mapping[str, Any], tower: str) -> tuple[bool, int]:
  """(scanned, depth) of a tower's encoder in a params-only flat dict."""
  prefix = f"{tower}/{_ENCODERS[tower]}/"
  indices = {int(m[1]) for k in arrays if (m := re.match(re.escape(prefix) +
                                                          r"encoderblock_(\d+)/", k))}
  scanned = any(k.startswith(prefix + "encoderblock/") for k in arrays)
  if scanned and indices:
    raise ValueError(f"{tower}: the file has both a scanned {prefix}encoderblock and unscanned "
                     f"{prefix}encoderblock_i blocks")
  query = "MultiHeadDotProductAttention_0/query/kernel"
  if scanned:
    key = f"{prefix}encoderblock/{query}"
    if key not in arrays:
      raise hf.KeyMismatchError(f"the big_vision file lacks {key}", [key], [])
    return True, _shape(arrays, key)[0]
  if not indices:
    key = f"{prefix}encoderblock_0/{query}"
    raise hf.KeyMismatchError(f"the big_vision file has no {tower} encoder blocks ({key})",
                              [key], [])
  return False, max(indices) + 1


def _tower_sizes(arrays: Mapping[str, Any], tower: str, scanned: bool, depth: int,
                 width: int) -> dict[str, int]:
  """width, depth, mlp_dim and num_heads of a tower from its first present block's kernels."""
  prefix = f"{tower}/{_ENCODERS[tower]}/"
  query = "MultiHeadDotProductAttention_0/query/kernel"
  if scanned:
    block, lead = prefix + "encoderblock/", 1
  else:  # the first block present: a missing one is reported by the key check
    present = [i for i in range(depth) if f"{prefix}encoderblock_{i}/{query}" in arrays]
    block, lead = f"{prefix}encoderblock_{present[0] if present else 0}/", 0
  query, fc1 = block + query, block + "MlpBlock_0/Dense_0/kernel"
  missing = [k for k in (query, fc1) if k not in arrays]
  if missing:
    raise hf.KeyMismatchError(f"the big_vision file lacks {', '.join(missing)}", missing, [])
  q_shape, fc1_shape = _shape(arrays, query)[lead:], _shape(arrays, fc1)[lead:]
  if len(q_shape) != 3 or len(fc1_shape) != 2:
    raise ValueError(f"{query}: shape {_shape(arrays, query)} and {fc1}: shape "
                     f"{_shape(arrays, fc1)}, expected [{'layers, ' if scanned else ''}width, "
                     "heads, head_dim] and [.., width, mlp_dim]")
  d, heads, head_dim = q_shape
  if d != width:
    raise ValueError(f"{query}: shape {q_shape}, expected a first axis of the width {width}")
  if heads * head_dim != width:
    raise NotImplementedError(
        f"{query}: shape {q_shape}: vljax's attention has heads * head_dim == width ({width})")
  return dict(width=width, depth=depth, mlp_dim=fc1_shape[1], num_heads=heads)


def config_from_npz(arrays: Mapping[str, Any], *, variant: str | None = None) -> dict[str, Any]:
  """TwoTower fields of a big_vision two-towers file, from the shapes of its flat arrays (keys
  with or without "params/"; anything with a shape). `variant` ("B/16", "So400m/14": the image
  tower's big_vision variant, the text tower's is the part before "/") is checked against the
  shapes and used in place of explicit sizes. Missing keys the sizes come from raise
  hf.KeyMismatchError; layouts TwoTower lacks raise NotImplementedError naming them."""
  arrays = _strip_prefix(arrays)
  anchors = ["img/embedding/kernel", "img/pos_embedding", "txt/Embed_0/embedding",
             "txt/pos_embedding", "t"]
  missing = [k for k in anchors if k not in arrays]
  if missing:
    raise hf.KeyMismatchError(f"the big_vision file lacks {', '.join(missing)} (the sizes come "
                              "from them)", missing, [])
  if "img/cls" in arrays:
    raise NotImplementedError("img/cls: big_vision's 'tok' pooling adds the position table "
                              "before prepending the CLS token; vljax's ViT adds it after")
  kernel = _shape(arrays, "img/embedding/kernel")
  if len(kernel) != 4 or kernel[0] != kernel[1] or kernel[2] != 3:
    raise NotImplementedError(f"img/embedding/kernel: shape {kernel}; vljax's ViT reads square "
                              "patches of RGB images ([patch, patch, 3, width])")
  patch, width = kernel[0], kernel[3]
  table = _shape(arrays, "img/pos_embedding")
  grid = math.isqrt(table[1]) if len(table) == 3 else 0
  if len(table) != 3 or table[0] != 1 or grid * grid != table[1] or table[2] != width:
    raise ValueError(f"img/pos_embedding: shape {table}, expected [1, grid * grid, {width}] "
                     "(square images)")
  image = _tower_sizes(arrays, "img", *_layout(arrays, "img"), width)
  image["patch_size"] = patch
  embedding, txt_table = _shape(arrays, "txt/Embed_0/embedding"), _shape(arrays,
                                                                         "txt/pos_embedding")
  if len(embedding) != 2 or len(txt_table) != 3 or txt_table[2] != embedding[1]:
    raise ValueError(f"txt/Embed_0/embedding: shape {embedding} and txt/pos_embedding: shape "
                     f"{txt_table}, expected [vocab, width] and [1, length, width]")
  text = _tower_sizes(arrays, "txt", *_layout(arrays, "txt"), embedding[1])

  def out_dim(tower):
    key = f"{tower}/head/kernel"
    return _shape(arrays, key)[-1] if key in arrays else None

  image_out, text_out = out_dim("img"), out_dim("txt")
  if (image_out or width) != (text_out or text["width"]):
    raise ValueError(f"the image embedding ({image_out or width} wide) and the text embedding "
                     f"({text_out or text['width']} wide) differ: no logits between them")
  if variant is not None:
    image, text = _check_variant(variant, image, text)
  return _fields(image, text, pool="map" if "img/MAPHead_0/probe" in arrays else "gap",
                 image_out=image_out, text_out=text_out, vocab_size=embedding[0],
                 max_len=txt_table[1], contrastive="sigmoid" if "b" in arrays else "softmax")


def _check_variant(variant: str, image: dict, text: dict) -> tuple[dict, dict]:
  """{"variant": ...} for each tower, after checking its sizes against the file's."""
  name, _, patch = variant.partition("/")
  if not patch:
    raise ValueError(f"variant {variant!r}: give the image tower's, with its patch ('B/16')")
  wanted = {"image": decode_variant(variant), "text": decode_variant(name)}
  found = {"image": image, "text": text}
  differing = [f"{tower}.{k}: the file has {found[tower][k]}, {variant!r} has {v}"
               for tower, sizes in wanted.items() for k, v in sizes.items()
               if found[tower][k] != v]
  if differing:
    raise ValueError(f"the file is not the {variant!r} variant: {'; '.join(differing)}")
  return {"variant": variant}, {"variant": name}


# --- Arrays ----------------------------------------------------------------------------------


def _strip_prefix(arrays: Mapping[str, Any]) -> dict[str, Any]:
  """The params of a flat checkpoint dict: the "params/..." entries without the prefix when
  there are any (other entries stay, prefixed, to be reported as unexpected), else all."""
  if not any(k.startswith(PREFIX) for k in arrays):
    return dict(arrays)
  return {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in arrays.items()}


def _checked_array(key: str, value: Any) -> np.ndarray:
  """`value` as a NumPy array; object arrays refused; 2-byte void (how NumPy stores bfloat16,
  big_vision's `recover_dtype`) viewed as bfloat16."""
  if not isinstance(value, (np.ndarray, np.generic)) and not hasattr(value, "__array__"):
    raise TypeError(f"{key}: a {type(value).__name__}, expected an array")
  value = np.asarray(value)
  if value.dtype.hasobject:
    raise ValueError(f"{key} is an object array (pickled Python objects): vljax never unpickles "
                     "checkpoint files")
  if value.dtype.type is np.void:
    if value.dtype.itemsize != 2 or value.dtype.names is not None:
      raise ValueError(f"{key}: dtype {value.dtype} is neither a number nor bfloat16 (V2)")
    value = value.view(ml_dtypes.bfloat16)
  return value


def _abstract(model: TwoTower, image_size: int) -> dict[tuple[str, ...], Any]:
  """Flat vljax param paths -> ShapeDtypeStruct of `model` seeing `image_size` images, its
  towers laid out (scanned or not) as `model` says."""
  out = {}
  for path, leaf in _abstract_scanned(_with_scan(model, True, True), image_size).items():
    tower = path[0]
    if len(path) > 2 and path[1:3] == ("encoder", "layers") and not _scan_of(model, tower):
      for i in range(leaf.shape[0]):
        out[(tower, "encoder", f"layer_{i}") + path[3:]] = jax.ShapeDtypeStruct(
            leaf.shape[1:], leaf.dtype)
    else:
      out[path] = leaf
  return out


_ABSTRACT_CACHE: dict[tuple[str, int], dict] = {}


def _abstract_scanned(model: TwoTower, image_size: int) -> dict[tuple[str, ...], Any]:
  """The flat abstract params of `model`, whose towers are scanned (one layer traced per tower,
  fast for deep presets). Memoised by the module's repr, which shows every field (flax modules
  with dict fields are not hashable): load and save of one model trace one tree."""
  key = (repr(model), image_size)
  if key not in _ABSTRACT_CACHE:
    text_len = _towers(model)[1].max_len
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)),
        jnp.zeros((1, text_len), jnp.int32))["params"])
    if len(_ABSTRACT_CACHE) >= 16:
      _ABSTRACT_CACHE.pop(next(iter(_ABSTRACT_CACHE)))
    _ABSTRACT_CACHE[key] = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract))
  return _ABSTRACT_CACHE[key]


def _scan_of(model: TwoTower, tower: str) -> bool:
  return bool(dict(model.image if tower == "img" else model.text).get("scan", False))


def _towers(model: TwoTower) -> tuple[ViT, TextTransformer]:
  """The towers TwoTower.setup builds (unbound, for their resolved fields and sizes)."""
  return (ViT(**{"out_dim": model.embed_dim, **dict(model.image)}),
          TextTransformer(**{"out_dim": model.embed_dim, **dict(model.text)}))


def _restack(params: dict, scan: bool) -> dict:
  """Both towers' layers stacked on a leading axis ("encoder/layers") or split per layer."""
  out = dict(params)
  for tower in ("img", "txt"):
    encoder = dict(out[tower]["encoder"])
    if scan and "layers" not in encoder:
      names = sorted((k for k in encoder if k.startswith("layer_")), key=lambda k: int(k[6:]))
      encoder["layers"] = jax.tree.map(lambda *x: np.stack(x), *[encoder.pop(k) for k in names])
    elif not scan and "layers" in encoder:
      layers = encoder.pop("layers")
      depth = jax.tree.leaves(layers)[0].shape[0]
      for i in range(depth):
        encoder[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], layers)
    out[tower] = {**out[tower], "encoder": encoder}
  return out


def _with_scan(model: TwoTower, image_scan: bool, text_scan: bool) -> TwoTower:
  return model.clone(image=dict(model.image, scan=image_scan),
                     text=dict(model.text, scan=text_scan))


# --- Reading ---------------------------------------------------------------------------------


def from_npz_dict(arrays: Mapping[str, Any], *, variant: str | None = None,
                  image_size: int | None = None, scan: bool = False) -> tuple[TwoTower, dict]:
  """(TwoTower, params as NumPy arrays, dtypes kept) of a flat big_vision dict (what
  `np.load` of a .npz gives). Images are [B, S, S, 3] in [-1, 1] with S // patch equal to the
  file's grid, or, with `image_size`, that size after the position table is resampled as
  big_vision's `vit.resample_posemb` does (scipy.ndimage.zoom, order 1). Texts are [B, length]
  (the file's length), padded with 1. Missing or extra keys raise hf.KeyMismatchError naming
  them, wrong shapes a ValueError naming them."""
  flat = {k: _checked_array(k, v) for k, v in _strip_prefix(arrays).items()}
  fields = config_from_npz(flat, variant=variant)
  image_scan, _ = _layout(flat, "img")
  text_scan, _ = _layout(flat, "txt")
  model = _with_scan(TwoTower(**fields), image_scan, text_scan)
  image, _ = _towers(model)
  patch = image.sizes()["patch_size"]
  grid = math.isqrt(flat["img/pos_embedding"].shape[1])
  abstract = _abstract(model, grid * patch)
  names = {path: npz_name(path) for path in abstract}
  unnamed = [path for path, name in names.items() if name is None]
  if unnamed:  # a bug here, not in the file
    raise AssertionError(f"no big_vision name for {unnamed[:5]}")
  hf.check_keys(names.values(), flat, "the big_vision file")
  params: dict = {}
  wrong = []
  for path, leaf in abstract.items():
    value = flat[names[path]]
    want = tuple(leaf.shape) if path not in (("t",), ("b",)) else (1,)
    if value.shape != want:
      wrong.append(f"{names[path]}: shape {value.shape}, expected {want}")
      continue
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value.reshape(leaf.shape) if path in (("t",), ("b",)) else value
  if wrong:
    raise ValueError(f"the big_vision file has {len(wrong)} wrong shape(s): "
                     f"{'; '.join(wrong[:5])}")
  params = _restack(params, scan)
  if image_size is not None and image_size // patch != grid:
    params = posemb.resize_image_tower(params, "img", image_size=image_size, patch_size=patch,
                                       num_prefix=0, method="bilinear_corners")
  return _with_scan(model, scan, scan), params


def read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Every array of a .npz file, read with allow_pickle=False: pickled files and object arrays
  raise a ValueError naming the file (and the key) without being unpickled."""
  path = os.fspath(path)
  try:
    loaded = np.load(path, allow_pickle=False)
  except ValueError as e:  # NumPy takes what is neither .npz nor .npy for a pickle
    raise ValueError(f"{path} is not an .npz archive of arrays: NumPy reads it as pickled "
                     f"Python objects, which vljax never unpickles ({e})") from e
  except zipfile.BadZipFile as e:
    raise ValueError(f"{path} is a broken .npz archive: {e}") from e
  if isinstance(loaded, np.ndarray):
    raise ValueError(f"{path} holds a single array (np.save), not an .npz archive of named "
                     "arrays (np.savez)")
  with loaded:
    out = {}
    for key in loaded.files:
      try:
        out[key] = _checked_array(key, loaded[key])
      except ValueError as e:
        if "allow_pickle" in str(e):
          raise ValueError(f"{path}: {key} is an object array (pickled Python objects): vljax "
                           "never unpickles checkpoint files") from e
        raise ValueError(f"{path}: {e}") from e
  return out


def load(path: str | os.PathLike[str], *, variant: str | None = None,
         image_size: int | None = None, scan: bool = False) -> tuple[TwoTower, dict]:
  """(TwoTower, params as NumPy arrays) of a big_vision two-towers .npz file; see
  `from_npz_dict` for `variant`, `image_size` and `scan`, and the inputs the model takes."""
  arrays = read_npz(path)
  try:
    return from_npz_dict(arrays, variant=variant, image_size=image_size, scan=scan)
  except hf.KeyMismatchError as e:
    raise hf.KeyMismatchError(f"{os.fspath(path)}: {e}", e.missing, e.unexpected) from e
  except NotImplementedError as e:
    raise NotImplementedError(f"{os.fspath(path)}: {e}") from e
  except ValueError as e:
    raise ValueError(f"{os.fspath(path)}: {e}") from e


# --- Writing ---------------------------------------------------------------------------------

# What decides the function of a TwoTower (not dtypes, initialisation, dropout or sharding).
_IMAGE_FIELDS = ("stem", "posemb", "pool", "pre_norm", "patch_bias", "act", "norm_eps",
                 "out_dim", "out_bias")
_TEXT_FIELDS = ("vocab_size", "max_len", "causal", "pool", "mask_padding", "act", "norm_eps",
                "norm_position", "out_dim", "out_bias")


def _describe(model: TwoTower) -> dict[str, Any]:
  image, text = _towers(model)
  out = {"contrastive": model.contrastive}
  for name, tower, fields in (("image", image, _IMAGE_FIELDS), ("text", text, _TEXT_FIELDS)):
    out.update({f"{name}.{k}": v for k, v in tower.sizes().items()})
    out.update({f"{name}.{k}": getattr(tower, k) for k in fields})
    if tower.out_dim is None:
      out[f"{name}.out_bias"] = None  # no head, no bias
  if image.pool == "map":
    out["image.map_act"] = image.map_act
  return out


def _check_expressible(model: TwoTower) -> None:
  """Raises a ValueError naming what big_vision's two towers cannot express."""
  if not isinstance(model, TwoTower):
    raise TypeError(f"big_vision.save exports vljax TwoTower modules, got {type(model).__name__}")
  image, text = _towers(model)
  si, st = image.sizes(), text.sizes()
  canonical = TwoTower(**_fields(
      {k: si[k] for k in ("width", "depth", "mlp_dim", "num_heads", "patch_size")},
      {k: st[k] for k in ("width", "depth", "mlp_dim", "num_heads")},
      pool=image.pool if image.pool in ("map", "gap") else "map", image_out=image.out_dim,
      text_out=text.out_dim, vocab_size=text.vocab_size, max_len=text.max_len,
      contrastive=model.contrastive))
  mine, theirs = _describe(model), _describe(canonical)
  differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
  if differing:
    raise ValueError("big_vision's two towers cannot express this vljax TwoTower: " + ", ".join(
        f"{k}={mine.get(k)!r} (big_vision's has {theirs.get(k)!r})" for k in differing))


def _grid(params: Mapping) -> int:
  """The side of the square patch grid of the image tower's position table."""
  table = params.get("img", {}).get("pos_embedding", {}).get("pos_embedding")
  rows = np.shape(table)[1] if table is not None and np.ndim(table) == 3 else 0
  grid = math.isqrt(rows)
  if rows == 0 or grid * grid != rows:
    raise ValueError("img/pos_embedding/pos_embedding is not a [1, grid * grid, width] table: "
                     "big_vision's files hold square grids")
  return grid


def to_npz_dict(model: TwoTower, params: Mapping, *, scan: bool = False) -> dict[str, np.ndarray]:
  """The flat big_vision dict ("params/img/...", t and b as [1]) of `params` of `model`
  (scanned or not, boxed or not, or `model.init`'s variables dict); the unscanned layout of the
  released files, or the scanned one with `scan`. Raises naming what big_vision cannot express
  and the missing, unexpected or misshapen params."""
  _check_expressible(model)
  params = nn.meta.unbox(params)
  if set(params) == {"params"}:
    params = params["params"]
  params = jax.tree.map(np.asarray, flax.core.unfreeze(params))
  got = flax.traverse_util.flatten_dict(params)
  scanned = {tower: any(p[:3] == (tower, "encoder", "layers") for p in got)
             for tower in ("img", "txt")}
  abstract = _abstract(_with_scan(model, scanned["img"], scanned["txt"]),
                       _grid(params) * _towers(model)[0].sizes()["patch_size"])
  unnamed = ["/".join(p) for p in abstract if npz_name(p) is None]
  if unnamed:  # e.g. a CLS token or a pre-norm, which fields added after this file may bring
    raise ValueError(f"big_vision's two towers have no parameter for {', '.join(unnamed[:5])}")
  hf.check_keys(["/".join(p) for p in abstract], ["/".join(p) for p in got],
                "the params of this TwoTower")
  wrong = [f"{'/'.join(p)}: {got[p].shape}, expected {tuple(leaf.shape)}"
           for p, leaf in abstract.items() if got[p].shape != tuple(leaf.shape)]
  if wrong:
    raise ValueError(f"the params of this TwoTower have {len(wrong)} wrong shape(s): "
                     f"{'; '.join(wrong[:5])}")
  if model.max_scale is not None:
    scale = float(np.exp(params["t"].astype(np.float64)))
    if scale > model.max_scale:
      raise ValueError(f"its logit scale exp(t)={scale:.4g} is clamped at max_scale="
                       f"{model.max_scale}, and big_vision does not clamp")
  out = {}
  for path, value in flax.traverse_util.flatten_dict(_restack(params, scan)).items():
    name = npz_name(path)  # not None: the keys are the abstract ones, all named
    out[PREFIX + name] = value.reshape(1) if path in (("t",), ("b",)) else value
  return out


def save(path: str | os.PathLike[str], model: TwoTower, params: Mapping, *,
         scan: bool = False, overwrite: bool = False) -> str:
  """Writes `params` of `model` as a big_vision .npz (`to_npz_dict`, saved as big_vision's
  `np.savez` of `tree_flatten_with_names`; bfloat16 as 2-byte void, which its `recover_dtype`
  reads back). An existing file needs `overwrite`. Returns the path."""
  path = os.fspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  arrays = {k: (v.view(np.dtype("V2")) if v.dtype == ml_dtypes.bfloat16 else v)
            for k, v in to_npz_dict(model, params, scan=scan).items()}
  write_atomically(path, lambda f: np.savez(f, **arrays))
  return path


# --- Released layouts ------------------------------------------------------------------------


def preset(name: str, *, scan: bool = False) -> tuple[TwoTower, int]:
  """(TwoTower, image size) of a released SigLIP file in RELEASED, e.g. "So400m/14 384"."""
  if name not in RELEASED:
    raise ValueError(f"Unknown released SigLIP {name!r}; known: {', '.join(RELEASED)}")
  variant, image_size, text_variant, text_len, vocab, text_out, _ = RELEASED[name]
  fields = _fields({"variant": variant, "scan": scan}, {"variant": text_variant, "scan": scan},
                   pool="map", image_out=None, text_out=text_out, vocab_size=vocab,
                   max_len=text_len, contrastive="sigmoid")
  return TwoTower(**fields), image_size


def abstract_npz(model: TwoTower, *, image_size: int,
                 scan: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """The keys, shapes and dtypes of the .npz that `save` writes for `model` seeing
  `image_size` images (nothing is initialised)."""
  laid_out = _with_scan(model, scan, scan)
  out = {}
  for path, leaf in _abstract(laid_out, image_size).items():
    name = npz_name(path)
    if name is None:
      raise ValueError(f"big_vision has no name for {'/'.join(path)}")
    shape = (1,) if path in (("t",), ("b",)) else tuple(leaf.shape)
    out[PREFIX + name] = jax.ShapeDtypeStruct(shape, leaf.dtype)
  return out
