"""Where the Shakespeare language model's private step spends its time, by layer kind.

`lm_step.py` times whole steps. This script splits the clipping cost of the
Linen character transformer (`lm_step.linen_setup`, d=128, 2 blocks) by the
kind of layer that holds the parameters: for each kind it differentiates only
that kind's parameters (the others held fixed in a closure) and times, in one
process, `jax.grad` against `optax_dp.clipped_grads` of the same function
(jitted, minimum over `--calls` calls, `--rounds` interleaved rounds). The
difference is what book-keeping that kind costs; the plain backward pass
differs between kinds (it stops at the earliest parameter differentiated), so
compare each kind's two columns, not kinds' baselines. The whole model's
`jax.grad`, `clipped_grads` and `clipped_grads` + `dp_aggregate` come first.

Usage:
  python benchmarks/lm_layers.py --batch-size 512 --length 64 \\
      --json-out benchmarks/results/lm_layers_b512_t64.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import _common  # pylint: disable=wrong-import-position

import flax  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position

import optax_dp  # pylint: disable=wrong-import-position

import _jax_common  # pylint: disable=wrong-import-position
import lm_step  # pylint: disable=wrong-import-position

# Each kind: a predicate on a parameter's path in the Linen params.
KINDS = {
    "embeddings (embed rule)": lambda k: k[-1] == "embedding",
    "attention query/key/value (dense)": lambda k: any(x in ("query", "key", "value") for x in k),
    "attention out (dense)": lambda k: "out" in k,
    "MLP Dense (dense)": lambda k: k[0].startswith("_LinenBlock") and k[1].startswith("Dense"),
    "LayerNorm (norm)": lambda k: any(x.startswith("LayerNorm") for x in k),
}


def _min_ms(fn, args, calls: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * min(times)


def _subset_loss(loss, flat, pred):
  """(loss of the kind's params alone, those params) with the rest fixed."""
  rest = {k: v for k, v in flat.items() if not pred(k)}
  sub = flax.traverse_util.unflatten_dict({k: v for k, v in flat.items() if pred(k)})

  def subset_loss(params, batch):
    merged = {**rest, **flax.traverse_util.flatten_dict(params)}
    return loss(flax.traverse_util.unflatten_dict(merged), batch)
  return subset_loss, sub


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch-size", type=int, default=512)
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--calls", type=int, default=5)
  parser.add_argument("--json-out", default=None)
  args = parser.parse_args(argv)
  loss, params = lm_step.linen_setup(args.length)
  batch = lm_step.make_batch(args.batch_size, args.length)
  clip, sigma = _common.L2_NORM_CLIP, _common.NOISE_MULTIPLIER
  info = _jax_common.versions()
  print(_jax_common.header(
      info, f"Linen char transformer d=128, 2 blocks, T={args.length}; batch "
      f"{args.batch_size}, {args.rounds} rounds of min over {args.calls} calls", jax_privacy=False),
      flush=True)
  _common.print_start_load_warning()
  aggregate = optax_dp.dp_aggregate(clip, sigma, jax.random.key(1),
                                    expected_batch_size=args.batch_size)
  agg_state = aggregate.init(params)
  clipped = optax_dp.clipped_grads(loss, clip)
  cases = {"whole model": (jax.jit(jax.grad(loss)), jax.jit(clipped), params)}
  flat = flax.traverse_util.flatten_dict(params)
  for kind, pred in KINDS.items():
    subset_loss, sub = _subset_loss(loss, flat, pred)
    cases[kind] = (jax.jit(jax.grad(subset_loss)),
                   jax.jit(optax_dp.clipped_grads(subset_loss, clip)), sub)
  with_noise = jax.jit(lambda p, b: aggregate.update(clipped(p, b), agg_state, p)[0])
  rows: dict = {}
  for _ in range(args.rounds):
    for kind, (grad_fn, clipped_fn, p) in cases.items():
      row = rows.setdefault(kind, {"grad_ms": [], "clipped_ms": [], "params": int(
          sum(x.size for x in jax.tree.leaves(p)))})
      row["grad_ms"].append(_min_ms(grad_fn, (p, batch), args.calls))
      row["clipped_ms"].append(_min_ms(clipped_fn, (p, batch), args.calls))
    rows["whole model"].setdefault("with_dp_aggregate_ms", []).append(
        _min_ms(with_noise, (params, batch), args.calls))
  lines = []
  for kind, row in rows.items():
    g, c = min(row["grad_ms"]), min(row["clipped_ms"])
    row.update(grad_min_ms=g, clipped_min_ms=c, extra_ms=c - g, ratio=c / g)
    lines.append([kind, str(row["params"]), f"{g:.0f}", f"{c:.0f}", f"{c - g:+.0f}", f"{c / g:.2f}"])
  whole = rows["whole model"]
  lines.append(["whole model, clipped_grads + dp_aggregate", str(whole["params"]),
                f"{whole['grad_min_ms']:.0f}", f"{min(whole['with_dp_aggregate_ms']):.0f}",
                f"{min(whole['with_dp_aggregate_ms']) - whole['grad_min_ms']:+.0f}",
                f"{min(whole['with_dp_aggregate_ms']) / whole['grad_min_ms']:.2f}"])
  table = _common.markdown_table(
      ["parameters differentiated", "params", "jax.grad ms", "clipped_grads ms", "extra ms",
       "ratio"], lines)
  load = _common.load_record()
  print(table)
  print(_common.load_line(load))
  if args.json_out:
    _common.write_json(args.json_out, versions=info, batch_size=args.batch_size,
                       length=args.length, rounds=args.rounds, calls=args.calls, rows=rows,
                       plan=optax_dp.clipping_plan(loss, params, batch[:2]), load=load,
                       markdown=table)


if __name__ == "__main__":
  main()
