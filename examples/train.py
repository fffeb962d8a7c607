"""Private training from a named recipe, in one command.

Run:  python examples/train.py --recipe mnist-eps1 [--seed 1] [--json-out r.json]
      [--plot run.png] [--quiet]
      (the shakespeare-* recipes, language models, run examples/train_lm.py)
List: python examples/train.py --list

A recipe (`recipes.py`) fixes the dataset, model, normalisation, batch size,
epochs, learning rate and schedule, clip, parameter averaging (EMA, evaluated
instead of the last iterate: post-processing, no privacy cost),
augmentation multiplicity (K random shifts per example, averaged before the
clip) and target epsilon; every flag below overrides it. The privacy parts
are the tutorial example's (`_cli_common.py`): Poisson sampling, the budget
calibrated for the run's steps, `dp_aggregate` chained before SGD, the
privacy statement and the same --json-out record (plus the recipe's keys).
`--validation-size N` holds out the last N training examples (a fixed
permutation) and evaluates on them instead of the test set: tune there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import optax_dp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli_common  # pylint: disable=wrong-import-position
import mnist_data  # pylint: disable=wrong-import-position
import models  # pylint: disable=wrong-import-position
import scattering  # pylint: disable=wrong-import-position
from recipes import LM_RECIPES, NORMALISATION, RECIPES  # pylint: disable=wrong-import-position

MODELS = {"tutorial_cnn": models.CNN, "tanh_cnn": models.TanhCNN,
          "groupnorm_cnn": models.GroupNormCNN, "scatter_linear": models.ScatterLinear,
          "scatter_cnn": models.ScatterCNN}
DATA_DIRS = {"mnist": mnist_data.DEFAULT_DATA_DIR,
             "fashion-mnist": os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           "..", "..", "shared", "data", "fashion-mnist")}


def _recipe_parser():
  """--recipe and --list, read first: the recipe sets the other flags' defaults."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--recipe", default="mnist-eps1",
                   help="the recipe (recipes.py; default: %(default)s); the flags "
                        "below override its settings")
  pre.add_argument("--list", action="store_true", help="list the recipes and exit")
  return pre


def build_parser(recipe=None):
  """The script's flags (argparse), with `recipe`'s settings (a RECIPES entry;
  default: --recipe's default) as their defaults."""
  pre = _recipe_parser()
  recipe = recipe or RECIPES[pre.get_default("recipe")]
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[pre])
  _cli_common.add_training_flags(p, steps_help="noisy steps (default: the recipe's epochs)")
  _cli_common.add_budget_flags(p)
  _cli_common.add_output_flags(p)
  p.add_argument("--dataset", choices=sorted(DATA_DIRS), help="the dataset to train on")
  p.add_argument("--model", choices=sorted(MODELS), help="the model (models.py)")
  p.add_argument("--normalise", action=argparse.BooleanOptionalAction,
                 help="standardise the pixels with the dataset's mean and std")
  p.add_argument("--features", choices=("pixels", "scattering"),
                 help="train on the pixels or on ScatterNet features (scattering.py)")
  p.add_argument("--epochs", type=float,
                 help="epochs of expected batches; sets --steps unless it is given")
  p.add_argument("--schedule", choices=("constant", "cosine"),
                 help="the learning rate: constant, or cosine decay to 0 over --steps")
  p.add_argument("--ema-decay", type=float, help="evaluate an EMA of the parameters")
  p.add_argument("--augmentation-multiplicity", type=int,
                 help="K random shifts of each example, averaged before the clip")
  p.add_argument("--validation-size", type=int, default=0,
                 help="hold out the last N training examples (a fixed permutation) "
                      "and evaluate on them instead of the test set")
  p.add_argument("--subset", type=int, default=None,
                 help="train on the first N training examples and evaluate on the first N "
                      "evaluation ones (quick tries and tests; the accounting uses N)")
  tune = p.add_argument_group(
      "private tuning (tune_recipe.py)",
      "--tune GRID: run a random number of trials, each a candidate drawn at random, "
      "scored privately on --validation-size held-out training examples; keep the "
      "best; --epsilon is then the epsilon of the whole tuning")
  tune.add_argument("--tune", metavar="GRID", default=None,
                    help='the candidates, e.g. "learning_rate=4,8,16 epochs=20,40" (the '
                         "product); tunable: learning_rate, l2_norm_clip, epochs, "
                         "batch_size, momentum")
  tune.add_argument("--trials-mean", type=float, default=8.0,
                    help="the expected number of trials (default: %(default)s)")
  tune.add_argument("--trials-shape", type=float, default=1.0,
                    help="the distribution of the number of trials: 1 geometric, 0 "
                         "logarithmic, inf Poisson, other >= 0 a truncated negative "
                         "binomial (default: %(default)s)")
  tune.add_argument("--score-noise-multiplier", type=float, default=20.0,
                    help="std of the Gaussian noise on each trial's count of correct "
                         "validation predictions (default: %(default)s)")
  tune.add_argument("--tuning-seed", type=int, default=None,
                    help="the seed of the number of trials and the candidates (default: "
                         "secret, from the OS; a known seed makes K known, which the "
                         "guarantee does not cover)")
  tune.add_argument("--operator-record", metavar="PATH", default=None,
                    help="also write the operator's record of the tuning (K, every trial, "
                         "the tuning seed, the wall time) here; keep it private: "
                         "publishing K voids the end-to-end guarantee (--json-out "
                         "leaves them out)")
  p.set_defaults(**recipe, steps=None, data_dir=None, eval_every=None)
  return p


def parse_args(argv=None):
  known, _ = _recipe_parser().parse_known_args(argv)
  if known.list:
    for name, recipe in {**RECIPES, **LM_RECIPES}.items():
      print(name, recipe)
    raise SystemExit(0)
  if known.recipe not in RECIPES:
    _cli_common.fail(f"--recipe {known.recipe!r}: choose from {sorted(RECIPES)}")
  p = build_parser(RECIPES[known.recipe])
  args = p.parse_args(argv)
  dataset_size = 60000 - args.validation_size
  args.steps_from_epochs = args.steps is None
  if args.subset is not None:
    _cli_common.require_positive(p, args, ("subset",))
    dataset_size = min(dataset_size, args.subset)
  if args.steps is None:
    args.steps = max(1, round(args.epochs * dataset_size / args.batch_size))
  if args.eval_every is None:
    args.eval_every = max(1, args.steps // 10)
  args.data_dir = args.data_dir or DATA_DIRS[args.dataset]
  _cli_common.require_positive(p, args, ("steps", "batch_size", "eval_every",
                                         "augmentation_multiplicity"))
  if not 0 <= args.validation_size < 60000:
    p.error(f"--validation-size must be in [0, 60000), got {args.validation_size}")
  if args.features == "scattering" and args.augmentation_multiplicity > 1:
    p.error("--augmentation-multiplicity > 1 shifts images: it needs --features pixels")
  if (args.features == "scattering") != args.model.startswith("scatter_"):
    p.error(f"--model {args.model} and --features {args.features} do not match: the "
            "scatter_* models take --features scattering, the others pixels")
  if args.tune is not None:
    import tune_recipe  # pylint: disable=import-outside-toplevel
    tune_recipe.check_tune_args(args)
  elif args.operator_record:
    p.error("--operator-record records a tuning: it needs --tune GRID")
  return args


def load_splits(args, names=("train", "validation", "test")):
  """The splits among `names` as (images, labels): "train", "test", and with
  --validation-size "validation" (held out of the training set)."""
  _cli_common.say(args, f"Loading {args.dataset} ...")
  data = (mnist_data.load_mnist_tfds(args.dataset.replace("-", "_")) if args.data == "tfds"
          else mnist_data.load_mnist(args.data_dir))
  if args.normalise:
    mean, std = NORMALISATION[args.dataset]
    for split in ("train_images", "test_images"):
      data[split] = (data[split] - mean) / std
  splits = {"train": (data["train_images"], data["train_labels"]),
            "test": (data["test_images"], data["test_labels"])}
  if args.validation_size:
    train = splits["train"]
    order = np.random.default_rng(0).permutation(len(train[0]))
    keep, held = order[:-args.validation_size], order[-args.validation_size:]
    splits["train"], splits["validation"] = (tuple(a[keep] for a in train),
                                             tuple(a[held] for a in train))
  splits = {name: split for name, split in splits.items() if name in names}
  if args.subset is not None:
    splits = {name: tuple(a[:args.subset] for a in split) for name, split in splits.items()}
  if args.features == "scattering":   # per image, data-independent: no privacy cost
    count = sum(len(split[0]) for split in splits.values())
    _cli_common.say(args, f"Computing the ScatterNet features of {count} images ...")
    start = time.time()
    splits = {name: (scattering.scattering_features(x), y) for name, (x, y) in splits.items()}
    print(f"ScatterNet features {splits['train'][0].shape[1:]} of {count} "
          f"images in {time.time() - start:.0f} s", flush=True)
  return splits


def load(args):
  """Train and evaluation arrays: the test set, or the held-out validation split."""
  where = "validation" if args.validation_size else "test"
  splits = load_splits(args, ("train", where))
  return splits["train"], splits[where]


def random_shift(key, example, pad=2):
  """One view: the image shifted by up to `pad` pixels (edge padding)."""
  image, label = example
  padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
  dx, dy = jax.random.randint(key, (2,), 0, 2 * pad + 1)
  return jax.lax.dynamic_slice(padded, (dx, dy, 0), image.shape), label


class Run(NamedTuple):
  """One training run's outcome (`train_model`)."""
  state: Any            # the final TrainState
  params: Any           # what is evaluated: the EMA if --ema-decay, else the last iterate
  sampler: Any
  budget: Any           # None with --no-dp
  eval_loss: float
  eval_accuracy: float
  seconds: float
  history: list
  evaluate: Callable    # evaluate(params, images, labels) -> (mean loss, correct count)


def make_evaluator(model):
  """`evaluate(params, images, labels) -> (mean loss, number correct)`, in chunks."""
  @jax.jit
  def eval_chunk(params, images, labels):
    logits = model.apply({"params": params}, images)
    return (jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels)),
            jnp.sum(jnp.argmax(logits, -1) == labels))

  def evaluate(params, images, labels, chunk=1000):
    loss = correct = 0.0
    for s in range(0, len(images), chunk):
      l, c = eval_chunk(params, images[s:s + chunk], labels[s:s + chunk])
      loss, correct = loss + float(l), correct + float(c)
    return loss / len(images), int(correct)

  return evaluate


def train_model(args, train, evaluation, where, sampler=None, budget=None):
  """Trains `args`' model on `train` with `sampler` and `budget` (default:
  the flags', `_cli_common.plan_privacy`), evaluating on `evaluation` (the
  split called `where`) every --eval-every steps; returns a `Run`."""
  train_images, train_labels = train
  eval_images, eval_labels = evaluation
  dataset_size = len(train_images)
  model = MODELS[args.model]()

  def loss_fn(params, batch):
    """Mean cross-entropy, with the accuracy as aux."""
    images, labels = batch
    logits = model.apply({"params": params}, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == labels)

  init_key, noise_key, augment_key = jax.random.split(jax.random.key(args.seed), 3)
  _cli_common.say(args, f"Building the model ({args.model}) ...")
  params = model.init(init_key, jnp.zeros((1,) + train_images.shape[1:], jnp.float32))["params"]
  learning_rate = (optax.cosine_decay_schedule(args.learning_rate, args.steps)
                   if args.schedule == "cosine" else args.learning_rate)
  links = [optax.sgd(learning_rate, momentum=args.momentum)]
  if args.ema_decay is not None:
    links.append(optax_dp.ema_params(args.ema_decay))
  sgd = optax.chain(*links)
  if sampler is None:
    sampler, budget = _cli_common.plan_privacy(args, dataset_size, args.steps)
  clip = _cli_common.clip_norm(args, params)
  tx = sgd if budget is None else _cli_common.make_private_tx(args, budget, noise_key, sgd, clip)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  k = args.augmentation_multiplicity
  train_loss = (optax_dp.augmentation_multiplicity(loss_fn, random_shift, k) if k > 1
                else lambda p, b: loss_fn(p, b[0]))
  # Each grad_fn returns ((per-example losses, accuracies), gradients).
  if args.no_dp:
    def grad_fn(params, batch, mask):
      def masked_loss(p):
        values = jax.vmap(lambda row: train_loss(p, jax.tree.map(lambda x: x[None], row)))(batch)
        return jnp.sum(values[0] * mask) / jnp.maximum(jnp.sum(mask), 1), values
      (_, values), grads = jax.value_and_grad(masked_loss, has_aux=True)(params)
      return values, grads
  elif args.clipping == "per-example":   # materialised; dp_aggregate clips them
    grad_fn = optax_dp.value_and_per_example_grads(train_loss, has_aux=True)
  else:
    grad_fn = optax_dp.value_and_clipped_grads(train_loss, clip,
                                               method=args.clipping, has_aux=True)

  @jax.jit
  def train_step(state, images, labels, mask, step):
    keys = jax.random.split(jax.random.fold_in(augment_key, step), labels.shape[0])
    current = ({} if args.no_dp or args.clipping == "per-example"
               else _cli_common.current_clip(args, state.opt_state))
    (losses, accuracies), grads = grad_fn(state.params, ((images, labels), keys), mask,
                                          **current)
    real = jnp.maximum(jnp.sum(mask), 1)
    return (state.apply_gradients(grads=grads), jnp.sum(losses * mask) / real,
            jnp.sum(accuracies * mask) / real)

  evaluate = make_evaluator(model)

  def evaluated_params():
    return (optax_dp.averaged_params(state.opt_state) if args.ema_decay is not None
            else state.params)

  print(f"Recipe {args.recipe}: {args.model} on {args.dataset}, {args.steps} steps "
        f"(batch {args.batch_size}, {args.features}), lr {args.learning_rate} ({args.schedule}), clip "
        f"{_cli_common.describe_clip(args)}, EMA {args.ema_decay}, augmentation multiplicity {k}; "
        f"evaluated on the {where} set ({len(eval_images)} examples).", flush=True)
  eval_loss = eval_acc = float("nan")
  train_losses, train_accs = [], []
  batches = sampler.batches(args.seed, steps=args.steps)
  progress = _cli_common.Progress(args, total=args.steps, evaluated_on=where,
                                  eval_size=len(eval_images),
                                  shapes=_cli_common.batch_shapes(sampler, args.steps))
  for step in range(1, args.steps + 1):
    batch = next(batches)
    progress.batch(len(batch.indices))   # announces a new shape's compile
    images, labels = optax_dp.gather_batch((train_images, train_labels), batch).data
    state, loss, acc = train_step(state, images, labels, batch.mask, step)
    train_losses.append(loss)
    train_accs.append(acc)
    progress.step(step, loss)
    if step % args.eval_every == 0 or step == args.steps:
      progress.evaluating()
      eval_loss, correct = evaluate(evaluated_params(), eval_images, eval_labels)
      eval_acc = correct / len(eval_images)
      progress.evaluated(
          step, train_loss=np.mean(train_losses), train_accuracy=np.mean(train_accs),
          eval_loss=eval_loss, eval_accuracy=eval_acc,
          epsilon=budget.epsilon_spent(state.opt_state) if budget else float("inf"))
      train_losses, train_accs = [], []
  progress.close()
  return Run(state, evaluated_params(), sampler, budget, eval_loss, eval_acc,
             progress.seconds(), progress.history, evaluate)


def record_extras(args, run, dataset_size, where):
  """The recipe's keys of the JSON record (beyond `_cli_common.make_record`'s)."""
  return dict(
      recipe=args.recipe, dataset=args.dataset, model=args.model, evaluated_on=where,
      ema_decay=args.ema_decay, augmentation_multiplicity=args.augmentation_multiplicity,
      dataset_size=dataset_size, features=args.features,
      epochs=args.steps * args.batch_size / dataset_size, learning_rate=args.learning_rate,
      schedule=args.schedule, momentum=args.momentum,
      final_l2_norm_clip=_cli_common.final_clip(args, run.state.opt_state))


def main(argv=None):
  known, _ = _recipe_parser().parse_known_args(argv)
  if known.recipe in LM_RECIPES:   # the language models: their own script
    import train_lm  # pylint: disable=import-outside-toplevel
    return train_lm.main(argv)
  args = parse_args(argv)
  if args.tune is not None:
    import tune_recipe  # pylint: disable=import-outside-toplevel
    tune_recipe.main(args, load_splits=load_splits, train_model=train_model)
    return None
  train, evaluation = load(args)
  dataset_size = len(train[0])
  where = "validation" if args.validation_size else "test"
  run = train_model(args, train, evaluation, where)
  released = run.budget.steps_taken(run.state.opt_state) if run.budget else args.steps
  epsilon = _cli_common.report(args, run.budget, run.sampler, opt_state=run.state.opt_state,
                               expected_steps=args.steps, released=released,
                               steps_done=args.steps, seconds=run.seconds,
                               test_acc=run.eval_accuracy, dataset_size=dataset_size,
                               evaluated_on=where)
  _cli_common.write_outputs(args, _cli_common.make_record(
      args, run.budget, run.sampler, epsilon=epsilon, test_accuracy=run.eval_accuracy,
      test_loss=run.eval_loss, steps=args.steps, steps_this_run=args.steps,
      seconds=run.seconds, history=run.history,
      **record_extras(args, run, dataset_size, where)))


if __name__ == "__main__":
  main()
