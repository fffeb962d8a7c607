"""examples/train.py beyond the recipe runs: a validation split replaces the
test set, bad flags are clear errors, the ScatterNet features are per image,
and the published records (examples/results/) state the epsilon of what ran
and are what plot_results.py summarises."""

import json
import math
import os
import statistics
import sys

import numpy as np
import pytest

import example_runs

sys.path.insert(0, example_runs.EXAMPLES)
import recipes  # noqa: E402
import scattering  # noqa: E402

_shared_compilation_cache = example_runs.compilation_cache_fixture()


@pytest.mark.slow
def test_validation_split_is_held_out_of_training_and_accounting(tmp_path):
  # Also the materialised path: per-example gradients that dp_aggregate clips.
  record, stdout = example_runs.run(
      tmp_path, "--recipe", "mnist-eps1", "--steps", "2", "--batch-size", "64",
      "--validation-size", "5000", "--accountant", "rdp", "--clipping", "per-example",
      script="train.py")
  assert record["clipping"] == "per-example"
  assert record["evaluated_on"] == "validation" and record["dataset_size"] == 55000
  assert "55000 examples" in stdout and "validation set (5000 examples)" in stdout
  assert "Validation accuracy" in stdout and "Test accuracy" not in stdout
  assert record["epsilon"] == pytest.approx(example_runs.rdp_epsilon(record), rel=1e-12)
  # Its history: one entry per evaluation (every step of 2 here: a tenth of
  # --steps, at least 1), on the validation split, epsilon growing to the record's.
  assert "Evaluating on the validation set (5000 examples) every step ..." in stdout
  assert [h["step"] for h in record["history"]] == [1, 2]
  assert 0 < record["history"][0]["epsilon"] < record["history"][1]["epsilon"]
  assert record["history"][1]["epsilon"] == record["epsilon"]
  assert record["history"][1]["eval_accuracy"] == record["test_accuracy"]
  assert all(0 <= h["train_accuracy"] <= 1 and h["train_loss"] > 0 for h in record["history"])


def test_unknown_recipe_and_bad_validation_size_are_clear_errors(tmp_path, capsys):
  # One refusal as a process (the exit status of train.py's command line)...
  proc, _ = example_runs.run_raw(tmp_path, "--recipe", "nope", script="train.py")
  assert proc.returncode == 2 and "choose from" in proc.stderr
  # ...the others, made while parsing the flags, by train.py's parse_args in
  # this process: the SystemExit status and stderr a process would give.
  status, stderr = example_runs.refusal_in_process(capsys, "--validation-size", "-1")
  assert status == 2 and "--validation-size" in stderr


def test_scattering_features_shape_and_one_image_alone_decides_its_row():
  # The privacy argument for precomputing them: a fixed function of each
  # image alone (changing the other images of its chunk changes nothing).
  rng = np.random.default_rng(0)
  images = rng.random((6, 28, 28, 1), dtype=np.float32)
  features = scattering.scattering_features(images, chunk=3)
  assert features.shape == (6, 7, 7, 81) and features.dtype == np.float32
  others = images.copy()
  others[1:] = rng.random((5, 28, 28, 1), dtype=np.float32)
  again = scattering.scattering_features(others, chunk=3)
  np.testing.assert_array_equal(again[0], features[0])
  assert not np.allclose(again[1:], features[1:])
  # Not a constant: two images give different features, and the zeroth-order
  # channel is the low-passed image (its mean tracks the image's mean).
  assert not np.allclose(features[0], features[1])
  brighter = scattering.scattering_features(images[:1] * 2.0, chunk=1)
  assert brighter[0, ..., 0].mean() == pytest.approx(2.0 * features[0, ..., 0].mean(), rel=1e-4)
  with pytest.raises(ValueError, match="expected"):
    scattering.scattering_features(images[..., 0])


def test_scatter_models_need_scattering_features(capsys):
  # Refused while parsing the flags: train.py's parse_args in this process
  # (example_runs.refusal_in_process: the status and stderr a process gives).
  status, stderr = example_runs.refusal_in_process(capsys, "--recipe", "mnist-scatter-eps3",
                                                   "--features", "pixels")
  assert status == 2 and "do not match" in stderr
  status, stderr = example_runs.refusal_in_process(capsys, "--recipe", "mnist-scatter-eps3",
                                                   "--augmentation-multiplicity", "2")
  assert status == 2 and "--features pixels" in stderr
  status, stderr = example_runs.refusal_in_process(capsys, "--subset", "0")
  assert status == 2 and "--subset must be >= 1" in stderr


def _history(steps):
  """A run record's history (what the examples' --json-out writes)."""
  return [{"step": s, "train_loss": 1.0 / s, "train_accuracy": 0.5, "eval_loss": 1.0 / s,
           "eval_accuracy": 0.9, "epsilon": s / 1000.0, "seconds": float(s)} for s in steps]


def _is_png(path) -> bool:
  return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_results_summarises_the_test_records_and_draws_every_figure(tmp_path, capsys):
  import plot_results  # pylint: disable=import-outside-toplevel
  pytest.importorskip("matplotlib")
  base = {"private": True, "evaluated_on": "test", "dataset": "mnist", "model": "m",
          "seconds": 10.0}
  records = [dict(base, recipe="a", test_accuracy=0.97, epsilon=0.99),
             dict(base, recipe="a", test_accuracy=0.98, epsilon=0.98),
             dict(base, recipe="b", test_accuracy=0.99, epsilon=2.99, seconds=20.0),
             # Left out: a tuning run (validation set) and a non-private one.
             dict(base, recipe="b", test_accuracy=0.5, epsilon=2.99, evaluated_on="validation"),
             dict(base, recipe="b", test_accuracy=0.5, epsilon=None, private=False)]
  for i, record in enumerate(records):
    (tmp_path / f"r{i}.json").write_text(json.dumps(record))
  (tmp_path / "tuned").mkdir()
  published = {k: v for k, v in base.items() if k != "seconds"}   # a tuning's: no wall time
  (tmp_path / "tuned" / "c.json").write_text(json.dumps(dict(
      published, recipe="c", test_accuracy=0.96, epsilon=0.98,
      tuning={"grid": "learning_rate=1,2", "target_epsilon": 1.0})))
  run = tmp_path / "runs" / "run.json"
  run.parent.mkdir()
  run.write_text(json.dumps(dict(base, epsilon=0.5, delta=1e-5, sampler="poisson",
                                 accountant="pld", noise_multiplier=1.3,
                                 history=_history([100, 200, 300]))))
  out = tmp_path / "figures"
  plot_results.main(["--results", str(tmp_path), "--run", str(run), "--out", str(out)])
  table = capsys.readouterr().out
  one_run = plot_results.ONE_RUN
  assert (f"| `a` | mnist | m | 0.9900 | {one_run} | 97.50% ± 0.71% (97.00, 98.00) | 2 | "
          "10-10 s |") in table
  assert f"| `b` | mnist | m | 2.9900 | {one_run} | 99.00% ± 0.00% (99.00) | 1 | 20-20 s |" in table
  # A private tuning run (results/tuned, train.py --tune) is a row whose
  # epsilon covers the whole tuning, and whose time is not published (it
  # would reveal the number of trials).
  assert ('| `c --epsilon 1 --tune "learning_rate=1,2"` | mnist | m | 0.9800 | the whole tuning '
          '(end to end, RDP) | 96.00% ± 0.00% (96.00) | 1 | not published (it reveals K) |'
          ) in table
  for name in ("privacy_utility", "tutorial_run", "step_time", "peak_memory"):
    assert _is_png(out / f"{name}.png"), name
  with pytest.raises(SystemExit, match="no private test-set records"):
    plot_results.main(["--results", str(tmp_path / "empty"), "--out", str(out)])
  with pytest.raises(ValueError, match="no history"):
    plot_results.plot_run(dict(base), str(tmp_path / "x.png"))
  # DP-BandMF records (examples/results/bandmf) are their own rows; --table-only draws nothing.
  bandmf = tmp_path / "bandmf"
  bandmf.mkdir()
  (bandmf / "r.json").write_text(json.dumps(dict(base, recipe="a", test_accuracy=0.96,
                                                 epsilon=0.99, noise="bandmf", bands=8)))
  plot_results.main(["--results", str(bandmf), "--out", str(tmp_path / "none"), "--table-only"])
  assert ("| `a --noise bandmf --bands 8` | mnist | m | 0.9900 | one run (its tuning excluded) | "
          "96.00%") in capsys.readouterr().out
  assert not (tmp_path / "none").exists() or not os.listdir(tmp_path / "none")


def test_the_language_model_summary_and_figure(tmp_path):
  import plot_results  # pylint: disable=import-outside-toplevel
  pytest.importorskip("matplotlib")
  base = {"dataset": "shakespeare", "evaluated_on": "test", "seconds": 10.0, "model": "transformer",
          "private": True, "recipe": "shakespeare-eps8", "epsilon": 7.99,
          "noise_multiplier": 0.6, "delta": 1e-5, "steps": 400, "dataset_size": 32394,
          "batch_size": 512, "accountant": "pld", "sampler": "poisson"}
  records = [dict(base, test_accuracy=0.36, test_loss=2.0),
             dict(base, test_accuracy=0.38, test_loss=2.2),
             dict(base, private=False, epsilon=None, test_accuracy=0.48, test_loss=1.7),
             dict(base, recipe="shakespeare-lora-eps1", epsilon=0.99, test_accuracy=0.49,
                  test_loss=1.69),
             dict(base, evaluated_on="validation", test_accuracy=0.1, test_loss=9.0),
             dict(base, recipe="shakespeare-user-lora-eps8", privacy_unit="user",
                  sampler="user_poisson", dataset_size=564, batch_size=64,
                  test_accuracy=0.47, test_loss=1.8, role_windows_max=1009)]
  for i, record in enumerate(records):
    (tmp_path / f"r{i}.json").write_text(json.dumps(record))
  summaries = plot_results.lm_summaries(str(tmp_path))
  assert set(summaries) == {"shakespeare-eps8", "shakespeare-eps8 --no-dp",
                            "shakespeare-lora-eps1",             # the validation run left out
                            "shakespeare-user-lora-eps8"}
  table = plot_results.lm_markdown_table(summaries)
  bits = statistics.fmean([2.0 / math.log(2), 2.2 / math.log(2)])
  # The largest role (1009 windows, recorded by the user-level run): a group
  # of 1009 windows under an example-level epsilon of 8 has no guarantee
  # (optax_dp.group_privacy: infinite); the user-level run protects it whole.
  import optax_dp  # pylint: disable=import-outside-toplevel
  assert math.isinf(optax_dp.group_privacy(0.6, 1e-5, 1009, steps=400,
                                           sampler=optax_dp.PoissonSampler(32394, 512)).epsilon)
  assert (f"| `shakespeare-eps8` | window (example) | 7.9900 | none (group of 1009: the bound "
          f"is vacuous) | 37.00% ± 1.41% (36.00, 38.00) | {bits:.3f} ± " in table)
  assert ("| `shakespeare-user-lora-eps8` | role (user) | 7.9900 | 7.9900 (user level: each "
          "role whole) | 47.00%" in table)
  assert "| `shakespeare-eps8 --no-dp` | — | none (non-private) | none (non-private) | 48.00%" in table
  plot_results.plot_language_model(summaries, str(tmp_path / "lm.png"))
  assert _is_png(tmp_path / "lm.png")


def test_every_committed_figure_regenerates_from_the_committed_json(tmp_path):
  # The README's and the docs site's figures: one command, committed JSON only.
  import plot_results  # pylint: disable=import-outside-toplevel
  pytest.importorskip("matplotlib")
  plot_results.main(["--out", str(tmp_path)])
  committed = sorted(os.listdir(plot_results.FIGURES))
  assert committed == sorted(os.listdir(tmp_path)), (committed, os.listdir(tmp_path))
  for name in committed:
    assert _is_png(tmp_path / name), name


def test_figures_are_readable_at_the_docs_column_width(tmp_path):
  # Issue 31 (point 10): the bar labels were 6.5 pt on a 12.5 in figure,
  # about 6 px where the docs column shows it. Every figure is at most
  # FIGURE_WIDTH_IN wide (the column's width) with no text under
  # MIN_FONT_PT; tests/test_docs.py measures them on the built site.
  import plot_results  # pylint: disable=import-outside-toplevel
  pytest.importorskip("matplotlib")
  assert plot_results.MIN_FONT_PT >= 10 and plot_results.FIGURE_WIDTH_IN <= 7.2
  plt = plot_results._pyplot()  # pylint: disable=protected-access
  fig, ax = plt.subplots(figsize=(plot_results.FIGURE_WIDTH_IN, 3))
  ax.text(0.5, 0.5, "a 6.5 pt label", fontsize=6.5)
  with pytest.raises(ValueError, match="smaller than 10"):
    plot_results._save(fig, str(tmp_path / "small.png"))  # pylint: disable=protected-access
  fig.set_size_inches(12.5, 3)
  with pytest.raises(ValueError, match="wide"):
    plot_results._save(fig, str(tmp_path / "wide.png"))  # pylint: disable=protected-access
  plt.close(fig)


RESULTS = os.path.join(example_runs.EXAMPLES, "results")


@pytest.mark.slow
def test_the_published_records_claim_the_epsilon_of_what_ran():
  # The README's recipe table comes from these records (plot_results.py):
  # each one's epsilon, recomputed here with dp_accounting's PLD accountant
  # from the record's sampler, batch size, dataset size, steps and noise,
  # is the one it states, within its recipe's target.
  import plot_results  # pylint: disable=import-outside-toplevel
  groups = plot_results.load_records(RESULTS)
  assert {"mnist-scatter-eps1", "mnist-scatter-eps3", "fashion-mnist-scatter-eps3"} <= set(groups)
  for name, records in groups.items():
    assert len(records) == 3, name
    for record in records:
      assert record["sampler"] == "poisson" and record["accountant"] == "pld"
      assert record["delta"] == 1e-5 and record["dataset_size"] == 60000
      # rel 1e-6: a record written under another SciPy's FFT differs from
      # today's PLD by ~2e-9 (tutorial-eps1: 0.99975467242 written, ...7076
      # with SciPy 1.17.1), while the smallest accounting error that matters,
      # one step more of the longest run (5000) or sigma off in its fourth
      # decimal, moves epsilon by ~1e-4 relative: 100x above the tolerance.
      assert record["epsilon"] == pytest.approx(example_runs.pld_epsilon(record),
                                                rel=1e-6), name
      assert record["epsilon"] <= recipes.RECIPES[name]["epsilon"], name


def _markdown_tables(text, header_start):
  """Every markdown table of `text` whose header starts with `header_start`."""
  lines, tables = text.splitlines(), []
  for i, line in enumerate(lines):
    if line.startswith(header_start):
      end = i
      while end < len(lines) and lines[end].startswith("|"):
        end += 1
      tables.append(lines[i:end])
  return tables


def test_the_readmes_recipe_tables_are_what_the_records_give(capsys):
  # The README's three recipe tables (single runs and --tune rows; BandMF;
  # adaptive clipping), in that order, are plot_results' output from the
  # committed records, line for line: a record added or rerun without
  # regenerating the table, or a column added to one table only, fails here.
  import plot_results  # pylint: disable=import-outside-toplevel
  with open(os.path.join(example_runs.EXAMPLES, os.pardir, "README.md"), encoding="utf-8") as f:
    readme = _markdown_tables(f.read(), "| recipe | dataset | model | epsilon spent |")
  generated = []
  for folder in ("", "bandmf", "adaptive"):
    plot_results.main(["--results", os.path.join(RESULTS, folder), "--table-only"])
    generated += _markdown_tables(capsys.readouterr().out, "| recipe | dataset | model |")
  assert readme == generated


@pytest.mark.slow
def test_the_readmes_language_model_table_is_what_the_records_give():
  import plot_results  # pylint: disable=import-outside-toplevel
  with open(os.path.join(example_runs.EXAMPLES, os.pardir, "README.md"), encoding="utf-8") as f:
    readme = _markdown_tables(f.read(), "| run | privacy unit | epsilon |")
  generated = plot_results.lm_markdown_table(plot_results.lm_summaries(plot_results.LM_RESULTS))
  assert readme == [generated.splitlines()]
