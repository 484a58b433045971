"""Captioning (next-token) loss shared by the generative families: CoCa, BLIP, PaLI, ...

Text is right-padded [BOS w_1 .. w_n EOS pad ..]; the model reads every token but the last and
predicts every token but the first, and padding targets carry no loss.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def shift_for_captioning(text_bt: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(inputs_bt, targets_bt, mask_bt) = (text[:, :-1], text[:, 1:], text[:, 1:] != pad_id)."""
  targets_bt = text_bt[:, 1:]
  return text_bt[:, :-1], targets_bt, targets_bt != pad_id


def captioning_loss(logits_btv: jax.Array, targets_bt: jax.Array,
                    mask_bt: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Token cross-entropy averaged over the tokens where `mask_bt` is True; returns (loss, metrics).

  The log-normaliser is computed in float32 whatever the logits dtype, as
  logsumexp(logits) - logits[target], so no float32 copy of the log-probabilities is kept.
  metrics: cap_loss, cap_accuracy (argmax == target over the counted tokens), cap_tokens.
  """
  logits_btv = logits_btv.astype(jnp.float32)
  target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  nll_bt = jax.nn.logsumexp(logits_btv, axis=-1) - target_logit_bt
  weight_bt = mask_bt.astype(jnp.float32)
  num_tokens = jnp.sum(weight_bt)
  denominator = jnp.maximum(num_tokens, 1.0)
  loss = jnp.sum(nll_bt * weight_bt) / denominator
  correct_bt = (jnp.argmax(logits_btv, axis=-1) == targets_bt).astype(jnp.float32)
  metrics = {
      "cap_loss": loss,
      "cap_accuracy": jax.lax.stop_gradient(jnp.sum(correct_bt * weight_bt) / denominator),
      "cap_tokens": num_tokens,
  }
  return loss, metrics
