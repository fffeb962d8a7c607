"""The MNIST example on the real, bundled MNIST files: data loading and a short run."""

import argparse
import hashlib
import io
import math
import os
import sys
import time

import numpy as np
import pytest

import optax_dp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)
import _cli_common  # noqa: E402
import mnist_data  # noqa: E402
import example_runs  # noqa: E402  (tests/, on sys.path as the test root)


def test_bundled_files_match_their_checksums():
  folder = mnist_data.DEFAULT_DATA_DIR
  with open(os.path.join(folder, "SHA256SUMS")) as f:
    sums = dict(reversed(line.split()) for line in f if line.strip())
  assert set(sums) == set(mnist_data.FILES.values())
  for name, digest in sums.items():
    with open(os.path.join(folder, name), "rb") as f:
      assert hashlib.sha256(f.read()).hexdigest() == digest, name


def test_load_mnist_shapes_and_label_counts():
  data = mnist_data.load_mnist()
  assert data["train_images"].shape == (60000, 28, 28, 1)
  assert data["test_images"].shape == (10000, 28, 28, 1)
  assert data["train_images"].dtype == np.float32
  assert 0.0 <= data["train_images"].min() and data["train_images"].max() == 1.0
  # Published MNIST digit counts (also listed in the data folder's README).
  np.testing.assert_array_equal(
      np.bincount(data["train_labels"]),
      [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
  np.testing.assert_array_equal(
      np.bincount(data["test_labels"]),
      [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])


def test_read_idx_rejects_garbage(tmp_path):
  bad = tmp_path / "bad.idx"
  bad.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x02ab")
  with pytest.raises(ValueError, match="unsigned-byte"):
    mnist_data.read_idx(str(bad))
  short = tmp_path / "short.idx"
  short.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
  with pytest.raises(ValueError, match="header says"):
    mnist_data.read_idx(str(short))


def test_missing_data_dir_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="--data-dir"):
    mnist_data.load_mnist(str(tmp_path))


_shared_compilation_cache = example_runs.compilation_cache_fixture()


def _run(tmp_path, *args):
  """A run of mnist_linen.py by its main() in this process
  (example_runs.run_in_process): the same run, record and printed lines as a
  fresh process's, without importing JAX again for each run. The script's
  command line runs as a process in test_steps_beyond_the_budget_... (its
  refusal) and in test_example_ledger.py (every run there)."""
  return example_runs.run_in_process(tmp_path, *args, script="mnist_linen.py")


@pytest.mark.slow
def test_short_private_run_reports_the_epsilon_of_what_ran(tmp_path):
  result, stdout = _run(tmp_path, "--steps", "4", "--eval-every", "2", "--clipping", "auto",
                        "--batch-size", "128", "--epsilon", "2.0")
  for key in ("test_accuracy", "epsilon", "delta", "noise_multiplier", "steps",
              "batch_size", "seconds"):
    assert key in result
  assert result["steps"] == 4 and result["batch_size"] == 128
  assert result["sampler"] == "poisson" and result["accountant"] == "pld"
  # The noise was calibrated for the 4 steps that ran, at q = 128/60000...
  sigma = optax_dp.calibrate_noise_multiplier(
      2.0, 1e-5, dataset_size=60000, batch_size=128, steps=4)
  assert result["noise_multiplier"] == sigma
  # ...and the epsilon printed is the accountant's for exactly that run.
  eps = optax_dp.compute_epsilon(sigma, 1e-5, dataset_size=60000, batch_size=128, steps=4)
  assert result["epsilon"] == pytest.approx(eps, rel=1e-12)
  assert result["epsilon"] <= 2.0
  assert 0.0 <= result["test_accuracy"] <= 1.0
  assert "epsilon" in stdout and "Poisson" in stdout


@pytest.mark.slow
@pytest.mark.xla_optimized   # 60 steps: bound by running, not compiling (tests/conftest.py)
def test_no_dp_run_learns_and_claims_no_privacy(tmp_path):
  result, stdout = _run(tmp_path, "--no-dp", "--steps", "60", "--eval-every", "60")
  assert result["private"] is False and result["epsilon"] is None
  assert "NOT private" in stdout
  # 60 non-private SGD steps at batch 256 reliably pass 85% on MNIST.
  assert result["test_accuracy"] > 0.85


def test_tfds_path_without_tensorflow_datasets_is_a_clear_error(monkeypatch):
  # The optional tfds extra is not installed in CI: the example must say how to
  # get it instead of crashing, and the default (--data idx) needs neither.
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(SystemExit, match=r"pip install -e '\.\[tfds\]'"):
    mnist_data.load_mnist_tfds()


# ---------------------------------------------------------------------------
# The privacy ledger in the example: budget refusal and overrun, samplers
# (resume, accumulation, devices, NNX: test_example_ledger.py). Small settings (batch 64, 4 steps) keep each run to
# seconds of training; the comparisons are exact (same numbers, not close).
# LEDGER runs account with RDP: what these tests check (the same epsilon after
# a resume, the refusal past the budget, the ledger of K physical batches or 8
# devices) is the accountant-independent bookkeeping, and RDP calibrates in a
# fraction of PLD's time. The PLD path of the example is the default run's
# (test_short_private_run_...) and the shuffle sampler's.

SMALL = ("--batch-size", "64", "--eval-every", "2", "--clipping", "auto")
LEDGER = (*SMALL, "--accountant", "rdp")


@pytest.mark.slow
def test_steps_beyond_the_budget_are_refused_unless_told(tmp_path, capsys):
  sampler = optax_dp.PoissonSampler(60000, 64)
  # sigma 0.81 at epsilon 1 (RDP): the budget allows 5 steps.
  budget = optax_dp.privacy_budget(sampler=sampler, target_epsilon=1.0, target_delta=1e-5,
                                   noise_multiplier=0.81, accountant="rdp")
  steps = budget.max_steps + 2
  status, stderr = example_runs.run_refusal_in_process(
      capsys, tmp_path, "--steps", str(steps), "--noise-multiplier", "0.81", "--epsilon", "1.0",
      *LEDGER, script="mnist_linen.py")
  assert status == 2
  assert "beyond the privacy budget" in stderr
  assert not (tmp_path / "refused.json").exists()   # the refused run wrote no record
  result, _ = _run(tmp_path, "--steps", str(steps), "--noise-multiplier", "0.81",
                   "--epsilon", "1.0", "--allow-budget-overrun", *LEDGER)
  # The run went past the budget and says so with the larger epsilon.
  assert result["steps"] == steps and result["budget_steps"] == budget.max_steps
  expected = optax_dp.compute_epsilon(0.81, 1e-5, sampler=sampler, steps=steps, accountant="rdp")
  assert result["epsilon"] == pytest.approx(expected, rel=1e-12)
  assert result["epsilon"] > 1.0


@pytest.mark.slow
@pytest.mark.parametrize("sampler,accountant,relation", [
    ("fixed", "rdp", "replace one"),
    ("shuffle", "pld", "zero out"),
])
def test_other_samplers_report_their_own_accounting(tmp_path, sampler, accountant, relation):
  result, stdout = _run(tmp_path, "--steps", "4", "--sampler", sampler, *SMALL)
  assert result["sampler"] == sampler and result["accountant"] == accountant
  assert relation in result["neighboring_relation"]
  smp = optax_dp.make_sampler(sampler, dataset_size=60000, batch_size=64)
  sigma = optax_dp.calibrate_noise_multiplier(1.0, 1e-5, sampler=smp, steps=4)
  assert result["noise_multiplier"] == sigma
  assert result["epsilon"] == pytest.approx(
      optax_dp.compute_epsilon(sigma, 1e-5, sampler=smp, steps=4), rel=1e-12)
  assert result["epsilon"] <= 1.0
  assert relation in stdout


# ---------------------------------------------------------------------------
# What the examples say while they run (_cli_common.Progress, shared by the
# three scripts), in-process: a terminal gets a tqdm bar, anything else plain
# lines, --quiet neither; the history is recorded either way. (The runs of
# test_example_ledger.py check a real run's piped output and history.)


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def _drive(stream, quiet=False, plain_every=60.0):
  """Six steps evaluated every 3, with a falling loss and a rising epsilon."""
  args = argparse.Namespace(quiet=quiet, eval_every=3)
  progress = _cli_common.Progress(args, total=6, eval_size=100, stream=stream,
                                  plain_every=plain_every)
  for step in range(1, 7):
    progress.batch(64)
    progress.step(step, 1.0 / step)
    if step % 3 == 0:
      progress.evaluating()
      progress.evaluated(step, train_loss=1.0 / step, train_accuracy=0.5,
                         eval_loss=1.0 / step, eval_accuracy=0.6, epsilon=step / 10)
  progress.close()
  return progress


def test_progress_bar_on_a_terminal_plain_lines_elsewhere_nothing_when_quiet():
  terminal, pipe, quiet = _Terminal(), io.StringIO(), io.StringIO()
  for stream, kwargs in ((terminal, {}), (pipe, {"plain_every": 0.0}), (quiet, {"quiet": True})):
    progress = _drive(stream, **kwargs)
    assert [h["step"] for h in progress.history] == [3, 6]
    assert [h["epsilon"] for h in progress.history] == [0.3, 0.6]
    assert set(progress.history[0]) == {"step", "train_loss", "train_accuracy", "eval_loss",
                                        "eval_accuracy", "epsilon", "seconds"}
  for text in (terminal.getvalue(), pipe.getvalue()):
    assert text.count("Compiling the train step for batch shape 64 ...") == 1
    assert "Train step compiled for batch shape 64 in" in text
    assert "Evaluating on the test set (100 examples) every 3 steps" in text
    assert "step     6/6  train loss 0.1667 acc 0.5000  test loss 0.1667 acc 0.6000  " \
           "epsilon 0.6" in text
  assert "%|" in terminal.getvalue() and "step/s" in terminal.getvalue()   # the bar
  assert "\r" not in pipe.getvalue() and "%|" not in pipe.getvalue()
  assert "step     2/6  loss 0.5000" in pipe.getvalue()   # a progress line between evaluations
  assert quiet.getvalue() == ""


def test_each_new_batch_shape_is_announced_once_and_its_compile_kept_out_of_the_eta():
  # Issue 31 (point 11): a Poisson run's second padding size compiled the
  # train step again unannounced, and the bar's ETA jumped (2/200
  # [00:06<21:25]). Each new size is announced once, with its padding
  # bucket, and its compile's time is left out of the bar's rate.
  terminal, pipe, quiet = _Terminal(), io.StringIO(), io.StringIO()
  compile_seconds = 0.3
  for stream in (terminal, pipe, quiet):
    args = argparse.Namespace(quiet=stream is quiet, eval_every=100)
    progress = _cli_common.Progress(args, total=6, stream=stream, plain_every=0.0,
                                    shapes=(32, 64, 80))
    seen = set()
    for step, size in enumerate([64, 64, 32, 64, 80, 32], start=1):
      progress.batch(size)
      time.sleep(compile_seconds if size not in seen else 0.01)   # a compile, or a step
      seen.add(size)
      progress.step(step, 1.0)
    if stream is terminal:
      # The bar started after the first compile; the two later ones (1 s)
      # are not in its elapsed time, from which its rate and ETA come.
      assert progress.bar.format_dict["elapsed"] < 2 * compile_seconds - 0.2
    assert progress._excluded >= 2 * compile_seconds  # pylint: disable=protected-access
    progress.close()
  for text in (terminal.getvalue(), pipe.getvalue()):
    announced = [line for line in text.splitlines() if line.startswith("Compiling")]
    assert announced == [
        "Compiling the train step for batch shape 64 (padding bucket 2 of 3) ...",
        "Compiling the train step for batch shape 32 (padding bucket 1 of 3) ...",
        "Compiling the train step for batch shape 80 (padding bucket 3 of 3) ..."]
    assert text.count("Train step compiled for batch shape") == 3
    assert text.count("(left out of the time left)") == 2
  assert quiet.getvalue() == ""


def test_batch_shapes_are_the_physical_padding_sizes():
  sampler = optax_dp.PoissonSampler(60000, 32, pad_to_multiple_of=32)
  assert _cli_common.batch_shapes(sampler, 3) == sampler.padding_sizes(3)
  # With accumulation, each logical size splits into k physical batches,
  # rounded up to the multiple.
  sizes = sampler.padding_sizes(3)
  assert _cli_common.batch_shapes(sampler, 3, 2) == tuple(dict.fromkeys(
      32 * math.ceil(math.ceil(size / 2) / 32) for size in sizes))
  assert _cli_common.batch_shapes(optax_dp.make_sampler(
      "fixed", dataset_size=60000, batch_size=64), 3) is None


@pytest.mark.slow
def test_a_run_announces_the_compile_of_each_new_padding_size(tmp_path):
  # 3 steps at batch 32 draw batches of two of the three padding sizes
  # (the sampler's, recomputed here); the run says so before each compile.
  steps, batch_size = 3, 32
  sampler = optax_dp.PoissonSampler(
      60000, batch_size, optax_dp.poisson_max_batch_size(60000, batch_size, steps),
      pad_to_multiple_of=32)
  buckets = sampler.padding_sizes(steps)
  sizes = list(dict.fromkeys(len(b.indices) for b in sampler.batches(0, steps=steps)))
  assert len(sizes) >= 2
  _, stdout = _run(tmp_path, "--steps", str(steps), "--batch-size", str(batch_size),
                   "--eval-every", str(steps), "--accountant", "rdp")
  announced = [line for line in stdout.splitlines() if line.startswith("Compiling the train")]
  assert announced == [
      f"Compiling the train step for batch shape {size} (padding bucket "
      f"{buckets.index(size) + 1} of {len(buckets)}) ..." for size in sizes]
  assert stdout.count("Train step compiled for batch shape") == len(sizes)


def test_format_epsilon_keeps_significant_digits():
  assert _cli_common.format_epsilon(1e-5) == "1e-05"
  assert _cli_common.format_epsilon(0.99957) == "0.9996"
  assert _cli_common.format_epsilon(float("inf")) == "inf (not private)"


def test_stop_at_says_where_it_stopped_and_how_to_resume():
  linen = example_runs.import_example("mnist_linen")
  args = linen.build_parser().parse_args(["--steps", "40", "--stop-at", "20"])
  text = linen.stopped_early(args, 20)
  assert text.startswith("Stopped early at step 20 of --steps 40 (--stop-at 20).")
  assert "needs --checkpoint-dir" in text
  args = linen.build_parser().parse_args(["--steps", "40", "--stop-at", "20", "--eval-every",
                                          "5", "--checkpoint-dir", "my ckpt"])
  command = linen.stopped_early(args, 20).splitlines()[-1].strip()
  assert command.startswith("python ") and command.endswith(
      "mnist_linen.py --resume 'my ckpt' --steps 40 --eval-every 5")
