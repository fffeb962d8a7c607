"""What the MNIST examples share: flags, sampler, budget, report and JSON.

`mnist_linen.py` (Flax Linen) and `mnist_nnx.py` (Flax NNX) train the same
CNN with the same private mechanism; only the model code and the train step
differ. The parts that decide the privacy claim are defined once, here: the
flags that set the mechanism, the sampler and its budget (the noise multiplier
calibrated for the steps run, or the steps allowed by a given one), the
refusal of steps past the budget, the closing privacy statement and the JSON
record, so that both examples account for and report a run in the same words.
`train.py` (the recipes) uses them too, and all three show their progress the
same way (`Progress`: a tqdm bar on a terminal, plain lines elsewhere, the
run's history for the JSON record and `--plot`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import optax
import tqdm

import optax_dp

import mnist_data  # examples/ is on sys.path: the scripts next to this file import it


def add_training_flags(p, *, steps_help):
  """--steps ... --sampler: the run's length, batch, optimizer and clipping."""
  p.add_argument("--steps", type=int, default=5000, help=steps_help)
  p.add_argument("--batch-size", type=int, default=256,
                 help="the logical batch size: expected size for --sampler "
                      "poisson (q = batch_size / 60000), exact for fixed/shuffle")
  p.add_argument("--learning-rate", type=float, default=0.1,
                 help="SGD learning rate (default: %(default)s)")
  p.add_argument("--momentum", type=float, default=0.9,
                 help="SGD momentum (default: %(default)s)")
  p.add_argument("--l2-norm-clip", type=float, default=0.1,
                 help="clip each example's gradient to this L2 norm C (default: "
                      "%(default)s)")
  p.add_argument("--rescale-to-unit-norm", action=argparse.BooleanOptionalAction,
                 default=True,
                 help="divide clipped sums by the clip norm, as the jax_privacy "
                      "tutorial does (learning rate independent of the clip)")
  p.add_argument("--clipping", choices=("auto", "ghost", "vmap", "per-example"),
                 default="auto",
                 help="how per-example gradients are clipped: auto (fastest: "
                      "book-keeping for Flax layers), ghost, vmap, or per-example "
                      "(materialise them and let dp_aggregate clip)")
  p.add_argument("--clipping-strategy", choices=CLIPPING_STRATEGIES, default="flat",
                 help="flat (default: one norm --l2-norm-clip for the whole "
                      "gradient), per-layer (each layer clipped to "
                      "--l2-norm-clip / sqrt(layers): the same total sensitivity) "
                      "or adaptive (the norm starts at --l2-norm-clip and follows "
                      "--target-quantile of the per-example norms through a "
                      "privatised count, paid for within the same epsilon; "
                      "Andrew et al. 2021)")
  p.add_argument("--target-quantile", type=float, default=0.5,
                 help="--clipping-strategy adaptive: the fraction of examples left "
                      "unclipped (default: %(default)s)")
  p.add_argument("--clip-learning-rate", type=float, default=0.2,
                 help="--clipping-strategy adaptive: the geometric step of the clip "
                      "norm's update (default: %(default)s)")
  p.add_argument("--sampler", choices=("poisson", "fixed", "shuffle"), default="poisson",
                 help="poisson (default; amplified accounting), fixed (fixed-size "
                      "batches drawn each step; RDP, replace-one) or shuffle (epoch "
                      "shuffling; no amplification: far more epsilon)")
  p.add_argument("--noise", choices=("gaussian", "bandmf"), default="gaussian",
                 help="gaussian (default: DP-SGD, fresh noise each step) or bandmf "
                      "(DP-BandMF: noise correlated across --bands steps, with "
                      "cyclic Poisson sampling over --bands groups; needs jax-privacy)")
  p.add_argument("--bands", type=int, default=1,
                 help="--noise bandmf: the strategy's bands (each example is "
                      "eligible every this many steps; default: %(default)s)")


def add_budget_flags(p):
  """--epsilon ... --seed: the privacy budget, the evaluation period, the seed."""
  p.add_argument("--epsilon", type=float, default=1.0,
                 help="the privacy budget's epsilon (default: %(default)s)")
  p.add_argument("--delta", type=float, default=1e-5,
                 help="the privacy budget's delta (default: %(default)s; keep it "
                      "well below 1 / dataset size)")
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
  p.add_argument("--eval-every", type=int, default=200,
                 help="evaluate (log a line, add an entry to the run's history) "
                      "every this many steps and after the last (default: 200; "
                      "train.py: a tenth of --steps)")
  p.add_argument("--seed", type=int, default=0,
                 help="seeds the initial parameters, the batches and the noise "
                      "(default: %(default)s)")


def add_output_flags(p):
  """--no-dp, the data, the JSON record, the plot and --quiet."""
  p.add_argument("--no-dp", action="store_true", help="train without privacy")
  p.add_argument("--data", choices=("idx", "tfds"), default="idx",
                 help="idx: the bundled IDX files (default); tfds: tensorflow-datasets")
  p.add_argument("--data-dir", default=mnist_data.DEFAULT_DATA_DIR,
                 help="the folder of the IDX files (--data idx; default: the "
                      "dataset's bundled files)")
  p.add_argument("--json-out", metavar="PATH", default=None,
                 help="write the run's record here (JSON: accuracy, epsilon, "
                      "settings, and its history: one entry per evaluation)")
  p.add_argument("--plot", metavar="PATH", default=None,
                 help="after the run, draw its accuracy and epsilon spent against "
                      "the step to PATH (a PNG; plot_results.plot_run)")
  p.add_argument("--quiet", action="store_true",
                 help="no progress bar, progress lines or phase messages; the "
                      "privacy statement still prints")


def say(args, message):
  """Prints `message` (what the run does next, or did), unless --quiet."""
  if not getattr(args, "quiet", False):
    print(message, flush=True)


def format_epsilon(epsilon):
  """Epsilon with 4 significant digits (1e-05, not 0.0000); inf: not private."""
  return "inf (not private)" if math.isinf(epsilon) else f"{epsilon:.4g}"


def short_path(path):
  """`path` relative to the working directory, unless that climbs out of it."""
  relative = os.path.relpath(path)
  return path if relative.startswith("..") else relative


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
  say(args, "Loading MNIST (tensorflow-datasets) ..." if args.data == "tfds"
      else f"Loading MNIST from {short_path(args.data_dir)} ...")
  data = (mnist_data.load_mnist_tfds() if args.data == "tfds"
          else mnist_data.load_mnist(args.data_dir))
  dataset_size = len(data["train_images"])
  if args.batch_size > dataset_size:
    raise SystemExit(f"--batch-size {args.batch_size} > dataset size {dataset_size}")
  return data


def make_sampler(args, dataset_size, budget_steps):
  """The run's sampler; Poisson gets a static maximum fixed by the budget.
  --noise bandmf: cyclic Poisson over --bands groups, which makes the budget
  (and dp_aggregate with it) account for and add DP-BandMF noise."""
  noise, bands = getattr(args, "noise", "gaussian"), getattr(args, "bands", 1)
  if noise == "gaussian" and bands != 1:
    fail(f"--bands {bands} needs --noise bandmf (DP-SGD's noise has no bands).")
  if noise == "bandmf" and args.sampler != "poisson":
    fail(f"--noise bandmf needs cyclic Poisson sampling: it is accounted only for "
         f"that (--sampler poisson, the default), not --sampler {args.sampler}.")
  if args.sampler == "poisson":
    max_batch_size = getattr(args, "max_batch_size", None) or (
        optax_dp.poisson_max_batch_size(dataset_size, args.batch_size, budget_steps))
    if noise == "bandmf":
      try:
        return optax_dp.CyclicPoissonSampler(dataset_size, args.batch_size, max_batch_size,
                                             pad_to_multiple_of=32, bands=bands)
      except ValueError as e:
        fail(f"--noise bandmf --bands {bands}: {e}")
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


def plan_privacy(args, dataset_size, budget_steps, sampler=None):
  """The sampler (`sampler`, else the flags') and the budget (None with
  --no-dp), said on stdout.

  Refuses (exit status 2) a budget that cannot be met, and --steps past the
  budget unless --allow-budget-overrun.
  """
  if args.no_dp:
    sampler = make_sampler(args, dataset_size, budget_steps)
    print("Training WITHOUT differential privacy (--no-dp).")
    return sampler, None
  t = time.time()
  sampler = sampler or make_sampler(args, dataset_size, budget_steps)
  if args.noise_multiplier is None:
    say(args, f"Calibrating the noise multiplier for {budget_steps} steps at epsilon "
              f"{args.epsilon:g}, delta {args.delta:g} ...")
  else:
    say(args, f"Counting the steps that noise multiplier {args.noise_multiplier:g} "
              f"allows at epsilon {args.epsilon:g}, delta {args.delta:g} ...")
  try:
    budget = make_budget(args, sampler)
  except (ValueError, ArithmeticError) as e:
    fail(f"no privacy budget for epsilon {args.epsilon:g}, delta {args.delta:g}: {e}")
  print(f"Noise multiplier {budget.noise_multiplier} "
        f"({'given' if args.noise_multiplier is not None else 'calibrated'}); "
        f"the budget (epsilon {args.epsilon:g}, delta {args.delta:g}) allows "
        f"{budget.max_steps} steps: {sampler.describe()}; {budget.accountant} "
        f"accountant ({time.time() - t:.1f} s).")
  if args.steps > budget.max_steps and not args.allow_budget_overrun:
    fail(
        f"--steps {args.steps} is beyond the privacy budget, which allows "
        f"{budget.max_steps} steps (epsilon {format_epsilon(budget.epsilon())} <= "
        f"{args.epsilon:g}). Run fewer steps, or pass --allow-budget-overrun to "
        f"run them and report the larger epsilon "
        f"({format_epsilon(budget.epsilon(args.steps))}).")
  return sampler, budget


CLIPPING_STRATEGIES = ("flat", "per-layer", "adaptive")


def clip_norm(args, params):
  """What `l2_norm_clip=` the run clips with (--clipping-strategy): the flat
  --l2-norm-clip, one norm per layer of the params (the same total
  sensitivity) or an adaptive clip starting at it."""
  strategy = getattr(args, "clipping_strategy", "flat")
  if strategy == "per-layer":
    return optax_dp.per_layer_clip_norms(params, args.l2_norm_clip)
  if strategy == "adaptive":
    return optax_dp.AdaptiveClip(args.l2_norm_clip, target_quantile=args.target_quantile,
                                 learning_rate=args.clip_learning_rate)
  return args.l2_norm_clip


def current_clip(args, opt_state):
  """The keyword the clipped-gradient function takes each step: the adaptive
  clip's current norm, read from the optimizer state (nothing otherwise)."""
  if getattr(args, "clipping_strategy", "flat") != "adaptive":
    return {}
  return {"l2_norm_clip": optax_dp.l2_norm_clip_of(opt_state)}


def final_clip(args, opt_state):
  """The adaptive clip's last norm for the record (None otherwise)."""
  if getattr(args, "clipping_strategy", "flat") != "adaptive" or args.no_dp:
    return None
  return float(optax_dp.l2_norm_clip_of(opt_state))


def describe_clip(args, opt_state=None):
  """The clip for a log line: the flat norm, per layer, or adaptive with its
  current norm (public: a function of released noisy counts)."""
  strategy = getattr(args, "clipping_strategy", "flat")
  if strategy == "adaptive":
    now = ("" if opt_state is None
           else f", now {float(optax_dp.l2_norm_clip_of(opt_state)):.4g}")
    return (f"adaptive (from {args.l2_norm_clip}, quantile {args.target_quantile}"
            f"{now})")
  if strategy == "per-layer":
    return f"per layer (total {args.l2_norm_clip})"
  return f"{args.l2_norm_clip}"


def make_private_tx(args, budget, noise_key, optimizer, l2_norm_clip=None):
  """`dp_aggregate` (clip, noise, the budget's ledger) chained before
  `optimizer`; `l2_norm_clip`: `clip_norm(args, params)` (default: the flat
  --l2-norm-clip)."""
  return optax.chain(
      optax_dp.dp_aggregate(args.l2_norm_clip if l2_norm_clip is None else l2_norm_clip,
                            key=noise_key, budget=budget,
                            allow_budget_overrun=args.allow_budget_overrun,
                            rescale_to_unit_norm=args.rescale_to_unit_norm),
      optimizer)


def batch_shapes(sampler, steps, accumulation_steps=1):
  """The static sizes of the (physical) batches the train step of a run of
  `steps` steps sees, smallest first, where the sampler pads to a few known
  ones (a Poisson sampler's padding buckets); None otherwise."""
  sizes = sampler.padding_sizes(steps) if hasattr(sampler, "padding_sizes") else None
  if not sizes:
    return None
  k = accumulation_steps
  if k == 1:
    return tuple(sizes)
  multiple = getattr(sampler, "pad_to_multiple_of", None)   # as the sampler splits them
  physical = [math.ceil(size / k) for size in sizes]
  if multiple:
    physical = [-(-size // multiple) * multiple for size in physical]
  return tuple(dict.fromkeys(physical))


def _terminal_columns(stream):
  """The terminal's width, or 0 if it reports none (a pty of no size, a fake)."""
  try:
    return os.get_terminal_size(stream.fileno()).columns
  except (AttributeError, OSError, ValueError):
    return 0


class Progress:
  """The training loop's progress, shown the same way by the three examples.

  On a terminal: a tqdm bar (steps, elapsed, ETA, the train loss and the
  epsilon spent at the last evaluation), with the evaluation lines printed
  above it. Elsewhere (CI, pipes, tests): no bar, plain lines: the
  evaluation lines (with the time left) and, between evaluations more than
  `plain_every` seconds apart, a short progress line at most that often.
  With --quiet: neither. Either way it records the run's history, one dict
  per evaluation (`evaluated`), for the JSON record and --plot.

  Make it just before the loop, and tell it the size of each batch before
  the train step runs on it (`batch`): a size it has not seen compiles the
  train step again (a Poisson sampler pads its batches to a few static
  sizes, `shapes`), which it announces ("Compiling the train step for batch
  shape 320 (padding bucket 3 of 4) ...") and times. The bar starts after
  the first compile, and the time of each later one is left out of its rate
  and so of its ETA (and of the plain lines' time left): a new shape does
  not make the estimate jump.
  """

  def __init__(self, args, *, total, evaluated_on="test", eval_size=None, stream=None,
               plain_every=60.0, shapes=None):
    self.quiet = getattr(args, "quiet", False)
    self.total, self.eval_every = total, args.eval_every
    self.evaluated_on, self.eval_size = evaluated_on, eval_size
    self.stream = stream or sys.stdout
    self.plain_every = plain_every
    self.history = []
    self.bar = None
    self._tty = not self.quiet and self.stream.isatty()
    self._epsilon = None        # the text of the last evaluation's epsilon
    self._compiled = None       # (step, time) after the first step
    self._shapes = tuple(shapes) if shapes else None   # the static sizes, if known
    self._seen = set()          # the batch sizes the train step was compiled for
    self._compiling = None      # (size, start time) of a compile not yet timed
    self._excluded = 0.0        # seconds of compiles after the first step
    self._shown = self._last_line = time.time()
    self.start = time.time()

  def batch(self, size):
    """Before the train step runs on a batch of `size` rows (its static
    size): announces the compile of a size not seen before."""
    self._end_compile()
    size = int(size)
    if size in self._seen:
      return
    self._seen.add(size)
    bucket = ""
    if self._shapes and size in self._shapes:
      bucket = (f" (padding bucket {self._shapes.index(size) + 1} of "
                f"{len(self._shapes)})")
    self.say(f"Compiling the train step for batch shape {size}{bucket} ...")
    self._compiling = (size, time.time())

  def _end_compile(self):
    """Times the compile announced last, once the step that compiled ran;
    one after the first step is left out of the rate and the time left."""
    if self._compiling is None:
      return
    (size, started), now = self._compiling, time.time()
    self._compiling = None
    seconds = now - started
    if self._compiled is None:
      self.say(f"Train step compiled for batch shape {size} in {seconds:.1f} s.")
      return
    self._excluded += seconds
    if self.bar is not None:   # tqdm's rate: from start_t and the last print
      self.bar.start_t += seconds
      self.bar.last_print_t += seconds
    self.say(f"Train step compiled for batch shape {size} in {seconds:.1f} s "
             "(left out of the time left).")

  def say(self, message):
    """Prints `message` (above the bar, if there is one), unless --quiet."""
    if self.quiet:
      return
    if self.bar is not None:
      self.bar.write(message, file=self.stream)
    else:
      print(message, file=self.stream, flush=True)

  def seconds(self):
    """Wall time since the loop started."""
    return time.time() - self.start

  def _time_left(self, step):
    """", 12:34 left": the time to the last step at the rate since the compile
    (evaluations included); "" at the last step or before any rate."""
    done = step - self._compiled[0]
    since = time.time() - self._compiled[1] - self._excluded
    if done <= 0 or step >= self.total:
      return ""
    return f", {tqdm.tqdm.format_interval((self.total - step) * since / done)} left"

  def step(self, step, loss=None):
    """After each (logical) step; `loss`: its train loss (an array, or a callable
    returning one), read only when shown, so as not to wait for every step."""
    self._end_compile()
    now = time.time()
    if self._compiled is None:
      self._compiled = (step, now)
      if self._tty and step < self.total:
        columns = _terminal_columns(self.stream)
        self.bar = tqdm.tqdm(total=self.total, initial=step, desc="train", unit="step",
                             file=self.stream, dynamic_ncols=bool(columns),
                             **({} if columns else {"ncols": 100, "nrows": 24}))
      return
    if self.bar is not None:
      if now - self._shown >= 1.0:
        self._shown = now
        self.bar.set_postfix_str(self._postfix(loss), refresh=False)
      self.bar.update(1)
    elif not self.quiet and now - self._last_line >= self.plain_every:
      self._last_line = now
      self.say(f"step {step:5d}/{self.total}  {self._postfix(loss)}  "
               f"{now - self.start:.0f} s{self._time_left(step)}")

  def _postfix(self, loss):
    loss = loss() if callable(loss) else loss
    parts = [] if loss is None else [f"loss {float(loss):.4f}"]
    if self._epsilon is not None:
      parts.append(f"epsilon {self._epsilon}")
    return ", ".join(parts)

  def evaluating(self):
    """Before each evaluation: said the first time, shown on the bar each time."""
    if not self.history:
      size = f" ({self.eval_size} examples)" if self.eval_size else ""
      every = "step" if self.eval_every == 1 else f"{self.eval_every} steps"
      self.say(f"Evaluating on the {self.evaluated_on} set{size} every {every} ...")
    if self.bar is not None:
      self.bar.set_postfix_str("evaluating ...")

  def evaluated(self, step, *, train_loss, train_accuracy, eval_loss, eval_accuracy,
                epsilon):
    """Records one evaluation in the history and prints its line."""
    entry = {"step": int(step), "train_loss": float(train_loss),
             "train_accuracy": float(train_accuracy), "eval_loss": float(eval_loss),
             "eval_accuracy": float(eval_accuracy),
             "epsilon": float(epsilon) if math.isfinite(epsilon) else None,
             "seconds": self.seconds()}
    self.history.append(entry)
    self._epsilon = None if entry["epsilon"] is None else format_epsilon(epsilon)
    self._last_line = time.time()
    self.say(f"step {step:5d}/{self.total}  train loss {entry['train_loss']:.4f} "
             f"acc {entry['train_accuracy']:.4f}  {self.evaluated_on} loss "
             f"{entry['eval_loss']:.4f} acc {entry['eval_accuracy']:.4f}  "
             f"epsilon {format_epsilon(epsilon)}  {entry['seconds']:.0f} s"
             f"{self._time_left(step)}")
    if self.bar is not None:
      self.bar.set_postfix_str(self._postfix(entry["train_loss"]))

  def close(self):
    """Closes the bar (if any): the lines after the loop print below it."""
    if self.bar is not None:
      self.bar.close()
      self.bar = None


def report(args, budget, sampler, *, opt_state, expected_steps, released, steps_done,
           seconds, test_acc, dataset_size, evaluated_on="test"):
  """Prints the run's privacy statement; returns its epsilon (inf with --no-dp).

  `released` is the optimizer's count of noisy updates (the ledger); a run
  whose ledger disagrees with its loop (`expected_steps`) is an error, not a
  statement.
  """
  if budget is None:
    why = ("--clip-only: clipped, no noise" if getattr(args, "clip_only", False)
           else "--no-dp")
    print(f"Done: {released} steps in {seconds:.0f} s. {evaluated_on.capitalize()} accuracy "
          f"{test_acc:.4f}. NOT private ({why}).")
    return float("inf")
  if released != expected_steps:  # the ledger and the loop must agree
    raise RuntimeError(f"optimizer released {released} noisy updates, loop ran to "
                       f"{expected_steps}")
  epsilon = budget.epsilon_spent(opt_state)
  over = " (PAST the budget: --allow-budget-overrun)" if released > budget.max_steps else ""
  units = "users" if sampler.privacy_unit == "user" else "training examples"
  print(f"Done: {released} steps ({steps_done} in {seconds:.0f} s). "
        f"{evaluated_on.capitalize()} accuracy {test_acc:.4f}. Privacy: "
        f"({format_epsilon(epsilon)}, {args.delta:g})-DP{over} for the "
        f"{dataset_size} {units} ({sampler.name} sampling, "
        f"{budget.accountant} accountant, noise multiplier "
        f"{budget.noise_multiplier}, clip {describe_clip(args, opt_state)}).")
  print(budget.statement(released))
  if getattr(args, "clipping_strategy", "flat") == "adaptive":
    sigma, count_std = optax_dp.AdaptiveClip(args.l2_norm_clip).noise_split(
        budget.noise_multiplier, budget.sampler.expected_batch_size)
    print(f"Adaptive clipping (Andrew et al. 2021): the noise multiplier above is that of "
          f"two Gaussian mechanisms per step on the same batch, the gradients' (noise "
          f"multiplier {sigma:.4f} of the current clip norm) and the count of unclipped "
          f"examples' (std {count_std:g}, sensitivity 1/2); together exactly "
          f"{budget.noise_multiplier:.4f}, so the epsilon is theirs.")
  return epsilon


# The JSON record's keys, in the order written; an example leaves out those
# that do not apply to it (mnist_nnx.py: no resume, accumulation or devices).
JSON_KEYS = ("test_accuracy", "test_loss", "epsilon", "delta", "noise_multiplier",
             "steps", "steps_this_run", "resumed_from_step", "budget_steps",
             "batch_size", "accumulation_steps", "devices", "seconds", "l2_norm_clip",
             "sampler", "neighboring_relation", "accountant", "clipping", "private",
             "noise", "bands", "clipping_strategy", "target_quantile", "final_l2_norm_clip",
             # train.py's recipe runs:
             "recipe", "dataset", "model", "evaluated_on", "ema_decay",
             "augmentation_multiplicity", "dataset_size", "features", "epochs",
             "learning_rate", "schedule", "momentum",
             # user-level runs (examples/train_lm.py --privacy-unit user):
             # dataset_size and batch_size are then of users
             "privacy_unit", "num_examples", "max_examples_per_user", "role_fraction",
             # examples/train_lm.py: the private roles and their windows
             # (the group a speaker is, for an example-level run)
             "num_roles", "role_windows_median", "role_windows_max",
             # examples/train_lm.py --clip-only (an ablation, not private):
             "clip_only",
             # examples/train_lm.py --public-only (the pretrained model, no training)
             "public_only",
             # examples/train_lm.py --mesh: {axis name: devices} (null: one device)
             "mesh",
             # Every run: one entry per evaluation (Progress.evaluated), this
             # run's only (a resumed run starts a new one): {"step",
             # "train_loss", "train_accuracy", "eval_loss", "eval_accuracy",
             # "epsilon" (null without privacy), "seconds" (since the loop
             # started)}.
             "history")


def make_record(args, budget, sampler, *, epsilon, test_accuracy, test_loss, steps,
                steps_this_run, seconds, history, **extra):
  """The run's record (what --json-out writes, what --plot draws).

  `history`: `Progress.history`; `extra`: further JSON_KEYS.
  """
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
      "noise": None if args.no_dp else getattr(args, "noise", "gaussian"),
      "bands": getattr(args, "bands", 1),
      "neighboring_relation": sampler.neighboring_relation if budget else None,
      "accountant": budget.accountant if budget else None,
      "clipping": None if args.no_dp else args.clipping,
      "clipping_strategy": None if args.no_dp else getattr(args, "clipping_strategy", "flat"),
      "target_quantile": (args.target_quantile
                          if getattr(args, "clipping_strategy", "flat") == "adaptive" else None),
      "private": budget is not None,
      "history": list(history),
      **extra,
  }
  unknown = set(values) - set(JSON_KEYS)
  if unknown:
    raise ValueError(f"not JSON record keys: {sorted(unknown)}")
  return {key: values[key] for key in JSON_KEYS if key in values}


def _parent_dir(path):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def write_outputs(args, record):
  """Writes `record` to --json-out and draws it to --plot (each if given)."""
  if args.json_out:
    _parent_dir(args.json_out)
    with open(args.json_out, "w") as f:
      json.dump(record, f, indent=2)
  if args.plot:
    import plot_results  # pylint: disable=import-outside-toplevel  (matplotlib: only here)
    say(args, f"Plotting the run to {args.plot} ...")
    _parent_dir(args.plot)
    plot_results.plot_run(record, args.plot)
