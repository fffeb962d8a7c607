"""Step time of the Shakespeare language models: private against non-private.

The causal character transformer of `examples/lm_models.py` at the recipes'
size (`--features 128 --layers 2 --heads 4`, vocabulary 80), next-character
loss on random windows of `--length + 1` characters, SGD with momentum after
the DP part (`_jax_common.sgd`), C = 0.1, sigma = 1.34. Rows, round-robin in
one process:

  non_private / optax_dp_auto            Linen (LinenCharTransformer), jax.grad
                                         against clipped_grads(method="auto")
  nnx_non_private / nnx_optax_dp_auto    NNX (CharTransformer), nnx.grad against
                                         clipped_grads, through nnx.Optimizer
  nnx_lora_non_private / nnx_lora_auto   the NNX model with rank-8 LoRA adapters
                                         on its MLP and head (lm_models.add_lora),
                                         only the adapters trained
                                         (wrt=nnx.LoRAParam)

Ratios: Linen rows to `non_private`, NNX rows to `nnx_non_private`, LoRA rows
to `nnx_lora_non_private` (medians and the median of per-round ratios).

Usage:
  python benchmarks/lm_step.py --batch-size 512 --length 64 --rounds 5 \\
      --json-out benchmarks/results/lm_b512_t64.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import _common  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

import optax_dp  # pylint: disable=wrong-import-position

import _jax_common  # pylint: disable=wrong-import-position
import lm_models  # pylint: disable=wrong-import-position

VOCAB = 80
LORA_ROWS = ("nnx_lora_non_private", "nnx_lora_auto")
ALL_ROWS = ("non_private", "optax_dp_auto", "nnx_non_private", "nnx_optax_dp_auto") + LORA_ROWS


def config(length: int) -> lm_models.LMConfig:
  return lm_models.LMConfig(vocab_size=VOCAB, length=length, features=128, heads=4, layers=2)


def make_batch(batch_size: int, length: int) -> jax.Array:
  return jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (batch_size, length + 1)),
                     jnp.uint8)


def nnx_loss(model, window):
  return lm_models.nnx_loss(model, window)[0]


def linen_setup(length: int):
  model = lm_models.LinenCharTransformer(config(length))
  params = model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))["params"]

  def loss(params, window):
    return lm_models.next_char_loss(
        model.apply({"params": params}, window[:, :-1].astype(jnp.int32)), window)
  return loss, params


def lora_row(name: str, length: int, batch_size: int):
  """A LoRA row and its model state: only the adapters trained."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  model = lm_models.add_lora(lm_models.CharTransformer(config(length), rngs=nnx.Rngs(0)), 8,
                             rngs=nnx.Rngs(1))
  wrt = nnx.LoRAParam
  if name == "nnx_lora_non_private":
    tx = _jax_common.sgd()
    grad_fn = lambda m, b: nnx.grad(nnx_loss, argnums=nnx.DiffState(0, wrt))(m, b)  # noqa: E731
  else:
    tx = optax.chain(optax_dp.dp_aggregate(_common.L2_NORM_CLIP, _common.NOISE_MULTIPLIER,
                                           _jax_common.row_key(name),
                                           expected_batch_size=batch_size),
                     _jax_common.sgd())
    grad_fn = optax_dp.clipped_grads(nnx_loss, _common.L2_NORM_CLIP, wrt=wrt)
  graphdef, state0 = nnx.split(model)
  opt_graphdef = nnx.graphdef(nnx.Optimizer(model, tx, wrt=wrt))

  def init(state):
    return nnx.state(nnx.Optimizer(nnx.merge(graphdef, state), tx, wrt=wrt))

  def step(state, opt_state, batch):
    model = nnx.merge(graphdef, state)
    optimizer = nnx.merge(opt_graphdef, opt_state)
    optimizer.update(model, grad_fn(model, batch))
    return nnx.state(model), nnx.state(optimizer)

  return _jax_common.Row(init, step), state0


# peak_memory.py's `--model lm`: the rows at the recipes' length, T=64.
PEAK_MEMORY_LENGTH = 64


def init_params():
  return linen_setup(PEAK_MEMORY_LENGTH)[1]


def make_peak_batch(batch_size: int) -> jax.Array:
  return make_batch(batch_size, PEAK_MEMORY_LENGTH)


def _built_row(name: str, batch_size: int, noise_multiplier: float):
  """(Row, initial state or params) of one row (peak_memory.py's rows)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  if name in LORA_ROWS:
    return lora_row(name, PEAK_MEMORY_LENGTH, batch_size)
  if name in _jax_common.NNX_ROWS:
    make_nnx = lambda: lm_models.CharTransformer(  # noqa: E731
        config(PEAK_MEMORY_LENGTH), rngs=nnx.Rngs(0))
    return _jax_common.nnx_row(name, make_nnx, nnx_loss, batch_size, noise_multiplier,
                               _common.L2_NORM_CLIP)
  loss, params = linen_setup(PEAK_MEMORY_LENGTH)
  return (_jax_common.optax_dp_row(name, loss, batch_size, noise_multiplier,
                                   _common.L2_NORM_CLIP), params)


def build_row(name: str, batch_size: int, noise_multiplier: float):
  return _built_row(name, batch_size, noise_multiplier)[0]


def nnx_state(name: str, batch_size: int, noise_multiplier: float):
  return _built_row(name, batch_size, noise_multiplier)[1]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch-size", type=int, default=512)
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--rows", default=",".join(ALL_ROWS))
  parser.add_argument("--json-out", default=None)
  args = parser.parse_args(argv)
  rows = _common.parse_rows(parser, args, ALL_ROWS)
  from flax import nnx  # pylint: disable=import-outside-toplevel

  loss, params0 = linen_setup(args.length)
  make_nnx = lambda: lm_models.CharTransformer(config(args.length), rngs=nnx.Rngs(0))  # noqa
  info = _jax_common.versions()
  batch = make_batch(args.batch_size, args.length)
  plan = optax_dp.clipping_plan(nnx_loss, make_nnx(), batch[:2])
  header = _jax_common.header(
      info, f"char transformer d=128, 2 blocks, 4 heads, T={args.length}, vocab {VOCAB}, "
      f"{sum(x.size for x in jax.tree.leaves(params0))} params; batch {args.batch_size}, "
      f"{args.rounds} rounds, C={_common.L2_NORM_CLIP}, sigma={_common.NOISE_MULTIPLIER}",
      jax_privacy=False)
  print(header, flush=True)
  print("NNX clipping plan:", _jax_common.plan_summary(plan), flush=True)
  _common.print_start_load_warning()

  built = {}

  def build(name):
    if name in LORA_ROWS:
      built[name] = lora_row(name, args.length, args.batch_size)
    elif name in _jax_common.NNX_ROWS:
      built[name] = _jax_common.nnx_row(name, make_nnx, nnx_loss, args.batch_size,
                                        _common.NOISE_MULTIPLIER, _common.L2_NORM_CLIP)
    else:
      return _jax_common.optax_dp_row(name, loss, args.batch_size, _common.NOISE_MULTIPLIER,
                                      _common.L2_NORM_CLIP)
    return built[name][0]

  def params_of(name):
    if name in LORA_ROWS or name in _jax_common.NNX_ROWS:
      if name not in built:
        build(name)
      return built[name][1]
    return params0

  summary = _jax_common.time_rows(rows, build, params0, batch, args.rounds, ms_format=".0f",
                                  params_of=params_of)
  table, load = _jax_common.timing_tables(
      f"Language-model step time, batch {args.batch_size}, T={args.length} ({header})",
      summary, header, ms_format=".0f")
  ratios = {}
  for row, base in (("optax_dp_auto", "non_private"), ("nnx_optax_dp_auto", "nnx_non_private"),
                    ("nnx_lora_auto", "nnx_lora_non_private")):
    if row in summary and base in summary:
      a, b = summary[row]["times_ms"], summary[base]["times_ms"]
      ratios[row] = {"baseline": base,
                     "ratio_of_medians": statistics.median(a) / statistics.median(b),
                     "median_round_ratio": statistics.median(x / y for x, y in zip(a, b)),
                     "ratio_of_mins": min(a) / min(b)}
      print(f"{row} / {base}: medians {ratios[row]['ratio_of_medians']:.3f}, per-round "
            f"{ratios[row]['median_round_ratio']:.3f}, mins {ratios[row]['ratio_of_mins']:.3f}")
  if args.json_out:
    _common.write_json(args.json_out, versions=info, batch_size=args.batch_size,
                       length=args.length, rounds=args.rounds, rows=summary, ratios=ratios,
                       plan=plan, load=load, markdown=table)


if __name__ == "__main__":
  main()
