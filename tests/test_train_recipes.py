"""examples/train.py: every recipe runs a few steps and reports the epsilon of
what ran (recomputed from its JSON with dp_accounting); Fashion-MNIST reads
the same IDX format. The rest of train.py's tests (validation split, errors,
ScatterNet features, the results and their plot): test_train_results.py."""

import os
import sys

import pytest

import example_runs

sys.path.insert(0, example_runs.EXAMPLES)
import recipes  # noqa: E402

FASHION = os.path.join(example_runs.ROOT, "..", "shared", "data", "fashion-mnist")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_each_recipe_runs_and_reports_the_epsilon_of_what_ran(tmp_path, name):
  recipe = recipes.RECIPES[name]
  if recipe["dataset"] == "fashion-mnist" and not os.path.isdir(FASHION):
    pytest.skip("Fashion-MNIST is not beside the project (../shared/data/fashion-mnist)")
  # RDP: PLD calibration would cost each run seconds; the accounting code is
  # the tutorial's (_cli_common.py), whose PLD path test_example_mnist runs.
  # On a subset, evaluated once: ScatterNet features of all 70000 images take
  # a minute to compute, and every evaluation of the 10000 test images
  # seconds; the full data's runs are test_train_results' and the README's.
  # In this process (train.py's main): the run, its record and its printed
  # lines are the same as a fresh process's, without importing JAX again for
  # each recipe; train.py's command line runs as a process in
  # test_train_results.py.
  subset = 512 if recipe["features"] == "scattering" else 4096
  record, stdout = example_runs.run_in_process(
      tmp_path, "--recipe", name, "--steps", "3", "--batch-size", "64", "--eval-every", "3",
      "--accountant", "rdp", "--subset", str(subset), script="train.py")
  assert record["recipe"] == name and record["dataset"] == recipe["dataset"]
  assert record["model"] == recipe["model"] and record["steps"] == 3
  assert record["ema_decay"] == recipe["ema_decay"]
  assert record["augmentation_multiplicity"] == recipe["augmentation_multiplicity"]
  assert record["private"] is True and record["sampler"] == "poisson"
  assert record["dataset_size"] == subset and record["evaluated_on"] == "test"
  assert record["features"] == recipe["features"]
  assert record["epsilon"] == pytest.approx(example_runs.rdp_epsilon(record), rel=1e-12)
  assert record["epsilon"] <= recipe["epsilon"]
  assert 0.0 <= record["test_accuracy"] <= 1.0
  assert "Guarantee" in stdout
