"""GPU check: step time and peak device memory of non-private vs auto vs vmap.

One command for a lent accelerator machine (never needed by CI): on the
example's CNN (step_time.py) and the small transformer (transformer_step.py),
Flax Linen and NNX, the rows

  non_private, optax_dp_auto, optax_dp_vmap,
  nnx_non_private, nnx_optax_dp_auto, nnx_optax_dp_vmap

at each batch size of --cnn-batch-sizes (256,1024) and
--transformer-batch-sizes (64,256); and the Shakespeare language model
(lm_step.py: its Linen, NNX and LoRA rows, private against non-private) at
each batch size of --lm-batch-sizes (512) and length --lm-length (64; step
time only: peak_memory.py has no LM rows). --models: any of cnn,
transformer, lm. Four phases:

  1. device probe, in a subprocess: jax.devices()[0].platform, device_kind and
     whether memory_stats() is available. A CPU backend is refused (exit 2)
     unless --allow-cpu (for validating this script only): the output and
     the JSON then say loudly that no figure is a GPU figure.
  2. peak device memory: every (model, batch size, row), plus `import_only`
     (params and batch only: the floor), in its own subprocess, one at a time,
     so that peaks do not accumulate: peak_memory.py's `one_row` runs --steps
     steps, then `jax.devices()[0].memory_stats()["peak_bytes_in_use"]` is
     read. Where memory_stats() is unavailable (the CPU backend returns None)
     the first subprocess says so and no more are run. Runs before the timing
     phase, while this process holds no device memory (JAX preallocates 75%
     of a GPU per process).
  3. step time, in this process: step_time.main / transformer_step.main with
     --rows (the six rows), --rounds, --batch-size and --json-out, and
     --check at each model's first batch size (the check runs at batch 16,
     whatever --batch-size).
  4. on a machine of several devices, sharded_step.main: the LM's
     private step against its non-private one with the parameters split over
     the devices (data parallel, FSDP, tensor parallel), and XLA's per-device
     memory analysis; skipped on one device.

Writes one JSON (--json-out, default benchmarks/results/gpu_check.json) and
prints, per model, one markdown table: median / min ms, the three ratios to
the same framework's non-private row (Linen rows to non_private, NNX rows to
nnx_non_private, `_common.ratio_stats`), peak device MiB and its ratio to the
same framework's non-private peak.

Usage (on the lent machine, in the repository root; see benchmarks/README.md):
  PYTHONPATH=. python3 benchmarks/gpu_check.py
Validation on CPU, tiny settings:
  python benchmarks/gpu_check.py --allow-cpu --rounds 1 --cnn-batch-sizes 16 \
      --transformer-batch-sizes 8 --json-out /tmp/gpu_check_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# First: _common reads the load average before JAX is imported. This process
# imports JAX only for the timing phase (after the memory subprocesses).
import _common  # pylint: disable=wrong-import-position

ROWS = ("non_private", "optax_dp_auto", "optax_dp_vmap",
        "nnx_non_private", "nnx_optax_dp_auto", "nnx_optax_dp_vmap")
MODELS = ("cnn", "transformer", "lm")
MEMORY_MODELS = ("cnn", "transformer")   # peak_memory.py's models
CPU_WARNING = ("WARNING: THE BACKEND IS CPU, NOT AN ACCELERATOR: a validation "
               "run of this script (--allow-cpu); none of these figures is a "
               "GPU figure")
MIB = 2 ** 20


def baseline_of(row: str) -> str:
  """The same framework's non-private row (LoRA rows: the non-private LoRA row)."""
  if row.startswith("nnx_lora_"):
    return "nnx_lora_non_private"
  return "nnx_non_private" if row.startswith("nnx_") else "non_private"


def _sizes(text: str) -> list[int]:
  sizes = [int(s) for s in text.split(",") if s.strip()]
  if not sizes or min(sizes) < 1:
    raise argparse.ArgumentTypeError(f"bad batch sizes {text!r}")
  return sizes


# ---------------------------------------------------------------- subprocesses

def _device_info() -> dict:
  """This process's first JAX device (imports JAX)."""
  import jax  # pylint: disable=import-outside-toplevel
  d = jax.devices()[0]
  stats = d.memory_stats()
  return {"platform": d.platform, "device_kind": d.device_kind,
          "device": str(d), "num_devices": jax.device_count(),
          "backend": jax.default_backend(), "jax": jax.__version__,
          "memory_stats_available": bool(stats),
          "bytes_limit": (stats or {}).get("bytes_limit")}


def probe_main() -> None:
  print("PROBE " + json.dumps(_device_info()), flush=True)


def memory_main(row: str, model: str, batch_size: int, steps: int) -> None:
  """Child: peak_memory.one_row (prints RESULT), then the device's peak."""
  import peak_memory  # pylint: disable=import-outside-toplevel
  peak_memory.one_row(row, batch_size, steps, model)
  import jax  # pylint: disable=import-outside-toplevel
  stats = jax.devices()[0].memory_stats()
  print("MEMORY " + json.dumps(
      {"platform": jax.devices()[0].platform,
       "peak_bytes_in_use": (stats or {}).get("peak_bytes_in_use"),
       "bytes_in_use": (stats or {}).get("bytes_in_use"),
       "bytes_limit": (stats or {}).get("bytes_limit"),
       "memory_stats_available": bool(stats)}), flush=True)


def _child(args: list[str], tags: tuple[str, ...]) -> tuple[dict, str | None]:
  """Runs this script with `args`; returns ({tag: parsed JSON line}, error)."""
  cmd = [sys.executable, os.path.abspath(__file__), *args]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  out = {"wall_s": time.perf_counter() - t0}
  for line in proc.stdout.splitlines():
    for tag in tags:
      if line.startswith(tag + " "):
        out[tag] = json.loads(line[len(tag) + 1:])
  missing = [t for t in tags if t not in out]
  if proc.returncode != 0 or missing:
    tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-8:])
    return out, f"{' '.join(cmd[1:])}: rc {proc.returncode}\n{tail}"
  return out, None


def measure_memory(models: dict[str, list[int]], steps: int) -> dict:
  """Phase 2: one subprocess per (model, B, row); stops at the first one that
  finds memory_stats() unavailable."""
  results = {m: {str(b): {} for b in sizes} for m, sizes in models.items()}
  record = {"available": None, "reason": None, "steps": steps,
            "results": results}
  print("\n## Peak device memory: one subprocess per (model, batch, row), "
        f"{steps} steps each", flush=True)
  for model, sizes in models.items():
    if model not in MEMORY_MODELS:
      continue
    for b in sizes:
      for row in ("import_only",) + ROWS:
        out, err = _child(["--memory-row", row, "--model", model,
                           "--batch-size", str(b), "--steps", str(steps)],
                          ("RESULT", "MEMORY"))
        if err:
          print(f"  {model} B={b} {row}: FAILED: {err}", flush=True)
          results[model][str(b)][row] = {"error": err}
          continue
        mem = out["MEMORY"]
        if not mem["memory_stats_available"]:
          record.update(available=False, reason=(
              f"jax.devices()[0].memory_stats() is unavailable on platform "
              f"{mem['platform']!r} (it returned None): no peak device memory "
              "is recorded"))
          print(f"  {record['reason']}; no more memory subprocesses run "
                f"(this one took {out['wall_s']:.1f} s)", flush=True)
          return record
        record["available"] = True
        results[model][str(b)][row] = {
            **out["RESULT"], **mem,
            "peak_mib": mem["peak_bytes_in_use"] / MIB, "wall_s": out["wall_s"]}
        print(f"  {model} B={b} {row}: peak {mem['peak_bytes_in_use'] / MIB:.1f}"
              f" MiB ({out['wall_s']:.1f} s)", flush=True)
  return record


# ---------------------------------------------------------------- timing

def measure_time(models: dict[str, list[int]], rounds: int, lm_length: int = 64) -> dict:
  """Phase 3: the scripts' own main(argv), in this process; returns
  {model: {B: their JSON}}."""
  import step_time  # pylint: disable=import-outside-toplevel
  import transformer_step  # pylint: disable=import-outside-toplevel
  import lm_step  # pylint: disable=import-outside-toplevel
  mains = {"cnn": step_time.main, "transformer": transformer_step.main, "lm": lm_step.main}
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    for model, sizes in models.items():
      out[model] = {}
      for i, b in enumerate(sizes):
        path = os.path.join(tmp, f"{model}_{b}.json")
        if model == "lm":
          argv = ["--rounds", str(rounds), "--batch-size", str(b), "--length",
                  str(lm_length), "--json-out", path]
        else:
          argv = ["--rows", ",".join(ROWS), "--rounds", str(rounds),
                  "--batch-size", str(b), "--json-out", path]
          argv += ["--check"] if i == 0 else []
        print(f"\n## Step time: {model}, batch {b}: "
              f"{mains[model].__module__}.main({' '.join(argv)})", flush=True)
        mains[model](argv)
        with open(path) as f:
          out[model][str(b)] = json.load(f)
  return out


def measure_sharded(num_devices: int, rounds: int) -> dict:
  """Phase 4, on a machine of several devices: sharded_step.main (the LM's
  private against non-private step with its parameters split: data
  parallel, FSDP, tensor parallel); its JSON, or why it did not run."""
  if num_devices < 2:
    print("\n## Sharded step: skipped (one device)", flush=True)
    return {"skipped": f"{num_devices} device"}
  import sharded_step  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "sharded.json")
    argv = ["--rounds", str(rounds), "--json-out", path]
    print(f"\n## Sharded step: sharded_step.main({' '.join(argv)})", flush=True)
    sharded_step.main(argv)
    with open(path) as f:
      return json.load(f)


# ---------------------------------------------------------------- tables

def model_table(model: str, timing: dict, memory: dict) -> str:
  """One model's rows at every batch size: time and memory ratios to the same
  framework's non-private row."""
  headers = ["batch", "row", "median ms", "min ms",
             "median / same-fw non-private median", "median of per-round ratios",
             "min / same-fw non-private min", "peak device MiB",
             "peak / same-fw non-private peak"]
  rows = []
  for b, run in timing.items():
    summary = run["rows"]
    mem = memory["results"].get(model, {}).get(b, {})
    for name in summary if model == "lm" else ROWS:
      if name not in summary:
        continue
      s = summary[name]
      base = summary.get(baseline_of(name), {}).get("times_ms")
      stats = _common.ratio_stats(s["times_ms"], base)
      peak = mem.get(name, {}).get("peak_mib")
      base_peak = mem.get(baseline_of(name), {}).get("peak_mib")
      rows.append([b, name, f"{s['median_ms']:.2f}", f"{s['min_ms']:.2f}",
                   *_common.ratio_cells(stats),
                   "n/a" if peak is None else f"{peak:.1f}",
                   _common.fmt_ratio(peak / base_peak if peak is not None
                                     and base_peak else None)])
    floor = mem.get("import_only", {}).get("peak_mib")
    if floor is not None:
      rows.append([b, "import_only (params + batch)", "", "", "", "", "",
                   f"{floor:.1f}", ""])
  return _common.markdown_table(headers, rows)


def report(device: dict, timing: dict, memory: dict, rounds: int) -> str:
  cpu = device["platform"] == "cpu"
  head = (f"GPU check on {device['device_kind']} (platform {device['platform']}, "
          f"{device['num_devices']} device(s), jax {device['jax']}); "
          f"{rounds} rounds; C={_common.L2_NORM_CLIP}, "
          f"sigma={_common.NOISE_MULTIPLIER}")
  mem_note = ("Peak device memory: `memory_stats()['peak_bytes_in_use']` after "
              f"{memory['steps']} steps, one subprocess per row."
              if memory["available"] else f"Peak device memory: n/a: "
              f"{memory['reason']}.")
  parts = ([CPU_WARNING, ""] if cpu else []) + [head, "", mem_note]
  for model, runs in timing.items():
    parts += ["", f"### {model}", "", model_table(model, runs, memory)]
  text = _common.with_load("\n".join(parts), _common.load_record())
  return text + ("\n" + CPU_WARNING if cpu else "")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cnn-batch-sizes", type=_sizes, default=[256, 1024])
  parser.add_argument("--transformer-batch-sizes", type=_sizes, default=[64, 256])
  parser.add_argument("--lm-batch-sizes", type=_sizes, default=[512])
  parser.add_argument("--lm-length", type=int, default=64)
  parser.add_argument("--models", default=",".join(MODELS),
                      help="comma list from cnn,transformer,lm (one per call keeps "
                      "a call short)")
  parser.add_argument("--rounds", type=int, default=20)
  parser.add_argument("--memory-steps", type=int, default=3,
                      help="steps per memory subprocess (the first compiles)")
  parser.add_argument("--no-memory", action="store_true",
                      help="skip the peak-memory subprocesses")
  parser.add_argument("--json-out",
                      default=os.path.join(HERE, "results", "gpu_check.json"))
  parser.add_argument("--allow-cpu", action="store_true",
                      help="run on a CPU backend (to validate this script only)")
  # internal: the subprocesses
  parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--memory-row", help=argparse.SUPPRESS)
  parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
  parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.probe:
    return probe_main()
  if args.memory_row:
    return memory_main(args.memory_row, args.model, args.batch_size, args.steps)
  if args.rounds < 1 or args.memory_steps < 1:
    parser.error("--rounds and --memory-steps must be >= 1")

  wanted = [m.strip() for m in args.models.split(",") if m.strip()]
  if not wanted or any(m not in MODELS for m in wanted):
    parser.error(f"--models: choose from {','.join(MODELS)}")

  t_start = time.perf_counter()
  out, err = _child(["--probe"], ("PROBE",))
  if err:
    sys.exit(f"device probe failed: {err}")
  device = out["PROBE"]
  print(f"device: {device['device_kind']} (platform {device['platform']}, "
        f"{device['device']}, {device['num_devices']} device(s), jax "
        f"{device['jax']}); memory_stats available: "
        f"{device['memory_stats_available']}", flush=True)
  cpu = device["platform"] == "cpu"
  if cpu and not args.allow_cpu:
    print("REFUSED: the JAX backend is CPU, not an accelerator. Install a "
          "GPU jaxlib (or run where one is), or pass --allow-cpu to validate "
          "this script with CPU figures.", flush=True)
    sys.exit(2)
  if cpu:
    print(CPU_WARNING, flush=True)

  sizes = {"cnn": args.cnn_batch_sizes,
           "transformer": args.transformer_batch_sizes, "lm": args.lm_batch_sizes}
  models = {m: sizes[m] for m in MODELS if m in wanted}
  memory = ({"available": None, "reason": "not measured (--no-memory)",
             "steps": args.memory_steps, "results": {}} if args.no_memory
            else measure_memory(models, args.memory_steps))
  timing = measure_time(models, args.rounds, args.lm_length)
  sharded = measure_sharded(device["num_devices"], args.rounds)
  markdown = report(device, timing, memory, args.rounds)
  if sharded.get("markdown"):
    markdown += ("\n\n## Parameters split over the devices (sharded_step.py)\n\n"
                 + sharded["markdown"])
  print("\n" + markdown, flush=True)
  wall = time.perf_counter() - t_start
  print(f"\ngpu_check wall time: {wall:.0f} s", flush=True)
  _common.write_json(
      args.json_out, device=device, cpu_validation_only=cpu,
      warning=CPU_WARNING if cpu else None, rows=list(ROWS),
      batch_sizes=models, rounds=args.rounds, memory=memory, timing=timing,
      sharded=sharded, markdown=markdown, wall_s=wall, load=_common.load_record())


if __name__ == "__main__":
  main()
