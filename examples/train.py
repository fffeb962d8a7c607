"""Private training from a named recipe, in one command.

Run:  python examples/train.py --recipe mnist-eps1 [--seed 1] [--json-out r.json]
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
from recipes import NORMALISATION, RECIPES  # pylint: disable=wrong-import-position

MODELS = {"tutorial_cnn": models.CNN, "tanh_cnn": models.TanhCNN,
          "groupnorm_cnn": models.GroupNormCNN, "scatter_linear": models.ScatterLinear,
          "scatter_cnn": models.ScatterCNN}
DATA_DIRS = {"mnist": mnist_data.DEFAULT_DATA_DIR,
             "fashion-mnist": os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           "..", "..", "shared", "data", "fashion-mnist")}


def parse_args(argv=None):
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--recipe", default="mnist-eps1")
  pre.add_argument("--list", action="store_true")
  known, _ = pre.parse_known_args(argv)
  if known.list:
    for name, recipe in RECIPES.items():
      print(name, recipe)
    raise SystemExit(0)
  if known.recipe not in RECIPES:
    _cli_common.fail(f"--recipe {known.recipe!r}: choose from {sorted(RECIPES)}")
  recipe = RECIPES[known.recipe]

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[pre])
  _cli_common.add_training_flags(p, steps_help="noisy steps (default: the recipe's epochs)")
  _cli_common.add_budget_flags(p)
  _cli_common.add_output_flags(p)
  p.add_argument("--dataset", choices=sorted(DATA_DIRS))
  p.add_argument("--model", choices=sorted(MODELS))
  p.add_argument("--normalise", action=argparse.BooleanOptionalAction)
  p.add_argument("--features", choices=("pixels", "scattering"),
                 help="train on the pixels or on ScatterNet features (scattering.py)")
  p.add_argument("--epochs", type=float)
  p.add_argument("--schedule", choices=("constant", "cosine"))
  p.add_argument("--ema-decay", type=float, help="evaluate an EMA of the parameters")
  p.add_argument("--augmentation-multiplicity", type=int,
                 help="K random shifts of each example, averaged before the clip")
  p.add_argument("--validation-size", type=int, default=0)
  p.add_argument("--subset", type=int, default=None,
                 help="train on the first N training examples and evaluate on the first N "
                      "evaluation ones (quick tries and tests; the accounting uses N)")
  p.set_defaults(**recipe, steps=None, data_dir=None, eval_every=None)
  args = p.parse_args(argv)
  dataset_size = 60000 - args.validation_size
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
  return args


def load(args):
  """Train and evaluation arrays: the test set, or the held-out validation split."""
  data = (mnist_data.load_mnist_tfds(args.dataset.replace("-", "_")) if args.data == "tfds"
          else mnist_data.load_mnist(args.data_dir))
  if args.normalise:
    mean, std = NORMALISATION[args.dataset]
    for split in ("train_images", "test_images"):
      data[split] = (data[split] - mean) / std
  train = (data["train_images"], data["train_labels"])
  evaluation = (data["test_images"], data["test_labels"])
  if args.validation_size:
    order = np.random.default_rng(0).permutation(len(train[0]))
    keep, held = order[:-args.validation_size], order[-args.validation_size:]
    train, evaluation = (tuple(a[keep] for a in train), tuple(a[held] for a in train))
  if args.subset is not None:
    train, evaluation = (tuple(a[:args.subset] for a in split) for split in (train, evaluation))
  if args.features == "scattering":   # per image, data-independent: no privacy cost
    start = time.time()
    train, evaluation = ((scattering.scattering_features(x), y) for x, y in (train, evaluation))
    print(f"ScatterNet features {train[0].shape[1:]} of {len(train[0]) + len(evaluation[0])} "
          f"images in {time.time() - start:.0f} s", flush=True)
  return train, evaluation


def random_shift(key, example, pad=2):
  """One view: the image shifted by up to `pad` pixels (edge padding)."""
  image, label = example
  padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
  dx, dy = jax.random.randint(key, (2,), 0, 2 * pad + 1)
  return jax.lax.dynamic_slice(padded, (dx, dy, 0), image.shape), label


def main(argv=None):
  args = parse_args(argv)
  (train_images, train_labels), (eval_images, eval_labels) = load(args)
  dataset_size = len(train_images)
  model = MODELS[args.model]()

  def loss_fn(params, batch):
    images, labels = batch
    logits = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  init_key, noise_key, augment_key = jax.random.split(jax.random.key(args.seed), 3)
  params = model.init(init_key, jnp.zeros((1,) + train_images.shape[1:], jnp.float32))["params"]
  learning_rate = (optax.cosine_decay_schedule(args.learning_rate, args.steps)
                   if args.schedule == "cosine" else args.learning_rate)
  links = [optax.sgd(learning_rate, momentum=args.momentum)]
  if args.ema_decay is not None:
    links.append(optax_dp.ema_params(args.ema_decay))
  sgd = optax.chain(*links)
  sampler, budget = _cli_common.plan_privacy(args, dataset_size, args.steps)
  tx = sgd if budget is None else _cli_common.make_private_tx(args, budget, noise_key, sgd)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  k = args.augmentation_multiplicity
  train_loss = (optax_dp.augmentation_multiplicity(loss_fn, random_shift, k) if k > 1
                else lambda p, b: loss_fn(p, b[0]))
  if args.no_dp:
    def grad_fn(params, batch, mask):
      return jax.grad(lambda p: jnp.sum(jax.vmap(
          lambda row: train_loss(p, jax.tree.map(lambda x: x[None], row)))(batch) * mask)
          / jnp.maximum(jnp.sum(mask), 1))(params)
  elif args.clipping == "per-example":   # materialised; dp_aggregate clips them
    grad_fn = optax_dp.per_example_grads(train_loss)
  else:
    grad_fn = optax_dp.clipped_grads(train_loss, args.l2_norm_clip, method=args.clipping)

  @jax.jit
  def train_step(state, images, labels, mask, step):
    keys = jax.random.split(jax.random.fold_in(augment_key, step), labels.shape[0])
    return state.apply_gradients(grads=grad_fn(state.params, ((images, labels), keys), mask))

  @jax.jit
  def eval_chunk(params, images, labels):
    logits = model.apply({"params": params}, images)
    return (jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels)),
            jnp.sum(jnp.argmax(logits, -1) == labels))

  def evaluate(params, chunk=1000):
    loss = correct = 0.0
    for s in range(0, len(eval_images), chunk):
      l, c = eval_chunk(params, eval_images[s:s + chunk], eval_labels[s:s + chunk])
      loss, correct = loss + float(l), correct + float(c)
    return loss / len(eval_images), correct / len(eval_images)

  def evaluated_params():
    return (optax_dp.averaged_params(state.opt_state) if args.ema_decay is not None
            else state.params)

  where = "validation" if args.validation_size else "test"
  print(f"Recipe {args.recipe}: {args.model} on {args.dataset}, {args.steps} steps "
        f"(batch {args.batch_size}, {args.features}), lr {args.learning_rate} ({args.schedule}), clip "
        f"{args.l2_norm_clip}, EMA {args.ema_decay}, augmentation multiplicity {k}; "
        f"evaluated on the {where} set ({len(eval_images)} examples).", flush=True)
  start = time.time()
  eval_loss = eval_acc = float("nan")
  batches = sampler.batches(args.seed, steps=args.steps)
  for step in range(1, args.steps + 1):
    batch = next(batches)
    images, labels = optax_dp.gather_batch((train_images, train_labels), batch)
    state = train_step(state, images, labels, batch.mask, step)
    if step % args.eval_every == 0 or step == args.steps:
      eval_loss, eval_acc = evaluate(evaluated_params())
      epsilon = budget.epsilon_spent(state.opt_state) if budget else float("inf")
      print(f"step {step:5d}/{args.steps}  {where} loss {eval_loss:.4f} acc "
            f"{eval_acc:.4f}  epsilon {epsilon:.4f}  {time.time() - start:.0f} s",
            flush=True)
  seconds = time.time() - start
  released = budget.steps_taken(state.opt_state) if budget else args.steps
  epsilon = _cli_common.report(args, budget, sampler, opt_state=state.opt_state,
                               expected_steps=args.steps, released=released,
                               steps_done=args.steps, seconds=seconds, test_acc=eval_acc,
                               dataset_size=dataset_size, evaluated_on=where)
  _cli_common.write_json(
      args, budget, sampler, epsilon=epsilon, test_accuracy=eval_acc, test_loss=eval_loss,
      steps=args.steps, steps_this_run=args.steps, seconds=seconds, recipe=args.recipe,
      dataset=args.dataset, model=args.model, evaluated_on=where, ema_decay=args.ema_decay,
      augmentation_multiplicity=k, dataset_size=dataset_size, features=args.features,
      epochs=args.steps * args.batch_size / dataset_size, learning_rate=args.learning_rate,
      schedule=args.schedule, momentum=args.momentum)


if __name__ == "__main__":
  main()
