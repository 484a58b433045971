r"""Fault injection: kill a training run at random moments and damage its checkpoints at random,
many times in a row, then check that the losses it ends with are the uninterrupted run's.

  python experiments/chaos.py --rounds=20 --out=chaos.json

Each round (re)starts `experiments/main.py` on a small two-tower config in the current workdir,
sends SIGKILL, SIGTERM or SIGINT at a random moment (half the rounds after a random time, so
start-up, compilation, restore and evaluation are hit; half after a random number of new
training steps), and then, with probability --damage, damages a random checkpoint the way disks
and people do (an array file deleted or truncated, the OCDBT manifest deleted, the state/ or
data/ item deleted). When a run gets to its end, its losses are compared with an uninterrupted
reference run's and the next rounds start a new workdir; after the last round the current run
is finished without interruption and compared too. Passes when every finished run's last logged
loss of every step equals the reference bit for bit and no stop misbehaved (damaged checkpoints
are set aside in damaged_checkpoints/, never deleted). If the only checkpoints left are damaged,
the run refuses to start, as it should; the script then does what the message says (moves
checkpoints/ away) and goes on.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# clip_tiny shrunk so that a run is a few seconds of training after its compilation.
OVERRIDES = [
    "model.image.width=32", "model.image.depth=1", "model.image.mlp_dim=64",
    "model.image.num_heads=2", "model.text.width=32", "model.text.depth=1",
    "model.text.mlp_dim=64", "model.text.num_heads=2", "model.embed_dim=16", "batch_size=16",
    "data.image_size=32", "evals.zeroshot.images=48", "evals.retrieval.pairs=32",
    "evals.zeroshot.batch_size=16", "evals.retrieval.batch_size=16", "optim.warmup_steps=10", "log_every=1",
]
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}


def _largest_array_file(step_dir: str) -> str | None:
  files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
  return max(files, key=os.path.getsize) if files else None


def _delete_array(step_dir):
  path = _largest_array_file(step_dir)
  if path:
    os.remove(path)


def _truncate_array(step_dir):
  path = _largest_array_file(step_dir)
  if path:
    os.truncate(path, os.path.getsize(path) // 3)


def _delete(*parts):
  def damage(step_dir):
    path = os.path.join(step_dir, *parts)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
  return damage


DAMAGES = {
    "delete an array file": _delete_array,
    "truncate an array file": _truncate_array,
    "delete the OCDBT manifest": _delete("state", "manifest.ocdbt"),
    "delete the state/ item": _delete("state"),
    "delete the data/ item": _delete("data"),
}


def _command(workdir: str, steps: int, checkpoint_every: int) -> list[str]:
  return ([sys.executable, os.path.join(REPO, "experiments", "main.py"), "--config=clip_tiny.py",
           f"--workdir={workdir}", f"--config.total_steps={steps}",
           f"--config.checkpoint_every={checkpoint_every}", "--config.keep_checkpoints=3"]
          + [f"--config.{o}" for o in OVERRIDES])


def _env() -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _run(command, log_path, should_stop=None, signum=None) -> int:
  """Runs `command` (output to log_path); sends `signum` as soon as `should_stop(seconds since
  start)` says so. Returns the exit status (-999 if the signal did not stop it in 120 s)."""
  with open(log_path, "a") as log:
    proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    t0 = time.time()
    while proc.poll() is None:
      if should_stop is not None and should_stop(time.time() - t0):
        proc.send_signal(signum)
        try:
          proc.wait(timeout=120)
        except subprocess.TimeoutExpired:  # a stop that hangs is a failure; make it visible
          proc.kill()
          proc.wait()
          return -999
        break
      time.sleep(0.05)
  return proc.returncode


def _losses(workdir: str) -> dict[int, float]:
  """step -> the last loss logged for it (a step trained again after a fallback counts anew)."""
  losses = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # cut short by SIGKILL
          continue
        if "train/loss" in record:
          losses[record["step"]] = record["train/loss"]
  return losses


def _steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=20, help="interruptions in a row")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--checkpoint_every", type=int, default=20)
  parser.add_argument("--max_wait", type=float, default=25.0,
                      help="time-triggered kills land in [0.5, max_wait] s after the start")
  parser.add_argument("--max_new_steps", type=int, default=80,
                      help="step-triggered kills land after 1..max_new_steps newly logged steps")
  parser.add_argument("--damage", type=float, default=0.5, help="probability of damage per round")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default="", help="default: a new temporary directory")
  parser.add_argument("--out", default="", help="write the events and the verdict as JSON")
  args = parser.parse_args()
  rng = random.Random(args.seed)
  root = args.workdir or tempfile.mkdtemp(prefix="vljax-chaos-")
  reference = os.path.join(root, "reference")
  for d in glob.glob(os.path.join(root, "chaos_*")) + [reference]:
    shutil.rmtree(d, ignore_errors=True)
  command = lambda w: _command(w, args.steps, args.checkpoint_every)

  print(f"Uninterrupted reference run in {reference} ...", flush=True)
  status = _run(command(reference), os.path.join(root, "reference.log"))
  if status != 0:
    print(f"The reference run failed (exit {status}); see {root}/reference.log")
    return 1
  expected = _losses(reference)

  events, cycles, moved_away = [], [], 0
  chaos = os.path.join(root, "chaos_0")

  def check_cycle() -> None:
    """A finished run: compare its losses with the reference, then start a new workdir."""
    nonlocal chaos
    got = _losses(chaos)
    mismatched = [s for s in expected if got.get(s) != expected[s]]
    aside = os.path.join(chaos, "damaged_checkpoints")
    cycles.append({"workdir": chaos, "steps": len(got), "mismatched_steps": mismatched[:10],
                   "damaged_checkpoints_set_aside": len(os.listdir(aside)) if os.path.isdir(aside) else 0})
    print(json.dumps({"finished run": cycles[-1]}), flush=True)
    chaos = os.path.join(root, f"chaos_{len(cycles)}")

  for round_index in range(args.rounds):
    name = rng.choice(sorted(SIGNALS))
    # Half the kills at a random time (start-up, compilation, restore, evaluation), half after a
    # random number of newly logged steps (training, checkpointing).
    logged = max(_losses(chaos), default=0)
    if rng.random() < 0.5 or logged >= args.steps:
      wait = rng.uniform(0.5, args.max_wait)
      when, should_stop = f"after {wait:.1f} s", lambda elapsed, wait=wait: elapsed >= wait
    else:
      target = min(logged + rng.randint(1, args.max_new_steps), args.steps)
      when = f"at logged step {target}"
      should_stop = lambda _, target=target: max(_losses(chaos), default=0) >= target
    status = _run(command(chaos), os.path.join(root, "chaos.log"), should_stop, SIGNALS[name])
    event = {"round": round_index + 1, "workdir": os.path.basename(chaos), "signal": name,
             "when": when, "exit": status, "steps_logged": max(_losses(chaos), default=0)}
    if status == -999:
      event["problem"] = "the run did not stop within 120 s of the signal"
    elif status not in (0, 1, 130, -signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT):
      event["problem"] = f"unexpected exit status {status}"
    if status == 1:  # every checkpoint left was damaged: the run refused to start
      with open(os.path.join(root, "chaos.log")) as f:
        tail = f.read().splitlines()[-3:]
      if not any("can be restored" in line for line in tail):
        event["problem"] = "failed: " + " | ".join(tail)
      else:  # as the message says: move checkpoints/ away to start over
        os.rename(os.path.join(chaos, "checkpoints"),
                  os.path.join(chaos, f"checkpoints_moved_away_{moved_away}"))
        moved_away += 1
        event["followed_advice"] = "moved checkpoints/ away"
    steps = _steps(chaos)
    if steps and rng.random() < args.damage:
      step, kind = rng.choice(steps), rng.choice(sorted(DAMAGES))
      DAMAGES[kind](os.path.join(chaos, "checkpoints", str(step)))
      event["damaged"] = f"step {step}: {kind}"
    events.append(event)
    print(json.dumps(event), flush=True)
    if os.path.exists(os.path.join(chaos, "metrics.json")):
      check_cycle()

  print("Final run, uninterrupted ...", flush=True)
  status = _run(command(chaos), os.path.join(root, "chaos.log"))
  if status == 1:  # the last damage left nothing restorable
    os.rename(os.path.join(chaos, "checkpoints"), os.path.join(chaos, "checkpoints_moved_away_last"))
    status = _run(command(chaos), os.path.join(root, "chaos.log"))
  check_cycle()
  problems = [e for e in events if "problem" in e]
  verdict = {
      "rounds": args.rounds, "final_exit": status, "steps_per_run": args.steps,
      "finished_runs": len(cycles),
      "runs_equal_to_reference": sum(not c["mismatched_steps"] and c["steps"] == args.steps
                                     for c in cycles),
      "problems": len(problems), "checkpoint_dirs_moved_away": moved_away,
      "damaged_checkpoints_set_aside": sum(c["damaged_checkpoints_set_aside"] for c in cycles),
  }
  verdict["passed"] = (status == 0 and not problems
                       and verdict["runs_equal_to_reference"] == len(cycles))
  print(json.dumps(verdict, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"events": events, "finished_runs": cycles, "verdict": verdict, "workdir": root},
                f, indent=1)
  return 0 if verdict["passed"] else 1


if __name__ == "__main__":
  sys.exit(main())
