"""jax_privacy's own private character-level language model, on our Shakespeare split.

What this re-expresses. jax_privacy ships an example [1] that trains a small
decoder-only transformer on characters with DP-SGD, written against its core
API: `clipped_grad`, a noise-adding privatizer, Poisson batch selection with
padding, and an execution plan (BandMF with one band, which is DP-SGD) that
calibrates the noise for a target epsilon. This script rebuilds that recipe
in our own code, against the public API of the installed jax_privacy 2.0.0,
and trains it on exactly the data of our `shakespeare-*` recipes
(examples/train_lm.py), so that its held-out numbers and its epsilon can be
put beside ours. Kept as in the example:

  * the model: token embedding plus a learned position embedding, 2 blocks of
    width 128 (4-head causal self-attention without biases, then a 4x GELU
    MLP, each added back and followed by a LayerNorm: post-LN), a final
    LayerNorm and a linear head; weights drawn from N(0, 0.1^2), LayerNorm
    scale 1 and bias 0;
  * DP-SGD: per-example clip 1.0; the clipped sum divided by `normalize_by` =
    32 (the example's `batch_size` variable) although a batch holds 1000
    examples on average, so the update is about 31 times the mean clipped
    gradient; Poisson sampling at q = 1000 / N from the plan's batch
    selection, padded to a multiple of 32 (`pad_to_multiple_of`, padding
    masked by `is_padding_example`); 500 steps of plain `optax.sgd(0.001)`;
    delta 1e-5; noise calibrated by the plan's PLD accountant (jax_privacy's
    default neighbouring relation, REPLACE_SPECIAL: zero-out).

What differs, and why:

  * Data. Our windows (`train_lm.token_windows`, i.e.
    `shakespeare_data.windows`): 65 characters, each from one speaking role's
    dialogue, not overlapping, 32,394 from the private training plays; scored
    on the 10,581 windows of the held-out test plays. The example cuts 129
    characters every 64 from the first 100 records of TFDS `tiny_shakespeare`
    (overlapping windows: a character sits in two examples). Same windows
    means the same privacy unit and dataset size, so epsilons compare. Hence
    the model reads 64 characters (max_len 64, not 128).
  * Targets (a slip of the example, not repeated). Its loss scores
    `logits[:, :-1]` against `y[:, 1:]` where `y` is already the input shifted
    by one, so position t learns the character after next (t + 2). Here
    position t predicts character t + 1 (`lm_models.next_char_loss`), as in
    our recipes.
  * Noise calibration (a slip of the example, not repeated). It calibrates a
    noise multiplier for batch 32 over 10 epochs, builds a Gaussian
    privatizer from it, then replaces that privatizer with the plan's; only
    the plan's calibration (q = E / N, T steps, target epsilon) exists here.
    The dead calibration did not weaken the example's guarantee, it only
    misleads its reader.
  * Attention layout. The example passes (batch, heads, time, head_dim)
    arrays and a float mask to `jax.nn.dot_product_attention`, which takes
    (batch, time, heads, head_dim) and a boolean mask: under jax 0.10 it
    stops on the mask's dtype, and with a boolean mask on shapes. Here the
    documented layout with `is_causal=True`. (Later revisions fix this.)
  * API version. The example (as read, January 2026) uses a development API,
    `BandMFExecutionPlanConfig(num_bands=1, epsilon=..., ...).make(grad_fn)`,
    which took the clip and normaliser from `grad_fn`. In jax_privacy 2.0.0
    the config takes the strategy's Toeplitz coefficients (`strategy=[1.0]`:
    one band, DP-SGD), the clip and the normaliser, and `config.plan` hands
    back `plan.clipped_grad` (`jax_privacy.clipped_grad` with them),
    `plan.batch_selection_strategy` (`CyclicPoissonSampling`),
    `plan.noise_addition_transform` and `plan.dp_event`. Same mechanism.
  * Evaluation. Held-out next-character accuracy and loss in nats and bits
    per character, computed as examples/train_lm.py does (windows in chunks
    of 256, each window's mean over its 64 positions, averaged over windows);
    the example only samples text. Epsilon defaults to 8 (our
    `shakespeare-eps8`; the example's is 1). The epsilon is reported three
    ways: the plan's accountant on `plan.dp_event`, dp_accounting's PLD on
    the Poisson-sampled Gaussian at q = E / N over T steps (add/remove
    neighbours), and `optax_dp.compute_epsilon` (what our recipes report).

The current example [1] has moved on (normalize_by = the expected batch with
`rescale_to_unit_norm`, 100 iterations, next-character targets, fixed
attention); `--normalize-by 1000 --steps 100 --epsilon 1` gives its settings.
Beside `shakespeare-eps8` the recipes differ in optimizer (SGD 0.001 on the
sum / 32 against Adam 3e-3), batch (1000 against 512), steps (500 against 400)
and model (post-LN without biases against pre-LN NNX with biases): the
comparison is of recipes, not of libraries. `--time-steps` compares the
libraries: one step at batch 512 (fixed), T = 64, rows round-robin in one
process, each a jitted `(params, opt_state, batch)` step with the benchmarks'
common step (C = 0.1, sigma = 1.34, SGD 0.1 with momentum 0.9, as
benchmarks/lm_step.py), ratios to `non_private`:

  jax_privacy        their model: jax_privacy.clipped_grad(normalize_by=B) +
                     noise_addition.gaussian_privatizer + SGD
  optax_dp_auto      their model: optax_dp.clipped_grads(method="auto") +
                     optax_dp.dp_aggregate + SGD (_jax_common.optax_dp_row); raw
                     jnp parameters are no Flax layer optax_dp can book-keep, so
                     its clipping plan is per-example for all of them: like for
                     like with jax_privacy's vmapped per-example gradients
  nnx_optax_dp_auto  our recipe's model (lm_models.CharTransformer) through
                     optax_dp (lm_step.build_row)
  non_private        their model: jax.grad + SGD (the baseline)

Usage (the committed run, benchmarks/results/jax_privacy_lm_eps8_seed0.json, used the current
revision's settings; its `rescale_to_unit_norm` is the identity at clip 1):
  python benchmarks/jax_privacy_lm.py --normalize-by 1000 --steps 100 \\
      --json-out benchmarks/results/jax_privacy_lm_eps8_seed0.json
  python benchmarks/jax_privacy_lm.py --json-out ...   # the January 2026 revision's settings
  python benchmarks/jax_privacy_lm.py --subset 2048 --expected-batch-size 64 --steps 3
  python benchmarks/jax_privacy_lm.py --time-steps --rounds 5 \\
      --json-out benchmarks/results/jax_privacy_lm_step_b512_t64.json

References:
  [1] jax_privacy, examples/dp_sgd_transformer.py,
      https://github.com/google-deepmind/jax_privacy/blob/main/examples/dp_sgd_transformer.py
  [2] Abadi et al. 2016, "Deep Learning with Differential Privacy",
      https://arxiv.org/abs/1607.00133
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
import types
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
# First: _common reads the load average before JAX is imported.
import _common  # pylint: disable=wrong-import-position

import dp_accounting  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import jax_privacy  # pylint: disable=wrong-import-position
from jax_privacy import batch_selection  # pylint: disable=wrong-import-position
from jax_privacy import noise_addition  # pylint: disable=wrong-import-position
from jax_privacy.experimental import execution_plan  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

import optax_dp  # pylint: disable=wrong-import-position

import _jax_common  # pylint: disable=wrong-import-position
import lm_models  # pylint: disable=wrong-import-position
import lm_step  # pylint: disable=wrong-import-position
import shakespeare_data  # pylint: disable=wrong-import-position
import train_lm  # pylint: disable=wrong-import-position

LENGTH = 64           # characters read per window (our recipes'); the model's max_len
WIDTH, HEADS, BLOCKS = 128, 4, 2
L2_CLIP = 1.0
DELTA = 1e-5
PAD_MULTIPLE = 32
EVAL_CHUNK = 256      # train_lm.py's evaluation chunk
TIMING_ROWS = ("jax_privacy", "optax_dp_auto", "nnx_optax_dp_auto", "non_private")


# --- The example's model, in our words ------------------------------------------------


def init_params(key: jax.Array, vocab_size: int, max_len: int = LENGTH) -> dict:
  """The transformer's parameters: weights N(0, 0.1^2), LayerNorms (1, 0)."""
  keys = iter(jax.random.split(key, 3 + 6 * BLOCKS))
  normal = lambda *shape: 0.1 * jax.random.normal(next(keys), shape)
  norm = lambda: {"scale": jnp.ones(WIDTH), "bias": jnp.zeros(WIDTH)}
  blocks = [{"q": normal(WIDTH, WIDTH), "k": normal(WIDTH, WIDTH), "v": normal(WIDTH, WIDTH),
             "proj": normal(WIDTH, WIDTH), "fc1": normal(WIDTH, 4 * WIDTH),
             "fc2": normal(4 * WIDTH, WIDTH), "ln1": norm(), "ln2": norm()}
            for _ in range(BLOCKS)]
  return {"embed": normal(vocab_size, WIDTH), "position": normal(max_len, WIDTH),
          "blocks": blocks, "ln_f": norm(), "head": normal(WIDTH, vocab_size)}


def layer_norm(x: jax.Array, p: dict) -> jax.Array:
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return p["scale"] * (x - mean) * jax.lax.rsqrt(var + 1e-5) + p["bias"]


def block(x: jax.Array, p: dict) -> jax.Array:
  """Causal self-attention then an MLP, each residual and then normalised (post-LN)."""
  b, t, d = x.shape
  heads = lambda w: (x @ w).reshape(b, t, HEADS, d // HEADS)
  attended = jax.nn.dot_product_attention(heads(p["q"]), heads(p["k"]), heads(p["v"]),
                                          is_causal=True)
  x = layer_norm(x + attended.reshape(b, t, d) @ p["proj"], p["ln1"])
  return layer_norm(x + jax.nn.gelu(x @ p["fc1"]) @ p["fc2"], p["ln2"])


def forward(params: dict, tokens: jax.Array) -> jax.Array:
  """Next-character logits (B, T, vocab) of tokens (B, T)."""
  x = params["embed"][tokens] + params["position"][:tokens.shape[1]]
  for p in params["blocks"]:
    x = block(x, p)
  return layer_norm(x, params["ln_f"]) @ params["head"]


def window_loss(params: dict, window: jax.Array) -> jax.Array:
  """Mean next-character cross-entropy (nats) of windows (B, T + 1)."""
  return lm_models.next_char_loss(forward(params, window[:, :-1].astype(jnp.int32)), window)


@jax.jit
def _eval_chunk(params, window):
  """(loss, accuracy) of a chunk of windows, as train_lm.py's `per_window` means."""
  logits = forward(params, window[:, :-1].astype(jnp.int32))
  targets = window[:, 1:].astype(jnp.int32)
  return (lm_models.next_char_loss(logits, window),
          jnp.mean(jnp.argmax(logits, -1) == targets))


def evaluate(params, tokens) -> tuple[float, float]:
  """(mean loss in nats, next-character accuracy) over `tokens`, chunk-weighted."""
  loss = acc = 0.0
  for s in range(0, len(tokens), EVAL_CHUNK):
    window = jnp.asarray(tokens[s:s + EVAL_CHUNK])
    l, a = _eval_chunk(params, window)
    loss, acc = loss + float(l) * len(window), acc + float(a) * len(window)
  return loss / len(tokens), acc / len(tokens)


# --- Privacy: the execution plan and its epsilon -----------------------------------------


def make_config(args, dataset_size: int) -> execution_plan.BandMFExecutionPlanConfig:
  """DP-SGD as a one-band BandMF plan, calibrated to (--epsilon, 1e-5)."""
  return execution_plan.BandMFExecutionPlanConfig(
      iterations=args.steps, strategy=np.ones(1), epsilon=args.epsilon, delta=DELTA,
      sampling_prob=args.expected_batch_size / dataset_size, l2_clip_norm=L2_CLIP,
      rescale_to_unit_norm=False, normalize_by=args.normalize_by, noise_seed=args.seed)


def noise_multiplier_of(event: dp_accounting.DpEvent) -> float:
  """Sigma of the plan's event: SelfComposed(PoissonSampled(Gaussian(sigma)))."""
  while not isinstance(event, dp_accounting.GaussianDpEvent):
    event = event.event
  return event.noise_multiplier


def epsilons(config, plan, dataset_size: int, steps: int, batch: int) -> dict:
  """The epsilon at delta 1e-5 three ways, and whether they agree to 1%."""
  plan_accountant = copy.deepcopy(config.accountant)
  plan_accountant.compose(plan.dp_event)
  sigma = noise_multiplier_of(plan.dp_event)
  pld = dp_accounting.pld.PLDAccountant()      # add/remove neighbours
  pld.compose(dp_accounting.PoissonSampledDpEvent(
      batch / dataset_size, dp_accounting.GaussianDpEvent(sigma)), steps)
  eps = {"epsilon": plan_accountant.get_epsilon(DELTA),
         "epsilon_dp_accounting_pld": pld.get_epsilon(DELTA),
         "epsilon_optax_dp": optax_dp.compute_epsilon(sigma, DELTA, steps=steps,
                                                      dataset_size=dataset_size,
                                                      batch_size=batch)}
  spread = max(eps.values()) / min(eps.values()) - 1
  return {**eps, "noise_multiplier": sigma, "epsilon_relative_spread": spread,
          "epsilons_agree": spread <= 0.01,
          "plan_neighboring_relation": config.accountant.neighboring_relation.name}


# --- Training --------------------------------------------------------------------------


def make_step(plan, optimizer):
  """The jitted private step: clipped sum / normalize_by, the plan's noise, SGD."""
  grad_fn = plan.clipped_grad(window_loss, batch_argnums=1, return_values=True)
  privatizer = plan.noise_addition_transform

  @jax.jit
  def step(params, noise_state, opt_state, window, is_padding):
    grads, aux = grad_fn(params, window, is_padding_example=is_padding)
    noisy, noise_state = privatizer.update(grads, noise_state)
    updates, opt_state = optimizer.update(noisy, opt_state, params)
    real = ~is_padding
    loss = jnp.sum(jnp.where(real, aux.values, 0.0)) / jnp.maximum(jnp.sum(real), 1)
    return optax.apply_updates(params, updates), noise_state, opt_state, loss

  return step, privatizer


def padded_batch(tokens, indices: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """The sampled windows padded to a multiple of 32, and the padding mask."""
  idx = batch_selection.pad_to_multiple_of(indices, PAD_MULTIPLE)
  is_padding = idx < 0
  return jnp.asarray(tokens[np.where(is_padding, 0, idx)]), jnp.asarray(is_padding)


def train(args) -> dict:
  """Trains the recipe; prints its progress and returns the JSON record."""
  data_args = types.SimpleNamespace(cache_dir=train_lm.CACHE_DIR, length=LENGTH)
  tokens, _ = train_lm.token_windows(data_args, "train", args.subset)
  test_tokens, _ = train_lm.token_windows(data_args, "test", args.subset)
  n = len(tokens)
  if args.expected_batch_size > n:
    sys.exit(f"--expected-batch-size {args.expected_batch_size} > {n} training windows")
  vocab_size = len(shakespeare_data.load()["vocabulary"])

  t0 = time.perf_counter()
  config = make_config(args, n)
  plan = config.plan                           # calibrates sigma
  calibration_s = time.perf_counter() - t0
  privacy = epsilons(config, plan, n, args.steps, args.expected_batch_size)
  print(f"jax_privacy plan: noise multiplier {privacy['noise_multiplier']:.4f} for "
        f"{args.steps} steps at q = {args.expected_batch_size}/{n}, calibrated in "
        f"{calibration_s:.1f} s; epsilon {privacy['epsilon']:.4f} (plan, "
        f"{privacy['plan_neighboring_relation']}), {privacy['epsilon_dp_accounting_pld']:.4f}"
        f" (dp_accounting PLD, add/remove), {privacy['epsilon_optax_dp']:.4f} (optax_dp): "
        f"{'agree' if privacy['epsilons_agree'] else 'DIFFER'} (spread "
        f"{100 * privacy['epsilon_relative_spread']:.2f}%)", flush=True)

  params = init_params(jax.random.key(args.seed), vocab_size)
  optimizer = optax.sgd(args.learning_rate)
  step, privatizer = make_step(plan, optimizer)
  noise_state, opt_state = privatizer.init(params), optimizer.init(params)
  print(f"{sum(x.size for x in jax.tree.leaves(params))} parameters; {args.steps} steps, "
        f"expected batch {args.expected_batch_size} of {n} windows, normalize_by "
        f"{args.normalize_by}, sgd({args.learning_rate}), clip {L2_CLIP}; test plays: "
        f"{len(test_tokens)} windows.", flush=True)

  history, losses, step_s, batch_sizes, shapes = [], [], [], [], set()
  train_s = 0.0
  batches = plan.batch_selection_strategy.batch_iterator(n, rng=args.seed)
  for s, indices in enumerate(batches, start=1):
    window, is_padding = padded_batch(tokens, indices)
    t0 = time.perf_counter()
    params, noise_state, opt_state, loss = step(params, noise_state, opt_state, window,
                                                is_padding)
    losses.append(float(loss))                 # blocks: the step's time is complete
    dt = time.perf_counter() - t0
    train_s += dt
    if window.shape[0] in shapes:              # steady state: no compile in it
      step_s.append(dt)
    shapes.add(window.shape[0])
    batch_sizes.append(len(indices))
    if s % args.eval_every == 0 or s == args.steps:
      last = s == args.steps
      scored = test_tokens if last else test_tokens[:args.eval_windows]
      loss_nats, acc = evaluate(params, scored)
      history.append({"step": s, "train_loss": float(np.mean(losses)), "eval_loss": loss_nats,
                      "eval_bits_per_char": loss_nats / math.log(2), "eval_accuracy": acc,
                      "eval_windows": len(scored), "seconds": train_s})
      print(f"step {s}/{args.steps}: train loss {np.mean(losses):.4f}, test loss "
            f"{loss_nats:.4f} nats ({loss_nats / math.log(2):.4f} bits/char), accuracy "
            f"{acc:.4f} ({len(scored)} windows); {train_s:.1f} s", flush=True)
      losses = []
  test_loss, test_acc = history[-1]["eval_loss"], history[-1]["eval_accuracy"]
  median_step = statistics.median(step_s) if step_s else None
  print(f"Done: {args.steps} steps in {train_s:.1f} s ({train_s / args.steps:.3f} s/step, "
        f"median steady step {median_step if median_step is None else round(median_step, 3)}"
        f" s; {len(shapes)} padded batch sizes compiled). Test plays: accuracy {test_acc:.4f},"
        f" {test_loss:.4f} nats, {test_loss / math.log(2):.4f} bits per character; "
        f"({privacy['epsilon']:.4f}, {DELTA:g})-DP.")
  return {"recipe": "jax_privacy examples/dp_sgd_transformer.py, re-expressed",
          "dataset": "shakespeare", "evaluated_on": "test", "test_accuracy": test_acc,
          "test_loss": test_loss, "bits_per_char": test_loss / math.log(2), **privacy,
          "delta": DELTA, "steps": args.steps, "seconds": train_s,
          "seconds_per_step": train_s / args.steps, "median_steady_step_seconds": median_step,
          "padded_batch_sizes_compiled": sorted(shapes),
          "mean_batch_size": float(np.mean(batch_sizes)),
          "calibration_seconds": calibration_s,
          "settings": {"expected_batch_size": args.expected_batch_size,
                       "normalize_by": args.normalize_by, "learning_rate": args.learning_rate,
                       "optimizer": "sgd", "l2_clip_norm": L2_CLIP, "target_epsilon":
                       args.epsilon, "sampling_prob": args.expected_batch_size / n,
                       "pad_to_multiple_of": PAD_MULTIPLE, "dataset_size": n,
                       "eval_size": len(test_tokens), "eval_windows": args.eval_windows,
                       "length": LENGTH, "width": WIDTH, "heads": HEADS, "blocks": BLOCKS,
                       "vocab_size": vocab_size, "seed": args.seed, "subset": args.subset},
          "versions": _jax_common.versions(), "load": _common.load_record(),
          "history": history}


# --- Step time against optax_dp ----------------------------------------------------------


def jax_privacy_row(batch_size: int) -> _jax_common.Row:
  """Their model through jax_privacy.clipped_grad + gaussian_privatizer + SGD."""
  grad_fn = jax_privacy.clipped_grad(window_loss, l2_clip_norm=_common.L2_NORM_CLIP,
                                     batch_argnums=1, normalize_by=float(batch_size))
  tx = optax.chain(noise_addition.gaussian_privatizer(
      stddev=_common.NOISE_MULTIPLIER * grad_fn.sensitivity(), prng_key=jax.random.key(1)),
      _jax_common.sgd())
  return _jax_common.make_row(tx, grad_fn)


def time_steps(args) -> dict:
  """Times the TIMING_ROWS round-robin; prints the table, returns the JSON fields."""
  b, sigma, clip = args.batch_size, _common.NOISE_MULTIPLIER, _common.L2_NORM_CLIP
  params0 = init_params(jax.random.key(0), lm_step.VOCAB)
  nnx = "nnx_optax_dp_auto"
  built = {"jax_privacy": (jax_privacy_row(b), params0),
           "optax_dp_auto": (_jax_common.optax_dp_row("optax_dp_auto", window_loss, b, sigma,
                                                      clip), params0),
           nnx: (lm_step.build_row(nnx, b, sigma), lm_step.nnx_state(nnx, b, sigma)),
           "non_private": (_jax_common.optax_dp_row("non_private", window_loss, b, sigma,
                                                    clip), params0)}
  batch = lm_step.make_batch(b, LENGTH)
  info = _jax_common.versions()
  plan = optax_dp.clipping_plan(window_loss, params0, batch[:2])
  header = _jax_common.header(
      info, f"jax_privacy's example transformer d={WIDTH}, {BLOCKS} blocks, {HEADS} heads, "
      f"T={LENGTH}, vocab {lm_step.VOCAB}, {sum(x.size for x in jax.tree.leaves(params0))} "
      f"params; batch {b}, {args.rounds} rounds, C={clip}, sigma={sigma}")
  print(header, flush=True)
  print("optax_dp clipping plan of their model:", _jax_common.plan_summary(plan), flush=True)
  _common.print_start_load_warning()
  with warnings.catch_warnings():
    # Both optax_dp rows use the benchmarks' noise key; nothing is released here.
    warnings.simplefilter("ignore", optax_dp.NoiseKeyReuseWarning)
    summary = _jax_common.time_rows(TIMING_ROWS, lambda name: built[name][0], params0, batch,
                                    args.rounds, params_of=lambda name: built[name][1])
  table, load = _jax_common.timing_tables(
      f"Step time, jax_privacy's LM recipe model against optax_dp, batch {b}, T={LENGTH} "
      f"({header})", summary, header)
  return {"versions": info, "batch_size": b, "length": LENGTH, "rounds": args.rounds,
          "rows": summary, "plan": plan, "load": load, "markdown": table}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--epsilon", type=float, default=8.0,
                 help="target epsilon at delta 1e-5 (default: %(default)s, shakespeare-eps8's;"
                      " the example's is 1)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=500)
  p.add_argument("--expected-batch-size", type=int, default=1000)
  p.add_argument("--learning-rate", type=float, default=0.001)
  p.add_argument("--normalize-by", type=float, default=32.0,
                 help="divide the clipped sum by this (default: %(default)s, the example's)")
  p.add_argument("--subset", type=int, default=None,
                 help="train on the first N windows, evaluate on the first N (quick tries)")
  p.add_argument("--eval-every", type=int, default=None, help="default: steps // 10")
  p.add_argument("--eval-windows", type=int, default=2048,
                 help="test windows scored at each evaluation but the last (all)")
  p.add_argument("--json-out", default=None)
  p.add_argument("--time-steps", action="store_true",
                 help="time one step of each row instead of training")
  p.add_argument("--batch-size", type=int, default=512, help="--time-steps: batch size")
  p.add_argument("--rounds", type=int, default=5, help="--time-steps: rounds")
  args = p.parse_args(argv)
  if args.eval_every is None:
    args.eval_every = max(1, args.steps // 10)
  if min(args.steps, args.expected_batch_size, args.eval_every, args.batch_size,
         args.rounds, args.eval_windows) < 1 or args.normalize_by <= 0:
    p.error("--steps, --expected-batch-size, --eval-every, --eval-windows, --batch-size, "
            "--rounds and --normalize-by must be positive")
  fields = time_steps(args) if args.time_steps else train(args)
  if args.json_out:
    _common.write_json(args.json_out, **fields)


if __name__ == "__main__":
  main()
