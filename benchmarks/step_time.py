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
import json
import os
import subprocess
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
# First: _common reads the load average before JAX is imported.
import _common  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

import _jax_common  # pylint: disable=wrong-import-position
from models import CNN, NNXCNN  # pylint: disable=wrong-import-position

ALL_ROWS = (_jax_common.OPTAX_DP_ROWS + ("optax_contrib", "jax_privacy")
            + _jax_common.NNX_ROWS)

MODEL = CNN()   # the example's CNN (examples/models.py)
# An ordinary batched mean loss: batch = (images, labels). Used by ALL rows.
loss_fn = _jax_common.cross_entropy_loss(MODEL)


def make_batch(batch_size: int, seed: int = 0):
  """Random NHWC 28x28x1 images and labels in 0..9."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch_size, 28, 28, 1), dtype=np.float32)
  labels = rng.integers(0, 10, size=(batch_size,), dtype=np.int32)
  return jnp.asarray(images), jnp.asarray(labels)


def init_params(seed: int = 0):
  return MODEL.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1)))["params"]


def _optax_contrib_row(batch_size: int, noise_multiplier: float,
                       l2_norm_clip: float) -> _jax_common.Row:
  """vmapped jax.grad of one example + optax.contrib.dpsgd."""
  del batch_size  # dpsgd takes the mean of the clipped per-example grads
  with warnings.catch_warnings():  # optax 0.2.8 dpsgd passes the deprecated seed=
    warnings.simplefilter("ignore", DeprecationWarning)
    tx = optax.contrib.dpsgd(_common.LEARNING_RATE, l2_norm_clip,
                             noise_multiplier, 1, momentum=_common.MOMENTUM)

  def one_example_loss(params, image, label):
    return loss_fn(params, (image[None], label[None]))

  vmapped = jax.vmap(jax.grad(one_example_loss), in_axes=(None, 0, 0))
  return _jax_common.make_row(tx, lambda params, batch: vmapped(params, *batch))


def _jax_privacy_row(batch_size: int, noise_multiplier: float,
                     l2_norm_clip: float) -> _jax_common.Row:
  """jax_privacy.clipped_grad + gaussian_privatizer + SGD."""
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
      _jax_common.sgd())
  return _jax_common.make_row(tx, grad_fn)


def nnx_loss_fn(model, batch):
  """The same loss for the NNX rows: mean cross-entropy of `model(images)`."""
  images, labels = batch
  return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()


def _nnx_row(name, batch_size, noise_multiplier, l2_norm_clip=_common.L2_NORM_CLIP):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return _jax_common.nnx_row(name, lambda: NNXCNN(rngs=nnx.Rngs(0)), nnx_loss_fn,
                             batch_size, noise_multiplier, l2_norm_clip)


def nnx_state(name: str, batch_size: int, noise_multiplier: float):
  """The initial `nnx.state` of an NNX row's model."""
  return _nnx_row(name, batch_size, noise_multiplier)[1]


def build_row(name: str, batch_size: int, noise_multiplier: float,
              l2_norm_clip: float = _common.L2_NORM_CLIP) -> _jax_common.Row:
  """Returns (opt init, train step) for one row. Same math in every DP row."""
  if name in _jax_common.NNX_ROWS:
    return _nnx_row(name, batch_size, noise_multiplier, l2_norm_clip)[0]
  if name in _jax_common.OPTAX_DP_ROWS + _jax_common.BANDMF_ROWS:
    return _jax_common.optax_dp_row(name, loss_fn, batch_size, noise_multiplier,
                                    l2_norm_clip)
  peers = {"optax_contrib": _optax_contrib_row, "jax_privacy": _jax_privacy_row}
  if name not in peers:
    raise ValueError(f"unknown row {name!r}; choose from {ALL_ROWS}")
  return peers[name](batch_size, noise_multiplier, l2_norm_clip)


def reference_step(params, opt_state, batch, l2_norm_clip):
  """Plain-JAX clip / sum / divide-by-B reference (sigma=0) for --check."""
  g, norms = _jax_common.per_example_grads_and_norms(loss_fn, params, batch)
  c = jnp.minimum(1.0, l2_norm_clip / norms)
  batch_size = norms.shape[0]
  mean = jax.tree.map(lambda l: jnp.tensordot(c, l, axes=1) / batch_size, g)
  updates, opt_state = _jax_common.sgd().update(mean, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def run_check(rows, batch_size: int = 16, steps: int = 2) -> dict:
  """sigma=0, small batch: every DP row must match the reference params.

  Two clip norms: the benchmark's C=0.1 (every example is clipped on this
  model) and C = the median per-example norm at init (about half clipped, so
  both branches of min(1, C/||g||) are exercised). Two steps, so momentum and
  the optimizer-state threading are covered too.
  """
  params0 = init_params()
  batch = make_batch(batch_size, seed=1)
  clips = _jax_common.check_clips(loss_fn, params0, batch, _common.L2_NORM_CLIP)
  ref_step = jax.jit(reference_step)

  def reference(clip):
    p, s = params0, _jax_common.sgd().init(params0)
    for _ in range(steps):
      p, s = ref_step(p, s, batch, clip)
    return p, _jax_common.max_abs_diff(p, params0)

  def row_diff(name, clip, ref):
    p = _jax_common.run_sigma0_steps(
        lambda: build_row(name, batch_size, 0.0, clip), params0, batch, steps)
    return _jax_common.max_abs_diff(p, ref)

  return _common.reference_check(
      rows, clips, reference=reference, row_diff=row_diff,
      base_rows=("non_private", "nnx_non_private"), batch_size=batch_size,
      steps=steps, name_width=max(map(len, rows)), what="the DP rows")


def run_opacus(python: str, batch_size: int, rounds: int, check: bool) -> dict:
  """Runs opacus_step.py under `python` (its own process, after the JAX rows)."""
  script = os.path.join(HERE, "opacus_step.py")
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
  title = (f"Step time, batch {batch_size}, JAX and PyTorch ({header}; "
           f"torch {ov['torch']}, opacus {ov['opacus']}, eager, "
           f"{ov['torch_threads']} threads"
           + (f", 1-min load avg at Opacus start {load:.2f}" if load is not None
              else "") + ")")
  headers = ["framework", "row", "median ms", "min ms",
             "median / same-framework non-private median",
             "median of per-round ratios", "min / same-framework non-private min"]
  rows = [[framework, name, f"{s['median_ms']:.0f}", f"{s['min_ms']:.0f}",
           *_common.ratio_cells(s)]
          for framework, group in (("JAX", summary), ("PyTorch", opacus["rows"]))
          for name, s in group.items()]
  lines = [title, "", _common.markdown_table(headers, rows)]
  auto = summary.get("optax_dp_auto")
  ghost = opacus["rows"].get("opacus_ghost")
  if auto and ghost:
    lines += ["", f"optax_dp_auto / Opacus ghost (absolute medians; the two "
              f"processes ran one after the other): "
              f"{auto['median_ms'] / ghost['median_ms']:.2f}; absolute mins: "
              f"{auto['min_ms'] / ghost['min_ms']:.2f}"]
    for key, what in (("ratio_of_medians", "medians"), ("ratio_of_mins", "mins")):
      if auto.get(key) and ghost.get(key):
        lines.append(
            f"(optax_dp_auto / JAX non-private) / (Opacus ghost / torch "
            f"non-private), {what}: {auto[key]:.2f} / {ghost[key]:.2f} = "
            f"{auto[key] / ghost[key]:.2f}")
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

  info = _jax_common.versions()
  header = _jax_common.header(
      info, f"batch {args.batch_size}, {args.rounds} rounds, "
      f"C={_common.L2_NORM_CLIP}, sigma={_common.NOISE_MULTIPLIER}")
  print(header, flush=True)
  _common.print_start_load_warning()

  check = run_check(rows) if args.check else None

  linen_params = init_params()
  summary = _jax_common.time_rows(
      rows, lambda name: build_row(name, args.batch_size, _common.NOISE_MULTIPLIER),
      linen_params, make_batch(args.batch_size), args.rounds,
      params_of=lambda name: (
          nnx_state(name, args.batch_size, _common.NOISE_MULTIPLIER)
          if name in _jax_common.NNX_ROWS else linen_params))
  # (the load record is taken before the Opacus process adds its own)
  table, load = _jax_common.timing_tables(
      f"Step time, batch {args.batch_size} ({header})", summary, header)

  opacus = combined = None
  if args.opacus_python:
    opacus = run_opacus(args.opacus_python, args.batch_size, args.rounds,
                        args.check)
    # judged on this process's "before" reading: the Opacus process's own
    # is inflated by the JAX rows that ran just before it
    combined = _common.with_load(
        combined_table(summary, opacus, args.batch_size, header),
        _common.load_record())
    print("\n" + combined)

  if args.json_out:
    _common.write_json(
        args.json_out, versions=info, batch_size=args.batch_size,
        rounds=args.rounds, l2_norm_clip=_common.L2_NORM_CLIP,
        noise_multiplier=_common.NOISE_MULTIPLIER, rows=summary, load=load,
        check=check, markdown=table, opacus=opacus, combined_markdown=combined)


if __name__ == "__main__":
  main()
