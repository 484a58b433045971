"""The language-model families: "lm", a decoder-only LM (`vljax.models.lm.LM`: LLaMA / Vicuna,
OPT, GPT-2), and "t5", an encoder-decoder (`vljax.models.t5.T5`: T5 v1.1 / Flan-T5).

"lm" is trained with the next-token cross-entropy over the tokens the view's loss mask scores,
attending as the view's mask_ar says (all 1: causal; a 0-prefix: prefix-LM). "t5" is trained
with T5's prefix-LM objective, as BLIP-2 pretrains its FlanT5: the view's prefix (its leading
mask_ar 0 tokens) goes to the encoder, the rest to the decoder, which predicts it after the
decoder start token (T5's pad id) with the cross-entropy over the scored tokens. Both honour
config.loss.ce_chunk_len (the vocabulary projection fused with the cross-entropy, that many
positions at a time) and predict generated text and token likelihoods; the loss terms are sums,
so microbatches add up to the whole batch's loss.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vljax.errors import ConfigError
from vljax.families.base import Family, LossTerms
from vljax.losses.captioning import (captioning_from_sums, captioning_sums, next_token_targets,
                                     token_nll)
from vljax.losses.chunked_ce import chunked_token_nll
from vljax.models import lm, t5
from vljax.nn.masks import attention_mask


def _score(bound, params, outputs, targets_bt) -> tuple[jax.Array, jax.Array]:
  """(nll_bt, correct_bt) of the targets: from the logits, or with config.loss.ce_chunk_len from
  the hidden states and the output kernel, by chunks (the logits are then unused and compiled
  away)."""
  chunk = bound.config.loss.ce_chunk_len
  if not chunk:
    logits_btv = outputs["logits"]
    return token_nll(logits_btv, targets_bt), jnp.argmax(logits_btv, axis=-1) == targets_bt
  c, hidden_btd = bound.model.config(), outputs["hidden"]
  tied = c["tied_head"]
  if tied and isinstance(bound.model, t5.T5):  # T5's tied head rescales (see T5.logits)
    hidden_btd = hidden_btd * c["width"] ** -0.5
  kernel = (params["token_embedding"]["embedding"] if tied
            else params["head"]["dense"]["kernel"])
  return chunked_token_nll(hidden_btd, kernel, targets_bt, chunk_size=chunk,
                           dtype=bound.model.dtype, transpose_kernel=tied)


def _combine(bound, terms):
  loss, metrics = captioning_from_sums(terms.sums)
  return loss, {**metrics, "loss": loss}


def _per_example(nll_bt, correct_bt, weights_bt) -> dict[str, jax.Array]:
  """The token_nll predict function's output: per-example sums over the scored tokens."""
  weights_bt = weights_bt.astype(jnp.float32)
  return {"nll": jnp.sum(nll_bt * weights_bt, axis=1), "tokens": jnp.sum(weights_bt, axis=1),
          "correct": jnp.sum(correct_bt.astype(jnp.float32) * weights_bt, axis=1)}


def _scorers(forward):
  """(loss_terms, token_nll) of a family whose `forward(bound, params, batch, **kw)` gives
  (outputs, targets_bt, weights_bt)."""
  def loss_terms(bound, params, batch, rng):
    outputs, targets_bt, weights_bt = forward(bound, params, batch, train=True, rng=rng)
    nll_bt, correct_bt = _score(bound, params, outputs, targets_bt)
    return LossTerms(examples={}, shared={},
                     sums=captioning_sums(nll_bt, correct_bt, weights_bt))

  def token_nll(bound, params, inputs):
    outputs, targets_bt, weights_bt = forward(bound, params, inputs)
    return _per_example(*_score(bound, params, outputs, targets_bt), weights_bt)

  return loss_terms, token_nll


# ---------------------------------------------------------------------------------------------
# Decoder-only LM.


def _lm_fields(config, tokenizer) -> dict:
  return {"vocab_size": tokenizer.vocab_size, "max_len": config.data.max_text_len}


def _lm_forward(bound, params, batch, **kw):
  """(outputs, targets_bt, weights_bt) of a batch: the LM reads text[:, :-1] under the view's
  attention mask and predicts text[:, 1:]."""
  inputs_bt, targets_bt, weights_bt = next_token_targets(batch["text"], batch["mask_loss"])
  mask = attention_mask(batch["mask_ar"][:, :-1])
  return bound.apply(params, inputs_bt, mask=mask, **kw), targets_bt, weights_bt


_lm_loss_terms, _lm_token_nll = _scorers(_lm_forward)


def _lm_generate(bound, params, inputs, *, max_new_tokens: int):
  tok = bound.tokenizer
  return lm.generate(bound.model, params, inputs["text"], max_new_tokens=max_new_tokens,
                     eos_id=tok.eos_id, pad_id=tok.pad_id, prompt_len_b=inputs["prompt_len"])


LM_FAMILY = Family(
    name="lm", module=lm.LM, model_fields=_lm_fields,
    model_inputs=lambda batch: (batch["text"][:, :-1],),
    loss_terms=_lm_loss_terms, combine=_combine,
    predict={"generate": _lm_generate, "token_nll": _lm_token_nll}, views=("text",))


# ---------------------------------------------------------------------------------------------
# Encoder-decoder T5 (prefix-LM).


def _t5_fields(config, tokenizer) -> dict:
  settings = dict(config.data.get("view_settings") or {})
  if config.data.get("view") == "text" and not settings.get("prefix_words"):
    raise ConfigError("family 't5' trains on a prefix and its continuation: set "
                      "config.data.view_settings.prefix_words (-1: a random split per caption, "
                      "as BLIP-2's prefix-LM; k > 0: the first k words)")
  return {"vocab_size": tokenizer.vocab_size}


def prefix_split(text_bl: jax.Array, mask_ar_bl: jax.Array, mask_loss_bl: jax.Array,
                 start_id: int) -> dict[str, jax.Array]:
  """A view's text -> T5's inputs: the encoder reads the prefix (the leading mask_ar 0 tokens;
  `encoder_mask` marks them), the decoder reads [start_id, y_1 .. y_{T-1}] and predicts
  y_1 .. y_T, the text after the prefix moved to the front (T = L - 1), weighted by its
  mask_loss (0 past the end of the text)."""
  length = text_bl.shape[1]
  prefix_b = jnp.sum(jnp.cumprod((mask_ar_bl == 0).astype(jnp.int32), axis=1), axis=1)
  encoder_mask_bl = jnp.arange(length)[None, :] < prefix_b[:, None]
  index_bt = prefix_b[:, None] + jnp.arange(length - 1)[None, :]
  inside_bt = index_bt < length
  index_bt = jnp.minimum(index_bt, length - 1)
  targets_bt = jnp.take_along_axis(text_bl, index_bt, axis=1)
  weights_bt = jnp.take_along_axis(mask_loss_bl, index_bt, axis=1).astype(bool) & inside_bt
  start_b1 = jnp.full((text_bl.shape[0], 1), start_id, text_bl.dtype)
  decoder_bt = jnp.concatenate([start_b1, targets_bt[:, :-1]], axis=1)
  return {"encoder": text_bl, "encoder_mask": encoder_mask_bl, "decoder": decoder_bt,
          "targets": targets_bt, "weights": weights_bt}


def _t5_forward(bound, params, batch, **kw):
  split = prefix_split(batch["text"], batch["mask_ar"], batch["mask_loss"],
                       bound.tokenizer.pad_id)
  outputs = bound.apply(params, split["encoder"], split["decoder"],
                        encoder_mask_bs=split["encoder_mask"], **kw)
  return outputs, split["targets"], split["weights"]


_t5_loss_terms, _t5_token_nll = _scorers(_t5_forward)


def _t5_generate(bound, params, inputs, *, max_new_tokens: int):
  """The decoder's continuation of each prompt, which the encoder reads (its first prompt_len
  tokens)."""
  tok, text_bl = bound.tokenizer, inputs["text"]
  mask_bl = jnp.arange(text_bl.shape[1])[None, :] < inputs["prompt_len"][:, None]
  return t5.generate(bound.model, params, text_bl, mask_bs=mask_bl,
                     max_new_tokens=max_new_tokens, decoder_start_id=tok.pad_id,
                     eos_id=tok.eos_id, pad_id=tok.pad_id)


T5_FAMILY = Family(
    name="t5", module=t5.T5, model_fields=_t5_fields,
    model_inputs=lambda batch: (batch["text"], batch["text"][:, :-1]),
    loss_terms=_t5_loss_terms, combine=_combine,
    predict={"generate": _t5_generate, "token_nll": _t5_token_nll}, views=("text",))
