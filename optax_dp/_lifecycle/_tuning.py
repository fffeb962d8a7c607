"""Hyper-parameter tuning whose epsilon covers the tuning (Papernot & Steinke).

Tuning by hand, or keeping the best of a fixed number of private runs, spends
privacy that no single run's epsilon shows. Papernot & Steinke (2022) bound it:
run a *random* number K of trials, each a DP mechanism whose whole output (the
model and its score) is private, and release only the best; when K follows a
truncated negative binomial (shape 0: logarithmic, 1: geometric) or a Poisson
distribution, the Renyi DP of the whole procedure is bounded in closed form by
that of one trial. dp-accounting implements the bound
(`RepeatAndSelectDpEvent`, RDP accountant); this module draws K, runs the
trials, keeps the best, and states the end-to-end guarantee.

Privacy contract: the epsilon is right only if (1) K is drawn from the stated
distribution with a secret seed, independently of the data and of the trials;
(2) each trial draws its candidate at random (from the seed) and is the same
mechanism, `trial_event` (training and score together); (3) the score of each
trial is private (`private_score`: a noisy count on private validation data,
accounted in the trial's event); and (4) only the best trial's output (and its
score) is released, never the others' or K.

References:
  Papernot & Steinke 2022, "Hyperparameter Tuning with Renyi Differential
  Privacy", ICLR 2022, https://arxiv.org/abs/2110.03620.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence

import dp_accounting
from dp_accounting import dp_event
from dp_accounting import rdp
import numpy as np

from optax_dp._core import _checks

# The pmf table of a trial count is cut where its remaining mass is below this.
_TAIL = 1e-15


class TrialCount(NamedTuple):
  """The distribution of the number of trials K (Papernot & Steinke, sec. 3).

  Attributes:
    mean: E[K] >= 1 (> 1 for the truncated negative binomials).
    shape: eta. `math.inf`: Poisson(mean) (K may be 0: nothing is released);
      0: logarithmic; 1: geometric; in (0, inf): the truncated negative
      binomial D_{eta, gamma}, K >= 1, whose gamma gives the mean. (The
      paper allows eta in (-1, 0) too; dp-accounting's bound does not.)
  """
  mean: float
  shape: float


def check_trial_count(trials: Any) -> TrialCount:
  """`trials` validated: a `TrialCount` of a finite mean and a shape in (-1, inf]."""
  if not isinstance(trials, TrialCount):
    raise ValueError(
        "trials must be an optax_dp.TrialCount(mean, shape): the number of trials "
        "is random (a fixed number would not be covered by the accounting), got "
        f"{trials!r}.")
  mean, shape = trials
  for name, value in (("mean", mean), ("shape", shape)):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
      raise ValueError(f"TrialCount.{name} must be a number, got {value!r}.")
  if not shape >= 0:
    raise ValueError(f"TrialCount.shape must be >= 0 (or math.inf: Poisson), the shapes "
                     f"dp-accounting's bound covers; got {shape}.")
  least = 1 if math.isinf(shape) else 1 + 1e-9
  if not (math.isfinite(mean) and mean >= least):
    raise ValueError(f"TrialCount.mean must be finite and {'>=' if least == 1 else '>'} 1 "
                     f"for shape {shape} (dp-accounting's bound), got {mean}.")
  return TrialCount(float(mean), float(shape))


def _tnb_mean(gamma: float, eta: float) -> float:
  if eta == 0:
    return (1 - gamma) / (gamma * math.log(1 / gamma))
  return eta * (1 - gamma) / (gamma * (1 - gamma ** eta))


def _gamma(trials: TrialCount) -> float:
  """The gamma of D_{eta, gamma} whose mean is `trials.mean` (bisection on
  log gamma: the mean falls from inf to 1 as gamma rises from 0 to 1)."""
  lo, hi = -745.0, 0.0   # log gamma
  for _ in range(200):
    mid = (lo + hi) / 2
    if _tnb_mean(math.exp(mid), trials.shape) > trials.mean:
      lo = mid
    else:
      hi = mid
  return math.exp((lo + hi) / 2)


def trial_count_pmf(trials: TrialCount) -> np.ndarray:
  """P[K = k] for k = 0, 1, ... up to where the tail mass is below 1e-15."""
  trials = check_trial_count(trials)
  if math.isinf(trials.shape):
    from scipy import stats  # pylint: disable=import-outside-toplevel
    top = int(stats.poisson.isf(_TAIL, trials.mean)) + 2
    return stats.poisson.pmf(np.arange(top), trials.mean)
  gamma, eta = _gamma(trials), trials.shape
  # P[K=1] and the ratio P[K=k+1]/P[K=k] = (1 - gamma) (k + eta) / (k + 1).
  first = ((1 - gamma) / math.log(1 / gamma) if eta == 0 else
           (1 - gamma) * eta / (gamma ** -eta - 1))
  probs, p, k, total = [0.0, first], first, 1, first
  while 1 - total > _TAIL and k < 10_000_000:
    p *= (1 - gamma) * (k + eta) / (k + 1)
    probs.append(p)
    total += p
    k += 1
  return np.asarray(probs)


def draw_trial_count(trials: TrialCount, rng: np.random.Generator,
                     size: Optional[int] = None) -> Any:
  """K drawn from `trials` (an int; with `size`, an array of that many
  draws): inverse CDF of `trial_count_pmf`, numpy's Poisson for shape inf."""
  trials = check_trial_count(trials)
  if math.isinf(trials.shape):
    draws = rng.poisson(trials.mean, size)
  else:
    cdf = np.cumsum(trial_count_pmf(trials))
    draws = np.minimum(np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right"),
                       len(cdf) - 1)
  return int(draws) if size is None else np.asarray(draws, np.int64)


def tuning_event(trial_event: dp_accounting.DpEvent,
                 trials: TrialCount) -> dp_accounting.DpEvent:
  """The DpEvent of the whole tuning: the best of K runs of `trial_event`."""
  trials = check_trial_count(trials)
  return dp_event.RepeatAndSelectDpEvent(trial_event, trials.mean, trials.shape)


def tuning_epsilon(trial_event: dp_accounting.DpEvent, trials: TrialCount,
                   target_delta: float) -> float:
  """The end-to-end epsilon of the tuning, by dp-accounting's RDP accountant
  (the only one that accounts for repeat-and-select)."""
  target_delta = _checks.check_delta(target_delta)
  accountant = rdp.RdpAccountant()
  accountant.compose(tuning_event(trial_event, trials))
  return float(accountant.get_epsilon(target_delta))


class PrivateScore(NamedTuple):
  """A trial's score released privately, with its DpEvent (part of the trial's).

  Attributes:
    value: the noisy score (higher is better).
    event: what releasing it costs: `GaussianDpEvent(noise_multiplier)` for a
      count of sensitivity 1 (`private_score`).
  """
  value: float
  event: dp_accounting.DpEvent


def private_score(correct: int, total: int, noise_multiplier: float,
                  rng: np.random.Generator) -> PrivateScore:
  """A private accuracy: `(correct + N(0, noise_multiplier^2)) / total`.

  `correct` counts the examples of a private validation set (of public size
  `total`) that the trial's model gets right; adding or removing one example
  moves it by at most 1, so the release is the Gaussian mechanism of
  sensitivity 1, `GaussianDpEvent(noise_multiplier)`. A public validation set
  needs no noise (and no event); then score with it directly and leave its
  release out of the trial's event, which is right only if that set is truly
  public (not drawn from the private data).
  """
  noise_multiplier = _checks.check_noise_multiplier(noise_multiplier)
  if noise_multiplier == 0:
    raise ValueError("private_score needs noise_multiplier > 0: an exact accuracy on "
                     "private data is not private.")
  total = _checks.check_int("total", total, 1)
  noisy = float(correct) + noise_multiplier * float(rng.standard_normal())
  return PrivateScore(noisy / total, dp_accounting.GaussianDpEvent(noise_multiplier))


class TuningResult(NamedTuple):
  """What `tune` releases: the best trial's output, candidate and score, and
  the guarantee of the whole procedure.

  `num_trials` and `scores` (every trial's candidate and noisy score) are for
  the person running the tuning; they are not covered by the guarantee
  (releasing them is not the best-of-K mechanism): do not publish them.
  """
  output: Any
  candidate: Any
  score: Optional[float]
  epsilon: float
  delta: float
  trials: TrialCount
  num_trials: int
  scores: list


def tune(run_trial: Callable[[Any, int], tuple[Any, dp_accounting.DpEvent, PrivateScore]],
         candidates: Sequence[Any], *, trials: TrialCount, trial_event: dp_accounting.DpEvent,
         target_delta: float, seed: int) -> TuningResult:
  """Private hyper-parameter tuning: the best of a random number of trials.

  Draws K from `trials` and, for each of the K trials, a candidate uniformly
  at random from `candidates`, both from the secret `seed`; runs
  `run_trial(candidate, trial_index) -> (output, training_event, score)`, where
  `score` is a `PrivateScore`; keeps the trial with the highest score. Every
  trial's event, `ComposedDpEvent([training_event, score.event])`, must equal
  `trial_event` or be dominated by it in Renyi DP at every order of the RDP
  accountant (`rdp_dominated`): the trial mechanism, a random choice among
  the candidates, then has at most `trial_event`'s RDP (Renyi divergence is
  quasi-convex), which is what the theorem needs; so candidates may differ in
  batch size or steps, each with the noise `trial_noise_for` gives it. The
  epsilon is `tuning_epsilon(trial_event, trials, target_delta)`.

  Privacy contract: see the module docstring. Refused (ValueError): a
  `trials` that is not a `TrialCount` (a fixed K), a score that is not a
  `PrivateScore` (a non-private score), a trial whose event is not dominated
  by `trial_event`. With K = 0 (Poisson) nothing is released (`output` None).

  References:
    Papernot & Steinke 2022, https://arxiv.org/abs/2110.03620 (Theorem 2).

  Examples:
    >>> import dp_accounting, numpy as np, optax_dp
    >>> train = dp_accounting.GaussianDpEvent(5.0)
    >>> score_rng = np.random.default_rng(1)
    >>> def run_trial(lr, index):
    ...   score = optax_dp.private_score(int(900 - 1000 * abs(lr - 0.1)), 1000, 20.0,
    ...                                  score_rng)
    ...   return f"model(lr={lr})", train, score
    >>> event = dp_accounting.ComposedDpEvent([train, dp_accounting.GaussianDpEvent(20.0)])
    >>> result = optax_dp.tune(run_trial, [0.01, 0.1, 1.0],
    ...                        trials=optax_dp.TrialCount(mean=4, shape=1),
    ...                        trial_event=event, target_delta=1e-5, seed=0)
    >>> result.candidate in (0.01, 0.1, 1.0), round(result.epsilon, 2)
    (True, 1.53)
  """
  trials = check_trial_count(trials)
  if not candidates:
    raise ValueError("tune needs at least one candidate.")
  epsilon = tuning_epsilon(trial_event, trials, target_delta)
  rng = np.random.default_rng(np.random.SeedSequence([_checks.check_int("seed", seed, 0),
                                                      0x7475]))
  num_trials = draw_trial_count(trials, rng)
  best, scores = None, []
  for index in range(num_trials):
    candidate = candidates[int(rng.integers(len(candidates)))]
    output, training_event, score = run_trial(candidate, index)
    if not isinstance(score, PrivateScore):
      raise ValueError(
          "tune: run_trial returned a score that is not an optax_dp.PrivateScore "
          f"({type(score).__name__}); choosing by a non-private score is not covered "
          "by the accounting. Score with optax_dp.private_score on private "
          "validation data (its noise is part of the trial's event).")
    event = dp_accounting.ComposedDpEvent([training_event, score.event])
    if event != trial_event and not rdp_dominated(event, trial_event):
      raise ValueError(
          f"tune: trial {index} ({candidate!r}) ran the mechanism {event}, whose Renyi "
          f"DP exceeds that of the declared trial_event {trial_event} at some order: "
          "the repeat-and-select bound is for trials no less private than "
          "trial_event. Give that candidate more noise (trial_noise_for finds it), "
          "or declare a trial_event that covers every candidate.")
    scores.append((candidate, score.value))
    if best is None or score.value > best[2]:
      best = (output, candidate, score.value)
  output, candidate, value = best if best is not None else (None, None, None)
  return TuningResult(output, candidate, value, epsilon, target_delta, trials, num_trials,
                      scores)


def trial_event_of(sampler: Any, noise_multiplier: float, steps: int,
                   score_noise_multiplier: Optional[float] = None) -> dp_accounting.DpEvent:
  """One trial's event, the `trial_event` of `tune`: `steps` steps of
  `sampler` at `noise_multiplier`, composed with its `private_score` of
  `score_noise_multiplier` (None: a public score, no event).

  >>> import optax_dp
  >>> event = optax_dp.trial_event_of(optax_dp.PoissonSampler(60000, 256), 1.0, 1000,
  ...                                 score_noise_multiplier=20.0)
  >>> type(event).__name__
  'ComposedDpEvent'
  """
  training = sampler.dp_event(noise_multiplier, steps)
  if score_noise_multiplier is None:
    return training
  return dp_accounting.ComposedDpEvent(
      [training, dp_accounting.GaussianDpEvent(score_noise_multiplier)])


def calibrate_trial_noise(target_epsilon: float, target_delta: float, *, sampler: Any,
                          steps: int, trials: TrialCount,
                          score_noise_multiplier: Optional[float] = None) -> float:
  """The smallest training noise multiplier (to 1e-4 relative) for which the
  whole tuning (`trials` runs of `steps` steps of `sampler`, each scored with
  `private_score(..., score_noise_multiplier)`; None: a public score) meets
  `target_epsilon` at `target_delta`, by the RDP accountant.

  >>> import optax_dp
  >>> sampler = optax_dp.PoissonSampler(60000, 256)
  >>> sigma = optax_dp.calibrate_trial_noise(
  ...     1.0, 1e-5, sampler=sampler, steps=1000, trials=optax_dp.TrialCount(8, 1),
  ...     score_noise_multiplier=50.0)
  >>> round(sigma, 2)
  1.47
  """
  target_epsilon = _checks.check_epsilon(target_epsilon)
  trials = check_trial_count(trials)

  def event(sigma):
    return trial_event_of(sampler, sigma, steps, score_noise_multiplier)

  def spent(sigma):
    return tuning_epsilon(event(sigma), trials, target_delta)

  lo, hi = 1e-2, 1.0
  while spent(hi) > target_epsilon:
    lo, hi = hi, hi * 2
    if hi > 1e6:
      raise ValueError(f"no noise multiplier meets epsilon {target_epsilon} for this "
                       "tuning (the score's noise alone may exceed it).")
  while hi / lo > 1 + 1e-4:
    mid = math.sqrt(lo * hi)
    if spent(mid) > target_epsilon:
      lo = mid
    else:
      hi = mid
  return hi


def _rdp(event: dp_accounting.DpEvent) -> np.ndarray:
  accountant = rdp.RdpAccountant()
  accountant.compose(event)
  return np.asarray(accountant.rdp, np.float64)


def rdp_dominated(event: dp_accounting.DpEvent, reference: dp_accounting.DpEvent) -> bool:
  """Whether `event`'s Renyi DP is at most `reference`'s at every order of
  dp-accounting's RDP accountant (the orders its bounds, repeat-and-select's
  included, are computed from)."""
  return bool(np.all(_rdp(event) <= _rdp(reference)))


def trial_noise_for(reference: dp_accounting.DpEvent, *, sampler: Any, steps: int,
                    score_noise_multiplier: Optional[float] = None) -> float:
  """The smallest noise multiplier (to 1e-4 relative) with which `steps` steps
  of `sampler` (and a `private_score` of `score_noise_multiplier`, None: a
  public score) are RDP-dominated by `reference` (`rdp_dominated`): how a
  candidate with another batch size or number of steps joins a tuning whose
  `trial_event` is `reference`.

  >>> import dp_accounting, optax_dp
  >>> reference = optax_dp.PoissonSampler(60000, 256).dp_event(1.0, 1000)
  >>> sigma = optax_dp.trial_noise_for(reference, sampler=optax_dp.PoissonSampler(60000, 512),
  ...                                  steps=1000)
  >>> sigma > 1.0
  True
  """
  def event(sigma):
    return trial_event_of(sampler, sigma, steps, score_noise_multiplier)

  lo, hi = 1e-2, 1.0
  while not rdp_dominated(event(hi), reference):
    lo, hi = hi, hi * 2
    if hi > 1e6:
      raise ValueError("no noise multiplier makes this trial as private as the reference "
                       "(its score noise alone may exceed it).")
  while hi / lo > 1 + 1e-4:
    mid = math.sqrt(lo * hi)
    if rdp_dominated(event(mid), reference):
      hi = mid
    else:
      lo = mid
  return hi
