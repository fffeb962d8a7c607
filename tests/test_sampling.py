"""Tests for optax_dp._sample._sampling: the samplers as mechanisms (what the
accounting assumes of them) -- poisson_batches / PoissonSampler (untruncated
and truncated), FixedBatchSampler, ShuffleSampler -- their validation,
make_sampler, and their dp_event and description.

How batches are laid out, padded, resumed and split into accumulation chunks
(optax_dp._sample._batches) is tested in test_batches.py.

Statistical tests use fixed seeds. Each tolerance is chosen so that a correct
sampler would fail it with probability at most ALPHA = 1e-6 over the choice of
seed (derivation next to each test), while the plausible bugs (a wrong rate, a
fixed-size or shuffling sampler where Poisson is claimed, correlated steps, a
repeated permutation, untruncated or wrongly truncated sizes) fail by many
standard errors.
"""

import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats

import optax_dp

# Family-wise false-alarm probability of each statistical test.
ALPHA = 1e-6


# Two-sided normal quantile for ALPHA: 4.89 sigma.
Z = stats.norm.isf(ALPHA / 2)


def _as_lists(batches):
  return [(b.indices.tolist(), b.mask.tolist()) for b in batches]


# ---------------------------------------------------------------------------
# Poisson sampling (poisson_batches, untruncated).

def _inclusion_matrix(seed, n, b, steps, **kwargs):
  """(steps, n) bool matrix: example i included at step t."""
  x = np.zeros((steps, n), dtype=bool)
  for t, batch in enumerate(optax_dp.poisson_batches(
      seed, dataset_size=n, expected_batch_size=b, steps=steps, **kwargs)):
    x[t, batch.indices[batch.mask]] = True
  return x


# N=200, expected batch 20 (q=0.1), 2000 steps.
N, B, T = 200, 20, 2000


Q = B / N


@pytest.fixture(scope="module")
def inclusions():
  return _inclusion_matrix(1234, N, B, T)


def test_pooled_inclusion_rate(inclusions):
  # Total inclusions ~ Binomial(N*T, q): mean N*T*q, sd sqrt(N*T*q*(1-q)) = 190.
  total = inclusions.sum()
  sd = math.sqrt(N * T * Q * (1 - Q))
  assert abs(total - N * T * Q) <= Z * sd, (total, N * T * Q, sd)


def test_each_example_inclusion_frequency(inclusions):
  # Each example's count ~ Binomial(T, q) (mean 200, sd 13.4). Bonferroni over
  # N examples: each two-sided test at ALPHA/N, with exact binomial quantiles
  # (about 5.9 sd either side).
  counts = inclusions.sum(axis=0)
  lo = stats.binom.ppf(ALPHA / (2 * N), T, Q)
  hi = stats.binom.isf(ALPHA / (2 * N), T, Q)
  assert counts.min() >= lo and counts.max() <= hi, (counts.min(), counts.max(), lo, hi)


def test_inclusion_counts_dispersion(inclusions):
  # Pearson statistic sum_i (c_i - Tq)^2 / (Tq(1-q)) over N independent
  # examples is ~ chi^2(N) (normal approximation per example, Tq=200). Its lower
  # tail catches samplers that are too uniform (shuffling / epoch-based: every
  # example equally often), its upper tail over-dispersed ones. Two-sided ALPHA.
  counts = inclusions.sum(axis=0)
  stat = np.sum((counts - T * Q) ** 2) / (T * Q * (1 - Q))
  lo, hi = stats.chi2.ppf(ALPHA / 2, N), stats.chi2.isf(ALPHA / 2, N)
  assert lo <= stat <= hi, (stat, lo, hi)


def test_batch_size_distribution(inclusions):
  # Batch sizes are i.i.d. Binomial(N, q): mean Nq=20, variance Nq(1-q)=18.
  sizes = inclusions.sum(axis=1).astype(np.float64)
  mean, var = N * Q, N * Q * (1 - Q)
  # Sample mean: sd sqrt(var / T).
  assert abs(sizes.mean() - mean) <= Z * math.sqrt(var / T), sizes.mean()
  # Unbiased sample variance: Var(S^2) ~= (mu4 - var^2 (T-3)/(T-1)) / T with the
  # binomial central 4th moment mu4 = var * (1 + 3 (N-2) q (1-q)). A fixed-size
  # sampler has S^2 = 0, ~31 sd away.
  mu4 = var * (1 + 3 * (N - 2) * Q * (1 - Q))
  sd_s2 = math.sqrt((mu4 - var ** 2 * (T - 3) / (T - 1)) / T)
  s2 = sizes.var(ddof=1)
  assert abs(s2 - var) <= Z * sd_s2, (s2, var, sd_s2)


def test_consecutive_steps_independent(inclusions):
  # Joint inclusion of the same example at steps t and t+1. For one example,
  # S = sum_t X_t X_{t+1} over T-1 overlapping pairs of i.i.d. Bernoulli(q) has
  # E[S] = (T-1) q^2 and Var[S] = (T-1)(q^2 - q^4) + 2(T-2)(q^3 - q^4); examples
  # are independent, so these add over N. Two-sided ALPHA (4.9 sd).
  joint = np.sum(inclusions[1:] & inclusions[:-1])
  mean = N * (T - 1) * Q ** 2
  var = N * ((T - 1) * (Q ** 2 - Q ** 4) + 2 * (T - 2) * (Q ** 3 - Q ** 4))
  assert abs(joint - mean) <= Z * math.sqrt(var), (joint, mean, math.sqrt(var))


def test_batch_sizes_uncorrelated_across_steps(inclusions):
  # Lag-1 sample autocorrelation of i.i.d. sizes is ~ N(0, 1/T) (sd 0.022).
  sizes = inclusions.sum(axis=1).astype(np.float64)
  c = sizes - sizes.mean()
  r = np.sum(c[1:] * c[:-1]) / np.sum(c * c)
  assert abs(r) <= Z / math.sqrt(T), r


def _as_tuples(seed, **kwargs):
  return [(b.indices.tolist(), b.mask.tolist())
          for b in optax_dp.poisson_batches(seed, **kwargs)]


def test_deterministic_per_seed():
  kwargs = dict(dataset_size=500, expected_batch_size=25, steps=50)
  assert _as_tuples(7, **kwargs) == _as_tuples(7, **kwargs)
  assert _as_tuples(7, **kwargs) != _as_tuples(8, **kwargs)
  # Different seeds give (almost surely) different batches at every step, not
  # just somewhere: a collision of two 500-bit subsets is negligible.
  a, b = _as_tuples(7, **kwargs), _as_tuples(8, **kwargs)
  assert all(x != y for x, y in zip(a, b))


# ---------------------------------------------------------------------------
# Overflow: never a silently cut batch.

def test_overflow_raises_runtime_error():
  # Batch sizes ~ Binomial(100, 0.5); P(size <= 1) ~ 8e-29 per step.
  gen = optax_dp.poisson_batches(
      0, dataset_size=100, expected_batch_size=50, steps=10, max_batch_size=1)
  with pytest.raises(RuntimeError, match="max_batch_size"):
    next(gen)


def test_overflow_raises_midway_without_dropping_examples():
  # Never a truncated batch: every yielded batch is complete, then it raises.
  # Sizes ~ Binomial(100, 0.1), cap 10: P(size > 10) = 0.42 per step, so
  # overflow within 200 steps is certain up to 0.58^200.
  sizes = []
  with pytest.raises(RuntimeError):
    for batch in optax_dp.poisson_batches(
        5, dataset_size=100, expected_batch_size=10, steps=200, max_batch_size=10):
      sizes.append(batch.size)
  assert all(s <= 10 for s in sizes)


# ---------------------------------------------------------------------------
# FixedBatchSampler.

FN, FB, FT = 200, 20, 2000  # q = B/N = 0.1


@pytest.fixture(scope="module")
def fixed_batches():
  return list(optax_dp.FixedBatchSampler(FN, FB).batches(2024, steps=FT))


def test_fixed_batch_structure(fixed_batches):
  assert len(fixed_batches) == FT
  for batch in fixed_batches:
    assert isinstance(batch, optax_dp.Batch)
    assert batch.indices.shape == batch.mask.shape == (FB,)
    assert batch.indices.dtype == np.int64 and batch.mask.dtype == np.bool_
    assert batch.mask.all() and batch.size == FB
    assert np.all((batch.indices >= 0) & (batch.indices < FN))
    assert len(np.unique(batch.indices)) == FB  # without replacement
    assert np.all(np.diff(batch.indices) > 0)   # documented: sorted


def test_fixed_inclusion_frequency(fixed_batches):
  # Each step includes example i with probability B/N (a uniform B-subset), and
  # steps are independent, so i's count over T steps is Binomial(T, B/N)
  # (mean 200, sd 13.4). Bonferroni over the N examples, each two-sided at
  # ALPHA/N with exact binomial quantiles.
  counts = np.zeros(FN, dtype=np.int64)
  for batch in fixed_batches:
    counts[batch.indices] += 1
  assert counts.sum() == FT * FB  # exact: every batch is full
  q = FB / FN
  lo = stats.binom.ppf(ALPHA / (2 * FN), FT, q)
  hi = stats.binom.isf(ALPHA / (2 * FN), FT, q)
  assert counts.min() >= lo and counts.max() <= hi, (counts.min(), counts.max(), lo, hi)
  # Pearson dispersion. Per step the inclusion indicators of a uniform
  # B-subset have variance q(1-q) and pairwise covariance -q(1-q)/(N-1), so the
  # count vector has covariance T q(1-q) N/(N-1) (I - 11'/N): in the normal
  # approximation (Tq = 200 per example), (N-1)/N * sum_i (c_i - Tq)^2 /
  # (Tq(1-q)) is chi^2(N-1). Two-sided ALPHA. A shuffling sampler (every
  # example exactly T*B/N times) gives 0, far below the lower bound (116).
  stat = (FN - 1) / FN * np.sum((counts - FT * q) ** 2) / (FT * q * (1 - q))
  lo_chi, hi_chi = stats.chi2.ppf(ALPHA / 2, FN - 1), stats.chi2.isf(ALPHA / 2, FN - 1)
  assert lo_chi <= stat <= hi_chi, (stat, lo_chi, hi_chi)


def test_fixed_consecutive_overlap_is_hypergeometric(fixed_batches):
  # Independent uniform B-subsets S_t: X_t = |S_t & S_{t+1}| is
  # Hypergeometric(N, B, B), mean B^2/N = 2, variance
  # B (B/N) ((N-B)/N) ((N-B)/(N-1)) = 1.628. Given S_{t+1}, X_t and X_{t+1} are
  # independent with a law that does not depend on S_{t+1}, so the X_t are
  # i.i.d. and their sum over T-1 pairs has mean (T-1) B^2/N = 3998 and sd 57.
  # Normal approximation (1999 i.i.d. terms), two-sided ALPHA (4.9 sd). A
  # shuffling sampler gives ~0, a repeated batch gives B per pair.
  sets = [set(b.indices.tolist()) for b in fixed_batches]
  overlap = sum(len(a & b) for a, b in zip(sets, sets[1:]))
  mean1 = FB * FB / FN
  var1 = FB * (FB / FN) * ((FN - FB) / FN) * ((FN - FB) / (FN - 1))
  mean, sd = (FT - 1) * mean1, math.sqrt((FT - 1) * var1)
  assert abs(overlap - mean) <= Z * sd, (overlap, mean, sd)
  # Also exactly hypergeometric per pair: no pair ever exceeds B.
  assert max(len(a & b) for a, b in zip(sets, sets[1:])) < FB


def test_fixed_deterministic_per_seed():
  sampler = optax_dp.FixedBatchSampler(500, 25)
  a = _as_lists(sampler.batches(7, steps=40))
  assert a == _as_lists(sampler.batches(7, steps=40))
  b = _as_lists(sampler.batches(8, steps=40))
  # Two independent uniform 25-subsets of 500 coincide with probability
  # 1/C(500, 25) ~ 1e-42: every step differs.
  assert all(x != y for x, y in zip(a, b))
  # An equal sampler object (frozen dataclass) gives the same batches.
  assert _as_lists(optax_dp.FixedBatchSampler(500, 25).batches(7, steps=40)) == a


def test_fixed_full_dataset_batch():
  # B = N: every batch is the whole dataset.
  for batch in optax_dp.FixedBatchSampler(13, 13).batches(0, steps=5):
    np.testing.assert_array_equal(batch.indices, np.arange(13))
    assert batch.mask.all()


# ---------------------------------------------------------------------------
# ShuffleSampler.

SN, SB = 103, 10          # 10 batches per epoch, 3 examples left out per epoch


SPE = SN // SB


SE = 600                  # epochs in the statistical test


@pytest.fixture(scope="module")
def shuffle_batches():
  return list(optax_dp.ShuffleSampler(SN, SB).batches(99, steps=SE * SPE))


def test_shuffle_steps_per_epoch():
  for n, b in [(103, 10), (100, 10), (10, 10), (60000, 256), (7, 1), (19, 10)]:
    sampler = optax_dp.ShuffleSampler(n, b)
    assert sampler.steps_per_epoch == n // b
    spe = n // b
    assert sampler.epochs(1) == 1
    assert sampler.epochs(spe) == 1
    assert sampler.epochs(spe + 1) == 2
    assert sampler.epochs(3 * spe) == 3


def test_shuffle_batch_structure_and_epochs(shuffle_batches):
  assert len(shuffle_batches) == SE * SPE
  previous = None
  for e in range(SE):
    epoch = shuffle_batches[e * SPE:(e + 1) * SPE]
    for batch in epoch:
      assert batch.indices.shape == batch.mask.shape == (SB,)
      assert batch.mask.all()
      assert np.all((batch.indices >= 0) & (batch.indices < SN))
    seen = np.concatenate([b.indices for b in epoch])
    # No example twice in an epoch; exactly steps_per_epoch * B distinct ones.
    assert len(np.unique(seen)) == len(seen) == SPE * SB
    # A fresh permutation every epoch: two uniform permutations of 103 cut the
    # same way agree with probability ~ (10!)^10 3! / 103! < 1e-97.
    order = [tuple(b.indices.tolist()) for b in epoch]
    assert order != previous
    previous = order


def test_shuffle_left_out_examples_vary_across_epochs(shuffle_batches):
  # With independent uniform permutations per epoch, example i is in some
  # batch of an epoch with probability (N - N mod B)/N = 100/103, independently
  # across epochs: its count over E epochs is Binomial(E, 100/103) (mean 582.5,
  # sd 4.1). Bonferroni over N, exact binomial quantiles, two-sided ALPHA/N
  # each. One permutation reused every epoch gives counts E or 0.
  counts = np.zeros(SN, dtype=np.int64)
  for batch in shuffle_batches:
    counts[batch.indices] += 1
  p = SPE * SB / SN
  lo = stats.binom.ppf(ALPHA / (2 * SN), SE, p)
  hi = stats.binom.isf(ALPHA / (2 * SN), SE, p)
  assert counts.min() >= lo and counts.max() <= hi, (counts.min(), counts.max(), lo, hi)


def test_shuffle_partial_last_epoch():
  sampler = optax_dp.ShuffleSampler(SN, SB)
  full = list(sampler.batches(5, steps=3 * SPE))
  partial = list(sampler.batches(5, steps=2 * SPE + 4))
  assert len(partial) == 2 * SPE + 4
  # The partial epoch is the start of epoch 2's permutation, as in a longer run.
  assert _as_lists(partial) == _as_lists(full[:2 * SPE + 4])
  tail = np.concatenate([b.indices for b in partial[2 * SPE:]])
  assert len(np.unique(tail)) == 4 * SB


def test_shuffle_deterministic_per_seed():
  sampler = optax_dp.ShuffleSampler(SN, SB)
  a = _as_lists(sampler.batches(3, steps=2 * SPE))
  assert a == _as_lists(sampler.batches(3, steps=2 * SPE))
  b = _as_lists(sampler.batches(4, steps=2 * SPE))
  # Each batch is 10 of 103 examples; two independent permutations put the
  # same 10 (in sorted order) at one position with probability 1/C(103, 10)
  # = 4e-14: < 1e-12 over the 20 positions.
  assert all(x != y for x, y in zip(a, b))


# ---------------------------------------------------------------------------
# PoissonSampler(truncate=True).

TN, TB, TM, TT = 200, 20, 24, 3000  # sizes ~ min(Binomial(200, 0.1), 24)


TQ = TB / TN


@pytest.fixture(scope="module")
def truncated_batches():
  sampler = optax_dp.PoissonSampler(TN, TB, max_batch_size=TM, truncate=True)
  return list(sampler.batches(31, steps=TT))


def _truncated_size_pmf():
  """The law of min(Binomial(N, q), M), from scipy."""
  pmf = stats.binom.pmf(np.arange(TM + 1), TN, TQ)
  pmf[TM] = stats.binom.sf(TM - 1, TN, TQ)  # P(X >= M)
  return pmf


def test_truncated_batch_structure(truncated_batches):
  assert len(truncated_batches) == TT
  buckets = optax_dp.PoissonSampler(TN, TB, max_batch_size=TM, truncate=True).padding_sizes(TT)
  assert buckets[-1] == TM and len(buckets) <= 4
  for batch in truncated_batches:
    size = batch.size
    assert size <= TM
    padded = min(x for x in buckets if x >= max(size, 1))   # the bucket that holds it
    assert batch.indices.shape == batch.mask.shape == (padded,)
    np.testing.assert_array_equal(batch.mask, np.arange(padded) < size)
    assert np.all(batch.indices[size:] == -1)
    real = batch.indices[:size]
    assert np.all((real >= 0) & (real < TN)) and len(np.unique(real)) == size


def test_truncated_size_at_cap_matches_binomial_tail(truncated_batches):
  # P(size == M) = P(Binomial(N, q) >= M) = 0.2017; the number of capped
  # batches over T independent steps is Binomial(T, that): mean 605, sd 22.
  # Exact two-sided binomial quantiles at ALPHA. Capping at M-1 or M+1 instead
  # moves the mean by ~T P(X = M or M-1) = 170..208, 8-9 sd; counting only
  # P(X == M) (no truncation) gives 170, 20 sd off.
  sizes = np.array([b.size for b in truncated_batches])
  p_cap = stats.binom.sf(TM - 1, TN, TQ)
  at_cap = int(np.sum(sizes == TM))
  lo = stats.binom.ppf(ALPHA / 2, TT, p_cap)
  hi = stats.binom.isf(ALPHA / 2, TT, p_cap)
  assert lo <= at_cap <= hi, (at_cap, lo, hi, TT * p_cap)


def test_truncated_size_mean_and_distribution(truncated_batches):
  sizes = np.array([b.size for b in truncated_batches])
  pmf = _truncated_size_pmf()
  support = np.arange(TM + 1)
  mean = np.sum(support * pmf)            # 19.58 (vs 20 untruncated)
  var = np.sum((support - mean) ** 2 * pmf)
  # Sample mean of T i.i.d. sizes: sd sqrt(var / T) = 0.065 (var 12.6); the
  # untruncated mean is 6.5 sd away. Two-sided ALPHA.
  assert abs(sizes.mean() - mean) <= Z * math.sqrt(var / TT), (sizes.mean(), mean)
  # Pearson goodness of fit to min(Binomial(N, q), M), sizes <= 13 pooled so
  # that every bin expects >= 100 batches (chi^2 approximation good), 12 bins:
  # chi^2(11) upper ALPHA quantile.
  bins = [pmf[:14].sum()] + list(pmf[14:])
  observed = [np.sum(sizes <= 13)] + [np.sum(sizes == s) for s in range(14, TM + 1)]
  expected = TT * np.array(bins)
  assert expected.min() >= 100
  chi2 = np.sum((np.array(observed) - expected) ** 2 / expected)
  assert chi2 <= stats.chi2.isf(ALPHA, len(bins) - 1), chi2


def test_truncated_inclusion_frequency(truncated_batches):
  # The truncated sample is a uniform subset, so each example is included with
  # probability E[min(X, M)] / N per step, independently across steps:
  # Binomial(T, E[size]/N) per example. Bonferroni over N, exact quantiles.
  pmf = _truncated_size_pmf()
  p = np.sum(np.arange(TM + 1) * pmf) / TN
  counts = np.zeros(TN, dtype=np.int64)
  for batch in truncated_batches:
    counts[batch.indices[batch.mask]] += 1
  lo = stats.binom.ppf(ALPHA / (2 * TN), TT, p)
  hi = stats.binom.isf(ALPHA / (2 * TN), TT, p)
  assert counts.min() >= lo and counts.max() <= hi, (counts.min(), counts.max(), lo, hi)


def test_truncation_caps_every_batch():
  # Binomial(100, 0.5) sizes with cap 10: P(X < 10) = 1.7e-18 per step, so
  # every truncated batch is exactly 10 distinct examples.
  sampler = optax_dp.PoissonSampler(100, 50, max_batch_size=10, truncate=True)
  for batch in sampler.batches(0, steps=50):
    assert batch.indices.shape == (10,) and batch.mask.all()
    assert len(np.unique(batch.indices)) == 10


def test_untruncated_overflow_raises():
  # Same setting without truncate: the first batch overflows (P = 1 - 1.7e-18).
  sampler = optax_dp.PoissonSampler(100, 50, max_batch_size=10)
  batches = sampler.batches(0, steps=50)
  with pytest.raises(RuntimeError, match="max_batch_size"):
    next(batches)


# ---------------------------------------------------------------------------
# Bad inputs.

BAD_SAMPLER_KWARGS = [
    dict(dataset_size=0, expected_batch_size=1, steps=1),
    dict(dataset_size=-5, expected_batch_size=1, steps=1),
    dict(dataset_size=10.5, expected_batch_size=1, steps=1),
    dict(dataset_size=True, expected_batch_size=1, steps=1),
    dict(dataset_size=10, expected_batch_size=0, steps=1),
    dict(dataset_size=10, expected_batch_size=11, steps=1),
    dict(dataset_size=10, expected_batch_size=11, steps=1, max_batch_size=10),
    dict(dataset_size=10, expected_batch_size=2, steps=0),
    dict(dataset_size=10, expected_batch_size=2, steps=2.5),
    dict(dataset_size=10, expected_batch_size=2, steps="3"),
    dict(dataset_size=10, expected_batch_size=2, steps=3, max_batch_size=0),
    dict(dataset_size=10, expected_batch_size=2, steps=3, max_batch_size=2.5),
    dict(dataset_size=10, expected_batch_size=2, steps=3, pad_to_multiple_of=0),
    dict(dataset_size=10, expected_batch_size=2, steps=3, pad_to_multiple_of=1.5),
]


@pytest.mark.parametrize("kwargs", BAD_SAMPLER_KWARGS)
def test_poisson_batches_rejects_bad_inputs(kwargs):
  # Validation happens at the call, before any batch is drawn.
  with pytest.raises(ValueError):
    optax_dp.poisson_batches(0, **kwargs)


@pytest.mark.parametrize("cls", [optax_dp.FixedBatchSampler, optax_dp.ShuffleSampler,
                                 optax_dp.PoissonSampler])
@pytest.mark.parametrize("n,b", [(10, 11), (0, 1), (-5, 1), (10, 0), (10, -2),
                                 (10, 2.5), (10.5, 2), (True, 1), (10, "2"),
                                 (10, None)])
def test_sampler_rejects_bad_sizes(cls, n, b):
  with pytest.raises(ValueError):
    cls(n, b)


@pytest.mark.parametrize("kwargs", [
    dict(truncate=True),                          # no max_batch_size
    dict(truncate=True, max_batch_size=None),
    dict(truncate="yes", max_batch_size=5),
    dict(max_batch_size=0),
    dict(max_batch_size=-1),
    dict(pad_to_multiple_of=0),
])
def test_poisson_sampler_rejects_bad_options(kwargs):
  with pytest.raises(ValueError):
    optax_dp.PoissonSampler(100, 10, **kwargs)


def test_make_sampler():
  p = optax_dp.make_sampler("poisson", dataset_size=100, batch_size=10,
                            max_batch_size=20, truncate=True)
  assert p == optax_dp.PoissonSampler(100, 10, max_batch_size=20, truncate=True)
  assert optax_dp.make_sampler("fixed", dataset_size=100, batch_size=10) == (
      optax_dp.FixedBatchSampler(100, 10))
  assert optax_dp.make_sampler("shuffle", dataset_size=100, batch_size=10) == (
      optax_dp.ShuffleSampler(100, 10))
  for name in ("poisson", "fixed", "shuffle"):
    sampler = optax_dp.make_sampler(name, dataset_size=100, batch_size=10)
    assert sampler.name == name and sampler.expected_batch_size == 10


@pytest.mark.parametrize("name", ["uniform", "Poisson", "", "balls_and_bins"])
def test_make_sampler_rejects_unknown_name(name):
  with pytest.raises(ValueError, match="sampler"):
    optax_dp.make_sampler(name, dataset_size=100, batch_size=10)


# ---------------------------------------------------------------------------
# dp_event and accounting metadata.

def test_fixed_dp_event():
  sampler = optax_dp.FixedBatchSampler(1000, 50)
  # Replace-one moves the clipped sum by up to 2C: Gaussian at sigma / 2.
  assert sampler.dp_event(3.0, 17) == dp_accounting.SelfComposedDpEvent(
      dp_accounting.SampledWithoutReplacementDpEvent(
          1000, 50, dp_accounting.GaussianDpEvent(1.5)), 17)
  assert sampler.accountants == ("rdp",)
  assert sampler.neighboring_relation == "replace one example by another"
  assert sampler.name == "fixed" and sampler.expected_batch_size == 50


def test_fixed_dp_event_matches_jax_privacy():
  jpa = pytest.importorskip("jax_privacy.experimental.accounting")
  sampler = optax_dp.FixedBatchSampler(1000, 50)
  # jax_privacy's noise multiplier is relative to the replace-one sensitivity.
  assert sampler.dp_event(3.0, 17) == jpa.fixed_dpsgd_event(
      1.5, 17, dataset_size=1000, batch_size=50)


@pytest.mark.parametrize("steps,epochs", [(1, 1), (10, 1), (11, 2), (30, 3), (31, 4)])
def test_shuffle_dp_event(steps, epochs):
  sampler = optax_dp.ShuffleSampler(105, 10)  # 10 steps per epoch
  # One Gaussian (sensitivity C, zero-out) per epoch started; no amplification.
  assert sampler.dp_event(1.3, steps) == dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(1.3), epochs)
  assert sampler.accountants[0] == "pld" and set(sampler.accountants) == {"pld", "rdp"}
  assert "zero out" in sampler.neighboring_relation
  assert sampler.name == "shuffle"


def test_poisson_dp_events():
  plain = optax_dp.PoissonSampler(1000, 50)
  assert plain.dp_event(1.1, 9) == dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), 9)
  assert plain.accountants[0] == "pld" and "rdp" in plain.accountants
  truncated = optax_dp.PoissonSampler(1000, 50, max_batch_size=70, truncate=True)
  assert truncated.dp_event(1.1, 9) == dp_accounting.SelfComposedDpEvent(
      dp_accounting.TruncatedSubsampledGaussianDpEvent(
          dataset_size=1000, sampling_probability=0.05, truncated_batch_size=70,
          noise_multiplier=1.1), 9)
  assert truncated.accountants == ("pld",)
  assert plain.neighboring_relation == "add or remove one example"
  # The truncated event's analysis fixes the dataset size: zero-out adjacency
  # (a zeroed example keeps its place in the truncation), as jax_privacy says.
  assert "zero out" in truncated.neighboring_relation
  for sampler in (plain, truncated):
    assert sampler.name == "poisson"


def test_truncated_dp_event_matches_jax_privacy():
  jpa = pytest.importorskip("jax_privacy.experimental.accounting")
  sampler = optax_dp.PoissonSampler(1000, 50, max_batch_size=70, truncate=True)
  assert sampler.dp_event(1.1, 9) == jpa.truncated_dpsgd_event(
      1.1, 9, sampling_prob=0.05, num_examples=1000, truncated_batch_size=70)


def test_describe_names_the_sampler():
  assert "Poisson" in optax_dp.PoissonSampler(1000, 50).describe()
  assert "truncated" in optax_dp.PoissonSampler(
      1000, 50, max_batch_size=70, truncate=True).describe()
  assert "truncated" not in optax_dp.PoissonSampler(1000, 50).describe()
  assert "without replacement" in optax_dp.FixedBatchSampler(1000, 50).describe()
  text = optax_dp.ShuffleSampler(1000, 50).describe()
  assert "permutation" in text and "20 batches" in text
