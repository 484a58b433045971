"""The evaluator contract and registry: `config.evals.NAME = dict(type=TYPE, every=..., ...)`.

An evaluator type is a class in EVALUATORS that declares
  SETTINGS  its settings and their defaults (beyond COMMON_SETTINGS);
  NEEDS     the predict functions it calls (`vljax.families.base.PREDICT_FUNCTIONS`), so a family
            lacking one fails at start-up, naming it;
  VIEW      the data view (`vljax.data.views`) whose prompts it feeds a generative family, if
            any: the family must train on that view;
and implements `run(predict) -> metrics` (every key starting with the entry's NAME, e.g.
"zeroshot/top1"), `describe()`, and optionally `sample(predict, count)` / `annotate(predict,
images)` for samples.png. `predict(function, inputs, **options)` runs a family's predict function
over a dict of host arrays in fixed-size batches (see `vljax.train.evaluation`).
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import ml_collections
import numpy as np

from vljax.errors import ConfigError

Predict = Callable[..., Any]  # predict(function_name, inputs: dict of arrays, **options)

COMMON_SETTINGS = dict(
    type="",  # a key of EVALUATORS
    every=0,  # evaluate every this many steps; 0 = config.eval_every
    batch_size=200,
    # Where the evaluation records come from: "shapes" (the shapes world's validation split, at the
    # training image size) or a sub-dict such as dict(kind="tfds", name="coco_captions",
    # split="val") / dict(kind="webdataset", shards="val/{0..9}.tar"); see vljax.evals.sources.
    source="shapes",
)


@dataclasses.dataclass(frozen=True)
class Environment:
  """What evaluators are built from besides their settings."""

  data: ml_collections.ConfigDict  # the training data config (image size, text length, ...)
  tokenizer: Any
  family_name: str = ""
  family_views: tuple[str, ...] = ()
  family_predict: tuple[str, ...] = ()  # the family's predict functions (optional extras)


class Evaluator(abc.ABC):
  """Base of the evaluator types; see the module docstring."""

  SETTINGS: ClassVar[dict[str, Any]] = {}
  NEEDS: ClassVar[tuple[str, ...]] = ()
  VIEW: ClassVar[str | None] = None

  def __init__(self, name: str, settings: ml_collections.ConfigDict, env: Environment):
    self.name, self.settings, self.env = name, settings, env

  @classmethod
  def check(cls, settings: ml_collections.ConfigDict, where: str) -> None:
    """Raises ConfigError naming a setting whose value cannot work (run at config validation)."""

  @property
  def where(self) -> str:
    return f"config.evals.{self.name}"

  def describe(self) -> str:
    return self.name

  @abc.abstractmethod
  def run(self, predict: Predict) -> dict[str, float]:
    """The metrics, every key starting with this entry's name."""

  def sample(self, predict: Predict, count: int) -> tuple[np.ndarray, list[list[str]]] | None:
    """Images and lines for samples.png, or None when this evaluator has no images to show."""
    return None

  def annotate(self, predict: Predict, images: np.ndarray) -> list[list[str]] | None:
    """Lines about another evaluator's sample images (e.g. generated captions), or None."""
    return None


EVALUATORS: dict[str, type[Evaluator]] = {}


def register(type_name: str):
  def add(cls: type[Evaluator]) -> type[Evaluator]:
    EVALUATORS[type_name] = cls
    return cls
  return add


def evaluator_settings(name: str, entry: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """An entry of config.evals completed from its type's defaults; unknown keys raise."""
  where = f"config.evals.{name}"
  if not isinstance(entry, (Mapping, ml_collections.ConfigDict)):
    raise ConfigError(f"{where} must be a dict with a 'type' (one of {sorted(EVALUATORS)}), "
                      f"got {entry!r}")
  entry = dict(entry)
  kind = entry.get("type", "")
  if kind not in EVALUATORS:
    raise ConfigError(f"{where}.type={kind!r}; choose one of {', '.join(sorted(EVALUATORS))}")
  defaults = {**COMMON_SETTINGS, **EVALUATORS[kind].SETTINGS}
  unknown = sorted(set(entry) - set(defaults))
  if unknown:
    raise ConfigError(f"Unknown key(s) {', '.join(where + '.' + k for k in unknown)} for an "
                      f"evaluator of type {kind!r}; valid keys: {', '.join(sorted(defaults))}")
  settings = ml_collections.ConfigDict({**defaults, **entry})
  if settings.every < 0 or settings.batch_size < 1:
    raise ConfigError(f"{where}: every must be >= 0 and batch_size >= 1")
  EVALUATORS[kind].check(settings, where)
  return settings


def check_family(evals: Mapping[str, Any], family_name: str,
                 predict_functions: set[str] | frozenset[str],
                 family_views: tuple[str, ...]) -> None:
  """Raises ConfigError naming the first evaluator whose predict functions or view the family
  lacks; cheap, so a run checks it before building anything."""
  for name, entry in dict(evals).items():
    settings = evaluator_settings(name, entry)
    cls = EVALUATORS[settings.type]
    missing = [n for n in cls.NEEDS if n not in predict_functions]
    if missing:
      raise ConfigError(f"config.evals.{name} (type {settings.type!r}) needs predict function(s) "
                        f"{', '.join(missing)}, which family {family_name!r} does not have "
                        f"(it has {', '.join(sorted(predict_functions)) or 'none'})")
    if cls.VIEW is not None and cls.VIEW not in family_views:
      raise ConfigError(f"config.evals.{name} (type {settings.type!r}) prompts with the "
                        f"{cls.VIEW!r} view, which family {family_name!r} does not train on "
                        f"(its views: {', '.join(family_views)})")


def build_evaluators(evals: Mapping[str, Any], env: Environment,
                     predict_functions: set[str] | frozenset[str]) -> list[Evaluator]:
  """The configured evaluators, after `check_family` (the error names what is missing)."""
  check_family(evals, env.family_name, predict_functions, env.family_views)
  return [EVALUATORS[settings.type](name, settings, env)
          for name, settings in ((n, evaluator_settings(n, e)) for n, e in dict(evals).items())]
