"""experiments/bench_decode.py --quick, in process: vljax's LM and transformers' LlamaForCausalLM
with the same weights decode the same tokens, the parallel prefill and token-by-token feeding
give the same logits, and --out writes the records the README table is made from (the fields,
not the timings, are checked)."""
import importlib.util
import json
import os


BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                     "bench_decode.py")


def _load_bench():
  spec = importlib.util.spec_from_file_location("vljax_experiments_bench_decode", BENCH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_quick_run_writes_records(tmp_path, capsys):
  bench = _load_bench()
  out = tmp_path / "bench.json"
  returned = bench.main(["--quick", "--out", str(out)])
  records = json.loads(out.read_text())
  assert records == json.loads(json.dumps(returned))
  for record in records:
    for field in ("impl", "mode", "batch", "prompt_len", "new_tokens", "seconds", "tokens_per_s",
                  "vocab_size", "width", "depth", "num_heads", "num_kv_heads", "mlp_dim"):
      assert field in record, field
    assert record["impl"] in ("vljax", "transformers")
    assert record["seconds"] > 0 and record["tokens_per_s"] > 0
  decode_rows = [r for r in records if r["mode"] == "decode"]
  quick = bench.QUICK
  assert {(r["impl"], r["new_tokens"]) for r in decode_rows} == {
      (impl, n) for impl in ("vljax", "transformers") for n in quick["new_tokens"]}
  assert all(r["same_tokens"] and r["batch"] == quick["batch"] for r in decode_rows)
  assert all(r["distinct_tokens"] > 1 for r in decode_rows)  # not a degenerate repetition
  prefill = {r["mode"]: r for r in records if r["mode"] != "decode"}
  assert set(prefill) == {"prefill", "token_by_token"}
  for row in prefill.values():
    assert row["impl"] == "vljax" and row["new_tokens"] == 0 and row["same_logits"]
    assert row["prompt_len"] == quick["prefix_len"]
  assert "vs_token_by_token" in prefill["prefill"]
  printed = capsys.readouterr().out
  assert "vljax / it" in printed and "`lm.prefill` (one pass)" in printed
