"""Parameter counts of the size presets (from jax.eval_shape: nothing is allocated) against the
published counts, within 1%. Each case says which parts the count includes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.helpers import tiny_config
from vljax.data.tokenizer import shapes_tokenizer
from vljax.families import get_family, model_config
from vljax.models import CoCa, TextTransformer, TwoTower, ViT

MODULES = {"vit": ViT, "text": TextTransformer, "two_tower": TwoTower}


def build_model(model_cfg):
  cfg = dict(model_cfg)
  return MODULES[cfg.pop("name")](**cfg)


def count_params(model_cfg, *inputs) -> int:
  model = build_model(model_cfg)
  shapes = jax.eval_shape(lambda *x: model.init(jax.random.key(0), *x), *inputs)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


def images(size):
  return jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)


def tokens(length):
  return jax.ShapeDtypeStruct((1, length), jnp.int32)


CASES = [
    # (what, published millions, model config, inputs)
    # ViT paper (Dosovitskiy et al.) Table 1; counts include a 1000-way classification head.
    ("ViT-Ti/16 + head", 5.7, dict(name="vit", variant="Ti/16", pool="cls", out_dim=1000), (images(224),)),
    ("ViT-S/16 + head", 22.0, dict(name="vit", variant="S/16", pool="cls", out_dim=1000), (images(224),)),
    ("ViT-B/16 + head", 86.0, dict(name="vit", variant="B/16", pool="cls", out_dim=1000), (images(224),)),
    ("ViT-L/16 + head", 307.0, dict(name="vit", variant="L/16", pool="cls", out_dim=1000), (images(224),)),
    ("ViT-H/14 + head", 632.0, dict(name="vit", variant="H/14", pool="cls", out_dim=1000), (images(224),)),
    # Scaling ViT (Zhai et al.) Table 2: encoders without head.
    ("ViT-g/14 encoder", 1011.0, dict(name="vit", variant="g/14", pool="cls"), (images(224),)),
    ("ViT-G/14 encoder", 1843.0, dict(name="vit", variant="G/14", pool="cls"), (images(224),)),
    # SigLIP So400m/14 image tower (encoder + MAP head) at 384px, as released: 428M.
    ("SigLIP So400m/14 image tower", 428.0, dict(name="vit", variant="So400m/14", pool="map"), (images(384),)),
    # CLIP ViT-B/16 (Radford et al.): text tower 63M (embeddings, 12 layers, final LN, projection).
    ("CLIP ViT-B/16 text tower", 63.0,
     dict(name="text", vocab_size=49408, variant="M", max_len=77, out_dim=512), (tokens(77),)),
    # Whole CLIP ViT-B/16 (both towers, projections, temperature): 149.6M as released.
    ("CLIP ViT-B/16", 149.6,
     dict(name="two_tower", image=dict(variant="B/16", pool="cls", pre_norm=True, out_bias=False),
          text=dict(vocab_size=49408, variant="M", max_len=77), embed_dim=512),
     (images(224), tokens(77))),
    # SigLIP B/16 text tower (bidirectional, last-token pooling, 32k vocab, 64 tokens): 110M.
    ("SigLIP B/16 text tower", 110.0,
     dict(name="text", vocab_size=32000, variant="B", max_len=64, causal=False, pool="last",
          out_dim=768, out_bias=True), (tokens(64),)),
]


@pytest.mark.parametrize("what,published,cfg,inputs", CASES, ids=[c[0] for c in CASES])
def test_param_count_matches_published(what, published, cfg, inputs):
  count = count_params(cfg, *inputs) / 1e6
  assert abs(count - published) / published < 0.01, f"{what}: {count:.2f}M vs published {published}M"


def test_vit_output_shapes():
  model = build_model(dict(name="vit", variant="mu/8", pool="map", out_dim=10))
  x = jnp.zeros((3, 32, 32, 3))
  (out, aux), _ = model.init_with_output(jax.random.key(0), x)
  assert out.shape == (3, 10)
  assert aux["tokens"].shape == (3, 16, 64)
  assert aux["pre_logits"].shape == (3, 64)


def test_unknown_variant_and_key_are_named():
  with pytest.raises(ValueError, match="Unknown ViT variant 'Q/16'"):
    count_params(dict(name="vit", variant="Q/16"), images(32))
  config = tiny_config()
  config.model.image.patchsize = 8
  with pytest.raises(ValueError, match=r"config\.model\.image\.patchsize for ViT"):
    model_config(get_family("two_tower"), config, shapes_tokenizer())


def test_missing_size_fields_are_named():
  """One merge (vljax.models.sizes.resolve_sizes) for every family: explicit fields override
  the variant, and a field neither gives is named with both ways to give it."""
  assert ViT(variant="B/16", depth=2).sizes() == dict(width=768, depth=2, mlp_dim=3072,
                                                      num_heads=12, patch_size=16)
  with pytest.raises(ValueError, match=r"ViT needs 'patch_size': give variant= or patch_size="):
    ViT(variant="B").sizes()
  with pytest.raises(ValueError, match=r"TextTransformer needs 'width': give variant= or width="):
    TextTransformer(vocab_size=10).sizes()
  assert TextTransformer(vocab_size=10, variant="mu", width=32).sizes()["width"] == 32
  assert CoCa(variant="mu", vocab_size=7).sizes()["image"] == "mu/8"  # extra table keys stay
  with pytest.raises(ValueError, match=r"CoCa needs 'num_caption_queries'"):
    CoCa(vocab_size=7, width=8, num_heads=2, mlp_dim=8, unimodal_depth=1,
         multimodal_depth=1).sizes()
