"""Helpers shared by the benchmark scripts (step_time.py, transformer_step.py,
peak_memory.py, opacus_step.py): the benchmark's hyper-parameters, argument
checks, the machine description, the round-robin timing loop, the median /
ratio summary and table, the `--check` report, JSON output.

Standard library only: opacus_step.py imports it from a venv without JAX, and
the JAX scripts from one without torch (their JAX-side helpers are in
_jax_common.py). The scripts run as `python benchmarks/X.py`, so this
directory is sys.path[0] and `import _common` finds this file.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

# The step every timing script measures, JAX and PyTorch alike: SGD with
# momentum after clipping at C and Gaussian noise of std sigma * C on the sum.
LEARNING_RATE = 0.1
MOMENTUM = 0.9
L2_NORM_CLIP = 0.1
NOISE_MULTIPLIER = 1.34
# --check tolerance, relative to the update size: float32 rounding passes, a
# wrong clip factor or normaliser does not.
CHECK_RTOL = 1e-3


def parse_rows(parser, args, all_rows: Sequence[str]) -> list[str]:
  """Checks --rounds / --batch-size and returns the --rows list, validated."""
  if args.rounds < 1 or args.batch_size < 1:
    parser.error("--rounds and --batch-size must be >= 1")
  rows = [r.strip() for r in args.rows.split(",") if r.strip()]
  for r in rows:
    if r not in all_rows:
      parser.error(f"unknown row {r!r}; choose from {','.join(all_rows)}")
  return rows


def loadavg() -> float | None:
  """The 1-minute load average, or None where the OS has none."""
  return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_info() -> dict:
  """{"nproc": `nproc` output (os.cpu_count() without it), "cpu": model name}."""
  try:
    nproc = subprocess.run(["nproc"], capture_output=True, text=True,
                           check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    nproc = str(os.cpu_count())
  cpu = platform.processor() or platform.machine()
  with contextlib.suppress(OSError):
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  return {"nproc": nproc, "cpu": cpu}


def git_revision(root: str, path: str) -> str:
  """Short HEAD of the checkout at `root`, "-dirty" if `path` has edits."""
  try:
    rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", path],
                           capture_output=True, text=True, check=True).stdout.strip()
    return rev + ("-dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def loadavg_suffix(load: float | None) -> str:
  """"; 1-min load avg at start L" for a header, or "" without a load average."""
  return (f"; 1-min load avg at start {load:.1f}" if load is not None else "")


def round_robin(rows: Sequence[str], rounds: int, run_step: Callable[[str], None],
                ms_format: str = ".0f") -> dict[str, list[float]]:
  """Times `run_step(name)` (which must block until done) round-robin: each
  round runs one step of every row. Returns {row: [ms per round]}."""
  times = {name: [] for name in rows}
  for r in range(rounds):
    for name in rows:
      t0 = time.perf_counter()
      run_step(name)
      times[name].append(1e3 * (time.perf_counter() - t0))
    print(f"round {r + 1}/{rounds}: "
          + ", ".join(f"{n} {times[n][-1]:{ms_format}} ms" for n in rows),
          flush=True)
  return times


def summarize(times: dict[str, list[float]], base_row: str,
              compile_s: dict[str, float] | None = None) -> dict:
  """Median, min (and compile time) per row; ratios to `base_row` if timed."""
  base = times.get(base_row)
  summary = {}
  for name, t in times.items():
    s = {"median_ms": statistics.median(t), "min_ms": min(t)}
    if compile_s is not None:
      s["compile_s"] = compile_s[name]
    s["times_ms"] = t
    if base:
      s["ratio_of_medians"] = s["median_ms"] / statistics.median(base)
      s["median_round_ratio"] = statistics.median(a / b for a, b in zip(t, base))
    summary[name] = s
  return summary


def fmt_ratio(x: float | None) -> str:
  """A ratio to 2 decimals, "n/a" for None."""
  return "n/a" if x is None else f"{x:.2f}"


def summary_table(title: str, summary: dict, ms_format: str = ".0f") -> str:
  """The markdown table of `summarize`'s rows, under `title`."""
  lines = [title, "",
           "| row | median ms | min ms | median / non-private median "
           "| median of per-round ratios |",
           "|---|---|---|---|---|"]
  for name, s in summary.items():
    lines.append(f"| {name} | {s['median_ms']:{ms_format}} | "
                 f"{s['min_ms']:{ms_format}} | "
                 f"{fmt_ratio(s.get('ratio_of_medians'))} | "
                 f"{fmt_ratio(s.get('median_round_ratio'))} |")
  return "\n".join(lines)


def print_check_header(batch_size: int, steps: int, clip: float,
                       n_clipped: int) -> None:
  """The "## --check: ..." line that opens the check at one clip norm."""
  print(f"## --check: batch {batch_size}, noise_multiplier 0, {steps} steps, "
        f"C={clip:.4g} ({n_clipped}/{batch_size} examples clipped at step 1)")


def finish_check(results: dict, failed: bool, what: str) -> dict:
  """Exits with status 1 after "CHECK FAILED", or says `what` agree."""
  if failed:
    print("CHECK FAILED")
    sys.exit(1)
  print(f"check passed: {what} compute the same update\n", flush=True)
  return results


def reference_check(rows: Sequence[str], clips: Sequence[tuple[float, int]], *,
                    reference: Callable[[float], tuple[Any, float]],
                    row_diff: Callable[[str, float, Any], float],
                    base_row: str, batch_size: int, steps: int,
                    name_width: int, what: str) -> dict:
  """--check of every row against a plain reference, any framework.

  For each `(clip, n_clipped)` of `clips`: `reference(clip)` returns the
  reference's params after `steps` steps (sigma = 0) and its max |update|;
  `row_diff(name, clip, ref)` runs the same steps with row `name` and returns
  max |params - ref|, which must be within CHECK_RTOL of the update, except
  for `base_row` (not DP: expected to differ). Exits with status 1 on a
  mismatch; returns {"C=...": the per-clip results}.
  """
  results, failed = {}, False
  for clip, n_clipped in clips:
    print_check_header(batch_size, steps, clip, n_clipped)
    ref, ref_update = reference(clip)
    tol = CHECK_RTOL * ref_update
    res = {"l2_norm_clip": clip, "examples_clipped": n_clipped,
           "max_abs_update_reference": ref_update, "tolerance": tol, "rows": {}}
    for name in rows:
      diff = row_diff(name, clip, ref)
      res["rows"][name] = diff
      ok = name == base_row or diff <= tol
      failed |= not ok
      note = ("(not DP: expected to differ)" if name == base_row
              else "ok" if ok else "MISMATCH")
      print(f"  {name:{name_width}s} max|params - reference| = {diff:.2e}  {note}")
    print(f"  (reference max|params - params0| = {ref_update:.2e}; "
          f"tolerance {tol:.1e})")
    results[f"C={clip:.4g}"] = res
  return finish_check(results, failed, what)


def write_json(path: str, **fields) -> None:
  """Writes {"date", "argv", **fields} to `path` (indent 1) and says so."""
  out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
         "argv": sys.argv, **fields}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print(f"\nwrote {path}")
