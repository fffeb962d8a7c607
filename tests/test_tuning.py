"""Private hyper-parameter tuning (optax_dp/_lifecycle/_tuning.py): the
end-to-end epsilon of the best of a random number of trials."""

import math

import dp_accounting
from dp_accounting import dp_event
from dp_accounting import rdp
import numpy as np
import pytest
from scipy import stats

import optax_dp
from optax_dp._lifecycle import _tuning

FALSE_ALARM = 1e-6
SHAPES = [0.0, 1.0, 0.5, 3.0, math.inf]   # logarithmic, geometric, TNB (two), Poisson
TRIAL = dp_accounting.ComposedDpEvent([
    optax_dp.PoissonSampler(60000, 256).dp_event(1.1, 1000), dp_accounting.GaussianDpEvent(30.0)])


@pytest.mark.parametrize("shape", SHAPES)
def test_end_to_end_epsilon_is_dp_accountings_repeat_and_select(shape):
  trials = optax_dp.TrialCount(mean=8, shape=shape)
  accountant = rdp.RdpAccountant()
  accountant.compose(dp_event.RepeatAndSelectDpEvent(TRIAL, 8, shape))
  want = accountant.get_epsilon(1e-5)
  assert optax_dp.tuning_epsilon(TRIAL, trials, 1e-5) == pytest.approx(want, rel=1e-9)
  # Tuning costs more than one trial.
  single = rdp.RdpAccountant()
  single.compose(TRIAL)
  assert want > single.get_epsilon(1e-5)


def _chi_square_p(draws, pmf):
  """p-value of the draws against pmf (bins with expected count >= 5; the
  rest of the tail pooled)."""
  n = len(draws)
  counts = np.bincount(draws, minlength=len(pmf))[:len(pmf)].astype(float)
  counts[-1] += np.sum(draws >= len(pmf))
  expected = pmf * n
  keep = expected >= 5
  cut = np.argmax(~keep[1:]) + 1 if not keep[1:].all() else len(pmf)
  obs = np.append(counts[:cut], counts[cut:].sum())
  exp = np.append(expected[:cut], expected[cut:].sum())
  obs, exp = obs[exp > 0], exp[exp > 0]
  stat = np.sum((obs - exp) ** 2 / exp)
  return stats.chi2.sf(stat, len(obs) - 1)


def _draws(trials, n=100_000, seed=0):
  return _tuning.draw_trial_count(trials, np.random.default_rng(seed), size=n)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_number_of_trials_follows_the_stated_distribution(shape):
  trials = optax_dp.TrialCount(mean=8, shape=shape)
  pmf = _tuning.trial_count_pmf(trials)
  assert np.sum(pmf) == pytest.approx(1.0, abs=1e-12)
  assert np.sum(np.arange(len(pmf)) * pmf) == pytest.approx(8.0, rel=1e-6)   # the mean
  if not math.isinf(shape):
    assert pmf[0] == 0.0                                   # truncated: K >= 1
  assert _chi_square_p(_draws(trials), pmf) > FALSE_ALARM


def test_the_distributions_are_the_papers():
  # Geometric (shape 1): P[K=k] = g (1-g)^(k-1) with mean 1/g.
  pmf = _tuning.trial_count_pmf(optax_dp.TrialCount(mean=4, shape=1))
  k = np.arange(1, 30)
  np.testing.assert_allclose(pmf[1:30], 0.25 * 0.75 ** (k - 1), rtol=1e-9)
  # Logarithmic (shape 0): P[K=k] = (1-g)^k / (k log(1/g)).
  pmf = _tuning.trial_count_pmf(optax_dp.TrialCount(mean=5, shape=0))
  g = _tuning._gamma(optax_dp.TrialCount(5, 0))
  np.testing.assert_allclose(pmf[1:30], (1 - g) ** k / (k * math.log(1 / g)), rtol=1e-9)


def test_a_fixed_number_of_trials_fails_the_distribution_check():
  """The planted bug: K fixed at the mean is not the stated distribution."""
  trials = optax_dp.TrialCount(mean=8, shape=1)
  assert _chi_square_p(np.full(100_000, 8), _tuning.trial_count_pmf(trials)) < FALSE_ALARM


def _run_trial(noise=30.0, event=None):
  rng = np.random.default_rng(5)

  def run_trial(candidate, index):
    del index
    correct = int(1000 - 500 * abs(math.log10(candidate)))   # best at 1.0
    score = optax_dp.private_score(correct, 1000, noise, rng)
    return {"lr": candidate}, event or TRIAL.events[0], score
  return run_trial


def test_tune_keeps_the_best_private_score_and_states_the_tunings_epsilon():
  trials = optax_dp.TrialCount(mean=10, shape=1)
  result = optax_dp.tune(_run_trial(), [0.001, 0.01, 1.0], trials=trials, trial_event=TRIAL,
                         target_delta=1e-5, seed=3)
  assert result.num_trials >= 1 and len(result.scores) == result.num_trials
  assert result.score == max(s for _, s in result.scores)
  assert result.candidate == max(result.scores, key=lambda cs: cs[1])[0]
  assert result.epsilon == optax_dp.tuning_epsilon(TRIAL, trials, 1e-5)
  # The seed decides K and the candidates: the same seed, the same tuning.
  again = optax_dp.tune(_run_trial(), [0.001, 0.01, 1.0], trials=trials, trial_event=TRIAL,
                        target_delta=1e-5, seed=3)
  assert again.num_trials == result.num_trials
  assert [c for c, _ in again.scores] == [c for c, _ in result.scores]


def test_tune_refuses_what_the_accounting_does_not_cover():
  with pytest.raises(ValueError, match="number of trials is random"):
    optax_dp.tune(_run_trial(), [1.0], trials=8, trial_event=TRIAL, target_delta=1e-5, seed=0)

  def public_score(candidate, index):   # the planted bug: a non-private score
    return None, TRIAL.events[0], 0.9
  with pytest.raises(ValueError, match="non-private score"):
    optax_dp.tune(public_score, [1.0], trials=optax_dp.TrialCount(4, 1), trial_event=TRIAL,
                  target_delta=1e-5, seed=0)
  other = dp_accounting.GaussianDpEvent(1.0)
  with pytest.raises(ValueError, match="exceeds that of the declared trial_event"):
    optax_dp.tune(_run_trial(event=other), [1.0], trials=optax_dp.TrialCount(4, 1),
                  trial_event=TRIAL, target_delta=1e-5, seed=0)
  with pytest.raises(ValueError, match="noise_multiplier > 0"):
    optax_dp.private_score(10, 100, 0.0, np.random.default_rng(0))


def test_poisson_may_draw_no_trial_and_then_releases_nothing():
  trials = optax_dp.TrialCount(mean=1, shape=math.inf)   # P[K = 0] = 1/e
  seed = next(s for s in range(100) if optax_dp.tune(
      _run_trial(), [1.0], trials=trials, trial_event=TRIAL, target_delta=1e-5,
      seed=s).num_trials == 0)
  result = optax_dp.tune(_run_trial(), [1.0], trials=trials, trial_event=TRIAL,
                         target_delta=1e-5, seed=seed)
  assert result.output is None and result.candidate is None and result.scores == []


def test_private_score_noise_has_the_stated_variance():
  rng = np.random.default_rng(0)
  n, sigma, total = 20_000, 7.0, 500
  values = np.array([optax_dp.private_score(250, total, sigma, rng).value for _ in range(n)])
  sample_var = np.var(values * total - 250, ddof=1)
  lo, hi = (stats.chi2.ppf(FALSE_ALARM / 2, n - 1), stats.chi2.isf(FALSE_ALARM / 2, n - 1))
  assert lo <= (n - 1) * sample_var / sigma ** 2 <= hi
  assert optax_dp.private_score(1, 2, sigma, rng).event == dp_accounting.GaussianDpEvent(sigma)


def test_calibrated_trial_noise_meets_the_end_to_end_target_and_no_less_does():
  sampler = optax_dp.PoissonSampler(60000, 256)
  trials = optax_dp.TrialCount(mean=8, shape=1)
  sigma = optax_dp.calibrate_trial_noise(1.0, 1e-5, sampler=sampler, steps=1000,
                                         trials=trials, score_noise_multiplier=50.0)

  def spent(s):
    return optax_dp.tuning_epsilon(dp_accounting.ComposedDpEvent(
        [sampler.dp_event(s, 1000), dp_accounting.GaussianDpEvent(50.0)]), trials, 1e-5)
  assert spent(sigma) <= 1.0 < spent(sigma * (1 - 1e-3))


@pytest.mark.parametrize("bad", [optax_dp.TrialCount(0.5, 1), optax_dp.TrialCount(8, -0.5), optax_dp.TrialCount(1, 1),
                                 optax_dp.TrialCount(math.nan, 1), (8, 1)])
def test_bad_trial_counts_are_refused(bad):
  with pytest.raises(ValueError, match="TrialCount"):
    optax_dp.tuning_epsilon(TRIAL, bad, 1e-5)


def test_a_candidate_with_another_batch_size_joins_with_the_noise_that_dominates():
  reference_sampler = optax_dp.PoissonSampler(60000, 256)
  reference = dp_accounting.ComposedDpEvent(
      [reference_sampler.dp_event(1.1, 1000), dp_accounting.GaussianDpEvent(30.0)])
  bigger = optax_dp.PoissonSampler(60000, 512)
  sigma = optax_dp.trial_noise_for(reference, sampler=bigger, steps=1000,
                                   score_noise_multiplier=30.0)

  def event(s):
    return dp_accounting.ComposedDpEvent([bigger.dp_event(s, 1000),
                                          dp_accounting.GaussianDpEvent(30.0)])
  assert optax_dp.rdp_dominated(event(sigma), reference)
  assert not optax_dp.rdp_dominated(event(sigma * (1 - 1e-3)), reference)
  rng = np.random.default_rng(0)

  def run_trial(batch_size, index):
    del index
    training = (reference_sampler.dp_event(1.1, 1000) if batch_size == 256
                else bigger.dp_event(sigma, 1000))
    return batch_size, training, optax_dp.private_score(500, 1000, 30.0, rng)
  result = optax_dp.tune(run_trial, [256, 512], trials=optax_dp.TrialCount(6, 1),
                         trial_event=reference, target_delta=1e-5, seed=1)
  assert {c for c, _ in result.scores} == {256, 512}
  assert result.epsilon == optax_dp.tuning_epsilon(reference, optax_dp.TrialCount(6, 1), 1e-5)

  def too_little_noise(batch_size, index):   # the bigger batch without its extra noise
    del batch_size, index
    return None, bigger.dp_event(1.1, 1000), optax_dp.private_score(500, 1000, 30.0, rng)
  with pytest.raises(ValueError, match="exceeds that of the declared trial_event"):
    optax_dp.tune(too_little_noise, [512], trials=optax_dp.TrialCount(6, 1),
                  trial_event=reference, target_delta=1e-5, seed=1)
