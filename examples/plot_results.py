"""Every figure of the README and the docs site, from committed JSON records.

Run:  python examples/plot_results.py      # writes docs/figures/*.png

One command regenerates them all (matplotlib, no training, no benchmark run):

* `privacy_utility.png`: the recipes' test accuracy against epsilon, from every
  record `train.py --json-out` wrote under `--results` (examples/results),
  grouped by recipe (one record per seed): mean and standard deviation over
  the seeds. Only test-set records of private runs count (`evaluated_on ==
  "test"`); validation runs (tuning) are left out. Also printed as a table.
* `tutorial_run.png`: accuracy and epsilon spent against the step of one run
  (`--run`, a record of `mnist_linen.py --json-out` with its "history"); the
  examples' `--plot PATH` draws the same figure of their own run (`plot_run`).
* `step_time.png` and `peak_memory.png`: each private step against its own
  framework's non-private step, optax_dp and its peers, from
  benchmarks/results/*.json (through benchmarks/readme_tables.py, which
  prints the same figures as the README's tables).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIGURES = os.path.join(ROOT, "docs", "figures")
TUTORIAL_RUN = os.path.join(HERE, "results", "full_runs", "mnist_linen_eps1_seed0.json")


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def load_records(results_dir: str) -> dict[str, list[dict]]:
  """{recipe: [records]} of the private test-set runs under results_dir."""
  groups = collections.defaultdict(list)
  for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
    with open(path) as f:
      record = json.load(f)
    if record.get("recipe") and record.get("private") and record.get("evaluated_on") == "test":
      name = record["recipe"]
      if record.get("noise") == "bandmf":   # examples/results/bandmf: DP-BandMF runs
        name += f" --noise bandmf --bands {record['bands']}"
      strategy = record.get("clipping_strategy") or "flat"   # examples/results/adaptive
      if strategy == "adaptive":
        name += (f" --clipping-strategy adaptive --l2-norm-clip {record['l2_norm_clip']:g}"
                 f" --target-quantile {record['target_quantile']:g}")
      elif strategy != "flat":
        name += f" --clipping-strategy {strategy}"
      groups[name].append(record)
  return dict(groups)


def summarise(records: list[dict]) -> dict:
  """Mean and standard deviation (over seeds) of one recipe's records."""
  accuracies = [r["test_accuracy"] for r in records]
  return {
      "dataset": records[0]["dataset"], "model": records[0]["model"],
      "seeds": len(records), "accuracy_mean": statistics.fmean(accuracies),
      "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
      "accuracies": accuracies, "epsilon": max(r["epsilon"] for r in records),
      "seconds": (min(r["seconds"] for r in records), max(r["seconds"] for r in records)),
  }


def markdown_table(summaries: dict[str, dict]) -> str:
  lines = ["| recipe | dataset | model | epsilon spent | test accuracy (mean ± std) | seeds | "
           "training loop |", "|---|---|---|---|---|---|---|"]
  for name, s in sorted(summaries.items(), key=lambda kv: (kv[1]["dataset"], kv[1]["epsilon"])):
    each = ", ".join(f"{100 * a:.2f}" for a in s["accuracies"])
    lo, hi = s["seconds"]
    lines.append(f"| `{name}` | {s['dataset']} | {s['model']} | {s['epsilon']:.4f} | "
                 f"{100 * s['accuracy_mean']:.2f}% ± {100 * s['accuracy_std']:.2f}% ({each}) | "
                 f"{s['seeds']} | {lo:.0f}-{hi:.0f} s |")
  return "\n".join(lines)


def plot(summaries: dict[str, dict], png: str) -> None:
  plt = _pyplot()

  series = collections.defaultdict(list)
  for s in summaries.values():
    series[(s["dataset"], s["model"])].append(s)
  datasets = sorted({dataset for dataset, _ in series})
  # One epsilon axis from 0 for every panel: a panel whose points all sit
  # near one epsilon would otherwise zoom into its digits (an offset axis).
  max_epsilon = max(s["epsilon"] for s in summaries.values())
  fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
  for ax, dataset in zip(axes[0], datasets):
    for (d, model), points in sorted(series.items()):
      if d != dataset:
        continue
      points.sort(key=lambda s: s["epsilon"])
      ax.errorbar([s["epsilon"] for s in points], [100 * s["accuracy_mean"] for s in points],
                  yerr=[100 * s["accuracy_std"] for s in points], marker="o", capsize=3,
                  label=model)
    ax.set_xlim(0, 1.1 * max_epsilon)
    ax.ticklabel_format(useOffset=False)
    ax.set_xlabel("epsilon (delta 1e-5, Poisson sampling, PLD)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(dataset)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(png, dpi=120)
  plt.close(fig)


def plot_run(record: dict, path: str) -> None:
  """One run's figure: accuracy (train and evaluation) and epsilon spent vs step.

  `record`: a JSON record of mnist_linen.py, mnist_nnx.py or train.py (what
  their `--json-out` writes), with its "history" (one entry per evaluation).
  """
  history = record.get("history") or []
  if not history:
    raise ValueError("the record has no history (one entry per evaluation) to plot")
  plt = _pyplot()
  steps = [h["step"] for h in history]
  fig, (acc_ax, eps_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
  split = record.get("evaluated_on") or "test"
  acc_ax.plot(steps, [100 * h["eval_accuracy"] for h in history], marker="o", ms=3,
              label=f"{split} accuracy")
  acc_ax.plot(steps, [100 * h["train_accuracy"] for h in history], ls="--",
              label="train accuracy (mean since the last evaluation)")
  acc_ax.set_xlabel("step")
  acc_ax.set_ylabel("accuracy (%)")
  acc_ax.grid(alpha=0.3)
  acc_ax.legend(loc="lower right")
  epsilons = [h["epsilon"] for h in history]
  if all(e is not None for e in epsilons):
    eps_ax.plot(steps, epsilons, color="tab:red", marker="o", ms=3)
    eps_ax.set_ylabel(f"epsilon spent (delta {record.get('delta')})")
    eps_ax.set_ylim(0, 1.05 * max(epsilons))
  else:
    eps_ax.text(0.5, 0.5, "not private (--no-dp)", ha="center", transform=eps_ax.transAxes)
  eps_ax.set_xlabel("step")
  eps_ax.grid(alpha=0.3)
  final = history[-1]
  title = (f"{record.get('dataset', 'MNIST')}, {record.get('model') or 'CNN'}: "
           f"{100 * final['eval_accuracy']:.2f}% {split} accuracy at step {final['step']}")
  if record.get("epsilon") is not None:
    title += (f", epsilon {record['epsilon']:.4g} ({record.get('sampler')} sampling, "
              f"{record.get('accountant')}, noise multiplier {record.get('noise_multiplier'):.3g})")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _readme_tables():
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import readme_tables  # pylint: disable=import-outside-toplevel
  return readme_tables


ROW_LABELS = {"optax_dp_auto": "optax_dp auto (Linen)", "nnx_optax_dp_auto": "optax_dp auto (NNX)",
              "optax_dp_vmap": "optax_dp vmap (Linen)", "nnx_optax_dp_vmap": "optax_dp vmap (NNX)",
              "optax_contrib": "optax.contrib dpsgd", "jax_privacy": "jax_privacy 2 clipped_grad"}


def _bars(ax, groups: list[str], series: dict[str, dict[str, float]], ylabel: str) -> None:
  """Grouped bars: one group per model, one bar per series, labelled with its value."""
  width = 0.8 / max(len(series), 1)
  for k, (label, values) in enumerate(series.items()):
    xs = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))]
    heights = [values.get(group, float("nan")) for group in groups]
    bars = ax.bar(xs, heights, width, label=label)
    ax.bar_label(bars, labels=["" if h != h else f"{h:.2f}" for h in heights],
                 fontsize=6.5, padding=1)
  ax.axhline(1.0, color="black", lw=0.8)
  ax.set_xticks(range(len(groups)), groups, fontsize=8)
  ax.set_ylabel(ylabel)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8)


def plot_step_time(path: str) -> None:
  """Step time of each DP row / its framework's non-private step (min over rounds)."""
  tables = _readme_tables()
  ratios = tables.timing_ratios()
  models = list(dict.fromkeys(r["model"] for r in ratios))
  series = collections.defaultdict(dict)
  for r in ratios:
    series[ROW_LABELS[r["row"]]][r["model"]] = r["stats"]["ratio_of_mins"]
  series = {label: series[label] for label in ROW_LABELS.values() if label in series}
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(12.5, 4.4))
  _bars(ax, models, series, "step time / non-private step\n(min over interleaved rounds)")
  ax.set_yscale("log")
  loads = sorted({r["result"]["load"]["before"] for r in ratios if r["result"].get("load")})
  ax.set_title("One private training step against the same framework's non-private step "
               f"(2-core CPU, 1-min load before each run {loads[0]:.2f}-{loads[-1]:.2f}; lower is better)",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_peak_memory(path: str) -> None:
  """Peak memory (max RSS) of each DP row / its framework's non-private row."""
  tables = _readme_tables()
  ratios = tables.memory_ratios()
  groups = list(dict.fromkeys(f"{m['model']}, B={m['batch_size']}" for m in ratios))
  series = collections.defaultdict(dict)
  for m in ratios:
    series[ROW_LABELS[m["row"]]][f"{m['model']}, B={m['batch_size']}"] = m["ratio"]
  series = {label: series[label] for label in ROW_LABELS.values() if label in series}
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(12.5, 4.4))
  _bars(ax, groups, series, "peak memory / non-private\n(max RSS of the process)")
  fig.text(0.01, 0.01, "Peers (optax.contrib, jax_privacy) measured for the CNN only; jax_privacy at "
           "B=2048 not run (estimated >= 6.3 GiB).", fontsize=7)
  ax.set_title("Peak memory of a private training step against the non-private one "
               "(one process per row; lower is better)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--results", default=os.path.join(HERE, "results"),
                 help="the recipes' JSON records (train.py --json-out)")
  p.add_argument("--run", default=TUTORIAL_RUN,
                 help="the JSON record (with its history) of the run to draw as tutorial_run.png")
  p.add_argument("--out", default=FIGURES, help="where the PNGs go")
  p.add_argument("--table-only", action="store_true",
                 help="print the markdown table of --results, draw nothing "
                      "(e.g. --results examples/results/bandmf)")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  groups = load_records(args.results)
  if not groups:
    raise SystemExit(f"no private test-set records of train.py under {args.results}")
  summaries = {name: summarise(records) for name, records in groups.items()}
  print(markdown_table(summaries))
  if args.table_only:
    return
  written = [os.path.join(args.out, name) for name in
             ("privacy_utility.png", "tutorial_run.png", "step_time.png", "peak_memory.png")]
  plot(summaries, written[0])
  with open(args.run) as f:
    plot_run(json.load(f), written[1])
  plot_step_time(written[2])
  plot_peak_memory(written[3])
  for path in written:
    print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
  main()
