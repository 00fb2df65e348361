"""The command line as users script it: summary JSON, train then eval printing `val_per=` last."""

import ast
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, TINY_SIZES, as_flags, best_meta, cpu_env
from test_train import assert_same_updates

from b2t_jax import checkpoint as ckpt_lib
from b2t_jax import experiment, train
from configs import demo

# The test-size demo of the command-line tests: the peak LR from step 0 (the demo's 50-step warm-up would leave the
# three steps at LR ~0, so that runs that should differ would not).
TINY_OVERRIDES = {
  **TINY_SIZES,
  "train.num_steps": 3,
  "train.eval_every": 2,
  "train.log_every": 1,
  "optim.warmup_steps": 0,
  "optim.day_warmup_steps": 0,
}
TINY = as_flags(TINY_OVERRIDES)


def _env(devices: int, compilation_cache: bool = True):
  env = cpu_env(devices)
  if not compilation_cache:
    # Processes of one job must reach their first collective together: one that finds its programs in the cache
    # while the other compiles waits past gloo's 30 s key-value deadline on this 2-core machine.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def _run(*args, cwd=ROOT):
  p = subprocess.run(
    [sys.executable, "-m", "b2t_jax.main", *args], cwd=cwd, env=_env(8), capture_output=True, text=True, timeout=600
  )
  assert p.returncode == 0, p.stderr[-3000:]
  return p.stdout.strip().splitlines()


def _final(line: str) -> dict[str, float]:
  assert line.startswith("final "), line
  return {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


def test_summary_prints_parameter_counts_as_last_line(tmp_path):
  # run from another directory: the config must still find its base
  last = _run(f"--config={ROOT}/configs/tpu_v4.py", "--config.mode=summary", cwd=tmp_path)[-1]
  assert json.loads(last) == {
    "noise_model": 628475392,
    "clean_model": 37228073,
    "noisy_model": 21865001,
    "total": 687568466,
  }


@pytest.mark.slow
def test_train_then_eval_from_the_command_line(tmp_path, prepared_dir):
  """Train, eval and infer on diphone targets (the triple demo model with a 1601-way clean head; the phoneme
  default runs the same commands in every other command-line test): what eval and infer decode are the 41
  marginal phoneme log-probabilities."""
  common = [
    "--config=configs/demo.py",
    f"--workdir={tmp_path}",
    f"--config.data.data_dir={prepared_dir}",
    *TINY,
    "--config.model.targets=diphone",
  ]
  final = _final(_run(*common)[-1])
  assert final["step"] == 3 and final["train_loss"] > 0
  last = _run(*common, "--config.mode=eval")[-1]
  # eval re-measures the best checkpoint: the PER that training recorded when it chose it, to the printed digit
  best = best_meta(str(tmp_path))
  assert last == f"val_per={best['val_per']:.4f}"
  _run(*common, "--config.mode=infer", "--config.infer.save_logits=True", "--config.infer.plot=False")
  metrics = json.load(open(tmp_path / "infer_val" / "metrics.json"))
  assert metrics["step"] == best["step"] and metrics["greedy_per"] == pytest.approx(best["val_per"], abs=1e-9)
  logits = np.load(tmp_path / "infer_val" / "logits.npz")
  for name in logits.files:
    assert logits[name].shape[1] == 41
    np.testing.assert_allclose(np.exp(logits[name]).sum(-1), 1.0, atol=1e-5)  # log-probabilities: marginals


def test_synthetic_data_tool(tmp_path):
  p = subprocess.run(
    [sys.executable, "tools/make_synthetic_data.py", f"--out={tmp_path}", "--sessions=2", "--trials_per_session=4"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert p.returncode == 0, p.stderr[-2000:]
  assert sorted(os.listdir(tmp_path)) == ["t15.2023.08.11", "t15.2023.08.13"]
  assert sorted(os.listdir(tmp_path / "t15.2023.08.13")) == ["data_test.hdf5", "data_train.hdf5", "data_val.hdf5"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(common, port, popen):
  return [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "b2t_jax.main",
        *common,
        "--config.distributed=True",
        f"--config.coordinator_address=localhost:{port}",
        "--config.num_processes=2",
        f"--config.process_id={i}",
      ],
      cwd=ROOT,
      env=_env(4, compilation_cache=False),
      text=True,
      **popen(i),
    )
    for i in range(2)
  ]


def _tiny_demo(prepared_dir):
  """In-process, the config that `--config=configs/demo.py --config.data.data_dir=... *TINY` builds."""
  c = demo.get_config()
  c.data.data_dir = prepared_dir
  for key, value in TINY_OVERRIDES.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def _documented_commands(text: str) -> list[str]:
  """Every `python -m b2t_jax.main ...` command in `text`, backslash-continued lines joined."""
  joined = re.sub(r"\\\n\s*", " ", text)
  return [m.group(0) for m in re.finditer(r"python3? -m b2t_jax\.main[^\n`]*", joined)]


def _placeholder_free(arg: str, tmp_path) -> str:
  """`--flag=DIR`, `--flag=gs://...` and `--flag=.../x` name no real place: a temp path stands in; a config file's
  reference rnn_args.yaml (`configs/reference_yaml.py:PATH`) is one b2t_jax writes (the export's, default config)."""
  arg = arg.strip("[]")  # [--optional=flag]
  flag, eq, value = arg.partition("=")
  if eq and (value == "DIR" or value.startswith("gs://") or "..." in value):
    return f"{flag}={tmp_path / flag.lstrip('-').replace('.', '_')}"
  if flag == "--config" and value.startswith("configs/reference_yaml.py:"):
    import yaml

    from b2t_jax import reference_args
    from configs import default

    path = tmp_path / "rnn_args.yaml"
    path.write_text(yaml.safe_dump(reference_args.to_args(default.get_config(), str(tmp_path)), sort_keys=False))
    return f"{flag}=configs/reference_yaml.py:{path}"
  return arg


def _launch_lines():
  """(where, command) of each config's `Launch:` command and each README command that runs a configs/ file."""
  out = []
  for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
    if name.endswith(".py") and name != "__init__.py":
      with open(os.path.join(ROOT, "configs", name)) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
      launch = doc[doc.find("Launch") :] if "Launch" in doc else ""
      out += [(f"configs/{name}", cmd) for cmd in _documented_commands(launch)] or [(f"configs/{name}", "")]
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
  out += [("README.md", cmd) for cmd in _documented_commands("\n".join(blocks)) if "--config=configs/" in cmd]
  return out


_LAUNCH = _launch_lines()


@pytest.mark.parametrize("where,command", _LAUNCH, ids=[f"{w}#{i}" for i, (w, _) in enumerate(_LAUNCH)])
def test_documented_launch_commands_parse(where, command, tmp_path, monkeypatch, capsys):
  """Each documented command, in summary mode, through b2t_jax.main's own flags: a renamed or misspelt
  --config.field there fails here (AttributeError / unknown flag), not on a user's pod."""
  assert command, f"{where}: its docstring has no 'Launch: python -m b2t_jax.main ...' command"
  from absl import flags

  from b2t_jax import main

  args = [_placeholder_free(a, tmp_path) for a in shlex.split(command)[3:] if not a.startswith("--config.mode=")]
  argv = ["b2t_jax.main", *args, "--config.mode=summary"]
  monkeypatch.chdir(ROOT)  # the commands run from the checkout's root
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
  fv = flags.FLAGS
  for name in [n for n in fv if n.startswith("config.")]:  # override flags of an earlier parse
    delattr(fv, name)
  fv.unparse_flags()
  try:
    main.main(fv(argv))
  finally:
    for name in [n for n in fv if n.startswith("config.")]:
      delattr(fv, name)
    fv.unparse_flags()
  counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert counts["total"] > 0


@pytest.mark.slow
def test_two_processes_train_like_one_and_stop_together_on_sigterm(tmp_path, prepared_dir):
  """Two local processes x 4 CPU devices (a stand-in for a 2-host pod) at the peak LR; a preempted host: only
  process 1 gets SIGTERM after its third step. Both stop after the same step N, save it and exit for a restart;
  their loss at step N and their parameters equal those of N steps of one 8-device process (in this process)."""
  work, logs = tmp_path / "work", tmp_path / "logs"
  logs.mkdir()
  overrides = {**TINY_OVERRIDES, "train.num_steps": 1000, "train.eval_every": 5000}
  common = ["--config=configs/demo.py", f"--config.data.data_dir={prepared_dir}", *as_flags(overrides)]
  files = [(open(logs / f"{i}.out", "w"), open(logs / f"{i}.err", "w")) for i in range(2)]
  procs = _two_processes(
    [*common, f"--workdir={work}"], _free_port(), popen=lambda i: {"stdout": files[i][0], "stderr": files[i][1]}
  )
  try:
    deadline = time.time() + 600
    while "step 3/1000" not in (logs / "1.err").read_text():  # compiled and training
      assert time.time() < deadline and all(p.poll() is None for p in procs), (logs / "1.err").read_text()[-3000:]
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
    for f in (f for pair in files for f in pair):
      f.close()
  outs = [(logs / f"{i}.out").read_text() for i in range(2)]
  errs = [(logs / f"{i}.err").read_text() for i in range(2)]
  assert codes == [75, 75], [e[-2000:] for e in errs]
  assert "process 1 of 2, 4 local / 8 global devices" in errs[1]
  stops = [re.findall(r"stopped at step (\d+) on SIGTERM", out) for out in outs]
  assert len(stops[0]) == 1 and stops[0] == stops[1], outs
  n = int(stops[0][0])
  assert n < 1000 and os.listdir(work / "checkpoints") == [str(n)]

  config = _tiny_demo(prepared_dir)
  config.train.num_steps, config.train.eval_every = n, 5000
  single = train.train_and_evaluate(config, str(tmp_path / "one"))
  (loss,) = re.findall(rf"step {n}/1000  loss ([0-9.]+)", errs[0])  # process 0 logs every step
  assert float(loss) == pytest.approx(single["train"]["loss"], abs=5e-4)  # logged with 3 decimals
  exp = experiment.Experiment(config)
  init = jax.device_get(exp.init_state().params)
  moved = {}
  for run in (work, tmp_path / "one"):
    ckpts = ckpt_lib.Checkpoints(str(run), read_only=True)
    params = jax.device_get(ckpts.restore(exp.abstract_state()).params)
    ckpts.close()
    moved[run] = jax.tree.map(lambda a, a0: np.asarray(a) - a0, params, init)
  assert_same_updates(moved[tmp_path / "one"], moved[work])


@pytest.mark.parametrize(
  "flags,message",
  [
    (["--config.data.on_bad_trial=skpi"], "error: invalid config (fix these flags or the config file):"),
    (["--config.data.data_dir=/nonexistent/t15"], "error: "),
    (
      ["--config.train.num_step=5"],
      "error: --config.train.num_step: config.train has no field 'num_step'; did you mean --config.train.num_steps?",
    ),
    (
      ["--config.optim.lr_peak.x=1"],
      "error: --config.optim.lr_peak.x: optim.lr_peak is a float, not a group of fields",
    ),
    (["--config=configs/demo.py:bad"], "error: configs/demo.py:bad: expected one of gru, transformer, mamba2"),
    (["--config=configs/missing.py"], "error: --config=configs/missing.py: the config file cannot be loaded ([Errno"),
    (["--config=configs/missing.py", "--config.train.num_steps=5"], "error: --config=configs/missing.py: the config"),
    (  # given twice, absl takes the last --config: the missing file is the fault, not the override
      ["--config=configs/demo.py", "--config=configs/missing.py", "--config.trian.num_steps=5"],
      "error: --config=configs/missing.py: the config",
    ),
  ],
  ids=[
    "bad-config",
    "missing-data",
    "misspelt-override",
    "override-below-a-value",
    "unknown-recipe",
    "missing-config-file",
    "missing-config-file-and-an-override",
    "config-given-twice",
  ],
)
def test_user_errors_exit_1_with_one_error_line_and_no_traceback(tmp_path, flags, message):
  """What a scheduler and a user see of a fault b2t_jax knows: status 1 (not a crash's), one `error:` line on
  stderr naming the problem, no traceback, and nothing written into the workdir."""
  work = tmp_path / "work"
  config = [] if flags[0].startswith("--config=") else ["--config=configs/demo.py"]
  p = subprocess.run(
    [sys.executable, "-m", "b2t_jax.main", *config, f"--workdir={work}", *flags],
    cwd=ROOT,
    env=_env(1),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 1, p.stderr[-2000:]
  errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(message), p.stderr[-2000:]
  assert "Traceback" not in p.stderr and p.stdout == ""
  assert not work.exists() or not any(work.iterdir()) or sorted(os.listdir(work)) == []


def test_a_bug_in_a_config_file_keeps_its_traceback(tmp_path):
  """A KeyError inside a config's own get_config is a bug, not a misspelt override: it is not passed off as one."""
  config = tmp_path / "buggy.py"
  config.write_text("from configs import demo\n\n\ndef get_config():\n  return demo.get_config().model.hiddn\n")
  p = subprocess.run(
    [sys.executable, "-m", "b2t_jax.main", f"--config={config}", "--config.train.num_steps=5", f"--workdir={tmp_path}"],
    cwd=ROOT,
    env=_env(1),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 1 and "Traceback" in p.stderr and f'{config}", line 5, in get_config' in p.stderr
  assert not [line for line in p.stderr.splitlines() if line.startswith("error:")], p.stderr[-2000:]
