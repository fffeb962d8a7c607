"""Tests for optax_dp._sample._batches: how every sampler's batches are laid out and
drawn -- fixed-shape index/mask batches with padding (index -1, mask False),
pad_to_multiple_of and the padding buckets, poisson_max_batch_size, resumption
(batch t is a function of (seed, t)), accumulation chunks, the run arguments'
validation, and gather_batch.

What each sampler is as a mechanism (its distribution, dp_event, validation of
its parameters) is tested in test_sampling.py.
"""

import math

import numpy as np
import pytest
from scipy import stats

import optax_dp


def _as_lists(batches):
  return [(b.indices.tolist(), b.mask.tolist()) for b in batches]


# ---------------------------------------------------------------------------
# Batch layout: real examples first, then padding to a static shape.

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


# ---------------------------------------------------------------------------
# Every sampler: resumption, accumulation chunks.

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
# Bad run arguments (seed, steps, start_step, accumulation_steps).

@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_poisson_batches_rejects_bad_seed(seed):
  with pytest.raises(ValueError, match="seed"):
    optax_dp.poisson_batches(seed, dataset_size=10, expected_batch_size=2, steps=3)


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
