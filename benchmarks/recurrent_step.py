"""Step time of one DP-SGD step on a small recurrent (GRU or LSTM) classifier.

Model (batch 64, sequence length 32): Flax Linen `nn.RNN(nn.GRUCell(
features=128))` (`--cell lstm`: `nn.LSTMCell(features=128)`) over float32
inputs (B, T, 32) drawn from N(0, 1), the last step's output into
`nn.Dense(10)`; mean softmax cross-entropy with random labels. Rows (the same
jitted, donated train step as step_time.py and transformer_step.py):

  non_private   jax.grad of the mean loss + optax.sgd(0.1, momentum=0.9)
  optax_dp_auto optax_dp.clipped_grads(loss_fn, C, method="auto") +
                chain(dp_aggregate(C, sigma, key, expected_batch_size=B), sgd)
  optax_dp_vmap optax_dp.per_example_grads(loss_fn) + the same chain

and the Flax NNX twin of the same model (`nnx.RNN(nnx.GRUCell(in_features=32,
hidden_features=128))` or `nnx.LSTMCell`, then `nnx.Linear(128, 10)`;
`nnx.Optimizer` steps as in step_time.py):

  nnx_non_private    nnx.grad of the mean loss, optimizer.update
  nnx_optax_dp_auto  optax_dp.clipped_grads(loss_fn, C) into the same
                     nnx.Optimizer with the dp_aggregate chain
  nnx_optax_dp_vmap  optax_dp.per_example_grads(loss_fn), likewise

C = 0.1, sigma = 1.34, rows round-robin; the NNX rows are also given as
ratios to nnx_non_private. The header line counts the rules of
`optax_dp.clipping_plan` for the Linen and the NNX model (which parameters
the book-keeping path covers, and which fall back to per-example gradients):
a recurrent cell's parameters are shared across time steps.

`--check`: sigma = 0, batch 16, two steps, at C = 0.1 and at C = the median
per-example norm (of each model): the params of optax_dp_auto and
optax_dp_vmap must match within 0.1% of the update size, and likewise
nnx_optax_dp_auto and nnx_optax_dp_vmap.

Usage:
  python benchmarks/recurrent_step.py --check --rounds 10 \
      --json-out benchmarks/results/recurrent_gru_b64.json
  python benchmarks/recurrent_step.py --cell lstm --check --rounds 10 \
      --json-out benchmarks/results/recurrent_lstm_b64.json
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings

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

CELLS = ("gru", "lstm")
IN_FEATURES = 32
HIDDEN = 128
SEQ_LEN = 32          # the default --seq-len
NUM_CLASSES = 10
ALL_ROWS = _jax_common.OPTAX_DP_ROWS + _jax_common.NNX_ROWS


class RecurrentClassifier(nn.Module):
  """nn.RNN of a GRU or LSTM cell, the last step's output into Dense(10)."""
  cell: str = "gru"

  @nn.compact
  def __call__(self, x):                            # (B, T, IN_FEATURES)
    cell = {"gru": nn.GRUCell, "lstm": nn.LSTMCell}[self.cell](features=HIDDEN)
    h = nn.RNN(cell)(x)                             # (B, T, HIDDEN)
    return nn.Dense(NUM_CLASSES)(h[:, -1])


def nnx_model(cell: str, seed: int = 0):
  """The same classifier as a Flax NNX module (flax.nnx imported lazily)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class NNXRecurrentClassifier(nnx.Module):
    def __init__(self, rngs):
      cell_cls = {"gru": nnx.GRUCell, "lstm": nnx.LSTMCell}[cell]
      self.rnn = nnx.RNN(cell_cls(in_features=IN_FEATURES,
                                  hidden_features=HIDDEN, rngs=rngs))
      self.head = nnx.Linear(HIDDEN, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
      return self.head(self.rnn(x)[:, -1])

  return NNXRecurrentClassifier(nnx.Rngs(seed))


def nnx_loss_fn(model, batch):
  """The same loss for the NNX rows: mean cross-entropy of `model(inputs)`."""
  inputs, labels = batch
  return optax.softmax_cross_entropy_with_integer_labels(model(inputs), labels).mean()


@functools.cache
def loss_fn(cell: str) -> _jax_common.LossFn:
  """The Linen model's mean loss `loss(params, (inputs, labels))`."""
  return _jax_common.cross_entropy_loss(RecurrentClassifier(cell))


def make_batch(batch_size: int, seq_len: int, seed: int = 0):
  """Random float32 inputs (B, seq_len, IN_FEATURES) ~ N(0, 1) and labels."""
  rng = np.random.default_rng(seed)
  inputs = rng.standard_normal((batch_size, seq_len, IN_FEATURES),
                               dtype=np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=(batch_size,), dtype=np.int32)
  return jnp.asarray(inputs), jnp.asarray(labels)


def init_params(cell: str, seed: int = 0):
  """The Linen model's params (their shapes do not depend on T)."""
  return RecurrentClassifier(cell).init(
      jax.random.key(seed), jnp.zeros((1, 1, IN_FEATURES)))["params"]


def nnx_state(cell: str):
  """The initial `nnx.state` of the NNX model, what every NNX row starts from."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return nnx.state(nnx_model(cell))


def build_row(name: str, cell: str, batch_size: int, noise_multiplier: float,
              l2_norm_clip: float = _common.L2_NORM_CLIP) -> _jax_common.Row:
  """One of ALL_ROWS on the recurrent classifier (as in step_time.py)."""
  if name in _jax_common.NNX_ROWS:
    return _jax_common.nnx_row(name, lambda: nnx_model(cell), nnx_loss_fn,
                               batch_size, noise_multiplier, l2_norm_clip)[0]
  return _jax_common.optax_dp_row(name, loss_fn(cell), batch_size,
                                  noise_multiplier, l2_norm_clip)


def plans(cell: str, batch) -> dict[str, dict[str, str]]:
  """`optax_dp.clipping_plan` of the Linen and the NNX model on `batch`."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return {"linen": optax_dp.clipping_plan(loss_fn(cell), init_params(cell), batch),
          "nnx": optax_dp.clipping_plan(nnx_loss_fn, nnx_model(cell), batch,
                                        wrt=nnx.Param)}


def run_check(cell: str, seq_len: int, batch_size: int = 16,
              steps: int = 2) -> dict:
  """sigma = 0: auto and vmap must give the same params, in Linen and in NNX.

  Each model's clip norms come from its own per-example norms at init (the
  two models are initialised differently).
  """
  batch = make_batch(batch_size, seq_len, seed=1)
  params0 = init_params(cell)
  nnx_loss, nnx_params = _jax_common.nnx_param_loss(nnx_model(cell), nnx_loss_fn)
  models = {
      "linen": (params0, _jax_common.OPTAX_DP_ROWS[1:],
                _jax_common.check_clips(loss_fn(cell), params0, batch,
                                        _common.L2_NORM_CLIP)),
      "nnx": (nnx_state(cell),
              _jax_common.NNX_ROWS[1:],
              _jax_common.check_clips(nnx_loss, nnx_params, batch,
                                      _common.L2_NORM_CLIP))}
  results, ok = {}, True
  for label, (start, rows, clips) in models.items():
    results[label], model_ok = _jax_common.auto_vmap_check(
        lambda name, clip: build_row(name, cell, batch_size, 0.0, clip), start,
        batch, clips, batch_size=batch_size, steps=steps, rows=rows,
        label="Linen" if label == "linen" else "NNX")
    ok &= model_ok
  return _common.finish_check(results, not ok, "auto and vmap (Linen and NNX)")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cell", choices=CELLS, default="gru")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--rows", default=",".join(ALL_ROWS),
                      help=f"comma list from {','.join(ALL_ROWS)}")
  parser.add_argument("--json-out", default=None)
  parser.add_argument("--check", action="store_true",
                      help="first verify (sigma=0, batch 16) that the auto and "
                      "vmap rows compute the same updated params")
  args = parser.parse_args(argv)
  rows = _common.parse_rows(parser, args, ALL_ROWS)
  if args.seq_len < 1:
    parser.error("--seq-len must be >= 1")
  # The header has the clipping plan; say which parameters fall back once,
  # not at every trace.
  warnings.filterwarnings("once", category=optax_dp.PerExampleFallbackWarning)

  info = _jax_common.versions()
  params0 = init_params(args.cell)
  num_params = int(sum(x.size for x in jax.tree.leaves(params0)))
  batch = make_batch(args.batch_size, args.seq_len)
  plan = plans(args.cell, batch)
  cell_name = {"gru": "GRUCell", "lstm": "LSTMCell"}[args.cell]
  header = _jax_common.header(
      info, f"RNN({cell_name}({HIDDEN})) over (B, T={args.seq_len}, "
      f"{IN_FEATURES}) + Dense({NUM_CLASSES}) on the last step, {num_params} "
      f"params; plan: Linen {_jax_common.plan_summary(plan['linen'])}, NNX "
      f"{_jax_common.plan_summary(plan['nnx'])}; batch {args.batch_size}, "
      f"{args.rounds} rounds, C={_common.L2_NORM_CLIP}, "
      f"sigma={_common.NOISE_MULTIPLIER}", jax_privacy=False)
  print(header, flush=True)
  _common.print_start_load_warning()

  check = run_check(args.cell, args.seq_len) if args.check else None

  summary = _jax_common.time_rows(
      rows, lambda name: build_row(name, args.cell, args.batch_size,
                                   _common.NOISE_MULTIPLIER),
      params0, batch, args.rounds, ms_format=".1f",
      params_of=lambda name: (
          nnx_state(args.cell) if name in _jax_common.NNX_ROWS else params0))
  table, load = _jax_common.timing_tables(
      f"Recurrent ({args.cell}) step time, batch {args.batch_size} ({header})",
      summary, header, ms_format=".1f")

  if args.json_out:
    _common.write_json(
        args.json_out, versions=info, cell=args.cell, num_params=num_params,
        batch_size=args.batch_size, seq_len=args.seq_len,
        in_features=IN_FEATURES, hidden=HIDDEN, rounds=args.rounds,
        l2_norm_clip=_common.L2_NORM_CLIP,
        noise_multiplier=_common.NOISE_MULTIPLIER, clipping_plan=plan,
        rows=summary, load=load, check=check, markdown=table)


if __name__ == "__main__":
  main()
