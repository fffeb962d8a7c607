"""Private MNIST with Flax Linen: DP-SGD by swapping `tx`.

The jax_privacy Flax Linen DP-SGD tutorial, rewritten for optax_dp: the same CNN
(Conv32 3x3 - relu - avgpool 2 - Conv64 3x3 - relu - avgpool 2 - Dense256 -
relu - Dense10), the same defaults (5000 steps, batch 256, SGD lr 0.1 momentum
0.9, l2_norm_clip 0.1 with the clipped sum rescaled to unit norm, epsilon 1,
delta 1e-5), and a plain Flax `TrainState`
loop. The only private parts are the optimizer (`tx`), the per-example gradient
function and the Poisson sampler, so the epsilon printed is the epsilon of the
run: Poisson sampling at q = batch_size / 60000 for exactly the steps run, with
the noise multiplier calibrated for them.

Run:  python examples/mnist_linen.py --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_dp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mnist_data  # pylint: disable=g-import-not-at-top,wrong-import-position


class CNN(nn.Module):
  """The tutorial's CNN."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=32, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=64, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(features=256)(x)
    x = nn.relu(x)
    x = nn.Dense(features=10)(x)
    return x


def make_loss_fn(model):
  """The ordinary batched loss: mean cross-entropy, with accuracy as aux."""

  def loss_fn(params, batch):
    images, labels = batch
    logits = model.apply({"params": params}, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, accuracy

  return loss_fn


def make_private_train_step(loss_fn, l2_norm_clip, clipping):
  """A jitted train step; only the gradient function is DP-specific.

  `clipping="per-example"` materialises per-example gradients and lets
  `dp_aggregate` clip them; the other values use `optax_dp.clipped_grads`
  (book-keeping for the Flax layers with "auto"/"ghost"), which hands
  `dp_aggregate` the clipped sum directly: same numbers, far less work.
  """
  if clipping == "per-example":
    grad_fn = optax_dp.value_and_per_example_grads(loss_fn, has_aux=True)
  else:
    grad_fn = optax_dp.value_and_clipped_grads(loss_fn, l2_norm_clip, method=clipping,
                                               has_aux=True)

  @jax.jit
  def train_step(state, images, labels, mask):
    (losses, accuracies), grads = grad_fn(state.params, (images, labels), mask)
    state = state.apply_gradients(grads=grads)
    real = jnp.sum(mask)
    return state, jnp.sum(losses) / real, jnp.sum(accuracies * mask) / real

  return train_step


def make_nonprivate_train_step(loss_fn):
  """The same step without DP (for --no-dp): a masked mean loss and jax.grad."""

  def masked_loss(params, images, labels, mask):
    losses, accuracies = jax.vmap(
        lambda x, y: loss_fn(params, (x[None], y[None])))(images, labels)
    real = jnp.sum(mask)
    return jnp.sum(losses * mask) / real, jnp.sum(accuracies * mask) / real

  @jax.jit
  def train_step(state, images, labels, mask):
    (loss, accuracy), grads = jax.value_and_grad(masked_loss, has_aux=True)(
        state.params, images, labels, mask)
    return state.apply_gradients(grads=grads), loss, accuracy

  return train_step


def evaluate(loss_fn, params, images, labels, chunk=1000):
  """Mean test loss and accuracy, in jitted chunks."""
  eval_chunk = jax.jit(loss_fn)
  total_loss = total_acc = 0.0
  for start in range(0, len(images), chunk):
    x, y = images[start:start + chunk], labels[start:start + chunk]
    loss, acc = eval_chunk(params, (x, y))
    total_loss += float(loss) * len(x)
    total_acc += float(acc) * len(x)
  return total_loss / len(images), total_acc / len(images)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=5000)
  p.add_argument("--batch-size", type=int, default=256,
                 help="expected Poisson batch size (q = batch_size / 60000)")
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
  p.add_argument("--epsilon", type=float, default=1.0)
  p.add_argument("--delta", type=float, default=1e-5)
  p.add_argument("--accountant", choices=optax_dp._accounting.ACCOUNTANTS, default="pld")
  p.add_argument("--eval-every", type=int, default=200)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-dp", action="store_true", help="train without privacy")
  p.add_argument("--data", choices=("idx", "tfds"), default="idx",
                 help="idx: the bundled IDX files (default); tfds: tensorflow-datasets")
  p.add_argument("--data-dir", default=mnist_data.DEFAULT_DATA_DIR)
  p.add_argument("--json-out", default=None)
  args = p.parse_args(argv)
  if args.steps < 1 or args.batch_size < 1 or args.eval_every < 1:
    p.error("--steps, --batch-size and --eval-every must be >= 1")
  return args


def main(argv=None):
  args = parse_args(argv)
  data = (mnist_data.load_mnist_tfds() if args.data == "tfds"
          else mnist_data.load_mnist(args.data_dir))
  train_images, train_labels = data["train_images"], data["train_labels"]
  dataset_size = len(train_images)
  if args.batch_size > dataset_size:
    raise SystemExit(f"--batch-size {args.batch_size} > dataset size {dataset_size}")

  root = jax.random.key(args.seed)
  init_key, noise_key = jax.random.split(root)
  model = CNN()
  params = model.init(init_key, jnp.zeros((1, 28, 28, 1), jnp.float32))["params"]
  loss_fn = make_loss_fn(model)

  sgd = optax.sgd(args.learning_rate, momentum=args.momentum)
  if args.no_dp:
    noise_multiplier = None
    tx = sgd
    train_step = make_nonprivate_train_step(loss_fn)
    print("Training WITHOUT differential privacy (--no-dp).")
  else:
    t = time.time()
    noise_multiplier = optax_dp.calibrate_noise_multiplier(
        args.epsilon, args.delta, dataset_size=dataset_size,
        batch_size=args.batch_size, steps=args.steps, accountant=args.accountant)
    print(f"Noise multiplier {noise_multiplier} for epsilon {args.epsilon}, "
          f"delta {args.delta}, Poisson sampling q={args.batch_size}/{dataset_size}, "
          f"{args.steps} steps ({args.accountant} accountant, {time.time() - t:.1f} s).")
    tx = optax.chain(
        optax_dp.dp_aggregate(args.l2_norm_clip, noise_multiplier, noise_key,
                              expected_batch_size=args.batch_size,
                              rescale_to_unit_norm=args.rescale_to_unit_norm),
        sgd)
    train_step = make_private_train_step(loss_fn, args.l2_norm_clip, args.clipping)

  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  def epsilon_after(steps):
    if noise_multiplier is None:
      return float("inf")
    return optax_dp.compute_epsilon(
        noise_multiplier, args.delta, dataset_size=dataset_size,
        batch_size=args.batch_size, steps=steps, accountant=args.accountant)

  batches = optax_dp.poisson_batches(
      args.seed, dataset_size=dataset_size, expected_batch_size=args.batch_size,
      steps=args.steps, pad_to_multiple_of=32)
  start = time.time()
  train_losses, train_accs = [], []
  test_loss = test_acc = float("nan")
  steps_done = 0
  for step, batch in enumerate(batches, start=1):
    images, labels = optax_dp.gather_batch((train_images, train_labels), batch)
    state, loss, acc = train_step(state, images, labels, batch.mask)
    steps_done = step
    train_losses.append(loss)
    train_accs.append(acc)
    if step % args.eval_every == 0 or step == args.steps:
      test_loss, test_acc = evaluate(loss_fn, state.params, data["test_images"],
                                     data["test_labels"])
      eps = epsilon_after(step)
      print(f"step {step:5d}  train loss {float(np.mean(train_losses)):.4f} "
            f"acc {float(np.mean(train_accs)):.4f}  test loss {test_loss:.4f} "
            f"acc {test_acc:.4f}  epsilon {eps:.4f}  {time.time() - start:.0f} s",
            flush=True)
      train_losses, train_accs = [], []

  seconds = time.time() - start
  if noise_multiplier is not None:
    dp_state = state.opt_state[0]
    released = int(dp_state.step)
    if released != steps_done:  # the ledger and the loop must agree
      raise RuntimeError(f"optimizer released {released} noisy updates, loop ran {steps_done}")
    epsilon = epsilon_after(released)
    print(f"Done: {released} steps in {seconds:.0f} s. Test accuracy {test_acc:.4f}. "
          f"Privacy: ({epsilon:.4f}, {args.delta})-DP for the {dataset_size} "
          f"training examples (Poisson sampling, {args.accountant} accountant, "
          f"noise multiplier {noise_multiplier}, clip {args.l2_norm_clip}).")
  else:
    epsilon = float("inf")
    print(f"Done: {steps_done} steps in {seconds:.0f} s. Test accuracy {test_acc:.4f}. "
          "NOT private (--no-dp).")

  if args.json_out:
    result = {
        "test_accuracy": test_acc,
        "epsilon": epsilon if np.isfinite(epsilon) else None,
        "delta": args.delta,
        "noise_multiplier": noise_multiplier,
        "steps": steps_done,
        "batch_size": args.batch_size,
        "seconds": seconds,
        "l2_norm_clip": args.l2_norm_clip,
        "sampler": "poisson",
        "accountant": args.accountant,
        "clipping": None if args.no_dp else args.clipping,
        "private": not args.no_dp,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
