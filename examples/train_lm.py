"""Private character-level language models on Shakespeare, in one command.

Run:  python examples/train.py --recipe shakespeare-eps8 [--seed 1] [--json-out r.json]
      (train.py hands the shakespeare-* recipes to this script; `python
      examples/train_lm.py --recipe ...` is the same)

A recipe (`recipes.LM_RECIPES`) fixes the model (a causal character
transformer in Flax NNX or Linen, or a character LSTM; `lm_models.py`), the
window length, batch size, steps, Adam's learning rate, the clip and the target
epsilon; every flag overrides it. The data is `shakespeare_data.py`'s corpus:
one example is one window of `--length + 1` characters of one speaking role's
dialogue, from the private plays (`train`); evaluation is on the held-out
`test` plays, or with `--validation` on the `validation` plays (tune there).
Batches are Poisson samples of the windows, gathered from a memory-mapped
token array (`--cache-dir`), padded to a few fixed sizes with a mask.

`--finetune lora` (the shakespeare-lora-eps1 recipe): the model is first
trained without privacy on the `public` plays (`--pretrain-steps`; the result
is cached in `--cache-dir` and reused), then its MLP and head Linears get
`nnx.LoRA` adapters and only those are trained, privately, on the private
plays (`wrt=nnx.LoRAParam`: the base weights do not move). `--finetune full`
fine-tunes every parameter of the pretrained model privately instead.

The privacy statement (`_cli_common.report`) is example-level; the run adds
what it means for a speaker: a role with m windows is protected as a group
of m examples, whose guarantee the run prints (group privacy).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import warnings

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_dp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli_common  # pylint: disable=wrong-import-position
import lm_models  # pylint: disable=wrong-import-position
import shakespeare_data  # pylint: disable=wrong-import-position
from recipes import LM_RECIPES  # pylint: disable=wrong-import-position

CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")
MODELS = ("transformer", "transformer_linen", "lstm")


def build_parser(recipe=None):
  """The script's flags, with `recipe`'s settings as their defaults."""
  recipe = recipe or LM_RECIPES["shakespeare-eps8"]
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--recipe", default="shakespeare-eps8",
                 help="the recipe (recipes.LM_RECIPES); the flags below override it")
  _cli_common.add_training_flags(p, steps_help="noisy steps")
  _cli_common.add_budget_flags(p)
  _cli_common.add_output_flags(p)
  p.add_argument("--model", choices=MODELS, help="the model (lm_models.py)")
  p.add_argument("--length", type=int, help="characters the model reads per window")
  p.add_argument("--features", type=int, help="the model's width")
  p.add_argument("--layers", type=int, help="transformer blocks")
  p.add_argument("--heads", type=int, help="attention heads")
  p.add_argument("--finetune", choices=("none", "lora", "full"),
                 help="train from scratch (none), or pretrain on the public plays "
                      "without privacy and fine-tune privately: LoRA adapters only "
                      "(lora) or every parameter (full)")
  p.add_argument("--lora-rank", type=int, help="--finetune lora: the adapters' rank")
  p.add_argument("--pretrain-steps", type=int, help="non-private steps on the public plays")
  p.add_argument("--pretrain-batch-size", type=int)
  p.add_argument("--pretrain-learning-rate", type=float)
  p.add_argument("--privacy-unit", choices=("example", "user"),
                 help="what the guarantee protects: one window (example), or one "
                      "speaking role with all its windows (user: roles are sampled, "
                      "and --batch-size is the expected number of roles per step)")
  p.add_argument("--max-windows-per-role", type=int,
                 help="--privacy-unit user: at most this many of a sampled role's "
                      "windows per step (bounds compute, not privacy)")
  p.add_argument("--role-fraction", type=float, default=1.0,
                 help="train on this fraction of the private roles (all their windows), "
                      "chosen uniformly at random with a fixed public seed: how accuracy "
                      "grows with the number of users (default: %(default)s, all)")
  p.add_argument("--clip-only", action="store_true",
                 help="an ablation, NOT private: clip each window's gradient as a private "
                      "run does but add no noise (what clipping alone costs)")
  p.add_argument("--public-only", action="store_true",
                 help="--finetune lora|full: evaluate the publicly pretrained model as it "
                      "is, without the private plays (no training, no privacy cost): what "
                      "the private fine-tune adds is measured against it")
  p.add_argument("--mesh", default=None,
                 help="parameters split over devices, e.g. data=2,fsdp=4 (FSDP) or "
                      "data=4,model=2 (tensor parallel): a mesh of Auto axes over all "
                      "devices, plain jax.jit with these shardings (docs/multi_device.md)")
  p.add_argument("--validation", action="store_true",
                 help="evaluate on the validation plays instead of the test plays")
  p.add_argument("--eval-windows", type=int, default=2048,
                 help="windows of the evaluation split scored at each evaluation but "
                      "the last, which scores them all (default: %(default)s)")
  p.add_argument("--subset", type=int, default=None,
                 help="train on the first N private windows and evaluate on the first N "
                      "(quick tries and tests; the accounting uses N)")
  p.add_argument("--cache-dir", default=CACHE_DIR,
                 help="memory-mapped token arrays and pretrained models (default: "
                      "examples/.cache)")
  p.set_defaults(**recipe, data_dir=None, eval_every=None)
  return p


def parse_args(argv=None):
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--recipe", default="shakespeare-eps8")
  known, _ = pre.parse_known_args(argv)
  if known.recipe not in LM_RECIPES:
    _cli_common.fail(f"--recipe {known.recipe!r}: choose from {sorted(LM_RECIPES)}")
  p = build_parser(LM_RECIPES[known.recipe])
  args = p.parse_args(argv)
  if args.eval_every is None:
    args.eval_every = max(1, args.steps // 10)
  _cli_common.require_positive(p, args, ("steps", "batch_size", "eval_every", "length",
                                         "features", "eval_windows"))
  if args.model == "lstm" and args.finetune != "none":
    p.error("--finetune needs a transformer model (--model transformer)")
  if args.model == "transformer_linen" and args.finetune != "none":
    p.error("--finetune is the NNX transformer's (nnx.LoRA): --model transformer")
  if args.public_only and args.finetune == "none":
    p.error("--public-only evaluates the publicly pretrained model: it needs --finetune "
            "lora or full (a fine-tune recipe)")
  if args.clip_only and (args.no_dp or args.privacy_unit == "user"):
    p.error("--clip-only is the example-level private run without its noise: leave out "
            "--no-dp and --privacy-unit user")
  if args.clipping_strategy != "flat" or args.noise != "gaussian" or args.sampler != "poisson":
    p.error("the language-model recipes run flat clipping, Gaussian noise and Poisson "
            "sampling (--clipping-strategy flat --noise gaussian --sampler poisson)")
  if args.mesh:
    try:
      args.mesh = lm_models.make_mesh(args.mesh)
    except ValueError as e:
      p.error(str(e))
  return args


def token_windows(args, split, limit=None):
  """(tokens (N, length + 1) uint8, role ids (N,)) of a split, memory-mapped
  from `--cache-dir` (written once from the corpus; keyed by its checksum)."""
  with open(shakespeare_data.CORPUS, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()[:12]
  stem = os.path.join(args.cache_dir, f"shakespeare_{digest}_{split}_{args.length}")
  if not os.path.exists(stem + "_roles.npy"):
    os.makedirs(args.cache_dir, exist_ok=True)
    tokens, roles = shakespeare_data.windows(shakespeare_data.load(), split, args.length)
    np.save(stem + "_tokens.npy", tokens)
    np.save(stem + "_roles.npy", roles)
  tokens = np.load(stem + "_tokens.npy", mmap_mode="r")
  roles = np.load(stem + "_roles.npy")
  if limit is not None:
    tokens, roles = tokens[:limit], roles[:limit]
  return tokens, roles


def make_model(args, vocab_size, seed):
  """(the model, `per_window(model_or_params, windows) -> (losses, accuracies)`
  (B,) each: a window's mean next-character loss and accuracy, the Linen
  params or None)."""
  config = lm_models.LMConfig(vocab_size=vocab_size, length=args.length,
                              features=args.features, heads=args.heads, layers=args.layers)

  def per_window(logits, window):
    targets = window[:, 1:].astype(jnp.int32)
    return (optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(-1),
            jnp.mean(jnp.argmax(logits, -1) == targets, axis=-1))

  if args.model == "transformer_linen":
    model = lm_models.LinenCharTransformer(config)
    params = model.init(jax.random.key(seed), jnp.zeros((1, args.length), jnp.int32))["params"]

    def linen_per_window(params, window):
      return per_window(model.apply({"params": params}, window[:, :-1].astype(jnp.int32)),
                        window)
    return model, linen_per_window, params
  rngs = nnx.Rngs(seed)
  model = (lm_models.CharTransformer(config, rngs=rngs) if args.model == "transformer"
           else lm_models.CharLSTM(vocab_size, features=args.features, rngs=rngs))

  def nnx_per_window(model, window):
    return per_window(model(window[:, :-1].astype(jnp.int32)), window)
  return model, nnx_per_window, None


def mean_loss(per_window):
  """The (loss, accuracy) of a batch, means over its windows (the loss the
  gradient builders take: on a batch of one, one window's)."""
  return lambda m, window: tuple(jnp.mean(x) for x in per_window(m, window))


def pretrained(args, vocab_size, say):
  """The NNX transformer trained without privacy on the public plays for
  --pretrain-steps (Adam, uniform batches), from `--cache-dir` if this
  configuration was trained before (no privacy: public data only)."""
  model, per_window, _ = make_model(args, vocab_size, seed=10_000 + args.seed)
  loss = mean_loss(per_window)
  key = json.dumps([args.length, args.features, args.layers, args.heads, args.seed,
                    args.pretrain_steps, args.pretrain_batch_size,
                    args.pretrain_learning_rate], separators=(",", ":"))
  path = os.path.join(args.cache_dir,
                      f"pretrained_{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz")
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(nnx.as_pure(state))
  if os.path.exists(path):
    say(f"Loading the model pretrained on the public plays from {path} ...")
    with np.load(path) as saved:
      nnx.update(model, jax.tree.unflatten(treedef, [saved[str(i)] for i in range(len(leaves))]))
    return model
  tokens, _ = token_windows(args, "public")
  say(f"Pretraining on the public plays without privacy: {args.pretrain_steps} steps of "
      f"{args.pretrain_batch_size} of their {len(tokens)} windows ...")
  optimizer = nnx.Optimizer(model, optax.adam(args.pretrain_learning_rate), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, window):
    (value, _), grads = nnx.value_and_grad(loss, has_aux=True)(model, window)
    optimizer.update(model, grads)
    return value

  rng = np.random.default_rng(args.seed)
  for s in range(args.pretrain_steps):
    value = step(model, optimizer, jnp.asarray(tokens[np.sort(rng.choice(
        len(tokens), args.pretrain_batch_size, replace=False))]))
    if (s + 1) % max(1, args.pretrain_steps // 5) == 0:
      say(f"pretraining step {s + 1}/{args.pretrain_steps}  loss {float(value):.4f}")
  os.makedirs(args.cache_dir, exist_ok=True)
  flat = jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.Param)))
  np.savez(path, **{str(i): np.asarray(x) for i, x in enumerate(flat)})
  return model


def keep_roles(tokens, roles, fraction):
  """The windows of a `fraction` of the roles, chosen uniformly at random by a
  fixed seed (a public choice, made before and apart from any training)."""
  if not 0 < fraction <= 1:
    _cli_common.fail(f"--role-fraction must be in (0, 1], got {fraction}")
  present = np.unique(roles)
  kept = np.random.default_rng(20261206).choice(
      present, size=max(1, round(fraction * len(present))), replace=False)
  rows = np.isin(roles, kept)
  return np.asarray(tokens[rows]), roles[rows]


def say_group_privacy(budget, steps, roles):
  """Prints what the example-level guarantee gives a speaker with m windows
  (`optax_dp.group_privacy`: the group lemma at the best example-level delta)."""
  counts = np.bincount(roles)
  counts = counts[counts > 0]
  print(f"An example is one window of one speaking role's dialogue; the {len(counts)} "
        f"roles of the private plays have {int(np.median(counts))} windows (median) to "
        f"{int(counts.max())} (most). A speaker with m windows is protected as a group of "
        f"m examples (group privacy, at delta {budget.target_delta:g}):")
  for label, m in (("one window", 1), ("two windows", 2),
                   ("the median role", int(np.median(counts))),
                   ("the largest role", int(counts.max()))):
    group = optax_dp.group_privacy(budget.noise_multiplier, budget.target_delta, m,
                                   steps=steps, sampler=budget.sampler,
                                   accountant=budget.accountant)
    bound = ("no guarantee (vacuous): no protection for that speaker"
             if math.isinf(group.epsilon) else
             f"({_cli_common.format_epsilon(group.epsilon)}, {budget.target_delta:g})-DP")
    print(f"  {label} (m = {m}): {bound}")
  print("Protecting speakers needs the speaker as the privacy unit (user-level DP: "
        "--privacy-unit user), not this example-level guarantee.")


def evaluate_tokens(eval_model, model, tokens, chunk=256):
  """(mean loss in nats, next-character accuracy) of `model` over `tokens`."""
  total_loss = total_acc = 0.0
  for s in range(0, len(tokens), chunk):
    window = jnp.asarray(tokens[s:s + chunk])
    l, a = eval_model(model, window)
    total_loss, total_acc = total_loss + float(l) * len(window), total_acc + float(a) * len(
        window)
  return total_loss / len(tokens), total_acc / len(tokens)


def evaluate_public_only(args, model, per_window, eval_tokens, where):
  """--public-only: the publicly pretrained model, scored as it is (the
  private plays are not read: nothing to account)."""
  loss, accuracy = evaluate_tokens(nnx.jit(mean_loss(per_window)), model, eval_tokens)
  print(f"The publicly pretrained model, not trained on the private plays (no privacy "
        f"cost): held-out ({where} plays) {loss / math.log(2):.4f} bits per character, "
        f"next-character accuracy {accuracy:.4f}.")
  if args.json_out:
    record = {"test_accuracy": accuracy, "test_loss": loss, "epsilon": None,
              "delta": args.delta, "steps": 0, "seconds": 0.0, "private": False,
              "public_only": True, "recipe": args.recipe, "dataset": "shakespeare",
              "model": args.model, "evaluated_on": where, "history": []}
    _cli_common.write_outputs(args, {k: record[k] for k in _cli_common.JSON_KEYS
                                     if k in record})
  return 0


def main(argv=None):
  args = parse_args(argv)
  say = lambda message: _cli_common.say(args, message)   # noqa: E731
  corpus_vocab = shakespeare_data.load()["vocabulary"]
  say(f"Loading the Shakespeare windows ({args.length + 1} characters) ...")
  tokens, roles = token_windows(args, "train", args.subset)
  if args.role_fraction != 1.0:
    tokens, roles = keep_roles(tokens, roles, args.role_fraction)
  where = "validation" if args.validation else "test"
  eval_tokens, _ = token_windows(args, where, args.subset)
  dataset_size = len(tokens)
  if args.batch_size > dataset_size:
    _cli_common.fail(f"--batch-size {args.batch_size} > {dataset_size} private windows")

  init_key, noise_key = jax.random.split(jax.random.key(args.seed))
  wrt = nnx.Param
  if args.finetune == "none":
    say(f"Building the model ({args.model}) ...")
    model, per_window, params = make_model(args, len(corpus_vocab), int(jax.random.randint(
        init_key, (), 0, 2 ** 30)))
  else:
    model = pretrained(args, len(corpus_vocab), say)
    _, per_window, params = make_model(args, len(corpus_vocab), 0)
    if args.finetune == "lora":
      lm_models.add_lora(model, args.lora_rank, rngs=nnx.Rngs(args.seed))
      wrt = nnx.LoRAParam
  if args.public_only:
    return evaluate_public_only(args, model, per_window, eval_tokens, where)
  mesh = args.mesh   # a jax.sharding.Mesh (parse_args), or None
  if mesh is not None:
    if params is not None and args.model == "transformer_linen":
      params = lm_models.shard_params(params, mesh)
    else:
      nnx.update(model, lm_models.shard_params(nnx.state(model), mesh))
    rows = jax.sharding.NamedSharding(mesh, lm_models.batch_spec(mesh))
    row_devices = math.prod(mesh.shape[a] for a in jax.tree.leaves(tuple(rows.spec)))
  user_level = args.privacy_unit == "user" and not args.no_dp
  adam = optax.adam(args.learning_rate)
  if args.clip_only:   # the ablation: dp_aggregate's clip and mean, no noise, no budget
    sampler, budget = _cli_common.make_sampler(args, dataset_size, args.steps), None
    print("Clipping WITHOUT noise (--clip-only): NOT private, an ablation.")
    with warnings.catch_warnings():   # its "adds NO noise" warning: said just above
      warnings.simplefilter("ignore", UserWarning)
      tx = optax.chain(optax_dp.dp_aggregate(
          args.l2_norm_clip, 0.0, noise_key, expected_batch_size=args.batch_size,
          rescale_to_unit_norm=args.rescale_to_unit_norm), adam)
  else:
    sampler, budget = _cli_common.plan_privacy(
        args, dataset_size, args.steps, sampler=optax_dp.UserPoissonSampler(
            roles, args.batch_size, args.max_windows_per_role) if user_level else None)
    tx = adam if budget is None else _cli_common.make_private_tx(args, budget, noise_key, adam)

  def masked_mean(values, mask):
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1)

  if args.model == "transformer_linen":
    from flax.training import train_state  # pylint: disable=import-outside-toplevel
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    grad_fn = _grad_fn(args, per_window, {})

    @jax.jit
    def train_step(state, window, mask):
      (losses, accs), grads = grad_fn(state.params, window, mask)
      return state.apply_gradients(grads=grads), masked_mean(losses, mask), masked_mean(
          accs, mask)

    def step(window, mask):
      nonlocal state
      state, l, a = train_step(state, window, mask)
      return l, a
    evaluated = lambda: state.params              # noqa: E731
    opt_state = lambda: state.opt_state           # noqa: E731
    eval_model = jax.jit(mean_loss(per_window))
  else:
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    grad_fn = _grad_fn(args, per_window, {"wrt": wrt})

    @nnx.jit
    def nnx_step(model, optimizer, window, mask):
      (losses, accs), grads = grad_fn(model, window, mask)
      optimizer.update(model, grads)
      return masked_mean(losses, mask), masked_mean(accs, mask)

    step = lambda window, mask: nnx_step(model, optimizer, window, mask)   # noqa: E731
    evaluated = lambda: model                     # noqa: E731
    opt_state = lambda: optimizer.opt_state       # noqa: E731
    eval_model = nnx.jit(mean_loss(per_window))

  def evaluate(limit=None):
    """(mean loss in nats, next-character accuracy) over the evaluation windows."""
    return evaluate_tokens(eval_model, evaluated(),
                           eval_tokens if limit is None else eval_tokens[:limit])

  trained = sum(x.size for x in jax.tree.leaves(
      params if params is not None else nnx.state(model, wrt)))
  unit = (f"roles (at most {args.max_windows_per_role} windows each) of the "
          f"{sampler.dataset_size} roles holding" if user_level else "windows of")
  print(f"Recipe {args.recipe}: {args.model} ({trained} trained parameters"
        f"{', LoRA rank ' + str(args.lora_rank) if args.finetune == 'lora' else ''}), "
        f"{args.steps} steps of expected batch {args.batch_size} {unit} "
        f"{args.length + 1}-character windows from {dataset_size} (the private plays), Adam lr "
        f"{args.learning_rate}, clip {args.l2_norm_clip}; evaluated on the {where} plays "
        f"({len(eval_tokens)} windows).", flush=True)
  progress = _cli_common.Progress(args, total=args.steps, evaluated_on=where,
                                  eval_size=len(eval_tokens),
                                  shapes=_cli_common.batch_shapes(sampler, args.steps))
  eval_loss = eval_acc = float("nan")
  train_losses, train_accs = [], []
  batches = sampler.batches(args.seed, steps=args.steps)
  for s in range(1, args.steps + 1):
    batch = next(batches)
    progress.batch(len(batch.indices))
    if mesh is None:
      window, mask = jnp.asarray(optax_dp.gather_batch(tokens, batch).data), batch.mask
    else:   # padded to a multiple of the devices that split the rows, then placed
      batch = optax_dp.pad_batch_for_devices(batch, row_devices)
      window, mask = jax.device_put((optax_dp.gather_batch(tokens, batch).data, batch.mask),
                                    rows)
    l, a = step(window, mask)
    train_losses.append(l)
    train_accs.append(a)
    progress.step(s, l)
    if s % args.eval_every == 0 or s == args.steps:
      progress.evaluating()
      eval_loss, eval_acc = evaluate(None if s == args.steps else args.eval_windows)
      progress.evaluated(
          s, train_loss=float(np.mean(train_losses)),
          train_accuracy=float(np.mean(train_accs)), eval_loss=eval_loss,
          eval_accuracy=eval_acc,
          epsilon=budget.epsilon_spent(opt_state()) if budget else float("inf"))
      train_losses, train_accs = [], []
  progress.close()
  seconds = progress.seconds()
  released = budget.steps_taken(opt_state()) if budget else args.steps
  epsilon = _cli_common.report(args, budget, sampler, opt_state=opt_state(),
                               expected_steps=args.steps, released=released,
                               steps_done=args.steps, seconds=seconds, test_acc=eval_acc,
                               dataset_size=sampler.dataset_size, evaluated_on=where)
  bits = eval_loss / math.log(2)
  print(f"Held-out ({where} plays): {bits:.4f} bits per character, next-character "
        f"accuracy {eval_acc:.4f}.")
  role_counts = np.bincount(roles)
  role_counts = role_counts[role_counts > 0]   # windows per private role
  if budget is not None and not user_level:
    say_group_privacy(budget, released, roles)
  _cli_common.write_outputs(args, _cli_common.make_record(
      args, budget, sampler, epsilon=epsilon, test_accuracy=eval_acc, test_loss=eval_loss,
      steps=args.steps, steps_this_run=args.steps, seconds=seconds,
      history=progress.history, recipe=args.recipe, dataset="shakespeare", model=args.model,
      evaluated_on=where, dataset_size=sampler.dataset_size, learning_rate=args.learning_rate,
      epochs=args.steps * args.batch_size / sampler.dataset_size,
      privacy_unit="user" if user_level else "example", num_examples=dataset_size,
      role_fraction=args.role_fraction, clip_only=args.clip_only,
      max_examples_per_user=args.max_windows_per_role if user_level else None,
      num_roles=len(role_counts), role_windows_median=int(np.median(role_counts)),
      role_windows_max=int(role_counts.max()),
      mesh=None if mesh is None else {name: int(size) for name, size in mesh.shape.items()}))
  return 0


def _grad_fn(args, per_window, options):
  """((per-window losses, accuracies), gradients) of a batch: clipped sums
  (book-keeping) for a private run, the masked mean's gradient otherwise."""
  if not args.no_dp:
    return optax_dp.value_and_clipped_grads(mean_loss(per_window), args.l2_norm_clip,
                                            method=args.clipping, has_aux=True, **options)
  wrt = options.get("wrt")

  def grad_fn(model, window, mask):
    def masked(m):
      per = per_window(m, window)
      return jnp.sum(per[0] * mask) / jnp.maximum(jnp.sum(mask), 1), per
    if wrt is None:
      (_, per), grads = jax.value_and_grad(masked, has_aux=True)(model)
    else:
      (_, per), grads = nnx.value_and_grad(masked, has_aux=True,
                                           argnums=nnx.DiffState(0, wrt))(model)
    return per, grads
  return grad_fn


if __name__ == "__main__":
  sys.exit(main())
