"""tools/compare_encoders.py reads the val PER curve of each run from the trainer's absl log and tabulates it
(the table tools/figures.py pastes into the README): its parsing and table on log lines in the trainer's format."""

import datetime
import json
import os
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import compare_encoders as ce  # noqa: E402

# The trainer's lines (train.py logs "step N  val PER x  val loss y"), and a checkpoint line that repeats the PER
# in another format and must not count as an evaluation.
LOG = """I1206 20:40:05.000000 1 train.py:244] step 1  val PER 0.9877  val loss 87.491  (0 infeasible)
I1206 20:40:06.000000 1 checkpoint.py:85] new best checkpoint at step 1: val PER 0.9877, loss 87.4914
I1206 20:46:05.500000 1 train.py:244] step 301  val PER 0.5320  val loss 20.000  (0 infeasible)
I1206 20:52:05.000000 1 train.py:244] step 600  val PER 0.2550  val loss 10.000  (0 infeasible)
"""


def test_parse_curve_reads_each_evaluation_with_its_wall_time_from_launch():
  launched = datetime.datetime(2026, 12, 6, 20, 40, 0)
  curve = ce.parse_curve(LOG, launched)
  assert curve == [
    {"step": 1, "val_per": 0.9877, "wall_s": 5.0},
    {"step": 301, "val_per": 0.532, "wall_s": 365.5},
    {"step": 600, "val_per": 0.255, "wall_s": 725.0},
  ]
  assert ce.per_at(curve, 400.0) == 0.532 and ce.per_at(curve, 1.0) == 0.9877 and ce.per_at(curve, 1e9) == 0.255


def test_table_gives_seed_means_and_each_arm_at_the_grus_wall_time():
  def run(arm, seed, pers, walls):
    return {
      "generator": "synthetic",
      "arm": arm,
      "seed": seed,
      "curve": [{"step": s, "val_per": p, "wall_s": w} for s, p, w in zip((300, 600), pers, walls)],
    }

  runs = [
    run("gru", 10, (0.5, 0.3), (60, 120)),
    run("gru", 11, (0.7, 0.5), (60, 130)),  # the slowest GRU run sets the budget: 130 s, not the mean 125 s
    run("transformer", 10, (0.2, 0.1), (100, 200)),  # at 130 s it has only its step-300 PER
    run("transformer", 11, (0.4, 0.1), (100, 128)),  # ... and this one its step-600 PER
  ]
  lines = ce.table(runs, ["gru", "transformer", "mamba2"], ["synthetic"]).splitlines()
  assert lines[0] == "| generator | arm | step 300 | step 600 | at the GRU's wall time |"
  assert lines[2] == "| synthetic | gru | 0.600 (0.500, 0.700) 1.0 min | 0.400 (0.300, 0.500) 2.1 min | 0.400 |"
  assert lines[3] == "| synthetic | transformer | 0.300 (0.200, 0.400) 1.7 min | 0.100 (0.100, 0.100) 2.7 min | 0.150 |"
  assert len(lines) == 4  # an arm without runs (mamba2) gets no row


def test_from_runs_merges_comparisons_run_in_parts_and_refuses_a_run_recorded_twice(tmp_path):
  def part(name, arms, seeds=(10, 11)):
    runs = [
      {"generator": "synthetic", "arm": a, "seed": s, "curve": [{"step": 900, "val_per": 0.1 + s / 100, "wall_s": 60}]}
      for a in arms
      for s in seeds
    ]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"machine": "m", "load_before": 1.0, "command": name, "runs": runs}))
    return str(path)

  a, b = part("a", ["gru", "transformer"]), part("b", ["transformer_masked", "diphone"])
  runs, sources = ce.merged_runs([a, b], ["gru", "transformer_masked"], ["synthetic"])
  assert [(r["arm"], r["seed"]) for r in runs] == [
    ("gru", 10),
    ("gru", 11),
    ("transformer_masked", 10),
    ("transformer_masked", 11),
  ]
  assert [(s["path"], s["command"]) for s in sources] == [(a, "a"), (b, "b")]
  lines = ce.table(runs, ["gru", "transformer_masked"], ["synthetic"]).splitlines()
  assert lines[3] == "| synthetic | transformer_masked | 0.205 (0.200, 0.210) 1.0 min | 0.205 |"
  with pytest.raises(SystemExit, match="synthetic transformer 10 is recorded in both"):
    ce.merged_runs([a, part("c", ["transformer"], seeds=(10,))], ["transformer"], ["synthetic"])
  with pytest.raises(SystemExit, match="no run of arms"):
    ce.merged_runs([a], ["mamba2"], ["synthetic"])
