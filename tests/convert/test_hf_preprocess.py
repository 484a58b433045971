"""ImageProcessor gives the pixels of transformers' CLIP / SigLIP image processors (their PIL
backend, `backend="pil"`, the released processors' behaviour) on scikit-image's photographs:
square, landscape, portrait, small (upscaled), grayscale and RGBA."""
from __future__ import annotations

import io
import json

import numpy as np
import PIL.Image
import pytest

from vljax.convert.hf_image import ImageProcessor, load_image

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
CONFIGS = {
    # openai/clip-vit-base-patch32's preprocessor_config.json.
    "clip": {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
             "size": {"shortest_edge": 224}, "resample": 3, "do_center_crop": True,
             "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
             "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN,
             "image_std": CLIP_STD, "do_convert_rgb": True},
    # An old-style config: ints for sizes, bilinear, an odd crop larger than the resize
    # (zero padding).
    "clip_legacy": {"feature_extractor_type": "CLIPFeatureExtractor", "size": 97,
                    "crop_size": 111, "resample": 2, "image_mean": CLIP_MEAN,
                    "image_std": CLIP_STD},
    # google/siglip-base-patch16-224's.
    "siglip": {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
               "size": {"height": 224, "width": 224}, "resample": 3, "do_rescale": True,
               "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
               "image_std": [0.5, 0.5, 0.5], "processor_class": "SiglipProcessor"},
    "siglip_384_bilinear": {"image_processor_type": "SiglipImageProcessor",
                            "size": {"height": 384, "width": 301}, "resample": 2},
}


def _images() -> dict[str, PIL.Image.Image]:
  chelsea = skimage_data.chelsea()  # 300 x 451 landscape
  return {
      "square": PIL.Image.fromarray(skimage_data.astronaut()),
      "landscape": PIL.Image.fromarray(chelsea),
      "portrait": PIL.Image.fromarray(np.ascontiguousarray(skimage_data.rocket().transpose(
          1, 0, 2))),
      "small": PIL.Image.fromarray(chelsea).resize((61, 40), PIL.Image.Resampling.BOX),
      "grayscale": PIL.Image.fromarray(skimage_data.camera()),
      "rgba": PIL.Image.fromarray(skimage_data.logo()),
  }


@pytest.fixture(scope="module")
def images():
  return _images()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pixels_match_transformers(tmp_path, images, name):
  with open(tmp_path / "preprocessor_config.json", "w") as f:
    json.dump(CONFIGS[name], f)
  # The PIL processor (transformers picks its torchvision one when torchvision is installed).
  reference = transformers.AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil")
  assert reference.backend == "pil"
  processor = ImageProcessor.from_pretrained(tmp_path)
  for image_name, image in images.items():
    expected = reference(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = processor(image)[0]
    assert got.dtype == np.float32 and got.shape == expected.shape, (image_name, got.shape)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=image_name)
  if processor.output_size is not None:
    batch = processor(list(images.values()))
    assert batch.shape == (len(images), *processor.output_size, 3)


def test_inputs_as_arrays_paths_and_bytes(tmp_path, images):
  processor = ImageProcessor(CONFIGS["clip"])
  for name in ("landscape", "grayscale", "rgba"):
    expected = processor(images[name])
    np.testing.assert_array_equal(processor(np.asarray(images[name])), expected)
    buffer = io.BytesIO()
    images[name].save(buffer, format="PNG")
    np.testing.assert_array_equal(processor(buffer.getvalue()), expected)
    (tmp_path / f"{name}.png").write_bytes(buffer.getvalue())
    np.testing.assert_array_equal(processor(str(tmp_path / f"{name}.png")), expected)


def test_shortest_edge_rounding_and_crop():
  # transformers truncates the long edge (int(224 * 451 / 300) = 336) and crops at
  # (336 - 224) // 2; an odd remainder puts the extra column on the right.
  processor = ImageProcessor({**CONFIGS["clip"], "do_center_crop": False,
                              "do_normalize": False, "do_rescale": False})
  assert processor(np.zeros((300, 451, 3), np.uint8)).shape == (1, 224, 336, 3)
  assert processor(np.zeros((451, 300), np.uint8)).shape == (1, 336, 224, 3)
  with pytest.raises(ValueError, match="several sizes"):
    processor([np.zeros((300, 451, 3), np.uint8), np.zeros((300, 300, 3), np.uint8)])


def test_refusals(tmp_path):
  processor = ImageProcessor(CONFIGS["siglip"])
  with pytest.raises(ValueError, match="Cannot read an image"):
    processor(b"\x89PNG\r\n\x1a\n not really a png")
  (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
  with pytest.raises(ValueError, match="Cannot read an image from .*corrupt.jpg"):
    processor(str(tmp_path / "corrupt.jpg"))
  with pytest.raises(FileNotFoundError):
    processor(str(tmp_path / "absent.png"))
  with pytest.raises(TypeError, match="uint8"):
    processor(np.zeros((8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="channels last"):
    load_image(np.zeros((3, 8, 8, 2), np.uint8))
  with pytest.raises(ValueError, match=r"Unsupported image processor config keys \['do_pan'\]"):
    ImageProcessor({**CONFIGS["clip"], "do_pan": True})
  with pytest.raises(ValueError, match="Unsupported image processor 'ViTImageProcessor'"):
    ImageProcessor({"image_processor_type": "ViTImageProcessor"})
  with pytest.raises(ValueError, match="resample"):
    ImageProcessor({**CONFIGS["clip"], "resample": 9})
  with pytest.raises(ValueError, match="size must"):
    ImageProcessor({**CONFIGS["siglip"], "size": {"height": 224}})
  with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
    ImageProcessor.from_pretrained(tmp_path)
  (tmp_path / "preprocessor_config.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    ImageProcessor.from_pretrained(tmp_path)
