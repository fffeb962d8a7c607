"""The recipes' results, from their JSON records: a table and a privacy-utility plot.

Run:  python examples/plot_results.py [--results examples/results]
          [--png examples/results/privacy_utility.png]

Reads every `*.json` record `train.py --json-out` wrote under `--results`,
groups them by recipe (one record per seed), prints a markdown table (mean and
standard deviation of the test accuracy over the seeds, the epsilon spent,
the training-loop time) and draws test accuracy against epsilon, one series
per dataset and model, error bars the standard deviation over seeds. Only
test-set records of private runs count (`evaluated_on == "test"`); validation
runs (tuning) are left out.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))


def load_records(results_dir: str) -> dict[str, list[dict]]:
  """{recipe: [records]} of the private test-set runs under results_dir."""
  groups = collections.defaultdict(list)
  for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
    with open(path) as f:
      record = json.load(f)
    if record.get("recipe") and record.get("private") and record.get("evaluated_on") == "test":
      groups[record["recipe"]].append(record)
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
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

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


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--results", default=os.path.join(HERE, "results"))
  p.add_argument("--png", default=os.path.join(HERE, "results", "privacy_utility.png"))
  args = p.parse_args(argv)
  groups = load_records(args.results)
  if not groups:
    raise SystemExit(f"no private test-set records of train.py under {args.results}")
  summaries = {name: summarise(records) for name, records in groups.items()}
  print(markdown_table(summaries))
  plot(summaries, args.png)
  print(f"wrote {args.png}")


if __name__ == "__main__":
  main()
