"""Private MNIST with Flax NNX: DP-SGD by swapping the optimizer's `tx`.

The Flax NNX twin of `mnist_linen.py`, written the way Flax's NNX MNIST
tutorial is: the tutorial CNN as an `nnx.Module` (`models.NNXCNN`: Conv32 3x3 -
relu - avgpool 2 - Conv64 3x3 - relu - avgpool 2 - Linear256 - relu -
Linear10), `nnx.Optimizer(model, tx, wrt=nnx.Param)`, `nnx.jit` train and eval
steps and an `nnx.MultiMetric` (accuracy, average loss). It starts from the
Linen example's initial values for the same `--seed`, so with the same flags
the two examples train the same model and print the same numbers (up to
float rounding; tests/test_example_mnist.py checks it): a check that the NNX
swap is the Linen one. The private parts are
the same as in the Linen example: the optimizer's `tx`
(`optax_dp.dp_aggregate` chained before SGD), the clipped gradient function
(`optax_dp.value_and_clipped_grads` of a `loss_fn(model, batch)`) and the
sampler, coupled with its accounting by the privacy budget
(`optax_dp.privacy_budget`). The defaults are the tutorial's (5000 steps,
batch 256, SGD lr 0.1 momentum 0.9, l2_norm_clip 0.1 with the clipped sum
rescaled to unit norm, epsilon 1, delta 1e-5) and the flags, the privacy
statement and the --json-out record are the Linen example's (`_cli_common.py`
holds them once for both).

Run:  python examples/mnist_nnx.py --steps 200
Also: --sampler {poisson,fixed,shuffle}, --clipping {auto,ghost,vmap,per-example},
      --noise-multiplier S (the budget then caps the steps; --allow-budget-overrun),
      --json-out PATH (the run's record and history), --plot PATH, --quiet.
Not here (see mnist_linen.py): --accumulation-steps, --devices, --checkpoint-dir,
--resume and --stop-at.
"""

from __future__ import annotations

import argparse
import os
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import optax

import optax_dp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli_common  # pylint: disable=g-import-not-at-top,wrong-import-position
from models import CNN, nnx_cnn_from_linen  # pylint: disable=g-import-not-at-top,wrong-import-position


def loss_fn(model, batch):
  """The ordinary batched loss: mean cross-entropy, with the logits as aux."""
  images, labels = batch
  logits = model(images)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, logits


def make_grad_fn(args, l2_norm_clip=None):
  """`grad_fn(model, masked_batch) -> ((losses, logits), grads)` for the run
  (`masked_batch`: gather_batch's rows and mask).

  Private: `optax_dp.value_and_clipped_grads` (each example's gradient
  clipped, one clipped sum per variable for `dp_aggregate`) or, with
  `--clipping per-example`, the per-example gradients, which `dp_aggregate`
  clips. The values are per example either way. --no-dp: `nnx.value_and_grad`
  of the mean loss over the real (unmasked) examples. `l2_norm_clip`: that of
  `dp_aggregate` (`_cli_common.clip_norm`; default the flat --l2-norm-clip).
  """
  if args.no_dp:
    def masked_loss(model, batch, mask):
      images, labels = batch
      logits = model(images)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      real = jnp.maximum(jnp.sum(mask), 1)
      return jnp.sum(losses * mask) / real, (losses, logits)

    def grad_fn(model, batch):
      (_, values), grads = nnx.value_and_grad(masked_loss, has_aux=True)(
          model, batch.data, batch.mask)
      return values, grads
    return grad_fn
  if args.clipping == "per-example":
    return optax_dp.value_and_per_example_grads(loss_fn, has_aux=True)
  return optax_dp.value_and_clipped_grads(
      loss_fn, args.l2_norm_clip if l2_norm_clip is None else l2_norm_clip,
      method=args.clipping, has_aux=True)


def make_train_step(grad_fn, adaptive=False):
  """One optimizer step; the batch's metrics go into `metrics`. `adaptive`:
  pass the clipped-gradient function the optimizer state's current clip norm."""

  @nnx.jit
  def train_step(model, optimizer, metrics, batch):
    # batch: the optax_dp.MaskedBatch of gather_batch (rows and mask together).
    current = ({"l2_norm_clip": optax_dp.l2_norm_clip_of(optimizer.opt_state)}
               if adaptive else {})
    (losses, logits), grads = grad_fn(model, batch, **current)
    optimizer.update(model, grads)
    _, labels = batch.data
    # Train metrics over the real rows only (padding rows carry logits too).
    # They are NOT private: logging them is a release outside the epsilon.
    metrics.update(loss=losses, logits=logits, labels=labels, mask=batch.mask)

  return train_step


@nnx.jit
def eval_step(model, metrics, images, labels):
  logits = model(images)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  metrics.update(loss=losses, logits=logits, labels=labels)


def evaluate(model, metrics, images, labels, chunk=1000):
  """Mean test loss and accuracy, in jitted chunks; leaves `metrics` reset."""
  metrics.reset()
  for start in range(0, len(images), chunk):
    eval_step(model, metrics, images[start:start + chunk], labels[start:start + chunk])
  result = metrics.compute()
  metrics.reset()
  return float(result["loss"]), float(result["accuracy"])


def build_parser():
  """The example's flags (argparse): the Linen example's, less its extras."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  _cli_common.add_training_flags(p, steps_help="noisy steps to run")
  _cli_common.add_budget_flags(p)
  _cli_common.add_output_flags(p)
  return p


def parse_args(argv=None):
  p = build_parser()
  args = p.parse_args(argv)
  _cli_common.require_positive(p, args, ("steps", "batch_size", "eval_every"))
  return args


def main(argv=None):
  args = parse_args(argv)
  data = _cli_common.load_data(args)
  train_images, train_labels = data["train_images"], data["train_labels"]
  dataset_size = len(train_images)

  init_key, noise_key = jax.random.split(jax.random.key(args.seed))
  _cli_common.say(args, "Building the CNN ...")
  # The Linen example's initial values for the same seed (nnx.Rngs would draw
  # others): the two examples then train the same model, step for step.
  model = nnx_cnn_from_linen(
      CNN().init(init_key, jnp.zeros((1, 28, 28, 1), jnp.float32))["params"])
  sgd = optax.sgd(args.learning_rate, momentum=args.momentum)
  sampler, budget = _cli_common.plan_privacy(args, dataset_size, args.steps)
  clip = _cli_common.clip_norm(args, nnx.state(model, nnx.Param))
  tx = sgd if budget is None else _cli_common.make_private_tx(args, budget, noise_key, sgd, clip)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(),
                            loss=nnx.metrics.Average("loss"))
  train_step = make_train_step(
      make_grad_fn(args, clip),
      adaptive=(args.clipping_strategy == "adaptive" and not args.no_dp
                and args.clipping != "per-example"))

  def epsilon_now():
    return budget.epsilon_spent(optimizer.opt_state) if budget else float("inf")

  batches = sampler.batches(args.seed, steps=args.steps)
  test_loss = test_acc = float("nan")
  progress = _cli_common.Progress(args, total=args.steps,
                                  eval_size=len(data["test_images"]),
                                  shapes=_cli_common.batch_shapes(sampler, args.steps))
  for step in range(1, args.steps + 1):
    batch = next(batches)
    progress.batch(len(batch.indices))   # announces a new shape's compile
    train_step(model, optimizer, metrics,
               optax_dp.gather_batch((train_images, train_labels), batch))
    progress.step(step, lambda: metrics.compute()["loss"])
    if step % args.eval_every == 0 or step == args.steps:
      train = metrics.compute()
      progress.evaluating()
      test_loss, test_acc = evaluate(model, metrics, data["test_images"],
                                     data["test_labels"])
      progress.evaluated(step, train_loss=train["loss"], train_accuracy=train["accuracy"],
                         eval_loss=test_loss, eval_accuracy=test_acc,
                         epsilon=epsilon_now())
  progress.close()

  seconds = progress.seconds()
  released = budget.steps_taken(optimizer.opt_state) if budget else args.steps
  epsilon = _cli_common.report(
      args, budget, sampler, opt_state=optimizer.opt_state, expected_steps=args.steps,
      released=released, steps_done=args.steps, seconds=seconds, test_acc=test_acc,
      dataset_size=dataset_size)
  _cli_common.write_outputs(args, _cli_common.make_record(
      args, budget, sampler, epsilon=epsilon, test_accuracy=test_acc,
      test_loss=test_loss, steps=released, steps_this_run=args.steps, seconds=seconds,
      history=progress.history,
      final_l2_norm_clip=_cli_common.final_clip(args, optimizer.opt_state)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
