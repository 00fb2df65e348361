"""Ahead-of-time compilation for a TPU slice you do not have: the TPU compiler (libtpu) runs on any machine.

`jax.experimental.topologies` describes the chips of a named TPU topology (compile-only devices); the
experiment's mesh, shardings and jitted steps are built on them from abstract shapes (nothing is
materialised) and compiled by the TPU compiler. Its memory analysis gives the per-chip argument, output,
temporary and code bytes, its cost analysis the step's FLOPs and bytes accessed per chip. A step whose
temporaries exceed a chip's HBM is refused by the compiler (RESOURCE_EXHAUSTED, with the figures); one that
compiles may still not fit once its arguments are added, which `fits` checks. tools/aot_compile.py is the
command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from b2t_jax import config_check, sharding, summary
from b2t_jax.decoding import streaming
from b2t_jax.experiment import Experiment

GIB = 1024**3

# Cloud TPU accelerator types (as `gcloud ... --accelerator-type` counts them) -> (topology, chip config). v4 and
# v5p run two TensorCores per chip as one device ('megacore'); v5e and v6e have one TensorCore per chip.
TOPOLOGIES = {
  "v4-8": ("v4:2x2x1", "megacore"),
  "v4-16": ("v4:2x2x2", "megacore"),
  "v4-32": ("v4:2x2x4", "megacore"),
  "v5e-4": ("v5e:2x2", "default"),
  "v5e-8": ("v5e:2x4", "default"),
  "v5e-16": ("v5e:4x4", "default"),
  "v5p-8": ("v5p:2x2x1", "megacore"),
  "v5p-16": ("v5p:2x2x2", "megacore"),
  "v6e-8": ("v6e:2x4", "default"),
}
# Chips per host where a slice's VMs hold more than libtpu's default 2x2x1 (a v5e-8 or v6e-8 is one VM of 8 chips);
# the hosts count in the report and in the per-process batch checks.
CHIPS_PER_HOST = {"v5e-8": (2, 4, 1), "v6e-8": (2, 4, 1)}


@dataclasses.dataclass(frozen=True)
class Chip:
  """Data-sheet figures of one chip (one JAX device): HBM and the dense bf16 peak."""

  hbm_bytes: int
  peak_flops: float  # bf16 FLOP/s


# By JAX device_kind, from the Cloud TPU system-architecture pages.
CHIPS = {
  "TPU v4": Chip(32 * GIB, 275e12),
  "TPU v5 lite": Chip(16 * GIB, 197e12),
  "TPU v5": Chip(95 * GIB, 459e12),  # v5p
  "TPU v6 lite": Chip(32 * GIB, 918e12),
}

LEVERS = (
  "levers: --config.fsdp=True (params and AdamW moments split over 'data'); --config.mesh_shape='(N,M)' "
  "(split the noise GRU over M chips); a smaller --config.data.batch_size or a larger "
  "--config.optim.grad_accum_steps (smaller micro-batches); --config.model.dtype=bfloat16; "
  "--config.model.gru_remat=True (recompute the GRU forward in the backward); or a slice with more chips"
)

_REFUSAL = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")
_OOM = re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm")
_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def resolve_topology(name: str) -> tuple[str, str]:
  """An accelerator type of TOPOLOGIES, or a raw topology such as 'v5e:2x2' -> (topology name, chip config)."""
  if name in TOPOLOGIES:
    return TOPOLOGIES[name]
  if re.fullmatch(r"v\d+[a-z]*:\d+(x\d+){1,2}", name):
    return name, "megacore" if name.startswith(("v4:", "v5p:")) else "default"
  raise ValueError(
    f"--topology={name!r}: give an accelerator type ({', '.join(TOPOLOGIES)}) or a topology such as 'v5e:2x2'"
  )


def _quiet_libtpu(accelerator: str) -> None:
  """Environment for loading libtpu only to compile: several processes may load it at once (its lock file guards
  a TPU, and there is none to guard); and where JAX is told to use the CPU, the attached-TPU fields libtpu asks
  the cloud metadata for get values, so it logs no errors about them. The named topology does not read them."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def topology_devices(name: str) -> list[jax.Device]:
  """The compile-only devices (one per chip) of a TPU topology; needs libtpu, not a TPU."""
  from jax.experimental import topologies

  topology, chip_config = resolve_topology(name)
  _quiet_libtpu(name if name in TOPOLOGIES else "v4-8")
  try:
    hosts = {"chips_per_host_bounds": list(CHIPS_PER_HOST[name])} if name in CHIPS_PER_HOST else {}
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name=chip_config, **hosts)
    return list(desc.devices)
  except (RuntimeError, ValueError) as e:
    if any(w in str(e).lower() for w in ("libtpu", "not installed", "backend")):
      raise RuntimeError(
        f"the TPU compiler is not available ({e}); install it with `pip install -e '.[tpu]'` (libtpu at the version "
        "the pinned jax expects)"
      ) from e
    raise


def bytes_per_chip(tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings: each leaf's shard, summed."""
  total = 0
  for a in jax.tree.leaves(tree):
    total += int(np.prod(a.sharding.shard_shape(a.shape), dtype=np.int64)) * np.dtype(a.dtype).itemsize
  return total


@dataclasses.dataclass
class StepReport:
  """What compiling one jitted step for the topology gave, per chip (bytes), or why it did not compile."""

  name: str
  arg_bytes: int  # from the shardings of the inputs: known even when the compiler refuses
  seconds: float = 0.0
  compiled: bool = False
  argument: int | None = None  # the compiler's figures from here on
  output: int | None = None
  temp: int | None = None
  alias: int | None = None
  code: int | None = None
  flops: float | None = None
  bytes_accessed: float | None = None
  error: str | None = None  # the compiler's message when it refused
  required_bytes: int | None = None  # parsed from a RESOURCE_EXHAUSTED message
  available_bytes: int | None = None

  @property
  def per_chip_bytes(self) -> int | None:
    """Arguments + outputs + temporaries - outputs aliased to (donated) arguments."""
    if not self.compiled:
      return None
    return self.argument + self.output + self.temp - self.alias

  def as_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "per_chip_bytes": self.per_chip_bytes}


def parse_refusal(message: str) -> tuple[int | None, int | None]:
  """(required, available) bytes from the TPU compiler's out-of-memory message; (None, None) if absent."""
  for pattern in (_REFUSAL, _OOM):
    m = pattern.search(message)
    if m:
      need, unit_need, have, unit_have = m.groups()
      return int(float(need) * _UNITS[unit_need]), int(float(have) * _UNITS[unit_have])
  return None, None


@contextlib.contextmanager
def heartbeat(what: str, every_s: float, out=sys.stderr):
  """Prints `what: N s` every `every_s` seconds while the body runs (TPU compiles of the full models take
  minutes); every_s <= 0 prints nothing."""
  stop = threading.Event()
  t0 = time.time()

  def beat():
    while not stop.wait(every_s):
      print(f"  ... {what}: {time.time() - t0:.0f} s", file=out, flush=True)

  thread = threading.Thread(target=beat, daemon=True) if every_s > 0 else None
  if thread:
    thread.start()
  try:
    yield
  finally:
    stop.set()
    if thread:
      thread.join()


@contextlib.contextmanager
def _no_persistent_cache():
  """JAX's persistent compilation cache off for the body: a compile-only executable cannot be stored or loaded
  (no TPU client), and each attempt logs a warning."""
  before = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", before)


def compile_step(name: str, jitted: Callable, args: Sequence[Any], progress_s: float = 30.0) -> StepReport:
  """Lowers `jitted` on the abstract `args` and compiles it with the TPU compiler, catching an out-of-memory
  refusal (RESOURCE_EXHAUSTED) into the report."""
  report = StepReport(name, bytes_per_chip(args))
  t0 = time.time()
  try:
    with heartbeat(f"compiling the {name} step", progress_s), _no_persistent_cache():
      compiled = jitted.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message:
      raise
    report.seconds = time.time() - t0
    report.error = message.strip().splitlines()[0]
    report.required_bytes, report.available_bytes = parse_refusal(message)
    return report
  report.seconds = time.time() - t0
  m = compiled.memory_analysis()
  report.compiled = True
  report.argument, report.output = m.argument_size_in_bytes, m.output_size_in_bytes
  report.temp, report.alias, report.code = m.temp_size_in_bytes, m.alias_size_in_bytes, m.generated_code_size_in_bytes
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, list) else cost
  report.flops, report.bytes_accessed = cost.get("flops"), cost.get("bytes accessed")
  return report


def _on(devices_sharding, tree: Any) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=devices_sharding), tree)


def stream_args(exp: Experiment, device: jax.Device) -> tuple[Callable, tuple]:
  """The jitted streaming step (as StreamingDecoder runs it: one trial on one chip) and its abstract inputs."""
  config = exp.config
  one = sharding.replicated(sharding.create_mesh((1, 1), devices=[device]))
  geo = streaming.geometry(config)
  step = streaming.step_fn(config, exp.model, geo)
  params = _on(one, exp.abstract_state().params)
  init = functools.partial(streaming.init_state, exp.model, geo=geo)
  state = jax.eval_shape(init if exp.n_models == 1 else jax.vmap(init), params)
  i32 = jax.ShapeDtypeStruct((), jnp.int32, sharding=one)
  chunk = jax.ShapeDtypeStruct((geo.chunk, geo.n_features), jnp.float32, sharding=one)
  jitted = jax.jit(step, in_shardings=one, out_shardings=one, donate_argnums=1)
  return jitted, (params, _on(one, state), chunk, i32, i32, i32)


STEPS = ("train", "eval", "stream")


def compile_for_topology(
  config: ml_collections.ConfigDict,
  topology: str,
  time_bins: int,
  steps: Sequence[str] = STEPS,
  progress_s: float = 30.0,
  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> dict[str, Any]:
  """Compiles `steps` of `config` for `topology` with the TPU compiler; returns the report (see `summarize`)."""
  unknown = [s for s in steps if s not in STEPS]
  if unknown:
    raise ValueError(f"--steps: unknown step(s) {unknown}; choose from {', '.join(STEPS)}")
  devices = topology_devices(topology)
  hosts = len({d.process_index for d in devices})
  config_check.validate(config, n_devices=len(devices), n_processes=hosts)
  kind = devices[0].device_kind
  t0 = time.time()
  exp = Experiment(config, mesh=sharding.create_mesh(config.mesh_shape, devices=devices))
  log(
    f"{topology}: {len(devices)} chips ({kind}) on {hosts} host(s), mesh {dict(exp.mesh.shape)}; "
    f"built the abstract state in {time.time() - t0:.1f} s. Each step compiles in seconds for small configs and "
    "in minutes for the full ones."
  )
  state = exp.abstract_state()
  d = config.data
  batch = lambda rows: _on(sharding.batch_sharding(exp.mesh), exp.example_batch(rows, time_bins))
  todo = {
    "train": lambda: (exp.train_step, (state, batch(d.batch_size))),
    "eval": lambda: (exp.eval_step, (state.params, batch(d.eval_batch_size))),
    "stream": lambda: stream_args(exp, devices[0]),
  }
  reports = {}
  for i, name in enumerate(steps):
    log(f"[{i + 1}/{len(steps)}] compiling the {name} step for {topology} ...")
    jitted, args = todo[name]()
    r = compile_step(name, jitted, args, progress_s)
    reports[name] = r
    if r.compiled:
      log(
        f"[{i + 1}/{len(steps)}] {name}: {r.seconds:.1f} s; per chip: arguments {r.argument / GIB:.2f} GiB, "
        f"outputs {r.output / GIB:.2f} GiB (aliased {r.alias / GIB:.2f}), temporaries {r.temp / GIB:.2f} GiB, "
        f"code {r.code / GIB:.3f} GiB -> {r.per_chip_bytes / GIB:.2f} GiB; {(r.flops or 0) / 1e12:.3f} TFLOP, "
        f"{(r.bytes_accessed or 0) / GIB:.2f} GiB accessed"
      )
    else:
      log(f"[{i + 1}/{len(steps)}] {name}: refused by the TPU compiler after {r.seconds:.1f} s: {r.error}")
  # XLA's cost analysis counts a loop body once, not once per iteration, so its FLOPs miss most of the GRU
  # recurrences; the analytic model FLOPs (summary.py) of the train step give the lower bound instead.
  model_flops = summary.train_step_flops(config, d.batch_size, time_bins) * exp.n_models / len(devices)
  return {
    "topology": topology,
    "topology_name": resolve_topology(topology)[0],
    "model_flops_per_chip": model_flops,
    "device_kind": kind,
    "chips": len(devices),
    "hosts": hosts,
    "mesh": [int(v) for v in exp.mesh.shape.values()],
    "time_bins": time_bins,
    "state_bytes": bytes_per_chip(state),
    "steps": reports,
  }


def summarize(report: dict[str, Any], hbm_bytes: int | None = None) -> dict[str, Any]:
  """The JSON summary of a `compile_for_topology` report against `hbm_bytes` per chip (default: the chip's
  data-sheet HBM). arg_bytes / per_chip_bytes are the train step's (else the first step's); `fits`: every
  compiled step's per-chip bytes are within HBM and none was refused; `step_lower_bound_s`: the train step's
  model FLOPs per chip over the chip's bf16 peak (no step runs faster)."""
  chip = CHIPS.get(report["device_kind"])
  hbm = hbm_bytes or (chip.hbm_bytes if chip else None)
  if hbm is None:
    raise ValueError(f"no HBM size known for {report['device_kind']}; give --hbm_gib")
  steps: dict[str, StepReport] = report["steps"]
  main = steps.get("train") or next(iter(steps.values()))
  fits = all(s.compiled and s.per_chip_bytes <= hbm for s in steps.values())
  bound = report["model_flops_per_chip"] / chip.peak_flops if chip else None
  return {
    **{k: v for k, v in report.items() if k != "steps"},
    "arg_bytes": main.arg_bytes,
    "per_chip_bytes": main.per_chip_bytes,
    "hbm_bytes": hbm,
    "fits": fits,
    "step_lower_bound_s": bound,
    "steps": {k: s.as_dict() for k, s in steps.items()},
  }


def shortfall(summary: dict[str, Any]) -> str:
  """The user-facing reason a summary does not fit: which step, how many bytes short, and the levers."""
  hbm = summary["hbm_bytes"]
  lines = []
  for name, s in summary["steps"].items():
    if not s["compiled"]:
      need = s["required_bytes"]
      over = (
        f"the temporaries alone exceed the chip by {(need - s['available_bytes']) / GIB:.2f} GiB, and " if need else ""
      )
      lines.append(
        f"the TPU compiler refused the {name} step on {summary['topology']} ({s['error'].rstrip('.')}): {over}"
        f"the arguments add {s['arg_bytes'] / GIB:.2f} GiB per chip"
      )
    elif s["per_chip_bytes"] > hbm:
      lines.append(
        f"the {name} step needs {s['per_chip_bytes'] / GIB:.2f} GiB per chip on {summary['topology']}, "
        f"{hbm / GIB:.2f} GiB of HBM: {(s['per_chip_bytes'] - hbm) / GIB:.2f} GiB short"
      )
  return "; ".join(lines) + ". " + LEVERS


def markdown_table(summaries: Sequence[dict[str, Any]]) -> str:
  """The README's table of tools/aot_compile.py JSON summaries (with 'config', 'fsdp' and 'encoder', the config's
  model.encoder, named after the config when it is not the GRU; rows without it are GRU rows): per chip, the train
  step's argument and temporary bytes (or the compiler's refusal), the total against HBM, the step's FLOP bound."""
  out = [
    "| config | slice (chips) | fsdp | arguments | temporaries | per chip | HBM | fits | compile | step ≥ |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in summaries:
    t = r["steps"].get("train") or next(iter(r["steps"].values()))
    if t["compiled"]:
      figures = f"{t['argument'] / GIB:.2f} GiB | {t['temp'] / GIB:.2f} GiB | **{r['per_chip_bytes'] / GIB:.2f} GiB**"
    else:
      need = f"{t['required_bytes'] / GIB:.2f} GiB" if t["required_bytes"] else "?"
      figures = f"{t['arg_bytes'] / GIB:.2f} GiB | refused: needs {need} | —"
    bound = f"{r['step_lower_bound_s'] * 1e3:.3g} ms" if r.get("step_lower_bound_s") else "—"
    name = r["config"].removesuffix(".py")
    if r.get("encoder", "gru") != "gru":
      name += f" ({r['encoder']})"
    out.append(
      f"| {name} | {r['topology']} ({r['chips']}) | {'on' if r['fsdp'] else 'off'} | "
      f"{figures} | {r['hbm_bytes'] / GIB:.0f} GiB | {'yes' if r['fits'] else '**no**'} | {t['seconds']:.0f} s | "
      f"{bound} |"
    )
  return "\n".join(out)
