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

and the Flax NNX twin of the same model (nnx.Embed, nnx.MultiHeadAttention,
nnx.LayerNorm, nnx.Linear; `nnx.Optimizer` steps as in step_time.py):

  nnx_non_private    nnx.grad of the mean loss, optimizer.update
  nnx_optax_dp_auto  optax_dp.clipped_grads(loss_fn, C) into the same
                     nnx.Optimizer with the dp_aggregate chain
  nnx_optax_dp_vmap  optax_dp.per_example_grads(loss_fn), likewise

C = 0.1, sigma = 1.34, rows round-robin; the NNX rows are also given as
ratios to nnx_non_private. What the book-keeping path does with
this model: Dense layers (MLP, head) are "dense" layers (T = 64 positions);
Embed, the positional Embed, LayerNorm and the attention's four DenseGeneral
projections are "generic" layers (a vmapped VJP of that layer alone). In
NNX: Linear and the attention's LinearGeneral projections are "dense", both
Embeds "embed", LayerNorm "generic" (`optax_dp.clipping_plan` shows it).

`--check`: sigma = 0, batch 16, two steps, at C = 0.1 and at C = the median
per-example norm: the params of optax_dp_auto and optax_dp_vmap must match
(within 0.1% of the update size). `--profile` times, each jitted alone, the
gradient functions behind the rows: jax.grad, optax_dp.per_example_grads and
optax_dp.value_and_clipped_grads with method "vmap", "ghost" and "auto"
(public API only; a diagnostic).

Usage:
  python benchmarks/transformer_step.py --check --rounds 10 \
      --json-out benchmarks/results/transformer_b64.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# First: _common reads the load average before JAX is imported.
import _common  # pylint: disable=wrong-import-position

import flax.linen as nn  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

import optax_dp  # pylint: disable=wrong-import-position

import _jax_common  # pylint: disable=wrong-import-position

VOCAB = 1000
SEQ_LEN = 64
D_MODEL = 64
NUM_CLASSES = 10
ALL_ROWS = _jax_common.OPTAX_DP_ROWS + _jax_common.NNX_ROWS


class Block(nn.Module):
  """Pre-LN transformer block: self-attention and an MLP, each residual."""

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
  """Token + learned positional Embed, 2 Blocks, LayerNorm, mean-pool, Dense."""

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


def nnx_transformer(seed: int = 0):
  """The same Transformer as a Flax NNX module (flax imported lazily)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class NNXBlock(nnx.Module):
    def __init__(self, rngs):
      self.ln1 = nnx.LayerNorm(D_MODEL, rngs=rngs)
      self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=D_MODEL,
                                         qkv_features=D_MODEL, decode=False, rngs=rngs)
      self.ln2 = nnx.LayerNorm(D_MODEL, rngs=rngs)
      self.up = nnx.Linear(D_MODEL, 128, rngs=rngs)
      self.down = nnx.Linear(128, D_MODEL, rngs=rngs)

    def __call__(self, x):
      x = x + self.attn(self.ln1(x))
      return x + self.down(nnx.gelu(self.up(self.ln2(x))))

  class NNXTransformer(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(VOCAB, D_MODEL, rngs=rngs)
      self.pos_embed = nnx.Embed(SEQ_LEN, D_MODEL, rngs=rngs)
      self.blocks = nnx.List([NNXBlock(rngs) for _ in range(2)])
      self.ln = nnx.LayerNorm(D_MODEL, rngs=rngs)
      self.head = nnx.Linear(D_MODEL, NUM_CLASSES, rngs=rngs)

    def __call__(self, tokens):
      x = self.embed(tokens) + self.pos_embed(jnp.arange(tokens.shape[1]))[None]
      for block in self.blocks:
        x = block(x)
      return self.head(self.ln(x).mean(axis=1))

  return NNXTransformer(nnx.Rngs(seed))


def nnx_loss_fn(model, batch):
  """The same loss for the NNX rows: mean cross-entropy of `model(tokens)`."""
  tokens, labels = batch
  return optax.softmax_cross_entropy_with_integer_labels(model(tokens), labels).mean()


def _nnx_row(name, batch_size, noise_multiplier, l2_norm_clip=_common.L2_NORM_CLIP):
  return _jax_common.nnx_row(name, nnx_transformer, nnx_loss_fn, batch_size,
                             noise_multiplier, l2_norm_clip)


def nnx_state(name: str, batch_size: int, noise_multiplier: float):
  """The initial `nnx.state` of an NNX row's model (peak_memory.py's rows)."""
  return _nnx_row(name, batch_size, noise_multiplier)[1]


MODEL = Transformer()
loss_fn = _jax_common.cross_entropy_loss(MODEL)   # batch = (tokens, labels)


def make_batch(batch_size: int, seed: int = 0):
  """Random tokens (B, SEQ_LEN) and labels."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, size=(batch_size, SEQ_LEN), dtype=np.int32)
  labels = rng.integers(0, NUM_CLASSES, size=(batch_size,), dtype=np.int32)
  return jnp.asarray(tokens), jnp.asarray(labels)


def init_params(seed: int = 0):
  return MODEL.init(jax.random.key(seed),
                    jnp.zeros((1, SEQ_LEN), jnp.int32))["params"]


def build_row(name: str, batch_size: int, noise_multiplier: float,
              l2_norm_clip: float = _common.L2_NORM_CLIP) -> _jax_common.Row:
  """One of ALL_ROWS on the transformer (as in step_time.py)."""
  if name in _jax_common.NNX_ROWS:
    return _nnx_row(name, batch_size, noise_multiplier, l2_norm_clip)[0]
  return _jax_common.optax_dp_row(name, loss_fn, batch_size, noise_multiplier,
                                  l2_norm_clip)


def run_check(batch_size: int = 16, steps: int = 2) -> dict:
  """sigma = 0: optax_dp_auto and optax_dp_vmap must give the same params."""
  params0 = init_params()
  batch = make_batch(batch_size, seed=1)
  results, ok = _jax_common.auto_vmap_check(
      lambda name, clip: build_row(name, batch_size, 0.0, clip), params0, batch,
      _jax_common.check_clips(loss_fn, params0, batch, _common.L2_NORM_CLIP),
      batch_size=batch_size, steps=steps)
  return _common.finish_check(results, not ok, "auto and vmap")


def _time(fn, *args, reps=5):
  """Median ms of `reps` calls of `fn(*args)`, after one untimed call."""
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(1e3 * (time.perf_counter() - t0))
  return statistics.median(ts)


def _profile_fns() -> dict:
  """The gradient functions of the rows, by the name the profile prints."""
  clip = _common.L2_NORM_CLIP
  fns = {"non_private_grad": jax.grad(loss_fn),
         "per_example_grads": optax_dp.per_example_grads(loss_fn)}
  for method in ("vmap", "ghost", "auto"):
    fns[f"clipped_grads_{method}"] = optax_dp.value_and_clipped_grads(
        loss_fn, clip, method=method)
  return fns


def run_profile(batch_size: int, reps: int = 5) -> dict:
  """Times each gradient function of the rows, jitted alone (public API).

  `clipped_grads_ghost` raises (and is reported as not run) if some
  parameter is not owned by a layer the book-keeping path covers; with this
  model every parameter is.
  """
  params = init_params()
  batch = make_batch(batch_size)
  print(f"## --profile, batch {batch_size}: gradient functions, each jitted "
        f"alone, median of {reps}")
  out = {}
  for name, fn in _profile_fns().items():
    try:
      out[f"{name}_ms"] = _time(jax.jit(fn), params, batch, reps=reps)
    except ValueError as e:   # method="ghost" with uncovered parameters
      out[f"{name}_ms"] = None
      print(f"  {name:40s} not run: {str(e).splitlines()[0]}")
      continue
    print(f"  {name:40s} {out[f'{name}_ms']:8.1f} ms")
  print(flush=True)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--rows", default=",".join(ALL_ROWS))
  parser.add_argument("--json-out", default=None)
  parser.add_argument("--check", action="store_true")
  parser.add_argument("--profile", action="store_true",
                      help="first time each gradient function (jax.grad, "
                      "per_example_grads, value_and_clipped_grads vmap/ghost/"
                      "auto) jitted alone")
  args = parser.parse_args(argv)
  rows = _common.parse_rows(parser, args, ALL_ROWS)

  info = _jax_common.versions()
  params0 = init_params()
  num_params = int(sum(x.size for x in jax.tree.leaves(params0)))
  header = _jax_common.header(
      info, f"transformer d={D_MODEL}, 2 blocks, 4 heads, T={SEQ_LEN}, vocab "
      f"{VOCAB}, {num_params} params; batch {args.batch_size}, {args.rounds} "
      f"rounds, C={_common.L2_NORM_CLIP}, sigma={_common.NOISE_MULTIPLIER}",
      jax_privacy=False)
  print(header, flush=True)
  _common.print_start_load_warning()

  check = run_check() if args.check else None
  profile = run_profile(args.batch_size) if args.profile else None

  summary = _jax_common.time_rows(
      rows, lambda name: build_row(name, args.batch_size, _common.NOISE_MULTIPLIER),
      params0, make_batch(args.batch_size), args.rounds, ms_format=".1f",
      params_of=lambda name: (
          _nnx_row(name, args.batch_size, _common.NOISE_MULTIPLIER)[1]
          if name in _jax_common.NNX_ROWS else params0))
  table, load = _jax_common.timing_tables(
      f"Transformer step time, batch {args.batch_size} ({header})", summary, header,
      ms_format=".1f")

  if args.json_out:
    _common.write_json(
        args.json_out, versions=info, num_params=num_params,
        batch_size=args.batch_size, rounds=args.rounds,
        l2_norm_clip=_common.L2_NORM_CLIP,
        noise_multiplier=_common.NOISE_MULTIPLIER,
        rows=summary, load=load, check=check, profile=profile, markdown=table)


if __name__ == "__main__":
  main()
