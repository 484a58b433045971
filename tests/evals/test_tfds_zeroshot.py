"""Zero-shot evaluation on a TFDS classification dataset prepared in tmp (no network): class
names from the ClassLabel feature, templates, hand-checked top-1 / top-5, skipped records, spec
validation, and the hook in the training evaluation."""
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.tfds_helpers import build_dataset, encode
from tests.train.helpers import tiny_config
from vljax.data.pipeline import data_config
from vljax.data.tokenizer import shapes_tokenizer
from vljax.errors import ConfigError
from vljax.evals.base import Environment, evaluator_settings
from vljax.evals.tfds_zeroshot import DEFAULT_TEMPLATES, TfdsZeroShot
from vljax.train.evaluation import Evaluation
from vljax.train.loop import build_experiment

LABELS = ["red_circle", "green_square", "blue_triangle", "yellow_circle", "purple_square",
          "orange_triangle"]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (128, 0, 128), (255, 128, 0)]
MIXED = (10, 10, 10)
# The fake image embedder's score for each class, by the image's colour: class i's colour scores
# class i alone; MIXED ranks class 0 first and class 5 second.
SCORES = {**{c: np.eye(6)[i] for i, c in enumerate(COLOURS)},
          MIXED: np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.5])}


def _png(colour) -> bytes:
  return encode(np.full((12, 10, 3), colour, np.uint8))


# Six right answers; a red image labelled orange (its label ties for last: missed at 1 and 5);
# the MIXED image labelled orange (ranked second: missed at 1, hit at 5); an undecodable image.
RECORDS = ([{"image": _png(c), "label": i} for i, c in enumerate(COLOURS)]
           + [{"image": _png(COLOURS[0]), "label": 5}, {"image": _png(MIXED), "label": 5},
              {"image": b"not an image at all", "label": 0}])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tfds")
  build_dataset(directory, "vljax_tiny_colours", tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "label": tfds.features.ClassLabel(names=LABELS)}), {"test": RECORDS, "train": RECORDS[:2]})
  build_dataset(directory, "vljax_tiny_wordnet", tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "label": tfds.features.ClassLabel(names=["n01440764", "n01443537"])}),
                {"validation": RECORDS[:2]})
  return str(directory)


def _evaluator(data_dir, key="zeroshot_colours", **spec):
  data = data_config(dict(image_size=8, max_text_len=64, tfds=dict(data_dir=data_dir)))
  settings = evaluator_settings(key, {"type": "tfds_zeroshot", "name": "vljax_tiny_colours",
                                      "batch_size": 3, **spec})
  return TfdsZeroShot(key, settings, Environment(data, shapes_tokenizer()))


def _fake_embedders(evaluator):
  """Images score classes by their colour (SCORES); a prompt embeds as its class's one-hot."""
  prompt_class = {}
  for i, name in enumerate(evaluator.class_names):
    for template in evaluator.templates:
      tokens = tuple(evaluator.tokenize([template.format(name)])[0])
      assert prompt_class.setdefault(tokens, i) == i, "two classes' prompts tokenize the same"

  def embed_images(images):
    assert images.shape[1:] == (8, 8, 3) and images.dtype == np.uint8
    rows = np.array([SCORES[tuple(int(v) for v in image[0, 0])] for image in images])
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)

  def embed_texts(tokens):
    return np.eye(len(evaluator.class_names))[[prompt_class[tuple(row)] for row in tokens]]
  def predict(name, inputs):
    return (embed_images(inputs["image"]) if name == "embed_images"
            else embed_texts(inputs["text"]))
  return predict


def test_hand_checked_top1_top5_and_skipped(data_dir):
  evaluator = _evaluator(data_dir, templates=("a photo of a {}.", "{}"))
  assert evaluator.class_names == [n.replace("_", " ") for n in LABELS]
  assert evaluator.templates == ("a photo of a {}.", "{}")
  metrics = evaluator.run(_fake_embedders(evaluator))
  assert metrics == {"zeroshot_colours/top1": pytest.approx(6 / 8),
                     "zeroshot_colours/top5": pytest.approx(7 / 8),
                     "zeroshot_colours/images": 8.0, "zeroshot_colours/skipped": 1.0}


def test_default_templates_num_images_and_explicit_names(data_dir, tmp_path):
  evaluator = _evaluator(data_dir, key="zeroshot_first3", num_images=3)
  assert evaluator.templates == DEFAULT_TEMPLATES
  metrics = evaluator.run(_fake_embedders(evaluator))
  assert metrics["zeroshot_first3/top1"] == 1.0 and metrics["zeroshot_first3/images"] == 3.0
  names = tmp_path / "names.txt"
  names.write_text("\n".join(["crimson", "lime", "navy", "lemon", "violet", "amber"]) + "\n\n")
  evaluator = _evaluator(data_dir, class_names=str(names), split="train")
  assert evaluator.class_names == ["crimson", "lime", "navy", "lemon", "violet", "amber"]
  assert evaluator.run(_fake_embedders(evaluator))["zeroshot_colours/top1"] == 1.0


def test_unusable_class_names_are_refused(data_dir):
  with pytest.raises(ValueError, match=r"WordNet ids \(n01440764, n01443537, \.\.\.\).*"
                     r"config\.evals\.zeroshot_fish\.class_names"):
    _evaluator(data_dir, key="zeroshot_fish", name="vljax_tiny_wordnet", split="validation")
  fish = _evaluator(data_dir, key="zeroshot_fish", name="vljax_tiny_wordnet", split="validation",
                    class_names=["tench", "goldfish"])
  assert fish.class_names == ["tench", "goldfish"]
  with pytest.raises(ValueError, match=r"class_names has 2 names but .* has 6 classes"):
    _evaluator(data_dir, class_names=["red", "green"])
  with pytest.raises(ValueError, match=r"config\.evals\.zeroshot_colours\.label_key='image' "
                     r"is a Image"):
    _evaluator(data_dir, label_key="image")
  with pytest.raises(FileNotFoundError, match=r"config\.evals\.zeroshot_cifar100 .*"
                     r"tfds build cifar100"):
    _evaluator(data_dir, key="zeroshot_cifar100", name="cifar100")
  with pytest.raises(ConfigError, match=r"config\.evals\.zeroshot_cifar100\.name: give the TFDS"):
    _evaluator(data_dir, key="zeroshot_cifar100", name="")


def test_settings_defaults_and_errors():
  settings = evaluator_settings("zeroshot_cifar100", dict(type="tfds_zeroshot", name="cifar100",
                                                          split="test[:100]"))
  assert settings.split == "test[:100]" and settings.label_key == "label"
  assert settings.every == 0 and settings.batch_size == 200
  with pytest.raises(ConfigError, match=r"config\.evals\.zs\.splt for an evaluator of type "
                                        r"'tfds_zeroshot'"):
    evaluator_settings("zs", dict(type="tfds_zeroshot", splt="test"))
  with pytest.raises(ConfigError, match=r"config\.evals\.zs\.templates: 'a photo' must hold"):
    evaluator_settings("zs", dict(type="tfds_zeroshot", templates=("a photo",)))
  with pytest.raises(ConfigError, match=r"config\.evals\.zs must be a dict with a 'type'"):
    evaluator_settings("zs", "test")
  with pytest.raises(ConfigError, match=r"config\.evals\.zs\.type='tfds'; choose one of .*tfds_zeroshot"):
    evaluator_settings("zs", dict(type="tfds"))


def test_training_evaluation_reports_tfds_zeroshot(data_dir):
  """The hook in vljax.train.evaluation: a tiny model's metrics gain the TFDS entries."""
  config = tiny_config()
  config.data = dict(image_size=16, max_text_len=16, tfds=dict(data_dir=data_dir))
  config.evals = dict(zeroshot=dict(type="zeroshot", images=16, batch_size=8),
                      retrieval=dict(type="retrieval", pairs=16, batch_size=8),
                      zeroshot_colours=dict(type="tfds_zeroshot", name="vljax_tiny_colours",
                                            batch_size=8))
  exp = build_experiment(config, devices=jax.devices()[:1])
  rng = np.random.default_rng(0)  # random parameters without compiling the initialiser
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
                        exp.abstract_state.params)
  metrics = Evaluation(exp, config.evals).run(params)
  assert {"zeroshot/top1", "retrieval/i2t/r@1", "zeroshot_colours/top1",
          "zeroshot_colours/top5"} <= set(metrics)
  assert metrics["zeroshot_colours/images"] == 8.0 and metrics["zeroshot_colours/skipped"] == 1.0
  assert 0.0 <= metrics["zeroshot_colours/top1"] <= metrics["zeroshot_colours/top5"] <= 1.0
