"""The command line as users script it: summary JSON, train then eval printing `val_per=` last."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.data.feature_pool=64", "--config.model.hidden=16", "--config.data.batch_size=8",
        "--config.data.days_per_batch=2", "--config.data.eval_batch_size=8", "--config.train.num_steps=3",
        "--config.train.eval_every=2", "--config.train.log_every=1", "--config.data.time_buckets=(256,512)"]


def _run(*args, cwd=ROOT):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  p = subprocess.run([sys.executable, "-m", "b2t_jax.main", *args], cwd=cwd, env=env, capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return p.stdout.strip().splitlines()


def test_summary_prints_parameter_counts_as_last_line(tmp_path):
  # run from another directory: the config must still find its base
  last = _run(f"--config={ROOT}/configs/tpu_v4.py", "--config.mode=summary", cwd=tmp_path)[-1]
  assert json.loads(last) == {"noise_model": 628475392, "clean_model": 37228073, "noisy_model": 21865001,
                              "total": 687568466}


def test_train_then_eval_from_the_command_line(tmp_path, synthetic_dir):
  common = ["--config=configs/demo.py", f"--workdir={tmp_path}", f"--config.data.data_dir={synthetic_dir}", *TINY]
  out = _run(*common)
  assert out[-1].startswith("final val_per=")
  last = _run(*common, "--config.mode=eval")[-1]
  assert last.startswith("val_per=")
  assert 0.0 <= float(last.split("=")[1]) <= 5.0
