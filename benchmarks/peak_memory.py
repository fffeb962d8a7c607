"""Peak memory (max RSS) of one DP-SGD training step, one row per process.

Two modes:

  python benchmarks/peak_memory.py --row optax_dp_auto --batch-size 2048
      one process: imports, params and batch, then compiles the row's train
      step (step_time.py's `build_row`, the same CNN and the same rows; with
      `--model gru|lstm` recurrent_step.py's, its recurrent classifier,
      `--model transformer` transformer_step.py's, `--model lm` lm_step.py's
      Shakespeare language model with its LoRA rows) and
      runs `--steps` steps (the first one compiles and warms up).
      `--row import_only` stops after the imports, params and batch: the
      baseline. Prints one JSON line with the step times.

  python benchmarks/peak_memory.py --all [--rounds 3] [--json-out PATH]
      the driver: runs every (row, batch size) in its own subprocess under
      `/usr/bin/time -v`, parses "Maximum resident set size", `--rounds` times,
      interleaved (each round runs every row at every batch size once), and
      prints per row and batch size the median and min peak RSS over the
      rounds, their ratios to `non_private` at the same batch size (NNX rows:
      to `nnx_non_private`, the nnx.Optimizer step of the same model): ratio
      of medians, median of per-round ratios, ratio of mins; and the ratio of
      the median RSS above the import-only baseline. Subprocesses run one at a
      time, so they do not compete for memory. The load average before and
      after is recorded, with the warning of _common.load_warning when the
      machine was not idle.

XLA CPU allocates the step's buffers from the process heap, so max RSS is the
step's peak working set plus the (constant) runtime and compiler footprint:
compare rows at the same batch size, and read the import-only row as the floor.

A row whose estimated per-example-gradient footprint (B x params x 4 bytes,
times a safety factor of 2.5 observed for vmap rows) does not fit in the
memory available before the first round is reported as not run, with the
estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # pylint: disable=wrong-import-position

ROWS = ("import_only", "non_private", "optax_dp_auto", "optax_dp_vmap",
        "optax_contrib", "jax_privacy",
        "nnx_non_private", "nnx_optax_dp_auto", "nnx_optax_dp_vmap",
        "optax_dp_bandmf2", "optax_dp_bandmf16",
        "nnx_lora_non_private", "nnx_lora_auto")
PER_EXAMPLE_ROWS = ("optax_dp_vmap", "optax_contrib", "jax_privacy", "nnx_optax_dp_vmap")
MODELS = ("cnn", "gru", "lstm", "transformer", "lm")
# The peers' rows exist for the CNN only (step_time.py).
PEER_ROWS = ("optax_contrib", "jax_privacy")
# DP-BandMF's rows (2 and 16 bands: both optimise a strategy; the difference
# is 14 copies of the parameters' noise buffers), for the CNN only.
BANDMF_ROWS = ("optax_dp_bandmf2", "optax_dp_bandmf16")
# The language model's LoRA rows (lm_step.py: only the adapters trained).
LORA_ROWS = ("nnx_lora_non_private", "nnx_lora_auto")
DEFAULT_BATCH_SIZES = (256, 2048)
VMAP_SAFETY = 2.5     # measured peak / (B x params x 4 bytes) is about 2 for vmap


def baseline_of(row: str) -> str:
  """The non-private row a row is compared with: NNX rows with the NNX step,
  LoRA rows with the non-private LoRA step."""
  if row in LORA_ROWS:
    return "nnx_lora_non_private"
  return "nnx_non_private" if row.startswith("nnx_") else "non_private"


class Workload(NamedTuple):
  """One model's pieces, as a row process needs them."""
  describe: str
  init_params: Callable[[], Any]
  make_batch: Callable[[int], Any]
  build_row: Callable[[str, int, float], Any]   # (row, B, sigma) -> Row
  nnx_state: Callable[[str, int, float], Any]   # (row, B, sigma) -> state


def rows_of(model: str) -> tuple[str, ...]:
  """The rows that `model` has (the peers' rows for the CNN only; LoRA rows
  for the language model only, which has no per-example-gradient rows)."""
  if model == "lm":
    return tuple(r for r in ROWS
                 if r not in PEER_ROWS + BANDMF_ROWS + PER_EXAMPLE_ROWS)
  return tuple(r for r in ROWS if r not in LORA_ROWS) if model == "cnn" else tuple(
      r for r in ROWS if r not in PEER_ROWS + BANDMF_ROWS + LORA_ROWS)


def workload(model: str) -> Workload:
  """step_time.py's CNN, or recurrent_step.py's classifier with a GRU or
  LSTM cell (its default T and features); imports JAX."""
  sys.path.insert(0, HERE)
  if model == "cnn":
    import step_time  # pylint: disable=import-outside-toplevel
    return Workload("the example's CNN (step_time.py)", step_time.init_params,
                    step_time.make_batch, step_time.build_row,
                    step_time.nnx_state)
  if model == "lm":
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
    import lm_step  # pylint: disable=import-outside-toplevel
    return Workload(
        f"lm_step.py's char transformer (d=128, 2 blocks), T={lm_step.PEAK_MEMORY_LENGTH}, "
        f"vocab {lm_step.VOCAB}", lm_step.init_params, lm_step.make_peak_batch,
        lm_step.build_row, lm_step.nnx_state)
  if model == "transformer":
    import transformer_step as ts  # pylint: disable=import-outside-toplevel
    return Workload(
        f"transformer_step.py's transformer, T={ts.SEQ_LEN}, vocab {ts.VOCAB}",
        ts.init_params, ts.make_batch, ts.build_row,
        lambda name, b, sigma: ts.nnx_state(name, b, sigma))
  import recurrent_step as rs  # pylint: disable=import-outside-toplevel
  return Workload(
      f"recurrent_step.py's RNN({model}, {rs.HIDDEN}) classifier, "
      f"T={rs.SEQ_LEN}, {rs.IN_FEATURES} features",
      lambda: rs.init_params(model),
      lambda b: rs.make_batch(b, rs.SEQ_LEN),
      lambda name, b, sigma: rs.build_row(name, model, b, sigma),
      lambda name, b, sigma: rs.nnx_state(model))


def one_row(row: str, batch_size: int, steps: int, model: str = "cnn") -> None:
  """Runs `steps` steps of one row in this process and prints a JSON line."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  w = workload(model)

  params = w.init_params()
  batch = jax.block_until_ready(w.make_batch(batch_size))
  out = {"row": row, "model": model, "batch_size": batch_size, "steps": 0,
         "num_params": int(sum(x.size for x in jax.tree.leaves(params)))}
  if row != "import_only":
    r = w.build_row(row, batch_size, _common.NOISE_MULTIPLIER)
    if row.startswith("nnx_"):   # the NNX model's state (the same model)
      params = w.nnx_state(row, batch_size, _common.NOISE_MULTIPLIER)
    opt_state = r.init(params)
    if row in BANDMF_ROWS:   # the DP-BandMF noise buffers held in the state
      out["noise_state_bytes"] = int(sum(
          x.nbytes for x in jax.tree.leaves(opt_state[0].noise_state)))
    step = jax.jit(r.step, donate_argnums=(0, 1))
    if row in BANDMF_ROWS:   # XLA's temporaries of the step: flat in the bands?
      out["step_temp_bytes"] = int(step.lower(params, opt_state, batch).compile()
                                   .memory_analysis().temp_size_in_bytes)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      params, opt_state = jax.block_until_ready(step(params, opt_state, batch))
      times.append(1e3 * (time.perf_counter() - t0))
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params)
                 if jnp.issubdtype(x.dtype, jnp.inexact))
    out.update(steps=steps, first_step_ms=times[0],
               median_later_ms=statistics.median(times[1:]) if steps > 1 else None,
               finite=finite)
  print("RESULT " + json.dumps(out), flush=True)


def _num_params(model: str) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  return int(sum(x.size for x in jax.tree.leaves(
      jax.eval_shape(workload(model).init_params))))


def _mem_available_bytes() -> int | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def measure(row: str, batch_size: int, steps: int, model: str) -> dict:
  """One `--row` process under /usr/bin/time -v: its RESULT and max RSS."""
  cmd = ["/usr/bin/time", "-v", sys.executable, os.path.abspath(__file__),
         "--row", row, "--batch-size", str(batch_size), "--steps", str(steps),
         "--model", model]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t0
  rss = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", proc.stderr)
  result = None
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      result = json.loads(line[len("RESULT "):])
  if proc.returncode != 0 or rss is None or result is None:
    tail = "\n".join(proc.stderr.splitlines()[-15:])
    raise RuntimeError(f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{tail}")
  result.update(max_rss_mib=int(rss.group(1)) / 1024, wall_s=wall,
                loadavg_after=_common.loadavgs()[0])
  return result


def skip_reason(row: str, b: int, num_params: int, args) -> dict | None:
  """Why (row, B) is not run, with the estimate; None if it is run."""
  if row == "jax_privacy" and b > args.jax_privacy_max_batch:
    return {"not_run": f"skipped above B={args.jax_privacy_max_batch} (about "
                       f"12 s per step at B=256, linear in B)"}
  if row in PER_EXAMPLE_ROWS:
    estimate = b * num_params * 4
    avail = _mem_available_bytes()
    if avail is not None and VMAP_SAFETY * estimate > avail - 2 * 2**30:
      return {"estimate_gib": estimate / 2**30,
              "not_run": f"B x params x 4 bytes = {estimate / 2**30:.1f} GiB of "
                         f"per-example grads (x{VMAP_SAFETY} > "
                         f"{avail / 2**30:.1f} GiB available)"}
  return None


def rss_summary(results: dict, rows: list[str], sizes: list[int]) -> None:
  """Adds to each measured `results[f"{row}@{B}"]` the median / min RSS over
  its rounds, `_common.ratio_stats`'s ratios to its baseline row's rounds and
  "above_floor_ratio" (median RSS above import_only's, over the baseline's)."""
  for b in sizes:
    floor_rounds = results.get(f"import_only@{b}", {}).get("rss_rounds_mib")
    floor = statistics.median(floor_rounds) if floor_rounds else None
    for row in rows:
      r = results[f"{row}@{b}"]
      if "rss_rounds_mib" not in r:
        continue
      base = results.get(f"{baseline_of(row)}@{b}", {}).get("rss_rounds_mib")
      stats = _common.ratio_stats(r["rss_rounds_mib"], base)
      r["max_rss_mib"] = stats.pop("median")   # the key of one-round runs
      r["min_rss_mib"] = stats.pop("min")
      r.update(stats)
      base_median = statistics.median(base) if base else None
      if (row != "import_only" and floor is not None and base_median
          and base_median > floor):
        r["above_floor_ratio"] = (r["max_rss_mib"] - floor) / (base_median - floor)


def rss_table(title: str, results: dict, rows: list[str], sizes: list[int]) -> str:
  """The markdown table of `rss_summary`'s rows, one per (B, row)."""
  headers = ["B", "row", "median MiB", "min MiB", *_common.ratio_headers(),
             "above import-only / non-private's"]
  lines = []
  for b in sizes:
    for row in rows:
      r = results[f"{row}@{b}"]
      if "max_rss_mib" not in r:
        est = r.get("estimate_gib")
        lines.append([str(b), row, "not run" + (
            f" (est. >= {est:.1f} GiB)" if est else ""), "", "", "", "", ""])
        continue
      above = r.get("above_floor_ratio")
      lines.append([str(b), row, f"{r['max_rss_mib']:.0f}", f"{r['min_rss_mib']:.0f}",
                    *_common.ratio_cells(r),
                    "" if above is None else f"{above:.2f}"])
  return title + "\n\n" + _common.markdown_table(headers, lines)


def driver(args, rows: list[str]) -> None:
  """Every (row, B) in its own process, `args.rounds` interleaved rounds."""
  import _jax_common  # pylint: disable=import-outside-toplevel
  info = _jax_common.versions()
  sizes = [int(b) for b in args.batch_sizes.split(",")]
  num_params = _num_params(args.model)
  rows = ["import_only"] + [r for r in rows if r != "import_only"]
  header = _jax_common.header(
      info, f"{workload(args.model).describe}, {num_params} params; "
      f"/usr/bin/time -v max RSS, one process per row, {args.rounds} "
      f"interleaved rounds; {args.steps} steps ({args.big_steps} for "
      f"per-example rows at B>=1024), the first compiles",
      jax_privacy=args.model == "cnn")
  print(header, flush=True)
  _common.print_start_load_warning()

  results = {}
  for b in sizes:   # decided once, before the first round
    for row in rows:
      skip = skip_reason(row, b, num_params, args)
      results[f"{row}@{b}"] = {"row": row, "batch_size": b, **(skip or {})}
      if row in PER_EXAMPLE_ROWS:
        results[f"{row}@{b}"]["estimate_gib"] = b * num_params * 4 / 2**30
      if skip:
        print(f"{row}@{b}: not run: {skip['not_run']}", flush=True)
  for rnd in range(args.rounds):
    for b in sizes:
      for row in rows:
        r = results[f"{row}@{b}"]
        if "not_run" in r:
          continue
        steps = (args.big_steps if row in PER_EXAMPLE_ROWS and b >= 1024
                 else args.steps)
        m = measure(row, b, steps, args.model)
        r.setdefault("rounds", []).append(m)
        r.setdefault("rss_rounds_mib", []).append(m["max_rss_mib"])
        print(f"round {rnd + 1}/{args.rounds} {row}@{b}: max RSS "
              f"{m['max_rss_mib']:.0f} MiB ({m['wall_s']:.0f} s, load "
              f"{m['loadavg_after']:.1f})", flush=True)

  load = _common.load_record()
  rss_summary(results, rows, sizes)
  table = _common.with_load(rss_table(
      f"Peak RSS ({header}; NNX rows' ratios are to nnx_non_private)",
      results, rows, sizes), load)
  print("\n" + table, flush=True)

  if args.json_out:
    _common.write_json(
        args.json_out, versions=info, model=args.model, num_params=num_params,
        rounds=args.rounds, steps=args.steps, big_steps=args.big_steps,
        results=results, load=load, markdown=table,
        python=platform.python_version())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--row", choices=ROWS, help="run one row in this process")
  parser.add_argument("--model", choices=MODELS, default="cnn",
                      help="cnn: step_time.py's; transformer: transformer_step.py's; "
                      "gru / lstm: recurrent_step.py's; lm: lm_step.py's "
                      "language model (with LoRA rows, no per-example rows) "
                      "(no optax_contrib / jax_privacy rows)")
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=3,
                      help="steps per process, the first compiles (default 3)")
  parser.add_argument("--all", action="store_true",
                      help="driver: every row and batch size, one subprocess each")
  parser.add_argument("--rounds", type=int, default=3,
                      help="driver: interleaved rounds of every (row, B) (default 3)")
  parser.add_argument("--rows", default=None,
                      help="driver: comma list (import_only is always run); "
                      "default: every row of --model")
  parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)))
  parser.add_argument("--big-steps", type=int, default=2,
                      help="driver: steps for per-example-gradient rows at B>=1024")
  parser.add_argument("--jax-privacy-max-batch", type=int, default=256)
  parser.add_argument("--json-out", default=None)
  args = parser.parse_args(argv)
  if args.all == (args.row is not None):
    parser.error("give exactly one of --row ROW or --all")
  if args.steps < 1 or args.big_steps < 1 or args.rounds < 1:
    parser.error("--steps, --big-steps and --rounds must be >= 1")
  valid = rows_of(args.model)
  rows = ([r.strip() for r in args.rows.split(",") if r.strip()]
          if args.rows else list(valid[1:]))
  for r in rows + ([args.row] if args.row else []):
    if r not in valid:
      parser.error(f"row {r!r} not available for --model {args.model}; "
                   f"choose from {','.join(valid)}")
  if args.all:
    driver(args, rows)
  else:
    one_row(args.row, args.batch_size, args.steps, args.model)


if __name__ == "__main__":
  main()
