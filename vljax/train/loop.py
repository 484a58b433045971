"""`train_and_evaluate(config, workdir)`: the one training loop shared by every family."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vljax.data.batching import InputState
from vljax.data.pipeline import (bad_record_counter, build_tokenizer, check_batch, data_config,
                                 global_batch, require_source, train_iterator, train_view)
from vljax.errors import ConfigError
from vljax.evals.base import check_family
from vljax.evals.pictures import plot_curves, plot_samples
from vljax.families import Bound, Family, bind, get_family
from vljax.sharding import make_mesh, replicated
from vljax.train import accumulate, optim
from vljax.train.checkpoint import Checkpointer
from vljax.train.config import check_mesh, check_microbatches, init_entries, validate
from vljax.train.initialise import load_init_params
from vljax.train.evaluation import Evaluation
from vljax.train.reporting import MetricWriter, Progress, read_jsonl
from vljax.train.state import (HOST_MEMORY, TrainState, abstract_key, in_host_memory, init_state,
                               state_shardings, with_memory_kind)

log = logging.getLogger("vljax")


def make_train_step(bound: Bound, tx: optax.GradientTransformation, lr_fn: optax.Schedule,
                    frozen: Any, seed: int, microbatches: int = 1,
                    shardings: TrainState | None = None):
  """The pure step `(state, batch) -> (state, metrics)`; randomness is folded from the step.

  With `microbatches` > 1 the batch runs as that many sequential microbatches, with the whole
  batch's exact loss and gradient (`vljax.train.accumulate`). `shardings` (the state's) pins the
  gradient accumulator to the parameters' layout, and brings an optimizer state kept in host
  memory (`config.optim.offload`) to the device for the update and back.
  """

  def terms_fn(params, batch, rng):
    return bound.loss_terms(optim.stop_frozen(params, frozen), batch, rng)

  constrain = None
  if shardings is not None:
    constrain = lambda grads: jax.lax.with_sharding_constraint(grads, shardings.params)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    (loss, metrics), grads = accumulate.accumulated_value_and_grad(
        terms_fn, bound.combine, state.params, batch, rng, microbatches, constrain)
    opt_state = state.opt_state
    offloaded = shardings is not None and in_host_memory(shardings.opt_state)
    if offloaded:
      opt_state = jax.device_put(opt_state, with_memory_kind(shardings.opt_state, "device"))
    updates, opt_state = tx.update(grads, opt_state, state.params)
    if offloaded:
      opt_state = jax.device_put(opt_state, shardings.opt_state)
    params = optax.apply_updates(state.params, updates)
    out = {"train/loss": loss, "train/grad_norm": optax.global_norm(grads),
           "train/lr": lr_fn(state.step)}
    out.update({f"train/{k}": v for k, v in metrics.items()})
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), out

  return train_step


@dataclasses.dataclass
class Experiment:
  """Everything built from a config before training: model, mesh, optimizer, shardings, step."""

  config: ml_collections.ConfigDict
  data_cfg: ml_collections.ConfigDict
  family: Family
  tokenizer: Any
  bound: Bound  # the family with its model: loss, predict functions, image preparation
  batch_spec: dict  # shapes and dtypes of one global batch (the view's)
  mesh: Mesh
  rules: list
  tx: optax.GradientTransformation
  frozen: Any
  abstract_state: TrainState
  shardings: TrainState
  init_params: Any
  train_step: Any  # jitted (state, batch) -> (state, metrics), donating the state

  def init(self) -> TrainState:
    state = init_state(self.init_params, self.tx, jax.random.key(self.config.seed), self.shardings)
    if init_entries(self.config):
      state = state.replace(params=load_init_params(self.config, state.params, self.shardings.params,
                                                     self.frozen))
    return state

  def context(self):
    """The mesh and logical-rules context that steps and constraints run under."""
    return mesh_context(self.mesh, self.rules)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules):
  """The mesh (read by sharding constraints) and logical-axis rules, entered together."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def build_experiment(config: ml_collections.ConfigDict, devices=None, tokenizer=None) -> Experiment:
  """Validates `config` and builds the model, mesh, optimizer, shardings and jitted step.

  Nothing is allocated on devices: parameters exist only as shapes until `Experiment.init`.
  """
  config = validate(config)
  data_cfg = data_config(config.data)
  family = get_family(config.family)
  if data_cfg.view not in family.views:
    raise ConfigError(f"config.data.view={data_cfg.view!r}: family {family.name!r} trains on "
                      f"{', '.join(repr(v) for v in family.views)}")
  check_family(config.evals, family.name, set(family.predict), family.views)
  tokenizer = tokenizer or build_tokenizer(data_cfg)
  mesh = make_mesh(config.mesh, devices)
  check_mesh(config, mesh)
  check_microbatches(config, mesh)
  rules = [tuple(r) for r in config.sharding_rules]
  bound = bind(family, config, tokenizer, data_cfg, mesh)
  spec = train_view(data_cfg, tokenizer).spec(config.batch_size)

  def init_params(rng):
    return bound.init(rng, spec)

  abstract_params = nn.meta.unbox(jax.eval_shape(init_params, abstract_key()))
  tx, lr_fn, frozen = optim.make_optimizer(config.optim, abstract_params, config.total_steps)
  with mesh_context(mesh, rules):
    abstract_state, shardings = state_shardings(init_params, tx, mesh, rules)
  if config.optim.offload:
    shardings = shardings.replace(opt_state=with_memory_kind(shardings.opt_state, HOST_MEMORY))
  step = jax.jit(make_train_step(bound, tx, lr_fn, frozen, config.seed, config.microbatches,
                                 shardings),
                 out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
  return Experiment(config, data_cfg, family, tokenizer, bound, spec, mesh, rules, tx, frozen,
                    abstract_state, shardings, init_params, step)


def _fetch_finite(pending: list[tuple[int, dict]]) -> list[dict]:
  """Host copies of the pending metrics; raises naming the first step whose loss is not finite."""
  window = [host_values(m) for _, m in pending]
  for (step, _), m in zip(pending, window):
    if not np.isfinite(m["train/loss"]):
      raise FloatingPointError(f"Non-finite training loss ({m['train/loss']}) at step {step}; the "
                               "last checkpoint written before it is kept.")
  return window


def host_values(tree: Any) -> Any:
  """numpy copies of (replicated) arrays; works when other processes hold other devices."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array)
                      else np.asarray(x), tree)


class StopRequested(BaseException):
  """A stop signal arrived inside a section that may be left at once (input pipeline, eval).

  A BaseException, as KeyboardInterrupt, so that code which turns any Exception into a skipped
  record (image decoding) cannot swallow it."""


class StopWatcher:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a request to checkpoint and stop.

  Between steps the request is only noted and acted on at the next step boundary. Inside an
  `interruptible()` section (reading input, evaluating: nothing there changes the train state)
  the handler raises StopRequested at once, so a stalled input pipeline cannot delay a
  scheduler's stop. A second Ctrl-C raises KeyboardInterrupt wherever the run is. With several
  processes the request is shared (any process's signal stops all), so every process saves the
  same step, as orbax expects.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal_name: str | None = None
    self._interruptible = False
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.signal_name == "SIGINT" and name == "SIGINT":
      raise KeyboardInterrupt("second Ctrl-C: stopped without saving")
    self.signal_name = self.signal_name or name
    if self._interruptible:
      self._interruptible = False
      raise StopRequested(name)

  @contextlib.contextmanager
  def interruptible(self):
    if self.signal_name is not None and jax.process_count() == 1:
      raise StopRequested(self.signal_name)
    # With several processes a stop must wait for a step boundary, where all processes agree.
    self._interruptible = jax.process_count() == 1
    try:
      yield
    finally:
      self._interruptible = False

  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self.signal_name is not None
    flags = multihost_utils.process_allgather(np.array(self.signal_name is not None))
    return bool(np.any(flags))

  def restore(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}


def _restore_or_init(exp: Experiment, checkpointer: Checkpointer, inputs: InputState):
  """(start step, state): the newest complete checkpoint's, or a fresh initialisation."""
  found = checkpointer.restore_latest(exp.abstract_state, exp.shardings, inputs,
                                      restart_data=exp.config.restart_data_order)
  if found is None:
    log.info("Initialising a new model (no checkpoint in %s)", checkpointer.directory)
    return 0, exp.init()
  log.info("Resuming from the checkpoint at step %d in %s", found[0], checkpointer.directory)
  return found


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming from its newest complete checkpoint) and returns the
  final evaluation, also written to `workdir/metrics.json`.

  On SIGTERM it checkpoints and returns {} without evaluating; on SIGINT (Ctrl-C) it checkpoints
  and raises KeyboardInterrupt. Either stop waits for the current step, not for the input
  pipeline or an evaluation.
  """
  require_source(data_config(config.data))
  exp = build_experiment(config)
  config, mesh = exp.config, exp.mesh
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(exp.abstract_state.params))
  log.info("Mesh %s over %d devices (%s); model %s with %.2fM parameters", dict(mesh.shape),
           mesh.size, jax.default_backend(), config.family, num_params / 1e6)

  writer = MetricWriter(workdir, enabled=is_main)
  watcher = StopWatcher()
  try:
    with exp.context():
      return _train(exp, workdir, writer, watcher, is_main)
  finally:
    watcher.restore()
    writer.close()


def _train(exp: Experiment, workdir: str, writer: MetricWriter, watcher: StopWatcher,
           is_main: bool) -> dict[str, float]:
  config, mesh, rules = exp.config, exp.mesh, exp.rules
  checkpointer = Checkpointer(workdir, config.keep_checkpoints)
  data_it = train_iterator(exp.data_cfg, exp.tokenizer, seed=config.seed,
                           global_batch_size=config.batch_size,
                           process_index=jax.process_index(), process_count=jax.process_count())
  bad_records = bad_record_counter(exp.data_cfg)
  inputs = InputState(data_it, bad_records)  # checkpointed with the model
  start, state = _restore_or_init(exp, checkpointer, inputs)
  log.info("Rendering the evaluation sets")
  evaluation = Evaluation(exp, config.evals)

  def evaluate(step: int, final: bool = False) -> dict[str, float]:
    due = evaluation.due(step, config.eval_every, final)
    if not due:
      return {}
    log.info("Evaluating at step %d (%s)", step, evaluation.describe(due))
    t0 = time.time()
    with watcher.interruptible():
      metrics = evaluation.run(state.params, due)
    writer.write(step, {**metrics, "eval/seconds": time.time() - t0})
    return metrics

  def stop(step: int, saved: bool) -> dict:
    """Checkpoints `step` unless it is saved already (or nothing was trained), then stops."""
    trained = step > start
    if trained and not saved:
      checkpointer.save(step, state, inputs)
    checkpointer.close()
    done = (f"saved the checkpoint of step {step}" if trained else
            f"no step since {'the start' if step == 0 else f'step {step}'} to save")
    log.warning("Stop requested (%s): %s; rerun the same command to resume.",
                watcher.signal_name, done)
    if watcher.signal_name == "SIGINT":
      raise KeyboardInterrupt(f"interrupted at step {step}; " + (
          "checkpoint saved" if trained else "nothing new to save"))
    return {}

  if start < config.total_steps:
    log.info("Training steps %d-%d; the first step compiles the model (seconds to "
             "minutes), then a line every %d steps.", start + 1, config.total_steps, config.log_every)
  progress = Progress(config.total_steps, start, enabled=is_main)
  pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet fetched
  t_window = time.time()
  step = saved_step = start
  while step < config.total_steps:
    boundary = data_it.get_state()
    try:
      with watcher.interruptible():
        local = next(data_it)
    except StopRequested:
      data_it.set_state(boundary)  # the partly read batch is read again on resume
      return stop(step, saved=saved_step == step)
    step += 1
    if step == start + 1:
      check_batch(local, exp.batch_spec, jax.process_count(), config.family)
    seen_bad = len(bad_records.distinct_bad_keys)
    batch = global_batch(bad_records.observe(local), mesh, rules)
    if len(bad_records.distinct_bad_keys) > seen_bad and seen_bad < 10:
      log.warning("Skipped bad input records (%d so far): %s", bad_records.bad,
                  ", ".join(sorted(bad_records.distinct_bad_keys)[:10]))
    state, metrics = exp.train_step(state, batch)
    pending.append((step, metrics))
    if step == start + 1:
      jax.block_until_ready(metrics)
      log.info("Step %d done in %.1fs (compilation included).", step, time.time() - t_window)
    saving = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
    stopping = watcher.requested()
    if step % config.log_every == 0 or step == config.total_steps or saving or stopping:
      window = _fetch_finite(pending)  # raises on a non-finite loss, before any save
      if step % config.log_every == 0 or step == config.total_steps:
        summary = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
        summary["train/steps_per_sec"] = len(window) / (time.time() - t_window)
        summary["data/skipped"] = bad_records.bad  # bad records read (repeats included)
        summary["data/bad_records"] = len(bad_records.distinct_bad_keys)  # distinct ones
        writer.write(step, summary)
        progress.update(step)
        pending, t_window = [], time.time()
    if (saving and step != config.total_steps) or stopping:  # the last step is saved below
      checkpointer.save(step, state, inputs)
      saved_step = step
    if stopping:
      return stop(step, saved=True)
    if step != config.total_steps:
      try:
        evaluate(step)
      except StopRequested:
        return stop(step, saved=saved_step == step)
  if saved_step < config.total_steps:
    checkpointer.save(config.total_steps, state, inputs)
  try:
    final = evaluate(config.total_steps, final=True)
    with watcher.interruptible():
      samples = evaluation.samples(state.params)  # every process joins the computation
  except StopRequested:
    return stop(config.total_steps, saved=True)
  checkpointer.close()
  if is_main:
    if samples is not None:
      plot_samples(*samples, os.path.join(workdir, "samples.png"))
    writer.close()
    plot_curves(read_jsonl(writer.jsonl_path), os.path.join(workdir, "curves.png"))
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump({k: float(v) for k, v in final.items()}, f, indent=2, sort_keys=True)
    log.info("Final evaluation: %s", json.dumps(final, sort_keys=True))
    log.info("Wrote metrics.json, metrics.jsonl, %scurves.png to %s",
             "samples.png and " if samples is not None else "", workdir)
  return final
