"""Re-takes the README's CPU tables on this machine, each with the project's own commands.

  python tools/figures.py --list                                  # the jobs, what each re-takes, rough cost
  python tools/figures.py --only=bucketing,streaming [--workdir=/tmp/b2t_figures] [--readme]
  make figures                    # every job, pasted into README.md (FIGURES=a,b make figures: a subset)

A job runs the commands the README shows (`python -m b2t_jax.main ...`, `tools/*.py`) as subprocesses, parses
their output and renders one markdown table under a header naming the commands, the CPU model, the core count,
the date and the load average before and after. Each table goes to WORKDIR/figures/NAME.md; with --readme it also
replaces what README.md holds between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->` (nothing else).
Expensive steps (the demo's data, its trained workdir, its LM, ...) run once per invocation and are shared by the
jobs that need them; every step starts from an empty folder, so nothing of an earlier invocation is reused.
All jobs together take hours on 2 CPU cores (the training runs, `make bench`, the memory compiles and the
encoder comparison). `--quick` shrinks every size to check the plumbing in minutes: its tables are not figures,
and --readme refuses them. Every job saves its commands' output to WORKDIR/records/NAME.json; `--from_records`
renders the tables again from there without running anything (after fixing a parser, say). The TPU compiler's
table (tools/aot_compile.py) is not a CPU table and is not re-taken.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DEFAULT_WORKDIR = "/tmp/b2t_figures"
MARKER = re.compile(r"<!-- figures:([a-z0-9_]+) -->")
SIM8 = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}  # 8 simulated CPU devices (memory_report)

# --quick: training runs shrink to these config values (the data shrinks with QUICK_DATA).
TRAIN_QUICK = {
  "train.num_steps": 20,
  "optim.decay_steps": 20,
  "optim.warmup_steps": 5,
  "optim.day_warmup_steps": 5,
  "train.eval_every": 10,
  "train.log_every": 5,
  "train.checkpoint_every": 10,
  "model.hidden": 16,
}
# tools/benchmark.py's shape for every gru_baseline step table (encoder_speed, phases, levers), and its --quick one.
BENCH_SIZE = ["--config.data.batch_size=8", "--time_bins=500", "--steps=5"]
BENCH_SIZE_QUICK = ["--config.data.batch_size=2", "--time_bins=64", "--steps=1"]
QUICK_DATA = ["--sessions=4", "--trials_per_session=24"]  # days_per_batch 4 needs 4 sessions; calibration 20
DEMO_DATA = ["--sessions=8", "--trials_per_session=80", "--seed=0"]  # make demo's


# ---------------------------------------------------------------------------------------------------------------
# Running commands


@dataclasses.dataclass
class Record:
  """One command a job ran: how it is shown in the README, its output, wall time and files it wrote."""

  cmd: str
  stdout: str
  stderr: str
  seconds: float
  files: dict[str, str] = dataclasses.field(default_factory=dict)


class JobError(RuntimeError):
  """A command of a job failed; the message names the command and ends with its stderr."""


class Ctx:
  """The run's shared state: the workdir, --quick, and every command run so far (run once, then reused)."""

  def __init__(self, workdir: str, quick: bool, echo: bool = True):
    self.workdir, self.quick, self.echo = os.path.abspath(workdir), quick, echo
    self.done: dict[str, Record] = {}

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def q(self, full, quick):
    """`full`, or `quick` under --quick."""
    return quick if self.quick else full

  def run(
    self,
    name: str,
    args: list[str],
    env: dict[str, str] | None = None,
    fresh: tuple[str, ...] = (),
    files: dict[str, str] | None = None,
    drop_env: tuple[str, ...] = (),
  ) -> Record:
    """Runs `python ARGS` from the repository root once per invocation (a second call returns the first
    Record): `fresh` folders are deleted first, `files` (label -> path) are read after it ran."""
    if name in self.done:
      return self.done[name]
    for d in fresh:
      shutil.rmtree(d, ignore_errors=True)
    env = env or {}
    cmd = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), "python", shlex.join(args)])
    if self.echo:
      print(f"[{time.strftime('%H:%M:%S')}] {cmd}", file=sys.stderr, flush=True)
    # The command shown is the command run: no inherited XLA_FLAGS (e.g. simulated devices) changes its figures.
    inherited = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    full_env = {**inherited, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), **env}
    for k in drop_env:
      full_env.pop(k, None)
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    logs = self.path("logs")
    os.makedirs(logs, exist_ok=True)
    for ext, text in (("out", p.stdout), ("err", p.stderr)):
      with open(os.path.join(logs, f"{name}.{ext}"), "w", encoding="utf-8") as f:
        f.write(text)
    if p.returncode != 0:
      raise JobError(f"{cmd} failed with exit status {p.returncode} (logs in {logs}/{name}.*):\n{p.stderr[-3000:]}")
    read = {}
    for label, path in (files or {}).items():
      with open(path, encoding="utf-8") as f:
        read[label] = f.read()
    self.done[name] = Record(cmd, p.stdout, p.stderr, round(seconds, 1), read)
    return self.done[name]

  def train(self, name: str, workdir: str, data_dir: str, overrides: dict | None = None, config="demo") -> Record:
    """`python -m b2t_jax.main` training `configs/CONFIG.py` in a fresh `workdir`; under --quick with
    TRAIN_QUICK's sizes."""
    # An HDF5 tree as data_dir is prepared into cache_dir (a prepared dataset ignores it): keep it in the workdir.
    o = {"data.data_dir": data_dir, "data.cache_dir": self.path("cache"), **(overrides or {})}
    if self.quick:
      o.update(TRAIN_QUICK)
    args = ["-m", "b2t_jax.main", f"--config=configs/{config}.py", f"--workdir={workdir}"]
    return self.run(name, args + [f"--config.{k}={v}" for k, v in o.items()], fresh=(workdir,))

  def main(self, name: str, workdir: str, overrides: dict, files: dict | None = None, config="demo") -> Record:
    """`python -m b2t_jax.main` on a trained `workdir` in another mode (the quick sizes kept, as config.json
    records them; HDF5 trees it is given, e.g. calibration data, are prepared into WORKDIR/cache)."""
    o = {"data.cache_dir": self.path("cache"), **overrides, **(TRAIN_QUICK if self.quick else {})}
    args = ["-m", "b2t_jax.main", f"--config=configs/{config}.py", f"--workdir={workdir}"]
    return self.run(name, args + [f"--config.{k}={v}" for k, v in o.items()], files=files)


# The demo's data, trained workdir and LM: shared by the demo, permutation, words, calibration and ensemble jobs.


def demo_data(ctx: Ctx) -> dict[str, Record]:
  hdf5, tfds = ctx.path("demo", "hdf5"), ctx.path("demo", "tfds")
  data = ctx.q(DEMO_DATA, [*QUICK_DATA, "--seed=0"])
  return {
    "demo_data": ctx.run(
      "demo_data", ["tools/make_synthetic_data.py", f"--out={hdf5}", *data], fresh=(ctx.path("demo"),)
    ),
    "demo_prepare": ctx.run(
      "demo_prepare", ["tools/prepare_data.py", f"--hdf5_dir={hdf5}", f"--data_dir={tfds}", "--config=configs/demo.py"]
    ),
  }


def demo_train(ctx: Ctx) -> dict[str, Record]:
  recs = demo_data(ctx)
  recs["demo_train"] = ctx.train("demo_train", ctx.path("demo", "work"), ctx.path("demo", "tfds"))
  return recs


def demo_lm(ctx: Ctx) -> dict[str, Record]:
  recs = demo_data(ctx)
  out = ctx.path("demo", "lm.arpa")
  recs["demo_lm"] = ctx.run(
    "demo_lm", ["tools/build_lm.py", f"--data_dir={ctx.path('demo', 'hdf5')}", "--order=3", f"--out={out}"]
  )
  return recs


# ---------------------------------------------------------------------------------------------------------------
# Parsing what the commands print

_EVAL = re.compile(r"\] step (\d+)  val PER ([0-9.]+)(?: \(ensemble; members ([0-9. ]+)\))?  val loss ([0-9.naif]+)")
_LOG = re.compile(r"\] step (\d+)/\d+  loss \S+  ([0-9.]+) steps/s  ([0-9.]+) trial bins/s  padding (\d+)%")
_PER_DAY = re.compile(r"^\s+(\S+)\s+day\s+(\d+)\s+PER ([0-9.]+)$")
_CALIBRATED = re.compile(
  r"^calibrated (\S+) sentences=(\d+) per_before=([0-9.]+) per_after=([0-9.]+) seconds=([0-9.]+)$", re.M
)


def evals(log: str) -> list[dict]:
  """Every validation a training run logged: step, val PER, members' PERs (ensembles), val loss, per-day PER."""
  out, lines = [], log.splitlines()
  for i, line in enumerate(lines):
    m = _EVAL.search(line)
    if not m:
      continue
    per_day = {}
    for nxt in lines[i + 1 :]:
      d = _PER_DAY.match(nxt)
      if not d:
        break
      per_day[d.group(1)] = float(d.group(3))
    members = [float(v) for v in m.group(3).split()] if m.group(3) else []
    out.append(
      {
        "step": int(m.group(1)),
        "per": float(m.group(2)),
        "members": members,
        "loss": float(m.group(4)),
        "per_day": per_day,
      }
    )
  if not out:
    raise ValueError("no 'step N  val PER ...' line in the training log")
  return out


def log_rates(log: str) -> list[dict]:
  """Every train log line: step, steps/s, trial bins/s, padding share."""
  return [
    {"step": int(m.group(1)), "steps_s": float(m.group(2)), "bins_s": float(m.group(3)), "pad": int(m.group(4)) / 100}
    for m in map(_LOG.search, log.splitlines())
    if m
  ]


def key_values(text: str, first_key: str) -> dict[str, str]:
  """The key=value pairs of the last line of `text` that starts with `first_key=` (e.g. mode=infer's last line)."""
  lines = [line for line in text.splitlines() if line.startswith(first_key + "=")]
  if not lines:
    raise ValueError(f"no line starting with {first_key}= in the output")
  return dict(kv.split("=", 1) for kv in lines[-1].split() if "=" in kv)


def json_lines(text: str) -> list[dict]:
  return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def flag(cmd: str, name: str, default: str | None = None) -> str | None:
  """The value of `--name=VALUE` in a recorded command (the last one given)."""
  found = re.findall(rf"--{re.escape(name)}=(\S+)", cmd)
  return found[-1].strip("'\"") if found else default


def f3(v) -> str:
  return "n/a" if v in (None, "n/a") else f"{float(v):.3f}"


def duration(seconds: float) -> str:
  m, s = divmod(round(seconds), 60)
  return f"{m} min {s:02d} s" if m else f"{s} s"


def md(head: list[str], rows: list[list[str]]) -> str:
  return "\n".join(
    ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
  )


def curve_cells(ev: list[dict], steps: list[int], key: str = "per", member: int | None = None) -> list[str]:
  """Val PER at each of `steps` ('' where the run did not validate); the last bold."""
  by = {e["step"]: (e["members"][member] if member is not None else e[key]) for e in ev}
  cells = [f3(by[s]) if s in by else "" for s in steps]
  if cells and cells[-1]:
    cells[-1] = f"**{cells[-1]}**"
  return cells


def later_steps(*logs: list[dict]) -> list[int]:
  """Validation steps after the first (step 1 is untrained: PER ~1) seen in any of the runs."""
  return sorted({e["step"] for ev in logs for e in ev if e["step"] > 1})


# ---------------------------------------------------------------------------------------------------------------
# Jobs: run (commands, into records) and table (records -> markdown), kept apart so the parsers are testable


def run_demo(ctx: Ctx) -> dict[str, Record]:
  return demo_train(ctx)


def table_demo(r: dict[str, Record]) -> str:
  ev, rates = evals(r["demo_train"].stderr), log_rates(r["demo_train"].stderr)
  final = ev[-1]
  parts = [("data", "demo_data"), ("preparation", "demo_prepare"), ("training", "demo_train")]
  wall = sum(r[k].seconds for _, k in parts)
  return md(
    ["`make demo` (configs/demo.py)", "figure"],
    [
      [f"val PER at the end (step {final['step']})", f"**{f3(final['per'])}**"],
      ["val PER on the way", ", ".join(f"{f3(e['per'])} (step {e['step']})" for e in ev[1:-1]) or "-"],
      ["training speed (median of the log lines)", f"{statistics.median(x['steps_s'] for x in rates):.2f} steps/s"],
      [
        "wall time of its three commands (venv already built)",
        f"{duration(wall)} ({', '.join(f'{n} {duration(r[k].seconds)}' for n, k in parts)})",
      ],
    ],
  )


def run_permutation(ctx: Ctx) -> dict[str, Record]:
  recs = demo_train(ctx)
  shuf, indep = ctx.path("shuffled"), ctx.path("independent")
  data = ctx.q(DEMO_DATA, [*QUICK_DATA, "--seed=0"])
  recs["shuffled_data"] = ctx.run(
    "shuffled_data",
    ["tools/make_synthetic_data.py", f"--out={shuf}/hdf5", *data, "--permute_columns=1"],
    fresh=(shuf,),
  )
  recs["shuffled_train"] = ctx.train("shuffled_train", f"{shuf}/work", f"{shuf}/hdf5")
  recs["independent_data"] = ctx.run(
    "independent_data", ["tools/make_independent_t15.py", f"--out={indep}/hdf5"], fresh=(indep,)
  )
  recs["independent_train"] = ctx.train("independent_train", f"{indep}/work", f"{indep}/hdf5")
  return recs


def table_permutation(r: dict[str, Record]) -> str:
  runs = [
    ("`make demo`'s own synthetic data (t15 column order)", "demo_train"),
    ("the same trials with their 512 columns shuffled (`--permute_columns=1`)", "shuffled_train"),
    (
      "data from a different generator, `tools/make_independent_t15.py` (shares no code or design with ours)",
      "independent_train",
    ),
  ]
  ev = {k: evals(r[k].stderr) for _, k in runs}
  steps = later_steps(*ev.values())
  return md(
    ["data (configs/demo.py, `make demo`'s training command)"] + [f"val PER, step {s}" for s in steps],
    [[label, *curve_cells(ev[k], steps)] for label, k in runs],
  )


def _words_indep(ctx: Ctx) -> dict[str, Record]:
  base = ctx.path("words_indep")
  hdf5, work, lm = f"{base}/hdf5", f"{base}/work", f"{base}/lm.arpa"
  data = {"data.data_dir": hdf5, "data.cache_dir": ctx.path("cache")}
  recs = {
    "wi_data": ctx.run("wi_data", ["tools/make_independent_t15.py", f"--out={hdf5}", "--seed=7"], fresh=(base,)),
    "wi_train": ctx.train(
      "wi_train", work, hdf5, {"train.num_steps": 600, "optim.decay_steps": 600, "train.eval_every": 300}
    ),
    "wi_lm": ctx.run("wi_lm", ["tools/build_lm.py", f"--data_dir={hdf5}", "--order=3", f"--out={lm}"]),
  }
  for name, extra in (("wi_infer_novariants", {"decode.lexicon_variants": False}), ("wi_infer", {})):
    out = {"infer.out_dir": f"{work}/{name}"}
    recs[name] = ctx.main(name, work, {**data, "mode": "infer", "decode.lm_path": lm, **extra, **out})
  grid = ["--lm_weight=0.25,0.5,1,2", "--word_score=0,1,2,4", "--blank_penalty=0"]
  tune = [
    "tools/tune_decode.py",
    "--config=configs/demo.py",
    f"--workdir={work}",
    *(f"--config.{k}={v}" for k, v in data.items()),
  ]
  recs["wi_tune"] = ctx.run(
    "wi_tune", [*tune, f"--config.decode.lm_path={lm}", *grid, f"--out={base}/tune", *_quick_flags(ctx)]
  )
  return recs


def _quick_flags(ctx: Ctx) -> list[str]:
  """The quick sizes as flags for a tool that reads a trained workdir's config (its config.json must agree)."""
  return [f"--config.{k}={v}" for k, v in TRAIN_QUICK.items()] if ctx.quick else []


def table_words_independent(r: dict[str, Record]) -> str:
  per = evals(r["wi_train"].stderr)[-1]
  plain, variants = (
    key_values(r["wi_infer_novariants"].stdout, "greedy_per"),
    key_values(r["wi_infer"].stdout, "greedy_per"),
  )
  tune = r["wi_tune"].stdout
  best = re.search(r"best wer=([0-9.]+): (.*)", tune)
  points = re.search(r"(\d+) points on (\d+) val trials", tune)
  tuned = " ".join(f.replace("--config.decode.", "") for f in best.group(2).split() if "blank_penalty" not in f)

  def row(label, kv, lm=None):
    return [label, f3(kv["greedy_per"]), f3(kv["wer_no_lm"]), lm or f3(kv["wer_lm"]), f3(kv["oov_rate"])]

  return md(
    [
      f"lexicon (demo config, step {per['step']}, {points.group(2)} val trials)",
      "greedy PER",
      "WER, lexicon, no LM",
      "WER, lexicon + 3-gram LM",
      "OOV rate",
    ],
    [
      row(
        "CMUdict + pronunciations learned from the training trials (`--config.decode.lexicon_variants=False`)", plain
      ),
      row("+ the labels' spellings of CMUdict's words (`lexicon_variants`, the default)", variants),
      row(
        f"the same, LM weights tuned on this val split (`{tuned}`, best of {points.group(1)} points)",
        variants,
        f"**{f3(best.group(1))}**",
      ),
    ],
  )


def _words_demo(ctx: Ctx) -> dict[str, Record]:
  recs = {**demo_train(ctx), **demo_lm(ctx)}
  work, lm = ctx.path("demo", "work"), ctx.path("demo", "lm.arpa")
  base = {"data.data_dir": ctx.path("demo", "tfds"), "mode": "infer", "decode.lm_path": lm}
  recs["wd_auto"] = ctx.main("wd_auto", work, {**base, "infer.out_dir": f"{work}/infer_auto"})
  recs["wd_cmudict"] = ctx.main(
    "wd_cmudict",
    work,
    {**base, "decode.vocabulary": "cmudict", "decode.word_score": 4, "infer.out_dir": f"{work}/infer_cmudict"},
  )
  return recs


def table_words_demo(r: dict[str, Record]) -> str:
  rows = []
  for label, k in (
    ("the LM's words (`vocabulary=auto`, the default; scores 0)", "wd_auto"),
    ("all of CMUdict (`vocabulary=cmudict`, `word_score=4`)", "wd_cmudict"),
  ):
    kv = key_values(r[k].stdout, "greedy_per")
    rows.append([label, f3(kv["greedy_per"]), f3(kv["wer_no_lm"]), f"**{f3(kv['wer_lm'])}**"])
  per = evals(r["demo_train"].stderr)[-1]
  return md(
    [f"lexicon (the demo model, step {per['step']})", "greedy PER", "WER, lexicon, no LM", "WER, lexicon + 3-gram LM"],
    rows,
  )


def _rescoring(ctx: Ctx) -> dict[str, Record]:
  recs = {**demo_data(ctx), **demo_lm(ctx)}
  base, tfds, strong = ctx.path("rescore"), ctx.path("demo", "tfds"), ctx.path("demo", "lm.arpa")
  work, weak_txt, weak = f"{base}/work", f"{base}/weak.txt", f"{base}/weak.arpa"
  recs["r_train"] = ctx.train(
    "r_train", work, tfds, {"train.num_steps": 600, "optim.decay_steps": 600, "train.eval_every": 300}
  )
  code = (
    f"from b2t_jax.decoding import ngram; s=list(ngram.dataset_sentences({ctx.path('demo', 'hdf5')!r})); "
    f"open({weak_txt!r},'w').write('\\n'.join(s[::10])+'\\n')"
  )
  recs["r_weak_corpus"] = ctx.run("r_weak_corpus", ["-c", code])
  recs["r_weak_lm"] = ctx.run("r_weak_lm", ["tools/build_lm.py", f"--corpus={weak_txt}", "--order=2", f"--out={weak}"])
  first = {"data.data_dir": tfds, "decode.vocabulary": "train", "decode.lm_path": weak, "decode.nbest": 10}
  ngram = {"decode.rescore.kind": "ngram", "decode.rescore.path": strong}
  metrics = lambda out: {"metrics": f"{out}/metrics.json"}  # noqa: E731
  out = f"{work}/infer_default"
  recs["r_infer_default"] = ctx.main("r_infer_default", work, {**first, "mode": "infer", "infer.out_dir": out})
  out = f"{work}/infer_untuned_rescore"
  recs["r_infer_untuned"] = ctx.main(
    "r_infer_untuned",
    work,
    {
      **first,
      **ngram,
      "decode.rescore.weight": 1,
      "decode.rescore.word_bonus": 0,
      "mode": "infer",
      "infer.out_dir": out,
    },
    files=metrics(out),
  )
  grid = [
    "--lm_weight=0.5,1,2",
    "--word_score=0,2,4",
    "--blank_penalty=0",
    "--rescore_weight=0.5,1,2",
    "--rescore_word_bonus=0,2,4,6",
  ]
  recs["r_tune"] = ctx.run(
    "r_tune",
    [
      "tools/tune_decode.py",
      "--config=configs/demo.py",
      f"--workdir={work}",
      *(f"--config.{k}={v}" for k, v in {**first, **ngram}.items()),
      *grid,
      f"--out={base}/tune",
      *_quick_flags(ctx),
    ],
    files={"best": f"{base}/tune/best_overrides.txt"},
  )
  tuned = dict(f[len("--config.") :].split("=", 1) for f in recs["r_tune"].files["best"].split())
  out = f"{work}/infer_tuned"
  recs["r_infer_tuned"] = ctx.main(
    "r_infer_tuned", work, {**first, **ngram, **tuned, "mode": "infer", "infer.out_dir": out}, files=metrics(out)
  )
  margin = median_margin(f"{out}/trials.jsonl")
  out = f"{work}/infer_gated"
  recs["r_infer_gated"] = ctx.main(
    "r_infer_gated",
    work,
    {**first, **ngram, **tuned, "decode.rescore.gate_margin": margin, "mode": "infer", "infer.out_dir": out},
    files=metrics(out),
  )
  return recs


def median_margin(trials_jsonl: str) -> float:
  """The median first-pass margin (best minus second-best total) over the trials with two or more hypotheses,
  rounded to 2 decimals: the gate that rescores about half of them."""
  margins = []
  with open(trials_jsonl, encoding="utf-8") as f:
    for line in f:
      nb = json.loads(line).get("nbest") or []
      if len(nb) > 1:
        margins.append(nb[0]["total"] - nb[1]["total"])
  return round(statistics.median(margins), 2) if margins else 0.0


def table_rescoring(r: dict[str, Record]) -> str:
  kv = {
    k: key_values(r[k].stdout, "greedy_per")
    for k in ("r_infer_default", "r_infer_untuned", "r_infer_tuned", "r_infer_gated")
  }
  share = {
    k: json.loads(r[k].files["metrics"])["rescored_fraction"]
    for k in ("r_infer_untuned", "r_infer_tuned", "r_infer_gated")
  }
  cmd = r["r_infer_tuned"].cmd
  lm_w, ws = flag(cmd, "config.decode.lm_weight"), flag(cmd, "config.decode.word_score")
  rw, rb = flag(cmd, "config.decode.rescore.weight"), flag(cmd, "config.decode.rescore.word_bonus")
  gate = flag(r["r_infer_gated"].cmd, "config.decode.rescore.gate_margin")
  per = evals(r["r_train"].stderr)[-1]
  pct = lambda v: f"{100 * v:.0f}%"  # noqa: E731
  return md(
    [f"val split (demo config, step {per['step']}, val PER {f3(per['per'])})", "WER", "trials rescored"],
    [
      ["lexicon only, no LM", f3(kv["r_infer_default"]["wer_no_lm"]), "-"],
      [
        "first pass, weak bigram, default weights (`lm_weight=2`, `word_score=0`)",
        f3(kv["r_infer_default"]["wer_lm"]),
        "-",
      ],
      [
        f"first pass, weak bigram, tuned (`lm_weight={lm_w}`, `word_score={ws}`)",
        f3(kv["r_infer_tuned"]["wer_lm_first_pass"]),
        "-",
      ],
      [
        f"+ rescoring the 10-best with the 3-gram (`weight={rw}`, `word_bonus={rb}`), every trial",
        f"**{f3(kv['r_infer_tuned']['wer_lm'])}**",
        pct(share["r_infer_tuned"]),
      ],
      [
        f"+ the same, gated: `gate_margin={gate}` (the median first-pass margin)",
        f3(kv["r_infer_gated"]["wer_lm"]),
        pct(share["r_infer_gated"]),
      ],
      [
        "untuned rescoring (`weight=1`, `word_bonus=0`) on the untuned first pass",
        f3(kv["r_infer_untuned"]["wer_lm"]),
        pct(share["r_infer_untuned"]),
      ],
    ],
  )


def _decode_speed(ctx: Ctx) -> dict[str, Record]:
  recs = _rescoring(ctx)
  base, work = ctx.path("rescore"), ctx.path("rescore", "work")
  tuned = [f for f in recs["r_tune"].files["best"].split() if ".rescore." not in f]
  common = [
    "tools/benchmark_decode.py",
    "--config=configs/demo.py",
    f"--workdir={work}",
    f"--config.data.data_dir={ctx.path('demo', 'tfds')}",
    "--config.decode.vocabulary=train",
    f"--config.decode.lm_path={base}/weak.arpa",
    "--config.decode.nbest=10",
    *tuned,
    *_quick_flags(ctx),
  ]
  recs["ds_small"] = ctx.run(
    "ds_small",
    [
      *common,
      f"--ngram={ctx.path('demo', 'lm.arpa')}",
      f"--random_causal_lm={base}/gpt2_2x64",
      "--random_causal_lm_size=2x64",
      f"--out={base}/decode_small.json",
    ],
  )
  large = ctx.q("12x768", "2x128")
  recs["ds_large"] = ctx.run(
    "ds_large",
    [
      *common,
      f"--random_causal_lm={base}/gpt2_{large}",
      f"--random_causal_lm_size={large}",
      f"--out={base}/decode_large.json",
    ],
  )
  return recs


_MD_ROW = re.compile(r"^\| (.+?) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$")


def table_decode_speed(r: dict[str, Record]) -> str:
  rows, seen = [], set()
  for k in ("ds_small", "ds_large"):
    for m in map(_MD_ROW.match, r[k].stdout.splitlines()):
      if m and m.group(1) not in seen:
        seen.add(m.group(1))
        rows.append([m.group(1), m.group(2), m.group(3), m.group(4)])
  if not rows:
    raise ValueError("no timing rows in tools/benchmark_decode.py's output")
  firsts = [r[k].stdout.splitlines()[0] for k in ("ds_small", "ds_large")]  # trials, words, the load it ran under
  trials = re.match(r"(\d+) (\w+) trials", firsts[0])
  note = "; ".join(f"{name}: {line}" for name, line in zip(("first command", "second command"), firsts))
  return f"{note}\n\n" + md(
    [f"per trial ({trials.group(1)} {trials.group(2)} trials, one at a time)", "p50 ms", "p99 ms", "mean ms"], rows
  )


def _calibration(ctx: Ctx) -> dict[str, Record]:
  recs = demo_train(ctx)
  base, work = ctx.path("calibration"), ctx.path("demo", "work")
  tfds = ctx.path("demo", "tfds")
  trials = ctx.q("--trials_per_session=80", "--trials_per_session=24")
  first_data = True
  for day in (44, 20):
    recs[f"cal_day{day}_data"] = ctx.run(
      f"cal_day{day}_data",
      ["tools/make_synthetic_data.py", f"--out={base}/day{day}", f"--days={day}", trials],
      fresh=(base,) if first_data else (),
    )
    first_data = False
    for init in ("identity", "mean", "last"):
      out = f"{base}/day{day}_{init}"
      o = {
        "data.data_dir": tfds,
        "mode": "calibrate",
        "calibrate.data_dir": f"{base}/day{day}",
        "calibrate.out_dir": out,
        "calibrate.init": init,
      }
      if ctx.quick:
        o["calibrate.max_steps"] = 20
      files = None
      if day == 44 and init == "last":
        o["calibrate.curve"] = ctx.q("1,2,5,10,20,40", "1,2,5,10,20")
        files = {"curve": f"{out}/calibration.csv"}
      recs[f"cal_day{day}_{init}"] = ctx.main(f"cal_day{day}_{init}", work, o, files=files)
  return recs


def run_calibration(ctx: Ctx) -> dict[str, Record]:
  recs = _calibration(ctx)
  base = ctx.path("calibration")
  days = ctx.q("0,1,2,3,4,5,6,7,44", "0,1,2,3,44")
  trials = ctx.q("--trials_per_session=80", "--trials_per_session=24")
  recs["cal_nine_data"] = ctx.run(
    "cal_nine_data", ["tools/make_synthetic_data.py", f"--out={base}/nine/hdf5", f"--days={days}", trials, "--seed=0"]
  )
  recs["cal_nine_train"] = ctx.train("cal_nine_train", f"{base}/nine/work", f"{base}/nine/hdf5")
  return recs


def table_calibration(r: dict[str, Record]) -> str:
  rows = []
  for day in (44, 20):
    for init in ("identity", "mean", "last"):
      m = _CALIBRATED.search(r[f"cal_day{day}_{init}"].stdout)
      session, n, before, after, secs = m.groups()
      label = f"`{init}`" + (" (default)" if init == "last" else "")
      after = f"**{f3(after)}**" if init == "last" else f3(after)
      rows.append([f"day {day} ({session}), N = {n}", label, f3(before), after, f"{float(secs):.1f}"])
  nine = evals(r["cal_nine_train"].stderr)[-1]
  session = _CALIBRATED.search(r["cal_day44_last"].stdout).group(1)
  rows.append(
    [
      f"day 44 trained on as a further session of the demo (no calibration; step {nine['step']})",
      "",
      "",
      f3(nine["per_day"][session]),
      "",
    ]
  )
  per = evals(r["demo_train"].stderr)[-1]
  return md([f"new day (the demo model, step {per['step']})", "init", "PER before", "PER after", "fit seconds"], rows)


def run_calibration_curve(ctx: Ctx) -> dict[str, Record]:
  return _calibration(ctx)


def table_calibration_curve(r: dict[str, Record]) -> str:
  lines = r["cal_day44_last"].files["curve"].strip().splitlines()
  keys = lines[0].split(",")
  rows = [dict(zip(keys, line.split(","))) for line in lines[1:]]
  before = f3(rows[0]["per_before"])
  return md(
    ["N sentences (day 44, init `last`)"] + [row["n_sentences"] for row in rows],
    [
      [f"val PER after (before: {before})"] + [f3(row["per_after"]) for row in rows],
      ["fit seconds (the first fit compiles)"] + [f"{float(row['seconds']):.1f}" for row in rows],
    ],
  )


def run_ensemble(ctx: Ctx) -> dict[str, Record]:
  recs = {**demo_data(ctx), **demo_lm(ctx)}
  tfds, lm, k3 = ctx.path("demo", "tfds"), ctx.path("demo", "lm.arpa"), ctx.path("k3")
  recs["e_train"] = ctx.train("e_train", k3, tfds, {"train.n_models": 3})
  for m in (0, 1, 2, -1):
    name = f"e_infer_member{m}" if m >= 0 else "e_infer_ensemble"
    o = {
      "data.data_dir": tfds,
      "train.n_models": 3,
      "mode": "infer",
      "decode.lm_path": lm,
      "infer.member": m,
      "infer.out_dir": f"{k3}/{name}",
    }
    recs[name] = ctx.main(name, k3, o)
  recs["e_seed11"] = ctx.train("e_seed11", ctx.path("seed11"), tfds, {"seed": 11})
  return recs


def table_ensemble(r: dict[str, Record]) -> str:
  ev = evals(r["e_train"].stderr)
  steps = later_steps(ev)
  head = (
    ["K=3 demo"]
    + [f"val PER, step {s}" for s in steps]
    + ["greedy PER", "WER, lexicon, no LM", "WER, lexicon + 3-gram LM"]
  )
  rows = []
  for m in (0, 1, 2, -1):
    kv = key_values(r[f"e_infer_member{m}" if m >= 0 else "e_infer_ensemble"].stdout, "greedy_per")
    label = f"member {m} (seed {10 + m})" if m >= 0 else "**ensemble** (mean log-probabilities)"
    cells = curve_cells(ev, steps, member=m) if m >= 0 else curve_cells(ev, steps)
    rows.append([label, *cells, f3(kv["greedy_per"]), f3(kv["wer_no_lm"]), f3(kv["wer_lm"])])
  one, k3 = r["e_seed11"], r["e_train"]
  rate = lambda rec: statistics.median(x["steps_s"] for x in log_rates(rec.stderr))  # noqa: E731
  times = md(
    ["training run (same recipe)", "wall time", "steps/s (median of the log lines)", "val PER at the end"],
    [
      ["K=3 in one run (`--config.train.n_models=3`)", duration(k3.seconds), f"{rate(k3):.2f}", f3(ev[-1]["per"])],
      [
        "seed 11 alone (`--config.seed=11`)",
        duration(one.seconds),
        f"{rate(one):.2f}",
        f3(evals(one.stderr)[-1]["per"]),
      ],
      ["K=3 in one run / 3 × seed 11 alone", f"{k3.seconds / (3 * one.seconds):.2f}", "", ""],
    ],
  )
  return md(head, rows) + "\n\n" + times


ENCODERS = ("gru", "transformer", "mamba2")  # config.model.encoder, in the order the tables list them
# --quick: demo-size encoders (configs/demo.py's sub-configs), so the plumbing check stays minutes.
ENCODERS_QUICK = [
  "--config.model.hidden=32",
  "--config.model.n_layers=2",
  "--config.model.transformer.d_model=32",
  "--config.model.transformer.n_heads=2",
  "--config.model.transformer.d_ff=64",
  "--config.model.mamba2.d_model=32",
  "--config.model.mamba2.head_dim=16",
  "--config.model.mamba2.d_state=16",
]


def _encoder_runs(r: dict[str, Record], prefix: str) -> list[tuple[str, Record]]:
  """(encoder, record) of a job's per-encoder commands, in ENCODERS order (the encoder read from the command)."""
  runs = [(flag(rec.cmd, "config.model.encoder", "gru"), rec) for k, rec in r.items() if k.startswith(prefix)]
  return sorted(runs, key=lambda x: ENCODERS.index(x[0]) if x[0] in ENCODERS else len(ENCODERS))


_LATENCY = (
  r"median ([0-9.]+) ms, p90 ([0-9.]+) ms, p99 ([0-9.]+) ms, max ([0-9.]+) ms .*budget (\d+) ms: ([A-Za-z ]+) at p99"
)


def run_streaming(ctx: Ctx) -> dict[str, Record]:
  quick = ["--chunks=20", "--warmup=5", *ENCODERS_QUICK]
  recs = {}
  for enc in ENCODERS:  # the GRU's record keeps the plain name (and command) it always had
    name, flags = ("streaming", []) if enc == "gru" else (f"streaming_{enc}", [f"--config.model.encoder={enc}"])
    recs[name] = ctx.run(name, ["tools/benchmark_streaming.py", *flags, *ctx.q([], quick)])
  return recs


def table_streaming(r: dict[str, Record]) -> str:
  rows = []
  for enc, rec in _encoder_runs(r, "streaming"):
    out = rec.stdout
    model = re.search(r"model (\w+) \(([0-9,]+) params, dtype (\w+)\)", out)
    chunk = re.search(r"chunk (\d+) bins = (\d+) ms of signal, .*?, (\d+) timed chunks", out)
    lat = re.search(_LATENCY, out)
    diff = re.search(r"max \|diff\| (\S+) over (\d+) trial\(s\) of (\d+) bins", out)
    label = model.group(1) if enc == "gru" else f"{model.group(1)} model with the {enc} encoder"
    rows.append(
      [
        f"{label}, {model.group(2)} params, {model.group(3)}",
        f"{chunk.group(1)} bins = {chunk.group(2)} ms",
        chunk.group(3),
        *(f"{lat.group(i)} ms" for i in range(1, 5)),
        f"{lat.group(5)} ms: {lat.group(6)}",
        f"{diff.group(1)} ({diff.group(2)} trials of {diff.group(3)} bins)",
      ]
    )
  return md(
    [
      "model",
      "chunk",
      "timed chunks",
      "median",
      "p90",
      "p99",
      "max",
      "real-time budget (p99)",
      "streamed vs offline logits, max abs diff",
    ],
    rows,
  )


def run_encoder_speed(ctx: Ctx) -> dict[str, Record]:
  size = ctx.q(BENCH_SIZE, [*BENCH_SIZE_QUICK, *ENCODERS_QUICK])
  return {
    f"speed_{enc}": ctx.run(
      f"speed_{enc}",
      ["tools/benchmark.py", "--config=configs/gru_baseline.py", f"--config.model.encoder={enc}", *size],
    )
    for enc in ENCODERS
  }


def table_encoder_speed(r: dict[str, Record]) -> str:
  rows = []
  for _, rec in _encoder_runs(r, "speed_"):
    x = json_lines(rec.stdout)[-1]
    rows.append(
      [
        f"`{x['encoder']}`",
        f"{x['n_params']:,}",
        f"{x['compile_s']:.1f} s",
        f"{x['step_ms_median']:,.0f} ms",
        f"{x['global_batch'] * 1e3 / x['step_ms_median']:.1f}",
        f"{x['model_flops_per_step'] / 1e9:,.1f}",
        f"{x['mfu']:.2f} (peak {x['peak_gflops_per_s']:.0f} GFLOP/s)",
        f"{x['peak_memory_gib']:.1f} GiB RSS",
        "yes" if x["quiet"] else "**no**",
      ]
    )
  x = json_lines(next(iter(r.values())).stdout)[-1]
  return md(
    [
      f"encoder ({x['config'].removesuffix('.py')} train step, B={x['global_batch']}, T={x['time_bins']}, "
      f"{x['dtype']})",
      "parameters",
      "compile",
      f"step (median of {x['steps']})",
      "trials/s",
      "model GFLOP per step",
      "MFU",
      "peak memory",
      "quiet",
    ],
    rows,
  )


def run_bench(ctx: Ctx) -> dict[str, Record]:
  quick = ["--repeats=2", "--steps=1", "--batch=2", "--time_bins=64", "--skip_triple"]
  return {"bench": ctx.run("bench", ["tools/bench_compare.py", *ctx.q([], quick)])}


def table_bench(r: dict[str, Record]) -> str:
  lines = json_lines(r["bench"].stdout)
  summary = next(x for x in lines if "summary" in x)
  jax_runs = [x for x in lines if x.get("tool") == "b2t_jax" and x.get("tag") == "compare"]
  torch_runs = [x for x in lines if x.get("tool") == "torch"]
  b, t = summary["batch"], summary["time_bins"]

  def row(label, runs):
    ms = [x["step_ms_median"] for x in runs]
    med = statistics.median(ms)
    each = " / ".join(f"{v:,.0f}" for v in ms)
    quiet = "yes" if all(x["quiet"] for x in runs) else "**no**"
    peak = "–".join(sorted({f"{x['peak_gflops_per_s']:.0f}" for x in runs}))
    return [
      label,
      f"{med / 1e3:.2f} s ({each} ms)",
      f"{runs[0]['global_batch'] * 1e3 / med:.1f}",
      f"{statistics.median(x['mfu'] for x in runs):.2f} (peak {peak} GFLOP/s)",
      f"{max(x['peak_memory_gib'] for x in runs):.1f} GiB RSS",
      quiet,
    ]

  ratios = " / ".join(f"{v:.2f}" for v in summary["speedup_per_pair"])
  rows = [
    row(f"gru_baseline, B={b}, T={t} bins, b2t_jax", jax_runs),
    row(f"same, PyTorch {torch_runs[0]['torch']} (`torch.nn.GRU`, {torch_runs[0]['threads']} threads)", torch_runs),
    [f"**speed-up** (median of the per-pair ratios {ratios})", f"**{summary['speedup_median']:.2f}×**", "", "", "", ""],
  ]
  for tag, label in (
    ("triple_reduced", "triple, reduced width (features pooled)"),
    ("triple_full", "triple, full size"),
  ):
    runs = [x for x in lines if x.get("tag") == tag]
    if runs:
      x = runs[0]
      rows.append(row(f"{label}, B={x['global_batch']}, T={x['time_bins']}", runs))
  return md(["what (fp32)", "step, median (each run)", "trials/s", "MFU", "peak memory", "quiet"], rows)


def run_phases(ctx: Ctx) -> dict[str, Record]:
  size = ctx.q(
    [*BENCH_SIZE, "--phase_rounds=3"],
    [*BENCH_SIZE_QUICK, "--phase_rounds=1", "--config.model.hidden=32"],
  )
  return {"phases": ctx.run("phases", ["tools/benchmark.py", "--config=configs/gru_baseline.py", *size, "--phases"])}


PHASES = {
  "augment_smooth": "augmentation + smoothing",
  "forward": "forward (day layers, patching, GRU layers, head)",
  "ctc_share": "CTC loss (optax): forward+CTC minus forward",
  "backward_share": "backward: forward+CTC+backward minus forward+CTC",
  "optimizer": "optimizer (clip, two AdamW groups, non-finite guard, apply), alone",
  "gru_recurrences_forward": "GRU recurrences alone (all layers), forward",
  "gru_recurrences_forward_backward": "GRU recurrences alone, forward + backward",
  "gru_step_matmuls_only_forward": "the same loops with nothing but each step's recurrent matmul, forward",
  "gru_input_projections_forward": "GRU input projections alone (all layers), forward",
  "gru_input_projections_forward_backward": "GRU input projections alone, forward + backward",
}


def table_phases(r: dict[str, Record]) -> str:
  x = json_lines(r["phases"].stdout)[-1]
  ph = x["phases_ms"]
  rows = [[PHASES[k], f"{ph[k]:.0f}"] for k in PHASES if k in ph]
  rows.append([f"the whole train step (median of {x['steps']})", f"**{x['step_ms_median']:.0f}**"])
  quiet = "quiet" if x["quiet"] else "**not quiet**"
  return md(
    [
      f"part of the {x['config'].removesuffix('.py')} step (B={x['global_batch']}, T={x['time_bins']}; MFU "
      f"{x['mfu']:.2f} at peak {x['peak_gflops_per_s']:.0f} GFLOP/s; {quiet})",
      "ms",
    ],
    rows,
  )


# name -> (benchmark flags, what it is, kept?)
LEVERS = {
  "default": ([], "default: `gru_backward=custom`, `gru_unroll=1`", "yes"),
  "autodiff": (
    ["--config.model.gru_backward=autodiff"],
    "`gru_backward=autodiff` (JAX's transpose of the scan)",
    "no (the reference the tests compare against)",
  ),
  "unroll2": (["--config.model.gru_unroll=2"], "`gru_unroll=2`", "no"),
  "unroll4": (["--config.model.gru_unroll=4"], "`gru_unroll=4`", "no"),
  "remat": (["--config.model.gru_remat=True"], "`gru_remat=True`", "no"),
  "bf16": (["--config.model.dtype=bfloat16"], "`dtype=bfloat16`", "fp32 on CPU; bf16 in `tpu_v4.py`"),
  "wavefront": (
    ["--config.model.gru_wavefront=True"],
    "`gru_wavefront=True` (all layers in one scan of P+L-1 steps)",
    "no on CPU (a latency lever for accelerators)",
  ),
  "t512": (["--time_bins=512"], "padded to T=512 bins", "buckets"),
  "t1536": (["--time_bins=1536"], "padded to T=1536 bins", "buckets"),
}


def run_levers(ctx: Ctx) -> dict[str, Record]:
  base = ctx.q(BENCH_SIZE, [*BENCH_SIZE_QUICK, "--config.model.hidden=32"])
  levers = ctx.q(LEVERS, {k: LEVERS[k] for k in ("default", "autodiff")})
  recs = {}
  for rnd in range(ctx.q(3, 1)):  # rounds alternate the variants, so load that comes and goes falls on all
    for name, (flags, _, _) in levers.items():
      recs[f"lever_{name}_{rnd}"] = ctx.run(
        f"lever_{name}_{rnd}",
        ["tools/benchmark.py", "--config=configs/gru_baseline.py", *base, *flags, f"--tag={name}"],
      )
  return recs


def table_levers(r: dict[str, Record]) -> str:
  """Each variant against the default of the same round: the machine drifts between rounds (the first is often
  the slowest for every variant), so a ratio of medians taken from different rounds can show a gain that no round
  shows. A variant whose rounds disagree on the direction is reported as no consistent difference."""
  runs: dict[str, dict[int, dict]] = {}
  for k in r:
    if k.startswith("lever_"):
      x = json_lines(r[k].stdout)[-1]
      runs.setdefault(x["tag"], {})[int(k.rsplit("_", 1)[1])] = x
  rows = []
  for name, (_, label, kept) in LEVERS.items():
    if name not in runs:
      continue
    rounds = sorted(set(runs[name]) & set(runs["default"]))  # a round without its default has nothing to pair
    xs = [runs[name][rnd] for rnd in rounds]
    ms = statistics.median(x["step_ms_median"] for x in xs)
    each = " / ".join(f"{x['step_ms_median']:.0f}" for x in xs)
    ratios = [runs[name][rnd]["step_ms_median"] / runs["default"][rnd]["step_ms_median"] for rnd in rounds]
    ratio = statistics.median(ratios)
    span = f"ratios {min(ratios):.2f}–{max(ratios):.2f}" if len(ratios) > 1 else "1 round"
    if name == "default":
      vs = "—"
    elif all(q > 1 for q in ratios):
      vs = f"{ratio:.2f}× slower ({span})"
    elif all(q < 1 for q in ratios):
      vs = f"{1 / ratio:.2f}× faster ({span})"
    else:
      vs = f"no consistent difference ({span})"
    quiet = sum(x["quiet"] for x in xs)
    rows.append([label, f"{ms:.0f} ms ({each})", vs, f"{quiet} of {len(xs)}", kept])
  x = runs["default"][min(runs["default"])]
  return md(
    [
      f"variant ({x['config'].removesuffix('.py')} train step, B={x['global_batch']}, T={x['time_bins']} unless "
      "padded)",
      "step (median of the rounds; each round)",
      "vs default (median over the rounds of the time over that round's default)",
      "quiet rounds",
      "kept?",
    ],
    rows,
  )


def run_memory(ctx: Ctx) -> dict[str, Record]:
  cfg = [
    "tools/memory_report.py",
    *ctx.q(["--config=configs/tpu_v4.py"], ["--config=configs/demo.py", "--time_bins=64"]),
  ]
  runs = {
    "mem_meshes": ["--meshes=8x1,4x2,2x4", "--fsdp=false,true"],
    "mem_accum4": ["--meshes=8x1", "--fsdp=true", "--config.optim.grad_accum_steps=4"],
    "mem_autodiff": ["--meshes=8x1,4x2", "--config.model.gru_backward=autodiff"],
    "mem_remat": ["--meshes=8x1", "--config.model.gru_remat=True"],
  }
  if ctx.quick:
    runs = {
      "mem_meshes": ["--meshes=8x1,4x2", "--fsdp=false,true"],
      "mem_autodiff": ["--meshes=8x1", "--config.model.gru_backward=autodiff"],
    }
  return {name: ctx.run(name, [*cfg, *args], env=SIM8) for name, args in runs.items()}


GIB_32, GIB_16 = 32, 16  # HBM per chip of a v4 / v6e, and of a v5e (GiB)


def table_memory(r: dict[str, Record]) -> str:
  rows = []
  for rec in r.values():
    backward = flag(rec.cmd, "config.model.gru_backward", "custom")
    remat = flag(rec.cmd, "config.model.gru_remat", "False") == "True"
    for x in json_lines(rec.stdout):
      gru = f"{backward}{' + remat' if remat else ''}"
      total = x["per_device_total_gib"]
      mesh = f"({x['mesh'][0]}, {x['mesh'][1]})"
      rows.append(
        (
          x["mesh"],
          x["fsdp"],
          -x["micro_batch_per_data_shard"],
          backward != "custom",
          remat,
          [
            mesh,
            "**on**" if x["fsdp"] else "off",
            f"{x['micro_batch_per_data_shard']} (accum {x['grad_accum']})",
            gru if gru == "custom" else f"**{gru}**",
            f"{x['state_gib']:.2f} GiB",
            f"{x['temp_gib']:.2f} GiB",
            f"**{total:.2f} GiB**",
            "fits" if total <= GIB_32 else "no",
            "fits" if total <= GIB_16 else "no",
          ],
        )
      )
  x = json_lines(next(iter(r.values())).stdout)[0]
  rows.sort(key=lambda row: (-row[0][0], *row[1:5]))
  return md(
    [
      f"mesh (data, model) — {x['config'].removesuffix('.py')}, batch {x['batch']}, T={x['time_bins']}, {x['dtype']}",
      "fsdp",
      "micro-batch",
      "GRU backward",
      "train state per device",
      "temporaries",
      "total per device",
      "v4 / v6e (32 GiB)",
      "v5e (16 GiB)",
    ],
    [row[-1] for row in rows],
  )


BUCKET_SETS = "256;512;768;1024;1280;1536;1792;2048;3072,128;256;384;512;640;768;896;1024;1152;1280;1408;1536;2048;3072"


def run_bucketing(ctx: Ctx) -> dict[str, Record]:
  args = ["tools/bucketing_report.py", f"--buckets={BUCKET_SETS}", *ctx.q([], ["--batches=50"])]
  return {"bucketing": ctx.run("bucketing", args)}


_BUCKET_LINE = re.compile(
  r"buckets \(([0-9, ]+)\): padding waste ([0-9.]+)% of padded bins \(([0-9.]+)% if padded to each batch's own "
  r"max\); compiled shapes (\d+): \[[0-9, ]*\]; draws per trial cv ([0-9.]+), longer/shorter half ([0-9.]+)"
)


def table_bucketing(r: dict[str, Record]) -> str:
  rows, sampler = [], ""
  out = r["bucketing"].stdout
  for line in out.splitlines():
    if line.endswith(":") and not line.startswith(" "):
      sampler = line[:-1]
    m = _BUCKET_LINE.search(line)
    if m:
      rows.append([sampler, m.group(1), f"{m.group(2)}%", f"{m.group(3)}%", m.group(4), m.group(5), m.group(6)])
  about = "; ".join(out.splitlines()[:2])  # the tool's own description of the lengths and the batches
  return f"{about}\n\n" + md(
    [
      "batches",
      "buckets (bins)",
      "padding waste",
      "(padded to each batch's own max)",
      "compiled shapes",
      "draws per trial, cv",
      "longer / shorter half",
    ],
    rows,
  )


def run_length_aware(ctx: Ctx) -> dict[str, Record]:
  base = ctx.path("length_aware")
  hdf5, tfds = f"{base}/hdf5", f"{base}/tfds"
  recs = {
    "la_data": ctx.run(
      "la_data",
      [
        "tools/make_synthetic_data.py",
        f"--out={hdf5}",
        *ctx.q(["--sessions=8", "--trials_per_session=120"], QUICK_DATA),
        "--seed=0",
        "--length_profile=t15",
      ],
      fresh=(base,),
    ),
    "la_prepare": ctx.run(
      "la_prepare",
      ["tools/prepare_data.py", f"--hdf5_dir={hdf5}", f"--data_dir={tfds}", "--config=configs/gru_baseline.py"],
    ),
  }
  o = {
    "model.hidden": 128,
    "model.patch_features": 16,
    "data.batch_size": 16,
    "data.days_per_batch": 4,
    "data.eval_batch_size": 32,
    "data.time_buckets": "(128,256,384,512,640,768,896,1024,1152,1280,1408,1536,2048,3072)",
    "optim.warmup_steps": 50,
    "optim.day_warmup_steps": 50,
    "optim.decay_steps": 2000,
    "train.num_steps": 2000,
    "train.eval_every": 500,
    "train.checkpoint_every": 500,
  }
  recs["la_blind"] = ctx.train("la_blind", f"{base}/work_blind", tfds, o, config="gru_baseline")
  recs["la_aware"] = ctx.train(
    "la_aware", f"{base}/work_aware", tfds, {**o, "data.length_aware": True}, config="gru_baseline"
  )
  return recs


def table_length_aware(r: dict[str, Record]) -> str:
  runs = [("reference (length-blind)", "la_blind"), ("length-aware (window 0.1)", "la_aware")]
  ev = {k: evals(r[k].stderr) for _, k in runs}
  steps = later_steps(*ev.values())
  rows = []
  for label, k in runs:
    rates = log_rates(r[k].stderr)
    med = lambda key, rates=rates: statistics.median(x[key] for x in rates)  # noqa: E731
    rows.append(
      [
        label,
        *curve_cells(ev[k], steps),
        f"{ev[k][-1]['loss']:.1f}",
        duration(r[k].seconds),
        f"{med('steps_s'):.2f}",
        f"{med('bins_s'):,.0f}",
        f"{100 * med('pad'):.0f}%",
      ]
    )
  return md(
    ["batches"]
    + [f"val PER, step {s}" for s in steps]
    + ["val CTC loss at the end", "wall time (incl. evals)", "steps/s", "trial bins/s", "padding"],
    rows,
  )


def run_input(ctx: Ctx) -> dict[str, Record]:
  args = ctx.q(
    ["--steps=20", "--rounds=2"],
    ["--steps=2", "--rounds=1", "--batch=8", "--sessions=4", "--trials_per_session=8", "--workers=0,1"],
  )
  out = ctx.path("input")
  return {
    "input": ctx.run(
      "input",
      ["tools/benchmark_input.py", *args, "--demand_step_s=0.3515", "--demand_batch=512", f"--out={out}"],
      fresh=(out,),
    )
  }


def table_input(r: dict[str, Record]) -> str:
  out = r["input"].stdout
  x = json_lines(out)[-1]
  rows = [
    [row["loader"], str(row["workers"]), f"{row['first_s']:.1f} s", f"{row['ex_s']:.1f}", f"{row['mb_s']:.0f}"]
    for row in x["rows"]
  ]
  best = max(range(len(rows)), key=lambda i: x["rows"][i]["ex_s"])
  rows[best][3] = f"**{rows[best][3]}**"
  demand = re.search(r"demand: (\d+) examples/s per host \((.*)\); fastest here / demand = ([0-9.]+)", out)
  if demand:
    rows.append([f"demand: {demand.group(2)}", "", "", f"{demand.group(1)}", f"(fastest here: {demand.group(3)}×)"])
  about = re.search(r"(\d+) t15-profile trials \(mean (\d+) bins", out)
  return md(
    [
      f"loader ({about.group(1)} t15-profile trials, mean {about.group(2)} bins)",
      "workers",
      "first batch",
      "examples/s",
      "MB/s of padded features",
    ],
    rows,
  )


STARTUP = "import jax; jax.jit(lambda x: x + 1)(jax.numpy.ones(3))"


def run_startup(ctx: Ctx) -> dict[str, Record]:
  recs = {
    "libtpu": ctx.run(
      "libtpu",
      [
        "-c",
        "import importlib.metadata as m; print(next((d.version for d in m.distributions() "
        'if d.metadata["Name"] == "libtpu"), "none"))',
      ],
    )
  }
  for i in range(3):  # interleaved, so both see the same machine
    recs[f"startup_default_{i}"] = ctx.run(f"startup_default_{i}", ["-c", STARTUP], drop_env=("JAX_PLATFORMS",))
    recs[f"startup_cpu_{i}"] = ctx.run(f"startup_cpu_{i}", ["-c", STARTUP], env={"JAX_PLATFORMS": "cpu"})
  return recs


def table_startup(r: dict[str, Record]) -> str:
  libtpu = r["libtpu"].stdout.strip()
  rows = []
  for key, label in (("default", "JAX_PLATFORMS unset"), ("cpu", "`JAX_PLATFORMS=cpu`")):
    s = [r[k].seconds for k in sorted(r) if k.startswith(f"startup_{key}_")]
    rows.append([label, " / ".join(f"{v:.1f}" for v in s), f"{statistics.median(s):.1f}"])
  return md([f'`python -c "{STARTUP}"` (libtpu {libtpu})', "each run, s", "median, s"], rows)


def run_encoders(ctx: Ctx) -> dict[str, Record]:
  quick = [
    "--seeds=10",
    "--num_steps=20",
    "--eval_every=10",
    "--arms=gru,transformer",
    "--generators=synthetic",
    "--flag=--config.model.hidden=16",
    "--flag=--config.train.log_every=5",
    "--flag=--config.optim.warmup_steps=5",  # the demo's 50-step warm-ups must stay below 20 steps' decay
    "--flag=--config.optim.day_warmup_steps=5",
  ]
  out = ctx.path("encoders")
  return {
    "encoders": ctx.run("encoders", ["tools/compare_encoders.py", f"--workdir={out}", *ctx.q([], quick)], fresh=(out,))
  }


def table_encoders(r: dict[str, Record]) -> str:
  """tools/compare_encoders.py prints its own markdown table (before its JSON line): taken as it is."""
  rows = [line for line in r["encoders"].stdout.splitlines() if line.startswith("|")]
  if len(rows) < 3:
    raise ValueError("no table in tools/compare_encoders.py's output")
  return "\n".join(rows)


@dataclasses.dataclass(frozen=True)
class Job:
  name: str
  about: str
  cost: str  # rough wall time on 2 CPU cores
  run: Callable[[Ctx], dict[str, Record]]
  table: Callable[[dict[str, Record]], str]


JOBS = {
  j.name: j
  for j in [
    Job("demo", "make demo: val PER on the way and at the end, wall time, steps/s", "~10 min", run_demo, table_demo),
    Job(
      "permutation",
      "the demo recipe on shuffled columns and on another generator's data",
      "~25 min",
      run_permutation,
      table_permutation,
    ),
    Job(
      "words_independent",
      "lexicons on data with words CMUdict lacks (make_independent_t15 --seed=7)",
      "~15 min",
      _words_indep,
      table_words_independent,
    ),
    Job(
      "words_demo",
      "WER with and without the 3-gram LM on the demo model",
      "~5 min after demo",
      _words_demo,
      table_words_demo,
    ),
    Job(
      "rescoring",
      "n-best rescoring of a weak first pass (demo config, 600 steps)",
      "~20 min",
      _rescoring,
      table_rescoring,
    ),
    Job(
      "decode_speed",
      "per-trial time of the beam and the rescorers (tools/benchmark_decode.py)",
      "~10 min after rescoring",
      _decode_speed,
      table_decode_speed,
    ),
    Job(
      "calibration",
      "calibrating unseen days 44 and 20 on the demo model, each init",
      "~20 min after demo",
      run_calibration,
      table_calibration,
    ),
    Job(
      "calibration_curve",
      "day 44's PER after calibration against the number of sentences",
      "with calibration",
      run_calibration_curve,
      table_calibration_curve,
    ),
    Job(
      "ensemble",
      "K=3 demo ensemble: members and ensemble, PER and WER, wall time",
      "~30 min",
      run_ensemble,
      table_ensemble,
    ),
    Job(
      "streaming",
      "streaming latency per 80 ms chunk of each full-size encoder, and streamed vs offline logits",
      "~5 min",
      run_streaming,
      table_streaming,
    ),
    Job(
      "encoder_speed",
      "CPU train step of each encoder at the GRU baseline's size (tools/benchmark.py): time, MFU, memory",
      "~5 min",
      run_encoder_speed,
      table_encoder_speed,
    ),
    Job(
      "bench",
      "make bench: b2t_jax vs PyTorch on the gru_baseline step, then the triple model",
      "~15 min",
      run_bench,
      table_bench,
    ),
    Job(
      "phases",
      "where the gru_baseline step's time goes (tools/benchmark.py --phases)",
      "~5 min",
      run_phases,
      table_phases,
    ),
    Job(
      "levers",
      "the GRU implementation flags on the gru_baseline step, 3 alternating rounds",
      "~40 min",
      run_levers,
      table_levers,
    ),
    Job(
      "memory",
      "per-device memory of the tpu_v4 train step from XLA's CPU compiler (tools/memory_report.py)",
      "~1 h",
      run_memory,
      table_memory,
    ),
    Job(
      "bucketing",
      "padding waste of length bucketing, length-blind and length-aware batches",
      "~1 min",
      run_bucketing,
      table_bucketing,
    ),
    Job(
      "length_aware",
      "length-blind against length-aware batches, 2,000 training steps each",
      "~45 min",
      run_length_aware,
      table_length_aware,
    ),
    Job(
      "input",
      "host input pipelines (threads, Grain) in examples/s (tools/benchmark_input.py)",
      "~5 min",
      run_input,
      table_input,
    ),
    Job(
      "startup",
      "JAX start-up with libtpu installed, with and without JAX_PLATFORMS=cpu",
      "~1 min",
      run_startup,
      table_startup,
    ),
    Job(
      "encoders",
      "val PER against wall time per encoder on both generators (tools/compare_encoders.py)",
      "~4 h",
      run_encoders,
      table_encoders,
    ),
  ]
}


# ---------------------------------------------------------------------------------------------------------------
# Headers, the README, the command line


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
  """'MODEL NAME (family F, model M)' from /proc/cpuinfo (the family tells AMD generations apart, which the
  model name of a virtual machine often does not), else the platform's processor string."""
  info = {}
  try:
    with open(cpuinfo, encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
        if not line.strip():
          break
  except OSError:
    import platform  # noqa: PLC0415

    return platform.processor() or "unknown CPU"
  name = info.get("model name", "unknown CPU")
  if "cpu family" in info and "model" in info:
    name += f" (family {info['cpu family']}, model {info['model']})"
  return name


def header(name: str, meta: dict, records: dict[str, Record]) -> str:
  """The line above a table: how to re-take it, when, on what, under which load; then every command it ran."""
  warn = " **QUICK RUN (tiny sizes): not figures.**" if meta["quick"] else ""
  cmds = "\n".join(dict.fromkeys(r.cmd for r in records.values()))
  return (
    f"Taken by `python tools/figures.py --only={name}` on {meta['date']}: {meta['cpu']}, {meta['cores']} cores; "
    f"load average {meta['load_before']:.1f} before, {meta['load_after']:.1f} after.{warn} Its commands:\n\n"
    f"```bash\n{cmds}\n```"
  )


def render(name: str, saved: dict) -> str:
  """A job's README text (header and table) from what its run saved: {'meta': ..., 'records': ...}."""
  records = {k: Record(**v) for k, v in saved["records"].items()}
  return header(name, saved["meta"], records) + "\n\n" + JOBS[name].table(records) + "\n"


def markers(text: str) -> list[str]:
  """The job names of every `<!-- figures:NAME -->` in `text`, in order."""
  return MARKER.findall(text)


def replace_region(text: str, name: str, body: str) -> str:
  """`text` with what lies between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->` replaced by `body`
  (indented as the start marker is); the markers and everything outside them stay byte for byte."""
  start, end = f"<!-- figures:{name} -->", f"<!-- /figures:{name} -->"
  if text.count(start) != 1 or text.count(end) != 1:
    raise ValueError(
      f"README needs exactly one {start} and one {end} (found {text.count(start)} and {text.count(end)}): "
      "add the pair where the table belongs"
    )
  i, j = text.index(start) + len(start), text.index(end)
  if j < i:
    raise ValueError(f"{end} comes before {start} in the README")
  # Inside an indented block (a list item) the body takes the start marker's indentation, as the end marker has.
  indent = text[text.rfind("\n", 0, i) + 1 : i - len(start)]
  lines = [indent + line if line else "" for line in body.strip("\n").split("\n")]
  return text[:i] + "\n" + "\n".join(lines) + "\n" + indent + text[j:]


def run_job(job: Job, ctx: Ctx) -> dict:
  """Runs one job's commands; returns and saves (WORKDIR/records/NAME.json) its records and the run's facts."""
  before = os.getloadavg()[0]
  records = job.run(ctx)
  meta = {
    "date": datetime.date.today().isoformat(),
    "cpu": cpu_model(),
    "cores": os.cpu_count(),
    "load_before": round(before, 2),
    "load_after": round(os.getloadavg()[0], 2),
    "quick": ctx.quick,
  }
  saved = {"meta": meta, "records": {k: dataclasses.asdict(v) for k, v in records.items()}}
  os.makedirs(ctx.path("records"), exist_ok=True)
  with open(ctx.path("records", f"{job.name}.json"), "w", encoding="utf-8") as f:
    json.dump(saved, f, indent=1)
  return saved


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--list", action="store_true", help="list the jobs and exit")
  p.add_argument("--only", default="", help="comma-separated jobs to run (default: all)")
  p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="where data, runs, logs and tables go")
  p.add_argument("--readme", action="store_true", help="paste each table between its README markers")
  p.add_argument("--readme_path", default=README, help="the README to rewrite with --readme")
  p.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing; the tables are not figures")
  p.add_argument(
    "--from_records", action="store_true", help="re-render the tables from WORKDIR/records (no command is run)"
  )
  args = p.parse_args(argv)
  if args.list:
    for j in JOBS.values():
      print(f"{j.name:<18} {j.cost:<24} {j.about}")
    return 0
  names = [n.strip() for n in args.only.split(",") if n.strip()] or list(JOBS)
  unknown = [n for n in names if n not in JOBS]
  if unknown:
    p.error(f"--only: unknown job(s) {unknown}; the jobs are {', '.join(JOBS)} (--list describes them)")
  if args.readme and args.quick:
    p.error("--readme with --quick: quick tables are not figures; drop one of them")
  if args.readme:  # a missing marker must stop the run before its hours of commands, not after
    with open(args.readme_path, encoding="utf-8") as f:
      readme = f.read()
    for name in names:
      try:
        replace_region(readme, name, "")
      except ValueError as e:
        p.error(f"{args.readme_path}: {e}")
  ctx = Ctx(args.workdir, args.quick)
  failed = []
  for name in names:
    try:
      if args.from_records:
        with open(ctx.path("records", f"{name}.json"), encoding="utf-8") as f:
          saved = json.load(f)
      else:
        saved = run_job(JOBS[name], ctx)
      if args.readme and saved["meta"]["quick"]:
        raise ValueError("its records come from a --quick run: not figures, not pasted into the README")
      text = render(name, saved)
    except Exception as e:  # noqa: BLE001 - one job's failure must not cost the others (hours of runs)
      print(f"error: job {name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
      failed.append(name)
      continue
    os.makedirs(ctx.path("figures"), exist_ok=True)
    with open(ctx.path("figures", f"{name}.md"), "w", encoding="utf-8") as f:
      f.write(text)
    if args.readme:
      with open(args.readme_path, encoding="utf-8") as f:
        readme = f.read()
      with open(args.readme_path, "w", encoding="utf-8") as f:
        f.write(replace_region(readme, name, text))
    print(f"<!-- figures:{name} -->\n{text}<!-- /figures:{name} -->", flush=True)
  if failed:
    print(
      f"error: {len(failed)} job(s) failed: {', '.join(failed)} (their README regions are unchanged; a parsing "
      f"error can be fixed and re-rendered from {ctx.path('records')} with --from_records)",
      file=sys.stderr,
    )
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
