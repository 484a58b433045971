"""vljax.convert.posemb: position tables resampled as the originals do it, checked against the
originals' own calls: torch's F.interpolate (bicubic with and without antialiasing, as
transformers and open_clip; bilinear with antialiasing, as transformers' SigLIP 2) and
scipy.ndimage.zoom(order=1) (big_vision), growing and shrinking, non-square and odd grids."""
import numpy as np
import pytest
import scipy.ndimage

torch = pytest.importorskip("torch")

from vljax.convert import posemb  # noqa: E402

GRIDS = [((7, 7), (12, 12)), ((12, 12), (5, 5)), ((7, 5), (9, 13)), ((16, 16), (9, 9)),
         ((3, 3), (1, 1)), ((5, 9), (7, 4))]


@pytest.mark.parametrize("old,new", GRIDS)
@pytest.mark.parametrize("method,mode,antialias", [
    ("bicubic", "bicubic", False), ("bicubic_antialias", "bicubic", True),
    ("bilinear_antialias", "bilinear", True)])
def test_equals_torch_interpolate(old, new, method, mode, antialias):
  grid = np.random.default_rng(0).normal(size=(*old, 6)).astype(np.float32)
  want = torch.nn.functional.interpolate(
      torch.from_numpy(grid).permute(2, 0, 1)[None], size=new, mode=mode,
      align_corners=False, antialias=antialias)[0].permute(1, 2, 0).numpy()
  got = posemb.resample_grid(grid, new, method=method)
  assert got.shape == (*new, 6) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("old,new", [(7, 12), (12, 5), (16, 9), (4, 4)])
def test_bilinear_corners_equals_scipy_zoom(old, new):
  grid = np.random.default_rng(1).normal(size=(old, old, 5))
  want = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  np.testing.assert_allclose(posemb.resample_grid(grid, (new, new), method="bilinear_corners"),
                             want, atol=1e-12)


def test_prefix_rows_are_kept_and_errors_name_the_problem():
  table = np.random.default_rng(2).normal(size=(1 + 16, 3)).astype(np.float32)
  out = posemb.resample(table, (6, 6), method="bicubic", num_prefix=1)
  assert out.shape == (37, 3)
  np.testing.assert_array_equal(out[0], table[0])
  np.testing.assert_allclose(out[1:].reshape(6, 6, 3), posemb.resample_grid(
      table[1:].reshape(4, 4, 3), (6, 6), method="bicubic"))
  with pytest.raises(ValueError, match="not a square grid"):
    posemb.resample(table, (6, 6), method="bicubic")  # 17 rows without the prefix
  with pytest.raises(ValueError, match="Unknown position-embedding resampling 'nearest'"):
    posemb.resample(table, (6, 6), method="nearest", num_prefix=1)
  params = {"img": {"pos_embedding": {"pos_embedding": table[None]}, "other": 1}}
  resized = posemb.resize_image_tower(params, "img", image_size=27, patch_size=4, num_prefix=1,
                                      method="bicubic")
  assert resized["img"]["pos_embedding"]["pos_embedding"].shape == (1, 37, 3)
  assert resized["img"]["other"] == 1 and params["img"]["pos_embedding"]["pos_embedding"].shape \
      == (1, 17, 3)
