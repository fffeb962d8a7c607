"""optax_dp.audit: the one-run canary audit passes the real dp_aggregate and
catches each planted bug (issue 5's (a)-(d) at C = 1; (e), noise std sigma
instead of sigma * C, at C = 4, where it shows).

The audit's lower bound holds with probability >= 95% over the run's
randomness (jax_privacy's one-run f-DP test, Bonferroni over score functions
and guess counts). For the real transform a bound above the claim would be a
5%-probability event, or a bug; the seeds are fixed, so each check is
deterministic. For the planted bugs the margins are in docs/audit.md.
"""

import math
import warnings

import jax.numpy as jnp
import optax
import pytest

import optax_dp
from optax_dp import audit

import planted_bugs

# tests/conftest.py: the audit runs thousands of steps: bound by running, not compiling.
pytestmark = pytest.mark.xla_optimized

pytest.importorskip("jax_privacy")


@pytest.fixture(scope="module")
def reports():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return {i: planted_bugs.run_setting(*row[1:]) for i, row in
            enumerate(planted_bugs.SETTINGS)}


REAL = [i for i, row in enumerate(planted_bugs.SETTINGS) if row[0] == "dp_aggregate"]
BUGS = [i for i, row in enumerate(planted_bugs.SETTINGS) if row[0] != "dp_aggregate"]


@pytest.mark.slow
@pytest.mark.parametrize("index", REAL)
def test_real_transform_stays_below_its_claim(reports, index):
  _, _, sigma, m, _ = planted_bugs.SETTINGS[index]
  report = reports[index]
  assert report.claimed_epsilon == pytest.approx(
      audit.claimed_canary_epsilon(sigma, 1e-5))
  assert report.verdict == "consistent"
  assert report.epsilon_lower_bound <= report.claimed_epsilon
  assert report.num_canaries == m
  # Not vacuous: with 10^4 canaries the audit reaches a real fraction of the
  # claim (measured 0.4-0.5 at sigma 1, see docs/audit.md).
  if m == 10000 and sigma == 1.0:
    assert report.tightness > 0.3


@pytest.mark.slow
@pytest.mark.parametrize("index", BUGS)
def test_each_planted_bug_is_caught(reports, index):
  report = reports[index]
  assert report.verdict == "VIOLATION", (planted_bugs.SETTINGS[index][0], report)
  assert report.epsilon_lower_bound > report.claimed_epsilon


@pytest.fixture(scope="module")
def clip_reports():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return {row[0]: planted_bugs.run_clip_setting(*row[1:])
            for row in planted_bugs.CLIP_SETTINGS}


@pytest.mark.slow
def test_unscaled_noise_is_caught_at_clip_4(clip_reports):
  """Noise std sigma instead of sigma * C, at C = 4 (invisible at C = 1, where
  every other audit runs): the effective noise multiplier is sigma / 4, and
  the audit proves more than the claim (measured 9.06, the ceiling of 10^4
  canaries, against 4.38)."""
  report = clip_reports["(e) noise std sigma, not sigma * C"]
  assert report.claimed_epsilon == pytest.approx(audit.claimed_canary_epsilon(1.0, 1e-5))
  assert report.verdict == "VIOLATION", report
  assert report.epsilon_lower_bound > report.claimed_epsilon


@pytest.mark.slow
def test_real_transform_at_clip_4_stays_below_its_claim(clip_reports):
  """No false alarm at C = 4: the canaries (norm 10 C), the fillers (C / 2)
  and the noise (sigma C) all scale with C, so the real dp_aggregate audits
  as at C = 1 (measured 2.293 against 4.38, the C = 1 row's value), still a
  real fraction of the claim (not vacuous). With the noise std sigma in
  dp_aggregate itself, this test fails (9.06)."""
  report = clip_reports["dp_aggregate"]
  assert report.claimed_epsilon == pytest.approx(audit.claimed_canary_epsilon(1.0, 1e-5))
  assert report.verdict == "consistent", report
  assert report.epsilon_lower_bound <= report.claimed_epsilon
  assert report.tightness > 0.3


@pytest.mark.slow
def test_the_score_sign_does_not_matter():
  # A descent step after the aggregate flips the updates' sign: the negated
  # inner-product score sees it, with the same bound as the plain aggregate.
  params = {"w": jnp.zeros((50, 40))}
  kwargs = dict(l2_norm_clip=1.0, noise_multiplier=1.0, num_canaries=2000,
                canaries_per_step=20)
  plain = audit.audit_transformation(
      lambda: optax_dp.dp_aggregate(1.0, 1.0, 7, expected_batch_size=8), params, **kwargs)
  flipped = audit.audit_transformation(
      lambda: optax.chain(optax_dp.dp_aggregate(1.0, 1.0, 7, expected_batch_size=8),
                          optax.sgd(0.5)), params, **kwargs)
  assert plain.epsilon_lower_bound > 0
  assert flipped.bounds_by_score["negated_inner_product"] == pytest.approx(
      plain.bounds_by_score["inner_product"])


def test_zero_noise_claim_is_infinite():
  assert math.isinf(audit.claimed_canary_epsilon(0.0, 1e-5))


@pytest.mark.parametrize("kwargs", [
    dict(num_canaries=1), dict(num_canaries=10, canaries_per_step=3),
    dict(l2_norm_clip=0.0), dict(noise_multiplier=-1.0), dict(significance=1.5),
    dict(delta=0.0),
])
def test_bad_arguments_raise(kwargs):
  args = dict(l2_norm_clip=1.0, noise_multiplier=1.0, num_canaries=10)
  args.update(kwargs)
  with pytest.raises(ValueError):
    audit.audit_transformation(lambda: optax_dp.dp_aggregate(1.0, 1.0, 0),
                               {"w": jnp.zeros((3,))}, **args)


@pytest.fixture(scope="module")
def complex_reports():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return {row[0]: planted_bugs.run_complex_setting(*row[1:])
            for row in planted_bugs.COMPLEX_SETTINGS}


@pytest.mark.slow
def test_complex_parameters_audit_as_r2n(complex_reports):
  """Complex params (C^n as R^2n): the real dp_aggregate is consistent and not
  vacuous (measured 1.48 against 4.38 with 2000 canaries), and the norm bug of
  issue 10 (Re(sum z^2) in place of sum |z|^2, canaries released barely
  clipped) is caught (measured 6.95, the ceiling of 2000 canaries)."""
  real = complex_reports["dp_aggregate"]
  assert real.verdict == "consistent", real
  assert 0.2 < real.tightness <= 1
  bug = complex_reports["(f) complex norm as Re(sum z^2)"]
  assert bug.verdict == "VIOLATION", bug
  assert bug.epsilon_lower_bound > bug.claimed_epsilon
