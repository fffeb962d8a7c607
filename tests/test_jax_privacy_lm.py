"""benchmarks/jax_privacy_lm.py: jax_privacy's char-LM recipe on our Shakespeare
split runs, trains on next-character targets, and states an epsilon that three
accountants agree on (the README's peer row comes from its full run)."""

import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

pytest.importorskip("jax_privacy")
import jax_privacy_lm  # noqa: E402  pylint: disable=wrong-import-position


@pytest.mark.slow
def test_three_steps_of_the_peer_recipe(tmp_path):
  out = tmp_path / "peer.json"
  jax_privacy_lm.main(["--subset", "512", "--expected-batch-size", "64", "--steps", "3",
                       "--epsilon", "8", "--json-out", str(out)])
  record = json.loads(out.read_text())
  assert record["steps"] == 3 and record["epsilons_agree"]
  assert record["epsilon"] == pytest.approx(8.0, rel=1e-3)
  assert record["epsilon_dp_accounting_pld"] == pytest.approx(record["epsilon"], rel=1e-6)
  assert 0.0 <= record["test_accuracy"] <= 1.0
  assert record["bits_per_char"] == pytest.approx(record["test_loss"] / math.log(2))
