"""Private against non-private step of the language model with its parameters
sharded over devices (data parallel, FSDP, tensor parallel), under plain
`jax.jit` with the user's shardings.

The Linen causal character transformer of `examples/lm_models.py` (d=128 or
`--features`, 2
blocks, 4 heads, vocabulary 80), next-character loss on random windows, Adam
after the DP part. Each layout is a mesh of Auto axes over all devices; the
parameters are placed by the user's rule (FSDP: every leaf's largest
dimension divisible by the 'fsdp' size split over 'fsdp'; tensor parallel:
its last divisible dimension over 'model'), the batch over ('data', 'fsdp')
or 'data'. Per layout, in one process, the private and the non-private steps
alternate round by round (`_common.round_robin`); the ratio is the median of
per-round ratios. Memory per device: XLA's memory analysis of each compiled
step (argument and temporary bytes). Communication: the collectives of each
compiled step's HLO and the bytes of their results per device
(`_jax_common.collective_bytes`).

On a CPU, simulate the devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python benchmarks/sharded_step.py --rounds 5 \\
      --json-out benchmarks/results/sharded_step_b64_t64.json

With `--rss`, each (layout, step) runs instead in a process of its own under
`/usr/bin/time -v`: its maximum resident set size (all simulated devices
together: one process holds them all).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import _common  # pylint: disable=wrong-import-position
import _jax_common  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position
from jax.sharding import AxisType, NamedSharding  # pylint: disable=wrong-import-position

import optax_dp  # pylint: disable=wrong-import-position

import lm_models  # pylint: disable=wrong-import-position

VOCAB = 80


def layouts(devices: int) -> dict[str, tuple[tuple[int, int], tuple[str, str]]]:
  """name -> (mesh shape, axis names), over all devices ("1 device": the
  first device alone, the baseline the sharded ratios are read against)."""
  out = {"1 device": ((1, 1), ("data", "fsdp")), "data": ((devices, 1), ("data", "fsdp"))}
  for n in (2, 4, 8):
    if devices % n == 0 and n <= devices:
      out[f"fsdp={n}"] = ((devices // n, n), ("data", "fsdp"))
  if devices % 2 == 0 and devices >= 2:
    out["model=2"] = ((devices // 2, 2), ("data", "model"))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--features", type=int, default=128, help="the model's width d")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--json-out", default=None)
  parser.add_argument("--rss", action="store_true",
                      help="instead: each (layout, step) in a process of its own under "
                           "/usr/bin/time -v, its maximum resident set size")
  parser.add_argument("--only", nargs=2, metavar=("LAYOUT", "STEP"),
                      help="(--rss's worker) compile and run one layout's one step "
                           "(non_private or private) --steps times, print RESULT")
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args(argv)
  if args.rss:
    return measure_rss(args)
  devices = jax.device_count()
  config = lm_models.LMConfig(vocab_size=VOCAB, length=args.length, features=args.features,
                              heads=4, layers=2)
  model = lm_models.LinenCharTransformer(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, args.length), jnp.int32))["params"]

  def loss(p, w):
    return lm_models.next_char_loss(model.apply({"params": p}, w[:, :-1]), w)

  clip, sigma = _common.L2_NORM_CLIP, _common.NOISE_MULTIPLIER
  private_tx = optax.chain(optax_dp.dp_aggregate(clip, sigma, key=0,
                                                 expected_batch_size=args.batch_size),
                           optax.adam(1e-3))
  plain_tx = optax.adam(1e-3)
  grad_fn = optax_dp.clipped_grads(loss, clip)

  def private(params, opt_state, w, mask):
    updates, opt_state = private_tx.update(grad_fn(params, w, mask), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def non_private(params, opt_state, w, mask):
    del mask
    grads = jax.grad(lambda p: loss(p, w))(params)
    updates, opt_state = plain_tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  windows = np.random.default_rng(0).integers(0, VOCAB, (args.batch_size, args.length + 1))
  windows = windows.astype(np.int32)
  mask = np.ones((args.batch_size,), bool)
  header = (f"char transformer d={args.features}, 2 blocks, 4 heads, T={args.length}, "
            f"{sum(x.size for x in jax.tree.leaves(params))} params; batch {args.batch_size}, "
            f"{devices} devices ({jax.devices()[0].platform}), {args.rounds} rounds, "
            f"C={clip}, sigma={sigma}")
  if args.only:
    return run_only(args, params, windows, mask, {"non_private": (non_private, plain_tx),
                                                  "private": (private, private_tx)})
  print(header, flush=True)
  _common.print_start_load_warning()
  results = {}
  for name, (shape, names) in layouts(devices).items():
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * 2,
                         devices=jax.devices()[:shape[0] * shape[1]])
    p = lm_models.shard_params(params, mesh)   # the user's layout
    rows = NamedSharding(mesh, lm_models.batch_spec(mesh))
    w, m = jax.device_put(windows, rows), jax.device_put(mask, rows)
    compiled, state, memory, collectives = {}, {}, {}, {}
    for row, fn, tx in (("non_private", non_private, plain_tx), ("private", private, private_tx)):
      state[row] = (p, jax.jit(tx.init)(p))
      compiled[row] = jax.jit(fn).lower(*state[row], w, m).compile()
      analysis = compiled[row].memory_analysis()
      memory[row] = {"argument_bytes": analysis.argument_size_in_bytes,
                     "temp_bytes": analysis.temp_size_in_bytes,
                     "output_bytes": analysis.output_size_in_bytes}
      collectives[row] = _jax_common.collective_bytes(compiled[row])
      jax.block_until_ready(compiled[row](*state[row], w, m))    # warm up

    def step(row):
      jax.block_until_ready(compiled[row](*state[row], w, m))

    print(f"\n{name}: mesh {dict(mesh.shape)}", flush=True)
    times = _common.round_robin(("non_private", "private"), args.rounds, step)
    per_device = {row: memory[row]["argument_bytes"] + memory[row]["temp_bytes"]
                  for row in memory}
    results[name] = {
        "mesh": dict(mesh.shape), "times_ms": times, "memory": memory,
        "collectives": collectives,
        "median_round_ratio": statistics.median(
            a / b for a, b in zip(times["private"], times["non_private"])),
        "memory_ratio": per_device["private"] / per_device["non_private"]}
    print(f"{name}: private / non-private step {results[name]['median_round_ratio']:.2f}x, "
          f"per-device argument + temp bytes {per_device['private']:,} / "
          f"{per_device['non_private']:,} = {results[name]['memory_ratio']:.2f}x", flush=True)
  lines = ["| layout | mesh | private / non-private step | per-device bytes (private) | "
           "per-device bytes (non-private) | memory ratio |", "|---|---|---|---|---|---|"]
  for name, r in results.items():
    mem = {row: r["memory"][row]["argument_bytes"] + r["memory"][row]["temp_bytes"]
           for row in r["memory"]}
    lines.append(f"| {name} | {r['mesh']} | {r['median_round_ratio']:.2f} | "
                 f"{mem['private']:,} | {mem['non_private']:,} | {r['memory_ratio']:.2f} |")
  lines += ["", "Communicated per step, per device (bytes of each collective's result, summed; "
            "count in brackets), from the compiled HLO:", "",
            "| layout | step | " + " | ".join(_jax_common.COLLECTIVES) + " |",
            "|---|---|" + "---|" * len(_jax_common.COLLECTIVES)]
  for name, r in results.items():
    for row in ("non_private", "private"):
      cells = [f"{c['bytes']:,} ({c['count']})" if c["count"] else "-"
               for c in (r["collectives"][row][k] for k in _jax_common.COLLECTIVES)]
      lines.append(f"| {name} | {row.replace('_', '-')} | " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  print("\n" + table)
  if args.json_out:
    _common.write_json(args.json_out, header=header, batch_size=args.batch_size,
                       length=args.length, features=args.features, rounds=args.rounds,
                       devices=devices,
                       layouts=results, load=_common.load_record(), markdown=table,
                       machine=_common.machine_info())


def place(name, params, windows, mask):
  """The layout `name`'s mesh, with the parameters and the batch placed on it."""
  shape, names = layouts(jax.device_count())[name]
  mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * 2,
                       devices=jax.devices()[:shape[0] * shape[1]])
  rows = NamedSharding(mesh, lm_models.batch_spec(mesh))
  return (lm_models.shard_params(params, mesh), jax.device_put(windows, rows),
          jax.device_put(mask, rows))


def run_only(args, params, windows, mask, steps):
  """One layout's one step, compiled and run `--steps` times (RSS's worker)."""
  name, row = args.only
  fn, tx = steps[row]
  p, w, m = place(name, params, windows, mask)
  state = (p, jax.jit(tx.init)(p))
  step = jax.jit(fn)
  for _ in range(args.steps):
    state = step(*state, w, m)
  jax.block_until_ready(state)
  print("RESULT " + json.dumps({"layout": name, "step": row, "steps": args.steps}), flush=True)


def measure_rss(args):
  """Each (layout, step) in a process of its own under /usr/bin/time -v, one
  at a time, `--rounds` rounds: the process's maximum resident set size. On
  simulated CPU devices one process holds all of them, so the RSS is the
  whole mesh's (parameters split over 'fsdp' are held once in all, whole
  parameters once per device), plus the runtime's footprint."""
  names = list(layouts(jax.device_count()))   # the workers inherit XLA_FLAGS
  rss = {name: {"non_private": [], "private": []} for name in names}
  for _ in range(args.rounds):
    for name in names:
      for row in ("non_private", "private"):
        cmd = ["/usr/bin/time", "-v", sys.executable, os.path.abspath(__file__),
               "--only", name, row, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--length", str(args.length),
               "--features", str(args.features)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        found = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", proc.stderr)
        if proc.returncode != 0 or found is None or "RESULT " not in proc.stdout:
          raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        rss[name][row].append(int(found.group(1)) / 1024)
  lines = ["| layout | max RSS, non-private (MiB) | max RSS, private (MiB) | ratio |",
           "|---|---|---|---|"]
  for name in names:
    a, b = (statistics.median(rss[name][row]) for row in ("non_private", "private"))
    lines.append(f"| {name} | {a:.0f} | {b:.0f} | {b / a:.2f} |")
  table = "\n".join(lines)
  print(table)
  if args.json_out:
    _common.write_json(args.json_out, batch_size=args.batch_size, length=args.length,
                       features=args.features, rounds=args.rounds, steps=args.steps,
                       max_rss_mib=rss, load=_common.load_record(), markdown=table,
                       machine=_common.machine_info())


if __name__ == "__main__":
  main()
