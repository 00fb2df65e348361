"""What the benchmark scripts share to make their figures trustworthy: the machine's load around a run.

A figure taken while other jobs run is not a figure: the scripts record the 1-minute load average before and
after the timed work, probe the matmul peak on both sides of it (a busy machine slows the peak probe more than
the step, which inflates MFU), and warn on stderr when the machine was busy.
"""

from __future__ import annotations

import os
import sys

import numpy as np

DEFAULT_BUSY_LOAD = 0.5  # 1-minute load average above which a run is flagged as taken on a busy machine


def load_average() -> float:
  """The 1-minute load average (runnable processes, all cores together)."""
  return round(os.getloadavg()[0], 2)


def load_report(load_before: float, load_after: float, busy_load: float) -> dict:
  """JSON fields describing the load around a run; warns on stderr when it was busy before it started.

  Only the load before counts for `quiet`: after, the benchmark's own threads are part of the average."""
  quiet = load_before <= busy_load
  if not quiet:
    print(
      f"WARNING: load average {load_before} > {busy_load} before the run (cores: {os.cpu_count()}); "
      "other work shares the machine, so these timings are not quiet figures",
      file=sys.stderr,
    )
  return {
    "load_before": load_before,
    "load_after": load_after,
    "busy_load": busy_load,
    "quiet": quiet,
    "cpu_count": os.cpu_count(),
  }


def peak_report(before: float | None, after: float | None) -> tuple[float | None, dict]:
  """The peak to divide by (the larger probe: the attainable one) and the JSON fields of both probes."""
  probes = [p for p in (before, after) if p]
  peak = max(probes) if probes else None
  fields = {
    "peak_gflops_per_s_before": round(before / 1e9, 2) if before else None,
    "peak_gflops_per_s_after": round(after / 1e9, 2) if after else None,
  }
  return peak, fields


def step_figures(times: list[float], batch: int, flops: int) -> tuple[float, dict]:
  """The median step time (s) and the JSON fields of the timed steps: median/p90 ms, steps/s, trials/s, model
  FLOPs per step and the FLOP/s achieved."""
  step_s = float(np.median(times))
  return step_s, {
    "step_ms_median": round(1e3 * step_s, 2),
    "step_ms_p90": round(1e3 * float(np.percentile(times, 90)), 2),
    "steps_per_s": round(1 / step_s, 3),
    "trials_per_s": round(batch / step_s, 2),
    "model_flops_per_step": flops,
    "model_gflops_per_step": round(flops / 1e9, 2),
    "achieved_gflops_per_s": round(flops / step_s / 1e9, 2),
  }
