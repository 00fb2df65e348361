"""The benchmark's FLOP count against XLA's, and the two benchmark scripts end to end at test size."""

import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest
from conftest import ROOT, cpu_env

from b2t_jax import summary
from b2t_jax.models import create_model
from configs import default


@pytest.mark.parametrize("kind,patch_features", [("gru", 0), ("triple", 0), ("gru", 24), ("triple", 24)])
def test_analytic_forward_flops_match_xla_cost_analysis(kind, patch_features):
  c = default.get_config()
  c.model.kind, c.data.feature_pool, c.model.hidden, c.model.n_layers = kind, 16, 32, 2
  c.model.patch_features = patch_features
  t, b = 34, 2
  patches = (t - c.model.patch_size) // c.model.patch_stride + 1
  # XLA's cost analysis counts a while-loop body once, so unroll every scan fully for the comparison.
  c.model.gru_unroll = patches
  model = create_model(c)
  x, day = jnp.zeros((b, t, 32)), jnp.zeros((b,), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), x, day)
  kw = {"mode": "full"} if kind == "triple" else {}
  fwd = jax.jit(lambda p, x, d: model.apply(p, x, d, train=False, **kw))
  xla = fwd.lower(params, x, day).compile().cost_analysis()["flops"]
  analytic = b * summary.forward_flops(c, t)
  assert analytic <= xla <= 1.05 * analytic  # XLA adds the elementwise work (gates, softsign) on top


def _json_line(stdout: str) -> dict:
  return json.loads([l for l in stdout.splitlines() if l.startswith("{")][-1])


@pytest.mark.slow
def test_benchmark_scripts_agree_on_shapes_and_flops():
  env = cpu_env(2, fast_compile=False)
  sizes = dict(hidden=16, n_layers=2, batch=4, time_bins=40)
  jax_cmd = [
    sys.executable,
    "tools/benchmark.py",
    "--config=configs/gru_baseline.py",
    "--steps=2",
    "--warmup=1",
    "--matmul_n=256",
    f"--time_bins={sizes['time_bins']}",
    "--label_len=4",
    f"--config.model.hidden={sizes['hidden']}",
    f"--config.model.n_layers={sizes['n_layers']}",
    f"--config.data.batch_size={sizes['batch']}",
    "--phases",
    "--phase_rounds=1",
  ]
  torch_cmd = [
    sys.executable,
    "tools/benchmark_torch.py",
    "--steps=2",
    "--warmup=1",
    "--matmul_n=256",
    "--label_len=4",
  ] + [f"--{k}={v}" for k, v in sizes.items()]
  out, stdout_jax = {}, ""
  for name, cmd in (("jax", jax_cmd), ("torch", torch_cmd)):
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out[name] = _json_line(p.stdout)
    stdout_jax = p.stdout if name == "jax" else stdout_jax
  j, t = out["jax"], out["torch"]
  assert j["n_devices"] == 2 and j["global_batch"] == 4 and j["per_device_batch"] == 2 and j["time_bins"] == 40
  ph = j["phases_ms"]
  assert min(v for k, v in ph.items() if not k.endswith("_share")) > 0 and "gru_step_matmuls_only_forward" in ph
  assert ph["backward_share"] == pytest.approx(ph["forward_ctc_backward"] - ph["forward_ctc"], abs=0.02)
  # tools/figures.py reads this output format for the README's phases table (its rows: the parts, then the step).
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import figures

  rows = figures.table_phases({"phases": figures.Record("", stdout_jax, "", 0.0)}).splitlines()[2:]
  assert [r.split(" | ")[0].lstrip("| ") for r in rows][:2] == [
    figures.PHASES["augment_smooth"],
    figures.PHASES["forward"],
  ]
  assert rows[1].endswith(f"| {ph['forward']:.0f} |") and rows[-1].endswith(f"| **{j['step_ms_median']:.0f}** |")
  # Two independently written FLOP formulas (ours and the torch script's) agree on the same sizes.
  assert j["model_flops_per_step"] == t["model_flops_per_step"] > 0
  # ... and on the parameter count (the torch module's own numel() against our parameter tree).
  assert j["encoder"] == t["encoder"] == "gru" and j["n_params"] == t["n_params"] > 0, (j["n_params"], t["n_params"])
  for r in (j, t):
    assert r["step_ms_median"] > 0 and 0 < r["mfu"] < 1.5 and r["peak_memory_gib"] > 0
    assert math.isfinite(r["final_loss"])
    # Both peak probes are reported and MFU divides by the larger one; the load around the run is recorded.
    probes = (r["peak_gflops_per_s_before"], r["peak_gflops_per_s_after"])
    assert min(probes) > 0 and r["peak_gflops_per_s"] == pytest.approx(max(probes), abs=0.01)
    assert r["mfu"] == pytest.approx(r["achieved_gflops_per_s"] / r["peak_gflops_per_s"], rel=1e-2)
    assert r["load_before"] >= 0 and r["load_after"] >= 0
    if r["busy_share"] is None:  # no /proc/stat: the load average before the run judges
      assert r["quiet"] == (r["load_before"] <= r["busy_load"])
    else:  # quiet is judged by what other processes took during the run, not by the load average
      assert r["quiet"] == (r["others_cpu_share"] + r["steal_share"] <= r["busy_share"])


def test_busy_machine_is_flagged(capsys):
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import benchlib

  # Without /proc/stat figures: the load average before the run decides.
  assert benchlib.load_report(0.1, 1.7, busy_load=0.5)["quiet"] is True
  assert "WARNING" not in capsys.readouterr().err
  busy = benchlib.load_report(1.2, 1.9, busy_load=0.5)
  assert busy["quiet"] is False and busy["load_before"] == 1.2 and busy["load_after"] == 1.9
  assert "load average 1.2 > 0.5" in capsys.readouterr().err
  # With them, a high load average left by a finished predecessor does not count; others' CPU time does.
  # Snapshots: (busy, steal, total) seconds of all cores, own process CPU seconds.
  own_only = benchlib.others_share((100.0, 1.0, 400.0, 5.0), (118.0, 1.0, 420.0, 23.0))
  assert own_only == {"others_cpu_share": 0.0, "steal_share": 0.0}
  assert benchlib.load_report(1.9, 2.0, 0.5, own_only, busy_share=0.1)["quiet"] is True
  shared = benchlib.others_share((100.0, 1.0, 400.0, 5.0), (118.0, 2.0, 420.0, 14.0))
  assert shared == {"others_cpu_share": 0.45, "steal_share": 0.05}
  report = benchlib.load_report(0.0, 0.0, 0.5, shared, busy_share=0.1)
  assert report["quiet"] is False and report["others_cpu_share"] == 0.45
  assert "other processes used 45% and the hypervisor stole 5%" in capsys.readouterr().err
  assert benchlib.others_share(None, (1.0, 0.0, 2.0, 0.0)) == {}
  peak, fields = benchlib.peak_report(2e11, 3e11)
  assert peak == 3e11 and fields == {"peak_gflops_per_s_before": 200.0, "peak_gflops_per_s_after": 300.0}
  assert benchlib.peak_report(None, None)[0] is None


def test_other_process_cpu_time_is_seen(tmp_path):
  """A child spinning a core for the whole window shows up as others' CPU time; this process only sleeps. Our own
  spinning is counted as ours (os.times and /proc/stat in the same units), not as others'. (Linux, like every
  machine the project runs on: TPU VMs, CI.) Without a readable stat file there is no snapshot."""
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import benchlib

  assert benchlib.cpu_snapshot(str(tmp_path / "missing")) is None
  (tmp_path / "stat").write_text("intr 1 2 3\n")
  assert benchlib.cpu_snapshot(str(tmp_path / "stat")) is None
  before = benchlib.cpu_snapshot()
  t0 = time.process_time()
  while time.process_time() - t0 < 1.0:
    pass
  after = benchlib.cpu_snapshot()
  own, busy = after[3] - before[3], after[0] - before[0]
  assert 0.9 < own < 1.5 and busy > own - 0.1  # the machine's busy time includes ours
  spinner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 30: pass"])
  try:
    time.sleep(0.5)  # let it start spinning
    before = benchlib.cpu_snapshot()
    time.sleep(1.5)
    shares = benchlib.others_share(before, benchlib.cpu_snapshot())
  finally:
    spinner.kill()
    spinner.wait()
  # One spinning core of N is 1/N of the machine's time at least (more if other work runs too).
  assert shares["others_cpu_share"] >= 0.8 / os.cpu_count() - shares["steal_share"]
