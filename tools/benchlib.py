"""What the benchmark scripts share to make their figures trustworthy: the machine's load around a run.

A figure taken while other jobs run is not a figure: the scripts record the 1-minute load average before and
after the timed work, probe the matmul peak on both sides of it (a busy machine slows the peak probe more than
the step, which inflates MFU), and warn on stderr when the machine was busy.

"Busy" is judged by what other processes did while the figures were taken, where the OS says (Linux
/proc/stat): the share of all cores' time that went to someone else, and the share the hypervisor stole. The
load average cannot tell a benchmark's own just-finished predecessor (make bench runs them back to back) from a
stranger, since it decays over a minute; it is recorded, and judges only where /proc/stat is missing.
"""

from __future__ import annotations

import os
import sys

import numpy as np

DEFAULT_BUSY_LOAD = 0.5  # 1-minute load average above which a run is flagged busy (without /proc/stat)
DEFAULT_BUSY_SHARE = 0.03  # share of all cores' time taken by others (or stolen) above which a run is busy: 9.7%
# stolen made a measured gru_baseline step 20% slower; quiet runs here see 0.2-1.4%
_PROC_STAT = "/proc/stat"


def load_average() -> float:
  """The 1-minute load average (runnable processes, all cores together)."""
  return round(os.getloadavg()[0], 2)


def cpu_snapshot(proc_stat: str = _PROC_STAT) -> tuple[float, float, float, float] | None:
  """(busy, steal, total) seconds of all cores since boot from /proc/stat, and this process's own CPU seconds
  (all its threads); None where the file is missing (not Linux)."""
  try:
    with open(proc_stat) as f:
      fields = f.readline().split()
  except OSError:
    return None
  if not fields or fields[0] != "cpu":
    return None
  # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user and nice]
  ticks = [float(x) for x in fields[1:9]] + [0.0] * max(0, 9 - len(fields))
  user, nice, system, idle, iowait, irq, softirq, steal = ticks[:8]
  hz = os.sysconf("SC_CLK_TCK")
  own = os.times()
  busy = user + nice + system + irq + softirq
  return busy / hz, steal / hz, (busy + idle + iowait + steal) / hz, own.user + own.system


def others_share(before, after) -> dict:
  """JSON fields: the share of all cores' time between two `cpu_snapshot`s that other processes used
  (`others_cpu_share`) and the hypervisor stole (`steal_share`); empty where a snapshot is missing."""
  if before is None or after is None:
    return {}
  total = after[2] - before[2]
  if total <= 0:
    return {}
  others = (after[0] - before[0]) - (after[3] - before[3])
  return {
    "others_cpu_share": round(min(1.0, max(0.0, others / total)), 3),
    "steal_share": round(min(1.0, max(0.0, (after[1] - before[1]) / total)), 3),
  }


def load_report(
  load_before: float,
  load_after: float,
  busy_load: float,
  shares: dict | None = None,
  busy_share: float = DEFAULT_BUSY_SHARE,
) -> dict:
  """JSON fields describing the load around a run; warns on stderr when it was busy.

  With `shares` (from `others_share` over the run) `quiet` means other processes and the hypervisor together
  took at most `busy_share` of the machine; without, that the load average before the run was at most
  `busy_load` (after, the benchmark's own threads are part of the average)."""
  shares = shares or {}
  if shares:
    taken = shares["others_cpu_share"] + shares["steal_share"]
    quiet = taken <= busy_share
    why = (
      f"other processes used {shares['others_cpu_share']:.0%} and the hypervisor stole "
      f"{shares['steal_share']:.0%} of the {os.cpu_count()} cores' time during the run (> {busy_share:.0%})"
    )
  else:
    quiet = load_before <= busy_load
    why = f"load average {load_before} > {busy_load} before the run (cores: {os.cpu_count()})"
  if not quiet:
    print(f"WARNING: {why}; other work shares the machine, so these timings are not quiet figures", file=sys.stderr)
  return {
    "load_before": load_before,
    "load_after": load_after,
    "busy_load": busy_load,
    **shares,
    "busy_share": busy_share if shares else None,
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
    # 4 decimals: a tiny model on a loaded CPU achieves under 1 GFLOP/s, where 2 decimals moved MFU checks by 1%
    "achieved_gflops_per_s": round(flops / step_s / 1e9, 4),
  }
