"""Samplers: which examples each DP-SGD step sees, and how that is accounted.

One object decides both. `PoissonSampler` (the default; what DP-SGD's
amplification analysis assumes), `FixedBatchSampler` (fixed-size batches drawn
independently each step) and `ShuffleSampler` (epoch shuffling, accounted
without amplification) each yield masked batches of indices (`optax_dp._sample._batches`:
format, draws, gathering) and give the `dp_accounting.DpEvent` of their run.
The Poisson samplers live in `_poisson`; this module holds the fixed-size ones,
the `Sampler` type and the registry (`SAMPLERS`, `make_sampler`).

Privacy contract of every sampler: the epsilon is right only if each noisy
step used exactly the batch the sampler yielded for it (not one reshuffled,
filtered or re-batched by a data loader), with a seed that is secret and
independent of the data (amplification assumes nobody knows who is in a batch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Iterator, Union

import dp_accounting

from optax_dp._sample import _batches
from optax_dp._sample._batches import Batch
from optax_dp._sample._poisson import REPLACE_ONE
from optax_dp._sample._poisson import ZERO_OUT
from optax_dp._sample._poisson import CyclicPoissonSampler
from optax_dp._sample._poisson import PoissonSampler
from optax_dp._sample._users import UserPoissonSampler


@dataclasses.dataclass(frozen=True)
class _FixedSizeSampler:
  """What the fixed-size samplers share: `batch_size` examples every step."""
  dataset_size: int
  batch_size: int

  privacy_unit: ClassVar[str] = "example"

  def __post_init__(self):
    n, b = _batches.check_sizes(self.dataset_size, self.batch_size, "batch_size")
    object.__setattr__(self, "dataset_size", n)
    object.__setattr__(self, "batch_size", b)

  @property
  def expected_batch_size(self) -> int:
    return self.batch_size

  def logical_batch_size(self, steps: int) -> int:
    del steps
    return self.batch_size

  def batches(self, seed: int, *, steps: int, start_step: int = 0,
              accumulation_steps: int = 1) -> Iterator[Batch]:
    """As `PoissonSampler.batches`, with batches of exactly `batch_size`."""
    seed, run, k = _batches.check_run(seed, steps, start_step, accumulation_steps)
    return self._draws(seed, run, k, dataset_size=self.dataset_size,
                       batch_size=self.batch_size)


@dataclasses.dataclass(frozen=True)
class FixedBatchSampler(_FixedSizeSampler):
  """Fixed-size batches, drawn independently at every step: `batch_size`
  distinct examples chosen uniformly without replacement from the dataset.

  Accounted for by Renyi DP for sampling without replacement, which
  dp-accounting supports only under *replace-one* adjacency and only with the
  RDP accountant. Replacing one example moves the clipped sum by up to
  `2 * l2_norm_clip`, so the Gaussian mechanism is accounted with noise
  multiplier `noise_multiplier / 2`: fixed batches cost noticeably more
  epsilon than Poisson batches of the same size, and the statement is about a
  different neighbouring relation. Batches are full unless split to accumulate.

  Privacy contract: each step draws its batch afresh (not an epoch's
  permutation: that is `ShuffleSampler`), and the guarantee is under
  replace-one adjacency (with `dataset_size` public).

  References:
    Wang, Balle & Kasiviswanathan 2019, "Subsampled Renyi Differential Privacy
    and Analytical Moments Accountant", https://arxiv.org/abs/1808.00087
    (Theorem 27).

  Examples:
    >>> import optax_dp
    >>> sampler = optax_dp.FixedBatchSampler(dataset_size=1000, batch_size=10)
    >>> [int(b.mask.sum()) for b in sampler.batches(seed=0, steps=3)]
    [10, 10, 10]
    >>> round(optax_dp.compute_epsilon(1.0, 1e-5, steps=100, sampler=sampler), 2)
    11.21
  """
  name: ClassVar[str] = "fixed"
  neighboring_relation: ClassVar[str] = REPLACE_ONE
  accountants: ClassVar[tuple[str, ...]] = ("rdp",)
  _draws = staticmethod(_batches.fixed_draws)

  def unsupported_accountant_reason(self, accountant: str) -> str:
    return ("dp-accounting's PLD accountant has no event for sampling without "
            "replacement; fixed-size batches are accounted with accountant='rdp'.")

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


@dataclasses.dataclass(frozen=True)
class ShuffleSampler(_FixedSizeSampler):
  """Epoch shuffling: each epoch a fresh random permutation of the dataset is
  cut into `dataset_size // batch_size` batches of `batch_size` (the
  remainder is left out of that epoch). What most data loaders do.

  No privacy amplification is known for shuffling that one could honestly
  claim: shuffled batches can be far less private than the Poisson analysis
  commonly reported for them (Chua et al. 2024). So it is accounted as what
  it certainly is: each example is in at most one batch per epoch, so an epoch
  is one Gaussian mechanism of sensitivity `l2_norm_clip` under zero-out
  adjacency (one example replaced by one with zero gradient), and a run of
  `steps` steps composes `ceil(steps / steps_per_epoch)` of them (a partial
  epoch counts as a whole one): far more epsilon than Poisson at the same noise.

  Privacy contract: each example is in at most one batch per epoch (which the
  sampler guarantees), and `steps` counts every noisy step of the run.

  References:
    Chua et al. 2024, "How Private are DP-SGD Implementations?", ICML 2024,
    https://arxiv.org/abs/2403.17673.
    Kairouz et al. 2021, "Practical and Private (Deep) Learning without
    Sampling or Shuffling", https://arxiv.org/abs/2103.00039 (zero-out).

  Examples:
    >>> import optax_dp
    >>> sampler = optax_dp.ShuffleSampler(dataset_size=1000, batch_size=10)
    >>> sampler.steps_per_epoch, sampler.epochs(250)
    (100, 3)
    >>> epoch = [b.indices for b in sampler.batches(seed=0, steps=100)]
    >>> len(set(int(i) for ix in epoch for i in ix))  # no example twice
    1000
    >>> round(optax_dp.compute_epsilon(1.0, 1e-5, steps=250, sampler=sampler), 2)
    8.39
  """
  name: ClassVar[str] = "shuffle"
  neighboring_relation: ClassVar[str] = ZERO_OUT
  accountants: ClassVar[tuple[str, ...]] = ("pld", "rdp")
  _draws = staticmethod(_batches.shuffle_draws)

  @property
  def steps_per_epoch(self) -> int:
    return self.dataset_size // self.batch_size

  def unsupported_accountant_reason(self, accountant: str) -> str:
    return ""

  def epochs(self, steps: int) -> int:
    """Epochs (started) in a run of `steps` steps."""
    return math.ceil(steps / self.steps_per_epoch)

  def dp_event(self, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(noise_multiplier), self.epochs(steps))

  def describe(self) -> str:
    return (f"epoch shuffling: each epoch a random permutation of the "
            f"{self.dataset_size} examples is cut into {self.steps_per_epoch} "
            f"batches of {self.batch_size} (each example in at most one batch "
            "per epoch; no amplification by shuffling is claimed)")


Sampler = Union[PoissonSampler, CyclicPoissonSampler, FixedBatchSampler, ShuffleSampler,
                UserPoissonSampler]
# Every sampler type (the accounting accepts these); `make_sampler` builds
# the example-level ones by name (a user-level sampler needs the user ids).
SAMPLER_TYPES = (PoissonSampler, CyclicPoissonSampler, FixedBatchSampler, ShuffleSampler,
                 UserPoissonSampler)
SAMPLERS = {"poisson": PoissonSampler, "fixed": FixedBatchSampler,
            "shuffle": ShuffleSampler, "cyclic_poisson": CyclicPoissonSampler}


def make_sampler(name: str, *, dataset_size: int, batch_size: int,
                 **kwargs: Any) -> Sampler:
  """The sampler called `name`, a key of `SAMPLERS`: "poisson"
  (`PoissonSampler`), "cyclic_poisson" (`CyclicPoissonSampler`), "fixed"
  (`FixedBatchSampler`) or "shuffle" (`ShuffleSampler`). `batch_size` is the
  expected batch size for the two Poisson ones, the exact one for the others.

  `kwargs` go to the sampler (`max_batch_size`, `pad_to_multiple_of`,
  `padding_buckets`: the Poisson ones; `truncate`: "poisson" only; `bands`:
  "cyclic_poisson" only). The name decides the mechanism the accounting
  analyses: the privacy contract is the chosen sampler's.

  Examples:
    >>> import optax_dp
    >>> optax_dp.make_sampler("shuffle", dataset_size=100, batch_size=10)
    ShuffleSampler(dataset_size=100, batch_size=10)
  """
  if name in SAMPLERS:
    return SAMPLERS[name](dataset_size, batch_size, **kwargs)
  raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {name!r}.")
