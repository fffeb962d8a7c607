"""What the MNIST examples share: flags, sampler, budget, report and JSON.

`mnist_linen.py` (Flax Linen) and `mnist_nnx.py` (Flax NNX) train the same
CNN with the same private mechanism; only the model code and the train step
differ. The parts that decide the privacy claim are defined once, here: the
flags that set the mechanism, the sampler and its budget (the noise multiplier
calibrated for the steps run, or the steps allowed by a given one), the
refusal of steps past the budget, the closing privacy statement and the JSON
record, so that both examples account for and report a run in the same words.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import optax

import optax_dp

import mnist_data  # examples/ is on sys.path: the scripts next to this file import it


def add_training_flags(p, *, steps_help):
  """--steps ... --sampler: the run's length, batch, optimizer and clipping."""
  p.add_argument("--steps", type=int, default=5000, help=steps_help)
  p.add_argument("--batch-size", type=int, default=256,
                 help="the logical batch size: expected size for --sampler "
                      "poisson (q = batch_size / 60000), exact for fixed/shuffle")
  p.add_argument("--learning-rate", type=float, default=0.1)
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--l2-norm-clip", type=float, default=0.1)
  p.add_argument("--rescale-to-unit-norm", action=argparse.BooleanOptionalAction,
                 default=True,
                 help="divide clipped sums by the clip norm, as the jax_privacy "
                      "tutorial does (learning rate independent of the clip)")
  p.add_argument("--clipping", choices=("auto", "ghost", "vmap", "per-example"),
                 default="auto",
                 help="how per-example gradients are clipped: auto (fastest: "
                      "book-keeping for Flax layers), ghost, vmap, or per-example "
                      "(materialise them and let dp_aggregate clip)")
  p.add_argument("--sampler", choices=("poisson", "fixed", "shuffle"), default="poisson",
                 help="poisson (default; amplified accounting), fixed (fixed-size "
                      "batches drawn each step; RDP, replace-one) or shuffle (epoch "
                      "shuffling; no amplification: far more epsilon)")


def add_budget_flags(p):
  """--epsilon ... --seed: the privacy budget, the evaluation period, the seed."""
  p.add_argument("--epsilon", type=float, default=1.0, help="the privacy budget")
  p.add_argument("--delta", type=float, default=1e-5)
  p.add_argument("--noise-multiplier", type=float, default=None,
                 help="use this noise multiplier instead of calibrating one for "
                      "--steps; the budget then allows as many steps as fit in "
                      "--epsilon, and --steps beyond them are refused")
  p.add_argument("--allow-budget-overrun", action="store_true",
                 help="run --steps even past the budget; the epsilon reported "
                      "grows past --epsilon accordingly")
  p.add_argument("--accountant", choices=optax_dp.ACCOUNTANTS, default=None,
                 help="default: pld, or rdp for --sampler fixed (the only one "
                      "that can account for it)")
  p.add_argument("--eval-every", type=int, default=200)
  p.add_argument("--seed", type=int, default=0)


def add_output_flags(p):
  """--no-dp, the data and the JSON record."""
  p.add_argument("--no-dp", action="store_true", help="train without privacy")
  p.add_argument("--data", choices=("idx", "tfds"), default="idx",
                 help="idx: the bundled IDX files (default); tfds: tensorflow-datasets")
  p.add_argument("--data-dir", default=mnist_data.DEFAULT_DATA_DIR)
  p.add_argument("--json-out", default=None)


def require_positive(p, args, names):
  """Refuses (through `p.error`) a value below 1 for any of the flags `names`."""
  if min(getattr(args, name) for name in names) < 1:
    flags = [f"--{name.replace('_', '-')}" for name in names]
    listed = flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} and {flags[-1]}"
    p.error(f"{listed} must be >= 1")


def fail(message):
  """Exits with status 2 and `message` on stderr (bad flags or a refused run)."""
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(2)


def load_data(args):
  """MNIST as numpy arrays (the bundled IDX files, or tfds); checks --batch-size."""
  data = (mnist_data.load_mnist_tfds() if args.data == "tfds"
          else mnist_data.load_mnist(args.data_dir))
  dataset_size = len(data["train_images"])
  if args.batch_size > dataset_size:
    raise SystemExit(f"--batch-size {args.batch_size} > dataset size {dataset_size}")
  return data


def make_sampler(args, dataset_size, budget_steps):
  """The run's sampler; Poisson gets a static maximum fixed by the budget."""
  if args.sampler == "poisson":
    max_batch_size = getattr(args, "max_batch_size", None) or (
        optax_dp.poisson_max_batch_size(dataset_size, args.batch_size, budget_steps))
    return optax_dp.PoissonSampler(dataset_size, args.batch_size, max_batch_size,
                                   pad_to_multiple_of=32)
  return optax_dp.make_sampler(args.sampler, dataset_size=dataset_size,
                               batch_size=args.batch_size)


def make_budget(args, sampler):
  """The privacy budget: calibrate sigma for the steps, or the steps for sigma."""
  if args.noise_multiplier is not None:
    return optax_dp.privacy_budget(
        sampler=sampler, target_epsilon=args.epsilon, target_delta=args.delta,
        noise_multiplier=args.noise_multiplier, accountant=args.accountant)
  return optax_dp.privacy_budget(
      sampler=sampler, target_epsilon=args.epsilon, target_delta=args.delta,
      steps=getattr(args, "budget_steps", None) or args.steps,
      accountant=args.accountant)


def plan_privacy(args, dataset_size, budget_steps):
  """The sampler and the budget (None with --no-dp), said on stdout.

  Refuses (exit status 2) a budget that cannot be met, and --steps past the
  budget unless --allow-budget-overrun.
  """
  if args.no_dp:
    sampler = make_sampler(args, dataset_size, budget_steps)
    print("Training WITHOUT differential privacy (--no-dp).")
    return sampler, None
  t = time.time()
  sampler = make_sampler(args, dataset_size, budget_steps)
  try:
    budget = make_budget(args, sampler)
  except ValueError as e:
    fail(str(e))
  print(f"Noise multiplier {budget.noise_multiplier} "
        f"({'given' if args.noise_multiplier is not None else 'calibrated'}); "
        f"the budget (epsilon {args.epsilon}, delta {args.delta}) allows "
        f"{budget.max_steps} steps: {sampler.describe()}; {budget.accountant} "
        f"accountant ({time.time() - t:.1f} s).")
  if args.steps > budget.max_steps and not args.allow_budget_overrun:
    fail(
        f"--steps {args.steps} is beyond the privacy budget, which allows "
        f"{budget.max_steps} steps (epsilon {budget.epsilon():.4f} <= "
        f"{args.epsilon}). Run fewer steps, or pass --allow-budget-overrun to "
        f"run them and report the larger epsilon ({budget.epsilon(args.steps):.4f}).")
  return sampler, budget


def make_private_tx(args, budget, noise_key, optimizer):
  """`dp_aggregate` (clip, noise, the budget's ledger) chained before `optimizer`."""
  return optax.chain(
      optax_dp.dp_aggregate(args.l2_norm_clip, key=noise_key, budget=budget,
                            allow_budget_overrun=args.allow_budget_overrun,
                            rescale_to_unit_norm=args.rescale_to_unit_norm),
      optimizer)


def print_progress(step, train_loss, train_acc, test_loss, test_acc, epsilon, seconds):
  """One evaluation line of the training log."""
  print(f"step {step:5d}  train loss {train_loss:.4f} "
        f"acc {train_acc:.4f}  test loss {test_loss:.4f} "
        f"acc {test_acc:.4f}  epsilon {epsilon:.4f}  "
        f"{seconds:.0f} s", flush=True)


def report(args, budget, sampler, *, opt_state, expected_steps, released, steps_done,
           seconds, test_acc, dataset_size, evaluated_on="test"):
  """Prints the run's privacy statement; returns its epsilon (inf with --no-dp).

  `released` is the optimizer's count of noisy updates (the ledger); a run
  whose ledger disagrees with its loop (`expected_steps`) is an error, not a
  statement.
  """
  if budget is None:
    print(f"Done: {released} steps in {seconds:.0f} s. {evaluated_on.capitalize()} accuracy "
          f"{test_acc:.4f}. "
          "NOT private (--no-dp).")
    return float("inf")
  if released != expected_steps:  # the ledger and the loop must agree
    raise RuntimeError(f"optimizer released {released} noisy updates, loop ran to "
                       f"{expected_steps}")
  epsilon = budget.epsilon_spent(opt_state)
  over = " (PAST the budget: --allow-budget-overrun)" if released > budget.max_steps else ""
  print(f"Done: {released} steps ({steps_done} in {seconds:.0f} s). "
        f"{evaluated_on.capitalize()} accuracy {test_acc:.4f}. Privacy: ({epsilon:.4f}, {args.delta})-DP{over} for the "
        f"{dataset_size} training examples ({sampler.name} sampling, "
        f"{budget.accountant} accountant, noise multiplier "
        f"{budget.noise_multiplier}, clip {args.l2_norm_clip}).")
  print(budget.statement(released))
  return epsilon


# The JSON record's keys, in the order written; an example leaves out those
# that do not apply to it (mnist_nnx.py: no resume, accumulation or devices).
JSON_KEYS = ("test_accuracy", "test_loss", "epsilon", "delta", "noise_multiplier",
             "steps", "steps_this_run", "resumed_from_step", "budget_steps",
             "batch_size", "accumulation_steps", "devices", "seconds", "l2_norm_clip",
             "sampler", "neighboring_relation", "accountant", "clipping", "private",
             # train.py's recipe runs:
             "recipe", "dataset", "model", "evaluated_on", "ema_decay",
             "augmentation_multiplicity", "dataset_size", "features", "epochs",
             "learning_rate", "schedule", "momentum")


def write_json(args, budget, sampler, *, epsilon, test_accuracy, test_loss, steps,
               steps_this_run, seconds, **extra):
  """Writes the run's record to --json-out (if given); `extra`: further JSON_KEYS."""
  if not args.json_out:
    return
  values = {
      "test_accuracy": test_accuracy,
      "test_loss": test_loss,
      "epsilon": epsilon if math.isfinite(epsilon) else None,
      "delta": args.delta,
      "noise_multiplier": budget.noise_multiplier if budget else None,
      "steps": steps,
      "steps_this_run": steps_this_run,
      "budget_steps": budget.max_steps if budget else None,
      "batch_size": args.batch_size,
      "seconds": seconds,
      "l2_norm_clip": args.l2_norm_clip,
      "sampler": sampler.name,
      "neighboring_relation": sampler.neighboring_relation if budget else None,
      "accountant": budget.accountant if budget else None,
      "clipping": None if args.no_dp else args.clipping,
      "private": not args.no_dp,
      **extra,
  }
  unknown = set(values) - set(JSON_KEYS)
  if unknown:
    raise ValueError(f"not JSON record keys: {sorted(unknown)}")
  os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
  with open(args.json_out, "w") as f:
    json.dump({key: values[key] for key in JSON_KEYS if key in values}, f, indent=2)
