"""tools/launch_tpu_pod.sh: the remote commands it prints (and runs) reach the workers' shell word for word.

The printed lines are executed by bash with stand-in `gcloud`, `git` and `python3` programs that record their
argv, so each check sees what a user copy-pasting the dry run, and the worker shell parsing --command, would."""

import os
import subprocess

import pytest
from conftest import ROOT

SCRIPT = os.path.join(ROOT, "tools", "launch_tpu_pod.sh")
# Writes its argv (NUL-separated) to the next numbered file in $RECORD; `mkdir` keeps the numbering race-free.
RECORDER = """#!/usr/bin/env bash
n=0; while ! mkdir "$RECORD/$n.lock" 2>/dev/null; do n=$((n + 1)); done
printf '%s\\0' "$(basename "$0")" "$@" > "$RECORD/$n"
"""
DATA_DIR = "/mnt/it's t15/hdf5 data_final"  # a space and a quote
EVIL_REF = "main; touch pwned1 $(touch pwned2) `touch pwned3`"


@pytest.fixture
def stand_ins(tmp_path):
  """PATH with recording gcloud/git/python3 first; returns (env, record dir, a scratch home)."""
  bin_dir, record, home = tmp_path / "bin", tmp_path / "record", tmp_path / "home"
  for d in (bin_dir, record, home):
    d.mkdir()
  clone = 'if [ "$1" = clone ]; then mkdir "${@: -1}"; fi\n'  # git clone leaves its folder behind
  for tool, body in (("gcloud", RECORDER), ("git", RECORDER + clone), ("python3", RECORDER)):
    (bin_dir / tool).write_text(body)
    (bin_dir / tool).chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record), "HOME": str(home)}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the two processes must compile in step (see test_main._env)
  return env, record, home


def _records(record) -> list[list[str]]:
  files = sorted((p for p in record.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
  out = [p.read_bytes().decode().split("\0")[:-1] for p in files]
  for p in record.iterdir():
    p.rmdir() if p.is_dir() else p.unlink()
  return out


def _launch(env, *args, dry_run=True):
  argv = [
    "bash",
    SCRIPT,
    "--name=b2t",
    "--zone=us-central2-b",
    "--accelerator=v4-32",
    "--workdir=gs://bucket/run",
    f"--data_dir={DATA_DIR}",
    "--repo=https://example.org/b2t.git",
    *(["--dry-run"] if dry_run else []),
    *args,
  ]
  p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert p.returncode == 0, p.stderr
  return p.stdout.splitlines()


def _payloads(env, record, lines) -> list[list[str]]:
  """Runs the printed gcloud lines as a user's shell would; returns the argv each gcloud call received."""
  commands = [ln for ln in lines if ln.startswith("gcloud ")]
  for ln in commands:
    subprocess.run(["bash", "-c", ln], env=env, check=True, timeout=60)
  return _records(record)


def _command(argv: list[str]) -> str:
  (cmd,) = [a[len("--command=") :] for a in argv if a.startswith("--command=")]
  return cmd


def _run_remote(env, cwd, payload: str):
  """The payload as the worker's shell runs it, then waits for what it started in the background."""
  assert subprocess.run(["bash", "-n", "-c", payload], capture_output=True).returncode == 0, payload
  subprocess.run(["bash", "-c", payload + "\nwait"], cwd=cwd, env=env, check=True, timeout=60)


def test_training_payload_passes_a_mesh_shape_and_paths_with_spaces_verbatim(stand_ins, tmp_path):
  env, record, home = stand_ins
  lines = _launch(env, "--config=configs/my config.py", "--", "--config.mesh_shape=(4,2)", "--config.train.tag=a b")
  create, install, train = _payloads(env, record, lines)
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and "--worker=all" in train
  (home / "b2t_jax").mkdir()
  _run_remote(env, home, _command(train))
  (python,) = _records(record)
  assert python == [
    "python3",
    "-m",
    "b2t_jax.main",
    "--config=configs/my config.py",
    "--workdir=gs://bucket/run",
    f"--config.data.data_dir={DATA_DIR}",
    "--config.distributed=True",
    "--config.mesh_shape=(4,2)",
    "--config.train.tag=a b",
  ]
  # Without --dry-run the script runs exactly the commands it prints (the stand-in gcloud says the VM exists).
  ran = _launch(
    env, "--config=configs/my config.py", "--", "--config.mesh_shape=(4,2)", "--config.train.tag=a b", dry_run=False
  )
  describe, *ssh = _records(record)
  assert describe[4] == "describe" and ssh == [install, train] and len(ran) == 3


@pytest.mark.parametrize("existing_checkout", [False, True], ids=["clone", "update"])
def test_install_payload_takes_ref_and_repo_as_data_not_shell(stand_ins, existing_checkout):
  env, record, home = stand_ins
  _, install, _ = _payloads(env, record, _launch(env, f"--ref={EVIL_REF}"))
  if existing_checkout:
    (home / "b2t_jax").mkdir()
  _run_remote(env, home, _command(install))
  calls = _records(record)
  git = [c for c in calls if c[0] == "git"]
  if existing_checkout:
    assert ["git", "-C", "b2t_jax", "checkout", "-q", EVIL_REF] in git
  else:
    assert git == [["git", "clone", "-q", "-b", EVIL_REF, "https://example.org/b2t.git", "b2t_jax"]]
  assert calls[-1] == ["python3", "-m", "pip", "install", "-q", "-e", ".", "jax[tpu]==0.10.2"]
  assert not list(home.rglob("pwned*")) and not list(home.parent.glob("pwned*"))  # where the payload ran


def test_ref_or_repo_that_git_would_read_as_an_option_is_refused(stand_ins):
  env, _, _ = stand_ins
  p = subprocess.run(
    [
      "bash",
      SCRIPT,
      "--name=b2t",
      "--zone=z",
      "--workdir=w",
      "--data_dir=d",
      "--repo=r",
      "--ref=--upload-pack=touch pwned",
      "--dry-run",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
  )
  assert p.returncode == 2 and "--ref=--upload-pack=touch pwned: must not start with '-'" in p.stderr
