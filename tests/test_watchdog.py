"""The deadlock watchdog of `isolated` tests (conftest.run_watched, run_isolated): a process that stops using CPU is
stopped, one that computes (itself or through a child) is not, and an isolated test's failure stays a failure."""

import os
import sys
import time

import pytest
from conftest import run_isolated, run_watched

BUSY = "import time\nt = time.time()\nwhile time.time() - t < {s}: pass"


def test_a_process_that_stops_using_cpu_is_stopped_with_its_stacks():
  start = time.monotonic()
  run = run_watched(
    [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"],
    stall_seconds=2,
    poll_seconds=0.2,
    env={**os.environ, "PYTHONFAULTHANDLER": "1"},
  )
  assert run.returncode is None
  assert time.monotonic() - start < 30
  assert "started" in run.output
  assert "Fatal Python error: Aborted" in run.output and "time.sleep" not in run.output  # C stack: the sleep call
  assert 'File "<string>", line 1 in <module>' in run.output  # faulthandler's Python stack of the stuck thread


@pytest.mark.parametrize("through_child", [False, True])
def test_a_computing_process_is_not_stopped(through_child):
  """4 s of computing with a 1.5 s stall limit, in the process itself or in a child while the parent waits (a
  test's command-line run): the CPU time of the whole tree counts."""
  busy = BUSY.format(s=4)
  code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {busy!r}])" if through_child else busy
  run = run_watched([sys.executable, "-c", code], stall_seconds=1.5, poll_seconds=0.2)
  assert run.returncode == 0, run.output


def test_a_process_past_its_wall_clock_limit_is_stopped():
  run = run_watched([sys.executable, "-c", BUSY.format(s=60)], stall_seconds=60, wall_seconds=2, poll_seconds=0.2)
  assert run.returncode is None and run.why == "still running after 2 s"


def test_an_exit_status_is_passed_on():
  assert run_watched([sys.executable, "-c", "raise SystemExit(3)"], stall_seconds=5, poll_seconds=0.25).returncode == 3


TESTS = r"""
import os, time

def test_passes():
  pass

def test_fails():
  assert 1 == 2, "the child's own message"

def test_stalls():
  time.sleep(600)

def test_xla_gives_up_once():
  marker = os.path.join(os.path.dirname(__file__), "gave_up_once")
  if not os.path.exists(marker):
    open(marker, "w").close()
    # as XLA's rendezvous does (LOG(FATAL) on file descriptor 2, then abort), below Python's sys.stderr
    os.write(2, b"[id=3] Termination timeout for `all-gather` of 150 seconds exceeded. Expected 8 threads\n")
    os.abort()

def test_aborts():
  os.abort()

def test_stalls_once():
  marker = os.path.join(os.path.dirname(__file__), "ran_once")
  if not os.path.exists(marker):
    open(marker, "w").close()
    time.sleep(600)
"""


@pytest.fixture
def child_tests(tmp_path):
  (tmp_path / "test_child.py").write_text(TESTS)
  return str(tmp_path)


def test_isolated_pass_and_failure(child_tests):
  run_isolated("test_child.py::test_passes", child_tests, stall_seconds=5, poll_seconds=0.25)
  with pytest.raises(pytest.fail.Exception, match="the child's own message"):
    run_isolated("test_child.py::test_fails", child_tests, stall_seconds=5, poll_seconds=0.25)
  with pytest.raises(pytest.fail.Exception, match="failed in its child process"):  # a crash is not a stall
    run_isolated("test_child.py::test_aborts", child_tests, stall_seconds=5, poll_seconds=0.25)


def test_isolated_run_that_xla_ended_for_a_missing_peer_is_run_again(child_tests):
  with pytest.warns(UserWarning, match=r"(?s)run 1 of 6 stalled \(XLA ended it.*Termination timeout for `all-gather`"):
    run_isolated("test_child.py::test_xla_gives_up_once", child_tests, stall_seconds=5, poll_seconds=0.25)


def test_isolated_stall_is_retried_once_then_fails(child_tests):
  with pytest.warns(UserWarning, match=r"run 1 of 2 stalled"):
    run_isolated("test_child.py::test_stalls_once", child_tests, stall_seconds=2, attempts=2, poll_seconds=0.25)
  with pytest.warns(UserWarning) as stalls:
    with pytest.raises(pytest.fail.Exception, match="stalled in all 2 runs"):
      run_isolated("test_child.py::test_stalls", child_tests, stall_seconds=2, attempts=2, poll_seconds=0.25)
  assert [str(w.message).split(" stalled")[0] for w in stalls] == [
    f"test_child.py::test_stalls: run {k} of 2" for k in (1, 2)
  ]
