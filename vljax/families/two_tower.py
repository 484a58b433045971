"""The two-tower family (CLIP, ALIGN, LiT, SigLIP): a contrastive loss on image and text
embeddings; predicts embeddings."""
from __future__ import annotations

from vljax.families.base import Family
from vljax.models.text import TextTransformer
from vljax.models.two_tower import TwoTower
from vljax.models.vit import ViT


def _model_fields(config, tokenizer) -> dict:
  return {"contrastive": config.loss.contrastive, "text.vocab_size": tokenizer.vocab_size,
          "text.max_len": config.data.max_text_len, "text.pad_id": tokenizer.pad_id}


def _loss_terms(bound, params, batch, rng):
  outputs = bound.apply(params, batch["image"], batch["text"], train=True, rng=rng)
  return bound.contrastive_terms(outputs)


def _combine(bound, terms):
  return bound.contrastive_loss({**terms.examples, **terms.shared})


def _embed_images(bound, params, inputs):
  return bound.apply(params, inputs["image"], None)["zimg"]


def _embed_texts(bound, params, inputs):
  return bound.apply(params, None, inputs["text"])["ztxt"]


FAMILY = Family(
    name="two_tower", module=TwoTower, model_fields=_model_fields,
    model_inputs=lambda batch: (batch["image"], batch["text"]), loss_terms=_loss_terms, combine=_combine,
    predict={"embed_images": _embed_images, "embed_texts": _embed_texts},
    views=("caption",), submodules={"image": ViT, "text": TextTransformer})
