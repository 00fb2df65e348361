"""Shared fixtures. Eight simulated CPU devices stand in for a TPU slice (set before JAX is imported)."""

import collections
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings

# XLA's CPU collectives abort the whole process (LOG(FATAL) "Termination timeout ... exceeded") when one simulated
# device reaches a collective far later than the others; on 2 loaded cores the tests let them wait.
# Programs of a (4, 2) mesh deadlocked now and then: 7 devices waited in the all-gather (channel 1) inside the noise
# GRU's while loop while the 8th waited in a top-level all-to-all (channel 30) the others had not reached, and XLA's
# stack traces show those waits on the threads of XLA:CPU's intra-op pool (ThunkExecutor hands ready thunks to it,
# and a collective blocks its thread until every peer arrives). That pool has max(cores, devices) threads: 8 here,
# one per device, while each device can have two collectives in flight (the loop's and the top-level one, ordered
# by launch only), so once 8 waiting collectives hold all 8 threads, the peers they wait for sit in the pool's queue
# for ever. PJRT_NPROC (read by XLA's DefaultThreadPoolSize) sets the pool's size. Measured (the two mesh-shape tests
# alone, one after the other, `PJRT_NPROC=N pytest tests/test_sharding.py::test_same_updates_on_every_mesh_shape`):
# with 8 threads, 4 stalled runs in one try and 1 in the next; with 16 or 32, none in two tries each, in 42-48 s.
# It may not be the only cause: an earlier hang (the fsdp test, (4, 2)) was recorded with 8 device threads in three
# different collectives while the intra-op pool sat idle, which starvation does not explain. So the `isolated`
# machinery below stays as the net: those tests run in a child process whose collectives give up after
# ISOLATED_COLLECTIVE_FLAGS' shorter wait, XLA's message naming the collective and how many devices came is reported
# in a warning, and the test runs again; every run stalling, or any other failure, fails the test. The per-test
# timeout (pyproject.toml, thread method) turns any other hang into a failure with every thread's stack instead of
# holding CI to its deadline.
POOL_THREADS_PER_DEVICE = 4
MAX_TEST_DEVICES = 8  # the most simulated devices any test or its subprocesses uses
CPU_COLLECTIVE_FLAGS = (
  "--xla_cpu_collective_call_terminate_timeout_seconds=1800 --xla_cpu_collective_call_warn_stuck_timeout_seconds=600"
)


# The suite is bound by XLA's compile time, not by running its tiny programs: LLVM's optimisation level 0 compiled
# test_sharding's Mamba-2 mesh test in 44 s instead of 75 s (cold cache). The same setting ran the permutation
# module's training steps 3x slower, so programs that run for minutes compile at XLA's default level with
# `FAST_RUNTIME` (compiler_options, which override these flags per program).
# XLA:CPU's MLIR fusion emitters and its XNNPACK rewrites cost compile time too: without them test_sharding's fsdp
# test took 22 s instead of 29-36 s, the ensemble and wavefront tests 30 s instead of 42 s (one at a time, cold).
FAST_COMPILE_FLAGS = (
  "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  " --xla_cpu_use_fusion_emitters=false --xla_cpu_use_xnnpack=false"
)
FAST_RUNTIME = {
  "xla_backend_optimization_level": 2,
  "xla_llvm_disable_expensive_passes": False,
  "xla_cpu_use_fusion_emitters": True,
  "xla_cpu_use_xnnpack": True,
}


def xla_flags(devices: int, fast_compile: bool = True) -> str:
  """XLA_FLAGS for `devices` simulated CPU devices, with the collectives' patience and the fast compiles above."""
  fast = FAST_COMPILE_FLAGS if fast_compile else ""
  return f"--xla_force_host_platform_device_count={devices} {CPU_COLLECTIVE_FLAGS} {fast}".strip()


_RUNTIME_EXECUTABLES = {}  # lowered program text -> executable compiled with FAST_RUNTIME, for this process


def compiled_for_runtime(jitted):
  """`jitted` (a jax.jit function) compiled with FAST_RUNTIME, once per program: for a test's long loops. Runs that
  build the same program (the permutation module's five trainings, on new Experiments) share the executable."""
  import hashlib

  import jax  # after the environment above is set

  by_shapes = {}

  def call(*args):
    key = str([(getattr(a, "shape", None), getattr(a, "dtype", None)) for a in jax.tree.leaves(args)])
    if key not in by_shapes:
      lowered = jitted.lower(*args)
      text = hashlib.sha256(lowered.as_text().encode()).hexdigest()
      if text not in _RUNTIME_EXECUTABLES:
        _RUNTIME_EXECUTABLES[text] = lowered.compile(compiler_options=FAST_RUNTIME)
      by_shapes[key] = _RUNTIME_EXECUTABLES[text]
    return by_shapes[key](*args)

  return call


def cpu_env(devices: int, fast_compile: bool = True) -> dict:
  """This process's environment for a command-line run on `devices` simulated CPU devices (`fast_compile=False`:
  XLA's default optimisation, for the benchmark tools, whose figures describe optimised programs)."""
  return {**os.environ, "XLA_FLAGS": xla_flags(devices, fast_compile)}


os.environ.setdefault("XLA_FLAGS", xla_flags(MAX_TEST_DEVICES))
# Before JAX starts (read once, by every process the tests start too): the intra-op pool large enough that
# collectives waiting for their peers cannot take every thread (the deadlock described above).
os.environ.setdefault("PJRT_NPROC", str(POOL_THREADS_PER_DEVICE * MAX_TEST_DEVICES))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite runs on the CPU. With libtpu installed (the tpu extra, for tools/aot_compile.py) JAX would probe for a
# TPU in every process, this one and the command-line runs it starts, and log errors where there is none; the
# TPU compiler of tests/test_aot.py is reached through jax.experimental.topologies all the same.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same small programs, in-process and in the command-line runs they start (which inherit
# this environment): JAX's persistent compilation cache compiles each of them once per machine, not once per test.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "b2t_jax_tests_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from b2t_jax.data import batching, t15  # noqa: E402
from b2t_jax.data.synthetic import make_synthetic_dataset  # noqa: E402
from b2t_jax.data.t15 import T15_SESSIONS  # noqa: E402
from configs import demo  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
IN_CHILD = "B2T_TEST_ISOLATED_CHILD"  # set in the child process that runs an `isolated` test
# In an isolated test's child a collective waits at most this long for its peers: steps of the tests' tiny models
# take well under a second, so a peer this late is in another collective (the deadlock above), not slow.
ISOLATED_COLLECTIVE_FLAGS = (
  "--xla_cpu_collective_call_warn_stuck_timeout_seconds=20 --xla_cpu_collective_call_terminate_timeout_seconds=60"
)
XLA_GAVE_UP = "Termination timeout for"  # how XLA's rendezvous begins the message it exits with (rendezvous.cc)
ISOLATED_ATTEMPT_SECONDS = 240.0  # wall-clock limit of one run (a cold (4, 2) test takes ~30-110 s on 2 cores)
# Runs of an `isolated` test before stalls fail it (with the intra-op pool XLA sizes by default, the mesh-shape test
# stalled in 3 of its 5 runs beside another (4, 2) test, the fsdp test in 1 of 5).
ISOLATED_ATTEMPTS = 6
OUTPUT_TAIL = 8000  # characters of a child's output shown in a failure or a warning
ABORT_GRACE_SECONDS = 30.0  # after SIGABRT, how long a stopped child may take to print its stacks before SIGKILL


def _tree_cpu_seconds(root: int) -> float | None:
  """CPU time (user + system, reaped children included) of process `root` and every live descendant, from /proc;
  None once `root` is gone."""
  stats = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          rest = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ... (proc(5))
      except (OSError, IndexError):
        continue
      stats[int(entry)] = (int(rest[1]), sum(int(x) for x in rest[11:15]))  # utime, stime, cutime, cstime
  if root not in stats:
    return None
  total, frontier = 0, [root]
  while frontier:
    pid = frontier.pop()
    total += stats[pid][1]
    frontier += [child for child, (ppid, _) in stats.items() if ppid == pid]
  return total / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class WatchedRun:
  returncode: int | None  # None: stopped by the watchdog
  output: str  # stdout and stderr together
  why: str = ""  # why the watchdog stopped it


def run_watched(
  cmd: list[str], *, stall_seconds: float, wall_seconds: float = float("inf"), poll_seconds: float = 2.0, **popen
) -> WatchedRun:
  """Runs `cmd` in its own session and stops it once its process tree's CPU time has not moved for
  `stall_seconds`, or after `wall_seconds`. SIGABRT first, so that a Python child with PYTHONFAULTHANDLER set
  prints every thread's stack, then SIGKILL for the whole group."""
  with tempfile.TemporaryFile("w+") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen)
    start = last_change = time.monotonic()
    last_cpu, why = -1.0, ""
    while proc.poll() is None:
      time.sleep(poll_seconds)
      cpu, now = _tree_cpu_seconds(proc.pid), time.monotonic()
      if cpu is not None and cpu != last_cpu:
        last_cpu, last_change = cpu, now
      elif now - last_change > stall_seconds:
        why = f"no CPU time for {stall_seconds:.0f} s"
      if now - start > wall_seconds:
        why = f"still running after {wall_seconds:.0f} s"
      if why and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGABRT)
        try:
          proc.wait(ABORT_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
          pass
        try:
          os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
        proc.wait()
        break
      why = ""
    log.seek(0)
    return WatchedRun(None if why else proc.returncode, log.read(), why)


def run_isolated(
  nodeid: str,
  rootdir: str,
  *,
  stall_seconds: float = ISOLATED_ATTEMPT_SECONDS,
  wall_seconds: float = ISOLATED_ATTEMPT_SECONDS,
  attempts: int = ISOLATED_ATTEMPTS,
  poll_seconds: float = 2.0,
):
  """Runs the test `nodeid` alone in a child pytest under `run_watched`, its collectives' wait shortened. A run
  stopped by the watchdog, or one XLA ended because a collective's peers never came, is reported in a warning and
  the test runs again, up to `attempts` runs in all; any other failure fails the test with the child's output."""
  # --capture=sys: what XLA writes to file descriptor 2 before it exits reaches the output (fd capture loses it)
  cmd = [sys.executable, "-m", "pytest", "-q", "--capture=sys", "-p", "no:cacheprovider", "-p", "no:xdist", nodeid]
  flags = f"{os.environ.get('XLA_FLAGS', '')} {ISOLATED_COLLECTIVE_FLAGS}".strip()  # the last value of a flag wins
  env = {**os.environ, IN_CHILD: "1", "PYTHONFAULTHANDLER": "1", "XLA_FLAGS": flags}
  for attempt in range(1, attempts + 1):
    # its own temporary root: the child's numbered pytest-N folders would otherwise crowd the parent's
    with tempfile.TemporaryDirectory(prefix="b2t_isolated_") as basetemp:
      base = ["--basetemp", os.path.join(basetemp, "t")]
      watch = {"stall_seconds": stall_seconds, "wall_seconds": wall_seconds, "poll_seconds": poll_seconds}
      run = run_watched(cmd + base, **watch, env=env, cwd=rootdir)
    if run.returncode == 0:
      return
    gave_up = run.returncode == -signal.SIGABRT and XLA_GAVE_UP in run.output  # LOG(FATAL) aborts
    if run.returncode is not None and not gave_up:
      pytest.fail(f"{nodeid} failed in its child process:\n{run.output[-OUTPUT_TAIL:]}", pytrace=False)
    why = run.why or "XLA ended it: a collective's peers never came"
    warnings.warn(
      f"{nodeid}: run {attempt} of {attempts} stalled ({why}; the XLA:CPU collective deadlock described in "
      f"tests/conftest.py) and was stopped; its last output:\n{run.output[-OUTPUT_TAIL:]}",
      stacklevel=1,
    )
  pytest.fail(f"{nodeid} stalled in all {attempts} runs (see the warnings for each run's output)", pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
  """An `isolated` test's body runs in a child process (run_isolated); in that child it runs as usual."""
  if pyfuncitem.get_closest_marker("isolated") is None or os.environ.get(IN_CHILD):
    return None
  run_isolated(pyfuncitem.nodeid.split("@")[0], str(pyfuncitem.config.rootpath))  # '@GROUP': xdist's suffix
  return True


# The test-size model and batches, shared by in-process tests, CLI tests and the notebook test.
TINY_SIZES = {
  "data.feature_pool": 64,  # 8 features per bin -> noise GRU width 112 (speed only: see test_permutation)
  "model.patch_features": 0,  # the demo's projection off: the 8 pooled features are patched directly
  "model.hidden": 16,
  "data.batch_size": 8,
  "data.days_per_batch": 2,
  "data.eval_batch_size": 8,
  "data.time_buckets": (256, 512),
  # fewer GRU layers in the triple's clean and noisy decoders (3 and 2 in the demo): the same code, less to compile
  "model.clean_layers": 2,
  "model.noisy_layers": 1,
}


@dataclasses.dataclass
class Hdf5Split:
  """All trials of one split of an HDF5 tree, in session-list order then file order (the competition's order)."""

  name: str
  trials: list[t15.Trial]
  skipped: dict[str, int]  # reason -> number of trials skipped (on_bad_trial='skip')

  def __len__(self) -> int:
    return len(self.trials)

  def day_indices(self) -> dict[int, np.ndarray]:
    """day -> indices of that day's trials in `trials` (ascending)."""
    by_day: dict[int, list[int]] = collections.defaultdict(list)
    for i, t in enumerate(self.trials):
      by_day[t.day].append(i)
    return {d: np.asarray(v, np.int64) for d, v in sorted(by_day.items())}


def load_hdf5_split(
  data_dir: str,
  sessions,
  split: str,
  *,
  n_features: int = 512,
  feature_pool: int = 1,
  max_label_len: int = 10_000,
  on_bad_trial: str = "error",
) -> Hdf5Split:
  """One split of an HDF5 tree read whole into memory, through what the TFDS builder reads it with
  (t15.session_files, t15.iter_file) and the pooling a prepared split applies when read."""
  skipped: collections.Counter = collections.Counter()
  trials = []
  for day, session, path in t15.session_files(data_dir, sessions, split, on_bad_trial=on_bad_trial, skipped=skipped):
    for tr in t15.iter_file(
      path,
      day=day,
      session=session,
      labelled=split != "test",
      n_features=n_features,
      max_label_len=max_label_len,
      on_bad_trial=on_bad_trial,
      skipped=skipped,
    ):
      trials.append(dataclasses.replace(tr, features=batching.pool_features(tr.features, feature_pool)))
  return Hdf5Split(split, trials, dict(skipped))


def as_flags(overrides: dict) -> list[str]:
  """{'a.b': v} -> ['--config.a.b=v'] for b2t_jax.main."""
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def tiny_config(data_dir: str = ""):
  """The demo config shrunk to test size: 8 features, widths 16, batch 8, 3 sessions."""
  c = demo.get_config()
  c.data.data_dir = data_dir
  for key, value in TINY_SIZES.items():
    section, field = key.split(".")
    c[section][field] = value
  c.train.num_steps = 4
  c.train.eval_every = 1000
  c.train.log_every = 1
  c.train.checkpoint_every = 1000
  c.optim.warmup_steps = c.optim.day_warmup_steps = 2
  c.optim.decay_steps = 10
  return c


def best_meta(workdir: str) -> dict:
  """What training recorded beside WORKDIR/best: {'step', 'val_per', 'val_loss'} of the chosen checkpoint."""
  from b2t_jax import checkpoint as ckpt_lib

  ckpts = ckpt_lib.Checkpoints(workdir, read_only=True)
  try:
    return ckpts.best_meta()
  finally:
    ckpts.close()


def jaxpr_eqns(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs nested in its equations (scan bodies, custom VJPs, jits)."""
  for e in jaxpr.eqns:
    yield e
    for p in e.params.values():
      for sub in p if isinstance(p, (list, tuple)) else [p]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from jaxpr_eqns(inner)


def scan_carries(jaxpr) -> list:
  """The abstract values every scan in `jaxpr` (nested ones included) carries from one iteration to the next."""
  return [
    v.aval
    for e in jaxpr_eqns(jaxpr)
    if e.primitive.name == "scan"
    for v in e.invars[e.params["num_consts"] : e.params["num_consts"] + e.params["num_carry"]]
  ]


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("t15")
  return make_synthetic_dataset(str(out), T15_SESSIONS, n_sessions=3, trials_per_session=16, seed=0)


@pytest.fixture(scope="session")
def prepared_dir(synthetic_dir, tmp_path_factory):
  """`synthetic_dir` prepared as the TFDS (ArrayRecord) dataset training reads (the TFDS data dir)."""
  from b2t_jax.data import tfds_b2t

  out = str(tmp_path_factory.mktemp("tfds"))
  tfds_b2t.prepare(synthetic_dir, out)
  return out


@pytest.fixture
def tiny(prepared_dir):
  return tiny_config(prepared_dir)


UNGROUPED = pytest.StashKey[bool]()


@pytest.hookimpl(trylast=True)  # after pytest-xdist's, which gives grouped tests their '@GROUP' ids
def pytest_collection_modifyitems(config, items):
  """Tests marked slow run first, so that both xdist workers start on them and the run does not end on one
  long test while the other worker idles.

  Under `--dist loadgroup`, pytest-xdist sends the tests of one `xdist_group` to one worker by appending
  '@GROUP' to their ids; where a pytest release stops honouring that (9.2 with xdist 3.8), the group's module
  fixture (the permutation module's five training runs) is silently computed once per worker. Such tests fail."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
  for item in items:
    if item.get_closest_marker("isolated"):  # pytest-timeout's limit covers every run of it
      item.add_marker(pytest.mark.timeout(ISOLATED_ATTEMPTS * (ISOLATED_ATTEMPT_SECONDS + ABORT_GRACE_SECONDS) + 120))
  if getattr(config.option, "loadgroup", False):
    for item in items:
      item.stash[UNGROUPED] = bool(item.get_closest_marker("xdist_group")) and "@" not in item.nodeid


def pytest_runtest_setup(item):
  if item.stash.get(UNGROUPED, False):
    pytest.fail(
      f"--dist loadgroup does not group {item.nodeid} with the other tests of its xdist_group under pytest "
      f"{pytest.__version__}: install the versions pyproject.toml's test extra allows",
      pytrace=False,
    )
