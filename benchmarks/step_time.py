"""Step time of one DP-SGD training step: optax_dp against its peers.

One process, one model, one batch; every row is a complete jitted train step
`(params, opt_state, batch) -> (params, opt_state)` with params and optimizer
state donated. Rows run round-robin (each round runs one step of every row) so
that machine noise hits all rows alike. Rows:

  non_private   jax.grad of the mean loss + optax.sgd(0.1, momentum=0.9)
  optax_dp_auto optax_dp.clipped_grads(loss_fn, C, method="auto") (book-keeping:
                no per-example grads of Dense/Conv kernels) +
                chain(optax_dp.dp_aggregate(C, sigma, key, expected_batch_size=B),
                      optax.sgd(0.1, momentum=0.9))
  optax_dp_vmap optax_dp.per_example_grads(loss_fn) + the same chain
  optax_contrib jax.vmap(jax.grad(loss of one example)) +
                optax.contrib.dpsgd(0.1, C, sigma, seed, momentum=0.9)
  jax_privacy   jax_privacy.clipped_grad(loss_fn, l2_clip_norm=C, batch_argnums=1,
                normalize_by=B) + chain(noise_addition.gaussian_privatizer(
                stddev=sigma * grad_fn.sensitivity()), optax.sgd(0.1, momentum=0.9))

Every DP row computes g = (sum_i clip_C(grad loss_i) + sigma*C*N(0, I)) / B with
C = 0.1, sigma = 1.34, then SGD with momentum. jax_privacy divides by B before
adding noise of std sigma*C/B (its `sensitivity()`), which is the same
distribution. `--check` verifies, with sigma = 0 on a small batch, that the DP
rows produce the same params after two steps as a plain reference.

Usage:
  python benchmarks/step_time.py --check --rounds 2
  python benchmarks/step_time.py --json-out benchmarks/results/step_time_b256.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_dp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=wrong-import-position

LEARNING_RATE = 0.1
MOMENTUM = 0.9
L2_NORM_CLIP = 0.1
NOISE_MULTIPLIER = 1.34
ALL_ROWS = ("non_private", "optax_dp_auto", "optax_dp_vmap", "optax_contrib",
            "jax_privacy")
DP_ROWS = ALL_ROWS[1:]


class CNN(nn.Module):
  """The example's Flax Linen CNN (NHWC 28x28x1 input, 10 classes)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=32, kernel_size=(3, 3), padding="SAME")(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=64, kernel_size=(3, 3), padding="SAME")(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(features=256)(x)
    x = nn.relu(x)
    x = nn.Dense(features=10)(x)
    return x


MODEL = CNN()


def loss_fn(params, batch):
  """An ordinary batched mean loss: batch = (images, labels). Used by ALL rows."""
  images, labels = batch
  logits = MODEL.apply({"params": params}, images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_batch(batch_size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch_size, 28, 28, 1), dtype=np.float32)
  labels = rng.integers(0, 10, size=(batch_size,), dtype=np.int32)
  return jnp.asarray(images), jnp.asarray(labels)


def init_params(seed: int = 0):
  return MODEL.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1)))["params"]


def _sgd():
  return optax.sgd(LEARNING_RATE, momentum=MOMENTUM)


class Row(NamedTuple):
  init: Callable[[Any], Any]                     # params -> opt_state
  step: Callable[[Any, Any, Any], tuple[Any, Any]]  # un-jitted train step


def build_row(name: str, batch_size: int, noise_multiplier: float,
              l2_norm_clip: float = L2_NORM_CLIP) -> Row:
  """Returns (opt init, train step) for one row. Same math in every DP row."""
  if name == "non_private":
    tx = _sgd()
    grad_fn = jax.grad(loss_fn)

  elif name in ("optax_dp_auto", "optax_dp_vmap"):
    tx = optax.chain(
        optax_dp.dp_aggregate(l2_norm_clip, noise_multiplier, jax.random.key(1),
                              expected_batch_size=batch_size),
        _sgd())
    if name == "optax_dp_vmap":
      grad_fn = optax_dp.per_example_grads(loss_fn)
    else:  # book-keeping (ghost) clipping; a ClippedGrads for dp_aggregate
      grad_fn = optax_dp.clipped_grads(loss_fn, l2_norm_clip, method="auto")

  elif name == "optax_contrib":
    with warnings.catch_warnings():  # optax 0.2.8 dpsgd passes the deprecated seed=
      warnings.simplefilter("ignore", DeprecationWarning)
      tx = optax.contrib.dpsgd(LEARNING_RATE, l2_norm_clip, noise_multiplier, 1,
                               momentum=MOMENTUM)

    def one_example_loss(params, image, label):
      return loss_fn(params, (image[None], label[None]))

    vmapped = jax.vmap(jax.grad(one_example_loss), in_axes=(None, 0, 0))
    grad_fn = lambda params, batch: vmapped(params, *batch)

  elif name == "jax_privacy":
    import jax_privacy  # pylint: disable=import-outside-toplevel
    from jax_privacy import noise_addition  # pylint: disable=import-outside-toplevel
    # `fun` is the ordinary batched loss; keep_batch_dim=True (default) calls it
    # on batches of one example. Returns the SUM of clipped grads / normalize_by.
    grad_fn = jax_privacy.clipped_grad(
        loss_fn, l2_clip_norm=l2_norm_clip, batch_argnums=1,
        normalize_by=float(batch_size))
    # sensitivity() = C / B here, so the noise is sigma*C/B on the mean, i.e.
    # sigma*C on the sum: the same mechanism as the other rows.
    stddev = noise_multiplier * grad_fn.sensitivity()
    tx = optax.chain(
        noise_addition.gaussian_privatizer(stddev=stddev,
                                           prng_key=jax.random.key(1)),
        _sgd())

  else:
    raise ValueError(f"unknown row {name!r}; choose from {ALL_ROWS}")

  def step(params, opt_state, batch):
    grads = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return Row(tx.init, step)


@contextlib.contextmanager
def _quiet_sigma0():
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*noise_multiplier=0.*")
    warnings.simplefilter("ignore", DeprecationWarning)
    yield


def per_example_norms(params, batch):
  images, labels = batch
  one = lambda p, x, y: loss_fn(p, (x[None], y[None]))
  g = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, images, labels)
  return g, jnp.sqrt(sum(jnp.sum(l.reshape(l.shape[0], -1) ** 2, axis=1)
                         for l in jax.tree.leaves(g)))


def reference_step(params, opt_state, batch, l2_norm_clip):
  """Plain-JAX clip / sum / divide-by-B reference (sigma=0) for --check."""
  g, norms = per_example_norms(params, batch)
  c = jnp.minimum(1.0, l2_norm_clip / norms)
  batch_size = norms.shape[0]
  mean = jax.tree.map(lambda l: jnp.tensordot(c, l, axes=1) / batch_size, g)
  updates, opt_state = _sgd().update(mean, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _max_abs_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def run_check(rows, batch_size: int = 16, steps: int = 2) -> dict:
  """sigma=0, small batch: every DP row must match the reference params.

  Two clip norms: the benchmark's C=0.1 (every example is clipped on this
  model) and C = the median per-example norm at init (about half clipped, so
  both branches of min(1, C/||g||) are exercised). Two steps, so momentum and
  the optimizer-state threading are covered too.
  """
  params0 = init_params()
  batch = make_batch(batch_size, seed=1)
  _, norms0 = jax.jit(per_example_norms)(params0, batch)
  median = float(jnp.median(norms0))
  ref_step = jax.jit(reference_step)
  results = {}
  failed = False
  for clip in (L2_NORM_CLIP, median):
    n_clipped = int(jnp.sum(norms0 > clip))
    print(f"## --check: batch {batch_size}, noise_multiplier 0, {steps} steps, "
          f"C={clip:.4g} ({n_clipped}/{batch_size} examples clipped at step 1)")
    ref_p, ref_s = params0, _sgd().init(params0)
    for _ in range(steps):
      ref_p, ref_s = ref_step(ref_p, ref_s, batch, clip)
    ref_update = _max_abs_diff(ref_p, params0)
    tol = 1e-3 * ref_update   # 0.1% of the update: float32 rounding passes,
    #                           a wrong clip factor or normaliser does not.
    res = {"l2_norm_clip": clip, "examples_clipped": n_clipped,
           "max_abs_update_reference": ref_update, "tolerance": tol, "rows": {}}
    for name in rows:
      with _quiet_sigma0():
        row = build_row(name, batch_size, 0.0, clip)
        p, s = params0, row.init(params0)
        step = jax.jit(row.step)
        for _ in range(steps):
          p, s = step(p, s, batch)
      diff = _max_abs_diff(p, ref_p)
      res["rows"][name] = diff
      ok = name == "non_private" or diff <= tol
      failed |= not ok
      note = ("(not DP: expected to differ)" if name == "non_private"
              else "ok" if ok else "MISMATCH")
      print(f"  {name:14s} max|params - reference| = {diff:.2e}  {note}")
    print(f"  (reference max|params - params0| = {ref_update:.2e}; "
          f"tolerance {tol:.1e})")
    results[f"C={clip:.4g}"] = res
  if failed:
    print("CHECK FAILED")
    sys.exit(1)
  print("check passed: the DP rows compute the same update\n", flush=True)
  return results


def versions() -> dict:
  try:
    import jax_privacy  # pylint: disable=import-outside-toplevel
    jp = jax_privacy.__version__
  except ImportError:
    jp = "not installed"
  machine = _common.machine_info()
  import jaxlib  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # which optax_dp source was measured (dirty: uncommitted edits)
  git = _common.git_revision(root, "optax_dp")
  return {"optax_dp_git": git, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "optax": optax.__version__,
          "flax": flax.__version__, "jax_privacy": jp,
          "optax_dp": optax_dp.__version__, "python": platform.python_version(),
          "nproc": machine["nproc"], "cpu": machine["cpu"],
          "backend": jax.default_backend(), "devices": str(jax.devices()),
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
          "loadavg_at_start": _common.loadavg()}


def run_opacus(python: str, batch_size: int, rounds: int, check: bool) -> dict:
  """Runs opacus_step.py under `python` (its own process, after the JAX rows)."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "opacus_step.py")
  import tempfile  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "opacus.json")
    cmd = [python, script, "--batch-size", str(batch_size), "--rounds",
           str(rounds), "--json-out", out] + (["--check"] if check else [])
    print(f"\n## Opacus rows: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    with open(out) as f:
      return json.load(f)


def combined_table(summary: dict, opacus: dict, batch_size: int,
                   header: str) -> str:
  """Absolute medians of the JAX and PyTorch rows, and auto / Opacus ghost."""
  ov = opacus["versions"]
  load = ov.get("loadavg_at_start")
  lines = [f"Step time, batch {batch_size}, JAX and PyTorch ({header}; "
           f"torch {ov['torch']}, opacus {ov['opacus']}, eager, "
           f"{ov['torch_threads']} threads"
           + (f", 1-min load avg at Opacus start {load:.1f}" if load is not None
              else "") + ")", "",
           "| framework | row | median ms | min ms | median / same-framework "
           "non-private median | median of per-round ratios |",
           "|---|---|---|---|---|---|"]
  fmt = _common.fmt_ratio
  for framework, rows in (("JAX", summary), ("PyTorch", opacus["rows"])):
    for name, s in rows.items():
      lines.append(f"| {framework} | {name} | {s['median_ms']:.0f} | "
                   f"{s['min_ms']:.0f} | {fmt(s.get('ratio_of_medians'))} | "
                   f"{fmt(s.get('median_round_ratio'))} |")
  auto = summary.get("optax_dp_auto")
  ghost = opacus["rows"].get("opacus_ghost")
  if auto and ghost:
    lines += ["", f"optax_dp_auto / Opacus ghost (absolute medians; the two "
              f"processes ran one after the other): "
              f"{auto['median_ms'] / ghost['median_ms']:.2f}"]
    if auto.get("ratio_of_medians") and ghost.get("ratio_of_medians"):
      lines.append(
          f"(optax_dp_auto / JAX non-private) / (Opacus ghost / torch "
          f"non-private): {auto['ratio_of_medians']:.2f} / "
          f"{ghost['ratio_of_medians']:.2f} = "
          f"{auto['ratio_of_medians'] / ghost['ratio_of_medians']:.2f}")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--rows", default=",".join(ALL_ROWS),
                      help=f"comma list from {','.join(ALL_ROWS)}")
  parser.add_argument("--json-out", default=None)
  parser.add_argument("--check", action="store_true",
                      help="first verify (sigma=0, batch 16) that the DP rows "
                      "compute the same updated params")
  parser.add_argument("--opacus-python", default=None, metavar="PATH",
                      help="after the JAX rows, run benchmarks/opacus_step.py "
                      "(same batch size, rounds and --check) with this "
                      "interpreter (a venv with torch and opacus) and print a "
                      "combined table")
  args = parser.parse_args(argv)
  rows = _common.parse_rows(parser, args, ALL_ROWS)

  info = versions()
  header = (_common.jax_versions_header(info)
            + f"batch {args.batch_size}, {args.rounds} rounds, C={L2_NORM_CLIP}, "
            f"sigma={NOISE_MULTIPLIER}"
            + _common.xla_flags_suffix(info)
            + _common.loadavg_suffix(info["loadavg_at_start"]))
  print(header, flush=True)

  check = run_check(rows) if args.check else None

  params0 = init_params()
  batch = make_batch(args.batch_size)
  state = {}
  compiled = {}
  compile_s = {}
  for name in rows:
    row = build_row(name, args.batch_size, NOISE_MULTIPLIER)
    # Each row owns its buffers (donation invalidates them).
    params = jax.tree.map(jnp.copy, params0)
    opt_state = row.init(params)
    t0 = time.perf_counter()
    compiled[name] = jax.jit(row.step, donate_argnums=(0, 1)).lower(
        params, opt_state, batch).compile()
    compile_s[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    params, opt_state = jax.block_until_ready(
        compiled[name](params, opt_state, batch))   # warm-up step
    state[name] = (params, opt_state)
    print(f"{name}: compiled in {compile_s[name]:.1f} s, warm-up step "
          f"{1e3 * (time.perf_counter() - t0):.0f} ms", flush=True)

  def run_step(name):
    params, opt_state = state[name]
    state[name] = jax.block_until_ready(compiled[name](params, opt_state, batch))

  times = _common.round_robin(rows, args.rounds, run_step)
  for params, _ in state.values():
    for leaf in jax.tree.leaves(params):
      if not bool(jnp.all(jnp.isfinite(leaf))):
        print("WARNING: non-finite params after timing")

  summary = _common.summarize(times, "non_private", compile_s)
  table = _common.summary_table(
      f"Step time, batch {args.batch_size} ({header})", summary)
  print("\n" + table, flush=True)

  opacus = combined = None
  if args.opacus_python:
    opacus = run_opacus(args.opacus_python, args.batch_size, args.rounds,
                        args.check)
    combined = combined_table(summary, opacus, args.batch_size, header)
    print("\n" + combined)

  if args.json_out:
    _common.write_json(
        args.json_out, versions=info, batch_size=args.batch_size,
        rounds=args.rounds, l2_norm_clip=L2_NORM_CLIP,
        noise_multiplier=NOISE_MULTIPLIER, rows=summary, check=check,
        markdown=table, opacus=opacus, combined_markdown=combined)


if __name__ == "__main__":
  main()
