"""What an example-level guarantee gives a person with several examples.

A run that protects single examples protects a person with m examples only as
a *group* of m: an (epsilon, delta)-DP mechanism is (m epsilon,
m e^{(m-1) epsilon} delta)-DP for groups of m (Vadhan 2017, Lemma 2.2).
`group_privacy` applies that lemma at the best example-level delta: the
accountant gives epsilon(delta_0) for every delta_0, and the group bound at
the target delta is the least m * epsilon(delta_0) over the delta_0 with
m e^{(m-1) epsilon(delta_0)} delta_0 <= delta. Where no delta_0 qualifies the
guarantee for that group is vacuous (epsilon inf). A user-level run
(`optax_dp.UserPoissonSampler`) protects the person directly, at its own
epsilon, with no such conversion.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

from optax_dp._core import _checks
from optax_dp._sample import _accounting
from optax_dp._sample import _sampling


class GroupPrivacy(NamedTuple):
  """A group's guarantee and the example-level one it comes from.

  Attributes:
    epsilon: the group's epsilon at `delta` (inf: no bound, the guarantee is
      vacuous for this group at this delta).
    delta: the target delta.
    group_size: m, the examples of the group.
    example_epsilon, example_delta: the example-level (epsilon_0, delta_0)
      the lemma was applied to (`epsilon = m * epsilon_0` and
      `m e^{(m-1) epsilon_0} delta_0 <= delta`); None when vacuous.
  """
  epsilon: float
  delta: float
  group_size: int
  example_epsilon: Optional[float]
  example_delta: Optional[float]


def group_privacy(
    noise_multiplier: float,
    target_delta: float,
    group_size: int,
    *,
    steps: int,
    sampler: _sampling.Sampler,
    accountant: Optional[str] = None,
) -> GroupPrivacy:
  """The guarantee of an example-level run for a group of `group_size` examples.

  Privacy contract: as `compute_epsilon`'s for the run; the group is any m
  examples (e.g. all of one person's), and the bound is the group-privacy
  lemma applied to the epsilon(delta_0) curve (the least of the
  accountant's and RDP's bounds), at the delta_0 (out of a log-spaced grid of
  200 from `target_delta / m` down to 1e-300) that gives the least group
  epsilon. A user-level sampler is refused: its
  run already protects each user.

  Args:
    noise_multiplier: the run's, as for `compute_epsilon`.
    target_delta: the delta of the group's guarantee.
    group_size: m >= 1 (1: the example-level epsilon itself).
    steps: the run's noisy steps.
    sampler: the run's (example-level) sampler.
    accountant: as for `compute_epsilon` (default: the sampler's first).

  Returns:
    A `GroupPrivacy`.

  References:
    Vadhan 2017, "The Complexity of Differential Privacy", Lemma 2.2
    (group privacy for approximate DP).

  Examples:
    >>> import optax_dp
    >>> sampler = optax_dp.PoissonSampler(dataset_size=60000, expected_batch_size=256)
    >>> one = optax_dp.group_privacy(1.1, 1e-5, 1, steps=1000, sampler=sampler)
    >>> two = optax_dp.group_privacy(1.1, 1e-5, 2, steps=1000, sampler=sampler)
    >>> round(one.epsilon, 2), round(two.epsilon, 2)
    (0.6, 1.58)
  """
  group_size = _checks.check_int("group_size", group_size, 1)
  noise_multiplier = _checks.check_noise_multiplier(noise_multiplier)
  target_delta, sampler, steps, accountant = _accounting.resolve_schedule(
      target_delta, steps, sampler=sampler, accountant=accountant)
  if sampler.privacy_unit != "example":
    raise ValueError(
        "group_privacy converts an example-level guarantee; this sampler's run "
        f"already protects each {sampler.privacy_unit} (all of its examples): "
        "its epsilon is compute_epsilon(..., sampler=sampler).")
  m = group_size
  if m == 1:
    eps = _accounting.compute_epsilon(noise_multiplier, target_delta, steps=steps,
                                      sampler=sampler, accountant=accountant)
    return GroupPrivacy(eps, target_delta, 1, eps, target_delta)
  if noise_multiplier == 0:
    return GroupPrivacy(math.inf, target_delta, m, None, None)
  # Both accountants bound epsilon(delta_0); RDP's stays finite at the tiny
  # delta_0 that large groups need, where PLD's truncated tails give inf.
  event = sampler.dp_event(noise_multiplier, steps)
  composed = [_accounting.make_accountant(a, sampler).compose(event)
              for a in dict.fromkeys((accountant, "rdp")) if a in sampler.accountants]
  best = GroupPrivacy(math.inf, target_delta, m, None, None)
  for delta0 in np.logspace(math.log10(target_delta / m), -300, 200):
    eps0 = min(float(c.get_epsilon(float(delta0))) for c in composed)
    # m e^{(m-1) eps0} delta0 <= delta, in logs (no overflow).
    if math.log(m) + (m - 1) * eps0 + math.log(delta0) <= math.log(target_delta):
      if m * eps0 < best.epsilon:
        best = GroupPrivacy(m * eps0, target_delta, m, eps0, float(delta0))
  return best
