"""Peak memory (max RSS) of one DP-SGD training step, one row per process.

Two modes:

  python benchmarks/peak_memory.py --row optax_dp_auto --batch-size 2048
      one process: imports, params and batch, then compiles the row's train
      step (step_time.py's `build_row`, the same CNN and the same rows) and runs
      `--steps` steps (the first one compiles and warms up). `--row import_only`
      stops after the imports, params and batch: the baseline. Prints one JSON
      line with the step times.

  python benchmarks/peak_memory.py --all [--json-out PATH]
      the driver: runs every (row, batch size) in its own subprocess under
      `/usr/bin/time -v`, parses "Maximum resident set size", and prints a
      table of peak RSS and its ratio to `non_private` at the same batch size
      (NNX rows: to `nnx_non_private`, the nnx.Optimizer step of the same
      CNN), and the ratio of the RSS above the import-only baseline. Subprocesses
      run one at a time, so they do not compete for memory.

XLA CPU allocates the step's buffers from the process heap, so max RSS is the
step's peak working set plus the (constant) runtime and compiler footprint:
compare rows at the same batch size, and read the import-only row as the floor.

A row whose estimated per-example-gradient footprint (B x params x 4 bytes,
times a safety factor of 2.5 observed for vmap rows) does not fit in the
memory available at that moment is reported as not run, with the estimate.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # pylint: disable=wrong-import-position
ROWS = ("import_only", "non_private", "optax_dp_auto", "optax_dp_vmap",
        "optax_contrib", "jax_privacy",
        "nnx_non_private", "nnx_optax_dp_auto", "nnx_optax_dp_vmap")
PER_EXAMPLE_ROWS = ("optax_dp_vmap", "optax_contrib", "jax_privacy", "nnx_optax_dp_vmap")


def baseline_of(row: str) -> str:
  """The non-private row a row is compared with: NNX rows with the NNX step."""
  return "nnx_non_private" if row.startswith("nnx_") else "non_private"
DEFAULT_BATCH_SIZES = (256, 2048)
VMAP_SAFETY = 2.5     # measured peak / (B x params x 4 bytes) is about 2 for vmap


def one_row(row: str, batch_size: int, steps: int) -> None:
  """Runs `steps` steps of one row in this process and prints a JSON line."""
  sys.path.insert(0, HERE)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import step_time  # pylint: disable=import-outside-toplevel

  params = step_time.init_params()
  batch = jax.block_until_ready(step_time.make_batch(batch_size))
  out = {"row": row, "batch_size": batch_size, "steps": 0,
         "num_params": int(sum(x.size for x in jax.tree.leaves(params)))}
  if row != "import_only":
    r = step_time.build_row(row, batch_size, _common.NOISE_MULTIPLIER)
    if row.startswith("nnx_"):   # the NNX model's state (the same CNN)
      params = step_time.nnx_state(row, batch_size, _common.NOISE_MULTIPLIER)
    opt_state = r.init(params)
    step = jax.jit(r.step, donate_argnums=(0, 1))
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      params, opt_state = jax.block_until_ready(step(params, opt_state, batch))
      times.append(1e3 * (time.perf_counter() - t0))
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    out.update(steps=steps, first_step_ms=times[0],
               median_later_ms=statistics.median(times[1:]) if steps > 1 else None,
               finite=finite)
  print("RESULT " + json.dumps(out), flush=True)


def _num_params() -> int:
  sys.path.insert(0, HERE)
  import jax  # pylint: disable=import-outside-toplevel
  import step_time  # pylint: disable=import-outside-toplevel
  return int(sum(x.size for x in jax.tree.leaves(
      jax.eval_shape(step_time.init_params))))


def _mem_available_bytes() -> int | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def measure(row: str, batch_size: int, steps: int) -> dict:
  cmd = ["/usr/bin/time", "-v", sys.executable, os.path.abspath(__file__),
         "--row", row, "--batch-size", str(batch_size), "--steps", str(steps)]
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
                loadavg_after=os.getloadavg()[0])
  return result


def driver(args) -> None:
  sys.path.insert(0, HERE)
  import _jax_common  # pylint: disable=import-outside-toplevel
  info = _jax_common.versions()
  rows = [r.strip() for r in args.rows.split(",") if r.strip()]
  sizes = [int(b) for b in args.batch_sizes.split(",")]
  num_params = _num_params()
  header = _jax_common.header(
      info, f"{num_params} params; /usr/bin/time -v max RSS, one process per "
      f"row; {args.steps} steps ({args.big_steps} for per-example rows at "
      f"B>=1024), the first compiles")
  print(header, flush=True)

  results = {}
  for b in sizes:
    for row in ["import_only"] + [r for r in rows if r != "import_only"]:
      key = f"{row}@{b}"
      if row == "jax_privacy" and b > args.jax_privacy_max_batch:
        results[key] = {"row": row, "batch_size": b, "not_run":
                        f"skipped above B={args.jax_privacy_max_batch} (about "
                        f"12 s per step at B=256, linear in B)"}
        print(f"{key}: {results[key]['not_run']}", flush=True)
        continue
      if row in PER_EXAMPLE_ROWS:
        estimate = b * num_params * 4
        avail = _mem_available_bytes()
        if avail is not None and VMAP_SAFETY * estimate > avail - 2 * 2**30:
          results[key] = {"row": row, "batch_size": b,
                          "estimate_gib": estimate / 2**30,
                          "not_run": f"B x params x 4 bytes = "
                          f"{estimate / 2**30:.1f} GiB of per-example grads "
                          f"(x{VMAP_SAFETY} > {avail / 2**30:.1f} GiB available)"}
          print(f"{key}: not run: {results[key]['not_run']}", flush=True)
          continue
      steps = (args.big_steps if row in PER_EXAMPLE_ROWS and b >= 1024
               else args.steps)
      r = measure(row, b, steps)
      if row in PER_EXAMPLE_ROWS:
        r["estimate_gib"] = b * num_params * 4 / 2**30
      results[key] = r
      print(f"{key}: max RSS {r['max_rss_mib']:.0f} MiB "
            f"({r['wall_s']:.0f} s, load {r['loadavg_after']:.1f})", flush=True)

  lines = [f"Peak RSS ({header})", "",
           "| row | " + " | ".join(
               f"B={b} MiB | / non-private | above baseline / non-private's"
               for b in sizes) + " |",
           "|---|" + "---|---|---|" * len(sizes)]
  for row in ["import_only"] + [r for r in rows if r != "import_only"]:
    cells = []
    for b in sizes:
      r = results.get(f"{row}@{b}", {})
      base = results.get(f"{baseline_of(row)}@{b}", {}).get("max_rss_mib")
      floor = results.get(f"import_only@{b}", {}).get("max_rss_mib")
      if "max_rss_mib" not in r:
        est = r.get("estimate_gib")
        cells += ["not run" + (f" (est. >= {est:.1f} GiB)" if est else ""), "", ""]
        continue
      m = r["max_rss_mib"]
      ratio = f"{m / base:.2f}" if base else "n/a"
      above = (f"{(m - floor) / (base - floor):.2f}"
               if base and floor and row != "import_only" and base > floor
               else "")
      cells += [f"{m:.0f}", ratio, above]
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  print("\n" + table, flush=True)

  if args.json_out:
    _common.write_json(
        args.json_out, versions=info, num_params=num_params, steps=args.steps,
        big_steps=args.big_steps, results=results, markdown=table,
        python=platform.python_version())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--row", choices=ROWS, help="run one row in this process")
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=3,
                      help="steps per process, the first compiles (default 3)")
  parser.add_argument("--all", action="store_true",
                      help="driver: every row and batch size, one subprocess each")
  parser.add_argument("--rows", default=",".join(ROWS[1:]),
                      help="driver: comma list (import_only is always run)")
  parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)))
  parser.add_argument("--big-steps", type=int, default=2,
                      help="driver: steps for per-example-gradient rows at B>=1024")
  parser.add_argument("--jax-privacy-max-batch", type=int, default=256)
  parser.add_argument("--json-out", default=None)
  args = parser.parse_args(argv)
  if args.all == (args.row is not None):
    parser.error("give exactly one of --row ROW or --all")
  if args.steps < 1 or args.big_steps < 1:
    parser.error("--steps and --big-steps must be >= 1")
  if args.all:
    driver(args)
  else:
    one_row(args.row, args.batch_size, args.steps)


if __name__ == "__main__":
  main()
