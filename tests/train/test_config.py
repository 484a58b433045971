"""Config validation: unknown keys and values out of range fail before anything is built, naming
the key; command-line overrides reach every field; every shipped config loads, validates and
builds its model abstractly."""
import os

import jax
import pytest

from vljax.data.pipeline import data_config
from vljax.errors import ConfigError
from vljax.sharding import make_mesh
from vljax.train.config import (CONFIG_DIR, apply_overrides, base_config, check_mesh, load_config,
                                resolve_config_path, validate)
from vljax.data.tokenizer import shapes_tokenizer
from vljax.families import build_model, get_family
from vljax.train.loop import build_experiment

CONFIGS = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))


def test_unknown_top_level_and_nested_keys_are_named():
  c = base_config()
  c.totl_steps = 5
  with pytest.raises(ValueError, match=r"config\.totl_steps; did you mean config\.total_steps"):
    validate(c)
  c = base_config()
  c.optim.lrr = 0.1
  with pytest.raises(ValueError, match=r"config\.optim\.lrr"):
    validate(c)
  c = base_config()
  c.data = dict(image_sise=32)
  with pytest.raises(ValueError, match=r"config\.data\.image_sise"):
    build_experiment(c)


def test_wrong_type_is_named():
  c = base_config()
  with pytest.raises(TypeError, match="total_steps"):  # ConfigDict keeps each field's type
    c.total_steps = "ten"
  c.total_steps = -1
  with pytest.raises(ValueError, match="config.total_steps must be a non-negative int"):
    validate(c)


def test_bare_names_resolve_to_experiments_configs():
  assert resolve_config_path("clip_tiny.py") == os.path.join(CONFIG_DIR, "clip_tiny.py")
  assert resolve_config_path("clip_tiny") == os.path.join(CONFIG_DIR, "clip_tiny.py")
  with pytest.raises(FileNotFoundError, match="clip_tny.py"):
    resolve_config_path("clip_tny.py")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_validates_and_builds(name):
  config = load_config(name)
  for key in ("total_steps", "log_every", "eval_every", "checkpoint_every", "seed"):
    assert key in config
  data_config(config.data)
  validate(config)  # every config.evals entry against its evaluator type
  config.init = []  # LiT's source checkpoint is not needed to build shapes
  config.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  exp = build_experiment(config, devices=jax.devices()[:1])
  assert jax.tree.leaves(exp.abstract_state.params)


def test_overrides_set_schema_fields_with_literals_or_text():
  c = apply_overrides(base_config(), ["optim.lr=1e-3", "config.total_steps=2_000", "optim.b2=1",
                                      "restart_data_order=true", "optim.freeze=img/.*",
                                      "init.checkpoint='/ckpt dir'", "optim.grad_clip_norm=inf"])
  assert c.optim.lr == 1e-3 and c.total_steps == 2000
  assert c.optim.b2 == 1.0 and isinstance(c.optim.b2, float)  # an int may set a float
  assert c.restart_data_order is True
  assert c.optim.freeze == "img/.*" and c.init.checkpoint == "/ckpt dir"
  assert c.optim.grad_clip_norm == float("inf")
  c = apply_overrides(c, ["data.tokenizer=123", "distributed.mode=auto"])  # text in text fields
  assert c.data.tokenizer == "123" and c.distributed.mode == "auto"


def test_overrides_replace_lists_and_tuples_whole():
  c = apply_overrides(base_config(), [
      "mesh=[('data', 2), ('fsdp', 4), ('tensor', 1)]",
      "sharding_rules=[('batch', 'data'), ('embed', None)]",
      "data.webdataset.caption_keys=['caption']",
      "optim.lr_multipliers=(('t|b', 10.0),)",
      "optim.lr_multipliers=[('t|b', 5.0)]",  # later overrides win
  ])
  assert c.mesh == [("data", 2), ("fsdp", 4), ("tensor", 1)]
  assert [tuple(r) for r in c.sharding_rules] == [("batch", "data"), ("embed", None)]
  assert tuple(c.data.webdataset.caption_keys) == ("caption",)
  assert c.optim.lr_multipliers == (("t|b", 5.0),)
  validate(c)


def test_overrides_add_keys_the_config_leaves_out():
  """clip_tiny sets few data keys, no model.image.variant and no TFDS evaluator: all can be set."""
  c = load_config("clip_tiny.py")
  apply_overrides(c, ["data.source=webdataset", "data.webdataset.shards=/data/{000..009}.tar",
                      "model.image.variant=mu/16", "model.max_scale=None",
                      "evals.zeroshot.batch_size=16",
                      "evals.zeroshot_cifar100={'type': 'tfds_zeroshot', 'name': 'cifar100'}",
                      "evals.zeroshot_cifar100.split=test[:100]"])
  assert data_config(c.data).source == "webdataset"
  assert c.data.webdataset.shards == "/data/{000..009}.tar"
  assert c.model.image.variant == "mu/16" and c.model.max_scale is None
  assert c.evals.zeroshot.batch_size == 16 and c.evals.zeroshot_cifar100.split == "test[:100]"
  apply_overrides(c, ["data.webdataset.shards=['/a/{0..3}.tar', '/b/{0..3}.tar']"])  # a list too
  assert list(c.data.webdataset.shards) == ["/a/{0..3}.tar", "/b/{0..3}.tar"]
  validate(c)
  # Model keys are not known in advance: building the family's model names a wrong one.
  apply_overrides(c, ["model.image.varient=mu/16"])
  with pytest.raises(ValueError, match=r"config\.model\.image\.varient"):
    build_model(get_family(c.family), c, shapes_tokenizer())
  # Nor are evaluator settings: validate names a wrong one against the evaluator's type.
  apply_overrides(c, ["evals.zeroshot.imges=8"])
  with pytest.raises(ConfigError, match=r"config\.evals\.zeroshot\.imges for an evaluator of "
                                        r"type 'zeroshot'; valid keys: .*images"):
    validate(c)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1e-3", r"^Unknown config key config\.optim\.lrr; did you mean config\.optim\.lr\?$"),
    ("totl_steps=5", r"config\.totl_steps; did you mean config\.total_steps\?"),
    ("data.sorce=webdataset", r"config\.data\.sorce; did you mean config\.data\.source\?"),
    ("loss.contrastiv=sigmoid", r"config\.loss\.contrastiv; did you mean config\.loss\.contrastive\?"),
    ("init.checkpiont=x", r"config\.init\.checkpiont; did you mean config\.init\.checkpoint\?"),
    ("optim.lr=fast", r"^config\.optim\.lr=fast is a str, but the field is a float$"),
    ("total_steps=1.5", r"^config\.total_steps=1\.5 is a float, but the field is an int$"),
    ("data.image_size=big", r"config\.data\.image_size=big is a str, but the field is an int"),
    ("data.text_bos=1", r"config\.data\.text_bos=1 is an int, but the field is a bool"),
    ("data.webdataset.caption_keys=txt",
     r"config\.data\.webdataset\.caption_keys=txt is a str, but the field is a tuple"),
    ("data.shards=x", r"^config\.data\.shards is now config\.data\.webdataset\.shards"),
    ("data.tfds_name=coco", r"^config\.data\.tfds_name is now config\.data\.tfds\.name"),
    ("data.tfds.nmae=coco", r"config\.data\.tfds\.nmae; did you mean config\.data\.tfds\.name\?"),
    ("mesh=8", r"config\.mesh=8 is an int, but the field is a list"),
    ("optim=3", r"config\.optim=3 is an int, but the field is a dict"),
    ("data.image_size.x=3", r"config\.data\.image_size is an int, not a dict"),
    ("optim.lr", r"--config\.optim\.lr needs a value"),
    ("optim..lr=1", r"not a config field path"),
])
def test_override_errors_name_the_key(override, message):
  with pytest.raises(ConfigError, match=message):
    apply_overrides(load_config("clip_tiny.py"), [override])


def _changed(**changes):
  c = base_config()
  for key, value in changes.items():
    *path, last = key.split("__")
    target = c
    for part in path:
      target = target[part]
    target[last] = value
  return c


@pytest.mark.parametrize("changes, message", [
    (dict(optim__lr=-1.0), r"^config\.optim\.lr must be > 0, got -1\.0$"),
    (dict(optim__lr=0.0), r"config\.optim\.lr must be > 0"),
    (dict(total_steps=10, optim__warmup_steps=11),
     r"^config\.optim\.warmup_steps=11 is longer than the run \(config\.total_steps=10\); set it "
     r"to at most 10$"),
    (dict(optim__warmup_steps=-1), r"config\.optim\.warmup_steps must be a non-negative int"),
    (dict(optim__schedule="cosin"), r"config\.optim\.schedule must be one of cosine, linear, "
                                    r"constant, got 'cosin'"),
    (dict(optim__name="sgd"), r"config\.optim\.name must be adamw"),
    (dict(optim__end_lr_fraction=1.5), r"config\.optim\.end_lr_fraction must be in \[0, 1\]"),
    (dict(optim__b1=1.0), r"config\.optim\.b1 must be in \[0, 1\)"),
    (dict(optim__b2=-0.1), r"config\.optim\.b2 must be in \[0, 1\)"),
    (dict(optim__eps=0.0), r"config\.optim\.eps must be > 0"),
    (dict(optim__weight_decay=-1e-4), r"config\.optim\.weight_decay must be >= 0"),
    (dict(optim__grad_clip_norm=-1.0), r"config\.optim\.grad_clip_norm must be >= 0"),
    (dict(optim__freeze="img/[a"), r"config\.optim\.freeze='img/\[a' is not a valid regex"),
    (dict(optim__lr_multipliers=(("t|b",),)), r"config\.optim\.lr_multipliers must be a tuple of "
                                              r"\(regex, factor\) pairs"),
    (dict(keep_checkpoints=0), r"config\.keep_checkpoints must be a positive int, got 0"),
    (dict(log_every=0), r"config\.log_every must be a positive int, got 0"),
    (dict(batch_size=0), r"config\.batch_size must be a positive int, got 0"),
    (dict(total_steps=-1), r"config\.total_steps must be a non-negative int"),
    (dict(mesh=[("data", -1), ("fsdp", -1)]), r"config\.mesh may size at most one axis -1"),
    (dict(mesh=[("data", -1), ("dta", 1)]), r"config\.mesh axis 'dta' is not a mesh axis; choose "
                                            r"among data, fsdp, tensor"),
    (dict(mesh=[("data", 2), ("data", 4)]), r"config\.mesh names axis 'data' twice"),
    (dict(mesh=[("data", 0)]), r"config\.mesh size of 'data' must be an int >= 1, or -1"),
    (dict(mesh=[("data",)]), r"config\.mesh must be a list of \(axis name, size\) pairs"),
    (dict(sharding_rules=[("batch", "dat")]), r"config\.sharding_rules maps 'batch' to 'dat'"),
    (dict(loss__impl="rings"), r"config\.loss\.impl must be one of naive, chunked, ring, got 'rings'"),
    (dict(data=dict(max_bad_fraction=1.5)), r"config\.data\.max_bad_fraction must be in \[0, 1\]"),
    (dict(data=dict(source="webdatset")), r"config\.data\.source must be one of shapes, "
                                          r"webdataset, tfds"),
    (dict(data=dict(image_sise=32)), r"config\.data\.image_sise; did you mean config\.data\.image_size"),
    (dict(family="clip"), r"config\.family must be one of coca, llava, lm, t5, two_tower, got 'clip'"),
    (dict(compute_dtype="float16"), r"config\.compute_dtype must be float32 or bfloat16"),
])
def test_each_validation_rule_names_key_and_range(changes, message):
  with pytest.raises(ConfigError, match=message):
    validate(_changed(**changes))


def test_validation_boundaries_pass_and_validate_changes_nothing():
  c = _changed(total_steps=10, optim__warmup_steps=10, optim__end_lr_fraction=1.0, optim__b1=0.0,
               optim__weight_decay=0.0, optim__grad_clip_norm=0.0, keep_checkpoints=1,
               mesh=[["data", 2], ["fsdp", -1]], data=dict(max_bad_fraction=0.0))
  before = c.to_dict()
  assert validate(validate(c)) is c
  assert c.to_dict() == before


def test_check_mesh_names_batch_size_mesh_and_nearest_valid_sizes(monkeypatch):
  devices = jax.devices()
  assert len(devices) == 8
  c = base_config()
  mesh = make_mesh([("data", 8), ("fsdp", 1), ("tensor", 1)], devices)
  c.batch_size = 30
  with pytest.raises(ConfigError) as info:
    check_mesh(c, mesh)
  assert str(info.value) == ("config.batch_size=30 is not divisible by the 8 devices the batch is "
                             "split over (mesh data=8, fsdp=1); use a multiple of 8 such as 24 or 32")
  c.batch_size = 32
  check_mesh(c, mesh)
  # The tensor axis does not split the batch: 4 shards of it.
  mesh = make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)], devices)
  c.batch_size = 2
  with pytest.raises(ConfigError, match=r"the 4 devices .* \(mesh data=2, fsdp=2\); use a "
                                        r"multiple of 4 such as 4$"):
    check_mesh(c, mesh)
  c.batch_size = 12
  check_mesh(c, mesh)
  # Rules decide: with the batch on "data" only, 2 shards.
  c.sharding_rules = [["batch", "data"]]
  c.batch_size = 6
  check_mesh(c, mesh)
  # Each process reads batch_size / process_count examples.
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  with pytest.raises(ConfigError, match=r"^config\.batch_size=6 is not divisible by the 4 processes; "
                                        r"use a multiple of 4 such as 4 or 8$"):
    check_mesh(c, mesh)


def test_build_experiment_checks_the_batch_against_the_mesh_before_compiling():
  """A batch the mesh cannot split fails in build_experiment (nothing compiled yet), naming it."""
  from tests.train.helpers import tiny_config  # pylint: disable=import-outside-toplevel
  c = tiny_config(batch_size=30, mesh=[("data", 8), ("fsdp", 1), ("tensor", 1)])
  with pytest.raises(ConfigError, match=r"config\.batch_size=30 is not divisible by the 8 devices"):
    build_experiment(c)
