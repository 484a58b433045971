"""Skip-and-batch stops on sources it cannot fill a batch from; bad-record reasons are counted."""
import grain
import numpy as np
import pytest

from vljax.data.batching import (MAX_REASONS, OTHER_REASON, SKIPPED, SKIPPED_REASONS,
                                 BadRecordCounter, SkipBadAndBatch, TooManyBadRecordsError,
                                 add_reason, stack_examples, too_many_bad_message)

NO_IMAGE = "no image member (has: txt)"
UNDECODABLE = "cannot decode image (not in any format PIL reads)"


def _records(pattern: str) -> grain.IterDataset:
  """An endless source: "g" is a good record, "n" / "u" a bad one (no image / undecodable)."""
  records = [{"image": np.full((2,), i, np.uint8)} if c == "g" else
             {"error": NO_IMAGE if c == "n" else UNDECODABLE, "key": f"k{i}"}
             for i, c in enumerate(pattern)]
  return grain.MapDataset.source(records).repeat().to_iter_dataset()


def test_stops_when_no_record_is_usable():
  batches = iter(SkipBadAndBatch(_records("nnnnnnn"), 4, min_records=10,
                                 advice={"no image": "check the shards", "cannot": "unused"}))
  with pytest.raises(TooManyBadRecordsError) as error:
    next(batches)
  assert str(error.value) == (
      "10 of 10 input records read (100.00%) were unusable, more than max_bad_fraction=5.00% "
      "allows: 10 x no image member (has: txt) — check the shards; first bad keys: k0, k1, k2, k3, "
      "k4 (the limits are config.data.max_bad_fraction and min_records_before_check)")
  # Even when every record may be bad, a batch that can never fill stops rather than hangs.
  with pytest.raises(TooManyBadRecordsError, match=r"^10 of 10 .* so no batch can be filled: "):
    next(iter(SkipBadAndBatch(_records("un"), 4, min_records=10, max_bad_fraction=1.0)))


def test_stops_within_one_batch_only_past_the_limit():
  # 2 of every 3 records bad: a batch of 2 takes 6 reads, below min_records=7.
  batches = iter(SkipBadAndBatch(_records("nug"), 2, min_records=7))
  batch = next(batches)
  assert int(batch[SKIPPED]) == 4 and batch[SKIPPED_REASONS] == {NO_IMAGE: 2, UNDECODABLE: 2}
  with pytest.raises(TooManyBadRecordsError, match=r"^5 of 7 .*: 3 x no image member .*; "
                     r"2 x cannot decode image"):
    next(iter(SkipBadAndBatch(_records("nug"), 3, min_records=7)))
  tolerant = iter(SkipBadAndBatch(_records("nug"), 3, min_records=7, max_bad_fraction=0.75))
  assert [int(next(tolerant)[SKIPPED]) for _ in range(3)] == [6, 6, 6]


def test_message_lists_the_commonest_reasons():
  reasons = {"a": 1, "b": 5, "c": 3, "d": 2}
  message = too_many_bad_message(11, 12, 0.5, reasons, ["x", "x", "y"], {"c": "check c"})
  assert message.startswith("11 of 12 input records read (91.67%) were unusable, more than "
                            "max_bad_fraction=50.00% allows: 5 x b; 3 x c; 2 x d; 1 x other "
                            "reasons — check c; first bad keys: x, y (the limits")


def test_reasons_are_bounded():
  reasons = {}
  for i in range(MAX_REASONS + 5):
    add_reason(reasons, f"reason {i}", 2)
  add_reason(reasons, "reason 0")
  assert len(reasons) == MAX_REASONS + 1
  assert reasons[OTHER_REASON] == 10 and reasons["reason 0"] == 3


def test_counter_reports_reasons_and_reads_old_states():
  counter = BadRecordCounter(max_bad_fraction=0.5, min_records=8,
                             advice={"missing": "check config.data.caption_keys"})
  batch = {"image": np.zeros((2, 3)), SKIPPED: np.int64(1), "skipped_keys": ["k1"],
           SKIPPED_REASONS: {"missing or empty caption (looked in .txt)": 1}}
  assert set(counter.observe(batch)) == {"image"}
  state = counter.get_state()
  assert state["reasons"] == {"missing or empty caption (looked in .txt)": 1}
  with pytest.raises(TooManyBadRecordsError,
                     match=r"^5 of 8 input records read \(62\.50%\) were unusable, more than "
                     r"max_bad_fraction=50\.00% allows: 5 x missing or empty caption \(looked in "
                     r"\.txt\) — check config\.data\.caption_keys; first bad keys: k1, k2"):
    counter.update(4, 5, ["k2"], {"missing or empty caption (looked in .txt)": 4})
  restored = BadRecordCounter()
  restored.set_state(state)
  assert (restored.total, restored.bad, restored.reasons) == (3, 1, state["reasons"])
  old = {k: v for k, v in state.items() if k != "reasons"}  # written before reasons were counted
  restored.set_state(old)
  assert (restored.total, restored.bad, restored.reasons) == (3, 1, {})


def test_stack_examples_names_a_field_of_mixed_shapes():
  examples = [{"image": np.zeros((4, 4, 3))}, {"image": np.zeros((4, 5, 3))}]
  with pytest.raises(ValueError,
                     match=r"field 'image'.*different shapes.*config\.data\.image_size"):
    stack_examples(examples, keep_strings=False)
