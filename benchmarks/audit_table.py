"""The audit's results table (docs/audit.md): optax_dp.audit on the real
dp_aggregate and on each planted bug of issue 5, at the settings of
tests/planted_bugs.py (the ones tests/test_audit.py checks).

Run:  .venv/bin/python benchmarks/audit_table.py [--seeds 0 1 2] [--json-out F]
Several seeds show how much the bound moves with the run's randomness.
"""

import argparse
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import planted_bugs  # noqa: E402  pylint: disable=wrong-import-position


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0])
  p.add_argument("--json-out", default=None)
  args = p.parse_args()
  rows = []
  print("| transform | noise multiplier | canaries (per step) | claimed epsilon | "
        "lower bound (95%), seeds " + ", ".join(map(str, args.seeds)) +
        " | verdict | tightness | seconds |")
  print("|---|---|---|---|---|---|---|---|")
  for name, factory, sigma, m, per_step in planted_bugs.SETTINGS:
    bounds, verdicts, seconds = [], [], []
    for seed in args.seeds:
      start = time.time()
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = planted_bugs.run_setting(factory, sigma, m, per_step, seed=seed)
      seconds.append(time.time() - start)
      bounds.append(report.epsilon_lower_bound)
      verdicts.append(report.verdict)
      rows.append(dict(transform=name, noise_multiplier=sigma, num_canaries=m,
                       canaries_per_step=per_step, seed=seed,
                       claimed_epsilon=report.claimed_epsilon,
                       lower_bound=report.epsilon_lower_bound, verdict=report.verdict,
                       bounds_by_score=report.bounds_by_score, seconds=seconds[-1]))
    print(f"| {name} | {sigma} | {m} ({per_step}) | {report.claimed_epsilon:.3f} | "
          + ", ".join(f"{b:.3f}" for b in bounds)
          + f" | {'/'.join(sorted(set(verdicts)))} | "
          + f"{min(bounds) / report.claimed_epsilon:.2f}-{max(bounds) / report.claimed_epsilon:.2f}"
          + f" | {sum(seconds) / len(seconds):.0f} |", flush=True)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
