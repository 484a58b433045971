"""vljax.convert.open_clip and vljax.convert.clip_bpe against open_clip itself: tiny CLIP and CoCa
models with random weights, written as open_clip's hub directories (open_clip_config.json and
open_clip_model.safetensors, which open_clip's own factory loads), give the same image and text
embeddings, logits and CoCa captioning logits in vljax (float32, 1e-4); unsupported configs and
broken checkpoints are refused by name; open_clip's tokenizer and eval image transform give the
same ids and pixels.

The tiny configs are chosen to break a wrong mapping: unequal tower widths, a 5 x 5 patch grid
(20px images, 4px patches), quick_gelu next to gelu, CLIP's text tower at the top level and
under "text." (CustomTextCLIP), the largest id tied in a row (argmax pools the first), a real
token 0 (open_clip's pad id) inside a text, a CoCa whose ViT is wider than its decoder (torch's
separate q / k / v pooler weights) next to one of equal widths (fused), scanned layers, a logit
scale above 100 (not clamped) and a logit bias."""
import json
import math
import re
import sys
import types

import numpy as np
import PIL.Image
import pytest

import jax


def _import_open_clip():
  """open_clip, imported the one way it imports beside the CPU torch the test extra pins: the
  only torchvision wheel for torch 2.13 is a CUDA build whose compiled ops cannot load here, and
  importing it fails while it registers fake kernels for them (torchvision._meta_registrations).
  Only those registrations are skipped; torchvision's Python transforms, which open_clip's
  image_transform uses, work. (tests/conftest.py does the same for the whole run.)"""
  sys.modules.setdefault("torchvision._meta_registrations",
                         types.ModuleType("torchvision._meta_registrations"))
  import open_clip as module  # pylint: disable=import-outside-toplevel
  return module


open_clip = _import_open_clip()
torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
skimage_data = pytest.importorskip("skimage.data")

from open_clip.coca_model import CoCa as TorchCoCa  # noqa: E402
from open_clip.tokenizer import SimpleTokenizer, default_bpe  # noqa: E402

from vljax.convert import checkpoints, clip_bpe, hf  # noqa: E402
from vljax.convert import open_clip as oc  # noqa: E402
from vljax.models.coca import CoCa  # noqa: E402
from vljax.models.two_tower import TwoTower  # noqa: E402

LOG_SCALE = math.log(150.0)  # above CLIP's clamp at 100
VISION = dict(image_size=20, patch_size=4, width=32, layers=2, head_width=8, mlp_ratio=2.0)
TEXT = dict(context_length=10, vocab_size=60, width=24, heads=3, layers=2)
# CoCa's towers return their tokens too (as open_clip's CoCa configs say).
COCA_VISION = dict(VISION, attentional_pool=True, output_tokens=True)
COCA_TEXT = dict(TEXT, embed_cls=True, output_tokens=True)
SOT, EOT = 58, 59
CLIP_CASES = {
    # OpenAI's layout: CLIP (text tower at the top level), quick_gelu, pooled at the largest id.
    "openai": dict(embed_dim=16, quick_gelu=True, vision_cfg=VISION, text_cfg=TEXT),
    # LAION's: gelu; CustomTextCLIP ("text." keys) pooled at the first eos_id, a projection
    # with bias, no ln_pre, a logit bias (the sigmoid loss's).
    "custom_text": dict(embed_dim=16, custom_text=True, init_logit_bias=-2.5,
                        vision_cfg=dict(VISION, no_ln_pre=True),
                        text_cfg=dict(TEXT, pool_type="eos", eos_id=EOT, proj_bias=True,
                                      mlp_ratio=3.0)),
}
COCA_CASES = {
    # ViT 32 wide, decoder 24: the pooler projects keys / values from 32 (q/k/v_proj_weight).
    # One layer per tower but two multimodal ones (few to compile, every mapping shown).
    "coca": dict(embed_dim=24, vision_cfg=dict(COCA_VISION, layers=1, attn_pooler_heads=2,
                                               attn_pooler_queries=5),
                 text_cfg=dict(COCA_TEXT, layers=1),
                 multimodal_cfg=dict(context_length=10, width=24, heads=3, layers=2),
                 custom_text=True),
    # Equal widths (a fused in_proj_weight in the pooler), quick_gelu, loaded scanned and fed
    # a text shorter than the context (the CLS then takes position row 7, not 10).
    "coca_scanned": dict(embed_dim=24, quick_gelu=True,
                         vision_cfg=dict(COCA_VISION, width=24, attn_pooler_queries=4,
                                         attn_pooler_heads=3),
                         text_cfg=dict(COCA_TEXT, layers=1),
                         multimodal_cfg=dict(context_length=10, width=24, heads=3, layers=2),
                         custom_text=True),
}
PREPROCESS = dict(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], interpolation="bicubic",
                  resize_mode="shortest")
# Rows: SOT, text (with a real 0, open_clip's pad id), EOT, pads of 0; the second row has the
# largest id twice (argmax and open_clip's first eos both take the first).
TOKENS = np.array([[SOT, 5, 0, 7, EOT, 0, 0, 0, 0, 0],
                   [SOT, 9, 3, EOT, 8, EOT, 12, 4, 0, 0]])


def _perturb(model):
  """Random weights far from the initialisation (open_clip leaves some projections as
  torch.empty): norm weights 1 + 0.2 N, biases 0.2 N, the rest 0.2 N; logit scale 150, bias
  -2.5."""
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if name == "logit_scale":
        p.fill_(LOG_SCALE)
      elif name == "logit_bias":
        p.fill_(-2.5)
      elif name.endswith("weight") and p.ndim == 1:
        p.copy_(1 + 0.2 * noise)
      else:
        p.copy_(0.2 * noise)
  return model.eval()


def _write_hub_dir(path, model_cfg, model):
  """open_clip's hub layout: open_clip_config.json and open_clip_model.safetensors."""
  path.mkdir(parents=True, exist_ok=True)
  config = {"model_cfg": model_cfg, "preprocess_cfg": PREPROCESS}
  (path / oc.CONFIG_NAME).write_text(json.dumps(config, indent=2))
  safetensors_torch.save_file(model.state_dict(), str(path / oc.WEIGHTS_NAMES[0]))
  return str(path)


def _pixels(seed=0):
  return np.random.default_rng(seed).normal(size=(2, 3, 20, 20)).astype(np.float32)


def _apply(model, params, pixels_bchw, tokens_bt):
  # One compiled program: much faster on CPU than dispatching op by op.
  out = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))(
      params, pixels_bchw.transpose(0, 2, 3, 1), tokens_bt)
  return jax.tree.map(np.asarray, out)


@pytest.fixture(scope="module", params=sorted(CLIP_CASES))
def clip_dir(request, tmp_path_factory):
  torch.manual_seed(0)
  cfg = CLIP_CASES[request.param]
  cls = open_clip.CustomTextCLIP if cfg.get("custom_text") else open_clip.CLIP
  model = _perturb(cls(**{k: v for k, v in cfg.items() if k != "custom_text"}))
  path = _write_hub_dir(tmp_path_factory.mktemp(request.param), cfg, model)
  return request.param, path, model


def test_clip_parity(clip_dir):
  name, path, torch_model = clip_dir
  model, params = oc.load(path)
  assert isinstance(model, TwoTower) and model.max_scale is None
  assert ("txt" in params) and ("b" in params) == (name == "custom_text")
  # open_clip's own factory reads the directory as written and computes the same.
  reference = open_clip.create_model("local-dir:" + path).eval()
  pixels = _pixels()
  with torch.no_grad():
    want_img = reference.encode_image(torch.tensor(pixels), normalize=True).numpy()
    want_txt = reference.encode_text(torch.tensor(TOKENS), normalize=True).numpy()
    want_logits, _ = torch_model.get_logits(torch.tensor(pixels), torch.tensor(TOKENS))
  out = _apply(model, params, pixels, TOKENS)
  logits = out["scale"] * out["zimg"] @ out["ztxt"].T + out.get("bias", 0.0)
  np.testing.assert_allclose(out["zimg"], want_img, atol=1e-4, rtol=0, err_msg="image")
  np.testing.assert_allclose(out["ztxt"], want_txt, atol=1e-4, rtol=0, err_msg="text")
  np.testing.assert_allclose(logits, want_logits.numpy(), atol=1e-4, rtol=0, err_msg="logits")
  # The scale, 150, is above CLIP's training clamp: open_clip's forward does not clamp it.
  np.testing.assert_allclose(out["scale"], 150.0, rtol=1e-6)
  # eval.py and config.init read the directory through the checkpoint registry ...
  imported = checkpoints.read(path)
  assert (imported.format, imported.family) == ("open_clip", "two_tower")
  assert imported.data == {"image_size": 20, "max_text_len": 10,
                           "image_mean": tuple(PREPROCESS["mean"]),
                           "image_std": tuple(PREPROCESS["std"])}
  # ... and resample its position table for 28px images as open_clip's resize_pos_embed does.
  state = {"visual.positional_embedding": torch_model.visual.positional_embedding.detach()}
  cfg = dict(CLIP_CASES[name])
  cfg["vision_cfg"] = dict(cfg["vision_cfg"], image_size=28)
  cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
  open_clip.model.resize_pos_embed(state, cls(**cfg))
  table = params["img"]["pos_embedding"]["pos_embedding"]
  resized = checkpoints.resize_position_table("img/pos_embedding/pos_embedding", table,
                                              (1, 50, table.shape[-1]), imported.posemb_method)
  np.testing.assert_allclose(resized[0], state["visual.positional_embedding"].numpy(), atol=1e-6)


@pytest.mark.parametrize("name", sorted(COCA_CASES))
def test_coca_parity(name, tmp_path):
  cfg = COCA_CASES[name]
  torch.manual_seed(0)
  torch_model = _perturb(TorchCoCa(**{k: v for k, v in cfg.items() if k != "custom_text"}))
  path = _write_hub_dir(tmp_path, cfg, torch_model)
  scan = name == "coca_scanned"
  model, params = oc.load(path, scan=scan)
  assert isinstance(model, CoCa) and model.layout == "open_clip" and model.scan == scan
  assert ("layers" in params["multimodal"]) == scan
  pixels, tokens = _pixels(1), TOKENS[:, :7] if scan else TOKENS
  with torch.no_grad():
    want = torch_model(torch.tensor(pixels), torch.tensor(tokens), output_labels=False)
  got = _apply(model, params, pixels, tokens)
  for key, ref_key in (("zimg", "image_features"), ("ztxt", "text_features"),
                       ("logits", "logits")):
    np.testing.assert_allclose(got[key], want[ref_key].numpy(), atol=1e-4, rtol=0, err_msg=key)
  np.testing.assert_allclose(got["scale"], 150.0, rtol=1e-6)
  imported = checkpoints.read(path)
  assert (imported.format, imported.family) == ("open_clip", "coca")
  assert imported.model["layout"] == "open_clip" and "contrastive" not in imported.model
  if not scan:  # the scanned layout on demand, for a config that scans
    jax.tree.map(np.testing.assert_array_equal, imported.scanned(imported.params),
                 oc.load(path, scan=True)[1])


def _clip_state(cfg=None):
  cfg = cfg or CLIP_CASES["openai"]
  torch.manual_seed(0)
  model = open_clip.CLIP(**cfg)
  return {k: v.numpy() for k, v in model.state_dict().items()}


def test_refusals(tmp_path):
  base = {"model_cfg": CLIP_CASES["openai"]}
  refused = {
      "vision_cfg.ls_init_value": dict(vision_cfg=dict(VISION, ls_init_value=1e-4)),
      "text_cfg.ls_init_value": dict(text_cfg=dict(TEXT, ls_init_value=1e-4)),
      "vision_cfg.timm_model_name": dict(vision_cfg=dict(timm_model_name="vit_base_patch16")),
      "text_cfg.hf_model_name": dict(text_cfg=dict(TEXT, hf_model_name="roberta-base")),
      "vision_cfg.layers": dict(vision_cfg=dict(VISION, layers=[3, 4, 6, 3])),
      "vision_cfg.pool_type": dict(vision_cfg=dict(VISION, pool_type="avg")),
      "text_cfg.qk_norm": dict(text_cfg=dict(TEXT, qk_norm=True)),
      "vision_cfg.attentional_pool": dict(vision_cfg=dict(VISION, attentional_pool=True)),
      "vision_cfg.unknown_field": dict(vision_cfg=dict(VISION, unknown_field=1)),
  }
  for field, change in refused.items():
    config = {"model_cfg": {**base["model_cfg"], **change}}
    with pytest.raises(NotImplementedError, match=re.escape(field)):
      oc.from_state_dict(config, {})
  coca = COCA_CASES["coca"]
  with pytest.raises(NotImplementedError, match="multimodal_cfg.width"):
    oc.coca_fields({"model_cfg": dict(coca, multimodal_cfg=dict(coca["multimodal_cfg"],
                                                                width=32))})
  with pytest.raises(NotImplementedError, match="text_cfg.mlp_ratio"):
    oc.coca_fields({"model_cfg": dict(coca, text_cfg=dict(coca["text_cfg"], mlp_ratio=2.0))})
  # Missing and extra tensors are named.
  state = _clip_state()
  missing = {k: v for k, v in state.items() if k != "ln_final.bias"}
  with pytest.raises(hf.KeyMismatchError, match="ln_final.bias") as error:
    oc.from_state_dict(base, {**missing, "visual.extra": np.zeros(2, np.float32)})
  assert error.value.missing == ["ln_final.bias"] and error.value.unexpected == ["visual.extra"]
  wrong = dict(state, **{"visual.proj": state["visual.proj"].T.copy()})
  with pytest.raises(ValueError, match="visual.proj: shape"):
    oc.from_state_dict(base, wrong)
  # A pickle-only directory is refused without being opened (this one is not even a pickle).
  (tmp_path / oc.CONFIG_NAME).write_text(json.dumps(base))
  (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"not a pickle")
  with pytest.raises(ValueError, match="never loads pickles"):
    oc.load(tmp_path)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=oc.CONFIG_NAME):
    oc.load(tmp_path / "empty")


# --- Tokenizer ---------------------------------------------------------------------------------

CORPUS = [
    "a photo of a cat", "", "   ", "Hello, World!!! It's a DOG'S life; we'll see...",
    "café naïve résumé Ångström ß ẞ", "日本語のテキスト 中文 한국어", "emoji 😀🐱‍👤 👍🏽",
    "don’t “quoted” ﬁne ＡＢＣ１２３ ǅ", "cafÃ© mojibake", "&amp;lt;b&amp;gt; &quot;x&quot; &#39;",
    "numbers 12345 3.14 1,000,000", "tabs\tand\nnewlines\r\n here",
    "<start_of_text> and <end_of_text> inside", "!!!! ! ! 0", "It'S 'LL 'Re ''s",
    "word " * 100, "a-b_c/d\\e", "e\u0301 \u0301combining", "x" * 300,
    "\x00\x07control\x1b[31mred", "i'm gonna say it: ÆØÅ æøå çà",
]


def test_tokenizer_matches_open_clip():
  tokenizer = clip_bpe.ClipBPETokenizer(default_bpe())
  reference = SimpleTokenizer()
  assert tokenizer.vocab_size == reference.vocab_size == 49408
  assert (tokenizer.bos_id, tokenizer.eos_id) == (reference.sot_token_id, reference.eot_token_id)
  want = reference(CORPUS).numpy()
  got = tokenizer(CORPUS)
  assert got.dtype == np.int32 and got.shape == (len(CORPUS), 77)
  for text, w, g in zip(CORPUS, want, got):
    np.testing.assert_array_equal(g, w, err_msg=repr(text))
  # Truncation keeps the end of text last; another context length; one text.
  assert got[CORPUS.index("word " * 100), -1] == tokenizer.eos_id
  np.testing.assert_array_equal(tokenizer(CORPUS, context_length=5),
                                reference(CORPUS, context_length=5).numpy())
  np.testing.assert_array_equal(tokenizer("a dog"), reference("a dog").numpy())
  for text in CORPUS:
    ids = reference.encode(text)
    assert tokenizer.tokenize(text) == ids, repr(text)
    assert tokenizer.decode_ids(ids) == reference.decode(ids), repr(text)
  # The data-view interface: rows up to the end of text; a real "!" (id 0) is kept.
  assert tokenizer.decode(tokenizer(["Hi! you", ""])) == ["hi ! you", ""]
  np.testing.assert_array_equal(tokenizer.encode(CORPUS[:4], 12, bos=True),
                                reference(CORPUS[:4], context_length=12).numpy())
  for clean in ("whitespace", "canonicalize"):
    np.testing.assert_array_equal(clip_bpe.ClipBPETokenizer(default_bpe(), clean=clean)(CORPUS),
                                  SimpleTokenizer(clean=clean)(CORPUS).numpy(), err_msg=clean)
  # Without ftfy only the texts ftfy changes differ.
  plain = clip_bpe.ClipBPETokenizer(default_bpe(), fix_text=False)(CORPUS)
  differing = {text for text, w, g in zip(CORPUS, want, plain) if (w != g).any()}
  assert differing == {"don’t “quoted” ﬁne ＡＢＣ１２３ ǅ", "cafÃ© mojibake",
                       "e\u0301 \u0301combining", "\x00\x07control\x1b[31mred"}


# --- Image preprocessing -----------------------------------------------------------------------

PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket")  # RGB and greyscale, 5 shapes
TRANSFORMS = [
    dict(size=224), dict(size=97), dict(size=(96, 131)),
    dict(size=(131, 96), interpolation="bilinear"),
    dict(size=97, resize_mode="longest", fill_color=37),
    dict(size=(80, 120), resize_mode="longest"),
    dict(size=(63, 97), resize_mode="squash", interpolation="bilinear"),
]


@pytest.mark.parametrize("case", TRANSFORMS, ids=str)
def test_image_transform_matches_open_clip(case):
  kw = dict(case)
  size = kw.pop("size")
  mean, std = PREPROCESS["mean"], PREPROCESS["std"]
  reference = open_clip.image_transform(size, is_train=False, mean=mean, std=std, **kw)
  transform = oc.ImageTransform(size, mean=mean, std=std, **kw)
  images = [PIL.Image.fromarray(getattr(skimage_data, name)()) for name in PHOTOS]
  rgba = images[1].convert("RGBA")
  rgba.putalpha(100)  # dropped, not composited
  for image in images + [rgba, images[2].convert("P")]:
    want = reference(image).numpy().transpose(1, 2, 0)
    got = transform(image)
    assert got.shape == (1, *want.shape)
    np.testing.assert_allclose(got[0], want, atol=1e-5, rtol=0, err_msg=image.mode)


def test_image_transform_from_config():
  config = {"model_cfg": COCA_CASES["coca"],
            "preprocess_cfg": dict(PREPROCESS, resize_mode="squash", interpolation="bilinear")}
  transform = oc.ImageTransform.from_config(config)
  assert transform.size == (20, 20) and transform.resize_mode == "squash"
  np.testing.assert_allclose(transform.mean, PREPROCESS["mean"])
  image = PIL.Image.fromarray(skimage_data.chelsea())
  reference = open_clip.image_transform(20, is_train=False, mean=PREPROCESS["mean"],
                                        std=PREPROCESS["std"], resize_mode="squash",
                                        interpolation="bilinear")
  np.testing.assert_allclose(transform([image, image])[1],
                             reference(image).numpy().transpose(1, 2, 0), atol=1e-5, rtol=0)
