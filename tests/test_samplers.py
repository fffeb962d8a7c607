"""Tests for the samplers of optax_dp._sample._sampling: FixedBatchSampler,
ShuffleSampler, PoissonSampler(truncate=True), and what all samplers share
(resumption, accumulation chunks, validation, dp_event).

(Untruncated Poisson sampling through `poisson_batches` is tested in
test_sampling.py.)

Statistical tests use fixed seeds. Each tolerance is chosen so that a correct
sampler would fail it with probability at most ALPHA = 1e-6 over the choice of
seed (derivation next to each test), while the plausible bugs (wrong rate,
correlated steps, a repeated permutation, untruncated or wrongly truncated
sizes) fail by many standard errors.
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


def _inclusions(sampler, seed, steps):
  """(steps, n) bool matrix: example i in the (real part of) batch t."""
  x = np.zeros((steps, sampler.dataset_size), dtype=bool)
  for t, batch in enumerate(sampler.batches(seed, steps=steps)):
    x[t, batch.indices[batch.mask]] = True
  return x


def _as_lists(batches):
  return [(b.indices.tolist(), b.mask.tolist()) for b in batches]


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
# Common behaviour: resumption, accumulation chunks.

SAMPLERS = {
    "poisson": optax_dp.PoissonSampler(100, 10),
    "poisson_truncated": optax_dp.PoissonSampler(100, 10, max_batch_size=12, truncate=True),
    "poisson_padded": optax_dp.PoissonSampler(100, 10, pad_to_multiple_of=4),
    "poisson_flat": optax_dp.PoissonSampler(100, 10, padding_buckets=None),
    "fixed": optax_dp.FixedBatchSampler(100, 10),
    "shuffle": optax_dp.ShuffleSampler(103, 10),
}
RUN_STEPS = 35  # 3.5 shuffle epochs


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("start_step", [0, 1, 9, 10, 11, 23, RUN_STEPS - 1, RUN_STEPS])
def test_start_step_yields_tail_of_full_run(name, start_step):
  sampler = SAMPLERS[name]
  full = _as_lists(sampler.batches(11, steps=RUN_STEPS))
  assert len(full) == RUN_STEPS
  resumed = _as_lists(sampler.batches(11, steps=RUN_STEPS, start_step=start_step))
  assert resumed == full[start_step:]


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("start_step", [0, 4, 10])
def test_start_step_with_accumulation_yields_tail(name, start_step):
  sampler, k = SAMPLERS[name], 3
  full = _as_lists(sampler.batches(11, steps=RUN_STEPS, accumulation_steps=k))
  assert len(full) == RUN_STEPS * k
  resumed = _as_lists(sampler.batches(11, steps=RUN_STEPS, start_step=start_step,
                                      accumulation_steps=k))
  assert resumed == full[start_step * k:]


def _check_padding(batch):
  # Padding is index -1 with mask False; every real index is a valid example.
  np.testing.assert_array_equal(batch.mask, batch.indices >= 0)
  assert np.all(batch.indices[~batch.mask] == -1)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 7, 40])
def test_accumulation_chunks_reassemble_the_logical_batch(name, k):
  sampler = SAMPLERS[name]
  logical = list(sampler.batches(5, steps=RUN_STEPS))
  chunks = list(sampler.batches(5, steps=RUN_STEPS, accumulation_steps=k))
  assert len(chunks) == RUN_STEPS * k
  shapes = set()
  for t, whole in enumerate(logical):
    group = chunks[t * k:(t + 1) * k]
    for chunk in group:
      _check_padding(chunk)
      assert chunk.indices.shape == chunk.mask.shape
      shapes.add(chunk.indices.shape)
    # One shape within a logical step (always), ...
    assert len({c.indices.shape for c in group}) == 1
    indices = np.concatenate([c.indices for c in group])
    mask = np.concatenate([c.mask for c in group])
    # ... the same real examples as the k=1 batch of this seed and step, in the
    # same (sorted) order, all before any padding.
    np.testing.assert_array_equal(indices[mask], whole.indices[whole.mask])
    np.testing.assert_array_equal(mask, np.arange(len(mask)) < whole.size)
    # ... in chunks of ceil(L / k) for the logical batch's static size L
    # (rounded up to the multiple of 4 for poisson_padded).
    physical = math.ceil(whole.indices.shape[0] / k)
    if name == "poisson_padded" and k > 1:
      physical = 4 * math.ceil(physical / 4)
    assert group[0].indices.shape == (physical,)
  if name.startswith("poisson") and name != "poisson_flat":
    assert len(shapes) <= 4  # at most padding_buckets static shapes
  else:
    assert len(shapes) == 1  # one static shape for the whole run


@pytest.mark.parametrize("k", [2, 3])
def test_poisson_pad_to_multiple_with_accumulation(k):
  m = 4
  sampler = optax_dp.PoissonSampler(400, 20, max_batch_size=64, pad_to_multiple_of=m,
                                    padding_buckets=None)
  logical = list(sampler.batches(8, steps=100))
  chunks = list(sampler.batches(8, steps=100, accumulation_steps=k))
  shapes = set()
  for t, whole in enumerate(logical):
    group = chunks[t * k:(t + 1) * k]
    group_shapes = {c.indices.shape for c in group}
    assert len(group_shapes) == 1  # static within the logical step
    (physical,), = group_shapes
    shapes.add(physical)
    assert physical % m == 0
    # Enough room for the logical batch, and no more than one multiple of m
    # per chunk beyond the k=1 padded size.
    assert physical * k >= whole.size
    assert physical <= math.ceil(whole.indices.shape[0] / k) + m - 1
    for chunk in group:
      _check_padding(chunk)
    real = np.concatenate([c.indices[c.mask] for c in group])
    np.testing.assert_array_equal(real, whole.indices[whole.mask])
  assert len(shapes) > 1  # shapes follow the realised sizes


def test_accumulation_with_more_chunks_than_examples():
  # k > B: most chunks are pure padding, but nothing is lost or duplicated.
  sampler = optax_dp.FixedBatchSampler(50, 3)
  chunks = list(sampler.batches(0, steps=2, accumulation_steps=5))
  assert len(chunks) == 10
  assert all(c.indices.shape == (1,) for c in chunks)
  for t in range(2):
    assert sum(c.size for c in chunks[5 * t:5 * t + 5]) == 3


# ---------------------------------------------------------------------------
# Bad inputs.

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


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("seed", [-1, 1.5, True, "0", None])
def test_batches_rejects_bad_seed(name, seed):
  with pytest.raises(ValueError, match="seed"):
    SAMPLERS[name].batches(seed, steps=3)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("kwargs", [
    dict(steps=5, start_step=6),
    dict(steps=5, start_step=-1),
    dict(steps=0),
    dict(steps=-3),
    dict(steps=2.5),
    dict(steps=5, accumulation_steps=0),
    dict(steps=5, accumulation_steps=-2),
    dict(steps=5, accumulation_steps=1.5),
])
def test_batches_rejects_bad_run_arguments(name, kwargs):
  # Raised at the call, before any batch is drawn.
  with pytest.raises(ValueError):
    SAMPLERS[name].batches(0, **kwargs)


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
