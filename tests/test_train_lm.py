"""examples/train_lm.py: every language-model recipe runs 3 steps and reports
the epsilon of what ran (recomputed from its JSON with dp_accounting), the
group-privacy reading for speakers, and the non-private reference."""

import glob
import json
import os
import sys

import numpy as np
import pytest

import example_runs

sys.path.insert(0, example_runs.EXAMPLES)
import recipes  # noqa: E402

train_lm = example_runs.import_example("train_lm")

# On a subset of the windows, evaluated once, RDP (PLD calibration would cost
# each run seconds; the PLD path is the tutorial's, _cli_common.py), a small
# model (compiles in a fraction of the recipe's time); the LoRA and full
# fine-tunes pretrain 2 steps (cached in the test's folder).
QUICK = ("--steps", "3", "--batch-size", "32", "--eval-every", "3", "--accountant", "rdp",
         "--subset", "1024", "--eval-windows", "64", "--pretrain-steps", "2",
         "--pretrain-batch-size", "16", "--length", "16", "--features", "32", "--layers", "1",
         "--heads", "2")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(recipes.LM_RECIPES))
def test_each_lm_recipe_runs_and_reports_the_epsilon_of_what_ran(tmp_path, name):
  recipe = recipes.LM_RECIPES[name]
  users = recipe["privacy_unit"] == "user"
  # The first 1024 windows hold 4 roles: a user-level run samples 2 of them.
  quick = [("2" if users and a == "32" else a) for a in QUICK]
  record, stdout = example_runs.run_in_process(
      tmp_path, "--recipe", name, *quick, "--cache-dir", str(tmp_path / "cache"),
      script="train.py")   # train.py hands the shakespeare-* recipes to train_lm.py
  assert record["recipe"] == name and record["model"] == recipe["model"]
  assert record["dataset"] == "shakespeare" and record["steps"] == 3
  assert record["private"] is True and record["evaluated_on"] == "test"
  assert record["sampler"] == ("user_poisson" if users else "poisson")
  assert record["privacy_unit"] == recipe["privacy_unit"] and record["num_examples"] == 1024
  # The accounting's population: the roles of a user-level run, else the windows.
  assert record["dataset_size"] == (4 if users else 1024)
  # The roles and their windows: 1024 windows over 4 roles, the largest holds
  # at least a quarter (the group a speaker is, for an example-level run).
  assert record["num_roles"] == 4
  assert 256 <= record["role_windows_max"] <= 1024
  assert 1 <= record["role_windows_median"] <= record["role_windows_max"]
  assert record["epsilon"] == pytest.approx(example_runs.rdp_epsilon(record), rel=1e-12)
  assert record["epsilon"] <= recipe["epsilon"]
  assert 0.0 <= record["test_accuracy"] <= 1.0 and record["test_loss"] > 0
  assert "Guarantee" in stdout and "bits per character" in stdout
  if users:
    assert "differential privacy for each user" in stdout
    assert "group of m examples" not in stdout
  else:   # what the example-level guarantee gives a speaker with m windows
    assert "protected as a group of m examples" in stdout
    assert "user-level DP" in stdout
  if recipe["finetune"] != "none":
    assert "Pretraining on the public plays without privacy" in stdout


@pytest.mark.slow
def test_non_private_reference_claims_no_privacy(tmp_path):
  record, stdout = example_runs.run_in_process(
      tmp_path, "--recipe", "shakespeare-eps8", "--no-dp", *QUICK, "--cache-dir",
      str(tmp_path / "cache"), script="train_lm.py")
  assert record["private"] is False and record["epsilon"] is None
  assert "NOT private" in stdout and "group" not in stdout


def test_bad_lm_flags_are_refused(capsys):
  status, stderr = example_runs.refusal_in_process(
      capsys, "--recipe", "shakespeare-lstm-eps8", "--finetune", "lora", script="train_lm.py")
  assert status == 2 and "--finetune needs a transformer" in stderr
  status, stderr = example_runs.refusal_in_process(
      capsys, "--recipe", "shakespeare-eps8", "--sampler", "shuffle", script="train_lm.py")
  assert status == 2 and "Poisson sampling" in stderr
  status, stderr = example_runs.refusal_in_process(
      capsys, "--recipe", "shakespeare-eps8", "--clip-only", "--no-dp", script="train_lm.py")
  assert status == 2 and "--clip-only is the example-level private run" in stderr
  status, stderr = example_runs.refusal_in_process(
      capsys, "--recipe", "shakespeare-eps8", "--public-only", script="train_lm.py")
  assert status == 2 and "--public-only evaluates the publicly pretrained model" in stderr
  status, stderr = example_runs.refusal_in_process(
      capsys, "--recipe", "shakespeare-eps8", "--mesh", "data=2,tp=4", script="train_lm.py")
  assert status == 2 and "give data=N and one of fsdp=M or model=M" in stderr
  status, stderr = example_runs.refusal_in_process(   # this process sees 1 device
      capsys, "--recipe", "shakespeare-eps8", "--mesh", "data=2,fsdp=4", script="train_lm.py")
  assert status == 2 and "has 8 devices; JAX sees 1" in stderr
  status, stderr = example_runs.refusal_in_process(
      capsys, "--recipe", "nope", script="train_lm.py")
  assert status == 2 and "choose from" in stderr


LM_RESULTS = os.path.join(example_runs.EXAMPLES, "results", "shakespeare")


@pytest.mark.slow
def test_the_published_lm_records_claim_the_epsilon_of_what_ran():
  # Each record under examples/results/shakespeare/ (the README's language-
  # model rows; tuning/: the validation runs that chose them) states the epsilon of what ran: recomputed here with
  # dp_accounting's PLD accountant from its Poisson rate (its batch size over
  # the training windows, which must be the corpus' count at the recipe's
  # length), noise multiplier and steps; a non-private reference claims none.
  import shakespeare_data  # pylint: disable=import-outside-toplevel
  paths = sorted(glob.glob(os.path.join(LM_RESULTS, "**", "*.json"), recursive=True))
  assert paths
  corpus = shakespeare_data.load()
  for path in paths:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    name = os.path.basename(path)
    recipe = recipes.LM_RECIPES[record["recipe"]]
    users = record.get("privacy_unit") == "user"
    assert record["dataset"] == "shakespeare", name
    if record.get("public_only"):   # the pretrained model as it is: no private data read
      assert record["private"] is False and record["epsilon"] is None, name
      assert record["steps"] == 0 and recipe["finetune"] != "none", name
      continue
    assert record["sampler"] == ("user_poisson" if users else "poisson"), name
    tuning = os.path.basename(os.path.dirname(path)) == "tuning"
    assert record["evaluated_on"] == ("validation" if tuning else "test"), name
    assert record["delta"] == 1e-5, name
    windows, roles = shakespeare_data.windows(corpus, "train", recipe["length"])
    # The population the Poisson rate is over: the roles (user level), else the windows.
    if record.get("role_fraction", 1.0) != 1.0:   # a fraction of the roles (user level)
      assert users and record["dataset_size"] == max(1, round(
          record["role_fraction"] * len(set(roles.tolist())))), name
    else:
      assert record["dataset_size"] == (len(set(roles.tolist())) if users else len(windows)), name
      if "role_windows_max" in record:   # the group a speaker is (the LM table's column)
        counts = np.unique(roles, return_counts=True)[1]
        assert record["num_roles"] == len(counts), name
        assert record["role_windows_max"] == counts.max(), name
        assert record["role_windows_median"] == int(np.median(counts)), name
    if not record["private"]:
      assert record["epsilon"] is None and record["noise_multiplier"] is None, name
      continue
    assert record["accountant"] == "pld" and record["steps"] == record["budget_steps"], name
    # rel 1e-6: as for the MNIST records (tests/test_train_results.py).
    assert record["epsilon"] == pytest.approx(example_runs.pld_epsilon(record), rel=1e-6), name
    assert record["epsilon"] <= recipe["epsilon"], name


@pytest.mark.slow
def test_public_only_scores_the_pretrained_model_without_the_private_plays(tmp_path):
  # The baseline a fine-tune is measured against: the publicly pretrained
  # model as it is. It equals a non-private fine-tune that moves nothing
  # (learning rate 0: Adam's updates are 0, LoRA's B starts at 0).
  cache = ("--cache-dir", str(tmp_path / "cache"))
  public, stdout = example_runs.run_in_process(
      tmp_path, "--recipe", "shakespeare-lora-eps1", "--public-only", *QUICK, *cache,
      name="public", script="train_lm.py")
  assert public["private"] is False and public["public_only"] is True
  assert public["epsilon"] is None and public["steps"] == 0
  assert "not trained on the private plays (no privacy cost)" in stdout
  unmoved, _ = example_runs.run_in_process(
      tmp_path, "--recipe", "shakespeare-lora-eps1", "--no-dp", "--learning-rate", "0",
      *QUICK, *cache, name="unmoved", script="train_lm.py")
  assert public["test_accuracy"] == pytest.approx(unmoved["test_accuracy"], abs=1e-6)
  assert public["test_loss"] == pytest.approx(unmoved["test_loss"], rel=1e-5)


@pytest.mark.slow
def test_clip_only_ablation_clips_adds_no_noise_and_claims_no_privacy(tmp_path):
  record, stdout = example_runs.run_in_process(
      tmp_path, "--recipe", "shakespeare-eps8", "--clip-only", *QUICK, "--cache-dir",
      str(tmp_path / "cache"), script="train_lm.py")
  assert record["private"] is False and record["epsilon"] is None
  assert record["clip_only"] is True and record["clipping"] == "auto"
  assert record["noise_multiplier"] is None
  assert "NOT private (--clip-only: clipped, no noise)" in stdout and "group" not in stdout
  assert "Clipping WITHOUT noise" in stdout
