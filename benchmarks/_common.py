"""Helpers shared by the benchmark scripts (step_time.py, transformer_step.py,
recurrent_step.py, peak_memory.py, opacus_step.py): the benchmark's
hyper-parameters, argument checks, the machine description, the load-average
record and its idle rule, the round-robin timing loop, the median / min /
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
# A machine is idle for a benchmark if its 1-minute load average before the
# run is at most this much per core (`nproc`); otherwise every table is framed
# by a warning (other work slows some rows more than others).
IDLE_LOAD_PER_CORE = 0.3


def parse_rows(parser, args, all_rows: Sequence[str]) -> list[str]:
  """Checks --rounds / --batch-size and returns the --rows list, validated."""
  if args.rounds < 1 or args.batch_size < 1:
    parser.error("--rounds and --batch-size must be >= 1")
  rows = [r.strip() for r in args.rows.split(",") if r.strip()]
  for r in rows:
    if r not in all_rows:
      parser.error(f"unknown row {r!r}; choose from {','.join(all_rows)}")
  return rows


def loadavgs() -> tuple[float, float, float] | None:
  """The 1-, 5- and 15-minute load averages, or None where the OS has none."""
  return os.getloadavg() if hasattr(os, "getloadavg") else None


# The "before" reading of `load_record`: taken when this module is first
# imported, which every script does before it imports JAX or torch, compiles
# or times anything, so that the run's own work is not in it.
_LOAD_AT_IMPORT = loadavgs()


def loadavg() -> float | None:
  """The 1-minute load average at start (this module's import), or None."""
  return _LOAD_AT_IMPORT[0] if _LOAD_AT_IMPORT is not None else None


def nproc() -> int:
  """The number of usable cores: `nproc`'s output (os.cpu_count() without it)."""
  try:
    return int(subprocess.run(["nproc"], capture_output=True, text=True,
                              check=True).stdout.strip())
  except (OSError, ValueError, subprocess.CalledProcessError):
    return os.cpu_count() or 1


def load_record(after: bool = True) -> dict:
  """The load averages before the run and now, and whether the machine was idle.

  {"before": 1-min load at start, "after": 1-min load now (None if not
  `after`), "before_1_5_15" / "after_1_5_15": the 1-, 5- and 15-minute
  averages, "nproc", "idle_load_per_core": IDLE_LOAD_PER_CORE, "idle"}.
  Idleness is judged on the "before" reading alone (None without load
  averages): a process that has just run at 100% for a while inflates its own
  "after" 1-minute load, so "after" is recorded, not judged.
  """
  now = loadavgs() if after else None
  cores = nproc()
  before = _LOAD_AT_IMPORT
  return {"before": before[0] if before else None,
          "after": now[0] if now else None,
          "before_1_5_15": list(before) if before else None,
          "after_1_5_15": list(now) if now else None,
          "nproc": cores, "idle_load_per_core": IDLE_LOAD_PER_CORE,
          "idle": (before[0] <= IDLE_LOAD_PER_CORE * cores) if before else None}


def _fmt_load(load: float | None) -> str:
  return "n/a" if load is None else f"{load:.2f}"


def load_warning(load: dict) -> str | None:
  """The loud "WARNING: machine not idle: ..." line, or None if it was idle."""
  if load["idle"] is not False:
    return None
  when = (f"{_fmt_load(load['before'])} before / {_fmt_load(load['after'])} after"
          if load["after_1_5_15"] is not None
          else f"{_fmt_load(load['before'])} at start")
  return (f"WARNING: machine not idle: load {when} on {load['nproc']} cores "
          f"(> {IDLE_LOAD_PER_CORE} per core); ratios may be flattered or hurt")


def load_line(load: dict) -> str:
  """One line: the 1/5/15-minute load before and after, and the verdict."""
  def triple(t):
    return "n/a" if t is None else "/".join(f"{x:.2f}" for x in t)
  verdict = {None: "idle: unknown (no load average)",
             True: "idle (1-min load before <= "
                   f"{IDLE_LOAD_PER_CORE} per core)",
             False: "NOT idle (1-min load before > "
                    f"{IDLE_LOAD_PER_CORE} per core)"}[load["idle"]]
  return (f"Load average (1/5/15 min): before {triple(load['before_1_5_15'])}, "
          f"after {triple(load['after_1_5_15'])}, on {load['nproc']} cores: "
          f"{verdict}; the after reading includes this run's own load.")


def print_start_load_warning() -> None:
  """Prints the not-idle warning at start, if the machine is busy already."""
  warning = load_warning(load_record(after=False))
  if warning:
    print(warning, flush=True)


def with_load(markdown: str, load: dict) -> str:
  """`markdown` (tables) framed by `load_warning` (if not idle) and `load_line`."""
  warning = load_warning(load)
  parts = ([warning, ""] if warning else []) + [markdown, "", load_line(load)]
  return "\n".join(parts + ([warning] if warning else []))


def machine_info() -> dict:
  """{"nproc": `nproc` output as a string, "cpu": model name}."""
  cpu = platform.processor() or platform.machine()
  with contextlib.suppress(OSError):
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  return {"nproc": str(nproc()), "cpu": cpu}


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
  return (f"; 1-min load avg at start {load:.2f}" if load is not None else "")


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


def ratio_stats(values: Sequence[float], base: Sequence[float] | None) -> dict:
  """Median and min of one row's rounds and, given the baseline row's rounds
  (the same rounds, interleaved), the three ratios to it.

  {"median", "min"} and, with `base`, "ratio_of_medians" (median / base
  median), "median_round_ratio" (median over rounds of value / base value in
  that round: robust to drift, as both saw the same moment) and
  "ratio_of_mins" (min / base min: the best case of each, least hurt by load).
  """
  s = {"median": statistics.median(values), "min": min(values)}
  if base:
    s["ratio_of_medians"] = s["median"] / statistics.median(base)
    s["median_round_ratio"] = statistics.median(
        a / b for a, b in zip(values, base))
    s["ratio_of_mins"] = s["min"] / min(base)
  return s


def summarize(times: dict[str, list[float]], base_row: str,
              compile_s: dict[str, float | None] | None = None) -> dict:
  """Median, min (and compile time) per row; ratios to `base_row` if timed.

  Per row: "median_ms", "min_ms", "compile_s" (if given), "times_ms", and
  with `base_row` timed "ratio_of_medians", "median_round_ratio",
  "ratio_of_mins" (see `ratio_stats`) and "compile_ratio" (compile_s /
  base_row's, where both are known).
  """
  base = times.get(base_row)
  base_compile = (compile_s or {}).get(base_row)
  summary = {}
  for name, t in times.items():
    stats = ratio_stats(t, base)
    s = {"median_ms": stats.pop("median"), "min_ms": stats.pop("min")}
    if compile_s is not None:
      s["compile_s"] = compile_s.get(name)
    s["times_ms"] = t
    s.update(stats)
    if s.get("compile_s") is not None and base_compile:
      s["compile_ratio"] = s["compile_s"] / base_compile
    summary[name] = s
  return summary


def fmt_ratio(x: float | None) -> str:
  """A ratio to 2 decimals, "n/a" for None."""
  return "n/a" if x is None else f"{x:.2f}"


def ratio_headers(base: str = "non-private") -> list[str]:
  """The headers of `ratio_cells`, for ratios to the `base` row."""
  return [f"median / {base} median", "median of per-round ratios",
          f"min / {base} min"]


def ratio_cells(s: dict) -> list[str]:
  """The `ratio_headers` cells of one row of `ratio_stats` / `summarize`."""
  return [fmt_ratio(s.get(k)) for k in
          ("ratio_of_medians", "median_round_ratio", "ratio_of_mins")]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A markdown table."""
  return "\n".join(["| " + " | ".join(headers) + " |",
                    "|" + "---|" * len(headers)]
                   + ["| " + " | ".join(r) + " |" for r in rows])


def summary_table(title: str, summary: dict, ms_format: str = ".0f",
                  base: str = "non-private") -> str:
  """The markdown table of `summarize`'s rows, under `title`.

  Columns: median and min ms, the three ratios to the `base` row
  (`ratio_headers`) and, where some row has a compile time, compile s and
  compile / base compile.
  """
  with_compile = any(s.get("compile_s") is not None for s in summary.values())
  headers = (["row", "median ms", "min ms", *ratio_headers(base)]
             + (["compile s", f"compile / {base} compile"]
                if with_compile else []))
  rows = []
  for name, s in summary.items():
    cells = [name, f"{s['median_ms']:{ms_format}}", f"{s['min_ms']:{ms_format}}",
             *ratio_cells(s)]
    if with_compile:
      c = s.get("compile_s")
      cells += ["n/a" if c is None else f"{c:.1f}",
                fmt_ratio(s.get("compile_ratio"))]
    rows.append(cells)
  return title + "\n\n" + markdown_table(headers, rows)


def print_check_header(batch_size: int, steps: int, clip: float,
                       n_clipped: int, label: str = "") -> None:
  """The "## --check: ..." line that opens the check at one clip norm
  (`label`, e.g. "NNX", names the model where a script checks several)."""
  print(f"## --check{f' ({label})' if label else ''}: batch {batch_size}, "
        f"noise_multiplier 0, {steps} steps, "
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
                    base_rows: Sequence[str], batch_size: int, steps: int,
                    name_width: int, what: str) -> dict:
  """--check of every row against a plain reference, any framework.

  For each `(clip, n_clipped)` of `clips`: `reference(clip)` returns the
  reference's params after `steps` steps (sigma = 0) and its max |update|;
  `row_diff(name, clip, ref)` runs the same steps with row `name` and returns
  max |params - ref|, which must be within CHECK_RTOL of the update, except
  for the `base_rows` (not DP: expected to differ). Exits with status 1 on a
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
      ok = name in base_rows or diff <= tol
      failed |= not ok
      note = ("(not DP: expected to differ)" if name in base_rows
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
