"""Helpers shared by the benchmark scripts (step_time.py, transformer_step.py,
peak_memory.py, opacus_step.py): argument checks, the machine description, the
round-robin timing loop, the median / ratio summary and table, JSON output.

Standard library only: opacus_step.py imports it from a venv without JAX, and
the JAX scripts from one without torch. The scripts run as
`python benchmarks/X.py`, so this directory is sys.path[0] and
`import _common` finds this file.
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
from typing import Callable, Sequence


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


def jax_versions_header(info: dict, jax_privacy: bool = True) -> str:
  """The "jax ..., optax ...; nproc N (cpu, backend); " start of a header."""
  return (f"jax {info['jax']}, optax {info['optax']}, flax {info['flax']}, "
          + (f"jax-privacy {info['jax_privacy']}, " if jax_privacy else "")
          + f"optax_dp {info['optax_dp']} ({info['optax_dp_git']}); "
          f"nproc {info['nproc']} ({info['cpu']}, {info['backend']}); ")


def xla_flags_suffix(info: dict) -> str:
  return f"; XLA_FLAGS={info['XLA_FLAGS']}" if info["XLA_FLAGS"] else ""


def loadavg_suffix(load: float | None) -> str:
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


def write_json(path: str, **fields) -> None:
  """Writes {"date", "argv", **fields} to `path` (indent 1) and says so."""
  out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
         "argv": sys.argv, **fields}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print(f"\nwrote {path}")
