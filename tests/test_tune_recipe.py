"""examples/train.py --tune (examples/tune_recipe.py): private tuning of a
recipe whose record states the epsilon of the whole procedure, recomputed
here from the record with dp-accounting; and its refusals."""

import glob
import json
import math
import os
import sys

import dp_accounting
from dp_accounting import dp_event
from dp_accounting import rdp
import pytest

import example_runs

sys.path.insert(0, example_runs.EXAMPLES)
import tune_recipe  # noqa: E402

_shared_compilation_cache = example_runs.compilation_cache_fixture()


def _poisson_steps(rate, noise_multiplier, steps):
  return dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)


def _assert_nothing_reveals_k(record):
  # K (the number of trials), the trials, the tuning seed and the wall time
  # (which grows with K) must stay out of a published record: the guarantee
  # of Papernot & Steinke holds for the selected output with K hidden.
  assert set(tune_recipe.WITHHELD) == {"num_trials", "per_trial", "tuning_seed", "seconds"}
  for key in tune_recipe.WITHHELD:
    assert key not in record and key not in record["tuning"], key
  assert record["tuning"]["withheld"] == list(tune_recipe.WITHHELD)


def _rdp_curve(event):
  accountant = rdp.RdpAccountant()
  accountant.compose(event)
  return accountant.rdp


@pytest.mark.slow
def test_tuning_record_holds_every_trial_and_the_end_to_end_epsilon(tmp_path):
  # Tuning seed 6 draws K = 3 from a geometric count of mean 2; candidates
  # differ in batch size, so two noise multipliers take part.
  operator_path = tmp_path / "operator.json"
  published, stdout = example_runs.run_in_process(
      tmp_path, "--recipe", "mnist-eps1", "--tune", "learning_rate=1,2 batch_size=32,64",
      "--batch-size", "64", "--epochs", "0.1", "--validation-size", "500", "--subset", "1000",
      "--trials-mean", "2", "--tuning-seed", "6", "--quiet",
      "--operator-record", str(operator_path))
  record = json.loads(operator_path.read_text())
  # The published record is the operator's less what reveals K, and nothing
  # in it reveals K.
  _assert_nothing_reveals_k(published)
  withheld = set(tune_recipe.WITHHELD)
  assert {**published, "tuning": None} == {
      k: v for k, v in {**record, "tuning": None}.items() if k not in withheld}
  assert published["tuning"] == {
      k: v for k, v in record["tuning"].items() if k not in withheld}
  assert record["seconds"] > 0
  tuning = record["tuning"]
  assert tuning["tuning_seed"] == 6
  assert tuning["num_trials"] == len(tuning["per_trial"]) == 3
  assert tuning["trials"] == {"mean": 2.0, "shape": 1.0}
  assert len(tuning["candidates"]) == 4
  # The best noisy score was selected, and it is the released score.
  best = max(tuning["per_trial"], key=lambda t: t["private_score"])
  assert tuning["selected"] == best["candidate"]
  assert tuning["selected_score"] == best["private_score"]
  # The end-to-end epsilon is the RDP of RepeatAndSelect of the reference
  # trial (the flags' own batch 64, with its noise and the score's).
  n = record["dataset_size"]
  ref = tuning["reference"]
  assert ref["batch_size"] == 64 and ref["steps"] == round(0.1 * n / 64)
  trial = dp_accounting.ComposedDpEvent([
      _poisson_steps(64 / n, ref["noise_multiplier"], ref["steps"]),
      dp_accounting.GaussianDpEvent(tuning["score_noise_multiplier"])])
  accountant = rdp.RdpAccountant()
  accountant.compose(dp_event.RepeatAndSelectDpEvent(trial, 2.0, 1.0))
  assert record["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
  assert record["epsilon"] <= 1.0 and record["epsilon"] > 0.99   # calibrated to the target
  assert ref["single_run_epsilon"]["pld"] < ref["single_run_epsilon"]["rdp"] < record["epsilon"]
  # Each trial ran its candidate's batch, steps and noise; its single-run
  # epsilon is its own; its event (with the score) is no less private than
  # the reference's at every RDP order (batch 64 has the reference's noise).
  noise = {}
  for t in tuning["per_trial"]:
    batch = t["candidate"]["batch_size"]
    assert t["batch_size"] == batch and t["steps"] == round(0.1 * n / batch)
    noise[batch] = t["noise_multiplier"]
    assert t["epsilon"] == pytest.approx(example_runs.pld_epsilon(
        dict(batch_size=batch, dataset_size=n, noise_multiplier=t["noise_multiplier"],
             steps=t["steps"], delta=1e-5)), rel=1e-6)
    event = dp_accounting.ComposedDpEvent([
        _poisson_steps(batch / n, t["noise_multiplier"], t["steps"]),
        dp_accounting.GaussianDpEvent(tuning["score_noise_multiplier"])])
    assert all(a <= b for a, b in zip(_rdp_curve(event), _rdp_curve(trial)))
  if 64 in noise:
    assert noise[64] == ref["noise_multiplier"]
  assert 32 in noise and noise[32] != ref["noise_multiplier"]
  assert 0 <= record["test_accuracy"] <= 1 and record["evaluated_on"] == "test"
  assert "Tuning: 3 trials" in stdout and "end to end (" in stdout


@pytest.mark.parametrize("flags, message", [
    (["--tune", "learning_rate=1,2"], "--validation-size"),
    (["--tune", "learning_rate=1,2", "--validation-size", "500", "--no-dp"], "--no-dp"),
    (["--tune", "learning_rate=1,2", "--validation-size", "500", "--noise-multiplier", "1"],
     "--noise-multiplier"),
    (["--tune", "lr=1,2", "--validation-size", "500"], "cannot be tuned"),
    (["--tune", "learning_rate=a", "--validation-size", "500"], "not float"),
    (["--tune", "learning_rate", "--validation-size", "500"], "NAME=V1,V2"),
    (["--tune", "learning_rate=1 learning_rate=2", "--validation-size", "500"], "twice"),
    (["--tune", "epochs=1,2", "--validation-size", "500", "--steps", "10"], "--steps"),
    (["--tune", "learning_rate=1", "--validation-size", "500", "--score-noise-multiplier",
      "0"], "not private"),
    (["--tune", "learning_rate=1", "--validation-size", "500", "--json-out", "t.json",
      "--operator-record", "t.json"], "must not be the --json-out"),
    (["--operator-record", "t.json"], "needs --tune"),
])
def test_tune_refusals_name_the_fix(capsys, flags, message):
  status, stderr = example_runs.refusal_in_process(capsys, "--recipe", "mnist-eps1", *flags)
  assert status == 2 and message in stderr


@pytest.mark.parametrize("mean, shape", [("1", "1"), ("8", "-0.5")])
def test_a_trial_count_outside_the_bound_is_refused(capsys, tmp_path, mean, shape):
  # A geometric count of mean 1 is a fixed K = 1 in disguise (the truncated
  # negative binomials need mean > 1); shapes below 0 are outside
  # dp-accounting's bound.
  status, stderr = example_runs.run_refusal_in_process(
      capsys, tmp_path, "--recipe", "mnist-eps1", "--tune", "learning_rate=1,2",
      "--validation-size", "500", "--subset", "1000", "--trials-mean", mean,
      "--trials-shape", shape, "--quiet")
  assert status == 2 and "TrialCount" in stderr


def test_grid_is_the_product_in_a_fixed_order():
  assert tune_recipe.parse_grid("learning_rate=1,2; epochs=3") == [
      {"learning_rate": 1.0, "epochs": 3.0}, {"learning_rate": 2.0, "epochs": 3.0}]
  assert tune_recipe.parse_grid("batch-size=8") == [{"batch_size": 8}]
  assert not math.isnan(tune_recipe.parse_grid("momentum=0")[0]["momentum"])


TUNED = os.path.join(example_runs.EXAMPLES, "results", "tuned")


def test_the_published_tuning_records_claim_the_end_to_end_epsilon():
  # The README's end-to-end rows (results/tuned/, plot_results.load_tuned):
  # each record's epsilon, recomputed from its reference trial (Poisson
  # sampling of its batch from its training examples, its noise and steps,
  # and the score's Gaussian) and its trial-count distribution, is the one it
  # states and within the target; and nothing in it reveals K. (That each
  # trial is no less private than the reference is tested on a run whose
  # operator record is at hand, above.)
  paths = sorted(glob.glob(os.path.join(TUNED, "*.json")))
  assert paths
  for path in paths:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    name, tuning = os.path.basename(path), record["tuning"]
    n, ref = record["dataset_size"], tuning["reference"]
    trial = dp_accounting.ComposedDpEvent([
        _poisson_steps(ref["batch_size"] / n, ref["noise_multiplier"], ref["steps"]),
        dp_accounting.GaussianDpEvent(tuning["score_noise_multiplier"])])
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.RepeatAndSelectDpEvent(
        trial, tuning["trials"]["mean"], tuning["trials"]["shape"]))
    assert record["epsilon"] == pytest.approx(accountant.get_epsilon(record["delta"]),
                                              rel=1e-9), name
    assert record["epsilon"] <= tuning["target_epsilon"], name
    assert tuning["trials"]["mean"] >= 8, name   # at least 8 candidates in expectation
    assert tuning["selected"] in tuning["candidates"], name
    _assert_nothing_reveals_k(record)
