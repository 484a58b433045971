"""Batching that skips bad records, and the guard that stops a run fed mostly bad records.

Sources such as `vljax.data.webdataset.WebDatasetSource` return `{"error": reason, "key": key}`
for a record they cannot use. `SkipBadAndBatch` drops those and still emits batches of exactly
`batch_size` good examples, reporting per batch how many records it dropped and which.
`BadRecordCounter` accumulates those reports and raises once too large a fraction is bad, which
usually means broken shards or a wrong caption key rather than a few corrupt downloads; the batcher
itself raises as well when one batch cannot be filled, so a source with no usable record stops
instead of being read forever.
"""
from __future__ import annotations

import json
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

SKIPPED = "skipped"  # int64 scalar: bad records dropped while building this batch
SKIPPED_KEYS = "skipped_keys"  # list[str]: the first of their keys
SKIPPED_REASONS = "skipped_reasons"  # dict[str, int]: why they were dropped, reason -> count
BOOKKEEPING = (SKIPPED, SKIPPED_KEYS, SKIPPED_REASONS)

MAX_REASONS = 20  # distinct reasons kept (a bound on memory); the rest count as OTHER_REASON
OTHER_REASON = "other reasons"


def _is_string(value: Any) -> bool:
  return isinstance(value, (str, bytes))


def stack_examples(examples: Sequence[Mapping[str, Any]], keep_strings: bool) -> dict[str, Any]:
  """Stacks each field into an array [b, ...]; string fields become lists or are dropped."""
  batch = {}
  for name, first in examples[0].items():
    if _is_string(first):
      if keep_strings:
        batch[name] = [e[name] for e in examples]
      continue
    arrays = [np.asarray(e[name]) for e in examples]
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
      raise ValueError(f"Cannot batch field {name!r}: its examples have different shapes "
                       f"{shapes[:4]} (images of their own size? set config.data.image_size)")
    batch[name] = np.stack(arrays)
  return batch


def add_reason(reasons: dict[str, int], reason: str, count: int = 1) -> None:
  """Adds `count` to `reasons[reason]`, or to OTHER_REASON once MAX_REASONS reasons are held."""
  if reason not in reasons and len(reasons) >= MAX_REASONS:
    reason = OTHER_REASON
  reasons[reason] = reasons.get(reason, 0) + int(count)


def too_many_bad_message(bad: int, total: int, max_bad_fraction: float,
                         reasons: Mapping[str, int], keys: Sequence[str],
                         advice: Mapping[str, str]) -> str:
  """One sentence for TooManyBadRecordsError: the counts, the commonest reasons, what to check.

  `advice` maps the start of a reason to what to check when that reason is common.
  """
  top = sorted(reasons.items(), key=lambda item: -item[1])[:3]
  listed = "; ".join(f"{count} x {reason}" for reason, count in top)
  rest = sum(reasons.values()) - sum(count for _, count in top)
  if rest:
    listed += f"; {rest} x other reasons"
  checks = dict.fromkeys(text for reason, _ in top for start, text in advice.items()
                         if reason.startswith(start))
  limit = (f"more than max_bad_fraction={max_bad_fraction:.2%} allows"
           if bad > max_bad_fraction * total else "so no batch can be filled")
  return (f"{bad} of {total} input records read ({bad / max(total, 1):.2%}) were unusable, "
          f"{limit}: {listed or 'reasons not recorded'}"
          f"{' — ' + '; '.join(checks) if checks else ''}; first bad keys: "
          f"{', '.join(dict.fromkeys(keys)) or '(none recorded)'} (the limits are "
          "config.data.max_bad_fraction and min_records_before_check)")


class _SkipBadAndBatchIterator(grain.DatasetIterator):
  """Pulls from the parent until `batch_size` good examples are in hand, or too many were bad."""

  def __init__(self, parent: grain.DatasetIterator, batch: SkipBadAndBatch):
    super().__init__(parent)
    self._batch = batch

  def __next__(self) -> dict[str, Any]:
    config = self._batch
    good, skipped, keys, reasons = [], 0, [], {}
    while len(good) < config.batch_size:
      try:
        example = next(self._parent)
      except StopIteration:
        if config.drop_remainder or not good:
          raise
        break
      if "error" not in example:
        good.append(example)
        continue
      skipped += 1
      add_reason(reasons, str(example["error"]))
      if len(keys) < config.max_keys:
        keys.append(str(example.get("key", "?")))
      read = skipped + len(good)
      # With no good record at all the batch can never fill, whatever max_bad_fraction allows.
      if read >= config.min_records and (skipped > config.max_bad_fraction * read or not good):
        raise TooManyBadRecordsError(too_many_bad_message(
            skipped, read, config.max_bad_fraction, reasons, keys, config.advice))
    batch = stack_examples(good, config.keep_strings)
    batch[SKIPPED] = np.int64(skipped)
    batch[SKIPPED_KEYS] = keys
    batch[SKIPPED_REASONS] = reasons
    return batch

  # A batch is complete when `__next__` returns, so nothing is buffered between calls and the
  # parent's position is the whole state: restoring it replays exactly the same batches.
  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)

  def __str__(self) -> str:
    return f"SkipBadAndBatchDatasetIterator(batch_size={self._batch.batch_size})"


class SkipBadAndBatch(grain.IterDataset):
  """Batches of exactly `batch_size` good examples of `parent`, skipping examples with "error".

  Each batch holds the stacked array fields ([batch_size, ...]); string fields (captions, keys)
  are dropped, or kept as lists with `keep_strings=True`. It also holds `SKIPPED` (records
  dropped while filling it), `SKIPPED_KEYS` (up to `max_keys` of their keys) and
  `SKIPPED_REASONS` (reason -> count): bookkeeping to remove, e.g. with
  `BadRecordCounter.observe`, before the batch goes to devices. When a finite parent ends, a
  partial batch is dropped (`drop_remainder=True`) or emitted; bad records after the last good
  example are then not reported.

  Once filling one batch has read `min_records` records of which more than `max_bad_fraction`
  (or all) were bad, it raises TooManyBadRecordsError instead of reading on, possibly forever;
  `advice` (see `too_many_bad_message`) says what to check.
  """

  def __init__(self, parent: grain.IterDataset, batch_size: int, *, drop_remainder: bool = True,
               keep_strings: bool = False, max_keys: int = 5, max_bad_fraction: float = 0.05,
               min_records: int = 1000, advice: Mapping[str, str] | None = None):
    super().__init__(parent)
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0.0 <= max_bad_fraction <= 1.0:
      raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    self.batch_size = batch_size
    self.drop_remainder = drop_remainder
    self.keep_strings = keep_strings
    self.max_keys = max_keys
    self.max_bad_fraction = max_bad_fraction
    self.min_records = min_records
    self.advice = dict(advice or {})

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return _SkipBadAndBatchIterator(self._parent.__iter__(), self)

  def __str__(self) -> str:
    return f"SkipBadAndBatch(batch_size={self.batch_size}, drop_remainder={self.drop_remainder})"


class TooManyBadRecordsError(RuntimeError):
  """The fraction of bad input records passed `max_bad_fraction`."""


class BadRecordCounter:
  """Counts good and bad records over a run and raises when too many are bad.

  The check waits for `min_records` records so that one corrupt record early in the run does not
  stop it. Counts are this process's; `get_state` / `set_state` carry them through a checkpoint
  (see `InputState`), so a resumed run goes on counting where it stopped. `advice` is as for
  `SkipBadAndBatch`.
  """

  MAX_DISTINCT = 100_000  # distinct bad keys remembered (a bound on memory)

  def __init__(self, max_bad_fraction: float = 0.05, min_records: int = 1000, max_keys: int = 5,
               advice: Mapping[str, str] | None = None):
    if not 0.0 <= max_bad_fraction <= 1.0:
      raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    self.max_bad_fraction = max_bad_fraction
    self.min_records = min_records
    self.max_keys = max_keys
    self.advice = dict(advice or {})
    self.total = 0
    self.bad = 0
    self.first_bad_keys: list[str] = []
    self.distinct_bad_keys: set[str] = set()  # a record met again in a later epoch counts once
    self.reasons: dict[str, int] = {}  # reason -> bad records (repeats included)

  @property
  def fraction(self) -> float:
    return self.bad / self.total if self.total else 0.0

  def update(self, skipped: int, total: int, keys: Sequence[str] = (),
             reasons: Mapping[str, int] | None = None) -> None:
    """Adds `skipped` bad out of `total` records read (with their keys and reason -> count);
    raises TooManyBadRecordsError if needed."""
    if not 0 <= skipped <= total:
      raise ValueError(f"Need 0 <= skipped <= total, got skipped={skipped}, total={total}")
    self.total += int(total)
    self.bad += int(skipped)
    room = self.max_keys - len(self.first_bad_keys)
    self.first_bad_keys.extend(str(k) for k in list(keys)[:max(room, 0)])
    for key in keys:
      if len(self.distinct_bad_keys) < self.MAX_DISTINCT:
        self.distinct_bad_keys.add(str(key))
    for reason, count in (reasons or {}).items():
      add_reason(self.reasons, str(reason), count)
    if self.total >= self.min_records and self.fraction > self.max_bad_fraction:
      raise TooManyBadRecordsError(too_many_bad_message(
          self.bad, self.total, self.max_bad_fraction, self.reasons, self.first_bad_keys,
          self.advice))

  def get_state(self) -> dict[str, Any]:
    return {"total": self.total, "bad": self.bad, "first_bad_keys": list(self.first_bad_keys),
            "distinct_bad_keys": sorted(self.distinct_bad_keys), "reasons": dict(self.reasons)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.total, self.bad = int(state["total"]), int(state["bad"])
    self.first_bad_keys = [str(k) for k in state["first_bad_keys"]]
    self.distinct_bad_keys = {str(k) for k in state["distinct_bad_keys"]}
    # States written before reasons were counted have none.
    self.reasons = {str(k): int(v) for k, v in state.get("reasons", {}).items()}

  def observe(self, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Counts a `SkipBadAndBatch` batch and returns it without the bookkeeping fields."""
    arrays = {k: v for k, v in batch.items() if k not in BOOKKEEPING}
    good = next((len(v) for v in arrays.values()), 0)
    skipped = int(batch[SKIPPED])
    self.update(skipped, good + skipped, batch.get(SKIPPED_KEYS, ()),
                batch.get(SKIPPED_REASONS, {}))
    return arrays


class InputState:
  """A process's whole input state for a checkpoint: the grain iterator's position and the
  bad-record counts, so that a resumed run reads the same examples and reports the same counts.

  Has the interface grain's orbax checkpoint handler expects of a non-dataset iterator (state as
  JSON bytes, `start_prefetch`); each process writes its own file.
  """

  def __init__(self, iterator: grain.DatasetIterator, counter: BadRecordCounter):
    self.iterator, self.counter = iterator, counter

  def get_state(self) -> bytes:
    return json.dumps({"iterator": self.iterator.get_state(),
                       "bad_records": self.counter.get_state()}, indent=1).encode()

  def set_state(self, state: bytes) -> None:
    decoded = json.loads(state)
    self.iterator.set_state(decoded["iterator"])
    self.counter.set_state(decoded["bad_records"])

  def start_prefetch(self) -> None:
    start = getattr(self.iterator, "start_prefetch", None)
    if start is not None:
      start()
