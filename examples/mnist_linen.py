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
      --checkpoint-dir DIR and --resume DIR, --devices N (data-parallel),
      --coordinator HOST:PORT --num-processes N --process-id I (several processes,
      each feeding its own devices; docs/multi_device.md),
      --json-out PATH (the run's record and history), --plot PATH, --quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys

from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_dp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli_common  # pylint: disable=g-import-not-at-top,wrong-import-position
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
                            mesh=None, adaptive=False):
  """A jitted train step; only the gradient function is DP-specific.

  With a `mesh` (several devices), the batch is split over its "data" axis:
  each device clips its own examples and only the clipped sum crosses devices
  (`optax_dp.sharded_value_and_clipped_grads` / `sharded_per_example_grads`);
  the noise is then drawn once, as on one device. With gradient accumulation
  the devices keep their own clipped sums (`reduce=False`) and
  `dp_accumulate(..., mesh=accumulation_mesh(...))` all-reduces them once per
  logical batch.

  `clipping="per-example"` materialises per-example gradients and lets
  `dp_aggregate` clip them; the other values use `optax_dp.clipped_grads`
  (book-keeping for the Flax layers with "auto"/"ghost"), which hands
  `dp_aggregate` the clipped sum directly: same numbers, far less work. With
  gradient accumulation, `dp_accumulate` takes clipped sums, so per-example
  gradients are clipped with `optax_dp.clip_and_sum` first.
  """
  clip = l2_norm_clip
  if clipping == "per-example":
    per_example = (optax_dp.value_and_per_example_grads(loss_fn, has_aux=True)
                   if mesh is None else
                   optax_dp.sharded_per_example_grads(loss_fn, mesh=mesh, has_aux=True))

    def grad_fn(params, batch, mask, *, l2_norm_clip=None):   # as the builders below
      values, grads = per_example(params, batch, mask)
      if accumulation_steps > 1:
        grads = optax_dp.clip_and_sum(grads, clip, current_l2_norm_clip=l2_norm_clip)
      return values, grads
  elif mesh is None:
    grad_fn = optax_dp.value_and_clipped_grads(loss_fn, l2_norm_clip, method=clipping,
                                               has_aux=True)
  else:   # with accumulation: each device's own sums, all-reduced once per logical batch
    grad_fn = optax_dp.sharded_value_and_clipped_grads(
        loss_fn, l2_norm_clip, mesh=mesh, method=clipping, has_aux=True,
        reduce=accumulation_steps == 1)

  @jax.jit
  def train_step(state, images, labels, mask):
    current = {}
    if adaptive and (clipping != "per-example" or accumulation_steps > 1):
      current = {"l2_norm_clip": optax_dp.l2_norm_clip_of(state.opt_state)}
    (losses, accuracies), grads = grad_fn(state.params, (images, labels), mask, **current)
    state = state.apply_gradients(grads=grads)
    real = jnp.maximum(jnp.sum(mask), 1)
    return state, jnp.sum(losses) / real, jnp.sum(accuracies * mask) / real

  return train_step


def accumulation_mesh(mesh, clipping):
  """The `mesh=` of `dp_accumulate`: the devices' mesh where each device
  accumulates its own clipped sums (the clipped-sum paths on several
  devices), None where the sums it gets are global."""
  return None if clipping == "per-example" else mesh


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
                "no_dp", "sampler", "accumulation_steps", "noise_multiplier",
                "noise", "bands", "clipping_strategy", "target_quantile",
                "clip_learning_rate")


def build_parser():
  """The example's flags (argparse)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  _cli_common.add_training_flags(
      p, steps_help="noisy (logical) steps to run in total, resumed ones included")
  p.add_argument("--accumulation-steps", type=int, default=1,
                 help="split each logical batch into K physical batches; noise "
                      "is added once per logical batch (optax_dp.dp_accumulate)")
  _cli_common.add_budget_flags(p)
  p.add_argument("--devices", type=int, default=None,
                 help="data-parallel over this many devices (default: all visible); "
                      "each device clips its share of the batch, one all-reduce "
                      "of the clipped sum per step, noise drawn once")
  p.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                 help="with --num-processes N > 1: the address of process 0, "
                      "where jax.distributed.initialize meets the others; every "
                      "process runs the same command with its own --process-id")
  p.add_argument("--num-processes", type=int, default=1,
                 help="processes of a multi-process run (default: %(default)s); the "
                      "mesh spans all their devices, each loads its devices' rows")
  p.add_argument("--process-id", type=int, default=0,
                 help="this process's number, 0 to --num-processes - 1; only "
                      "process 0 prints progress and writes --json-out / --plot")
  p.add_argument("--checkpoint-dir", default=None,
                 help="save the training state (orbax) and the run's settings "
                      "here at every evaluation")
  p.add_argument("--resume", metavar="DIR", default=None,
                 help="resume from the latest checkpoint in DIR (made with "
                      "--checkpoint-dir); the run's settings come from DIR, and "
                      "new checkpoints go to DIR unless --checkpoint-dir says otherwise")
  p.add_argument("--stop-at", metavar="N", type=int, default=None,
                 help="stop after step N, as if preempted (to try --resume with "
                      "--checkpoint-dir); the noise is still calibrated for --steps")
  _cli_common.add_output_flags(p)
  return p


def parse_args(argv=None):
  p = build_parser()
  args = p.parse_args(argv)
  _cli_common.require_positive(
      p, args, ("steps", "batch_size", "eval_every", "accumulation_steps", "num_processes"))
  if args.num_processes > 1:
    _check_multi_process_flags(p, args)
  if args.resume:
    _apply_saved_settings(p, args)
  return args


def _check_multi_process_flags(parser, args):
  """Refuses a multi-process run without a coordinator or a valid process id,
  or with checkpoints (not supported there by this example)."""
  if not args.coordinator:
    parser.error("--num-processes > 1 needs --coordinator HOST:PORT (process 0's address)")
  if not 0 <= args.process_id < args.num_processes:
    parser.error(f"--process-id {args.process_id} is not in 0..{args.num_processes - 1}")
  if args.checkpoint_dir or args.resume:
    parser.error("--checkpoint-dir / --resume are single-process only in this example "
                 "(a multi-process orbax checkpoint needs a directory all processes share)")


def join_processes(args):
  """Joins the multi-process run (`jax.distributed.initialize`): afterwards
  `jax.devices()` lists every process's devices. Processes other than 0 run
  quietly and write no record, so one process speaks for the run."""
  jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                             process_id=args.process_id)
  if args.process_id:
    args.quiet, args.json_out, args.plot = True, None, None


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
    was = saved.get(name, default)   # (runs saved before a setting existed: its default)
    if given != default and given != was:
      parser.error(
          f"--{name.replace('_', '-')} {given} conflicts with the resumed run's "
          f"{was!r}: a run's sampler, noise, clipping and data order cannot "
          "change midway without breaking its privacy accounting.")
    setattr(args, name, was)
  args.budget_steps = saved["budget_steps"]
  args.max_batch_size = saved["max_batch_size"]
  if args.checkpoint_dir is None:
    args.checkpoint_dir = args.resume


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


def restore_checkpoint(directory, state_like, mesh=None):
  """The latest checkpoint of `directory`, restored like `state_like`. With a
  `mesh` (several devices), arrays placed on it keep their placement (e.g.
  dp_accumulate's per-device sums) and the others are replicated over it, as
  a data-parallel step takes them."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  step = latest_checkpoint(directory)
  if step is None:
    raise SystemExit(f"--resume {directory}: no checkpoint (step_*) in it.")

  def like(x):
    struct = ocp.utils.to_shape_dtype_struct(x)
    sharding = getattr(struct, "sharding", None)
    if mesh is None or not isinstance(struct, jax.ShapeDtypeStruct) or (
        isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh):
      return struct   # (a Python scalar is restored as it is)
    return jax.ShapeDtypeStruct(struct.shape, struct.dtype, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))

  abstract = jax.tree.map(like, state_like)
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(directory), f"step_{step}"), abstract)
  return restored, step


# Flags a resumed run does not take from its checkpoint directory, passed on
# by the resume command printed after --stop-at when they are not the defaults.
RESUME_FLAGS = ("eval_every", "clipping", "devices", "data", "data_dir")


def stopped_early(args, last_step):
  """What a run stopped by --stop-at says last: where, and how to go on."""
  said = f"Stopped early at step {last_step} of --steps {args.steps} (--stop-at {args.stop_at})."
  if not args.checkpoint_dir:
    return (f"{said} Not resumable: no checkpoint was saved; a resumable run needs "
            "--checkpoint-dir DIR.")
  parser = build_parser()
  words = ["python", _cli_common.short_path(os.path.abspath(__file__)),
           "--resume", args.checkpoint_dir, "--steps", str(args.steps)]
  for name in RESUME_FLAGS:
    if getattr(args, name) != parser.get_default(name):
      words += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
  if args.allow_budget_overrun:
    words.append("--allow-budget-overrun")
  return f"{said} To resume from {args.checkpoint_dir}:\n  {shlex.join(words)}"


def main(argv=None):
  args = parse_args(argv)
  if args.num_processes > 1:
    join_processes(args)
  data = _cli_common.load_data(args)
  train_images, train_labels = data["train_images"], data["train_labels"]
  dataset_size = len(train_images)
  k = args.accumulation_steps
  available = len(jax.devices())
  num_devices = args.devices or available
  if not 1 <= num_devices <= available:
    _cli_common.fail(f"--devices {args.devices}: {available} device(s) visible (on CPU, "
                     "set XLA_FLAGS=--xla_force_host_platform_device_count=N to "
                     "simulate N).")
  if args.num_processes > 1 and num_devices != available:
    _cli_common.fail(f"--devices {num_devices}: a multi-process run uses all {available} "
                     f"devices of its {args.num_processes} processes.")
  mesh = (jax.sharding.Mesh(np.array(jax.devices()[:num_devices]), ("data",))
          if num_devices > 1 else None)

  root = jax.random.key(args.seed)
  init_key, noise_key = jax.random.split(root)
  model = CNN()
  _cli_common.say(args, "Building the CNN ...")
  params = model.init(init_key, jnp.zeros((1, 28, 28, 1), jnp.float32))["params"]
  loss_fn = make_loss_fn(model)

  sgd = optax.sgd(args.learning_rate, momentum=args.momentum)
  budget_steps = getattr(args, "budget_steps", None) or args.steps
  sampler, budget = _cli_common.plan_privacy(args, dataset_size, budget_steps)
  if budget is None:
    tx = optax.MultiSteps(sgd, k) if k > 1 else sgd
    train_step = make_nonprivate_train_step(loss_fn)
  else:
    budget_steps = budget.max_steps
    clip = _cli_common.clip_norm(args, params)
    tx = _cli_common.make_private_tx(args, budget, noise_key, sgd, clip)
    if k > 1:
      tx = optax_dp.dp_accumulate(tx, k, mesh=accumulation_mesh(mesh, args.clipping))
    train_step = make_private_train_step(loss_fn, clip, args.clipping, k, mesh,
                                         adaptive=args.clipping_strategy == "adaptive")

  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  settings = {name: getattr(args, name) for name in RUN_SETTINGS}
  settings.update(budget_steps=budget_steps, dataset_size=dataset_size,
                  max_batch_size=getattr(sampler, "max_batch_size", None))

  start_step = 0
  if args.resume:
    state, start_step = restore_checkpoint(args.resume, state, mesh)
    print(f"Resumed from {args.resume} at step {start_step}.")
    if start_step > args.steps:
      _cli_common.fail(f"the checkpoint is at step {start_step} > --steps {args.steps}.")

  def steps_released():
    return budget.steps_taken(state.opt_state) if budget else start_step + steps_done

  def epsilon_now():
    return budget.epsilon_spent(state.opt_state) if budget else float("inf")

  batches = sampler.batches(args.seed, steps=args.steps, start_step=start_step,
                            accumulation_steps=k)
  train_losses, train_accs = [], []
  test_loss = test_acc = float("nan")
  steps_done = 0
  last_step = args.steps if args.stop_at is None else min(args.steps, args.stop_at)
  progress = _cli_common.Progress(args, total=last_step, eval_size=len(data["test_images"]),
                                  shapes=_cli_common.batch_shapes(sampler, args.steps, k))
  for step in range(start_step + 1, last_step + 1):
    for _ in range(k):
      batch = next(batches)
      progress.batch(len(batch.indices))   # announces a new shape's compile
      if mesh is None:
        images, labels = optax_dp.gather_batch((train_images, train_labels), batch).data
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
    progress.step(step, loss)
    if step % args.eval_every == 0 or step == last_step:
      progress.evaluating()
      # On this process's first device: the parameters are replicated.
      test_loss, test_acc = evaluate(loss_fn, jax.device_get(state.params),
                                     data["test_images"], data["test_labels"])
      progress.evaluated(step, train_loss=np.mean(train_losses),
                         train_accuracy=np.mean(train_accs), eval_loss=test_loss,
                         eval_accuracy=test_acc, epsilon=epsilon_now())
      train_losses, train_accs = [], []
      if args.checkpoint_dir:
        save_checkpoint(args.checkpoint_dir, state, step, settings)
  progress.close()

  seconds = progress.seconds()
  released = steps_released()
  epsilon = _cli_common.report(
      args, budget, sampler, opt_state=state.opt_state, expected_steps=last_step,
      released=released, steps_done=steps_done, seconds=seconds, test_acc=test_acc,
      dataset_size=dataset_size)
  _cli_common.write_outputs(args, _cli_common.make_record(
      args, budget, sampler, epsilon=epsilon, test_accuracy=test_acc,
      test_loss=test_loss, steps=released, steps_this_run=steps_done, seconds=seconds,
      history=progress.history, resumed_from_step=start_step if args.resume else None,
      accumulation_steps=k, devices=num_devices,
      final_l2_norm_clip=_cli_common.final_clip(args, state.opt_state)))
  if last_step < args.steps:
    print(stopped_early(args, last_step), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
