"""Every figure of the README and the docs site, from committed JSON records.

Run:  python examples/plot_results.py      # writes docs/figures/*.png

One command regenerates them all (matplotlib, no training, no benchmark run):

* `privacy_utility.png`: the recipes' test accuracy against epsilon, from every
  record `train.py --json-out` wrote under `--results` (examples/results),
  grouped by recipe (one record per seed): mean and standard deviation over
  the seeds. Only test-set records of private runs count (`evaluated_on ==
  "test"`); validation runs (tuning) are left out. The `train.py --tune`
  records (results/tuned), whose epsilon covers the whole tuning, are drawn
  dashed beside them. Also printed as a table.
* `tutorial_run.png`: accuracy and epsilon spent against the step of one run
  (`--run`, a record of `mnist_linen.py --json-out` with its "history"); the
  examples' `--plot PATH` draws the same figure of their own run (`plot_run`).
* `step_time.png` and `peak_memory.png`: each private step against its own
  framework's non-private step, optax_dp and its peers, from
  benchmarks/results/*.json (through benchmarks/readme_tables.py, which
  prints the same figures as the README's tables).

Sizes: every figure is at most FIGURE_WIDTH_IN wide, the docs site's column
at a desktop width (1280 px: 688 CSS px, 7.2 in at 96 px an inch), and no text
in it is smaller than MIN_FONT_PT, so shown at the column's width (or wider,
as on GitHub) its labels are at least MIN_FONT_PT points. The PNGs are saved
at DPI dots an inch, sharp on high-density screens. `_save` refuses a figure
that breaks either rule; tests/test_docs.py checks the displayed size in
Chromium.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import statistics
import sys
import textwrap
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIGURES = os.path.join(ROOT, "docs", "figures")
TUTORIAL_RUN = os.path.join(HERE, "results", "full_runs", "mnist_linen_eps1_seed0.json")
LM_RESULTS = os.path.join(HERE, "results", "shakespeare")
FIGURE_WIDTH_IN = 7.0   # at most the docs column's 7.2 in
MIN_FONT_PT = 10.0
DPI = 200


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  plt.rcParams.update({"font.size": MIN_FONT_PT, "axes.titlesize": 11,
                       "figure.titlesize": 11, "legend.fontsize": MIN_FONT_PT})
  return plt


def _wrap(text: str, width: int = 72) -> str:
  """`text` in lines of at most `width` characters (a title that fits)."""
  return "\n".join(textwrap.wrap(text, width))


def _save(fig, path: str) -> None:
  """Saves `fig` at DPI after checking its width and every text's size."""
  import matplotlib.text  # pylint: disable=import-outside-toplevel
  width = fig.get_size_inches()[0]
  if width > FIGURE_WIDTH_IN + 1e-9:
    raise ValueError(f"{path}: the figure is {width} in wide, more than {FIGURE_WIDTH_IN}")
  small = sorted({(t.get_text(), t.get_fontsize()) for t in fig.findobj(matplotlib.text.Text)
                  if t.get_visible() and t.get_text().strip()
                  and t.get_fontsize() < MIN_FONT_PT})
  if small:
    raise ValueError(f"{path}: text smaller than {MIN_FONT_PT} pt: {small}")
  fig.savefig(path, dpi=DPI)


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
      # A tuning's published record leaves its wall time out (it reveals K).
      "seconds": ((min(r["seconds"] for r in records), max(r["seconds"] for r in records))
                  if all("seconds" in r for r in records) else None),
  }


def load_tuned(results_dir: str) -> dict[str, list[dict]]:
  """{`recipe --tune GRID`: [records]} of the private tuning runs
  (train.py --tune, their records under results_dir/tuned)."""
  groups = collections.defaultdict(list)
  for path in sorted(glob.glob(os.path.join(results_dir, "tuned", "*.json"))):
    with open(path) as f:
      record = json.load(f)
    if record.get("tuning") and record.get("test_accuracy") is not None:
      tuning = record["tuning"]
      groups[f'{record["recipe"]} --epsilon {tuning["target_epsilon"]:g} '
             f'--tune "{tuning["grid"]}"'].append(record)
  return dict(groups)


# What the epsilon of a row of the recipe table covers.
ONE_RUN = "one run (its tuning excluded)"
END_TO_END = "the whole tuning (end to end, RDP)"


def markdown_table(summaries: dict[str, dict]) -> str:
  lines = ["| recipe | dataset | model | epsilon spent | epsilon covers | test accuracy (mean ± std) "
           "| seeds | training loop |", "|---|---|---|---|---|---|---|---|"]
  for name, s in sorted(summaries.items(), key=lambda kv: (kv[1]["dataset"], kv[1]["epsilon"])):
    each = ", ".join(f"{100 * a:.2f}" for a in s["accuracies"])
    loop = (f"{s['seconds'][0]:.0f}-{s['seconds'][1]:.0f} s" if s["seconds"]
            else "not published (it reveals K)")
    lines.append(f"| `{name}` | {s['dataset']} | {s['model']} | {s['epsilon']:.4f} | "
                 f"{s.get('covers', ONE_RUN)} | "
                 f"{100 * s['accuracy_mean']:.2f}% ± {100 * s['accuracy_std']:.2f}% ({each}) | "
                 f"{s['seeds']} | {loop} |")
  return "\n".join(lines)


def plot(summaries: dict[str, dict], png: str,
         tuned: Optional[dict[str, dict]] = None) -> None:
  """One panel per dataset: each model's single-run rows (epsilon of one run,
  its tuning excluded) as a solid line, and its `--tune` rows (epsilon of the
  whole tuning) as a dashed one."""
  plt = _pyplot()

  series = collections.defaultdict(list)
  for s in summaries.values():
    series[(s["dataset"], s["model"], "")].append(s)
  for s in (tuned or {}).values():
    series[(s["dataset"], s["model"], ", tuned inside epsilon")].append(s)
  # One epsilon axis from 0 for every panel: a panel whose points all sit
  # near one epsilon would otherwise zoom into its digits (an offset axis).
  max_epsilon = max(s["epsilon"] for points in series.values() for s in points)
  datasets = sorted({dataset for dataset, _, _ in series})
  fig, axes = plt.subplots(1, len(datasets), figsize=(FIGURE_WIDTH_IN, 6.0), squeeze=False)
  for ax, dataset in zip(axes[0], datasets):
    colours = {}
    for (d, model, kind), points in sorted(series.items()):
      if d != dataset:
        continue
      points.sort(key=lambda s: s["epsilon"])
      line = ax.errorbar([s["epsilon"] for s in points], [100 * s["accuracy_mean"] for s in points],
                         yerr=[100 * s["accuracy_std"] for s in points], marker="o", capsize=3,
                         linestyle="--" if kind else "-", color=colours.get(model),
                         label=model + kind)
      colours.setdefault(model, line[0].get_color())
    ax.set_xlim(0, 1.1 * max_epsilon)
    ax.ticklabel_format(useOffset=False)
    ax.set_xlabel("epsilon")
    ax.set_title(dataset)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16))
  axes[0][0].set_ylabel("test accuracy (%)")
  fig.suptitle(_wrap("Test accuracy (mean ± std over seeds) against epsilon (delta 1e-5, "
                     "Poisson sampling; PLD for one run, its tuning excluded; RDP for "
                     "the whole tuning where dashed)"))
  fig.tight_layout()
  _save(fig, png)
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
  fig, (acc_ax, eps_ax) = plt.subplots(2, 1, figsize=(FIGURE_WIDTH_IN, 5.6), sharex=True)
  split = record.get("evaluated_on") or "test"
  acc_ax.plot(steps, [100 * h["eval_accuracy"] for h in history], marker="o", ms=3,
              label=f"{split} accuracy")
  acc_ax.plot(steps, [100 * h["train_accuracy"] for h in history], ls="--",
              label="train accuracy (mean since the last evaluation)")
  acc_ax.set_ylabel("accuracy (%)")
  acc_ax.grid(alpha=0.3)
  acc_ax.legend(loc="lower right")
  epsilons = [h["epsilon"] for h in history]
  if all(e is not None for e in epsilons):
    eps_ax.plot(steps, epsilons, color="tab:red", marker="o", ms=3)
    eps_ax.set_ylabel(f"epsilon spent\n(delta {record.get('delta')})")
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
  fig.suptitle(_wrap(title))
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


def _readme_tables():
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import readme_tables  # pylint: disable=import-outside-toplevel
  return readme_tables


ROW_LABELS = {"optax_dp_auto": "optax_dp auto (Linen)", "nnx_optax_dp_auto": "optax_dp auto (NNX)",
              "optax_dp_vmap": "optax_dp vmap (Linen)", "nnx_optax_dp_vmap": "optax_dp vmap (NNX)",
              "optax_contrib": "optax.contrib dpsgd", "jax_privacy": "jax_privacy 2 clipped_grad",
              "nnx_lora_auto": "optax_dp auto, LoRA (NNX)"}


def _bars(ax, groups: list[str], series: dict[str, dict[str, float]], xlabel: str) -> None:
  """Horizontal bars, top to bottom: one block per group (its name above it),
  one bar per series that has a value there, named on the left and labelled
  with its value at its end; a line at 1 (the non-private reference)."""
  colors = {label: f"C{k}" for k, label in enumerate(series)}
  y, ticks, names = 0.0, [], []
  for group in groups:
    ax.text(0.005, y - 0.1, group, transform=ax.get_yaxis_transform(), ha="left",
            va="bottom", fontweight="bold", zorder=5,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    y += 0.55
    for label, values in series.items():
      value = values.get(group, float("nan"))
      if value != value:
        continue
      bar = ax.barh(y, value, height=0.75, color=colors[label])
      for text in ax.bar_label(bar, labels=[f"{value:.2f}"], padding=3):
        text.set_bbox({"facecolor": "white", "edgecolor": "none", "pad": 0.5})
      ticks.append(y)
      names.append(label)
      y += 1.0
    y += 0.65
  ax.set_yticks(ticks, names)
  ax.set_ylim(y - 0.4, -0.9)
  ax.axvline(1.0, color="black", lw=0.8, zorder=0.5)
  ax.set_xlabel(xlabel)
  ax.grid(axis="x", alpha=0.3)


def _bar_height(groups: list[str], series: dict[str, dict[str, float]]) -> float:
  """Inches of figure for the bars of `_bars` (plus title and axis)."""
  bars = sum(1 for values in series.values() for group in groups
             if values.get(group, float("nan")) == values.get(group, float("nan")))
  return 1.6 + 0.27 * bars + 0.33 * len(groups)


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
  fig, ax = plt.subplots(figsize=(FIGURE_WIDTH_IN, _bar_height(models, series)))
  _bars(ax, models, series, "step time / non-private step (min over interleaved rounds; log)")
  ax.set_xscale("log")
  ax.set_xlim(right=ax.get_xlim()[1] * 2.5)   # room for the largest bar's label
  loads = sorted({r["result"]["load"]["before"] for r in ratios if r["result"].get("load")})
  fig.suptitle(_wrap("One private training step against the same framework's non-private "
                     f"step (2-core CPU, 1-min load before each run {loads[0]:.2f}-"
                     f"{loads[-1]:.2f}; lower is better)"))
  fig.tight_layout()
  _save(fig, path)
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
  fig, ax = plt.subplots(figsize=(FIGURE_WIDTH_IN, _bar_height(groups, series) + 0.5))
  _bars(ax, groups, series, "peak memory / non-private (max RSS of the process)")
  ax.set_xlim(0, ax.get_xlim()[1] * 1.12)   # room for the largest bar's label
  fig.suptitle(_wrap("Peak memory of a private training step against the non-private one "
                     "(one process per row; lower is better)"))
  fig.tight_layout(rect=(0, 0.045, 1, 1))
  fig.text(0.01, 0.01, _wrap("Peers (optax.contrib, jax_privacy) measured for the CNN only; "
                             "jax_privacy at B=2048 not run (estimated >= 6.3 GiB).", 80),
           va="bottom")
  _save(fig, path)
  plt.close(fig)


def lm_summaries(results_dir: str) -> dict[str, dict]:
  """{run name: summary} of the Shakespeare language-model records (test plays):
  a private recipe by its name, a non-private run (`--no-dp`) as
  `NAME --no-dp`; each with the mean and std over seeds of the held-out
  accuracy and of the bits per character (the loss in nats / ln 2)."""
  groups = collections.defaultdict(list)
  for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
    with open(path) as f:
      record = json.load(f)
    if record.get("dataset") == "shakespeare" and record.get("evaluated_on") == "test":
      suffix = (" --clip-only" if record.get("clip_only") else
                " --public-only" if record.get("public_only") else
                "" if record.get("private") else " --no-dp")
      groups[record["recipe"] + suffix].append(record)
  out = {}
  for name, records in groups.items():
    bits = [r["test_loss"] / math.log(2) for r in records]
    out[name] = dict(summarise([dict(r, epsilon=r["epsilon"] or math.inf) for r in records]),
                     private=bool(records[0].get("private")), bits_mean=statistics.fmean(bits),
                     bits_std=statistics.stdev(bits) if len(bits) > 1 else 0.0,
                     finetune="lora" in name or "finetune" in name,
                     privacy_unit=records[0].get("privacy_unit") or "example",
                     role_windows_max=records[0].get("role_windows_max"),
                     public_only=bool(records[0].get("public_only")),
                     run={k: records[0].get(k) for k in (   # the seeds share these
                         "noise_multiplier", "delta", "steps", "dataset_size",
                         "batch_size", "accountant", "sampler")})
  return out


def speaker_guarantee(summary: dict, largest_role: int | None) -> str:
  """What a run guarantees the speaker with the most windows (`largest_role`
  of them): a user-level run protects every role whole at its epsilon; an
  example-level run only as a group of that many examples
  (`optax_dp.group_privacy`, at the run's delta); a non-private run nothing."""
  if not summary["private"]:
    return "none (non-private)"
  if summary.get("privacy_unit") == "user":
    return f"{summary['epsilon']:.4f} (user level: each role whole)"
  if largest_role is None or summary["run"]["sampler"] != "poisson":
    return "not recorded"
  import optax_dp  # pylint: disable=import-outside-toplevel
  r = summary["run"]
  group = optax_dp.group_privacy(
      r["noise_multiplier"], r["delta"], largest_role, steps=r["steps"],
      sampler=optax_dp.PoissonSampler(r["dataset_size"], r["batch_size"]),
      accountant=r["accountant"])
  if math.isinf(group.epsilon):
    return f"none (group of {largest_role}: the bound is vacuous)"
  return f"{group.epsilon:.4g} (group of {largest_role})"


def lm_markdown_table(summaries: dict[str, dict]) -> str:
  largest = max((s["role_windows_max"] for s in summaries.values()
                 if s.get("role_windows_max")), default=None)
  lines = ["| run | privacy unit | epsilon | the largest role's guarantee (epsilon) | "
           "held-out accuracy (mean ± std) | bits per char | seeds | training loop |",
           "|---|---|---|---|---|---|---|---|"]
  for name, s in sorted(summaries.items(), key=lambda kv: (
      kv[1]["finetune"], kv[1].get("privacy_unit") == "user", -kv[1]["epsilon"])):
    each = ", ".join(f"{100 * a:.2f}" for a in s["accuracies"])
    lo, hi = s["seconds"]
    loop = "—" if s["public_only"] else f"{lo:.0f}-{hi:.0f} s"
    eps = (f"{s['epsilon']:.4f}" if s["private"] else
           "none (no private data)" if s["public_only"] else "none (non-private)")
    unit = ("role (user)" if s.get("privacy_unit") == "user" else "window (example)"
            ) if s["private"] else "—"
    speaker = ("nothing to protect (no role read)" if s["public_only"]
               else speaker_guarantee(s, largest))
    lines.append(f"| `{name}` | {unit} | {eps} | {speaker} | "
                 f"{100 * s['accuracy_mean']:.2f}% ± "
                 f"{100 * s['accuracy_std']:.2f}% ({each}) | {s['bits_mean']:.3f} ± "
                 f"{s['bits_std']:.3f} | {s['seeds']} | {loop} |")
  return "\n".join(lines)


def _seeds(summary: dict) -> str:
  return f"{summary['seeds']} seed" + ("s" if summary["seeds"] != 1 else "")


def plot_language_model(summaries: dict[str, dict], png: str) -> None:
  """Held-out next-character accuracy against epsilon: the private runs from
  scratch as a curve, the fine-tunes of the publicly pretrained model as
  points, each non-private run as a horizontal line."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(FIGURE_WIDTH_IN, 7.0))
  families = collections.defaultdict(list)   # private from scratch, example level: curves
  for s in summaries.values():
    if s["private"] and not s["finetune"] and s.get("privacy_unit") != "user":
      families[s["model"]].append(s)
  for model, points in sorted(families.items(), key=lambda kv: kv[0] != "transformer"):
    points.sort(key=lambda s: s["epsilon"])
    ax.errorbar([s["epsilon"] for s in points], [100 * s["accuracy_mean"] for s in points],
                yerr=[100 * s["accuracy_std"] for s in points], marker="o", capsize=3,
                label=f"{model}, private from scratch (seeds: "
                + ", ".join(str(s["seeds"]) for s in points) + ")")
  for name, s in sorted(summaries.items()):
    if s["private"] and (s["finetune"] or s.get("privacy_unit") == "user"):
      ax.errorbar([s["epsilon"]], [100 * s["accuracy_mean"]], yerr=[100 * s["accuracy_std"]],
                  marker="s", capsize=3, linestyle="none", label=f"{name} ({_seeds(s)})")
    elif not s["private"]:
      ax.axhline(100 * s["accuracy_mean"], color="0.4" if s["model"] == "transformer" else "0.7",
                 linestyle=":" if name.endswith("--clip-only") else "--",
                 label=f"{name} ({_seeds(s)})")
  ax.set_xlim(0, 1.1 * max([s["epsilon"] for s in summaries.values() if s["private"]] or [1]))
  ax.set_xlabel("epsilon (per window of 65 characters; per role for the user-level points)")
  ax.set_ylabel("held-out accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1)
  fig.suptitle(_wrap("Shakespeare character LM: held-out next-character accuracy (mean ± std "
                     "over seeds) against epsilon (delta 1e-5, Poisson, PLD)"))
  fig.tight_layout()
  _save(fig, png)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--results", default=os.path.join(HERE, "results"),
                 help="the recipes' JSON records (train.py --json-out)")
  p.add_argument("--run", default=TUTORIAL_RUN,
                 help="the JSON record (with its history) of the run to draw as tutorial_run.png")
  p.add_argument("--lm-results", default=LM_RESULTS,
                 help="the language-model runs' JSON records (train.py --recipe shakespeare-*)")
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
  tuned = {name: dict(summarise(records), covers=END_TO_END)
           for name, records in load_tuned(args.results).items()}
  print(markdown_table({**summaries, **tuned}))
  if args.table_only:
    return
  written = [os.path.join(args.out, name) for name in
             ("privacy_utility.png", "tutorial_run.png", "step_time.png", "peak_memory.png")]
  plot(summaries, written[0], tuned)
  with open(args.run) as f:
    plot_run(json.load(f), written[1])
  plot_step_time(written[2])
  plot_peak_memory(written[3])
  lm = lm_summaries(args.lm_results)
  if lm:
    print(lm_markdown_table(lm))
    written.append(os.path.join(args.out, "language_model.png"))
    plot_language_model(lm, written[-1])
  for path in written:
    print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
  main()
