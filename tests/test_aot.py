"""Ahead-of-time compilation with the TPU compiler (libtpu) for a TPU slice this machine does not have."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_SIZES, as_flags, tiny_config

from b2t_jax import aot, summary

SLICE = "v5e-4"  # 4 single-core chips (v5e:2x2), 16 GiB each: the smallest multi-chip slice


def _aligned_config(fsdp: bool):
  """The tiny demo with 128 features per bin (a 45 x 128 x 128 day layer per front end), whose large arrays fill
  the TPU's (8, 128) tiles exactly, so the compiler's argument bytes are the shardings' bytes plus little padding."""
  c = tiny_config()
  c.data.feature_pool = 4
  c.model.patch_features = 8
  c.fsdp = fsdp
  c.fsdp_min_size = 2**14  # the day layers (737k elements) are split, the small GRUs stay whole
  return c


@pytest.fixture(scope="module")
def tiny_report():
  return aot.compile_for_topology(tiny_config(), SLICE, 256, progress_s=0)


@pytest.mark.slow
def test_train_eval_and_stream_steps_compile_for_a_tpu_slice_with_consistent_figures(tiny_report):
  s = aot.summarize(tiny_report)
  assert (s["chips"], s["hosts"], s["mesh"], s["device_kind"]) == (4, 1, [4, 1], "TPU v5 lite")
  assert s["hbm_bytes"] == 16 * aot.GIB and s["fits"] is True
  steps = s["steps"]
  assert set(steps) == {"train", "eval", "stream"} and all(r["compiled"] for r in steps.values())
  for r in steps.values():
    assert r["per_chip_bytes"] == r["argument"] + r["output"] + r["temp"] - r["alias"]
    assert r["flops"] > 0 and r["bytes_accessed"] > 0 and r["code"] > 0
  train = steps["train"]
  assert s["arg_bytes"] == train["arg_bytes"] and s["per_chip_bytes"] == train["per_chip_bytes"]
  # Every train argument is used, and the TPU pads small arrays to (8, 128) tiles: never fewer bytes than ours.
  assert train["argument"] >= train["arg_bytes"] > s["state_bytes"] > 0
  # The donated state comes back as the new state: nearly all of the output is aliased to the arguments.
  assert 0.99 * train["output"] <= train["alias"] <= min(train["argument"], train["output"])
  # The FLOP bound: the train step's model FLOPs (3 x forward, 8 trials of 256 bins) shared by 4 chips at the peak.
  flops = summary.train_step_flops(tiny_config(), 8, 256)
  assert s["model_flops_per_chip"] == flops / 4
  assert s["step_lower_bound_s"] == pytest.approx(flops / 4 / aot.CHIPS["TPU v5 lite"].peak_flops)
  # Against a smaller budget the same figures do not fit, and the message names the shortfall and the levers.
  small = aot.summarize(tiny_report, hbm_bytes=train["per_chip_bytes"] // 2)
  assert small["fits"] is False and small["per_chip_bytes"] == train["per_chip_bytes"]
  message = aot.shortfall(small)
  assert f"the train step needs {train['per_chip_bytes'] / aot.GIB:.2f} GiB per chip on {SLICE}" in message
  assert "--config.fsdp=True" in message and "grad_accum_steps" in message
  # The README table's rows: a fitting one with its figures, a refused one with the compiler's requirement.
  refused = {**small, "fits": False, "per_chip_bytes": None, "config": "demo.py", "fsdp": True}
  refused["steps"] = {"train": {**train, "compiled": False, "required_bytes": 20 * aot.GIB}}
  mamba = {**s, "config": "demo.py", "fsdp": False, "encoder": "mamba2"}
  rows = aot.markdown_table([{**s, "config": "demo.py", "fsdp": False}, refused, mamba]).splitlines()
  gib = aot.GIB
  assert rows[2] == (
    f"| demo | v5e-4 (4) | off | {train['argument'] / gib:.2f} GiB | {train['temp'] / gib:.2f} GiB | "
    f"**{train['per_chip_bytes'] / gib:.2f} GiB** | 16 GiB | yes | {train['seconds']:.0f} s | "
    f"{s['step_lower_bound_s'] * 1e3:.3g} ms |"
  )
  assert rows[3].startswith(
    f"| demo | v5e-4 (4) | on | {train['arg_bytes'] / gib:.2f} GiB | refused: needs 20.00 GiB |"
  )
  assert "| **no** |" in rows[3]
  assert rows[4].startswith("| demo (mamba2) | v5e-4 (4) | off |")  # the encoder is named unless it is the GRU


def test_fsdp_lowers_the_compilers_argument_bytes_as_the_shardings_predict():
  """config.fsdp splits each large parameter over the 4 chips of 'data': per chip, the compiler's argument bytes
  of the eval step (params + batch) drop by what the shardings predict, 3/4 of the split leaves."""
  off, on = (
    aot.compile_for_topology(_aligned_config(f), SLICE, 256, steps=("eval",), progress_s=0) for f in (False, True)
  )
  r_off, r_on = off["steps"]["eval"], on["steps"]["eval"]
  predicted = r_off.arg_bytes - r_on.arg_bytes
  assert predicted > 0.6 * r_off.arg_bytes  # the day layers dominate and are split 4 ways
  assert r_off.argument - r_on.argument == pytest.approx(predicted, rel=0.02)
  assert r_on.argument == pytest.approx(r_on.arg_bytes, rel=0.1)


def test_cli_reports_a_step_the_compiler_refuses_and_exits_1():
  sizes = {k: v for k, v in TINY_SIZES.items() if k != "data.time_buckets"}
  cmd = [sys.executable, "tools/aot_compile.py", "--config=configs/demo.py", f"--topology={SLICE}", "--steps=eval"]
  flags = [*as_flags(sizes), "--config.data.eval_batch_size=262144", "--time_bins=512", "--progress_s=0"]
  p = subprocess.run([*cmd, *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 1, p.stderr[-3000:]
  assert "Traceback" not in p.stderr and p.stdout.strip(), p.stderr[-3000:]
  s = json.loads(p.stdout.strip().splitlines()[-1])
  r = s["steps"]["eval"]
  assert s["fits"] is False and s["per_chip_bytes"] is None and not r["compiled"]
  assert r["required_bytes"] > r["available_bytes"] > 15 * aot.GIB and "RESOURCE_EXHAUSTED" in r["error"]
  # The arguments are known from the shardings though the compiler refused: the batch's 65,536 rows per chip.
  rows = 262144 // 4
  batch = rows * (512 * 8 * 4 + 4 + 64 * 4 + 4 + 4 + 4)  # features, n_time_steps, labels, label_lens, day, weight
  assert batch < s["arg_bytes"] == r["arg_bytes"] < batch + 10 * 2**20
  assert "error: the TPU compiler refused the eval step on v5e-4" in p.stderr
  over = (r["required_bytes"] - r["available_bytes"]) / aot.GIB
  assert f"the temporaries alone exceed the chip by {over:.2f} GiB" in p.stderr and "--config.fsdp=True" in p.stderr


def test_refusal_messages_of_both_forms_are_parsed():
  gib = aot.GIB
  need, have = aot.parse_refusal(
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (17.28G) "
    "exceeds available HBM (15.75G)."
  )
  assert (need, have) == (int(17.28 * gib), int(15.75 * gib))
  need, have = aot.parse_refusal(
    "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 21.95G of 15.48G hbm."
  )
  assert (need, have) == (int(21.95 * gib), int(15.48 * gib))
  assert aot.parse_refusal("RESOURCE_EXHAUSTED: something else") == (None, None)


def test_topology_names_map_to_cloud_tpu_slices():
  assert aot.resolve_topology("v4-8") == ("v4:2x2x1", "megacore")
  assert aot.resolve_topology("v5e-16") == ("v5e:4x4", "default")
  assert aot.resolve_topology("v5p:2x2x2") == ("v5p:2x2x2", "megacore")
  hosts = lambda name: len({d.process_index for d in aot.topology_devices(name)})
  assert (hosts("v4-8"), hosts("v5e-8"), hosts("v5e-16")) == (1, 1, 4)  # as Cloud TPU's VMs hold the chips
  with pytest.raises(ValueError, match="--topology='v9-8'"):
    aot.resolve_topology("v9-8")
