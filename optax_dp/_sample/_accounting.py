"""Privacy accounting for DP-SGD, through dp-accounting (calibration, the
inverse question, is `_calibration`).

The mechanism accounted for is the one a sampler (`optax_dp.PoissonSampler`,
`FixedBatchSampler`, `ShuffleSampler`) says it runs: by default `steps`
self-compositions of the Poisson-subsampled Gaussian mechanism (sampling rate
`q = batch_size / dataset_size`, noise multiplier `sigma`), under add/remove-one
adjacency: what `dp_aggregate` releases when fed batches from
`poisson_batches`. The accountants are dp-accounting's (Google's
`dp_accounting` package):

* `"pld"`: privacy loss distributions, with pessimistic discretisation, so
  the epsilon is an upper bound. The default: tightest.
* `"rdp"`: Renyi DP, with dp-accounting's default orders: a looser upper
  bound, but fast.

The papers behind both are listed under `compute_epsilon`'s References.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, TypedDict

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp

from optax_dp._core import _checks
from optax_dp._sample import _sampling

ACCOUNTANTS = ("pld", "rdp")
"""The accountants `compute_epsilon`, `calibrate_noise_multiplier` and
`privacy_budget` take as `accountant`: dp-accounting's privacy loss
distributions (`"pld"`, the tighter) or Renyi DP (`"rdp"`). The default is the
sampler's first (`sampler.accountants`): PLD wherever the sampler allows it."""
# PLD discretisation of the reported epsilon. The coarser one only brackets the
# search in calibration; every reported number uses the fine one.
_PLD_VALUE_DISCRETIZATION = 1e-4
_PLD_COARSE_DISCRETIZATION = 1e-3


def resolve_sampler(sampler: Optional[_sampling.Sampler], dataset_size: Any,
                    batch_size: Any) -> _sampling.Sampler:
  """`sampler`, or Poisson sampling of `batch_size` of `dataset_size`."""
  if sampler is None:
    if dataset_size is None or batch_size is None:
      raise ValueError(
          "Pass either sampler=... (optax_dp.PoissonSampler, FixedBatchSampler "
          "or ShuffleSampler) or dataset_size and batch_size (Poisson sampling).")
    dataset_size = _checks.check_int("dataset_size", dataset_size, 1)
    batch_size = _checks.check_int("batch_size", batch_size, 1)
    if batch_size > dataset_size:
      raise ValueError(
          f"batch_size ({batch_size}) must be <= dataset_size ({dataset_size}): "
          "it is the expected Poisson batch size q * dataset_size.")
    return _sampling.PoissonSampler(dataset_size, batch_size)
  if dataset_size is not None or batch_size is not None:
    raise ValueError(
        "Pass either sampler=... or dataset_size and batch_size, not both: the "
        "sampler already fixes them.")
  if not isinstance(sampler, _sampling.SAMPLER_TYPES):
    raise ValueError(
        "sampler must be an optax_dp.PoissonSampler, CyclicPoissonSampler, "
        "FixedBatchSampler, ShuffleSampler or UserPoissonSampler, got "
        f"{type(sampler).__name__}.")
  return sampler


def resolve_accountant(accountant: Any, sampler: _sampling.Sampler) -> str:
  """`accountant`, or the sampler's default; ValueError if it cannot account
  for the sampler."""
  if accountant is None:
    return sampler.accountants[0]
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}.")
  if accountant not in sampler.accountants:
    raise ValueError(sampler.unsupported_accountant_reason(accountant))
  return accountant


def dpsgd_event(noise_multiplier: float, *, steps: int,
                dataset_size: Optional[int] = None, batch_size: Optional[int] = None,
                sampler: Optional[_sampling.Sampler] = None) -> dp_accounting.DpEvent:
  """The `DpEvent` of `steps` DP-SGD updates with `sampler`'s batches
  (default: Poisson sampling at rate batch_size/dataset_size), to compose with
  other mechanisms in a dp-accounting accountant of your own.

  Privacy contract: as `compute_epsilon`'s, which accounts for this event.
  Its arguments are validated as `compute_epsilon`'s (`noise_multiplier`
  finite and >= 0, not a bool: a ValueError otherwise).

  Examples:
    >>> import optax_dp
    >>> event = optax_dp.dpsgd_event(1.1, steps=10, dataset_size=1000, batch_size=10)
    >>> event.count, event.event.sampling_probability
    (10, 0.01)
  """
  noise_multiplier = _checks.check_noise_multiplier(noise_multiplier)
  sampler = resolve_sampler(sampler, dataset_size, batch_size)
  steps = _checks.check_int("steps", steps, 1)
  return sampler.dp_event(noise_multiplier, steps)


def make_accountant(accountant: str, sampler: _sampling.Sampler, *,
                     coarse: bool = False) -> dp_accounting.PrivacyAccountant:
  relation = (dp_accounting.NeighboringRelation.REPLACE_ONE
              if sampler.neighboring_relation == _sampling.REPLACE_ONE
              else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
  if accountant == "rdp":
    return rdp.RdpAccountant(neighboring_relation=relation)
  return pld.PLDAccountant(
      neighboring_relation=relation,
      value_discretization_interval=(
          _PLD_COARSE_DISCRETIZATION if coarse else _PLD_VALUE_DISCRETIZATION))


@functools.lru_cache(maxsize=1024)
def cached_epsilon(noise_multiplier: float, target_delta: float, sampler: _sampling.Sampler,
             steps: int, accountant: str, coarse: bool = False) -> float:
  """Epsilon on validated arguments (pure, so cached: loops ask at every eval)."""
  if noise_multiplier == 0:
    return math.inf
  event = sampler.dp_event(noise_multiplier, steps)
  try:
    return float(make_accountant(accountant, sampler, coarse=coarse).compose(event)
                 .get_epsilon(target_delta))
  except MemoryError:
    raise ValueError(
        f"PLD accounting for noise_multiplier={noise_multiplier} needs more "
        "memory than this machine has (the privacy loss distribution of such "
        "small noise is huge); use accountant='rdp' for this setting.") from None


class SamplingArgs(TypedDict, total=False):
  """How the batches were drawn and accounted: `compute_epsilon`'s keyword
  options, which `calibrate_noise_multiplier` takes as
  `**sampling: Unpack[SamplingArgs]` (one definition, one validation).

  Keys:
    dataset_size, batch_size: shorthand for `sampler=PoissonSampler(
      dataset_size, batch_size)`.
    sampler: the sampler the run used.
    accountant: `"pld"` or `"rdp"`; default: the sampler's first.
  """
  dataset_size: Optional[int]
  batch_size: Optional[int]
  sampler: Optional[_sampling.Sampler]
  accountant: Optional[str]


def resolve_schedule(target_delta, steps, dataset_size=None, batch_size=None,
                      sampler=None, accountant=None):
  """(target_delta, sampler, steps, accountant), validated and resolved."""
  target_delta = _checks.check_delta(target_delta)
  sampler = resolve_sampler(sampler, dataset_size, batch_size)
  steps = _checks.check_int("steps", steps, 1)
  return target_delta, sampler, steps, resolve_accountant(accountant, sampler)


def compute_epsilon(
    noise_multiplier: float,
    target_delta: float,
    *,
    steps: int,
    dataset_size: Optional[int] = None,
    batch_size: Optional[int] = None,
    sampler: Optional[_sampling.Sampler] = None,
    accountant: Optional[str] = None,
) -> float:
  """Epsilon spent by `steps` DP-SGD updates.

  Privacy contract: the bound holds only if the run released exactly `steps`
  updates, each the clipped sum of one of `sampler`'s batches plus fresh
  Gaussian noise of std `noise_multiplier * l2_norm_clip`, normalised by a
  public constant (as `dp_aggregate` does); anything else released about the
  data (evaluations, other runs) composes on top of it.

  Args:
    noise_multiplier: sigma, the noise std divided by the clip norm.
    target_delta: the delta of the (epsilon, delta) guarantee, in (0, 1).
    steps: the number of noisy updates released (logical steps when
      accumulating).
    dataset_size: with `batch_size`, shorthand for
      `sampler=PoissonSampler(dataset_size, batch_size)`.
    batch_size: the *expected* Poisson batch size; the sampling rate is
      `batch_size / dataset_size` (`dp_aggregate`'s `expected_batch_size`).
    sampler: the sampler the run used; it decides the mechanism accounted for
      (see `PoissonSampler`, `FixedBatchSampler`, `ShuffleSampler`).
    accountant: `"pld"` (tighter) or `"rdp"`; default: the sampler's first
      supported one (PLD, or RDP for fixed batches, which PLD cannot account).

  Returns:
    An upper bound on epsilon at `target_delta` (`inf` for noise_multiplier 0),
    under the sampler's neighbouring relation.

  Raises:
    ValueError: for out-of-range arguments, or an accountant that cannot
      account for the sampler.

  References:
    Abadi et al. 2016, "Deep Learning with Differential Privacy",
    https://arxiv.org/abs/1607.00133 (the DP-SGD mechanism).
    PLD: Meiser & Mohammadi 2018, "Tight on Budget?", CCS 2018; Koskela,
    Jalko & Honkela 2020, https://arxiv.org/abs/1906.03049; Doroshenko et al.
    2022, "Connect the Dots", https://arxiv.org/abs/2207.04380.
    RDP: Mironov 2017, "Renyi Differential Privacy", arXiv 1702.07476;
    Mironov, Talwar & Zhang 2019, https://arxiv.org/abs/1908.10530.

  Examples:
    >>> import optax_dp
    >>> round(optax_dp.compute_epsilon(1.1, 1e-5, steps=1000, dataset_size=60000,
    ...                                batch_size=256), 2)
    0.6
  """
  noise_multiplier = _checks.check_noise_multiplier(noise_multiplier)
  target_delta, sampler, steps, accountant = resolve_schedule(
      target_delta, steps, dataset_size, batch_size, sampler, accountant)
  return cached_epsilon(noise_multiplier, target_delta, sampler, steps, accountant)
