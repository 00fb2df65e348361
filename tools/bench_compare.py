"""`make bench`: b2t_jax against the PyTorch reference step on the same batch shapes, then the triple model.

  python tools/bench_compare.py --repeats=3 --steps=5

Runs tools/benchmark.py (gru_baseline) and tools/benchmark_torch.py alternately `repeats` times in fresh
processes (so neither inherits the other's warm caches or threads), prints every JSON line, then one summary line
with the step times, every per-pair ratio torch/jax and their median, the MFU of each, the load average
around every run and the share of the cores other processes used (or the hypervisor stole) during it; it warns
when any run shared the machine (then the figures are not quiet ones). Then times the
triple model at a reduced width and at full size with a small batch (b2t_jax only: the variant has no public
PyTorch source). Each child prints its own JSON line; this script only parses and aggregates them.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list[str]) -> dict:
  p = subprocess.run([sys.executable] + cmd, cwd=ROOT, capture_output=True, text=True)
  if p.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} failed with exit code {p.returncode}:\n{p.stderr[-3000:]}")
  line = [l for l in p.stdout.splitlines() if l.startswith("{")][-1]
  print(line, flush=True)
  return json.loads(line)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=3, help="alternating jax/torch pairs")
  p.add_argument("--steps", type=int, default=5, help="timed steps per run")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--time_bins", type=int, default=500)
  p.add_argument(
    "--busy_share",
    type=float,
    default=None,
    help="passed to every child: the others' + stolen share of the cores above which a run is not quiet",
  )
  p.add_argument("--skip_triple", action="store_true", help="only the baseline comparison")
  p.add_argument(
    "--triple_reduced_pool",
    type=int,
    default=4,
    help="reduced-width triple: average this many features per bin (noise width 14 * 512 / pool)",
  )
  p.add_argument("--triple_reduced_batch", type=int, default=8)
  p.add_argument("--triple_full_batch", type=int, default=2)
  args = p.parse_args()

  busy = [] if args.busy_share is None else [f"--busy_share={args.busy_share}"]
  common = [f"--steps={args.steps}", f"--time_bins={args.time_bins}", *busy]
  jax_cmd = [
    "tools/benchmark.py",
    "--config=configs/gru_baseline.py",
    f"--config.data.batch_size={args.batch}",
    "--tag=compare",
  ] + common
  torch_cmd = ["tools/benchmark_torch.py", f"--batch={args.batch}", "--tag=compare"] + common
  pairs = [(run(jax_cmd), run(torch_cmd)) for _ in range(args.repeats)]
  jax_ms = [j["step_ms_median"] for j, _ in pairs]
  torch_ms = [t["step_ms_median"] for _, t in pairs]
  ratios = [round(t / j, 3) for j, t in zip(jax_ms, torch_ms)]
  runs = [r for pair in pairs for r in pair]
  quiet = all(r["quiet"] for r in runs)
  if not quiet:
    print(
      "WARNING: some runs shared the machine with other work (see others_cpu_share, steal_share); "
      "rerun when it is quiet",
      file=sys.stderr,
    )
  print(
    json.dumps(
      {
        "summary": "gru_baseline train step, b2t_jax vs PyTorch",
        "batch": args.batch,
        "time_bins": args.time_bins,
        "jax_step_ms": jax_ms,
        "torch_step_ms": torch_ms,
        "speedup_per_pair": ratios,
        "speedup_median": round(statistics.median(ratios), 3),
        "jax_mfu_median": statistics.median(j["mfu"] for j, _ in pairs),
        "torch_mfu_median": statistics.median(t["mfu"] for _, t in pairs),
        "load_before": [r["load_before"] for r in runs],
        "load_after": [r["load_after"] for r in runs],
        "others_cpu_share": [r.get("others_cpu_share") for r in runs],
        "steal_share": [r.get("steal_share") for r in runs],
        "quiet": quiet,
      }
    ),
    flush=True,
  )

  if not args.skip_triple:
    run(
      [
        "tools/benchmark.py",
        "--config=configs/tpu_v4.py",
        "--config.model.dtype=float32",
        "--config.optim.grad_accum_steps=1",
        f"--config.data.feature_pool={args.triple_reduced_pool}",
        f"--config.data.batch_size={args.triple_reduced_batch}",
        "--tag=triple_reduced",
      ]
      + common
    )
    run(
      [
        "tools/benchmark.py",
        "--config=configs/tpu_v4.py",
        "--config.model.dtype=float32",
        "--config.optim.grad_accum_steps=1",
        f"--config.data.batch_size={args.triple_full_batch}",
        "--tag=triple_full",
        "--steps=2",
        "--warmup=1",
        f"--time_bins={args.time_bins}",
        *busy,
      ]
    )


if __name__ == "__main__":
  main()
