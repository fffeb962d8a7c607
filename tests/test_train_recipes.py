"""examples/train.py: every recipe runs a few steps and reports the epsilon of
what ran (recomputed from its JSON with dp_accounting); Fashion-MNIST reads
the same IDX format; a validation split replaces the test set."""

import os
import sys

import dp_accounting
from dp_accounting import rdp
import pytest

import example_runs

sys.path.insert(0, example_runs.EXAMPLES)
import recipes  # noqa: E402

_shared_compilation_cache = example_runs.compilation_cache_fixture()
FASHION = os.path.join(example_runs.ROOT, "..", "shared", "data", "fashion-mnist")


def _rdp_epsilon(record):
  accountant = rdp.RdpAccountant()
  accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      record["batch_size"] / record["dataset_size"],
      dp_accounting.GaussianDpEvent(record["noise_multiplier"])), record["steps"]))
  return accountant.get_epsilon(record["delta"])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_each_recipe_runs_and_reports_the_epsilon_of_what_ran(tmp_path, name):
  recipe = recipes.RECIPES[name]
  if recipe["dataset"] == "fashion-mnist" and not os.path.isdir(FASHION):
    pytest.skip("Fashion-MNIST is not beside the project (../shared/data/fashion-mnist)")
  # RDP: PLD calibration would cost each run seconds; the accounting code is
  # the tutorial's (_cli_common.py), whose PLD path test_example_mnist runs.
  record, stdout = example_runs.run(
      tmp_path, "--recipe", name, "--steps", "3", "--batch-size", "64",
      "--accountant", "rdp", script="train.py")
  assert record["recipe"] == name and record["dataset"] == recipe["dataset"]
  assert record["model"] == recipe["model"] and record["steps"] == 3
  assert record["ema_decay"] == recipe["ema_decay"]
  assert record["augmentation_multiplicity"] == recipe["augmentation_multiplicity"]
  assert record["private"] is True and record["sampler"] == "poisson"
  assert record["dataset_size"] == 60000 and record["evaluated_on"] == "test"
  assert record["epsilon"] == pytest.approx(_rdp_epsilon(record), rel=1e-12)
  assert record["epsilon"] <= recipe["epsilon"]
  assert 0.0 <= record["test_accuracy"] <= 1.0
  assert "Guarantee" in stdout


@pytest.mark.slow
def test_validation_split_is_held_out_of_training_and_accounting(tmp_path):
  # Also the materialised path: per-example gradients that dp_aggregate clips.
  record, stdout = example_runs.run(
      tmp_path, "--recipe", "mnist-eps1", "--steps", "2", "--batch-size", "64",
      "--validation-size", "5000", "--accountant", "rdp", "--clipping", "per-example",
      script="train.py")
  assert record["clipping"] == "per-example"
  assert record["evaluated_on"] == "validation" and record["dataset_size"] == 55000
  assert "55000 examples" in stdout and "validation set (5000 examples)" in stdout
  assert record["epsilon"] == pytest.approx(_rdp_epsilon(record), rel=1e-12)


def test_unknown_recipe_and_bad_validation_size_are_clear_errors(tmp_path):
  proc, _ = example_runs.run_raw(tmp_path, "--recipe", "nope", script="train.py")
  assert proc.returncode == 2 and "choose from" in proc.stderr
  proc, _ = example_runs.run_raw(tmp_path, "--validation-size", "-1", script="train.py")
  assert proc.returncode == 2 and "--validation-size" in proc.stderr
