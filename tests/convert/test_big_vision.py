"""vljax.convert.big_vision: big_vision SigLIP .npz files load into vljax's TwoTower with the
image embeddings, text embeddings and logits of a NumPy forward written from big_vision's model
code (npz_siglip_reference.py; float32 against float64, 1e-4); exporting then importing is the
identity; broken files are refused by name (object arrays and pickles without unpickling); the
released B/16, L/16 and So400m/14 presets have the keys and shapes of the released files.

The files are written here from big_vision's module structure (not from vljax's mapping), with
random weights. The tiny cases are chosen to break a wrong mapping: unequal tower widths, an odd
5 x 5 grid, heads of unusual size (So400m's are 72 wide), an MLP width that is no multiple of
the width (So400m's 4304), a border narrower than a patch (So400m/14 at 384px sees 27 x 27
patches), a scanned file, pads of id 1 with a real 1 inside the text, and a softmax-loss file
with a mean-pooled image tower, an image head and no text head."""
import pickle

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import scipy.ndimage

from tests.convert import npz_siglip_reference as reference
from vljax.convert import big_vision, checkpoints, hf
from vljax.models.two_tower import TwoTower
from vljax.models.vit import ViT

LOG_SCALE = np.log(10.0)  # SigLIP's t' initialisation
BIAS = -2.5


# --- big_vision's parameter layout, written from its modules --------------------------------


def bv_shapes(img: dict, txt: dict, *, bias: bool = True, scanned: bool = False) -> dict:
  """{"params/...": shape} of big_vision's two_towers.Model: vit._Model "img" (nn.Conv
  "embedding", "pos_embedding" [1, grid^2, D], Encoder "Transformer", MAPHead_0 for
  pool_type "map", "head" when num_classes), text_transformer._Model "txt" (nn.Embed
  "Embed_0", "pos_embedding" [1, length, D], Encoder "Encoder_0", "head" when num_classes),
  "t" [1] and, with bias_init, "b" [1]. Each Encoder1DBlock: LayerNorm_0,
  MultiHeadDotProductAttention_0 (query / key / value [D, H, D/H] + [H, D/H], out [H, D/H, D]
  + [D]), LayerNorm_1, MlpBlock_0 (Dense_0, Dense_1); scan=True stacks the blocks as
  "encoderblock" with a leading layer axis."""
  out = {}

  def add(key, *shape):
    out["params/" + key] = tuple(shape)

  def norm(prefix, width, lead=()):
    add(prefix + "scale", *lead, width)
    add(prefix + "bias", *lead, width)

  def attention(prefix, width, heads, lead=()):
    for name in ("query", "key", "value"):
      add(f"{prefix}{name}/kernel", *lead, width, heads, width // heads)
      add(f"{prefix}{name}/bias", *lead, heads, width // heads)
    add(prefix + "out/kernel", *lead, heads, width // heads, width)
    add(prefix + "out/bias", *lead, width)

  def mlp(prefix, width, mlp_dim, lead=()):
    add(prefix + "Dense_0/kernel", *lead, width, mlp_dim)
    add(prefix + "Dense_0/bias", *lead, mlp_dim)
    add(prefix + "Dense_1/kernel", *lead, mlp_dim, width)
    add(prefix + "Dense_1/bias", *lead, width)

  def encoder(prefix, s):
    blocks = [("encoderblock/", (s["depth"],))] if scanned else [
        (f"encoderblock_{i}/", ()) for i in range(s["depth"])]
    for name, lead in blocks:
      norm(prefix + name + "LayerNorm_0/", s["width"], lead)
      attention(prefix + name + "MultiHeadDotProductAttention_0/", s["width"], s["heads"], lead)
      norm(prefix + name + "LayerNorm_1/", s["width"], lead)
      mlp(prefix + name + "MlpBlock_0/", s["width"], s["mlp"], lead)
    norm(prefix + "encoder_norm/", s["width"])

  def head(prefix, width, out_dim):
    if out_dim:
      add(prefix + "head/kernel", width, out_dim)
      add(prefix + "head/bias", out_dim)

  width = img["width"]
  add("img/embedding/kernel", img["patch"], img["patch"], 3, width)
  add("img/embedding/bias", width)
  add("img/pos_embedding", 1, img["grid"] ** 2, width)
  encoder("img/Transformer/", img)
  if img.get("pool", "map") == "map":
    add("img/MAPHead_0/probe", 1, 1, width)
    attention("img/MAPHead_0/MultiHeadDotProductAttention_0/", width, img["heads"])
    norm("img/MAPHead_0/LayerNorm_0/", width)
    mlp("img/MAPHead_0/MlpBlock_0/", width, img["mlp"])
  head("img/", width, img.get("head"))
  width = txt["width"]
  add("txt/Embed_0/embedding", txt["vocab"], width)
  add("txt/pos_embedding", 1, txt["length"], width)
  encoder("txt/Encoder_0/", txt)
  head("txt/", width, txt.get("head"))
  add("t", 1)
  if bias:
    add("b", 1)
  return out


# The towers' inputs: what `embed_scale` scales.
_EMBEDDINGS = ("params/img/embedding/kernel", "params/img/embedding/bias",
               "params/img/pos_embedding", "params/txt/Embed_0/embedding",
               "params/txt/pos_embedding")


def random_arrays(shapes: dict, seed: int = 0, embed_scale: float = 1.0) -> dict:
  """float32 weights far from any initialisation: LayerNorm scales 1 + 0.2 N, biases 0.2 N,
  kernels N / sqrt(fan in), embeddings, position tables and the probe 0.5 N; t' = log 10,
  b = -2.5. `embed_scale` scales the towers' inputs (a small one makes the first LayerNorm's
  epsilon matter)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in shapes.items():
    noise = rng.normal(size=shape)
    name = key.split("/")
    if key in ("params/t", "params/b"):
      value = np.full(shape, LOG_SCALE if key == "params/t" else BIAS)
    elif name[-1] == "kernel":
      scanned = "encoderblock" in name
      core = shape[1:] if scanned else shape
      attention = name[-2] in ("query", "key", "value")
      fan_in = core[0] if attention else int(np.prod(core[:-1]))
      value = noise / np.sqrt(fan_in)
    elif name[-1] == "scale":
      value = 1 + 0.2 * noise
    elif name[-1] == "bias":
      value = 0.2 * noise
    else:
      value = 0.5 * noise
    out[key] = (value * (embed_scale if key in _EMBEDDINGS else 1.0)).astype(np.float32)
  return out


CASES = {
    # SigLIP-shaped: unequal widths, an odd 5 x 5 grid (20px, patch 4), a MAP head, an MLP
    # wider than but no multiple of the width; loaded scanned.
    "siglip": dict(
        img=dict(width=32, depth=2, mlp=48, heads=4, patch=4, grid=5),
        txt=dict(width=24, depth=2, mlp=40, heads=3, vocab=50, length=8, head=32),
        image_px=20, load_scan=True),
    # So400m-like: heads 12 wide, mlp 86 (4304 / 1152 is not an integer either), patch 7 on
    # 30px images (a 2px border dropped, as So400m/14 at 384px); the file is scanned; inputs
    # to the first LayerNorms of variance ~1e-6, where flax's epsilon 1e-6 matters.
    "so400m_like": dict(
        img=dict(width=48, depth=2, mlp=86, heads=4, patch=7, grid=4),
        txt=dict(width=48, depth=2, mlp=86, heads=4, vocab=40, length=6, head=48),
        image_px=30, scanned=True, embed_scale=1e-3),
    # Softmax loss (no "b"), mean-pooled image tower with a head, no text head (as the
    # So400m/16-i18n file).
    "gap_softmax": dict(
        img=dict(width=16, depth=1, mlp=32, heads=2, patch=4, grid=3, pool="gap", head=24),
        txt=dict(width=24, depth=1, mlp=48, heads=2, vocab=30, length=5),
        image_px=12, bias=False),
}


def case_arrays(name: str, seed: int = 0) -> dict:
  case = CASES[name]
  return random_arrays(bv_shapes(case["img"], case["txt"], bias=case.get("bias", True),
                                 scanned=case.get("scanned", False)), seed,
                       case.get("embed_scale", 1.0))


def inputs(name: str, seed: int = 1):
  """Images in [-1, 1] and texts of the file's length, padded with 1, a real 1 inside."""
  case = CASES[name]
  rng = np.random.default_rng(seed)
  px, length, vocab = case["image_px"], case["txt"]["length"], case["txt"]["vocab"]
  images = rng.uniform(-1, 1, size=(3, px, px, 3)).astype(np.float32)
  tokens = rng.integers(2, vocab, size=(2, length))
  tokens[0, 1] = 1
  tokens[0, length - 2:] = 1
  return images, tokens.astype(np.int32)


def write(path, arrays):
  """big_vision's npsave: np.savez of the flat names."""
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return path


@pytest.fixture(scope="module", params=sorted(CASES))
def npz_file(request, tmp_path_factory):
  """(case name, path of its .npz, its arrays)."""
  arrays = case_arrays(request.param)
  path = write(tmp_path_factory.mktemp(request.param) / "model.npz", arrays)
  return request.param, path, arrays


def vljax_forward(model, params, images, tokens):
  out = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))(
      params, jnp.asarray(images), jnp.asarray(tokens))
  logits = out["scale"] * out["zimg"] @ out["ztxt"].T + out.get("bias", 0.0)
  return {"zimg": np.asarray(out["zimg"]), "ztxt": np.asarray(out["ztxt"]),
          "logits": np.asarray(logits)}


# --- Tests -----------------------------------------------------------------------------------


def test_import_parity_with_big_vision_reference(npz_file):
  name, path, arrays = npz_file
  case = CASES[name]
  scan = case.get("load_scan", False)
  model, params = big_vision.load(path, scan=scan)
  image, text = big_vision._towers(model)
  assert image.sizes() == dict(width=case["img"]["width"], depth=case["img"]["depth"],
                               mlp_dim=case["img"]["mlp"], num_heads=case["img"]["heads"],
                               patch_size=case["img"]["patch"])
  assert text.sizes()["num_heads"] == case["txt"]["heads"]
  assert model.contrastive == ("sigmoid" if case.get("bias", True) else "softmax")
  assert ("layers" in params["img"]["encoder"]) == scan == ("layers" in params["txt"]["encoder"])
  images, tokens = inputs(name)
  want = reference.two_towers(arrays, images, tokens)
  got = vljax_forward(model, params, images, tokens)
  assert got["logits"].shape == (3, 2)  # images along rows, as big_vision
  for key in ("zimg", "ztxt", "logits"):
    np.testing.assert_allclose(got[key], want[key], atol=1e-4, rtol=0, err_msg=key)


def test_export_then_import_is_identity(npz_file, tmp_path):
  name, path, arrays = npz_file
  scanned = CASES[name].get("scanned", False)
  model, params = big_vision.load(path)
  out = big_vision.save(tmp_path / "out.npz", model, params, scan=scanned)
  back = big_vision.read_npz(out)
  assert sorted(back) == sorted(arrays)
  for key, value in arrays.items():
    assert back[key].dtype == value.dtype, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  model_back, params_back = big_vision.load(out)
  assert model_back == model
  jax.tree.map(np.testing.assert_array_equal, params_back, params)
  # The other layout, in memory, and scanned params, read back to the same params.
  other = big_vision.to_npz_dict(model, params, scan=not scanned)
  assert any("/encoderblock/" in k for k in other) == (not scanned)
  _, params_other = big_vision.from_npz_dict(other)
  jax.tree.map(np.testing.assert_array_equal, params_other, params)
  scan_model, scan_params = big_vision.from_npz_dict(arrays, scan=True)
  again = big_vision.to_npz_dict(scan_model, scan_params, scan=scanned)
  for key, value in arrays.items():
    np.testing.assert_array_equal(again[key], value, err_msg=key)
  with pytest.raises(FileExistsError, match="overwrite"):
    big_vision.save(out, model, params)


def test_bfloat16_files_round_trip(tmp_path):
  """NumPy stores bfloat16 as 2-byte void (big_vision's recover_dtype views it back)."""
  arrays = {k: v.astype(ml_dtypes.bfloat16) for k, v in case_arrays("siglip").items()}
  path = write(tmp_path / "bf16.npz", arrays)
  assert np.load(path)["params/t"].dtype == np.dtype("V2")
  model, params = big_vision.load(path)
  assert params["img"]["map_head"]["probe"].dtype == ml_dtypes.bfloat16
  out = big_vision.save(tmp_path / "out.npz", model, params)
  with np.load(out, allow_pickle=False) as f:
    for key, value in arrays.items():
      assert f[key].dtype == np.dtype("V2"), key
      np.testing.assert_array_equal(f[key].view(ml_dtypes.bfloat16), value, err_msg=key)


def test_variant_and_image_size(tmp_path):
  """`variant` checks the sizes and names them; `image_size` resamples the position table as
  big_vision's vit.resample_posemb (scipy.ndimage.zoom, order 1)."""
  # vljax's "mu" preset: width 64, depth 2, mlp 256, 2 heads, for both towers.
  mu = dict(width=64, depth=2, mlp=256, heads=2)
  arrays = random_arrays(bv_shapes(dict(mu, patch=8, grid=2),
                                   dict(mu, vocab=20, length=4, head=64)))
  model, params = big_vision.from_npz_dict(arrays, variant="mu/8")
  assert model.image["variant"] == "mu/8" and model.text["variant"] == "mu"
  plain_model, plain = big_vision.from_npz_dict(arrays)
  assert big_vision._describe(model) == big_vision._describe(plain_model)
  jax.tree.map(np.testing.assert_array_equal, params, plain)
  with pytest.raises(ValueError, match="not the 'mu/4' variant: image.patch_size"):
    big_vision.from_npz_dict(arrays, variant="mu/4")
  with pytest.raises(ValueError, match="not the 'B/16' variant"):
    big_vision.from_npz_dict(case_arrays("siglip"), variant="B/16")

  arrays = case_arrays("siglip")
  _, params = big_vision.from_npz_dict(arrays, image_size=28)  # 5 x 5 -> 7 x 7
  old = arrays["params/img/pos_embedding"][0].reshape(5, 5, 32).astype(np.float64)
  want = scipy.ndimage.zoom(old, (7 / 5, 7 / 5, 1), order=1).reshape(1, 49, 32)
  np.testing.assert_allclose(params["img"]["pos_embedding"]["pos_embedding"], want, atol=1e-6)
  _, same = big_vision.from_npz_dict(arrays, image_size=23)  # still a 5 x 5 grid
  np.testing.assert_array_equal(same["img"]["pos_embedding"]["pos_embedding"],
                                arrays["params/img/pos_embedding"])


class _Tripwire:
  """Unpickling this calls `_tripped`: a file that holds it must be refused unread."""
  fired = []

  def __reduce__(self):
    return (_tripped, ())


def _tripped():
  _Tripwire.fired.append(True)
  return 0


def test_broken_files_are_refused_by_name(tmp_path):
  arrays = case_arrays("siglip")
  key = "params/txt/Encoder_0/encoderblock_1/LayerNorm_1/bias"
  with pytest.raises(hf.KeyMismatchError, match="1 missing.*encoderblock_1/LayerNorm_1/bias"):
    big_vision.from_npz_dict({k: v for k, v in arrays.items() if k != key})
  with pytest.raises(hf.KeyMismatchError, match="1 unexpected.*img/extra/kernel") as e:
    big_vision.load(write(tmp_path / "extra.npz",
                          dict(arrays, **{"params/img/extra/kernel": np.zeros(3)})))
  assert e.value.unexpected == ["img/extra/kernel"] and str(tmp_path) in str(e.value)
  with pytest.raises(hf.KeyMismatchError, match="img/embedding/kernel"):
    big_vision.from_npz_dict({k: v for k, v in arrays.items()
                              if k != "params/img/embedding/kernel"})
  wrong = dict(arrays, **{"params/img/MAPHead_0/LayerNorm_0/scale": np.ones(31, np.float32)})
  with pytest.raises(ValueError, match="MAPHead_0/LayerNorm_0/scale: shape"):
    big_vision.from_npz_dict(wrong)
  with pytest.raises(NotImplementedError, match="img/cls"):
    big_vision.from_npz_dict(dict(arrays, **{"params/img/cls": np.zeros((1, 1, 32))}))

  # Pickles: an object array inside an archive, and a pickle named .npz; neither is unpickled.
  with open(tmp_path / "object.npz", "wb") as f:
    np.savez(f, **dict(arrays, **{"params/t": np.array([_Tripwire()], dtype=object)}))
  with pytest.raises(ValueError, match="params/t is an object array"):
    big_vision.load(tmp_path / "object.npz")
  (tmp_path / "pickle.npz").write_bytes(pickle.dumps({"params/t": _Tripwire()}))
  with pytest.raises(ValueError, match="pickled Python objects"):
    big_vision.load(tmp_path / "pickle.npz")
  assert not _Tripwire.fired
  np.save(tmp_path / "single.npy", np.zeros(3))
  with pytest.raises(ValueError, match="single array"):
    big_vision.load(tmp_path / "single.npy")
  with pytest.raises(ValueError, match="object array"):
    big_vision.from_npz_dict(dict(arrays, **{"params/b": np.array([None], dtype=object)}))


def test_export_refuses_what_big_vision_cannot_express(tmp_path):
  model, params = big_vision.from_npz_dict(case_arrays("siglip"))
  erf_gelu = model.clone(image=dict(model.image, act="gelu"))
  with pytest.raises(ValueError, match=r"image.act='gelu' \(big_vision's has 'gelu_tanh'\)"):
    big_vision.to_npz_dict(erf_gelu, params)
  causal = model.clone(text=dict(model.text, causal=True))
  with pytest.raises(ValueError, match="text.causal=True"):
    big_vision.save(tmp_path / "x.npz", causal, params)
  with pytest.raises(ValueError, match="image.pre_norm=True"):
    big_vision.to_npz_dict(model.clone(image=dict(model.image, pre_norm=True)), params)
  if "class_token" in ViT.__dataclass_fields__:  # a parameter big_vision's SigLIP lacks
    with pytest.raises(ValueError, match="no parameter for img/cls"):
      big_vision.to_npz_dict(model.clone(image=dict(model.image, class_token=True)), params)
  with pytest.raises(ValueError, match="clamped at max_scale=5"):
    big_vision.to_npz_dict(model.clone(max_scale=5.0), params)
  big_vision.to_npz_dict(model.clone(max_scale=100.0), params)  # exp(t') = 10: not clamped
  missing = {**params, "txt": {k: v for k, v in params["txt"].items() if k != "head"}}
  with pytest.raises(hf.KeyMismatchError, match="txt/head/dense/bias"):
    big_vision.to_npz_dict(model, missing)
  assert not (tmp_path / "x.npz").exists()


# The released files' sizes, from big_vision's vit.decode_variant and SigLIP_demo.ipynb
# (image variant, resolution, text variant, sequence length, vocabulary, text out_dim).
_SIZES = {"B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16), "So400m": (1152, 27, 4304, 16)}
RELEASED = {
    "B/16 224": ("B", 16, 224, 64, 32_000, 768),
    "L/16 384": ("L", 16, 384, 64, 32_000, 1024),
    "So400m/14 224": ("So400m", 14, 224, 16, 32_000, 1152),
    "So400m/14 384": ("So400m", 14, 384, 64, 32_000, 1152),
    "So400m/16-i18n 256": ("So400m", 16, 256, 64, 250_000, None),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_preset_layouts(name):
  size, patch, px, length, vocab, text_out = RELEASED[name]
  width, depth, mlp, heads = _SIZES[size]
  tower = dict(width=width, depth=depth, mlp=mlp, heads=heads)
  img = dict(tower, patch=patch, grid=px // patch)  # So400m/14 at 384: 27 (378px used)
  txt = dict(tower, vocab=vocab, length=length, head=text_out)
  model, image_size = big_vision.preset(name)
  assert image_size == px
  for scan in (False, True):
    got = big_vision.abstract_npz(model, image_size=image_size, scan=scan)
    want = bv_shapes(img, txt, scanned=scan)
    assert {k: tuple(v.shape) for k, v in got.items()} == want
    assert {v.dtype for v in got.values()} == {np.dtype(np.float32)}
  # The sizes inferred from those shapes are the preset's.
  inferred = TwoTower(**big_vision.config_from_npz(got))
  assert big_vision._describe(inferred) == big_vision._describe(model)


def test_checkpoint_registry_reads_npz_files(npz_file):
  """eval.py and config.init read .npz files through vljax.convert.checkpoints: the model, the
  settings big_vision's SigLIP pipeline used, and the scanned layout on demand."""
  name, path, _ = npz_file
  imported = checkpoints.read(path)
  model, params = big_vision.load(path)
  assert (imported.format, imported.family) == ("big_vision", "two_tower")
  assert imported.loss == {"contrastive": "sigmoid" if CASES[name].get("bias", True)
                           else "softmax"}
  assert imported.data["image_size"] == CASES[name]["img"]["grid"] * CASES[name]["img"]["patch"]
  assert imported.data["max_text_len"] == CASES[name]["txt"]["length"]
  assert imported.model["image"] == checkpoints.config_fields(model)["image"]
  jax.tree.map(np.testing.assert_array_equal, imported.params, params)
  _, scanned = big_vision.load(path, scan=True)
  jax.tree.map(np.testing.assert_array_equal, imported.scanned(imported.params), scanned)


def test_siglip_b16_config_has_the_released_b16_layout():
  """experiments/configs/siglip_b16.py trains what big_vision released as SigLIP B/16 224: the
  same .npz keys and shapes, and nothing big_vision cannot express (exportable as is)."""
  from vljax.train.config import load_config  # pylint: disable=import-outside-toplevel
  fields = load_config("siglip_b16.py").model.to_dict()
  fields["image"] = dict(fields["image"], scan=False, remat="none")
  fields["text"] = dict(fields["text"], scan=False, remat="none", pad_id=big_vision.PAD_ID,
                        max_len=64)
  model = TwoTower(**fields, contrastive="sigmoid")
  released, image_size = big_vision.preset("B/16 224")
  want = big_vision.abstract_npz(released, image_size=image_size)
  got = big_vision.abstract_npz(model, image_size=224)
  assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
  # What the export command checks first.
  big_vision._check_expressible(model)  # pylint: disable=protected-access
