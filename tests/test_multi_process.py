"""Data-parallel DP-SGD on two processes (jax.distributed) equals one process.

Two processes on this machine join one job with `jax.distributed.initialize`
(coordinator 127.0.0.1 on a free port, `num_processes=2`), each with 4
simulated CPU devices, so the mesh has 8 devices of which each process
addresses 4. jax's CPU backend carries the cross-process all-reduce with gloo
(its default `jax_cpu_collectives_implementation`, jax 0.10.2). Every process
draws the same batches from the same sampler and seed, loads only its devices'
rows (`gather_sharded_batch`) and builds `dp_aggregate` from the same key.

1. The library (tests/_multiprocess_worker.py, 3 steps of the tutorial CNN on
   Poisson batches of about 64 rows): the final parameters and epsilon of the
   2-process run equal those of a 1-device run (a 1-process 8-device run
   equals it too: test_multi_device.py); both processes hold bitwise the same parameters; each process read
   exactly the rows of its own devices' slices, and the two processes' rows
   make up the batch.
2. The MNIST example (examples/mnist_linen.py --coordinator --num-processes
   --process-id): 4 steps on 2 processes train the 1-device model and report
   its epsilon; process 0 alone writes the record.

All runs are subprocesses (the device count and the distributed runtime are
fixed when jax starts), started together, each in its own process group,
under one deadline; on any failure or timeout every group is killed, and the
tests check that no process of them is left.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import example_runs   # tests/, on sys.path as the test root

pytest.importorskip("flax")   # the model under test is a flax.linen CNN

_REPO = Path(__file__).resolve().parent.parent
_WORKER = _REPO / "tests" / "_multiprocess_worker.py"
_LM_WORKER = _REPO / "tests" / "_multiprocess_lm_worker.py"
_EXAMPLE = _REPO / "examples" / "mnist_linen.py"
# Every run of a group must be done by then (measured here, on 2 cores shared
# with other jobs, load average 7-9: about 60 s for the 4 processes of the
# library test, 50 s for the example's 3).
_DEADLINE_S = 150


def _free_port():
  """A TCP port free on 127.0.0.1 now (the OS's pick for port 0)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices):
  """The environment of a run with `devices` simulated CPU devices."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"   # a GPU host still gets its simulated CPU devices
  env["PYTHONPATH"] = os.pathsep.join(
      [str(_REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  return env


def _group_alive(pgid):
  """Whether any process of the process group `pgid` still exists."""
  try:
    os.killpg(pgid, 0)
  except ProcessLookupError:
    return False
  return True


def _kill_groups(procs):
  """SIGKILL every process group of `procs` (leaders and whatever they
  started), reap the leaders; returns the groups still alive 5 s later."""
  for proc in procs:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  for proc in procs:
    proc.wait()
  end = time.monotonic() + 5
  while any(_group_alive(p.pid) for p in procs) and time.monotonic() < end:
    time.sleep(0.1)
  return [p.pid for p in procs if _group_alive(p.pid)]


def run_together(runs, folder, deadline_s=_DEADLINE_S):
  """Runs `runs` ({name: (argv, env)}) at once, each in its own process group
  with its output in folder/<name>.log, until all have exited, one has failed
  (its peers could wait on it forever) or `deadline_s` has passed; then kills
  every group. Returns {"returncodes", "logs", "timed_out", "survivors",
  "seconds"}: survivors, the groups left after the kill, must be none."""
  procs, logs = {}, {}
  start = time.monotonic()
  timed_out = False
  try:
    for name, (argv, env) in runs.items():
      with open(folder / f"{name}.log", "wb") as log:
        procs[name] = subprocess.Popen(argv, env=env, cwd=folder, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
    while True:
      codes = [p.poll() for p in procs.values()]
      if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
        break
      if time.monotonic() - start > deadline_s:
        timed_out = True
        break
      time.sleep(0.2)
  finally:
    survivors = _kill_groups(list(procs.values()))
  for name in runs:
    path = folder / f"{name}.log"
    logs[name] = path.read_text(errors="replace") if path.exists() else ""
  return {"returncodes": {n: p.returncode for n, p in procs.items()}, "logs": logs,
          "timed_out": timed_out, "survivors": survivors,
          "seconds": time.monotonic() - start}


def _check_clean(outcome):
  """All runs exited 0 within the deadline; no process left behind."""
  assert not outcome["survivors"], f"process groups left: {outcome['survivors']}"
  failed = {n: c for n, c in outcome["returncodes"].items() if c != 0}
  if outcome["timed_out"] or failed:
    tails = "\n".join(f"--- {n} (rc {outcome['returncodes'][n]}):\n{outcome['logs'][n][-3000:]}"
                      for n in outcome["logs"])
    pytest.fail(f"timed out: {outcome['timed_out']}, failed: {failed}\n{tails}")


def _two_processes(argv, port):
  """The two processes' runs of `argv`: 4 devices each, coordinator on `port`."""
  return {f"process{i}": ([*argv, "--coordinator", f"127.0.0.1:{port}",
                           "--num-processes", "2", "--process-id", str(i)], _env(4))
          for i in range(2)}


@pytest.mark.subprocess
def test_run_together_kills_every_process_on_failure(tmp_path):
  """The harness itself: one run fails at once, the other would sleep for a
  minute (and has started a child of its own): both groups are killed within
  seconds, nothing is left."""
  sleeper = ("import subprocess, sys, time; "
             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             "time.sleep(60)")
  outcome = run_together({"fails": ([sys.executable, "-c", "raise SystemExit(3)"], None),
                          "sleeps": ([sys.executable, "-c", sleeper], None)},
                         tmp_path, deadline_s=30)
  assert outcome["returncodes"]["fails"] == 3
  assert outcome["returncodes"]["sleeps"] == -signal.SIGKILL
  assert not outcome["timed_out"] and not outcome["survivors"]
  assert outcome["seconds"] < 20


@pytest.mark.subprocess
def test_run_together_enforces_its_deadline(tmp_path):
  outcome = run_together({"sleeps": ([sys.executable, "-c", "import time; time.sleep(60)"],
                                     None)}, tmp_path, deadline_s=2)
  assert outcome["timed_out"] and not outcome["survivors"]
  assert outcome["returncodes"]["sleeps"] == -signal.SIGKILL


# ----------------------------------- 1a. parameters split over the processes


@pytest.mark.subprocess
@pytest.mark.parametrize("kind", ["fsdp", "model"])
def test_sharded_params_over_two_processes_equal_1_device(tmp_path, kind):
  """The language model (Linen, then NNX) with its parameters split over a
  ('data', 'fsdp') = (2, 4) or ('data', 'model') = (4, 2) mesh spanning 2 processes x 4 devices
  (tests/_multiprocess_lm_worker.py: plain jax.jit, the user's shardings)
  trains to the 1-device run's parameters in 3 private steps with padding rows
  (tolerance: tests/test_model_parallel.py's, same model and steps; measured
  1.2e-7), and its parameters stayed split."""
  runs = {}
  for name in ("one", "two"):
    (tmp_path / name).mkdir()
  runs["one"] = ([sys.executable, str(_LM_WORKER), str(tmp_path / "one"), kind], _env(1))
  runs.update(_two_processes([sys.executable, str(_LM_WORKER), str(tmp_path / "two"), kind],
                             _free_port()))
  outcome = run_together(runs, tmp_path)
  _check_clean(outcome)
  for index in (0, 1):
    result = json.loads((tmp_path / "two" / f"result_{index}.json").read_text())
    assert result["devices"] == 8 and result["local_devices"] == 4
    assert result["split_leaves"] > 0
  for family in ("params.npz", "nnx_params.npz"):   # Linen, NNX
    with np.load(tmp_path / "one" / family) as one, np.load(tmp_path / "two" / family) as two:
      assert sorted(one) == sorted(two) and len(one) > 10
      for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{family} {name}")


# ------------------------------------------------------------ 1. the library


@pytest.fixture(scope="module")
def library_runs(tmp_path_factory):
  """The worker on 2 processes x 4 devices and on 1 device, at once (1
  process x 8 devices equals 1 device by test_multi_device.py's train
  tests). Returns (outcome, {run: {process index: (result, params)}})."""
  folder = tmp_path_factory.mktemp("multi_process")
  runs = {}
  (folder / "one").mkdir()
  runs["one"] = ([sys.executable, str(_WORKER), str(folder / "one")], _env(1))
  (folder / "two").mkdir()
  runs.update(_two_processes([sys.executable, str(_WORKER), str(folder / "two")],
                             _free_port()))
  outcome = run_together(runs, folder)
  _check_clean(outcome)
  results = {}
  for name in ("two", "one"):
    results[name] = {}
    for path in sorted((folder / name).glob("result_*.json")):
      index = int(path.stem.split("_")[1])
      with np.load(folder / name / f"params_{index}.npz") as npz:
        results[name][index] = (json.loads(path.read_text()), dict(npz))
  return outcome, results


# Float tolerance of "2 processes (8 devices) == 1 device". The runs add
# bitwise the same noise (same key and step: the noise is computed from the
# replicated state on every device, see test_multi_device.py's noise tests), so they
# differ only by float32 rounding: the clipped sum is added up in another
# order (8 per-device sums of ~16 rows, then the all-reduce, against one sum
# of ~120 rows), and XLA vectorises the per-example work over 16 rows instead
# of 120. That is a relative error of order sqrt(B) * eps_f32 ~ 1e-6 of the
# clipped sum's coordinates, reaching the parameters scaled by lr / E =
# 0.1 / 64 (times at most 1 + 1.9 + 2.71 for momentum over 3 steps): measured
# <= 2e-8 on parameters of size up to 0.75. rtol 1e-5 / atol 1e-6 leaves a
# margin of >= 50x, while noise added twice, or drawn differently on the two
# processes, moves every parameter by the noise's scale, lr * sigma * C / E =
# 1.6e-3 per step (1600x atol), and a row dropped or read twice shows in the
# row checks below.
RTOL, ATOL = 1e-5, 1e-6
NOISE_SCALE = 0.1 * 1.0 * 1.0 / 64   # lr * sigma * C / E of the worker


def _assert_same_params(got, want):
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.subprocess
def test_library_runs_exit_cleanly_in_time(library_runs):
  outcome, results = library_runs
  assert outcome["seconds"] < _DEADLINE_S and not outcome["survivors"]
  assert sorted(results["two"]) == [0, 1]
  assert list(results["one"]) == [0]


@pytest.mark.subprocess
def test_two_processes_span_eight_devices(library_runs):
  _, results = library_runs
  for index, (result, _) in results["two"].items():
    assert result["process_index"] == index
    assert (result["process_count"], result["device_count"],
            result["local_device_count"]) == (2, 8, 4)
    assert result["param_devices"] == 8    # the state lives on both processes' devices
  one, _ = results["one"][0]
  assert (one["process_count"], one["device_count"]) == (1, 1)


@pytest.mark.subprocess
def test_two_processes_train_the_1_device_model(library_runs):
  _, results = library_runs
  assert NOISE_SCALE > 1000 * ATOL
  result, params = results["two"][0]
  one, one_params = results["one"][0]
  assert result["steps"] == one["steps"] == 3
  assert one["moved"] > 1e4 * ATOL            # training moved the parameters
  _assert_same_params(params, one_params)
  # The same mechanism, the same ledger: the same epsilon.
  assert result["epsilon"] == one["epsilon"]
  assert 0 < result["epsilon"] < 10


@pytest.mark.subprocess
def test_both_processes_hold_the_same_parameters(library_runs):
  """The replicated state is the same on both processes, bit for bit: the
  noise was drawn from the same key on both (differing noise would leave two
  models that jax still calls one replicated array)."""
  _, results = library_runs
  (r0, p0), (r1, p1) = results["two"][0], results["two"][1]
  assert sorted(p0) == sorted(p1)
  for name in p0:
    np.testing.assert_array_equal(p0[name], p1[name], err_msg=name)
  assert r0["epsilon"] == r1["epsilon"]


@pytest.mark.subprocess
def test_each_process_loads_only_its_own_rows(library_runs):
  """Per step, each process read exactly the real rows of its 4 devices'
  slices of the padded batch (once per device and data leaf: images,
  labels), none of the other process's; together they read the batch."""
  _, results = library_runs
  (r0, _), (r1, _) = results["two"][0], results["two"][1]
  assert len(r0["rows"]) == len(r1["rows"]) == 3
  for s0, s1 in zip(r0["rows"], r1["rows"]):
    assert s0["real"] == s1["real"] and s0["padded_size"] == s1["padded_size"]
    assert s0["padded_size"] % 8 == 0 and s0["padded_size"] > len(s0["real"])
    for step in (s0, s1):
      assert step["loaded"]["rows"] == step["own"]
      assert step["loaded"]["calls"] == 2 * 4
      assert 0 < len(step["own"]) < len(step["real"])
    assert not set(s0["own"]) & set(s1["own"])
    assert sorted(s0["own"] + s1["own"]) == s0["real"]


# ------------------------------------------------------- 2. the MNIST example

_EXAMPLE_ARGS = ("--steps", "4", "--batch-size", "64", "--eval-every", "4",
                 "--clipping", "auto", "--accountant", "rdp")


@pytest.mark.subprocess
@pytest.mark.slow
def test_example_on_two_processes_trains_the_1_device_model(tmp_path):
  """examples/mnist_linen.py on 2 processes x 4 devices (the multi-process
  recipe of docs/multi_device.md) == the same command on 1 device: the same
  epsilon, and the test loss to float tolerance (as the 8-device run of
  test_example_ledger.py: the sum is split 8 ways before adding)."""
  example = [sys.executable, str(_EXAMPLE), *_EXAMPLE_ARGS]
  runs = {"one": ([*example, "--json-out", str(tmp_path / "one.json")], _env(1))}
  runs.update(_two_processes([*example, "--json-out", str(tmp_path / "two.json")],
                             _free_port()))
  outcome = run_together(runs, tmp_path)
  _check_clean(outcome)
  one = json.loads((tmp_path / "one.json").read_text())
  two = json.loads((tmp_path / "two.json").read_text())   # process 0's
  assert (one["devices"], two["devices"]) == (1, 8)
  assert two["steps"] == one["steps"] == 4
  assert two["epsilon"] == one["epsilon"]
  assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
  assert two["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=2e-4)
  # Process 0 speaks for the run; process 1 states the privacy it shares, quietly.
  progress = [[line for line in outcome["logs"][f"process{i}"].splitlines()
               if line.startswith("step ")] for i in range(2)]
  assert progress[0] and progress[0][-1].startswith("step     4/4") and not progress[1]
  assert "Privacy: (" in outcome["logs"]["process1"]


@pytest.mark.parametrize("flags, message", [
    (("--num-processes", "2"), "needs --coordinator"),
    (("--num-processes", "2", "--coordinator", "127.0.0.1:1", "--process-id", "2"),
     "not in 0..1"),
    (("--num-processes", "2", "--coordinator", "127.0.0.1:1", "--checkpoint-dir", "c"),
     "single-process only"),
    (("--num-processes", "0",), "must be >= 1"),
])
def test_example_refuses_bad_multi_process_flags(flags, message, capsys):
  mnist_linen = example_runs.import_example("mnist_linen")
  with pytest.raises(SystemExit) as exit_info:
    mnist_linen.parse_args(list(flags))
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err
