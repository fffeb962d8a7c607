"""Tests for optax_dp._sample._sampling: poisson_batches, poisson_max_batch_size,
gather_batch.

Statistical tests use fixed seeds. Each tolerance is chosen so that a correct
Poisson sampler would fail it with probability at most ~1e-6 over the choice of
seed (stated per test), while a wrong sampling rate, a fixed-size or shuffling
sampler, or correlated steps fail by many standard errors.
"""

import math

import numpy as np
import pytest
from scipy import stats

import optax_dp

# Family-wise false-alarm probability of each statistical test.
ALPHA = 1e-6
# Two-sided normal quantile for ALPHA: 4.89 sigma.
Z = stats.norm.isf(ALPHA / 2)


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


# ---------------------------------------------------------------------------
# Batch structure.

@pytest.mark.parametrize("n,b,steps,max_batch_size", [
    (100, 10, 300, None),
    (100, 10, 300, 40),
    (7, 7, 5, None),      # q = 1: every example every step
    (1000, 1, 300, None),  # many empty batches
])
def test_batch_structure(n, b, steps, max_batch_size):
  expected_max = (max_batch_size if max_batch_size is not None
                  else optax_dp.poisson_max_batch_size(n, b, steps))
  buckets = optax_dp.PoissonSampler(n, b, max_batch_size).padding_sizes(steps)
  assert buckets[-1] == expected_max and len(buckets) <= 4
  batches = list(optax_dp.poisson_batches(
      0, dataset_size=n, expected_batch_size=b, steps=steps,
      max_batch_size=max_batch_size))
  assert len(batches) == steps
  for batch in batches:
    idx, mask = batch.indices, batch.mask
    assert isinstance(batch, optax_dp.PoissonBatch)
    size = batch.size
    padded = min(x for x in buckets if x >= max(size, 1))  # one of the static shapes
    assert idx.shape == mask.shape == (padded,)
    assert idx.dtype == np.int64 and mask.dtype == np.bool_
    assert size == mask.sum() == np.count_nonzero(idx >= 0)
    # Real examples first, then padding with index -1.
    np.testing.assert_array_equal(mask, np.arange(padded) < size)
    assert np.all(idx[size:] == -1)
    real = idx[:size]
    assert np.all((real >= 0) & (real < n))
    assert len(np.unique(real)) == size
  if b == n:
    assert all(batch.size == n for batch in batches)
  if b == 1:
    assert any(batch.size == 0 for batch in batches)  # P(empty) = 0.999^1000


@pytest.mark.parametrize("k", [1, 4, 7, 16])
def test_pad_to_multiple_of(k):
  max_batch_size = 64
  shapes = set()
  for batch in optax_dp.poisson_batches(
      3, dataset_size=400, expected_batch_size=20, steps=300,
      max_batch_size=max_batch_size, pad_to_multiple_of=k, padding_buckets=None):
    padded = batch.indices.shape[0]
    assert batch.mask.shape == (padded,)
    shapes.add(padded)
    assert padded >= max(batch.size, 1)
    # A multiple of k unless capped at max_batch_size, and no more than k-1
    # rows of padding beyond the realised size (at least one row in total).
    assert padded % k == 0 or padded == max_batch_size
    assert padded <= max(batch.size, 1) + k - 1
    assert padded <= max_batch_size
    np.testing.assert_array_equal(batch.mask, np.arange(padded) < batch.size)
    assert np.all(batch.indices[batch.size:] == -1)
  assert len(shapes) > 1  # shapes follow the realised size, not max_batch_size


def test_pad_to_multiple_capped_at_max_batch_size():
  for batch in optax_dp.poisson_batches(
      0, dataset_size=100, expected_batch_size=5, steps=50,
      max_batch_size=30, pad_to_multiple_of=32):
    assert batch.indices.shape == (30,)


# ---------------------------------------------------------------------------
# Seeding.

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
# poisson_max_batch_size.

MAX_BATCH_CASES = [
    (60000, 256, 14063, 1e-12),
    (200, 20, 2000, 1e-12),
    (1000, 10, 1, 1e-12),
    (50000, 500, 1000, 1e-12),
    (1000, 100, 100, 1e-3),
    (100, 100, 10, 1e-12),   # q = 1: the whole dataset
    # Regression: scipy's binom.isf saturates at N for tails below ~5.6e-17.
    (60000, 256, 100000, 1e-12),
]


@pytest.mark.parametrize("n,b,steps,p", MAX_BATCH_CASES)
def test_poisson_max_batch_size(n, b, steps, p):
  m = optax_dp.poisson_max_batch_size(n, b, steps, overflow_probability=p)
  q = b / n
  assert b <= m <= n
  # Union bound over steps: overflow probability at most p ...
  assert stats.binom.sf(m, n, q) * steps <= p
  # ... and m is the smallest such size (or the expected size itself).
  assert m == b or stats.binom.sf(m - 1, n, q) * steps > p


def test_default_max_batch_size_used_by_sampler():
  top = optax_dp.poisson_max_batch_size(60000, 256, 14063)
  batch = next(optax_dp.poisson_batches(
      0, dataset_size=60000, expected_batch_size=256, steps=14063, padding_buckets=None))
  assert batch.indices.shape == (top,)
  assert optax_dp.PoissonSampler(60000, 256).padding_sizes(14063)[-1] == top


# ---------------------------------------------------------------------------
# Overflow.

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
# gather_batch.

def test_gather_batch_pytree():
  n = 50
  rng = np.random.default_rng(0)
  data = {
      "x": rng.normal(size=(n, 3, 2)).astype(np.float32) + 10.0,  # never 0
      "y": np.arange(1, n + 1, dtype=np.int32),                     # never 0
      "nested": {"w": np.arange(n, dtype=np.float64) + 0.5},
  }
  checked_padding = False
  for batch in optax_dp.poisson_batches(
      1, dataset_size=n, expected_batch_size=10, steps=20):
    masked = optax_dp.gather_batch(data, batch)
    np.testing.assert_array_equal(masked.mask, batch.mask)
    out = masked.data
    assert set(out) == {"x", "y", "nested"} and set(out["nested"]) == {"w"}
    size, m = batch.size, batch.indices.shape[0]
    real = batch.indices[:size]
    for got, src in [(out["x"], data["x"]), (out["y"], data["y"]),
                     (out["nested"]["w"], data["nested"]["w"])]:
      got = np.asarray(got)
      assert got.shape == (m,) + src.shape[1:]
      assert got.dtype == src.dtype
      np.testing.assert_array_equal(got[:size], src[real])
      np.testing.assert_array_equal(got[size:], np.zeros_like(got[size:]))
      checked_padding |= m > size
  assert checked_padding


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


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_poisson_batches_rejects_bad_seed(seed):
  with pytest.raises(ValueError, match="seed"):
    optax_dp.poisson_batches(seed, dataset_size=10, expected_batch_size=2, steps=3)


@pytest.mark.parametrize("args,kwargs", [
    ((0, 1, 1), {}),
    ((10, 0, 1), {}),
    ((10, 11, 1), {}),
    ((10, 2, 0), {}),
    ((10, 2, 1.5), {}),
    ((10, 2, 1), dict(overflow_probability=0.0)),
    ((10, 2, 1), dict(overflow_probability=1.0)),
    ((10, 2, 1), dict(overflow_probability=-0.1)),
    ((10, 2, 1), dict(overflow_probability=math.nan)),
])
def test_poisson_max_batch_size_rejects_bad_inputs(args, kwargs):
  with pytest.raises(ValueError):
    optax_dp.poisson_max_batch_size(*args, **kwargs)


# ---------------------------------------------------------------------------
# Padding buckets: a bounded number of static shapes, the same batches.

def _expected_padded(buckets, dataset_size, expected_batch_size):
  """E[the padded size] of one Poisson batch: sum_s P(s) * (bucket of s)."""
  q = expected_batch_size / dataset_size
  sizes = np.arange(0, buckets[-1] + 1)
  pmf = stats.binom.pmf(sizes, dataset_size, q)
  padded = np.array([next(b for b in buckets if b >= max(s, 1)) for s in sizes])
  return float(np.sum(pmf * padded) / np.sum(pmf))


def test_padding_buckets_minimise_the_expected_padded_size():
  """The dynamic programme against brute force over every choice of at most
  3 buckets among the multiples of 4 up to the maximum (which is always one)."""
  import itertools  # pylint: disable=import-outside-toplevel
  n, b, top, m = 200, 30, 60, 4
  candidates = [c for c in range(m, top, m)]
  best = min((_expected_padded(tuple(sorted(chosen)) + (top,), n, b), chosen)
             for r in range(0, 3) for chosen in itertools.combinations(candidates, r))
  buckets = optax_dp.poisson_padding_buckets(n, b, top, num_buckets=3, multiple_of=m)
  assert len(buckets) <= 3 and buckets[-1] == top
  assert all(x % m == 0 for x in buckets[:-1])
  assert _expected_padded(buckets, n, b) == pytest.approx(best[0], rel=1e-9)


def test_default_poisson_batches_have_at_most_four_shapes_and_little_padding():
  sampler = optax_dp.PoissonSampler(60000, 256)
  steps = 400
  top = sampler.logical_batch_size(steps)
  buckets = sampler.padding_sizes(steps)
  assert len(buckets) <= 4 and buckets[-1] == top
  shapes = set()
  for batch in sampler.batches(0, steps=steps):
    padded = batch.indices.shape[0]
    shapes.add(padded)
    assert padded == min(x for x in buckets if x >= max(batch.size, 1))
    np.testing.assert_array_equal(batch.mask, np.arange(padded) < batch.size)
    assert np.all(batch.indices[batch.size:] == -1)
  assert shapes <= set(buckets)
  # Padding to the maximum alone computes on top = 256 + 8.75 standard
  # deviations (16) rows per step; the buckets on at most ~1.07x the mean.
  assert _expected_padded(buckets, 60000, 256) <= 1.07 * 256 < top


@pytest.mark.parametrize("k", [1, 3])
def test_padding_buckets_keep_the_batches_and_the_accounting(k):
  """Bucketed or padded to the maximum: the same examples at every step (so
  the same mechanism, and the same epsilon), only fewer padding rows."""
  bucketed = optax_dp.PoissonSampler(2000, 40)
  flat = optax_dp.PoissonSampler(2000, 40, padding_buckets=None)
  a = list(bucketed.batches(5, steps=60, accumulation_steps=k))
  b = list(flat.batches(5, steps=60, accumulation_steps=k))
  assert len(a) == len(b) == 60 * k
  for t in range(60):
    real_a = np.concatenate([c.indices[c.mask] for c in a[t * k:(t + 1) * k]])
    real_b = np.concatenate([c.indices[c.mask] for c in b[t * k:(t + 1) * k]])
    np.testing.assert_array_equal(real_a, real_b)
    assert len({c.indices.shape for c in a[t * k:(t + 1) * k]}) == 1  # static in a step
  assert len({c.indices.shape for c in a}) <= 4
  assert {c.indices.shape for c in b} == {(math.ceil(flat.logical_batch_size(60) / k),)}
  assert bucketed.dp_event(1.0, 60) == flat.dp_event(1.0, 60)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "4"])
def test_padding_buckets_must_be_a_positive_int(bad):
  with pytest.raises(ValueError, match="padding_buckets"):
    optax_dp.PoissonSampler(100, 10, padding_buckets=bad)
