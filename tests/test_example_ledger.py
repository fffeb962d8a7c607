"""The MNIST examples' runs compared with one straight run: checkpoint resume,
accumulation, 8 devices, and the NNX example (split from test_example_mnist.py
so the two files run on separate pytest-xdist workers)."""

import importlib.util
import os
import shlex
import shutil
import sys

import numpy as np
import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)
import example_runs  # noqa: E402  (tests/, on sys.path as the test root)

_shared_compilation_cache = example_runs.compilation_cache_fixture()
_run_raw, _run = example_runs.run_raw, example_runs.run


def _in_process(tmp_path, *args, name="result", script="mnist_linen.py"):
  """A run by the script's main(argv) in this process (example_runs.
  run_in_process): the same parsing, training, record and printed lines,
  without a fresh Python importing JAX, Flax, orbax and the library. The
  runs whose point is a fresh process (a resume from a checkpoint, 8
  devices fixed at JAX start-up) use `_run`."""
  return example_runs.run_in_process(tmp_path, *args, name=name, script=script)


# ---------------------------------------------------------------------------
# The privacy ledger in the example: resume, budget refusal and overrun,
# samplers, accumulation. Small settings (batch 64, 4 steps) keep each run to
# seconds of training; the comparisons are exact (same numbers, not close).
# LEDGER runs account with RDP: what these tests check (the same epsilon after
# a resume, the refusal past the budget, the ledger of K physical batches or 8
# devices) is the accountant-independent bookkeeping, and RDP calibrates in a
# fraction of PLD's time. The PLD path of the example is the default run's
# (test_short_private_run_...) and the shuffle sampler's.

SMALL = ("--batch-size", "64", "--eval-every", "2", "--clipping", "auto")
LEDGER = (*SMALL, "--accountant", "rdp")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """4 uninterrupted steps, (record, stdout, folder): the reference for resume
  and accumulation; with --plot folder/run.png where matplotlib is installed."""
  folder = tmp_path_factory.mktemp("straight")
  plot = (("--plot", str(folder / "run.png")) if importlib.util.find_spec("matplotlib")
          else ())
  return (*_in_process(folder, "--steps", "4", *LEDGER, *plot), folder)


@pytest.fixture(scope="module")
def straight_run(straight):
  return straight[0]


@pytest.mark.slow
def test_piped_run_prints_plain_lines_and_records_its_history(straight):
  record, stdout, _ = straight
  # Not a terminal: no tqdm bar (no carriage returns, no bar or rate), plain
  # lines: the phases, announced before they start, and one line per evaluation.
  assert "\r" not in stdout and "%|" not in stdout and "step/s" not in stdout
  said = [line for line in stdout.splitlines() if line.endswith(" ...")]
  assert said[0].startswith("Loading MNIST from ")
  assert said[1:5] == ["Building the CNN ...",
                       "Calibrating the noise multiplier for 4 steps at epsilon 1, delta 1e-05 ...",
                       # its 4 batches all have the second of the 4 padding sizes:
                       "Compiling the train step for batch shape 64 (padding bucket 2 of 4) ...",
                       "Evaluating on the test set (10000 examples) every 2 steps ..."]
  assert "Train step compiled for batch shape 64 in " in stdout
  lines = [line for line in stdout.splitlines() if line.startswith("step ")]
  assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
  # The history: one entry per evaluation, epsilon growing to the record's.
  history = record["history"]
  assert [h["step"] for h in history] == [2, 4]
  assert set(history[0]) == {"step", "train_loss", "train_accuracy", "eval_loss",
                             "eval_accuracy", "epsilon", "seconds"}
  assert 0 < history[0]["epsilon"] < history[1]["epsilon"] == record["epsilon"]
  assert history[1]["eval_loss"] == record["test_loss"]
  assert history[1]["eval_accuracy"] == record["test_accuracy"]
  assert 0 < history[0]["seconds"] <= history[1]["seconds"] <= record["seconds"]


@pytest.mark.slow
def test_plot_draws_the_run(straight):
  pytest.importorskip("matplotlib")
  import plot_results  # pylint: disable=import-outside-toplevel
  if not hasattr(plot_results, "plot_run"):
    pytest.skip("examples/plot_results.py has no plot_run yet")
  _, stdout, folder = straight
  assert f"Plotting the run to {folder / 'run.png'} ..." in stdout
  assert (folder / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
  """4 steps stopped after step 2 with --checkpoint-dir, (record, stdout,
  checkpoint folder, a copy of that folder as the run left it): the run both
  the resume test and the refusal test start from, made once. The resume
  test resumes in the folder itself (which adds step 4); the refusal test
  gets the copy, so each sees the checkpoint at step 2 whatever their order."""
  folder = tmp_path_factory.mktemp("stopped")
  ckpt = folder / "ckpt"
  first, stdout = _in_process(folder, "--steps", "4", "--stop-at", "2", "--checkpoint-dir",
                              str(ckpt), *LEDGER, name="first")
  copy = folder / "ckpt_copy"
  shutil.copytree(ckpt, copy)
  return first, stdout, ckpt, copy


@pytest.mark.slow
def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tmp_path, straight_run,
                                                                 stopped):
  first, stdout, ckpt, _ = stopped
  assert first["steps"] == 2
  assert (ckpt / "run.json").exists() and (ckpt / "step_2").is_dir()
  # The run ends saying so, and with the command that resumes it...
  said, command = stdout.rstrip().splitlines()[-2:]
  assert said == (f"Stopped early at step 2 of --steps 4 (--stop-at 2). To resume from "
                  f"{ckpt}:")
  words = shlex.split(command)
  assert words[0] == "python" and words[1].endswith("mnist_linen.py")
  assert words[2:] == ["--resume", str(ckpt), "--steps", "4", "--eval-every", "2"]
  # ...which, in a fresh process, resumes at step 2 and runs steps 3 and 4.
  second, stdout = _run(tmp_path, *words[2:], name="second")
  assert "Resumed" in stdout
  assert second["resumed_from_step"] == 2 and second["steps_this_run"] == 2
  assert second["steps"] == 4
  # Same noise stream, same batches, same ledger: the same model and epsilon.
  assert second["test_loss"] == straight_run["test_loss"]
  assert second["test_accuracy"] == straight_run["test_accuracy"]
  assert second["epsilon"] == straight_run["epsilon"]
  assert second["noise_multiplier"] == straight_run["noise_multiplier"]


@pytest.mark.slow
def test_resume_refuses_to_change_the_mechanism(tmp_path, stopped, capsys):
  # The checkpoint of `stopped` (--steps 4 --stop-at 2 --checkpoint-dir, the
  # resume test's first run), a copy at step 2. The conflict is refused while
  # parsing the flags: by the script's parse_args in this process (the exit
  # status and stderr a process gives, example_runs.refusal_in_process).
  ckpt = stopped[3]
  status, stderr = example_runs.refusal_in_process(
      capsys, "--steps", "4", "--resume", str(ckpt), "--sampler", "shuffle",
      script="mnist_linen.py")
  assert status == 2
  assert "conflicts with the resumed run" in stderr
  # Resuming past the budget the checkpoint's noise was calibrated for is
  # refused too (on reading the checkpoint: by main, in this process).
  status, stderr = example_runs.run_refusal_in_process(
      capsys, tmp_path, "--steps", "6", "--resume", str(ckpt), script="mnist_linen.py")
  assert status == 2
  assert "beyond the privacy budget" in stderr


@pytest.mark.slow
def test_accumulation_equals_the_logical_batch(tmp_path, straight_run):
  # Two physical batches per logical Poisson batch, noise once: the same
  # model as one physical batch per step (same seed, same logical batches).
  result, _ = _in_process(tmp_path, "--steps", "4", "--accumulation-steps", "2", *LEDGER)
  assert result["accumulation_steps"] == 2 and result["steps"] == 4
  assert result["epsilon"] == straight_run["epsilon"]
  assert result["test_loss"] == pytest.approx(straight_run["test_loss"], rel=1e-6)


@pytest.mark.slow
def test_eight_devices_train_the_same_model(tmp_path, straight_run, capsys):
  # 8 simulated CPU devices, data-parallel: each device clips its share, one
  # all-reduce of the clipped sum, noise drawn once. Same model as 1 device,
  # up to float reduction order (the sum is split 8 ways before adding).
  result, _ = _run(tmp_path, "--steps", "4", "--devices", "8", *LEDGER,
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert result["devices"] == 8
  assert result["epsilon"] == straight_run["epsilon"]
  assert result["test_loss"] == pytest.approx(straight_run["test_loss"], rel=1e-5)
  # More devices than JAX has (this process has one) is refused, naming them.
  status, stderr = example_runs.run_refusal_in_process(
      capsys, tmp_path, "--steps", "4", "--devices", "3", *LEDGER, script="mnist_linen.py")
  assert status == 2 and "device" in stderr


@pytest.mark.slow
def test_eight_devices_accumulate_per_device_and_resume_the_same_model(tmp_path, straight_run):
  # 8 devices and 2 physical batches per logical batch: each device keeps its
  # own clipped sums (sharded_clipped_grads(reduce=False)), dp_accumulate(mesh=)
  # all-reduces them once per logical batch; stopped after step 2 and resumed
  # from the orbax checkpoint (the per-device accumulator included) in a fresh
  # process, the run ends on the 1-device, unaccumulated model.
  eight = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  ckpt = tmp_path / "ckpt"
  first, stdout = _run(tmp_path, "--steps", "4", "--stop-at", "2", "--checkpoint-dir",
                       str(ckpt), "--devices", "8", "--accumulation-steps", "2", *LEDGER,
                       env=eight, name="first")
  assert first["steps"] == 2 and first["devices"] == 8
  words = shlex.split(stdout.rstrip().splitlines()[-1])
  assert words[words.index("--devices") + 1] == "8"
  second, stdout = _run(tmp_path, *words[2:], env=eight, name="second")
  assert "Resumed" in stdout and second["resumed_from_step"] == 2
  assert second["steps"] == 4 and second["accumulation_steps"] == 2
  assert second["epsilon"] == straight_run["epsilon"]
  assert second["test_loss"] == pytest.approx(straight_run["test_loss"], rel=1e-5)


@pytest.mark.slow
def test_bandmf_run_resumes_bitwise_and_states_its_mechanism(tmp_path, capsys):
  # --noise bandmf --bands 2: cyclic Poisson batches, DP-BandMF noise, its
  # epsilon. Stopped after step 2 and resumed (the noise buffers restored
  # from the checkpoint) in a fresh process: the uninterrupted run's model
  # and epsilon, exactly.
  bandmf = ("--noise", "bandmf", "--bands", "2", *LEDGER)
  straight, stdout = _in_process(tmp_path, "--steps", "4", *bandmf, name="straight")
  assert straight["noise"] == "bandmf" and straight["bands"] == 2
  assert straight["sampler"] == "cyclic_poisson"
  assert "DP-BandMF (banded matrix-factorisation noise, 2 bands" in stdout
  assert "cyclic Poisson sampling over 2 groups" in stdout
  ckpt = tmp_path / "ckpt"
  # In a process of its own: JAX's compile caches keep the straight run's
  # transform alive in this one (a TrainState's tx is in its tree structure),
  # and a second transform on the same key beside it would be warned about.
  _run(tmp_path, "--steps", "4", "--stop-at", "2", "--checkpoint-dir", str(ckpt), *bandmf,
       name="first")
  second, _ = _run(tmp_path, "--resume", str(ckpt), "--steps", "4", "--eval-every", "2",
                   name="second")
  assert second["resumed_from_step"] == 2 and second["noise"] == "bandmf"
  assert second["test_loss"] == straight["test_loss"]
  assert second["epsilon"] == straight["epsilon"]
  # Changing the mechanism on resume is refused (while parsing the flags: in
  # this process, as in test_resume_refuses_...); bands without BandMF too.
  status, stderr = example_runs.refusal_in_process(
      capsys, "--resume", str(ckpt), "--steps", "4", "--bands", "3", script="mnist_linen.py")
  assert status == 2 and "conflicts with the resumed run" in stderr
  status, stderr = example_runs.run_refusal_in_process(
      capsys, tmp_path, "--steps", "4", "--bands", "2", *LEDGER, script="mnist_linen.py")
  assert status == 2 and "--noise bandmf" in stderr


# ---------------------------------------------------------------------------
# The Flax NNX twin, examples/mnist_nnx.py: the same CNN, the same ledger.


def _examples_models():
  # By file: `import models` is tests/models.py in this session (conftest.py).
  spec = importlib.util.spec_from_file_location(
      "examples_models", os.path.join(EXAMPLES, "models.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module   # dataclasses (Linen fields) look their module up
  spec.loader.exec_module(module)
  return module


def test_nnx_cnn_is_the_linen_tutorial_cnn():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  models = _examples_models()
  nnx_params = nnx.state(nnx.eval_shape(lambda: models.NNXCNN(rngs=nnx.Rngs(0))), nnx.Param)
  linen_params = jax.eval_shape(models.CNN().init, jax.random.key(0),
                                jnp.zeros((1, 28, 28, 1)))["params"]
  nnx_shapes = sorted(x.shape for x in jax.tree.leaves(nnx_params))
  assert nnx_shapes == sorted(x.shape for x in jax.tree.leaves(linen_params))
  assert sum(int(np.prod(shape)) for shape in nnx_shapes) == 824_458


@pytest.mark.slow
def test_nnx_run_reports_the_epsilon_of_what_ran_and_trains_the_linen_model(
    tmp_path, straight_run):
  # The Linen reference run's flags (RDP: calibrating with PLD would cost this
  # run several seconds more; the PLD path is the shared one, _cli_common.py,
  # run by the Linen tests above).
  # --quiet: no phase messages, progress lines or bar; the statement and
  # the history stay.
  result, stdout = _in_process(tmp_path, "--steps", "4", *LEDGER, "--quiet",
                               script="mnist_nnx.py")
  assert "Compiling" not in stdout and "Evaluating" not in stdout
  assert not [line for line in stdout.splitlines() if line.startswith("step ")]
  assert [h["step"] for h in result["history"]] == [2, 4]
  assert result["history"][-1]["epsilon"] == result["epsilon"]
  for key in ("test_accuracy", "test_loss", "epsilon", "delta", "noise_multiplier", "steps",
              "steps_this_run", "budget_steps", "batch_size", "seconds", "l2_norm_clip",
              "sampler", "neighboring_relation", "accountant", "clipping", "private"):
    assert key in result, key
  assert result["private"] is True and result["clipping"] == "auto"
  assert result["steps"] == 4 and result["batch_size"] == 64
  assert result["sampler"] == "poisson" and result["accountant"] == "rdp"
  # Recomputed from the JSON with dp_accounting itself, not through optax_dp.
  import dp_accounting  # pylint: disable=g-import-not-at-top
  from dp_accounting import rdp  # pylint: disable=g-import-not-at-top
  accountant = rdp.RdpAccountant()
  accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      result["batch_size"] / 60000, dp_accounting.GaussianDpEvent(result["noise_multiplier"])),
      result["steps"]))
  assert result["epsilon"] == pytest.approx(accountant.get_epsilon(result["delta"]), rel=1e-12)
  assert result["epsilon"] <= 1.0
  assert "Guarantee" in stdout and "Poisson" in stdout
  # From the Linen example's initial values, batches and noise key, the NNX
  # swap trains the same model: the same test loss and accuracy (float
  # rounding aside; a wrong clip, noise or update would move the loss by
  # far more than 1e-5 after 4 steps).
  assert result["epsilon"] == straight_run["epsilon"]
  assert result["test_loss"] == pytest.approx(straight_run["test_loss"], rel=1e-5)
  assert result["test_accuracy"] == pytest.approx(straight_run["test_accuracy"], abs=2e-4)
