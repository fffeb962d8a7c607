"""The README's speed and memory tables, regenerated from the committed JSON.

Reads `benchmarks/results/*.json` (written by step_time.py, transformer_step.py,
recurrent_step.py and peak_memory.py with `--json-out`) and prints markdown:
per model, each optax_dp row against its own framework's non-private step
(Linen rows against `non_private`, NNX rows against `nnx_non_private`), by the
minimum over rounds, the median and the median of per-round ratios (all
recomputed here from the per-round times), the compile-time ratio, and the
load average before and after the run, flagged when the machine was not idle.

Usage:
  python benchmarks/readme_tables.py            # prints the tables
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # pylint: disable=wrong-import-position
import peak_memory  # pylint: disable=wrong-import-position

RESULTS = os.path.join(HERE, "results")
TIMING = (("step_time_b256", "tutorial CNN, B=256"),
          ("transformer_b64", "transformer (2 blocks), B=64, T=64"),
          ("recurrent_gru_b64", "GRU(128), B=64, T=32"),
          ("recurrent_lstm_b64", "LSTM(128), B=64, T=32"),
          ("lm_b512_t64", "char LM (d=128, 2 blocks), B=512, T=64"),
          ("lm_b64_t256", "char LM (d=128, 2 blocks), B=64, T=256"))
MEMORY = (("peak_memory", "tutorial CNN"), ("peak_memory_peers", "tutorial CNN"),
          ("peak_memory_transformer", "transformer, T=64"),
          ("peak_memory_gru", "GRU(128), T=32"),
          ("peak_memory_lm", "char LM (d=128, 2 blocks), T=64"))
# The peers' run (step_time.py with every row): only its peer rows are
# reported, since running the heavy peers in the same rounds disturbs the
# optax_dp rows (those come from the run without peers, above).
PEERS = (("step_time_peers_b256", "tutorial CNN, B=256"),)
PEER_ROWS = ("optax_contrib", "jax_privacy")
ROWS = ("optax_dp_auto", "optax_dp_vmap", "nnx_optax_dp_auto", "nnx_optax_dp_vmap",
        "optax_contrib", "jax_privacy", "nnx_lora_auto")


def _load(name: str) -> dict | None:
  path = os.path.join(RESULTS, name + ".json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _base(row: str) -> str:
  return peak_memory.baseline_of(row)


def _load_cell(result: dict) -> str:
  load = result.get("load")
  if not load:   # an older file: the start load only
    start = result.get("versions", {}).get("loadavg_at_start")
    return "n/a" if start is None else f"{start:.2f} (start)"
  flag = "" if load["idle"] else " NOT idle"
  return f"{load['before']:.2f} / {load['after']:.2f}{flag}"


def timing_ratios() -> list[dict]:
  """Every timing result's DP rows against their framework's non-private row.

  One dict per (model, row): "model", "row", "min_ms", "stats" (`_common.
  ratio_stats` of its rounds against the baseline's), "compile_s",
  "base_compile_s", and "result" (the JSON it came from).
  """
  out = []
  for name, model in TIMING + PEERS:
    result = _load(name)
    if result is None:
      continue
    rows = result["rows"]
    for row in ROWS:
      if row not in rows or _base(row) not in rows:
        continue
      if (name, model) in PEERS and row not in PEER_ROWS:
        continue   # the peers' run: only the peers (its own rows were disturbed)
      s, b = rows[row], rows[_base(row)]
      out.append({"model": model, "row": row, "min_ms": s["min_ms"],
                  "stats": _common.ratio_stats(s["times_ms"], b["times_ms"]),
                  "compile_s": s.get("compile_s"), "base_compile_s": b.get("compile_s"),
                  "result": result})
  return out


def timing_table() -> str:
  """One markdown table of every timing result's DP rows."""
  headers = ["model", "row", "min ms", "min / non-private min",
             "median / non-private median", "median of per-round ratios",
             "compile s (/ non-private)", "load before / after", "run"]
  lines = []
  for r in timing_ratios():
    result, c, bc = r["result"], r["compile_s"], r["base_compile_s"]
    compile_cell = "n/a" if not c or not bc else f"{c:.1f} ({c / bc:.2f})"
    medians, per_round, mins = _common.ratio_cells(r["stats"])
    lines.append([r["model"], r["row"], f"{r['min_ms']:.1f}", mins, medians, per_round,
                  compile_cell, _load_cell(result),
                  f"{result['versions'].get('optax_dp_git', '?')}, {result['rounds']} rounds"])
  return _common.markdown_table(headers, lines)


def memory_ratios() -> list[dict]:
  """Peak RSS of each DP row against its framework's non-private row.

  One dict per (model, row, batch): "model", "row", "batch_size",
  "max_rss_mib", "ratio", "result".
  """
  out = []
  for name, model in MEMORY:
    result = _load(name)
    if result is None:
      continue
    entries = result["results"]
    for e in entries.values():
      row, batch = e["row"], e["batch_size"]
      if row not in ROWS:
        continue
      base = entries.get(f"{_base(row)}@{batch}")
      if base is None or "max_rss_mib" not in e:
        continue
      out.append({"model": model, "row": row, "batch_size": batch,
                  "max_rss_mib": e["max_rss_mib"],
                  "ratio": e["max_rss_mib"] / base["max_rss_mib"], "result": result})
  return out


def memory_table() -> str:
  """Peak RSS of the auto and vmap rows against their non-private rows."""
  headers = ["model", "row", "batch", "peak RSS MiB", "/ non-private", "load"]
  lines = [[m["model"], m["row"], str(m["batch_size"]), f"{m['max_rss_mib']:.0f}",
            _common.fmt_ratio(m["ratio"]), _load_cell(m["result"])]
           for m in memory_ratios()]
  return _common.markdown_table(headers, lines)


def main() -> None:
  print("Step time (each DP row against its framework's non-private step, same run)\n")
  print(timing_table())
  print("\nPeak memory (max RSS, one process per row)\n")
  print(memory_table())


if __name__ == "__main__":
  main()
