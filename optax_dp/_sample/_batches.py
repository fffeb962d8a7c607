"""Batches of example indices: the fixed-shape, masked format every sampler
yields, the random draws that fill them, and gathering the rows they name.

What a sampler *is* as a mechanism (its parameters, accounting event and
neighbouring relation) lives in `optax_dp._sample._sampling`; this module holds how
its batches are drawn and laid out. A batch's shape never depends on the
data: the realised size of a Poisson batch is hidden behind padding rows
(index -1, mask False) up to a static maximum. Batch t of a run is a function
of (seed, t) alone (numpy's PCG64: reproducible, not cryptographically
secure), so a resumed run draws the batches the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Iterator, NamedTuple, Optional

import jax
import numpy as np
from scipy import stats

from optax_dp._core import _checks

# Default bound on the probability that any batch of a run overflows the static
# maximum batch size (the sampler then raises instead of dropping examples).
DEFAULT_OVERFLOW_PROBABILITY = 1e-12


def poisson_max_batch_size(
    dataset_size: int,
    expected_batch_size: int,
    steps: int,
    overflow_probability: float = DEFAULT_OVERFLOW_PROBABILITY,
) -> int:
  """The smallest static batch size that `steps` Poisson batches overflow with
  probability at most `overflow_probability`.

  A Poisson batch has a Binomial(`dataset_size`, q) size, `q =
  expected_batch_size / dataset_size`; a static shape needs a maximum. This is
  the smallest `m` with `steps * P(Binomial(N, q) > m) <= overflow_probability`
  (a union bound over the steps, by bisection on the exact binomial tail).

  Privacy contract: the maximum depends only on public constants. A batch
  above it is never silently cut: `PoissonSampler` raises (or, with
  `truncate=True`, truncates and accounts for it), because dropping examples
  is a different mechanism from the one the Poisson accounting analyses.

  Args:
    dataset_size: N, >= 1.
    expected_batch_size: q * N, in [1, N].
    steps: the number of batches in the run, >= 1.
    overflow_probability: the bound on the probability that any batch of the
      run overflows, in (0, 1).

  Returns:
    The static batch size, >= `expected_batch_size`.

  Raises:
    ValueError: for out-of-range arguments.

  Examples:
    >>> import optax_dp
    >>> optax_dp.poisson_max_batch_size(60000, 256, steps=5000)
    396
    >>> optax_dp.poisson_max_batch_size(100, 100, steps=1)  # q = 1: no slack
    100
  """
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
  _, hi = _checks.bisect_boundary(overflows, lo, hi)
  return max(hi, expected_batch_size)


class Batch(NamedTuple):
  """One batch of example indices, padded to a static size.

  Privacy contract: feed `mask` to the gradient function (`clipped_grads`,
  `per_example_grads`) so that padding rows contribute nothing, and normalise
  by the sampler's public `expected_batch_size` (what `dp_aggregate` does),
  never by `size`: the realised size of a Poisson batch is data-independent
  but not public, and publishing it (or dividing by it) is not covered by the
  accounting.

  Attributes:
    indices: int64 `(batch_shape,)`, the sampled example indices first, then
      `-1` for padding.
    mask: bool `(batch_shape,)`, True for real examples, False for padding.

  Examples:
    >>> import numpy as np
    >>> import optax_dp
    >>> batch = optax_dp.Batch(indices=np.array([4, 7, -1]),
    ...                        mask=np.array([True, True, False]))
    >>> batch.size
    2
  """
  indices: np.ndarray
  mask: np.ndarray

  @property
  def size(self) -> int:
    """The realised number of examples (data-independent, but not public)."""
    return int(self.mask.sum())


PoissonBatch = Batch
"""Another name for `Batch`: the name used before the other samplers existed."""


def step_rng(seed: int, *counters: int) -> np.random.Generator:
  """An independent PCG64 stream per (seed, counters): batch t of a run is a
  function of (seed, t) alone, so a resumed run draws the batches the
  uninterrupted run would have drawn."""
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *counters])))


def poisson_padding_buckets(dataset_size: int, expected_batch_size: int,
                            max_batch_size: int, num_buckets: int = 4,
                            multiple_of: int = 8) -> tuple[int, ...]:
  """The static sizes Poisson batches are padded to: at most `num_buckets`
  of them, the largest `max_batch_size`, chosen to minimise the expected
  padded size (the compute spent per step) for Binomial(N, q) batch sizes.

  Each batch is padded to the smallest bucket that holds it, so a run
  compiles its step at most `num_buckets` times (padding to
  `max_batch_size` alone wastes about 7 standard deviations of rows per step;
  rounding up to multiples gives a shape per multiple). The buckets are
  multiples of `multiple_of` (except `max_batch_size` itself), found by
  dynamic programming over the exact binomial distribution.

  Privacy contract: none involved. The buckets are a function of public
  constants, and which bucket a batch lands in is a function of its size,
  drawn by the sampler independently of the data (the padding rows are
  masked out; the accounting is that of the sampler, unchanged).

  Examples:
    >>> import optax_dp
    >>> optax_dp.poisson_padding_buckets(60000, 256, max_batch_size=396)
    (256, 272, 296, 396)
  """
  dataset_size = _checks.check_int("dataset_size", dataset_size, 1)
  expected_batch_size = _checks.check_int("expected_batch_size", expected_batch_size, 1)
  max_batch_size = _checks.check_int("max_batch_size", max_batch_size, 1)
  num_buckets = _checks.check_int("num_buckets", num_buckets, 1)
  multiple_of = _checks.check_int("multiple_of", multiple_of, 1)
  q = min(1.0, expected_batch_size / dataset_size)
  # Candidate sizes: multiples of `multiple_of` where the size distribution
  # has mass (below the 1e-15 quantile nothing is lost by not stopping), and
  # the maximum. At most ~2000 of them (coarser steps for huge batches).
  low = int(stats.binom.ppf(1e-15, dataset_size, q))
  start = max(round_up(max(low, 1), multiple_of), multiple_of)
  step = multiple_of * max(1, math.ceil((max_batch_size - start) / multiple_of / 2000))
  candidates = np.array(sorted({*range(start, max_batch_size, step), max_batch_size}),
                        dtype=np.float64)
  # mass[j]: P(size in (candidates[j-1], candidates[j]]), sizes 0..max.
  cdf = stats.binom.cdf(candidates, dataset_size, q)
  cdf[-1] = 1.0   # sizes above the maximum are the sampler's (raise/truncate)
  cum = cdf  # cumulative mass up to each candidate
  n = len(candidates)
  # cost[k][j]: least expected padded size of sizes <= candidates[j] with k+1
  # buckets, the last at candidates[j]; back[k][j]: the previous bucket.
  cost = candidates * cum
  back = []
  for _ in range(1, num_buckets):
    # cost'(j) = min_i<j cost(i) + candidates[j] * (cum[j] - cum[i])
    total = cost[None, :] + candidates[:, None] * (cum[:, None] - cum[None, :])
    total[np.triu_indices(n)] = np.inf   # i must be < j
    best = np.argmin(total, axis=1)
    new = total[np.arange(n), best]
    new[0] = cost[0]
    use = new < cost
    back.append(np.where(use, best, -1))
    cost = np.where(use, new, cost)
  buckets, j = [n - 1], n - 1
  for prev in reversed(back):
    if prev[j] >= 0:
      j = int(prev[j])
      buckets.append(j)
  return tuple(int(candidates[i]) for i in sorted(set(buckets)))


def round_up(x: int, multiple: Optional[int]) -> int:
  """`x` rounded up to a positive multiple of `multiple` (None: `x` itself)."""
  return x if multiple is None else max(1, math.ceil(x / multiple)) * multiple


def split_logical(chosen: np.ndarray, physical: int, accumulation_steps: int
                  ) -> Iterator[Batch]:
  """Yields the logical batch `chosen` as `accumulation_steps` padded chunks
  of `physical` rows each (indices sorted, padding last)."""
  total = physical * accumulation_steps
  indices = np.full((total,), -1, dtype=np.int64)
  indices[:len(chosen)] = np.sort(chosen)
  mask = np.zeros((total,), dtype=bool)
  mask[:len(chosen)] = True
  for j in range(accumulation_steps):
    part = slice(j * physical, (j + 1) * physical)
    yield Batch(indices=indices[part].copy(), mask=mask[part].copy())


def check_run(seed: Any, steps: Any, start_step: Any, accumulation_steps: Any
              ) -> tuple[int, range, int]:
  """`(seed, range(start_step, steps), accumulation_steps)`, validated."""
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
  steps = _checks.check_int("steps", steps, 1)
  start_step = _checks.check_int("start_step", start_step, 0)
  accumulation_steps = _checks.check_int("accumulation_steps", accumulation_steps, 1)
  if start_step > steps:
    raise ValueError(f"start_step ({start_step}) must be <= steps ({steps}).")
  return int(seed), range(start_step, steps), accumulation_steps


def check_sizes(dataset_size: Any, batch_size: Any, batch_name: str) -> tuple[int, int]:
  """Validated `(dataset_size, batch_size)`, the batch at most the dataset."""
  dataset_size = _checks.check_int("dataset_size", dataset_size, 1)
  batch_size = _checks.check_int(batch_name, batch_size, 1)
  if batch_size > dataset_size:
    raise ValueError(
        f"{batch_name} ({batch_size}) must be <= dataset_size ({dataset_size}).")
  return dataset_size, batch_size


def poisson_draws(seed: int, steps: range, accumulation_steps: int, *,
                  dataset_size: int, sampling_probability: float, max_size: int,
                  truncate: bool, pad_to_multiple_of: Optional[int],
                  buckets: Optional[tuple] = None,
                  groups: Optional[list] = None) -> Iterator[Batch]:
  """`PoissonSampler`'s batches (validated arguments): a Binomial(N, q) size,
  then a uniform subset of that size (exactly Poisson sampling), truncated to
  `max_size` or refused above it; padded to the smallest of `buckets` that
  holds it, else to a multiple of `pad_to_multiple_of`, else to `max_size`.
  With `groups` (cyclic Poisson), step t draws from `groups[t % len(groups)]`."""
  for step in steps:
    chosen, physical = poisson_step(
        step_rng(seed, step), step, accumulation_steps, dataset_size=dataset_size,
        sampling_probability=sampling_probability, max_size=max_size, truncate=truncate,
        pad_to_multiple_of=pad_to_multiple_of, buckets=buckets,
        eligible=None if groups is None else groups[step % len(groups)])
    yield from split_logical(chosen, physical, accumulation_steps)


def poisson_step(rng: np.random.Generator, step: int, accumulation_steps: int, *,
                 dataset_size: int, sampling_probability: float, max_size: int,
                 truncate: bool, pad_to_multiple_of: Optional[int],
                 buckets: Optional[tuple], eligible: Optional[np.ndarray] = None
                 ) -> tuple[np.ndarray, int]:
  """One step of `poisson_draws` from `rng`: `(chosen, physical batch size)`."""
  population = dataset_size if eligible is None else len(eligible)
  size = int(rng.binomial(population, sampling_probability))
  if size > max_size:
    if not truncate:
      raise RuntimeError(
          f"Poisson sampler: step {step} sampled {size} examples, more than "
          f"max_batch_size={max_size}. Dropping examples would break the "
          "privacy accounting, so the run stops here (this depends only on "
          "the sampler's seed, not on the data). Raise max_batch_size, leave "
          "it at its default (which makes this astronomically unlikely), or "
          "use truncate=True, which is accounted for.")
    size = max_size  # truncation: a uniform subset of the Poisson sample
  chosen = rng.choice(population, size=size, replace=False)
  if eligible is not None:
    chosen = eligible[chosen]
  if buckets:
    padded = next(b for b in buckets if b >= max(size, 1))
  else:
    padded = round_up(max(size, 1), pad_to_multiple_of)
    padded = min(max_size, padded) if pad_to_multiple_of else max_size
  return chosen, round_up(math.ceil(padded / accumulation_steps),
                          pad_to_multiple_of if accumulation_steps > 1 else None)


def fixed_draws(seed: int, steps: range, accumulation_steps: int, *,
                dataset_size: int, batch_size: int) -> Iterator[Batch]:
  """`FixedBatchSampler`'s batches: `batch_size` distinct examples per step."""
  physical = math.ceil(batch_size / accumulation_steps)
  for step in steps:
    chosen = step_rng(seed, step).choice(dataset_size, size=batch_size, replace=False)
    yield from split_logical(chosen, physical, accumulation_steps)


def shuffle_draws(seed: int, steps: range, accumulation_steps: int, *,
                  dataset_size: int, batch_size: int) -> Iterator[Batch]:
  """`ShuffleSampler`'s batches: epoch e cuts the permutation drawn from
  (seed, e) into `dataset_size // batch_size` consecutive batches."""
  spe, b = dataset_size // batch_size, batch_size
  perm, perm_epoch = None, -1
  for step in steps:
    epoch, position = divmod(step, spe)
    if epoch != perm_epoch:
      perm, perm_epoch = step_rng(seed, epoch).permutation(dataset_size), epoch
    yield from split_logical(perm[position * b:(position + 1) * b],
                             math.ceil(b / accumulation_steps), accumulation_steps)


@dataclasses.dataclass(frozen=True)
class MaskedBatch:
  """Rows of a sampled batch together with the mask that says which are real.

  What `gather_batch` returns, and what every gradient function takes in
  place of a bare batch: `grad_fn(params, masked_batch)` uses
  `masked_batch.mask` itself, so the common path needs no `mask=` at all. A
  jax pytree (pass it through `jax.jit`); not a tuple, so the old
  `x, y = gather_batch((x_all, y_all), batch)` raises instead of silently
  dropping the mask.

  Privacy contract: the padding rows' *number* depends on the realised
  Poisson batch size, so a gradient function that counted them (a forgotten
  mask) would move the clipped sum by up to 2C when one example is removed,
  while the noise is calibrated for C. Keep `data` and `mask` together; take
  `data` apart only for code that never reaches a gradient (evaluation of
  the non-private loss is not private either).

  Attributes:
    data: the rows (a pytree like the gathered data), padding rows zero.
    mask: bool `(batch_shape,)`, True for real examples.
  """
  data: Any
  mask: Any

  def __iter__(self):
    raise TypeError(
        "optax_dp.MaskedBatch is not a tuple: gather_batch returns the rows "
        "together with their mask, so that no gradient function sees padding "
        "rows as examples. Pass it whole, grad_fn(params, batch) (no mask= "
        "needed), or take its parts by name: batch.data (the rows, e.g. "
        "images, labels = batch.data) and batch.mask.")


jax.tree_util.register_dataclass(MaskedBatch, data_fields=["data", "mask"],
                                 meta_fields=[])


def gather_rows(data: Any, batch: Batch) -> Any:
  """Rows `batch.indices` of every array in the pytree `data` (numpy), padding
  rows (index -1) zero: the `data` of `gather_batch`'s `MaskedBatch`."""
  safe = np.where(batch.mask, batch.indices, 0)

  def take(x):
    x = np.asarray(x)
    rows = x[safe]
    rows[~batch.mask] = 0
    return rows

  return jax.tree.map(take, data)


def gather_batch(data: Any, batch: Batch) -> MaskedBatch:
  """Rows `batch.indices` of every array in the pytree `data`, with the mask:
  a `MaskedBatch` that the gradient functions take whole.

  Padding rows (index -1) are zeros, so nothing can duplicate a real example;
  the mask travels with the rows, so a gradient function cannot count them:
  `grad_fn(params, gather_batch(data, batch))`.

  Privacy contract: every leaf of `data` must hold one row per example, in the
  same order, for the indices the sampler drew (the examples the accounting
  is about). Zero padding rows are not a substitute for the mask: a zero
  input can still have a non-zero gradient, and the number of padding rows
  depends on the realised batch size.

  Args:
    data: a pytree of arrays with a leading example axis (numpy or jax; read
      on the host).
    batch: a `Batch` from a sampler.

  Returns:
    `MaskedBatch(data=rows, mask=batch.mask)`: `rows` a pytree like `data` of
    numpy arrays with `len(batch.indices)` rows.

  Examples:
    >>> import numpy as np
    >>> import optax_dp
    >>> data = {"x": np.arange(10.0).reshape(5, 2), "y": np.arange(5)}
    >>> batch = optax_dp.Batch(indices=np.array([3, 1, -1]),
    ...                        mask=np.array([True, True, False]))
    >>> rows = optax_dp.gather_batch(data, batch)
    >>> rows.data["x"].tolist(), rows.data["y"].tolist(), rows.mask.tolist()
    ([[6.0, 7.0], [2.0, 3.0], [0.0, 0.0]], [3, 1, 0], [True, True, False])
  """
  return MaskedBatch(data=gather_rows(data, batch), mask=np.asarray(batch.mask, bool))
