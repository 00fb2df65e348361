"""Val PER against wall-clock time for each encoder, on both synthetic t15 generators, from the command line.

  python tools/compare_encoders.py --workdir=/tmp/b2t_compare [--seeds=10,11] [--num_steps=1200] [--eval_every=300]
      [--arms=gru,transformer,mamba2,transformer_masked,diphone] [--generators=synthetic,independent]
  python tools/compare_encoders.py --workdir=DIR --from_runs=A/compare.json,B/compare.json [--arms=...]

Writes both datasets (tools/make_synthetic_data.py: 8 sessions x 80 trials, seed 0; tools/make_independent_t15.py,
seed 0), prepares them once (tools/prepare_data.py, outside the timed runs), then trains `configs/demo.py` once per
(generator, arm, seed), one run after the other, through `python -m b2t_jax.main` (the flags of each arm are in
ARMS). Each run's val PER at every evaluation and the wall time from its launch (start-up, compilation and the
evaluations included: what a user waits) are read from its log. Prints a markdown table, and writes it with every
run's curve to WORKDIR/compare.md and WORKDIR/compare.json; the last stdout line is that JSON.

The table gives, per generator and arm, the mean val PER over the seeds (each seed in brackets) after each
evaluation step with the mean wall time, and the PER each arm had reached when the slowest GRU run finished (equal
wall-clock time on this machine): the arms run one after the other on the same cores, so equal wall time is equal
CPU time.
A run that fails is reported at the end (exit 1) without stopping the others; compare.md and compare.json are
rewritten after every run, so a comparison stopped part-way keeps the runs it finished.

`--from_runs` trains nothing: it tabulates the runs recorded in earlier compare.json files (comparisons run in
parts, e.g. one arm at a time) into WORKDIR. Their wall times were taken under whatever load each part had, so the
equal-time column compares parts only as well as their loads agree (each file's machine and loads are listed).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = {
  "gru": [],
  "transformer": ["--config.model.encoder=transformer"],
  "mamba2": ["--config.model.encoder=mamba2"],
  "transformer_masked": [
    "--config.model.encoder=transformer",
    "--config.aug.time_mask_fraction=0.4",
    "--config.aug.time_mask_max_bins=20",
  ],
  # The GRU with DCoND's diphone targets (issue 26): decoded as phoneme marginals, so its val PER is comparable.
  "diphone": ["--config.model.targets=diphone"],
}
GENERATORS = ("synthetic", "independent")

_EVAL_LINE = re.compile(r"^I(\d{4} \d\d:\d\d:\d\d\.\d+) .*\] step (\d+)  val PER ([0-9.]+)")


def _run(cmd: list[str], log: str | None = None) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  if log:  # written before the check: a run that fails before making its workdir still leaves its log
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w") as f:
      f.write(p.stderr)
  if p.returncode != 0:
    raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
  return p


def prepare(workdir: str, generator: str) -> str:
  """The prepared TFDS dataset of `generator` under WORKDIR/data (built once)."""
  hdf5, tfds = os.path.join(workdir, "data", generator, "hdf5"), os.path.join(workdir, "data", generator, "tfds")
  if os.path.isdir(tfds):
    return tfds
  py = sys.executable
  if generator == "synthetic":
    _run([py, "tools/make_synthetic_data.py", f"--out={hdf5}", "--sessions=8", "--trials_per_session=80", "--seed=0"])
  else:
    _run([py, "tools/make_independent_t15.py", f"--out={hdf5}", "--seed=0"])
  _run([py, "tools/prepare_data.py", f"--hdf5_dir={hdf5}", f"--data_dir={tfds}", "--config=configs/demo.py"])
  return tfds


def parse_curve(log_text: str, launched: datetime.datetime) -> list[dict]:
  """[{step, val_per, wall_s}] of every evaluation logged by a training run launched at `launched` (the absl
  prefix gives the month, day and time of each line)."""
  out = []
  for line in log_text.splitlines():
    m = _EVAL_LINE.match(line)
    if m:
      stamp = datetime.datetime.strptime(f"{launched.year}{m.group(1)}", "%Y%m%d %H:%M:%S.%f")
      out.append({"step": int(m.group(2)), "val_per": float(m.group(3)), "wall_s": (stamp - launched).total_seconds()})
  return out


def per_at(curve: list[dict], wall_s: float) -> float:
  """The val PER of the last evaluation finished by `wall_s` (the first one's if none was)."""
  done = [c for c in curve if c["wall_s"] <= wall_s]
  return (done[-1] if done else curve[0])["val_per"]


def table(runs: list[dict], arms: list[str], generators: list[str]) -> str:
  """The markdown table of the module docstring."""
  steps = sorted({c["step"] for r in runs for c in r["curve"]})
  head = ["generator", "arm"] + [f"step {s}" for s in steps] + ["at the GRU's wall time"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for gen in generators:
    mine = [r for r in runs if r["generator"] == gen]
    gru = [r for r in mine if r["arm"] == "gru"]
    budget = max(r["curve"][-1]["wall_s"] for r in gru) if gru else None  # when the last GRU run had finished
    for arm in arms:
      rs = [r for r in mine if r["arm"] == arm]
      if not rs:
        continue
      cells = []
      for s in steps:
        pts = [c for r in rs for c in r["curve"] if c["step"] == s]
        if not pts:
          cells.append("")
          continue
        pers = [p["val_per"] for p in pts]
        seeds = ", ".join(f"{p:.3f}" for p in pers)
        cells.append(f"{np.mean(pers):.3f} ({seeds}) {np.mean([p['wall_s'] for p in pts]) / 60:.1f} min")
      at = "" if budget is None else f"{np.mean([per_at(r['curve'], budget) for r in rs]):.3f}"
      lines.append("| " + " | ".join([gen, arm, *cells, at]) + " |")
  return "\n".join(lines)


def machine() -> str:
  model = ""
  try:
    with open("/proc/cpuinfo") as f:
      model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
  except OSError:
    pass
  return f"{model or platform.processor()}, {os.cpu_count()} cores"


def main(argv):
  del argv
  workdir = os.path.abspath(_WORKDIR.value)
  unknown = sorted(set(_ARMS.value) - set(ARMS)) + sorted(set(_GENS.value) - set(GENERATORS))
  if unknown:
    raise app.UsageError(f"unknown arms/generators {unknown}: arms are {list(ARMS)}, generators {list(GENERATORS)}")
  runs, failed = [], []
  load_before = os.getloadavg()[0]
  if _FROM.value:
    runs, sources = merged_runs(_FROM.value, _ARMS.value, _GENS.value)
    os.makedirs(workdir, exist_ok=True)
    text, info = write(workdir, runs, load_before, sources)
    print(text)
    print(json.dumps({**info, "runs": runs}))
    return
  for gen in _GENS.value:
    data = prepare(workdir, gen)
    for arm in _ARMS.value:
      for seed in _SEEDS.value:
        run_dir = os.path.join(workdir, "runs", f"{gen}_{arm}_seed{seed}")
        cmd = [
          sys.executable,
          "-m",
          "b2t_jax.main",
          "--config=configs/demo.py",
          f"--workdir={run_dir}",
          f"--config.data.data_dir={data}",
          f"--config.seed={seed}",
          f"--config.train.num_steps={_STEPS.value}",
          f"--config.optim.decay_steps={_STEPS.value}",
          f"--config.train.eval_every={_EVAL.value}",
          f"--config.train.checkpoint_every={_STEPS.value}",
          *ARMS[arm],
          *_EXTRA.value,
        ]
        if os.path.exists(run_dir):
          raise SystemExit(f"{run_dir} exists: give a new --workdir (runs are not resumed, their times would mix)")
        print(f"[{time.strftime('%H:%M:%S')}] {gen} {arm} seed {seed}", file=sys.stderr, flush=True)
        launched = datetime.datetime.now()
        try:
          p = _run(cmd, log=run_dir + ".log")
        except (SystemExit, OSError) as e:  # one failed run must not cost the hours of the others: reported at the end
          failed.append(f"{gen} {arm} seed {seed}: {str(e).splitlines()[0]} (log: {run_dir}.log)")
          print(f"  failed: {failed[-1]}", file=sys.stderr, flush=True)
          continue
        curve = parse_curve(p.stderr, launched)
        runs.append({"generator": gen, "arm": arm, "seed": int(seed), "command": " ".join(cmd[1:]), "curve": curve})
        print(f"  {curve[-1]}", file=sys.stderr, flush=True)
        text, info = write(workdir, runs, load_before)  # after every run: a stopped comparison keeps what it had
  if not runs:
    raise SystemExit("no run finished: " + "; ".join(failed))
  text, info = write(workdir, runs, load_before)
  print(text)
  print(json.dumps({**info, "runs": runs}))
  if failed:
    raise SystemExit(f"{len(failed)} run(s) failed (the table has the others): " + "; ".join(failed))


def merged_runs(paths: list[str], arms: list[str], generators: list[str]) -> tuple[list[dict], list[dict]]:
  """The runs of `arms` x `generators` recorded in the compare.json files `paths`, and each file's facts (command,
  machine, date, loads). A (generator, arm, seed) recorded twice is refused: which one to keep is the user's call."""
  runs, sources, seen = [], [], {}
  for path in paths:
    with open(path) as f:
      record = json.load(f)
    sources.append({"path": path, **{k: v for k, v in record.items() if k != "runs"}})
    for r in record["runs"]:
      if r["arm"] not in arms or r["generator"] not in generators:
        continue
      key = (r["generator"], r["arm"], r["seed"])
      if key in seen:
        raise SystemExit(f"{' '.join(map(str, key))} is recorded in both {seen[key]} and {path}: keep one")
      seen[key] = path
      runs.append(r)
  if not runs:
    raise SystemExit(f"no run of arms {arms} on generators {generators} in {paths}")
  return runs, sources


def write(workdir: str, runs: list[dict], load_before: float, sources: list[dict] | None = None) -> tuple[str, dict]:
  """Writes WORKDIR/compare.md and compare.json from the runs finished so far (or merged from `sources`); returns
  the table and the facts."""
  text = table(runs, _ARMS.value, _GENS.value)
  info = {
    "machine": machine(),
    "load_before": round(load_before, 2),
    "load_after": round(os.getloadavg()[0], 2),
    "date": time.strftime("%Y-%m-%d"),
    "command": " ".join(["python", "tools/compare_encoders.py", *sys.argv[1:]]),
  }
  if sources:
    info["sources"] = sources
  with open(os.path.join(workdir, "compare.md"), "w") as f:
    f.write(f"{text}\n\n{info}\n")
  with open(os.path.join(workdir, "compare.json"), "w") as f:
    json.dump({**info, "runs": runs}, f, indent=1)
  return text, info


if __name__ == "__main__":
  # Flags are defined only when run as a script: importing the module (the tests do) must not claim --workdir,
  # which b2t_jax.main defines in the same process.
  _WORKDIR = flags.DEFINE_string("workdir", None, "where data, runs and the table go", required=True)
  _SEEDS = flags.DEFINE_list("seeds", ["10", "11"], "model seeds (config.seed) per arm")
  _STEPS = flags.DEFINE_integer("num_steps", 1200, "training steps per run (the demo's schedule is fitted to it)")
  _EVAL = flags.DEFINE_integer("eval_every", 300, "validation cadence in steps")
  _ARMS = flags.DEFINE_list("arms", list(ARMS), f"arms to run, of {', '.join(ARMS)}")
  _GENS = flags.DEFINE_list("generators", list(GENERATORS), "synthetic (ours) and/or independent (another generator)")
  _EXTRA = flags.DEFINE_multi_string("flag", [], "extra --config.x=v flag for every run (repeatable)")
  _FROM = flags.DEFINE_list("from_runs", [], "compare.json files of earlier comparisons: tabulate them, train nothing")
  app.run(main)
