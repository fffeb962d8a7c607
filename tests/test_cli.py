"""Tests for the command line: `python -m optax_dp` / `optax-dp` (optax_dp._cli).

A few cases run the real entry points in subprocesses (each pays the ~3 s
import); the rest call `optax_dp._cli.main(argv)` in-process. Every number the
CLI prints is checked against the library function computing it from the same
inputs, and every step count derived from --epochs against exact arithmetic.
"""

import argparse
from fractions import Fraction
import json
import math
import os
import re
import subprocess
import sys

import pytest

import example_runs  # tests/, on sys.path as the test root
import optax_dp
from optax_dp import _cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSOLE_SCRIPT = os.path.join(REPO, ".venv", "bin", "optax-dp")

POISSON = ["--dataset-size", "60000", "--batch-size", "256"]


def _run_main(capsys, argv):
  """(exit status, stdout, stderr) of main(argv); argparse errors exit 2."""
  try:
    status = _cli.main(argv)
  except SystemExit as e:  # argparse exits on malformed arguments
    status = e.code
  out, err = capsys.readouterr()
  return status, out, err


def _json(capsys, argv):
  status, out, err = _run_main(capsys, argv + ["--json"])
  assert status == 0, err
  assert err == ""
  return json.loads(out)


def _subprocess(args, executable=None):
  cmd = [executable] if executable else [sys.executable, "-m", "optax_dp"]
  return subprocess.run(cmd + args, capture_output=True, text=True, timeout=120,
                        cwd=REPO)


# ---------------------------------------------------------------------------
# Real entry points.

@pytest.mark.subprocess
def test_module_entry_point_epsilon_json():
  proc = _subprocess(["epsilon", *POISSON, "--steps", "1000",
                      "--noise-multiplier", "1.1", "--delta", "1e-5", "--json"])
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  expected = optax_dp.compute_epsilon(1.1, 1e-5, dataset_size=60000, batch_size=256,
                                      steps=1000)
  # The same computation in another process: equal up to float printing.
  assert result["epsilon"] == pytest.approx(expected, rel=1e-12)
  assert (result["sampler"], result["accountant"], result["steps"]) == (
      "poisson", "pld", 1000)


@pytest.mark.subprocess
def test_module_entry_point_bad_input_exits_2():
  proc = _subprocess(["epsilon", *POISSON, "--steps", "100",
                      "--noise-multiplier", "-1", "--delta", "1e-5"])
  assert proc.returncode == 2
  assert proc.stdout == ""
  assert "noise_multiplier" in proc.stderr and "error" in proc.stderr


@pytest.mark.subprocess
def test_console_script():
  if not os.path.exists(CONSOLE_SCRIPT):
    pytest.skip(f"console script not installed at {CONSOLE_SCRIPT} "
                "(pip install -e . creates it)")
  proc = _subprocess(["epsilon", "--dataset-size", "1000", "--batch-size", "10",
                      "--steps", "100", "--noise-multiplier", "2", "--delta", "1e-5",
                      "--sampler", "shuffle", "--json"], executable=CONSOLE_SCRIPT)
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  assert result["epsilon"] == pytest.approx(optax_dp.compute_epsilon(
      2.0, 1e-5, steps=100, sampler=optax_dp.ShuffleSampler(1000, 10)), rel=1e-12)


# ---------------------------------------------------------------------------
# epsilon and calibrate agree with the library.

# (extra CLI flags, sampler, accountant the library should use)
SMALL = ["--dataset-size", "10000", "--batch-size", "100"]
EPSILON_CASES = [
    ([], optax_dp.PoissonSampler(10000, 100), "pld"),
    (["--accountant", "rdp"], optax_dp.PoissonSampler(10000, 100), "rdp"),
    (["--sampler", "fixed"], optax_dp.FixedBatchSampler(10000, 100), "rdp"),
    (["--sampler", "shuffle"], optax_dp.ShuffleSampler(10000, 100), "pld"),
    (["--sampler", "shuffle", "--accountant", "rdp"],
     optax_dp.ShuffleSampler(10000, 100), "rdp"),
    (["--max-batch-size", "150"], optax_dp.PoissonSampler(10000, 100, 150), "pld"),
]


@pytest.mark.parametrize("flags,sampler,accountant", EPSILON_CASES,
                         ids=[" ".join(c[0]) or "default" for c in EPSILON_CASES])
def test_epsilon_matches_compute_epsilon(capsys, flags, sampler, accountant):
  argv = ["epsilon", *SMALL, "--steps", "250", "--noise-multiplier", "1.3",
          "--delta", "1e-5", *flags]
  result = _json(capsys, argv)
  expected = optax_dp.compute_epsilon(1.3, 1e-5, steps=250, sampler=sampler,
                                      accountant=accountant)
  assert result["epsilon"] == expected
  assert result["accountant"] == accountant
  assert result["sampler"] == sampler.name
  assert result["neighboring_relation"] == sampler.neighboring_relation
  assert (result["steps"], result["noise_multiplier"], result["delta"]) == (250, 1.3, 1e-5)
  assert (result["dataset_size"], result["batch_size"]) == (10000, 100)
  # The text statement reports the same epsilon (4 significant digits).
  status, out, _ = _run_main(capsys, argv)
  assert status == 0
  assert f"({expected:.4g}, 1e-05)" in out
  assert out.strip() == result["statement"]


def test_truncated_poisson_epsilon(capsys):
  result = _json(capsys, ["epsilon", "--dataset-size", "200", "--batch-size", "20",
                          "--steps", "5", "--noise-multiplier", "3", "--delta", "1e-5",
                          "--max-batch-size", "25", "--truncate"])
  sampler = optax_dp.PoissonSampler(200, 20, max_batch_size=25, truncate=True)
  assert result["epsilon"] == optax_dp.compute_epsilon(3.0, 1e-5, steps=5, sampler=sampler)
  assert result["accountant"] == "pld"
  assert "truncated" in result["statement"]


def test_user_level_epsilon_is_poisson_over_the_users(capsys):
  result = _json(capsys, ["epsilon", "--dataset-size", "5000", "--users", "400",
                          "--batch-size", "40", "--max-examples-per-user", "8",
                          "--steps", "300", "--noise-multiplier", "1.2", "--delta", "1e-5"])
  over_users = optax_dp.PoissonSampler(400, 40)
  assert result["epsilon"] == pytest.approx(
      optax_dp.compute_epsilon(1.2, 1e-5, steps=300, sampler=over_users), rel=1e-12)
  assert result["sampler"] == "user_poisson" and result["privacy_unit"] == "user"
  assert (result["dataset_size"], result["batch_size"]) == (400, 40)
  assert "each of the 400 users (holding 5000 examples)" in result["statement"]
  for bad in (["--users", "400"], ["--max-examples-per-user", "8"],
              ["--users", "6000", "--max-examples-per-user", "8"]):
    status, _, err = _run_main(capsys, ["epsilon", "--dataset-size", "5000", "--batch-size",
                                        "40", "--steps", "3", "--noise-multiplier", "1",
                                        "--delta", "1e-5", *bad])
    assert status == 2 and "--users" in err


def test_zero_noise_is_reported_as_not_private(capsys):
  result = _json(capsys, ["epsilon", *POISSON, "--steps", "10",
                          "--noise-multiplier", "0", "--delta", "1e-5"])
  assert result["epsilon"] is None  # JSON has no infinity
  assert "infinite (NOT private)" in result["statement"]


@pytest.mark.slow
@pytest.mark.parametrize("flags,sampler,accountant,target", [
    ([], optax_dp.PoissonSampler(10000, 1000), "pld", 2.0),
    (["--accountant", "rdp"], optax_dp.PoissonSampler(10000, 1000), "rdp", 2.0),
    (["--sampler", "shuffle"], optax_dp.ShuffleSampler(10000, 1000), "pld", 4.0),
    (["--sampler", "fixed"], optax_dp.FixedBatchSampler(10000, 1000), "rdp", 8.0),
])
def test_calibrate_meets_target(capsys, flags, sampler, accountant, target):
  argv = ["calibrate", "--dataset-size", "10000", "--batch-size", "1000",
          "--steps", "20", "--epsilon", str(target), "--delta", "1e-5", *flags]
  result = _json(capsys, argv)
  sigma = result["noise_multiplier"]

  def epsilon(s):
    return optax_dp.compute_epsilon(s, 1e-5, steps=20, sampler=sampler,
                                    accountant=accountant)

  assert result["accountant"] == accountant and result["steps"] == 20
  assert epsilon(sigma) <= target
  assert epsilon(sigma * 0.999) > target  # near-optimal (documented 0.1%)
  assert result["epsilon"] == epsilon(sigma)
  if accountant != "rdp" or sampler.name != "poisson":
    return  # the text form is checked once, where accounting is cheapest
  # Text output: the noise multiplier first, then the statement.
  status, out, _ = _run_main(capsys, argv)
  assert status == 0
  first, _, rest = out.partition("\n")
  assert first == f"Noise multiplier: {sigma}"
  assert rest.strip() == result["statement"]


# ---------------------------------------------------------------------------
# --epochs.

@pytest.mark.parametrize("sampler", ["poisson", "fixed", "shuffle"])
@pytest.mark.parametrize("epochs,n,b", [
    ("1", 60000, 256), ("2.5", 1000, 64), ("1.1", 1000, 10), ("1.1", 50000, 1000),
    ("0.01", 103, 10), ("3", 100, 100), ("60", 60000, 256), ("0.3", 1000, 100),
])
def test_epochs_to_steps(capsys, sampler, epochs, n, b):
  result = _json(capsys, ["epsilon", "--dataset-size", str(n), "--batch-size", str(b),
                          "--epochs", epochs, "--noise-multiplier", "3",
                          "--delta", "1e-5", "--sampler", sampler,
                          "--accountant", "rdp"])
  # Exact arithmetic on the typed decimal: ceil(epochs * N / B), or
  # ceil(epochs * (N // B)) for shuffling (only full batches form an epoch).
  # ("1.1" with N // B = 100 is 110 steps; float arithmetic would give 111.)
  e = Fraction(epochs)
  expected = math.ceil(e * (n // b)) if sampler == "shuffle" else math.ceil(e * n / b)
  assert result["steps"] == expected
  # ... and that step count is what was accounted and stated.
  assert f" {expected} noisy steps" in result["statement"]


def test_epochs_epsilon_equals_steps_epsilon(capsys):
  common = ["--dataset-size", "1000", "--batch-size", "10", "--noise-multiplier", "2",
            "--delta", "1e-5"]
  for sampler, steps in (("poisson", 250), ("shuffle", 250)):
    by_epochs = _json(capsys, ["epsilon", *common, "--epochs", "2.5",
                               "--sampler", sampler])
    by_steps = _json(capsys, ["epsilon", *common, "--steps", str(steps),
                              "--sampler", sampler])
    assert by_epochs["steps"] == steps
    assert by_epochs["epsilon"] == by_steps["epsilon"]


# ---------------------------------------------------------------------------
# The statement.

@pytest.mark.parametrize("flags,sampler_words,accountant_words,relation", [
    ([], "Poisson sampling", "privacy loss distribution", "add or remove one example"),
    (["--accountant", "rdp"], "Poisson sampling", "Renyi DP",
     "add or remove one example"),
    (["--sampler", "fixed"], "fixed-size batches", "Renyi DP",
     "replace one example by another"),
    (["--sampler", "shuffle"], "epoch shuffling", "privacy loss distribution",
     "zero out one example"),
])
def test_statement_names_sampler_accountant_relation_delta(
    capsys, flags, sampler_words, accountant_words, relation):
  status, out, err = _run_main(capsys, [
      "epsilon", "--dataset-size", "50000", "--batch-size", "500", "--steps", "300",
      "--noise-multiplier", "1.5", "--delta", "3e-6", *flags])
  assert status == 0 and err == ""
  assert sampler_words in out
  assert accountant_words in out
  assert relation in out
  assert "3e-06" in out
  assert "300 noisy steps" in out and "noise multiplier 1.5" in out
  # Exactly one (epsilon, delta) pair, and its epsilon is a positive number.
  pairs = re.findall(r"\(([0-9.e+-]+), 3e-06\)", out)
  assert len(pairs) == 1 and float(pairs[0]) > 0


def test_fixed_sampler_defaults_to_rdp_and_replace_one(capsys):
  result = _json(capsys, ["epsilon", "--dataset-size", "10000", "--batch-size", "100",
                          "--steps", "100", "--noise-multiplier", "2",
                          "--delta", "1e-5", "--sampler", "fixed"])
  assert result["accountant"] == "rdp"
  assert "replace one" in result["neighboring_relation"]
  assert "replace one" in result["statement"]
  assert "Renyi DP" in result["statement"]


# ---------------------------------------------------------------------------
# Bad input: exit status 2, a message on stderr, nothing on stdout.

BASE = ["--dataset-size", "1000", "--batch-size", "10", "--steps", "100"]

BAD_INPUTS = [
    (["epsilon", *BASE, "--noise-multiplier", "-1", "--delta", "1e-5"],
     "noise_multiplier"),
    (["epsilon", *BASE, "--noise-multiplier", "1", "--delta", "0"], "delta"),
    (["epsilon", *BASE, "--noise-multiplier", "1", "--delta", "1"], "delta"),
    (["epsilon", *BASE, "--noise-multiplier", "1", "--delta", "1.5"], "delta"),
    (["calibrate", *BASE, "--epsilon", "1", "--delta", "-1e-5"], "delta"),
    (["epsilon", "--dataset-size", "10", "--batch-size", "11", "--steps", "5",
      "--noise-multiplier", "1", "--delta", "1e-5"], "dataset_size"),
    (["epsilon", *BASE, "--noise-multiplier", "1", "--delta", "1e-5",
      "--sampler", "fixed", "--accountant", "pld"], "rdp"),
    (["epsilon", *BASE, "--noise-multiplier", "1", "--delta", "1e-5", "--truncate"],
     "max_batch_size"),
    (["epsilon", *BASE, "--noise-multiplier", "1", "--delta", "1e-5",
      "--max-batch-size", "20", "--sampler", "shuffle"], "--max-batch-size"),
    (["epsilon", *BASE, "--noise-multiplier", "1", "--delta", "1e-5",
      "--truncate", "--sampler", "fixed"], "--truncate"),
    (["epsilon", *BASE, "--noise-multiplier", "1", "--delta", "1e-5",
      "--max-batch-size", "25", "--truncate", "--accountant", "rdp"], "pld"),
    (["calibrate", *BASE, "--epsilon", "0", "--delta", "1e-5"], "epsilon"),
    # Too small to calibrate for: below the accountants' resolution (refused
    # at once), or where the accountant finds epsilon 0 for every large sigma.
    (["calibrate", *BASE, "--epsilon", "1e-5", "--delta", "1e-5"], "too small to calibrate"),
    (["calibrate", *BASE, "--epsilon", "0.002", "--delta", "1e-5", "--accountant", "rdp"],
     "too small for the accountant to resolve"),
    (["calibrate", *BASE, "--epsilon", "-2", "--delta", "1e-5"], "epsilon"),
    (["epsilon", "--dataset-size", "1000", "--batch-size", "10", "--steps", "0",
      "--noise-multiplier", "1", "--delta", "1e-5"], "steps"),
    (["epsilon", "--dataset-size", "1000", "--batch-size", "10", "--epochs", "-1",
      "--noise-multiplier", "1", "--delta", "1e-5"], "epochs"),
    (["epsilon", "--dataset-size", "1000", "--batch-size", "10", "--epochs", "nan",
      "--noise-multiplier", "1", "--delta", "1e-5"], "epochs"),
    # argparse's own errors.
    (["epsilon", "--batch-size", "10", "--steps", "5", "--noise-multiplier", "1",
      "--delta", "1e-5"], "--dataset-size"),
    (["calibrate", *BASE, "--delta", "1e-5"], "--epsilon"),
    (["epsilon", "--dataset-size", "1000", "--batch-size", "10",
      "--noise-multiplier", "1", "--delta", "1e-5"], "--steps"),
    (["epsilon", *BASE, "--epochs", "2", "--noise-multiplier", "1", "--delta", "1e-5"],
     "--epochs"),
    (["epsilon", *BASE, "--noise-multiplier", "1", "--delta", "1e-5",
      "--sampler", "uniform"], "--sampler"),
    (["epsilon", *BASE, "--noise-multiplier", "abc", "--delta", "1e-5"],
     "--noise-multiplier"),
    ([], "command"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS,
                         ids=[f"{i}-{m}" for i, (_, m) in enumerate(BAD_INPUTS)])
def test_bad_input_exits_2_with_message(capsys, argv, message):
  status, out, err = _run_main(capsys, argv)
  assert status == 2
  assert out == ""
  assert "error" in err and message in err, err


# ---------------------------------------------------------------------------
# Tiny epsilons and help texts.

def test_tiny_epsilon_is_printed_with_significant_digits(capsys):
  # A huge noise multiplier spends ~1e-5: said as such, not as (0, ...) or 0.0000.
  argv = ["epsilon", *POISSON, "--steps", "1000", "--noise-multiplier", "134900",
          "--delta", "1e-5"]
  expected = optax_dp.compute_epsilon(134900, 1e-5, dataset_size=60000, batch_size=256,
                                      steps=1000)
  assert 0 < expected < 1e-4
  status, out, _ = _run_main(capsys, argv)
  assert status == 0
  assert f"({expected:.4g}, 1e-05)-differential privacy" in out and "e-05, 1e-05)" in out


def _missing_help(parser, prog):
  """The options and subcommands of `parser` (and its subparsers) without help."""
  for action in parser._actions:  # pylint: disable=protected-access
    if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
      for choice in action._choices_actions:  # pylint: disable=protected-access
        if not choice.help:
          yield f"{prog} {choice.dest}"
      for name, subparser in action.choices.items():
        yield from _missing_help(subparser, f"{prog} {name}")
    elif not action.help:
      yield f"{prog} {'/'.join(action.option_strings) or action.dest}"


def test_every_flag_of_the_cli_and_the_examples_has_help():
  pytest.importorskip("flax")   # the examples' models
  parsers = {"optax-dp": _cli.build_parser()}
  for name in ("mnist_linen", "mnist_nnx", "train"):
    parsers[f"examples/{name}.py"] = example_runs.import_example(name).build_parser()
  missing = [flag for prog, parser in parsers.items()
             for flag in _missing_help(parser, prog)]
  assert not missing, f"flags without help text: {missing}"
  # The walk reaches the subcommands' flags and the scripts' shared ones.
  epsilon = parsers["optax-dp"]._actions[-1].choices["epsilon"]  # pylint: disable=protected-access
  assert "--noise-multiplier" in epsilon._option_string_actions  # pylint: disable=protected-access
  for name in ("mnist_linen", "mnist_nnx", "train"):
    flags = parsers[f"examples/{name}.py"]._option_string_actions  # pylint: disable=protected-access
    assert {"--quiet", "--plot", "--json-out", "--delta"} <= set(flags), name


@pytest.mark.parametrize("command, flags", [
    ("calibrate", ["--epochs", "1", "--epsilon", "1"]),
    ("epsilon", ["--steps", "100", "--noise-multiplier", "1.0"]),
])
@pytest.mark.parametrize("delta, warns", [(1e-3, True), (1e-6, False)])
def test_statement_warns_when_delta_is_at_least_one_over_n(capsys, command, flags,
                                                           delta, warns):
  status = _cli.main([command, "--dataset-size", "60000", "--batch-size", "256",
                      "--delta", str(delta)] + flags)
  out = capsys.readouterr().out
  assert status == 0
  assert ("WARNING: delta 0.001 >= 1/N = 1.667e-05 (N = 60000 examples)" in out) == warns
