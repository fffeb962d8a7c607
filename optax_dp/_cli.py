"""`python -m optax_dp` / `optax-dp`: privacy statements from the command line.

    optax-dp epsilon --dataset-size 60000 --batch-size 256 --steps 5000 \\
        --noise-multiplier 1.1 --delta 1e-5 [--sampler poisson] [--accountant pld]
    optax-dp calibrate --dataset-size 60000 --batch-size 256 --epochs 20 \\
        --epsilon 1 --delta 1e-5 --sampler fixed
    optax-dp epsilon --dataset-size 32394 --users 564 --batch-size 64 \\
        --max-examples-per-user 8 --steps 400 --noise-multiplier 1.6 --delta 1e-5
    optax-dp --version

Prints the guarantee in plain words (`optax_dp.privacy_statement`). Bad input
exits with status 2 and a message on stderr, as argparse does; so does a
target epsilon too small to calibrate for (below `MIN_TARGET_EPSILON`, or one
the accountant cannot resolve for the run).
"""

from __future__ import annotations

import argparse
import fractions
import json
import math
import sys
from typing import Optional, Sequence

import numpy as np

from optax_dp._sample import _accounting
from optax_dp._sample import _calibration
from optax_dp._lifecycle import _budget
from optax_dp._core import _checks
from optax_dp._sample import _sampling
from optax_dp._sample import _users
from optax_dp._version import __version__

# `calibrate` refuses smaller target epsilons: the PLD accountant discretises
# the privacy loss in steps of 1e-4 (`_accounting._PLD_VALUE_DISCRETIZATION`),
# so below ten such steps its grid, not the run, decides the noise multiplier,
# and RDP's conversion to (epsilon, delta) flattens to 0 around there too.
MIN_TARGET_EPSILON = 1e-3
# A calibrated run whose epsilon is below this fraction of the target was
# not calibrated for it (the accountant reports ~0 for every large sigma):
# refused rather than printed as "the smallest noise multiplier that meets it".
_MIN_REACHED_FRACTION = 0.5


def build_parser() -> argparse.ArgumentParser:
  """The `optax-dp` parser: the `epsilon` and `calibrate` subcommands."""
  parser = argparse.ArgumentParser(
      prog="optax-dp",
      description="Privacy statements for DP-SGD runs (optax_dp).")
  parser.add_argument("--version", action="version", version=f"optax-dp {__version__}",
                      help="print the installed optax_dp version and exit")
  commands = parser.add_subparsers(dest="command", required=True)
  for name, help_text in (
      ("epsilon", "the epsilon of a run with a given noise multiplier"),
      ("calibrate", "the noise multiplier that meets a target epsilon")):
    p = commands.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--dataset-size", type=int, required=True,
                   help="number of training examples N")
    p.add_argument("--batch-size", type=int, required=True,
                   help="expected batch size (Poisson) or exact batch size "
                        "(fixed, shuffle); with accumulation, the logical one")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="noisy (logical) steps")
    length.add_argument("--epochs", type=float,
                        help="epochs; steps = ceil(epochs * N / batch size) "
                             "(ceil(epochs * (N // batch)) for shuffle)")
    if name == "epsilon":
      p.add_argument("--noise-multiplier", type=float, required=True,
                     help="the noise standard deviation over the clip norm "
                          "(sigma, as passed to dp_aggregate)")
    else:
      p.add_argument("--epsilon", type=float, required=True,
                     help=f"target epsilon (>= {MIN_TARGET_EPSILON:g})")
    p.add_argument("--delta", type=float, required=True,
                   help="target delta, in (0, 1); keep it well below 1 / N")
    p.add_argument("--sampler", choices=tuple(_sampling.SAMPLERS), default="poisson",
                   help="how batches are drawn: poisson (default; amplified), "
                        "fixed (fixed-size batches; RDP, replace-one), shuffle "
                        "(epoch shuffling; no amplification) or cyclic_poisson "
                        "(DP-BandMF's: Poisson within --bands groups in turn)")
    p.add_argument("--bands", type=int, default=None,
                   help="cyclic_poisson only: the DP-BandMF bands (default 1)")
    p.add_argument("--accountant", choices=_accounting.ACCOUNTANTS, default=None,
                   help="default: pld, or rdp for the fixed sampler")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="poisson only: the static maximum batch size")
    p.add_argument("--truncate", action="store_true",
                   help="poisson only: truncate batches above --max-batch-size "
                        "(accounted as truncated Poisson, PLD only)")
    p.add_argument("--users", type=int, default=None,
                   help="user-level DP (UserPoissonSampler): the number of distinct "
                        "users U among the --dataset-size examples; --batch-size is "
                        "then the expected number of users per batch")
    p.add_argument("--max-examples-per-user", type=int, default=None,
                   help="with --users: at most this many of a sampled user's examples "
                        "per batch")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
  return parser


def _steps(args, sampler) -> int:
  if args.steps is not None:
    return args.steps
  if not (math.isfinite(args.epochs) and args.epochs > 0):
    raise ValueError(f"--epochs must be a finite number > 0, got {args.epochs}.")
  # Exact arithmetic on the decimal the user typed: in floats, 1.1 * 100 is
  # 110.00000000000001, whose ceil would count one step too many.
  epochs = fractions.Fraction(repr(args.epochs))
  if isinstance(sampler, _sampling.ShuffleSampler):
    return math.ceil(epochs * sampler.steps_per_epoch)
  return math.ceil(epochs * sampler.dataset_size / sampler.expected_batch_size)


def _calibrate(args, sampler, steps: int, accountant: str) -> float:
  """The noise multiplier for --epsilon; ValueError if it cannot mean anything."""
  target = _checks.check_epsilon(args.epsilon)
  _checks.check_delta(args.delta)
  where = f"(delta {args.delta:g}, {steps} steps, {accountant} accountant)"
  if target < MIN_TARGET_EPSILON:
    raise ValueError(
        f"--epsilon {target:g} is too small to calibrate for: below "
        f"{MIN_TARGET_EPSILON:g} the accountant's resolution, not the run, "
        "decides the noise multiplier. Ask for --epsilon >= "
        f"{MIN_TARGET_EPSILON:g}, or compute the epsilon of a given noise "
        "multiplier with `optax-dp epsilon`.")
  try:
    sigma = _calibration.calibrate_noise_multiplier(
        target, args.delta, sampler=sampler, steps=steps, accountant=accountant)
  except (ArithmeticError, RuntimeError, ValueError) as e:
    raise ValueError(f"no noise multiplier found for --epsilon {target:g} {where}: "
                     f"{e}") from e
  reached = _accounting.compute_epsilon(sigma, args.delta, sampler=sampler,
                                        steps=steps, accountant=accountant)
  if reached < _MIN_REACHED_FRACTION * target:
    raise ValueError(
        f"--epsilon {target:g} is too small for the accountant to resolve {where}: "
        f"the noise multiplier found ({sigma:g}) spends epsilon {reached:.4g}, far "
        "below the target, so it is not the smallest one that meets it. Ask for "
        "a larger --epsilon.")
  return sigma


def _run(args) -> str:
  kwargs = {}
  if args.sampler == "poisson":
    kwargs = dict(max_batch_size=args.max_batch_size, truncate=args.truncate)
  elif args.max_batch_size is not None or args.truncate:
    raise ValueError("--max-batch-size and --truncate apply to --sampler poisson only.")
  if args.sampler == "cyclic_poisson":
    kwargs = dict(bands=args.bands)
  elif args.bands is not None:
    raise ValueError("--bands applies to --sampler cyclic_poisson (DP-BandMF) only.")
  if (args.users is None) != (args.max_examples_per_user is None):
    raise ValueError("user-level DP needs both --users and --max-examples-per-user.")
  if args.users is not None:
    if args.sampler not in ("poisson", "cyclic_poisson") or args.max_batch_size or args.truncate:
      raise ValueError("--users samples users by Poisson sampling (--sampler poisson, or "
                       "cyclic_poisson with --bands); --max-batch-size and --truncate do "
                       "not apply.")
    users = _checks.check_int("--users", args.users, 1)
    if users > _checks.check_int("--dataset-size", args.dataset_size, 1):
      raise ValueError(f"--users {users} exceeds --dataset-size {args.dataset_size}: "
                       "each user holds at least one example.")
    sampler = _users.UserPoissonSampler(
        np.arange(args.dataset_size) % users, args.batch_size, args.max_examples_per_user,
        bands=kwargs.get("bands"))
  else:
    sampler = _sampling.make_sampler(args.sampler, dataset_size=args.dataset_size,
                                     batch_size=args.batch_size, **kwargs)
  steps = _steps(args, sampler)
  accountant = _accounting.resolve_accountant(args.accountant, sampler)
  if args.command == "calibrate":
    noise_multiplier = _calibrate(args, sampler, steps, accountant)
  else:
    noise_multiplier = args.noise_multiplier
  epsilon = _accounting.compute_epsilon(noise_multiplier, args.delta, sampler=sampler,
                                        steps=steps, accountant=accountant)
  statement = _budget.privacy_statement(noise_multiplier, args.delta, sampler=sampler,
                                        steps=steps, accountant=accountant)
  if args.json:
    return json.dumps({
        "epsilon": None if math.isinf(epsilon) else epsilon,
        "delta": args.delta, "noise_multiplier": noise_multiplier, "steps": steps,
        "sampler": sampler.name, "accountant": accountant,
        "neighboring_relation": sampler.neighboring_relation,
        "dataset_size": sampler.dataset_size,
        "batch_size": sampler.expected_batch_size,
        "privacy_unit": sampler.privacy_unit, "statement": statement,
    }, indent=2)
  if args.command == "calibrate":
    return f"Noise multiplier: {noise_multiplier}\n{statement}"
  return statement


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of `optax-dp` / `python -m optax_dp`; returns the exit status.

  Prints the epsilon of a run (`epsilon`) or the noise multiplier that meets
  a target epsilon (`calibrate`), with the privacy statement
  (`optax_dp.privacy_statement`; `--json` for machine-readable output). Bad
  input prints a message on stderr and returns 2, as argparse does.

  Privacy contract: the numbers describe a run only if the flags are the
  run's: its sampler and (logical) batch size, its number of noisy steps,
  its noise multiplier and the delta; see `optax_dp.compute_epsilon` (and its
  References) for what the run itself must satisfy.

  Args:
    argv: the arguments without the program name; default `sys.argv[1:]`.

  Returns:
    0 on success, 2 for bad input.

  Example:
    >>> import contextlib, io, json
    >>> from optax_dp._cli import main
    >>> out = io.StringIO()
    >>> with contextlib.redirect_stdout(out):
    ...   status = main(["epsilon", "--dataset-size", "60000", "--batch-size", "256",
    ...                  "--steps", "1000", "--noise-multiplier", "1.1",
    ...                  "--delta", "1e-5", "--json"])
    >>> status, round(json.loads(out.getvalue())["epsilon"], 2)
    (0, 0.6)
    >>> main(["epsilon", "--dataset-size", "60000", "--batch-size", "256",
    ...       "--steps", "0", "--noise-multiplier", "1.1", "--delta", "1e-5"])
    2
  """
  parser = build_parser()
  args = parser.parse_args(argv)  # exits 2 on malformed arguments
  try:
    text = _run(args)
  except ValueError as e:
    print(f"optax-dp {args.command}: error: {e}", file=sys.stderr)
    return 2
  print(text)
  return 0
