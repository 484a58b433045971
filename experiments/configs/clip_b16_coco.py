"""CLIP ViT-B/16 (clip_b16.py) trained on COCO captions read from TFDS, with zero-shot CIFAR-100
(top-1 / top-5 as zeroshot_cifar100/top1, .../top5) at every evaluation.

Reading needs `pip install 'vljax[tfds]'` (no TensorFlow). Prepare the datasets once, as
array_record (TFDS's coco_captions builder needs TensorFlow to prepare, not to read):

  tfds build coco_captions cifar100 --data_dir=/data/tfds --file_format=array_record
  python experiments/main.py --config=clip_b16_coco.py --workdir=gs://bucket/clip_b16_coco \
      --config.data.tfds.data_dir=/data/tfds --config.data.tokenizer=/data/spm.model

config.data.tokenizer must name a sentencepiece model with clip_b16's 49,408-token vocabulary
(the default, the shapes world tokenizer, knows no COCO words). Each COCO record has about five
captions; record i is paired with caption i % count. Zero-shot class names come from CIFAR-100's
ClassLabel ("aquarium_fish" -> "aquarium fish"); imagenet2012 names its classes by WordNet id, so
an ImageNet entry needs `class_names` (a list or a text file, one name a line), e.g.

  c.evals.zeroshot_imagenet = dict(type="tfds_zeroshot", name="imagenet2012",
                                  split="validation", class_names="/data/imagenet_classnames.txt")
"""
from vljax.train.config import load_config


def get_config():
  c = load_config("clip_b16.py")
  c.data.source = "tfds"
  c.data.tfds = dict(
      name="coco_captions/2014",  # Karpathy splits: train, val, test, restval
      split="train+restval",  # ~113k images, the usual COCO retrieval training set
      data_dir="",  # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
      image_key="image",
      caption_key="captions/text",
  )
  c.evals = dict(
      # Retrieval on the Karpathy test split (one caption per image: record i takes caption
      # i % 5), read from TFDS like the training data (data_dir: config.data.tfds_data_dir).
      retrieval=dict(type="retrieval", pairs=5000,
                     source=dict(kind="tfds", name="coco_captions/2014", split="test")),
      # Class names and templates from the defaults.
      zeroshot_cifar100=dict(type="tfds_zeroshot", name="cifar100", split="test"),
  )
  return c
