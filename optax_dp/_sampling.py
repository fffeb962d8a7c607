"""Samplers: which examples each DP-SGD step sees, and how that is accounted.

One object decides both. `PoissonSampler` (the default; what DP-SGD's
amplification analysis assumes), `FixedBatchSampler` (fixed-size batches drawn
independently each step) and `ShuffleSampler` (epoch shuffling, accounted
without amplification) each yield fixed-shape, masked batches of indices and
give the `dp_accounting.DpEvent` of a run that used them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar, Iterator, NamedTuple, Optional, Union

import dp_accounting

import numpy as np
from scipy import stats

from optax_dp import _checks

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


class Batch(NamedTuple):
  """One batch of example indices, padded to a static size.

  Attributes:
    indices: int64 `(batch_shape,)`, the sampled example indices first, then
      `-1` for padding.
    mask: bool `(batch_shape,)`, True for real examples, False for padding.
  """
  indices: np.ndarray
  mask: np.ndarray

  @property
  def size(self) -> int:
    """The realised number of examples (data-independent, but not public)."""
    return int(self.mask.sum())


PoissonBatch = Batch  # The name used before the other samplers existed.

# dp-accounting's neighbouring relations, by the names our statements use.
ADD_OR_REMOVE_ONE = "add or remove one example"
REPLACE_ONE = "replace one example by another"
ZERO_OUT = ("zero out one example (replace it by one whose gradient is zero, "
            "Kairouz et al. 2021)")


def _check_seed(seed: Any) -> int:
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
  return int(seed)


def _rng(seed: int, *counters: int) -> np.random.Generator:
  """An independent PCG64 stream per (seed, counters): batch t of a run is a
  function of (seed, t) alone, so a resumed run draws the batches the
  uninterrupted run would have drawn."""
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *counters])))


def _round_up(x: int, multiple: Optional[int]) -> int:
  return x if multiple is None else max(1, math.ceil(x / multiple)) * multiple


def _split(chosen: np.ndarray, physical: int, accumulation_steps: int
           ) -> Iterator[Batch]:
  """Yields the logical batch `chosen` as `accumulation_steps` padded chunks."""
  total = physical * accumulation_steps
  indices = np.full((total,), -1, dtype=np.int64)
  indices[:len(chosen)] = np.sort(chosen)
  mask = np.zeros((total,), dtype=bool)
  mask[:len(chosen)] = True
  for j in range(accumulation_steps):
    part = slice(j * physical, (j + 1) * physical)
    yield Batch(indices=indices[part].copy(), mask=mask[part].copy())


def _check_run(steps: Any, start_step: Any, accumulation_steps: Any) -> tuple[int, int, int]:
  steps = _checks.check_int("steps", steps, 1)
  start_step = _checks.check_int("start_step", start_step, 0)
  accumulation_steps = _checks.check_int("accumulation_steps", accumulation_steps, 1)
  if start_step > steps:
    raise ValueError(f"start_step ({start_step}) must be <= steps ({steps}).")
  return steps, start_step, accumulation_steps


def _check_sizes(dataset_size: Any, batch_size: Any, batch_name: str) -> tuple[int, int]:
  dataset_size = _checks.check_int("dataset_size", dataset_size, 1)
  batch_size = _checks.check_int(batch_name, batch_size, 1)
  if batch_size > dataset_size:
    raise ValueError(
        f"{batch_name} ({batch_size}) must be <= dataset_size ({dataset_size}).")
  return dataset_size, batch_size


@dataclasses.dataclass(frozen=True)
class PoissonSampler:
  """Poisson sampling: each step includes every example independently with
  probability `q = expected_batch_size / dataset_size`. The default sampler,
  and the one DP-SGD's amplification-by-sampling analysis is about (Abadi et
  al. 2016; Mironov, Talwar & Zhang 2019; Zhu, Dong & Wang 2022).

  It decides both the batches (`batches`) and their accounting (`dp_event`):
  `steps` self-compositions of the Poisson-subsampled Gaussian mechanism under
  add/remove-one adjacency, normalised by the public `expected_batch_size`.

  Batches have a static maximum size `max_batch_size` (default: the smallest
  size that any of the run's batches exceeds with probability <= 1e-12, by a
  union bound). What happens above it is part of the mechanism:

  * `truncate=False` (default): the sampler raises `RuntimeError` and the run
    stops. Nothing is dropped, so the Poisson accounting holds for every batch
    that was released. The event depends on the sampler's seed only.
  * `truncate=True` (needs an explicit `max_batch_size`): a batch that
    overflows keeps a uniformly random `max_batch_size` of its examples. This
    is accounted for exactly as truncated Poisson sampling
    (`dp_accounting.TruncatedSubsampledGaussianDpEvent`, arXiv 2508.15089),
    which only the PLD accountant supports, under zero-out adjacency (the
    dataset size is public).

  Attributes:
    dataset_size: N.
    expected_batch_size: q * N, the public normaliser of `dp_aggregate`.
    max_batch_size: the static (logical) batch size; see above.
    truncate: see above.
    pad_to_multiple_of: pad each batch to its realised size rounded up to a
      multiple of this (capped at `max_batch_size`) instead of to
      `max_batch_size`: less padding work, one compilation per shape.
  """
  dataset_size: int
  expected_batch_size: int
  max_batch_size: Optional[int] = None
  truncate: bool = False
  pad_to_multiple_of: Optional[int] = None

  name: ClassVar[str] = "poisson"

  def __post_init__(self):
    n, b = _check_sizes(self.dataset_size, self.expected_batch_size, "expected_batch_size")
    object.__setattr__(self, "dataset_size", n)
    object.__setattr__(self, "expected_batch_size", b)
    if self.max_batch_size is not None:
      object.__setattr__(self, "max_batch_size",
                         _checks.check_int("max_batch_size", self.max_batch_size, 1))
    if self.pad_to_multiple_of is not None:
      object.__setattr__(self, "pad_to_multiple_of",
                         _checks.check_int("pad_to_multiple_of", self.pad_to_multiple_of, 1))
    if not isinstance(self.truncate, bool):
      raise ValueError(f"truncate must be a bool, got {self.truncate!r}.")
    if self.truncate and self.max_batch_size is None:
      raise ValueError(
          "PoissonSampler(truncate=True) needs an explicit max_batch_size: the "
          "truncation size is part of the mechanism the accountant analyses.")

  @property
  def sampling_probability(self) -> float:
    return self.expected_batch_size / self.dataset_size

  @property
  def neighboring_relation(self) -> str:
    """Add/remove one; zero-out when truncating: the truncated event's
    analysis fixes the dataset size (a zeroed example still takes its place
    in the truncation), as jax_privacy also labels it."""
    return ZERO_OUT if self.truncate else ADD_OR_REMOVE_ONE

  @property
  def accountants(self) -> tuple[str, ...]:
    return ("pld",) if self.truncate else ("pld", "rdp")

  def unsupported_accountant_reason(self, accountant: str) -> str:
    return ("dp-accounting's RDP accountant cannot account for truncated Poisson "
            "sampling (truncate=True); use accountant='pld', or truncate=False.")

  def logical_batch_size(self, steps: int) -> int:
    """The static size of a logical batch in a run of `steps` steps."""
    if self.max_batch_size is not None:
      return self.max_batch_size
    return poisson_max_batch_size(self.dataset_size, self.expected_batch_size, steps)

  def dp_event(self, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    """`steps` compositions of the (truncated) Poisson-subsampled Gaussian."""
    if self.truncate:
      event = dp_accounting.TruncatedSubsampledGaussianDpEvent(
          dataset_size=self.dataset_size,
          sampling_probability=self.sampling_probability,
          truncated_batch_size=self.max_batch_size,
          noise_multiplier=noise_multiplier)
    else:
      event = dp_accounting.PoissonSampledDpEvent(
          self.sampling_probability, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(event, steps)

  def describe(self) -> str:
    """The sampler in plain words, for privacy statements."""
    text = (f"Poisson sampling: at every step each of the {self.dataset_size} "
            "examples is included independently with probability "
            f"q = {self.expected_batch_size}/{self.dataset_size} = "
            f"{self.sampling_probability:.6g} (expected batch size "
            f"{self.expected_batch_size})")
    if self.truncate:
      text += (f", truncated to a uniformly random {self.max_batch_size} "
               "examples when more are drawn")
    return text

  def batches(self, seed: int, *, steps: int, start_step: int = 0,
              accumulation_steps: int = 1) -> Iterator[Batch]:
    """Yields the run's batches from step `start_step` to `steps` (exclusive).

    Batch t depends only on `(seed, t)`, so a run resumed at `start_step`
    sees the batches the uninterrupted run would have. With
    `accumulation_steps=k`, each logical (Poisson) batch is yielded as k
    physical batches of static size `ceil(logical / k)`: feed them to
    `optax_dp.dp_accumulate`, which adds noise once per logical batch.

    Raises:
      ValueError: for bad arguments, when called.
      RuntimeError: (when iterated) a batch overflowed `max_batch_size` and
        `truncate` is False.
    """
    seed = _check_seed(seed)
    steps, start_step, k = _check_run(steps, start_step, accumulation_steps)
    return self._batches(seed, steps, start_step, k, self.logical_batch_size(steps))

  def _batches(self, seed, steps, start_step, k, max_size):
    n, q = self.dataset_size, self.sampling_probability
    for step in range(start_step, steps):
      rng = _rng(seed, step)
      size = int(rng.binomial(n, q))
      if size > max_size:
        if not self.truncate:
          raise RuntimeError(
              f"Poisson sampler: step {step} sampled {size} examples, more than "
              f"max_batch_size={max_size}. Dropping examples would break the "
              "privacy accounting, so the run stops here (this depends only on "
              "the sampler's seed, not on the data). Raise max_batch_size, leave "
              "it at its default (which makes this astronomically unlikely), or "
              "use truncate=True, which is accounted for.")
        size = max_size  # truncation: a uniform subset of the Poisson sample
      chosen = rng.choice(n, size=size, replace=False)
      padded = _round_up(max(size, 1), self.pad_to_multiple_of)
      padded = min(max_size, padded) if self.pad_to_multiple_of else max_size
      physical = _round_up(math.ceil(padded / k), self.pad_to_multiple_of if k > 1 else None)
      yield from _split(chosen, physical, k)


@dataclasses.dataclass(frozen=True)
class FixedBatchSampler:
  """Fixed-size batches, drawn independently at every step: `batch_size`
  distinct examples chosen uniformly without replacement from the dataset.

  Accounted for by Renyi DP for sampling without replacement (Wang, Balle &
  Kasiviswanathan 2019, Theorem 27), which dp-accounting supports only under
  *replace-one* adjacency and only with the RDP accountant. Replacing one
  example moves the clipped sum by up to `2 * l2_norm_clip`, so the Gaussian
  mechanism is accounted with noise multiplier `noise_multiplier / 2`: fixed
  batches cost noticeably more epsilon than Poisson batches of the same size,
  and the statement is about a different neighbouring relation.

  Batches are full (no padding) unless split for accumulation.
  """
  dataset_size: int
  batch_size: int

  name: ClassVar[str] = "fixed"
  neighboring_relation: ClassVar[str] = REPLACE_ONE
  accountants: ClassVar[tuple[str, ...]] = ("rdp",)

  def __post_init__(self):
    n, b = _check_sizes(self.dataset_size, self.batch_size, "batch_size")
    object.__setattr__(self, "dataset_size", n)
    object.__setattr__(self, "batch_size", b)

  @property
  def expected_batch_size(self) -> int:
    return self.batch_size

  def unsupported_accountant_reason(self, accountant: str) -> str:
    return ("dp-accounting's PLD accountant has no event for sampling without "
            "replacement; fixed-size batches are accounted with accountant='rdp'.")

  def logical_batch_size(self, steps: int) -> int:
    del steps
    return self.batch_size

  def dp_event(self, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(
            self.dataset_size, self.batch_size,
            dp_accounting.GaussianDpEvent(noise_multiplier / 2)),
        steps)

  def describe(self) -> str:
    return (f"fixed-size batches: at every step {self.batch_size} of the "
            f"{self.dataset_size} examples are drawn uniformly without "
            "replacement, independently of the other steps")

  def batches(self, seed: int, *, steps: int, start_step: int = 0,
              accumulation_steps: int = 1) -> Iterator[Batch]:
    """As `PoissonSampler.batches`, with batches of exactly `batch_size`."""
    seed = _check_seed(seed)
    steps, start_step, k = _check_run(steps, start_step, accumulation_steps)
    return self._batches(seed, steps, start_step, k)

  def _batches(self, seed, steps, start_step, k):
    for step in range(start_step, steps):
      chosen = _rng(seed, step).choice(self.dataset_size, size=self.batch_size,
                                       replace=False)
      yield from _split(chosen, math.ceil(self.batch_size / k), k)


@dataclasses.dataclass(frozen=True)
class ShuffleSampler:
  """Epoch shuffling: each epoch a fresh random permutation of the dataset is
  cut into `dataset_size // batch_size` batches of `batch_size` (the
  remainder is left out of that epoch). What most data loaders do.

  No privacy amplification is known for shuffling that one could honestly
  claim: Chua et al. 2024 ("How Private are DP-SGD Implementations?", ICML
  2024, arXiv 2403.17673) show shuffled batches can be far less private than
  the Poisson analysis commonly reported for them. So it is accounted as what
  it certainly is: each example is in at most one batch per epoch, so an epoch
  is one Gaussian mechanism of sensitivity `l2_norm_clip` under zero-out
  adjacency (one example replaced by one with zero gradient), and a run of
  `steps` steps composes `ceil(steps / steps_per_epoch)` of them (a partial
  epoch counts as a whole one). This costs far more epsilon than Poisson
  sampling at the same noise.
  """
  dataset_size: int
  batch_size: int

  name: ClassVar[str] = "shuffle"
  neighboring_relation: ClassVar[str] = ZERO_OUT
  accountants: ClassVar[tuple[str, ...]] = ("pld", "rdp")

  def __post_init__(self):
    n, b = _check_sizes(self.dataset_size, self.batch_size, "batch_size")
    object.__setattr__(self, "dataset_size", n)
    object.__setattr__(self, "batch_size", b)

  @property
  def expected_batch_size(self) -> int:
    return self.batch_size

  @property
  def steps_per_epoch(self) -> int:
    return self.dataset_size // self.batch_size

  def unsupported_accountant_reason(self, accountant: str) -> str:
    return ""

  def epochs(self, steps: int) -> int:
    """Epochs (started) in a run of `steps` steps."""
    return math.ceil(steps / self.steps_per_epoch)

  def logical_batch_size(self, steps: int) -> int:
    del steps
    return self.batch_size

  def dp_event(self, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(noise_multiplier), self.epochs(steps))

  def describe(self) -> str:
    return (f"epoch shuffling: each epoch a random permutation of the "
            f"{self.dataset_size} examples is cut into {self.steps_per_epoch} "
            f"batches of {self.batch_size} (each example in at most one batch "
            "per epoch; no amplification by shuffling is claimed)")

  def batches(self, seed: int, *, steps: int, start_step: int = 0,
              accumulation_steps: int = 1) -> Iterator[Batch]:
    """As `PoissonSampler.batches`; epoch e's permutation depends on (seed, e)."""
    seed = _check_seed(seed)
    steps, start_step, k = _check_run(steps, start_step, accumulation_steps)
    return self._batches(seed, steps, start_step, k)

  def _batches(self, seed, steps, start_step, k):
    spe, b = self.steps_per_epoch, self.batch_size
    perm, perm_epoch = None, -1
    for step in range(start_step, steps):
      epoch, position = divmod(step, spe)
      if epoch != perm_epoch:
        perm, perm_epoch = _rng(seed, epoch).permutation(self.dataset_size), epoch
      yield from _split(perm[position * b:(position + 1) * b], math.ceil(b / k), k)


Sampler = Union[PoissonSampler, FixedBatchSampler, ShuffleSampler]
SAMPLERS = {"poisson": PoissonSampler, "fixed": FixedBatchSampler,
            "shuffle": ShuffleSampler}


def make_sampler(name: str, *, dataset_size: int, batch_size: int, **kwargs) -> Sampler:
  """The sampler called `name` ("poisson", "fixed" or "shuffle"); `batch_size`
  is the expected batch size for Poisson, the exact one for the others."""
  if name == "poisson":
    return PoissonSampler(dataset_size, batch_size, **kwargs)
  if name in SAMPLERS:
    return SAMPLERS[name](dataset_size, batch_size, **kwargs)
  raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {name!r}.")


def poisson_batches(
    seed: int,
    *,
    dataset_size: int,
    expected_batch_size: int,
    steps: int,
    max_batch_size: Optional[int] = None,
    pad_to_multiple_of: Optional[int] = None,
) -> Iterator[Batch]:
  """Yields `steps` Poisson-sampled batches of example indices, with masks.

  Shorthand for `PoissonSampler(dataset_size, expected_batch_size,
  max_batch_size, pad_to_multiple_of=...).batches(seed, steps=steps)`; see
  `PoissonSampler`. Each step, every example in `range(dataset_size)` is
  included independently with probability `q = expected_batch_size /
  dataset_size` (a Binomial(N, q) count, then a uniform subset of that size:
  exactly the same distribution). Pair it with `dp_aggregate(...,
  expected_batch_size=expected_batch_size)`, which normalises by that public
  constant, never by the realised size.

  Batches are padded with index -1 and mask False to `max_batch_size` (default
  `poisson_max_batch_size(...)`: overflow probability <= 1e-12 over the run),
  or with `pad_to_multiple_of=k` to the realised size rounded up to a multiple
  of k. An overflowing batch raises `RuntimeError` instead of dropping
  examples. The randomness is numpy's PCG64 seeded with `(seed, step)`:
  reproducible, not cryptographically secure.

  Raises:
    ValueError: for bad arguments, when called (not at the first batch).
  """
  sampler = PoissonSampler(dataset_size, expected_batch_size, max_batch_size,
                           pad_to_multiple_of=pad_to_multiple_of)
  return sampler.batches(seed, steps=steps)


def gather_batch(data: Any, batch: Batch) -> Any:
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
