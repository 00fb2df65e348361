"""The launch script's dry run and the Colab notebook's cells, executed on CPU."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_SIZES, best_meta


def test_launch_script_dry_run_prints_the_gcloud_commands():
  p = subprocess.run(
    [
      "bash",
      "tools/launch_tpu_pod.sh",
      "--name=b2t",
      "--zone=us-central2-b",
      "--accelerator=v4-32",
      "--workdir=gs://bucket/run",
      "--data_dir=/mnt/t15",
      "--repo=https://example.org/b2t.git",
      "--dry-run",
      "--",
      "--config.train.num_steps=10",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert p.returncode == 0, p.stderr
  lines = p.stdout.splitlines()
  assert lines[0].startswith("gcloud compute tpus tpu-vm create b2t --zone=us-central2-b --accelerator-type=v4-32")
  assert "--worker=all" in lines[1] and "pip install" in lines[1] and "b2t.git" in lines[1]
  assert "--worker=all" in lines[2] and "b2t_jax.main" in lines[2] and "tpu_v4.py" in lines[2]
  assert "distributed=True" in lines[2] and "num_steps=10" in lines[2] and "gs://bucket/run" in lines[2]


def test_launch_script_requires_its_arguments():
  p = subprocess.run(
    ["bash", "tools/launch_tpu_pod.sh", "--zone=z", "--dry-run"], cwd=ROOT, capture_output=True, text=True
  )
  assert p.returncode == 2 and "--name is required" in p.stderr


def test_memory_report_fsdp_rows_spread_the_train_state(tmp_path):
  """memory_report's fsdp row holds a fraction of the replicated state per device; a bad --fsdp is refused."""
  cmd = [sys.executable, "tools/memory_report.py", "--config=configs/demo.py", "--meshes=8x1", "--time_bins=256"]
  sizes = [f"--config.{k}={v}" for k, v in TINY_SIZES.items() if k != "data.time_buckets"]
  p = subprocess.run(
    [*cmd, *sizes, "--fsdp=false,true", "--config.fsdp_min_size=512"], cwd=ROOT, capture_output=True, text=True
  )
  assert p.returncode == 0, p.stderr[-3000:]
  rows = {r["fsdp"]: r for r in map(json.loads, p.stdout.strip().splitlines())}
  replicated, split = rows[False], rows[True]
  assert replicated["mesh"] == split["mesh"] == [8, 1] and replicated["micro_batch_per_data_shard"] == 1
  # Each array of >= 512 elements is split 8 ways; the small ones (biases, h0, the Adam count) stay whole.
  assert replicated["state_bytes"] / 8 < split["state_bytes"] < replicated["state_bytes"] / 4
  assert 0 < split["per_device_total_bytes"] < replicated["per_device_total_bytes"]
  # tools/figures.py reads this output format for the README's memory table: one row per mesh and fsdp setting.
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import figures

  table = figures.table_memory({"m": figures.Record(" ".join(cmd), p.stdout, "", 0.0)}).splitlines()
  assert len(table) == 4 and table[2].startswith("| (8, 1) | off | 1 (accum 1) | custom |")
  assert f"| **{split['per_device_total_gib']:.2f} GiB** |" in table[3] and table[3].startswith("| (8, 1) | **on** |")
  bad = subprocess.run([*cmd, "--fsdp=yes"], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode != 0 and "each setting must be true or false, not 'yes'" in bad.stderr


@pytest.mark.slow
def test_colab_notebook_runs_on_cpu(tmp_path, prepared_dir):
  nb = json.load(open(os.path.join(ROOT, "tools", "colab_tpu.ipynb")))
  code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  runnable = [c for c in code if not c.startswith("# colab-only")]
  assert len(runnable) == len(code) - 1
  ns: dict = {}
  exec(runnable[0], ns)  # the settings cell, then shrink it for the test
  ns.update(
    DATA_DIR=prepared_dir,
    WORKDIR=str(tmp_path),
    NUM_STEPS=2,
    OVERRIDES={**TINY_SIZES, "optim.warmup_steps": 1, "optim.day_warmup_steps": 1},
  )
  for cell in runnable[1:]:
    exec(cell, ns)
  assert ns["result"]["step"] == 2
  # the last cell evaluates the best checkpoint: the PER training recorded when it chose that checkpoint
  recorded = best_meta(str(tmp_path))
  assert (ns["best"]["step"], ns["best"]["val_per"]) == (recorded["step"], recorded["val_per"])


def test_overfit_batch_trains_on_its_one_batch_and_reports_that_batchs_per(tiny, tmp_path):
  """tools/overfit_batch.py: importing it defines no flags; it steps on one batch (its loss falls from step to
  step at the peak LR, as a fixed batch's does) and reports the PER of that batch at the steps asked."""
  from absl import flags
  from test_train import live_lr

  sys.path.insert(0, os.path.join(ROOT, "tools"))
  defined = set(flags.FLAGS)
  import overfit_batch

  assert set(flags.FLAGS) == defined
  result = overfit_batch.overfit(live_lr(tiny), steps=4, every=2, workdir=str(tmp_path))
  assert [s for s, _ in result["per"]] == [0, 2, 4]
  losses = result["losses"]
  assert len(losses) == 4 and all(b < a for a, b in zip(losses, losses[1:])), losses
  assert all(0.5 < p <= 1.5 for _, p in result["per"]), result["per"]  # 4 steps: far from memorised
