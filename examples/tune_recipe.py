"""`train.py --tune GRID`: a recipe's hyper-parameters chosen by private
tuning, with an epsilon that covers the tuning (`optax_dp.tune`).

GRID names the hyper-parameters to tune and their values, e.g.
`--tune "learning_rate=4,8,16 epochs=20,40"` (six candidates, the product;
tunable: see `TUNABLE`). With `--epsilon` the end-to-end target:

1. A random number K of trials is drawn from `--trials-mean`/`--trials-shape`
   (optax_dp.TrialCount: shape 1 geometric, 0 logarithmic, inf Poisson) with
   a secret seed (`--tuning-seed`, default from the OS: a seed others know
   makes K known, which the guarantee does not cover).
2. Each trial draws a candidate uniformly at random, trains on the training
   set less `--validation-size` examples, and is scored on those held-out
   (private) examples with `optax_dp.private_score` (Gaussian noise of
   `--score-noise-multiplier` on the count of correct predictions).
3. Each trial's training noise is calibrated so that the whole procedure
   meets `--epsilon` (`optax_dp.calibrate_trial_noise`, RDP: the bound of
   Papernot & Steinke is in Renyi DP), for the recipe's own batch size and
   steps; a candidate with another batch size or step count gets the noise
   that makes it no less private (`optax_dp.trial_noise_for`).
4. Only the best trial's model is kept; it is evaluated on the test set
   (public, not private data: no privacy cost).

Two records. `--json-out` is the one to publish: the grid, the distribution
of K, the reference trial, the selected candidate, its private score, its
test accuracy and the end-to-end epsilon, and nothing the guarantee does not
cover. `--operator-record` (optional; keep it private) adds what only the
person running the tuning may see: K, every trial (candidate, noise, its
own epsilon, its noisy score, its time), the tuning seed and the wall time.
Publishing K (or anything that reveals it, such as the wall time or the
printed progress) voids the guarantee: the bound holds for the selected
model with K unknown.

References:
  Papernot & Steinke 2022, "Hyperparameter Tuning with Renyi Differential
  Privacy", ICLR 2022, https://arxiv.org/abs/2110.03620.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import secrets
import time

import numpy as np

import optax_dp

import _cli_common

# What the published record (--json-out) leaves out and only the operator's
# (--operator-record) holds: each reveals K, which the guarantee needs hidden.
WITHHELD = ("num_trials", "per_trial", "tuning_seed", "seconds")

# What --tune may vary, and how its values are read.
TUNABLE = {"learning_rate": float, "l2_norm_clip": float, "epochs": float,
           "batch_size": int, "momentum": float}


def parse_grid(text):
  """`"learning_rate=4,8 epochs=20,40"` -> the list of candidates (dicts),
  the product of the values, in a fixed order. Raises ValueError."""
  grid = {}
  for part in text.replace(";", " ").split():
    name, sep, values = part.partition("=")
    name = name.replace("-", "_")
    if not sep or not values:
      raise ValueError(f"--tune: {part!r} is not NAME=V1,V2,...")
    if name not in TUNABLE:
      raise ValueError(f"--tune: {name!r} cannot be tuned; choose from {sorted(TUNABLE)}")
    if name in grid:
      raise ValueError(f"--tune: {name!r} is given twice")
    try:
      grid[name] = [TUNABLE[name](v) for v in values.split(",")]
    except ValueError:
      raise ValueError(f"--tune: {name}={values}: not {TUNABLE[name].__name__} values") from None
    if any(not v > 0 for v in grid[name] if name != "momentum"):
      raise ValueError(f"--tune: {name} values must be positive, got {values}")
  if not grid:
    raise ValueError("--tune needs at least one NAME=V1,V2,... (e.g. learning_rate=4,8)")
  names = list(grid)
  return [dict(zip(names, values)) for values in itertools.product(*grid.values())]


def check_tune_args(args):
  """The flags --tune needs, or exit status 2 naming the fix."""
  if args.no_dp:
    _cli_common.fail("--tune tunes private training: it cannot be combined with --no-dp.")
  if args.noise_multiplier is not None:
    _cli_common.fail("--tune calibrates every trial's noise for the end-to-end --epsilon: "
                     "leave out --noise-multiplier.")
  if args.allow_budget_overrun:
    _cli_common.fail("--tune: a trial past its budget would not be the mechanism the "
                     "accounting covers; leave out --allow-budget-overrun.")
  if not args.validation_size:
    _cli_common.fail("--tune scores each trial on private held-out training examples: "
                     "give --validation-size N (e.g. 5000).")
  if args.operator_record and args.json_out and (
      os.path.abspath(args.operator_record) == os.path.abspath(args.json_out)):
    _cli_common.fail("--operator-record must not be the --json-out file: the operator's "
                     "record holds K, which the published one must not.")
  if args.plot:
    _cli_common.fail("--tune writes the trials to --json-out; --plot draws one run: "
                     "leave it out.")
  if not args.score_noise_multiplier > 0:
    _cli_common.fail("--score-noise-multiplier must be > 0: an exact validation accuracy "
                     f"is not private (got {args.score_noise_multiplier}).")
  try:
    candidates = parse_grid(args.tune)
  except ValueError as e:
    _cli_common.fail(str(e))
  trials = optax_dp.TrialCount(args.trials_mean, args.trials_shape)
  if not args.steps_from_epochs and any({"epochs", "batch_size"} & set(c) for c in candidates):
    _cli_common.fail("--tune varies epochs or batch_size, which set the steps: leave out "
                     "--steps.")
  return candidates, trials


def trial_args(args, candidate, dataset_size):
  """`args` with `candidate`'s values (and the steps its epochs and batch give)."""
  trial = argparse.Namespace(**vars(args))
  for name, value in candidate.items():
    setattr(trial, name, value)
  if args.steps_from_epochs:
    trial.steps = max(1, round(trial.epochs * dataset_size / trial.batch_size))
    trial.eval_every = max(1, trial.steps // 10)
  return trial


def plan_trials(args, candidates, trials, dataset_size):
  """Each candidate's (args, sampler, noise multiplier), and the reference
  trial event every trial's is RDP-dominated by (the flags' own batch size
  and steps, calibrated for the end-to-end epsilon)."""
  t = time.time()
  _cli_common.say(args, f"Calibrating the trials' noise for end-to-end epsilon {args.epsilon:g} "
                        f"(delta {args.delta:g}) over {trials} ...")
  reference_sampler = _cli_common.make_sampler(args, dataset_size, args.steps)
  sigma = optax_dp.calibrate_trial_noise(
      args.epsilon, args.delta, sampler=reference_sampler, steps=args.steps, trials=trials,
      score_noise_multiplier=args.score_noise_multiplier)
  reference = optax_dp.trial_event_of(reference_sampler, sigma, args.steps,
                                      args.score_noise_multiplier)
  single = {accountant: optax_dp.privacy_budget(
      sampler=reference_sampler, target_delta=args.delta, noise_multiplier=sigma,
      steps=args.steps, accountant=accountant).epsilon() for accountant in ("pld", "rdp")}
  plans = []
  for candidate in candidates:
    cargs = trial_args(args, candidate, dataset_size)
    sampler = _cli_common.make_sampler(cargs, dataset_size, cargs.steps)
    same = (cargs.batch_size, cargs.steps) == (args.batch_size, args.steps)
    noise = sigma if same else optax_dp.trial_noise_for(
        reference, sampler=sampler, steps=cargs.steps,
        score_noise_multiplier=args.score_noise_multiplier)
    plans.append((cargs, sampler, noise))
  print(f"Trial noise multiplier {sigma:.4f} at batch {args.batch_size} and {args.steps} steps "
        f"(score noise {args.score_noise_multiplier:g}); {len(candidates)} candidates "
        f"({time.time() - t:.1f} s). One such run alone would be epsilon "
        f"{_cli_common.format_epsilon(single['pld'])} by PLD "
        f"({_cli_common.format_epsilon(single['rdp'])} by RDP).", flush=True)
  return plans, reference, sigma, single


def main(args, *, load_splits, train_model):
  """Runs the tuning; prints the end-to-end statement, writes the record.
  `load_splits` and `train_model` are train.py's (which calls this)."""
  candidates, trials = check_tune_args(args)
  splits = load_splits(args)
  train, validation, test = splits["train"], splits["validation"], splits["test"]
  dataset_size, validation_size = len(train[0]), len(validation[0])
  try:   # refuses a bad --trials-mean/--trials-shape (optax_dp.TrialCount's limits)
    plans, reference, sigma, single = plan_trials(args, candidates, trials, dataset_size)
  except ValueError as e:
    _cli_common.fail(f"--tune (--trials-mean {args.trials_mean:g}, --trials-shape "
                     f"{args.trials_shape:g}): {e}")
  seed = args.tuning_seed if args.tuning_seed is not None else secrets.randbits(63)
  score_rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
  start = time.time()
  log = []

  def run_trial(index_of_candidate, index):
    cargs, sampler, noise = plans[index_of_candidate]
    cargs = argparse.Namespace(**vars(cargs))
    cargs.seed = args.seed * 1000 + index   # a fresh init, noise and batches per trial
    budget = optax_dp.privacy_budget(sampler=sampler, target_delta=args.delta,
                                     noise_multiplier=noise, steps=cargs.steps,
                                     accountant=args.accountant)
    print(f"\nTrial {index + 1}: {candidates[index_of_candidate]} (noise multiplier "
          f"{noise:.4f}, {cargs.steps} steps of batch {cargs.batch_size}; this trial alone: "
          f"epsilon {_cli_common.format_epsilon(budget.epsilon())} by {budget.accountant})",
          flush=True)
    run = train_model(cargs, train, validation, "validation", sampler=sampler, budget=budget)
    released = budget.steps_taken(run.state.opt_state)
    _, correct = run.evaluate(run.params, *validation)
    score = optax_dp.private_score(correct, validation_size, args.score_noise_multiplier,
                                   score_rng)
    log.append({"trial": index + 1, "candidate": candidates[index_of_candidate],
                "noise_multiplier": noise, "steps": released, "batch_size": cargs.batch_size,
                "epsilon": budget.epsilon_spent(run.state.opt_state),
                "accountant": budget.accountant, "private_score": score.value,
                "seconds": run.seconds})
    print(f"Trial {index + 1}: private validation score {score.value:.4f} "
          f"({run.seconds:.0f} s)", flush=True)
    return (run, cargs), sampler.dp_event(noise, released), score

  result = optax_dp.tune(run_trial, list(range(len(candidates))), trials=trials,
                         trial_event=reference, target_delta=args.delta, seed=seed)
  seconds = time.time() - start
  statement = (f"Tuning: {result.num_trials} trials (K drawn from {trials}; not to be "
               f"published), end to end ({_cli_common.format_epsilon(result.epsilon)}, "
               f"{args.delta:g})-DP for the {dataset_size + validation_size} training "
               f"examples (training and validation), by the RDP accountant "
               f"(Papernot & Steinke's bound, dp-accounting's RepeatAndSelectDpEvent).")
  if result.output is None:
    print(f"\nNo trial ran (K = 0, possible with a Poisson count): nothing is released. "
          f"{statement}")
    test_accuracy = test_loss = None
    chosen = None
  else:
    (run, cargs) = result.output
    chosen = candidates[result.candidate]
    test_loss, correct = run.evaluate(run.params, *test)
    test_accuracy = correct / len(test[0])
    print(f"\nSelected {chosen} (private validation score {result.score:.4f}). Test "
          f"accuracy {test_accuracy:.4f} in {seconds:.0f} s.\n{statement}")
  record = {
      "test_accuracy": test_accuracy, "test_loss": test_loss, "epsilon": result.epsilon,
      "delta": args.delta, "recipe": args.recipe,
      "dataset": args.dataset, "model": args.model, "evaluated_on": "test",
      "dataset_size": dataset_size, "private": True,
      "tuning": {
          "grid": args.tune, "candidates": candidates,
          "trials": {"mean": trials.mean, "shape": trials.shape},
          "selected": chosen, "selected_score": result.score,
          "validation_size": validation_size,
          "score_noise_multiplier": args.score_noise_multiplier,
          # The trial event every trial is no less private than: Poisson
          # sampling of batch_size of dataset_size for steps at noise_multiplier,
          # and the score; and what one such run alone would be.
          "reference": {"batch_size": args.batch_size, "steps": args.steps,
                        "noise_multiplier": sigma, "single_run_epsilon": single},
          "target_epsilon": args.epsilon, "end_to_end_epsilon": result.epsilon,
          "end_to_end_accountant": "rdp",
          "withheld": list(WITHHELD),
      },
  }
  # The operator's record: the published one plus what reveals K.
  operator = dict(record, seconds=seconds, tuning=dict(
      record["tuning"], num_trials=result.num_trials, per_trial=log, tuning_seed=seed))
  for path, content in ((args.json_out, record), (args.operator_record, operator)):
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      with open(path, "w") as f:
        json.dump(content, f, indent=2)
  return operator
