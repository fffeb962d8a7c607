"""Poisson sampling with fixed-shape, masked batches: the sampler DP-SGD's
accounting assumes (each example included independently with probability q).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterator, NamedTuple, Optional

import numpy as np
from scipy import stats

from optax_dp import _checks

# Default bound on the probability that any batch of a run overflows the static
# maximum batch size (the sampler then raises instead of dropping examples).
DEFAULT_OVERFLOW_PROBABILITY = 1e-12


class PoissonBatch(NamedTuple):
  """One Poisson-sampled batch, padded to a static size.

  Attributes:
    indices: int64 `(max_batch_size,)`, the sampled example indices first,
      then `-1` for padding.
    mask: bool `(max_batch_size,)`, True for real examples, False for padding.
  """
  indices: np.ndarray
  mask: np.ndarray

  @property
  def size(self) -> int:
    """The realised number of examples (data-independent, but not public)."""
    return int(self.mask.sum())


def poisson_max_batch_size(
    dataset_size: int,
    expected_batch_size: int,
    steps: int,
    overflow_probability: float = DEFAULT_OVERFLOW_PROBABILITY,
) -> int:
  """The smallest static batch size that `steps` Poisson batches overflow with
  probability at most `overflow_probability` (union bound over the steps)."""
  dataset_size = _checks.check_int("dataset_size", dataset_size, 1)
  expected_batch_size = _checks.check_int("expected_batch_size", expected_batch_size, 1)
  steps = _checks.check_int("steps", steps, 1)
  if expected_batch_size > dataset_size:
    raise ValueError(
        f"expected_batch_size ({expected_batch_size}) must be <= dataset_size "
        f"({dataset_size}).")
  if (isinstance(overflow_probability, bool)
      or not isinstance(overflow_probability, numbers.Real)
      or not 0 < overflow_probability < 1):
    raise ValueError(
        f"overflow_probability must be in (0, 1), got {overflow_probability!r}.")
  q = expected_batch_size / dataset_size

  def overflows(m):  # union bound over the steps: steps * P(Binomial(N, q) > m)
    return stats.binom.sf(m, dataset_size, q) * steps > overflow_probability

  # Bisection on the monotone tail (scipy's isf saturates at N for tiny tails).
  lo, hi = expected_batch_size - 1, dataset_size  # overflows(lo) or lo < E; not overflows(hi)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if overflows(mid):
      lo = mid
    else:
      hi = mid
  return max(hi, expected_batch_size)


def poisson_batches(
    seed: int,
    *,
    dataset_size: int,
    expected_batch_size: int,
    steps: int,
    max_batch_size: Optional[int] = None,
    pad_to_multiple_of: Optional[int] = None,
) -> Iterator[PoissonBatch]:
  """Yields `steps` Poisson-sampled batches of example indices, with masks.

  Each step, every example in `range(dataset_size)` is included independently
  with probability `q = expected_batch_size / dataset_size` (drawn as a
  Binomial(N, q) count followed by a uniform subset of that size, which has
  exactly the same distribution). This is the sampling that
  `compute_epsilon(..., batch_size=expected_batch_size)` accounts for (Abadi et
  al. 2016; Mironov, Talwar & Zhang 2019); pair it with
  `dp_aggregate(..., expected_batch_size=expected_batch_size)`, which
  normalises by that public constant, never by the realised size.

  Batches are padded with index -1 and mask False to `max_batch_size`, or,
  with `pad_to_multiple_of=k`, to the realised size rounded up to a multiple
  of k (capped at `max_batch_size`), which bounds the padding work at the cost
  of one compilation per distinct shape. Pass the mask to
  `per_example_grads` so padding rows get zero gradients, and gather data with
  `gather_batch`, which fills padding rows with zeros.

  Overflow: `max_batch_size` defaults to `poisson_max_batch_size(...)`, chosen
  so that any of the `steps` batches exceeds it with probability <= 1e-12.
  If a batch does exceed it, the sampler raises `RuntimeError` rather than
  silently dropping examples (which the accounting would not cover). The
  event depends only on the sampler's randomness, not on the data.

  The randomness is numpy's PCG64 seeded with `seed`: reproducible, not a
  cryptographically secure generator.

  Args:
    seed: int seed of the sampler (use a different one per run).
    dataset_size: N.
    expected_batch_size: q * N; must match the accountant's batch_size.
    steps: how many batches to yield (the accountant's steps).
    max_batch_size: the static padded batch size (see above).
    pad_to_multiple_of: optional padding granularity (see above).

  Yields:
    `PoissonBatch(indices, mask)`.

  Raises:
    ValueError: for bad arguments, when called (not at the first batch).
  """
  dataset_size = _checks.check_int("dataset_size", dataset_size, 1)
  expected_batch_size = _checks.check_int("expected_batch_size", expected_batch_size, 1)
  steps = _checks.check_int("steps", steps, 1)
  if max_batch_size is None:
    max_batch_size = poisson_max_batch_size(dataset_size, expected_batch_size, steps)
  max_batch_size = _checks.check_int("max_batch_size", max_batch_size, 1)
  if pad_to_multiple_of is not None:
    pad_to_multiple_of = _checks.check_int("pad_to_multiple_of", pad_to_multiple_of, 1)
  if expected_batch_size > dataset_size:
    raise ValueError(
        f"expected_batch_size ({expected_batch_size}) must be <= dataset_size "
        f"({dataset_size}).")
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
  return _poisson_batches(seed, dataset_size, expected_batch_size / dataset_size,
                          steps, max_batch_size, pad_to_multiple_of)


def _poisson_batches(seed, dataset_size, q, steps, max_batch_size, pad_to_multiple_of):
  rng = np.random.Generator(np.random.PCG64(seed))
  for step in range(steps):
    size = int(rng.binomial(dataset_size, q))
    if size > max_batch_size:
      raise RuntimeError(
          f"poisson_batches: step {step} sampled {size} examples, more than "
          f"max_batch_size={max_batch_size}. Dropping examples would break the "
          "privacy accounting, so the run stops here (this depends only on the "
          "sampler's seed, not on the data). Raise max_batch_size or leave it "
          "at its default, which makes this astronomically unlikely.")
    chosen = rng.choice(dataset_size, size=size, replace=False)
    padded = max_batch_size
    if pad_to_multiple_of is not None:
      padded = min(max_batch_size,
                   max(1, math.ceil(size / pad_to_multiple_of)) * pad_to_multiple_of)
    indices = np.full((padded,), -1, dtype=np.int64)
    indices[:size] = np.sort(chosen)
    mask = np.zeros((padded,), dtype=bool)
    mask[:size] = True
    yield PoissonBatch(indices=indices, mask=mask)


def gather_batch(data: Any, batch: PoissonBatch) -> Any:
  """Rows `batch.indices` of every array in the pytree `data`; padding rows
  (index -1) are zeros, so a forgotten mask cannot duplicate a real example."""
  import jax  # local: keeps the sampler importable without touching devices

  safe = np.where(batch.mask, batch.indices, 0)

  def take(x):
    x = np.asarray(x)
    rows = x[safe]
    rows[~batch.mask] = 0
    return rows

  return jax.tree.map(take, data)
