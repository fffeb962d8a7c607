"""Private MNIST with Flax Linen: DP-SGD by swapping `tx`.

The jax_privacy Flax Linen DP-SGD tutorial, rewritten for optax_dp: the same CNN
(Conv32 3x3 - relu - avgpool 2 - Conv64 3x3 - relu - avgpool 2 - Dense256 -
relu - Dense10), the same defaults (5000 steps, batch 256, SGD lr 0.1 momentum
0.9, l2_norm_clip 0.1 with the clipped sum rescaled to unit norm, epsilon 1,
delta 1e-5), and a plain Flax `TrainState`
loop. The only private parts are the optimizer (`tx`), the per-example gradient
function and the sampler, so the epsilon printed is the epsilon of the run: by
default Poisson sampling at q = batch_size / 60000 for exactly the steps run,
with the noise multiplier calibrated for them. The privacy budget object
(`optax_dp.privacy_budget`) couples the sampler with its accounting and makes
the optimizer refuse steps past the budget.

Run:  python examples/mnist_linen.py --steps 200
Also: --sampler {poisson,fixed,shuffle}, --accumulation-steps K,
      --noise-multiplier S (the budget then caps the steps; --allow-budget-overrun),
      --checkpoint-dir DIR and --resume DIR, --devices N (data-parallel).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_dp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mnist_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from models import CNN  # pylint: disable=g-import-not-at-top,wrong-import-position


def make_loss_fn(model):
  """The ordinary batched loss: mean cross-entropy, with accuracy as aux."""

  def loss_fn(params, batch):
    images, labels = batch
    logits = model.apply({"params": params}, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, accuracy

  return loss_fn


def make_private_train_step(loss_fn, l2_norm_clip, clipping, accumulation_steps=1,
                            mesh=None):
  """A jitted train step; only the gradient function is DP-specific.

  With a `mesh` (several devices), the batch is split over its "data" axis:
  each device clips its own examples and only the clipped sum crosses devices
  (`optax_dp.sharded_value_and_clipped_grads` / `sharded_per_example_grads`);
  the noise is then drawn once, as on one device.

  `clipping="per-example"` materialises per-example gradients and lets
  `dp_aggregate` clip them; the other values use `optax_dp.clipped_grads`
  (book-keeping for the Flax layers with "auto"/"ghost"), which hands
  `dp_aggregate` the clipped sum directly: same numbers, far less work. With
  gradient accumulation, `dp_accumulate` takes clipped sums, so per-example
  gradients are clipped with `optax_dp.clip_and_sum` first.
  """
  if clipping == "per-example":
    per_example = (optax_dp.value_and_per_example_grads(loss_fn, has_aux=True)
                   if mesh is None else
                   optax_dp.sharded_per_example_grads(loss_fn, mesh=mesh, has_aux=True))

    def grad_fn(params, batch, mask):
      values, grads = per_example(params, batch, mask)
      if accumulation_steps > 1:
        grads = optax_dp.clip_and_sum(grads, l2_norm_clip)
      return values, grads
  elif mesh is None:
    grad_fn = optax_dp.value_and_clipped_grads(loss_fn, l2_norm_clip, method=clipping,
                                               has_aux=True)
  else:
    grad_fn = optax_dp.sharded_value_and_clipped_grads(
        loss_fn, l2_norm_clip, mesh=mesh, method=clipping, has_aux=True)

  @jax.jit
  def train_step(state, images, labels, mask):
    (losses, accuracies), grads = grad_fn(state.params, (images, labels), mask)
    state = state.apply_gradients(grads=grads)
    real = jnp.maximum(jnp.sum(mask), 1)
    return state, jnp.sum(losses) / real, jnp.sum(accuracies * mask) / real

  return train_step


def make_nonprivate_train_step(loss_fn):
  """The same step without DP (for --no-dp): a masked mean loss and jax.grad."""

  def masked_loss(params, images, labels, mask):
    losses, accuracies = jax.vmap(
        lambda x, y: loss_fn(params, (x[None], y[None])))(images, labels)
    real = jnp.maximum(jnp.sum(mask), 1)
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


# Settings a resumed run takes from its checkpoint directory: they define the
# mechanism the privacy ledger accounts for (or the noise stream and data order).
RUN_SETTINGS = ("batch_size", "learning_rate", "momentum", "l2_norm_clip",
                "rescale_to_unit_norm", "epsilon", "delta", "accountant", "seed",
                "no_dp", "sampler", "accumulation_steps", "noise_multiplier")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=5000,
                 help="noisy (logical) steps to run in total, resumed ones included")
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
  p.add_argument("--accumulation-steps", type=int, default=1,
                 help="split each logical batch into K physical batches; noise "
                      "is added once per logical batch (optax_dp.dp_accumulate)")
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
  p.add_argument("--devices", type=int, default=None,
                 help="data-parallel over this many devices (default: all visible); "
                      "each device clips its share of the batch, one all-reduce "
                      "of the clipped sum per step, noise drawn once")
  p.add_argument("--checkpoint-dir", default=None,
                 help="save the training state (orbax) and the run's settings "
                      "here at every evaluation")
  p.add_argument("--resume", metavar="DIR", default=None,
                 help="resume from the latest checkpoint in DIR (made with "
                      "--checkpoint-dir); the run's settings come from DIR, and "
                      "new checkpoints go to DIR unless --checkpoint-dir says otherwise")
  p.add_argument("--stop-at", type=int, default=None,
                 help="stop after this step, as if preempted (to try --resume); "
                      "the noise is still calibrated for --steps")
  p.add_argument("--no-dp", action="store_true", help="train without privacy")
  p.add_argument("--data", choices=("idx", "tfds"), default="idx",
                 help="idx: the bundled IDX files (default); tfds: tensorflow-datasets")
  p.add_argument("--data-dir", default=mnist_data.DEFAULT_DATA_DIR)
  p.add_argument("--json-out", default=None)
  args = p.parse_args(argv)
  if min(args.steps, args.batch_size, args.eval_every, args.accumulation_steps) < 1:
    p.error("--steps, --batch-size, --eval-every and --accumulation-steps must be >= 1")
  if args.resume:
    _apply_saved_settings(p, args)
  return args


def _apply_saved_settings(parser, args):
  """Takes the run's settings from its checkpoint directory; refuses conflicts."""
  path = os.path.join(args.resume, "run.json")
  if not os.path.exists(path):
    parser.error(f"--resume {args.resume}: no run.json there (was it made with "
                 "--checkpoint-dir?)")
  with open(path) as f:
    saved = json.load(f)
  for name in RUN_SETTINGS:
    given, default = getattr(args, name), parser.get_default(name)
    if given != default and given != saved[name]:
      parser.error(
          f"--{name.replace('_', '-')} {given} conflicts with the resumed run's "
          f"{saved[name]!r}: a run's sampler, noise, clipping and data order cannot "
          "change midway without breaking its privacy accounting.")
    setattr(args, name, saved[name])
  args.budget_steps = saved["budget_steps"]
  args.max_batch_size = saved["max_batch_size"]
  if args.checkpoint_dir is None:
    args.checkpoint_dir = args.resume


def fail(message):
  """Exits with status 2 and `message` on stderr (bad flags or a refused run)."""
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(2)


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


def latest_checkpoint(directory):
  steps = [int(name[len("step_"):]) for name in os.listdir(directory)
           if name.startswith("step_") and name[len("step_"):].isdigit()]
  return max(steps) if steps else None


def save_checkpoint(directory, state, step, settings):
  """Saves the TrainState (params and optimizer state, noise key and privacy
  ledger included) with orbax, then drops older checkpoints."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "run.json"), "w") as f:
    json.dump(settings, f, indent=2)
  checkpointer = ocp.StandardCheckpointer()
  target = os.path.join(directory, f"step_{step}")
  if os.path.exists(target):
    shutil.rmtree(target)
  checkpointer.save(target, state)
  checkpointer.wait_until_finished()
  for name in os.listdir(directory):
    if name.startswith("step_") and name != f"step_{step}":
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def restore_checkpoint(directory, state_like):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  step = latest_checkpoint(directory)
  if step is None:
    raise SystemExit(f"--resume {directory}: no checkpoint (step_*) in it.")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(directory), f"step_{step}"), abstract)
  return restored, step


def main(argv=None):
  args = parse_args(argv)
  data = (mnist_data.load_mnist_tfds() if args.data == "tfds"
          else mnist_data.load_mnist(args.data_dir))
  train_images, train_labels = data["train_images"], data["train_labels"]
  dataset_size = len(train_images)
  if args.batch_size > dataset_size:
    raise SystemExit(f"--batch-size {args.batch_size} > dataset size {dataset_size}")
  k = args.accumulation_steps
  available = len(jax.devices())
  num_devices = args.devices or available
  if not 1 <= num_devices <= available:
    fail(f"--devices {args.devices}: {available} device(s) visible (on CPU, set "
         "XLA_FLAGS=--xla_force_host_platform_device_count=N to simulate N).")
  mesh = (jax.sharding.Mesh(np.array(jax.devices()[:num_devices]), ("data",))
          if num_devices > 1 else None)

  root = jax.random.key(args.seed)
  init_key, noise_key = jax.random.split(root)
  model = CNN()
  params = model.init(init_key, jnp.zeros((1, 28, 28, 1), jnp.float32))["params"]
  loss_fn = make_loss_fn(model)

  sgd = optax.sgd(args.learning_rate, momentum=args.momentum)
  budget = None
  budget_steps = getattr(args, "budget_steps", None) or args.steps
  if args.no_dp:
    sampler = make_sampler(args, dataset_size, budget_steps)
    tx = optax.MultiSteps(sgd, k) if k > 1 else sgd
    train_step = make_nonprivate_train_step(loss_fn)
    print("Training WITHOUT differential privacy (--no-dp).")
  else:
    t = time.time()
    sampler = make_sampler(args, dataset_size, budget_steps)
    try:
      budget = make_budget(args, sampler)
    except ValueError as e:
      fail(str(e))
    budget_steps = budget.max_steps
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
    tx = optax.chain(
        optax_dp.dp_aggregate(args.l2_norm_clip, key=noise_key, budget=budget,
                              allow_budget_overrun=args.allow_budget_overrun,
                              rescale_to_unit_norm=args.rescale_to_unit_norm),
        sgd)
    if k > 1:
      tx = optax_dp.dp_accumulate(tx, k)
    train_step = make_private_train_step(loss_fn, args.l2_norm_clip, args.clipping, k,
                                         mesh)

  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  settings = {name: getattr(args, name) for name in RUN_SETTINGS}
  settings.update(budget_steps=budget_steps, dataset_size=dataset_size,
                  max_batch_size=getattr(sampler, "max_batch_size", None))

  start_step = 0
  if args.resume:
    state, start_step = restore_checkpoint(args.resume, state)
    print(f"Resumed from {args.resume} at step {start_step}.")
    if start_step > args.steps:
      fail(f"the checkpoint is at step {start_step} > --steps {args.steps}.")

  def steps_released():
    return budget.steps_taken(state.opt_state) if budget else start_step + steps_done

  def epsilon_now():
    return budget.epsilon_spent(state.opt_state) if budget else float("inf")

  batches = sampler.batches(args.seed, steps=args.steps, start_step=start_step,
                            accumulation_steps=k)
  start = time.time()
  train_losses, train_accs = [], []
  test_loss = test_acc = float("nan")
  steps_done = 0
  last_step = args.steps if args.stop_at is None else min(args.steps, args.stop_at)
  for step in range(start_step + 1, last_step + 1):
    for _ in range(k):
      batch = next(batches)
      if mesh is None:
        images, labels = optax_dp.gather_batch((train_images, train_labels), batch)
        mask = batch.mask
      else:  # each device's rows, loaded where they are used
        batch = optax_dp.pad_batch_for_devices(batch, num_devices)
        (images, labels), mask = optax_dp.gather_sharded_batch(
            (train_images, train_labels), batch,
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
      state, loss, acc = train_step(state, images, labels, mask)
      train_losses.append(loss)
      train_accs.append(acc)
    steps_done += 1
    if step % args.eval_every == 0 or step == last_step:
      test_loss, test_acc = evaluate(loss_fn, state.params, data["test_images"],
                                     data["test_labels"])
      print(f"step {step:5d}  train loss {float(np.mean(train_losses)):.4f} "
            f"acc {float(np.mean(train_accs)):.4f}  test loss {test_loss:.4f} "
            f"acc {test_acc:.4f}  epsilon {epsilon_now():.4f}  "
            f"{time.time() - start:.0f} s", flush=True)
      train_losses, train_accs = [], []
      if args.checkpoint_dir:
        save_checkpoint(args.checkpoint_dir, state, step, settings)

  seconds = time.time() - start
  released = steps_released()
  if budget is not None:
    if released != last_step:  # the ledger and the loop must agree
      raise RuntimeError(f"optimizer released {released} noisy updates, loop ran to "
                         f"{last_step}")
    epsilon = budget.epsilon_spent(state.opt_state)
    over = " (PAST the budget: --allow-budget-overrun)" if released > budget.max_steps else ""
    print(f"Done: {released} steps ({steps_done} in {seconds:.0f} s). Test accuracy "
          f"{test_acc:.4f}. Privacy: ({epsilon:.4f}, {args.delta})-DP{over} for the "
          f"{dataset_size} training examples ({sampler.name} sampling, "
          f"{budget.accountant} accountant, noise multiplier "
          f"{budget.noise_multiplier}, clip {args.l2_norm_clip}).")
    print(budget.statement(released))
  else:
    epsilon = float("inf")
    print(f"Done: {released} steps in {seconds:.0f} s. Test accuracy {test_acc:.4f}. "
          "NOT private (--no-dp).")

  if args.json_out:
    result = {
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "epsilon": epsilon if np.isfinite(epsilon) else None,
        "delta": args.delta,
        "noise_multiplier": budget.noise_multiplier if budget else None,
        "steps": released,
        "steps_this_run": steps_done,
        "resumed_from_step": start_step if args.resume else None,
        "budget_steps": budget.max_steps if budget else None,
        "batch_size": args.batch_size,
        "accumulation_steps": k,
        "devices": num_devices,
        "seconds": seconds,
        "l2_norm_clip": args.l2_norm_clip,
        "sampler": sampler.name,
        "neighboring_relation": sampler.neighboring_relation if budget else None,
        "accountant": budget.accountant if budget else None,
        "clipping": None if args.no_dp else args.clipping,
        "private": not args.no_dp,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
