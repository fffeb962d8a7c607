"""Step time of one DP-SGD step on a small Flax Linen transformer classifier.

Model (sequence length 64, batch 64): Embed(vocab 1000, 64) + a learned
positional embedding (nn.Embed(64, 64) over positions 0..T-1), 2 pre-LN blocks
[LayerNorm, nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64),
residual, LayerNorm, Dense(128)-gelu-Dense(64), residual], final LayerNorm,
mean-pool over positions, Dense(10) head; mean softmax cross-entropy on random
tokens and labels. Rows (same jitted, donated train step as step_time.py):

  non_private   jax.grad of the mean loss + optax.sgd(0.1, momentum=0.9)
  optax_dp_auto optax_dp.clipped_grads(loss_fn, C, method="auto") +
                chain(dp_aggregate(C, sigma, key, expected_batch_size=B), sgd)
  optax_dp_vmap optax_dp.per_example_grads(loss_fn) + the same chain

C = 0.1, sigma = 1.34, rows round-robin. What the book-keeping path does with
this model: Dense layers (MLP, head) are "dense" layers (T = 64 positions);
Embed, the positional Embed, LayerNorm and the attention's four DenseGeneral
projections are "generic" layers (a vmapped VJP of that layer alone).

`--check`: sigma = 0, batch 16, two steps, at C = 0.1 and at C = the median
per-example norm: the params of optax_dp_auto and optax_dp_vmap must match
(within 0.1% of the update size). `--profile` times the pieces of the
book-keeping path (uses optax_dp._linen internals; a diagnostic only).

Usage:
  python benchmarks/transformer_step.py --check --rounds 10 \
      --json-out benchmarks/results/transformer_b64.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_dp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=wrong-import-position
import step_time  # pylint: disable=wrong-import-position

LEARNING_RATE = 0.1
MOMENTUM = 0.9
L2_NORM_CLIP = 0.1
NOISE_MULTIPLIER = 1.34
VOCAB = 1000
SEQ_LEN = 64
D_MODEL = 64
NUM_CLASSES = 10
ALL_ROWS = ("non_private", "optax_dp_auto", "optax_dp_vmap")


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    h = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=D_MODEL)(h)
    x = x + h
    h = nn.LayerNorm()(x)
    h = nn.Dense(128)(h)
    h = nn.gelu(h)
    h = nn.Dense(D_MODEL)(h)
    return x + h


class Transformer(nn.Module):
  @nn.compact
  def __call__(self, tokens):                       # (B, T) int32
    x = nn.Embed(VOCAB, D_MODEL)(tokens)
    positions = jnp.arange(tokens.shape[1])
    x = x + nn.Embed(SEQ_LEN, D_MODEL, name="pos_embed")(positions)[None]
    for _ in range(2):
      x = Block()(x)
    x = nn.LayerNorm()(x)
    x = x.mean(axis=1)
    return nn.Dense(NUM_CLASSES)(x)


MODEL = Transformer()


def loss_fn(params, batch):
  tokens, labels = batch
  logits = MODEL.apply({"params": params}, tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_batch(batch_size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, size=(batch_size, SEQ_LEN), dtype=np.int32)
  labels = rng.integers(0, NUM_CLASSES, size=(batch_size,), dtype=np.int32)
  return jnp.asarray(tokens), jnp.asarray(labels)


def init_params(seed: int = 0):
  return MODEL.init(jax.random.key(seed),
                    jnp.zeros((1, SEQ_LEN), jnp.int32))["params"]


def _sgd():
  return optax.sgd(LEARNING_RATE, momentum=MOMENTUM)


class Row(NamedTuple):
  init: Callable[[Any], Any]
  step: Callable[[Any, Any, Any], tuple[Any, Any]]


def build_row(name: str, batch_size: int, noise_multiplier: float,
              l2_norm_clip: float = L2_NORM_CLIP) -> Row:
  if name == "non_private":
    tx = _sgd()
    grad_fn = jax.grad(loss_fn)
  elif name in ("optax_dp_auto", "optax_dp_vmap"):
    tx = optax.chain(
        optax_dp.dp_aggregate(l2_norm_clip, noise_multiplier, jax.random.key(1),
                              expected_batch_size=batch_size),
        _sgd())
    grad_fn = (optax_dp.per_example_grads(loss_fn) if name == "optax_dp_vmap"
               else optax_dp.clipped_grads(loss_fn, l2_norm_clip, method="auto"))
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
    yield


def per_example_norms(params, batch):
  g = optax_dp.per_example_grads(loss_fn)(params, batch)
  return jnp.sqrt(sum(jnp.sum(l.reshape(l.shape[0], -1) ** 2, axis=1)
                      for l in jax.tree.leaves(g)))


def run_check(batch_size: int = 16, steps: int = 2) -> dict:
  """sigma = 0: optax_dp_auto and optax_dp_vmap must give the same params."""
  params0 = init_params()
  batch = make_batch(batch_size, seed=1)
  norms0 = jax.jit(per_example_norms)(params0, batch)
  median = float(jnp.median(norms0))
  results, failed = {}, False
  for clip in (L2_NORM_CLIP, median):
    n_clipped = int(jnp.sum(norms0 > clip))
    print(f"## --check: batch {batch_size}, noise_multiplier 0, {steps} steps, "
          f"C={clip:.4g} ({n_clipped}/{batch_size} examples clipped at step 1)")
    final = {}
    for name in ("optax_dp_vmap", "optax_dp_auto"):
      with _quiet_sigma0():
        row = build_row(name, batch_size, 0.0, clip)
        p, s = params0, row.init(params0)
        step = jax.jit(row.step)
        for _ in range(steps):
          p, s = step(p, s, batch)
      final[name] = p
    update = step_time._max_abs_diff(final["optax_dp_vmap"], params0)
    diff = step_time._max_abs_diff(final["optax_dp_auto"], final["optax_dp_vmap"])
    worst = max(
        ((jax.tree_util.keystr(k), float(jnp.max(jnp.abs(a - b))))
         for (k, a), b in zip(jax.tree_util.tree_flatten_with_path(
             final["optax_dp_auto"])[0], jax.tree.leaves(final["optax_dp_vmap"]))),
        key=lambda kv: kv[1])
    tol = 1e-3 * update
    ok = diff <= tol
    failed |= not ok
    print(f"  max|auto - vmap| = {diff:.2e} (worst leaf {worst[0]}), vmap "
          f"max|params - params0| = {update:.2e}, tolerance {tol:.1e}: "
          f"{'ok' if ok else 'MISMATCH'}")
    results[f"C={clip:.4g}"] = {
        "l2_norm_clip": clip, "examples_clipped": n_clipped,
        "max_abs_diff_auto_vmap": diff, "worst_leaf": worst[0],
        "max_abs_update_vmap": update, "tolerance": tol}
  if failed:
    print("CHECK FAILED")
    sys.exit(1)
  print("check passed: auto and vmap compute the same update\n", flush=True)
  return results


def _time(fn, *args, reps=5):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(1e3 * (time.perf_counter() - t0))
  return statistics.median(ts)


def run_profile(batch_size: int, reps: int = 5) -> dict:
  """Times the pieces of the book-keeping path (optax_dp._linen internals)."""
  from optax_dp import _linen  # pylint: disable=import-outside-toplevel
  params = init_params()
  batch = make_batch(batch_size)
  leaves, treedef = jax.tree.flatten(params)
  example0 = jax.tree.map(lambda x: x[0], batch)
  layers = _linen.discover(loss_fn, params, example0, False)
  example_loss, covered, uncovered = _linen.make_example_loss(
      loss_fn, layers, False, treedef, len(leaves))
  layer_params = [{n: leaves[i] for n, i in l.leaf_index.items()} for l in layers]
  zs = [jax.tree.map(lambda s: jnp.zeros((batch_size,) + s.shape, s.dtype),
                     l.out_struct) for l in layers]
  unc = [leaves[i] for i in uncovered]
  cov = [leaves[i] for i in covered]
  grad_fn = jax.value_and_grad(example_loss, argnums=(0, 3), has_aux=True)
  fwd_bwd = jax.jit(jax.vmap(grad_fn, in_axes=(None, None, None, 0, 0)))
  out = {"uncovered_leaves": len(uncovered), "layers": {}}
  print(f"## --profile, batch {batch_size}: {len(layers)} covered layers, "
        f"{len(uncovered)} uncovered leaves")
  out["non_private_grad_ms"] = _time(jax.jit(jax.grad(loss_fn)), params, batch,
                                     reps=reps)
  out["vmap_per_example_grads_ms"] = _time(
      jax.jit(optax_dp.per_example_grads(loss_fn)), params, batch, reps=reps)
  out["clipped_grads_auto_ms"] = _time(
      jax.jit(optax_dp.clipped_grads(loss_fn, L2_NORM_CLIP)), params, batch,
      reps=reps)
  out["forward_backward_to_layer_outputs_ms"] = _time(fwd_bwd, unc, cov,
                                                      layer_params, zs, batch,
                                                      reps=reps)
  print(f"  jax.grad (non-private)                  {out['non_private_grad_ms']:8.1f} ms")
  print(f"  per_example_grads (vmap)                {out['vmap_per_example_grads_ms']:8.1f} ms")
  print(f"  clipped_grads(auto), whole              {out['clipped_grads_auto_ms']:8.1f} ms")
  print(f"  vmapped fwd+bwd to layer outputs        "
        f"{out['forward_backward_to_layer_outputs_ms']:8.1f} ms")
  (_, (_, inputs)), (_, out_grads) = fwd_bwd(unc, cov, layer_params, zs, batch)
  c = jnp.full((batch_size,), 0.5)
  keep = jnp.ones((batch_size,), bool)
  for k, layer in enumerate(layers):
    def terms(lp, x, g, c, keep, layer=layer):
      sq, sums = _linen.layer_terms(layer, lp, x, g)
      return sq, sums(c, keep)
    ms = _time(jax.jit(terms), layer_params[k], inputs[k], out_grads[k], c, keep,
               reps=reps)
    name = "/".join(str(p) for p in layer.path)
    nparams = sum(int(np.prod(leaves[i].shape)) for i in layer.leaf_index.values())
    out["layers"][name] = {"kind": layer.kind, "type": type(layer.module).__name__,
                           "params": nparams, "ms": ms}
    print(f"  layer_terms {name:45s} {layer.kind:8s} "
          f"{type(layer.module).__name__:12s} {nparams:7d} params {ms:8.1f} ms")
  total = sum(v["ms"] for v in out["layers"].values())
  out["layer_terms_total_ms"] = total
  print(f"  layer_terms, all layers (each jitted alone) {total:8.1f} ms\n", flush=True)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--rows", default=",".join(ALL_ROWS))
  parser.add_argument("--json-out", default=None)
  parser.add_argument("--check", action="store_true")
  parser.add_argument("--profile", action="store_true",
                      help="time the book-keeping pieces per layer first")
  args = parser.parse_args(argv)
  rows = _common.parse_rows(parser, args, ALL_ROWS)

  info = step_time.versions()
  params0 = init_params()
  num_params = int(sum(x.size for x in jax.tree.leaves(params0)))
  header = (_common.jax_versions_header(info, jax_privacy=False)
            + f"transformer d={D_MODEL}, 2 blocks, 4 heads, "
            f"T={SEQ_LEN}, vocab {VOCAB}, {num_params} params; batch "
            f"{args.batch_size}, {args.rounds} rounds, C={L2_NORM_CLIP}, "
            f"sigma={NOISE_MULTIPLIER}"
            + _common.xla_flags_suffix(info)
            + _common.loadavg_suffix(info["loadavg_at_start"]))
  print(header, flush=True)

  check = run_check() if args.check else None
  profile = run_profile(args.batch_size) if args.profile else None

  batch = make_batch(args.batch_size)
  state, compiled, compile_s = {}, {}, {}
  for name in rows:
    row = build_row(name, args.batch_size, NOISE_MULTIPLIER)
    params = jax.tree.map(jnp.copy, params0)
    opt_state = row.init(params)
    t0 = time.perf_counter()
    compiled[name] = jax.jit(row.step, donate_argnums=(0, 1)).lower(
        params, opt_state, batch).compile()
    compile_s[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    state[name] = jax.block_until_ready(compiled[name](params, opt_state, batch))
    print(f"{name}: compiled in {compile_s[name]:.1f} s, warm-up step "
          f"{1e3 * (time.perf_counter() - t0):.0f} ms", flush=True)

  def run_step(name):
    params, opt_state = state[name]
    state[name] = jax.block_until_ready(compiled[name](params, opt_state, batch))

  times = _common.round_robin(rows, args.rounds, run_step, ms_format=".1f")
  summary = _common.summarize(times, "non_private", compile_s)
  table = _common.summary_table(
      f"Transformer step time, batch {args.batch_size} ({header})", summary,
      ms_format=".1f")
  print("\n" + table)

  if args.json_out:
    _common.write_json(
        args.json_out, versions=info, num_params=num_params,
        batch_size=args.batch_size, rounds=args.rounds,
        l2_norm_clip=L2_NORM_CLIP, noise_multiplier=NOISE_MULTIPLIER,
        rows=summary, check=check, profile=profile, markdown=table)


if __name__ == "__main__":
  main()
