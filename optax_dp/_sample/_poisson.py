"""Poisson sampling: each example in each batch independently, the sampling
DP-SGD's amplification analysis assumes (`PoissonSampler`), its cyclic
variant over `bands` groups for DP-BandMF (`CyclicPoissonSampler`), and
`poisson_batches`. The batches are padded to a few static sizes and masked
(`optax_dp._sample._batches`).

Privacy contract: as every sampler's (`optax_dp._sample._sampling`): the
epsilon is right only if each noisy step used exactly the batch yielded for
it, with a seed that is secret and independent of the data.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Iterator, Optional

import dp_accounting
import numpy as np

from optax_dp._sample import _batches
from optax_dp._core import _checks
from optax_dp._sample._batches import Batch
from optax_dp._sample._batches import poisson_max_batch_size

# Poisson batches are padded to at most this many static sizes, multiples of
# DEFAULT_BUCKET_MULTIPLE (see PoissonSampler.padding_buckets).
DEFAULT_PADDING_BUCKETS = 4
DEFAULT_BUCKET_MULTIPLE = 8

# dp-accounting's neighbouring relations, by the names our statements use.
ADD_OR_REMOVE_ONE = "add or remove one example"
REPLACE_ONE = "replace one example by another"
ZERO_OUT = ("zero out one example (replace it by one whose gradient is zero, "
            "Kairouz et al. 2021)")


@dataclasses.dataclass(frozen=True)
class PoissonSampler:
  """Poisson sampling: each step includes every example independently with
  probability `q = expected_batch_size / dataset_size`. The default sampler,
  and the one DP-SGD's amplification-by-sampling analysis is about.

  It decides both the batches (`batches`) and their accounting (`dp_event`):
  `steps` self-compositions of the Poisson-subsampled Gaussian mechanism under
  add/remove-one adjacency, normalised by the public `expected_batch_size`.

  Batches have a static maximum size `max_batch_size` (default: the smallest
  size that any of the run's batches exceeds with probability <= 1e-12, by a
  union bound). What happens above it is part of the mechanism:

  * `truncate=False` (default): the sampler raises `RuntimeError` and the run
    stops. Nothing is dropped, so the Poisson accounting holds for every batch
    released (the event depends on the sampler's seed only).
  * `truncate=True` (needs an explicit `max_batch_size`): a batch that
    overflows keeps a uniformly random `max_batch_size` of its examples. This
    is accounted for exactly as truncated Poisson sampling
    (`dp_accounting.TruncatedSubsampledGaussianDpEvent`), which only the PLD
    accountant supports, under zero-out adjacency (the dataset size is
    public).

  Privacy contract: each step's batch is this sampler's (each example in it
  independently, never reused across steps), the update is normalised by
  `expected_batch_size` (never the realised size), and `dataset_size` is the
  number of examples the batches are drawn from.

  Attributes:
    dataset_size: N.
    expected_batch_size: q * N, the public normaliser of `dp_aggregate`.
    max_batch_size: the static (logical) batch size; see above.
    truncate: see above.
    padding_buckets: pad each batch to the smallest of at most this many
      static sizes that holds it (`optax_dp.poisson_padding_buckets`: chosen
      to minimise the expected padded size, the largest `max_batch_size`), so
      the step compiles at most this many times and computes on about
      `expected_batch_size` rows, not on the maximum. None: one shape,
      `max_batch_size` (or multiples of `pad_to_multiple_of`, unbounded).
    pad_to_multiple_of: the buckets' multiple (default 8); with
      `padding_buckets=None`, pad each batch to its realised size rounded up
      to a multiple of this (capped at `max_batch_size`), one compilation per
      shape.

  References:
    Abadi et al. 2016, "Deep Learning with Differential Privacy",
    https://arxiv.org/abs/1607.00133 (DP-SGD with Poisson sampling).
    Balle, Barthe & Gaboardi 2018, "Privacy Amplification by Subsampling:
    Tight Analyses via Couplings and Divergences", arXiv 1807.01647.
    Mironov, Talwar & Zhang 2019, "Renyi Differential Privacy of the Sampled
    Gaussian Mechanism", https://arxiv.org/abs/1908.10530.
    Zhu, Dong & Wang 2022, "Optimal Accounting of Differential Privacy via
    Characteristic Function", https://arxiv.org/abs/2106.08567.
    Truncated Poisson (dp-accounting's event): arXiv 2508.15089.

  Examples:
    >>> import optax_dp
    >>> sampler = optax_dp.PoissonSampler(dataset_size=1000, expected_batch_size=10)
    >>> batches = list(sampler.batches(seed=0, steps=3))
    >>> sampler.padding_sizes(steps=3)  # the static shapes; the last: the maximum
    (8, 16, 24, 40)
    >>> [b.indices.shape for b in batches]
    [(16,), (16,), (8,)]
    >>> resumed = next(sampler.batches(seed=0, steps=3, start_step=2))
    >>> bool((resumed.indices == batches[2].indices).all())
    True
    >>> round(optax_dp.compute_epsilon(1.0, 1e-5, steps=100, sampler=sampler), 2)
    0.72
  """
  dataset_size: int
  expected_batch_size: int
  max_batch_size: Optional[int] = None
  truncate: bool = False
  pad_to_multiple_of: Optional[int] = None
  padding_buckets: Optional[int] = DEFAULT_PADDING_BUCKETS

  name: ClassVar[str] = "poisson"
  privacy_unit: ClassVar[str] = "example"

  def __post_init__(self):
    n, b = _batches.check_sizes(self.dataset_size, self.expected_batch_size,
                                "expected_batch_size")
    object.__setattr__(self, "dataset_size", n)
    object.__setattr__(self, "expected_batch_size", b)
    if self.max_batch_size is not None:
      object.__setattr__(self, "max_batch_size",
                         _checks.check_int("max_batch_size", self.max_batch_size, 1))
    if self.pad_to_multiple_of is not None:
      object.__setattr__(self, "pad_to_multiple_of",
                         _checks.check_int("pad_to_multiple_of", self.pad_to_multiple_of, 1))
    if self.padding_buckets is not None:
      object.__setattr__(self, "padding_buckets",
                         _checks.check_int("padding_buckets", self.padding_buckets, 1))
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
    """Add/remove one; zero-out when truncating: the truncated event's analysis
    fixes the dataset size (a zeroed example keeps its place), as in jax_privacy."""
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
    seed, run, k = _batches.check_run(seed, steps, start_step, accumulation_steps)
    max_size = self.logical_batch_size(run.stop)
    return _batches.poisson_draws(
        seed, run, k, dataset_size=self.dataset_size,
        sampling_probability=self.sampling_probability, max_size=max_size,
        truncate=self.truncate, pad_to_multiple_of=self.pad_to_multiple_of,
        buckets=self.padding_sizes(run.stop))

  def padding_sizes(self, steps: int) -> Optional[tuple[int, ...]]:
    """The static batch sizes of a run of `steps` steps (None: not bucketed)."""
    if self.padding_buckets is None:
      return None
    return _batches.poisson_padding_buckets(
        self.dataset_size, self.expected_batch_size, self.logical_batch_size(steps),
        self.padding_buckets, self.pad_to_multiple_of or DEFAULT_BUCKET_MULTIPLE)


# The counter of the partition's random stream (batch t uses counter t >= 0).
_PARTITION_STREAM = 2**62


@dataclasses.dataclass(frozen=True)
class CyclicPoissonSampler(PoissonSampler):
  """Cyclic Poisson sampling over `bands` groups, the sampler of DP-BandMF.

  Each example is assigned to one of `bands` groups independently and
  uniformly at random (from the seed; the assignment is a public function of
  it and never of the data), and step t Poisson-samples group `t % bands`
  only: each of its examples is included independently with probability
  `q = bands * expected_batch_size / dataset_size`. An example is thus
  eligible once every `bands` steps, the participation pattern DP-BandMF's
  noise is analysed for; marginally each example is in each batch with
  probability `expected_batch_size / dataset_size`, so the batch sizes (and
  the padding, `max_batch_size`, buckets) are those of `PoissonSampler` with
  the same expected batch size.

  Accounting (`dp_event`): jax_privacy's `amplified_bandmf_event`,
  `ceil(steps / bands)` compositions of the Poisson-subsampled Gaussian
  mechanism at rate `q`, under add/remove-one adjacency (the independent
  assignment is what makes add/remove right; an equal split would need
  zero-out). That is the epsilon of DP-BandMF noise with `bands` bands
  (`dp_aggregate` with a budget of this sampler builds it). `bands = 1` is
  `PoissonSampler`: the same batches, the same epsilon, DP-SGD's noise.

  Privacy contract: as `PoissonSampler`'s, and the noise must be DP-BandMF's
  with the same `bands` (a budget of this sampler makes `dp_aggregate` add it;
  DP-SGD's independent noise would be accounted wrongly here, and BandMF's
  with another sampler too). `truncate=True` is not supported.

  References:
    Choquette-Choo et al. 2023, "(Amplified) Banded Matrix Factorization: A
    unified approach to private training", https://arxiv.org/abs/2306.08153.

  Examples:
    >>> import optax_dp
    >>> sampler = optax_dp.CyclicPoissonSampler(dataset_size=1000,
    ...                                         expected_batch_size=10, bands=4)
    >>> sampler.sampling_probability   # per eligible step: 4 * 10 / 1000
    0.04
    >>> groups = sampler.groups(seed=0)
    >>> batches = list(sampler.batches(seed=0, steps=8))
    >>> all(set(b.indices[b.mask]) <= set(groups[t % 4]) for t, b in enumerate(batches))
    True
  """
  bands: int = 1

  name: ClassVar[str] = "cyclic_poisson"

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "bands", _checks.check_int("bands", self.bands, 1))
    if self.truncate:
      raise ValueError("CyclicPoissonSampler does not support truncate=True.")
    if self.bands * self.expected_batch_size > self.dataset_size:
      raise ValueError(
          f"CyclicPoissonSampler: bands * expected_batch_size = {self.bands} * "
          f"{self.expected_batch_size} exceeds dataset_size {self.dataset_size} "
          "(each group of about dataset_size / bands examples must hold the "
          "expected batch).")

  @property
  def sampling_probability(self) -> float:
    """The inclusion probability of an example at a step its group is sampled."""
    return self.bands * self.expected_batch_size / self.dataset_size

  @property
  def accountants(self) -> tuple[str, ...]:
    return ("pld", "rdp")

  def dp_event(self, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    """jax_privacy's `amplified_bandmf_event` for this run."""
    try:
      from jax_privacy.experimental import accounting  # pylint: disable=g-import-not-at-top
    except ImportError as e:  # pragma: no cover - exercised only without the extra
      raise ImportError("CyclicPoissonSampler's accounting needs jax-privacy: "
                        "pip install 'jax-privacy>=2.0' (from a clone: pip install -e '.[bandmf]').") from e
    return accounting.amplified_bandmf_event(
        noise_multiplier, steps, num_bands=self.bands,
        sampling_prob=self.sampling_probability)

  def describe(self) -> str:
    return (f"cyclic Poisson sampling over {self.bands} groups: each of the "
            f"{self.dataset_size} examples is assigned a group uniformly at random, "
            f"and step t includes each example of group t mod {self.bands} "
            f"independently with probability q = {self.bands}*{self.expected_batch_size}"
            f"/{self.dataset_size} = {self.sampling_probability:.6g} (expected "
            f"batch size {self.expected_batch_size})")

  def groups(self, seed: int) -> list:
    """The run's groups: `bands` arrays of example indices (a function of
    the seed alone, drawn from its own random stream)."""
    seed = _batches.check_run(seed, 1, 0, 1)[0]
    if self.bands == 1:
      return [None]
    group = _batches.step_rng(seed, _PARTITION_STREAM).integers(
        0, self.bands, self.dataset_size)
    return [np.flatnonzero(group == j) for j in range(self.bands)]

  def batches(self, seed: int, *, steps: int, start_step: int = 0,
              accumulation_steps: int = 1) -> Iterator[Batch]:
    """As `PoissonSampler.batches`, step t drawing from group `t % bands`."""
    seed, run, k = _batches.check_run(seed, steps, start_step, accumulation_steps)
    groups = self.groups(seed)
    return _batches.poisson_draws(
        seed, run, k, dataset_size=self.dataset_size,
        sampling_probability=self.sampling_probability,
        max_size=self.logical_batch_size(run.stop), truncate=False,
        pad_to_multiple_of=self.pad_to_multiple_of,
        buckets=self.padding_sizes(run.stop),
        groups=None if groups == [None] else groups)


def poisson_batches(
    seed: int,
    *,
    dataset_size: int,
    expected_batch_size: int,
    steps: int,
    max_batch_size: Optional[int] = None,
    pad_to_multiple_of: Optional[int] = None,
    padding_buckets: Optional[int] = DEFAULT_PADDING_BUCKETS,
) -> Iterator[Batch]:
  """Yields `steps` Poisson-sampled batches of example indices, with masks.

  Shorthand for `PoissonSampler(dataset_size, expected_batch_size,
  max_batch_size, ...).batches(seed, steps=steps)`: each step includes every
  example independently with probability `q = expected_batch_size /
  dataset_size`. Batches are padded (index -1, mask False) to the smallest of
  `padding_buckets` static sizes that holds them (the largest
  `max_batch_size`, default `poisson_max_batch_size(...)`); with
  `padding_buckets=None`, to `max_batch_size` or, with `pad_to_multiple_of=k`,
  to the realised size rounded up to a multiple of k. An overflowing batch
  raises `RuntimeError` instead of dropping examples.

  Privacy contract: as `PoissonSampler`'s. Pair it with `dp_aggregate(...,
  expected_batch_size=expected_batch_size)` (the public normaliser, never the
  realised size) and account with the same `dataset_size`, `steps` and
  `batch_size=expected_batch_size`.

  Raises:
    ValueError: for bad arguments, when called (not at the first batch).

  Examples:
    >>> import optax_dp
    >>> batches = optax_dp.poisson_batches(
    ...     0, dataset_size=1000, expected_batch_size=10, steps=3)
    >>> [(b.indices.shape, bool((b.indices[~b.mask] == -1).all())) for b in batches]
    [((16,), True), ((16,), True), ((8,), True)]
  """
  sampler = PoissonSampler(dataset_size, expected_batch_size, max_batch_size,
                           pad_to_multiple_of=pad_to_multiple_of,
                           padding_buckets=padding_buckets)
  return sampler.batches(seed, steps=steps)
