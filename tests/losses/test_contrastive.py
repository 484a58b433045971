"""Contrastive losses: naive, chunked and ring against a float64 NumPy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vljax.losses import contrastive

KINDS = ("softmax", "sigmoid")
RTOL = 1e-5  # float32 against float64, relative error in the 2-norm of each output


def _embeddings(batch, width, seed=0, dtype=np.float32):
  """L2-normalised pairs whose positives are correlated, so accuracy is not trivial."""
  rng = np.random.default_rng(seed)
  img = rng.standard_normal((batch, width))
  txt = img + 1.5 * rng.standard_normal((batch, width))
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  return jnp.asarray(img, dtype), jnp.asarray(txt, dtype)


def _numpy_reference(kind, img, txt, scale, bias):
  """Loss and gradients (img, txt, scale, bias) in float64 from the closed-form derivative.

  Written to stay exact when the positives dominate: 1 - p_ii is the off-diagonal mass,
  -log p_ii = log1p(exp(a_i)) with a_i = logsumexp_{j != i}(l_ij) - l_ii, and the sigmoid's
  diagonal uses sigmoid(-l_ii), never 1 - sigmoid(l_ii).
  """
  x, y = np.asarray(img, np.float64), np.asarray(txt, np.float64)
  s, b = float(scale), float(bias)
  batch = x.shape[0]
  dots = x @ y.T
  logits = s * dots + b
  eye = np.eye(batch, dtype=bool)
  diag = np.diag(logits)
  if kind == "softmax":
    off_logits = np.where(eye, -np.inf, logits)
    a_row = np.logaddexp.reduce(off_logits, axis=1) - diag
    a_col = np.logaddexp.reduce(off_logits, axis=0) - diag
    loss = 0.5 * (np.mean(np.logaddexp(0, a_row)) + np.mean(np.logaddexp(0, a_col)))
    row_lse, col_lse = diag + np.logaddexp(0, a_row), diag + np.logaddexp(0, a_col)
    probs = 0.5 * (np.exp(logits - row_lse[:, None]) + np.exp(logits - col_lse[None]))
    # p_ii - 1 = -sigmoid(a_i), the off-diagonal mass.
    diag_grad = -0.5 * (1 / (1 + np.exp(-a_row)) + 1 / (1 + np.exp(-a_col)))
  else:
    sign = np.where(eye, 1.0, -1.0)
    loss = np.sum(np.logaddexp(0, -sign * logits)) / batch
    probs = 1 / (1 + np.exp(-logits))
    diag_grad = -1 / (1 + np.exp(diag))  # sigmoid(l_ii) - 1 = -sigmoid(-l_ii)
  grad_logits = np.where(eye, np.diag(diag_grad), probs) / batch
  grads = (s * grad_logits @ y, s * grad_logits.T @ x, np.sum(grad_logits * dots),
           np.sum(grad_logits))
  return loss, grads


def _numpy_metrics(img, txt, scale, bias):
  logits = float(scale) * np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T + bias
  batch, diag = logits.shape[0], np.diag(logits)
  return {"pos_logit": diag.mean(),
          "neg_logit": (logits.sum() - diag.sum()) / max(batch * batch - batch, 1),
          "accuracy": np.mean(logits.argmax(1) == np.arange(batch)),
          "accuracy_t2i": np.mean(logits.argmax(0) == np.arange(batch))}


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def _loss_and_grads(kind, img, txt, scale, bias, **kwargs):
  """jit(value_and_grad) of the chosen loss wrt img, txt, scale and bias."""
  def f(img, txt, scale, bias):
    if kind == "softmax":
      return contrastive.softmax_loss(img, txt, scale, **kwargs)
    return contrastive.sigmoid_loss(img, txt, scale, bias, **kwargs)
  grad_fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))
  (loss, metrics), grads = grad_fn(img, txt, jnp.float32(scale), jnp.float32(bias))
  return loss, metrics, grads


def _assert_matches_reference(kind, img, txt, scale, bias, rtol=RTOL, **kwargs):
  loss, metrics, grads = _loss_and_grads(kind, img, txt, scale, bias, **kwargs)
  want_loss, want_grads = _numpy_reference(kind, img, txt, scale, bias)
  assert _rel_err(loss, want_loss) < rtol, (loss, want_loss)
  names = ("img", "txt", "scale", "bias") if kind == "sigmoid" else ("img", "txt", "scale")
  for name, got, want in zip(names, grads, want_grads):
    assert _rel_err(got, want) < rtol, (name, _rel_err(got, want))
  want_metrics = _numpy_metrics(img, txt, scale, bias)
  assert set(metrics) == set(want_metrics)
  for name, want in want_metrics.items():
    np.testing.assert_allclose(metrics[name], want, rtol=1e-5, atol=1e-4, err_msg=name)
  return loss, metrics, grads


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_naive_matches_numpy(kind, batch):
  img, txt = _embeddings(batch, 16, seed=batch)
  _, metrics, _ = _assert_matches_reference(kind, img, txt, 10.0,
                                            -10.0 if kind == "sigmoid" else 0.0)
  if batch >= 64:  # the data is neither trivial nor hopeless, so accuracy checks can fail
    assert 0.05 < metrics["accuracy"] < 1.0 and 0.05 < metrics["accuracy_t2i"] < 1.0
    assert metrics["pos_logit"] > metrics["neg_logit"]


# (batch, chunk, sigmoid bias): chunks that divide the batch and chunks that do not, with
# and without a bias.
CHUNKED_CASES = [(1, 4, -10.0), (7, 3, 0.0), (64, 16, -10.0), (1000, 250, 0.0),
                 (1000, 256, -10.0)]
RING_CASES = [(1, None, -10.0), (7, 2, 0.0), (64, 5, -10.0), (1000, 64, -10.0)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch,chunk,bias", CHUNKED_CASES)
def test_chunked_matches_numpy(kind, batch, chunk, bias):
  img, txt = _embeddings(batch, 16, seed=batch)
  _assert_matches_reference(kind, img, txt, 10.0, bias if kind == "sigmoid" else 0.0,
                            impl="chunked", chunk_size=chunk)


def _mesh(shape, names):
  return Mesh(np.array(jax.devices()[:np.prod(shape)]).reshape(shape), names)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch,chunk,bias", RING_CASES)
def test_ring_matches_numpy(kind, batch, chunk, bias):
  """8 devices; B = 1 and 7 leave devices with padding only, 1000 splits evenly into 125
  rows per device, which chunks of 64 do not divide."""
  img, txt = _embeddings(batch, 16, seed=batch)
  _assert_matches_reference(kind, img, txt, 10.0, bias if kind == "sigmoid" else 0.0,
                            impl="ring", chunk_size=chunk, mesh=_mesh((8,), ("data",)),
                            axis="data")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis,batch", [("data", 64), (("data", "fsdp"), 60)])
def test_ring_on_2d_mesh(kind, axis, batch):
  """Batch over "data" only (replicated over fsdp, inputs sharded so), or over ("data",
  "fsdp") jointly with 60 rows, which cannot be split evenly and is padded internally."""
  mesh = _mesh((4, 2), ("data", "fsdp"))
  img, txt = _embeddings(batch, 32, seed=3)
  sharding = NamedSharding(mesh, P(axis, None))
  if batch % 8 == 0:
    img, txt = jax.device_put(img, sharding), jax.device_put(txt, sharding)
  _, _, grads = _assert_matches_reference(kind, img, txt, 10.0, -5.0 if kind == "sigmoid" else 0.0,
                                          impl="ring", chunk_size=4, mesh=mesh, axis=axis)
  if batch % 8 == 0:
    assert grads[0].sharding.is_equivalent_to(sharding, 2)


@pytest.mark.parametrize("impl,kwargs", [
    ("chunked", {"chunk_size": 48}),
    ("ring", {"chunk_size": 16, "axis": "data"}),
])
@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_inputs(kind, impl, kwargs):
  """bf16 embeddings: logits are exact in float32, so the loss and the scale / bias
  gradients keep float32 accuracy (1e-5); embedding gradients are rounded to bf16 and
  their matmuls take bf16 operands, so they agree to 1e-2 (2-norm relative)."""
  if impl == "ring":
    kwargs = dict(kwargs, mesh=_mesh((8,), ("data",)))
  img, txt = _embeddings(200, 32, seed=7, dtype=jnp.bfloat16)
  bias = -10.0 if kind == "sigmoid" else 0.0
  loss, _, grads = _loss_and_grads(kind, img, txt, 10.0, bias, impl=impl, **kwargs)
  want_loss, want_grads = _numpy_reference(kind, img, txt, 10.0, bias)
  assert loss.dtype == jnp.float32 and grads[0].dtype == grads[1].dtype == jnp.bfloat16
  assert _rel_err(loss, want_loss) < 1e-5
  assert _rel_err(grads[0], want_grads[0]) < 1e-2
  assert _rel_err(grads[1], want_grads[1]) < 1e-2
  assert _rel_err(grads[2], want_grads[2]) < 1e-4
  if kind == "sigmoid":
    assert _rel_err(grads[3], want_grads[3]) < 1e-5


def _temp_bytes(kind, batch, width, **kwargs):
  """Compiled temporary memory of loss-and-gradient, from abstract inputs (nothing runs)."""
  def f(img, txt, scale, bias):
    if kind == "softmax":
      return contrastive.softmax_loss(img, txt, scale, **kwargs)[0]
    return contrastive.sigmoid_loss(img, txt, scale, bias, **kwargs)[0]
  emb = jax.ShapeDtypeStruct((batch, width), jnp.float32)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3))).lower(emb, emb, scalar, scalar).compile()
  return compiled.memory_analysis().temp_size_in_bytes, compiled.as_text()


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_memory_has_no_b_squared(kind):
  """At B = 32768 the logits alone would take 4 GiB; the tiles need O(B + chunk^2)."""
  temp, _ = _temp_bytes(kind, 32768, 32, impl="chunked", chunk_size=256)
  assert temp < 8 * 2**20


@pytest.mark.parametrize("kind", KINDS)
def test_ring_memory_has_no_b_squared_and_gathers_nothing(kind):
  """Per device O(B / 8 * D + chunk^2): the [B, B / 8] logits would be 512 MiB."""
  mesh = _mesh((8,), ("data",))
  temp, hlo = _temp_bytes(kind, 32768, 32, impl="ring", chunk_size=256, mesh=mesh, axis="data")
  assert temp < 8 * 2**20
  assert "all-gather" not in hlo and "collective-permute" in hlo


def test_input_validation():
  img, txt = _embeddings(8, 16)
  with pytest.raises(ValueError, match="batch sizes differ"):
    contrastive.softmax_loss(img, txt[:7], 1.0)
  with pytest.raises(ValueError, match="widths differ"):
    contrastive.sigmoid_loss(img, txt[:, :8], 1.0, 0.0)
  with pytest.raises(ValueError, match="2-D"):
    contrastive.softmax_loss(img[None], txt[None], 1.0)
  with pytest.raises(ValueError, match="impl must be one of"):
    contrastive.softmax_loss(img, txt, 1.0, impl="flash")
  with pytest.raises(ValueError, match="needs mesh"):
    contrastive.softmax_loss(img, txt, 1.0, impl="ring", axis="data")
  with pytest.raises(ValueError, match="needs axis"):
    contrastive.softmax_loss(img, txt, 1.0, impl="ring", mesh=_mesh((8,), ("data",)))
  with pytest.raises(ValueError, match="not in mesh axes"):
    contrastive.softmax_loss(img, txt, 1.0, impl="ring", mesh=_mesh((8,), ("data",)),
                             axis=("data", "model"))
  with pytest.raises(ValueError, match="scale must be a scalar"):
    contrastive.softmax_loss(img, txt, jnp.ones(2))
  with pytest.raises(ValueError, match="chunk_size"):
    contrastive.sigmoid_loss(img, txt, 1.0, 0.0, impl="chunked", chunk_size=0)


@pytest.mark.parametrize("impl,kwargs", [("chunked", {"chunk_size": 48})])
def test_softmax_stays_exact_when_positives_dominate(impl, kwargs):
  """Scale 100 and near-duplicate pairs: every p_ii rounds to 1 in float32 and the loss is
  ~1e-20. The textbook p_ii - 1 (naive autodiff) loses the whole diagonal gradient here; the
  tiled versions keep 1 - p_ii as the off-diagonal mass and stay exact up to the rounding
  of the float32 logits amplified by the scale (~1e-5)."""
  if impl == "ring":
    kwargs = dict(kwargs, mesh=_mesh((8,), ("data",)))
  rng = np.random.default_rng(0)
  img = rng.standard_normal((256, 64))
  txt = img + 0.3 * rng.standard_normal((256, 64))
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  img, txt = jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32)
  loss, _, grads = _loss_and_grads("softmax", img, txt, 100.0, 0.0, impl=impl, **kwargs)
  want_loss, want_grads = _numpy_reference("softmax", img, txt, 100.0, 0.0)
  assert 0 < want_loss < 1e-15
  assert _rel_err(loss, want_loss) < 3e-5
  for got, want in zip(grads[:3], want_grads[:3]):
    assert _rel_err(got, want) < 3e-5
