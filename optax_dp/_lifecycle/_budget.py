"""The privacy budget of a training run: what it may spend, and what it has.

A `PrivacyBudget` ties together the public parameters the accountant needs
(sampler, noise multiplier, delta, accountant) and the number of noisy steps
the noise was calibrated for. `dp_aggregate(..., budget=budget)` takes its noise
multiplier and normaliser from it and refuses to release a step past
`max_steps`; `budget.epsilon_spent(opt_state)` reads the step counter from the
optimizer state and reports the epsilon of the updates released so far.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Optional

import jax

from optax_dp._sample import _accounting
from optax_dp._sample import _calibration
from optax_dp._aggregation import _aggregate
from optax_dp._core import _checks
from optax_dp._sample import _group_privacy
from optax_dp._sample import _sampling
from optax_dp._sample import _users


# Raised by dp_aggregate's guard, which lives in the aggregation layer below.
PrivacyBudgetExceededError = _checks.PrivacyBudgetExceededError


@dataclasses.dataclass(frozen=True)
class PrivacyBudget:
  """The public accounting parameters of a DP-SGD run and its step budget.

  Build it with `privacy_budget(...)`, which calibrates what is not given.

  Attributes:
    sampler: the sampler whose batches the run uses (decides the accounting).
    noise_multiplier: sigma, passed on to `dp_aggregate`.
    target_delta: the delta of every epsilon reported.
    max_steps: the number of noisy (logical) steps the budget allows.
    accountant: "pld" or "rdp".
    target_epsilon: the epsilon the budget was set from, if any (the epsilon
      after `max_steps` steps is `epsilon()`, which is <= it).

  Privacy contract: `epsilon(steps)` is dp-accounting's bound for `steps`
  updates of the Gaussian mechanism with this noise multiplier over batches
  drawn by this sampler; `epsilon_spent(opt_state)` applies it to the step
  counter of the `dp_aggregate` in the optimizer state (the updates actually
  released).

  Examples:
    >>> import optax_dp
    >>> sampler = optax_dp.PoissonSampler(dataset_size=60000, expected_batch_size=256)
    >>> budget = optax_dp.privacy_budget(sampler=sampler, target_delta=1e-5,
    ...                                  noise_multiplier=1.0, steps=1000)
    >>> budget.max_steps, round(budget.epsilon(), 2), round(budget.epsilon(10), 3)
    (1000, 0.73, 0.144)
  """
  sampler: _sampling.Sampler
  noise_multiplier: float
  target_delta: float
  max_steps: int
  accountant: str
  target_epsilon: Optional[float] = None

  def epsilon(self, steps: Optional[int] = None) -> float:
    """Epsilon after `steps` noisy steps (default: `max_steps`); 0 for 0 steps."""
    steps = self.max_steps if steps is None else _checks.check_int("steps", steps, 0)
    if steps == 0:
      return 0.0
    return _cached_epsilon(self.noise_multiplier, self.target_delta, self.sampler,
                           steps, self.accountant)

  def steps_taken(self, opt_state: Any) -> int:
    """The number of noisy steps the `dp_aggregate` in `opt_state` released."""
    # jax.tree.leaves: the step of an nnx.Optimizer's state is an nnx variable.
    return int(jax.tree.leaves(find_dp_state(opt_state).step)[0])

  def epsilon_spent(self, opt_state: Any) -> float:
    """Epsilon of the updates released so far, read from the optimizer state
    (an `opt_state`, or a Flax `TrainState`: anything containing exactly one
    `DPAggregateState`)."""
    return self.epsilon(self.steps_taken(opt_state))

  def statement(self, steps: Optional[int] = None, *, user_ids: Any = None) -> str:
    """The privacy guarantee after `steps` steps (default `max_steps`), in
    words (`user_ids`: as for `privacy_statement`)."""
    steps = self.max_steps if steps is None else steps
    return privacy_statement(self.noise_multiplier, self.target_delta,
                             sampler=self.sampler, steps=steps,
                             accountant=self.accountant, user_ids=user_ids)


# Epsilon on validated arguments; cached, as loops ask for it at every eval.
_cached_epsilon = _accounting.cached_epsilon


def privacy_budget(
    *,
    sampler: _sampling.Sampler,
    target_delta: float,
    target_epsilon: Optional[float] = None,
    steps: Optional[int] = None,
    noise_multiplier: Optional[float] = None,
    accountant: Optional[str] = None,
) -> PrivacyBudget:
  """A `PrivacyBudget` from any two of (target_epsilon, steps, noise_multiplier).

  * `target_epsilon` and `steps`: calibrates the noise multiplier
    (`calibrate_noise_multiplier`); `max_steps = steps`.
  * `noise_multiplier` and `target_epsilon`: `max_steps` is the largest number
    of steps whose epsilon is at most `target_epsilon`.
  * `noise_multiplier` and `steps`: `max_steps = steps`, whatever epsilon that
    gives (`budget.epsilon()`).

  Privacy contract: the budget is the accounting of `sampler`'s batches; pass
  it to `dp_aggregate(..., budget=budget)`, which takes sigma and the
  normaliser from it and refuses update `max_steps + 1`
  (`PrivacyBudgetExceededError`). Sigma is rounded up, never down, and the
  result is verified with the accountant `compute_epsilon` uses.

  Raises:
    ValueError: for bad or inconsistent arguments, or when even one step at
      `noise_multiplier` exceeds `target_epsilon`.

  References:
    Doroshenko, Ghazi, Kamath, Kumar & Manurangsi 2022, "Connect the Dots:
    Tighter Discrete Approximations of Privacy Loss Distributions",
    https://arxiv.org/abs/2207.04380 (the PLD accountant of dp-accounting).
    Mironov 2017, "Renyi Differential Privacy", https://arxiv.org/abs/1702.07476.

  Examples:
    >>> import optax_dp
    >>> sampler = optax_dp.PoissonSampler(dataset_size=60000, expected_batch_size=256)
    >>> budget = optax_dp.privacy_budget(sampler=sampler, target_delta=1e-5,
    ...                                  noise_multiplier=1.0, steps=1000)
    >>> round(budget.epsilon(), 2)
    0.73
  """
  given = [x is not None for x in (target_epsilon, steps, noise_multiplier)]
  if sum(given) != 2:
    raise ValueError(
        "privacy_budget needs exactly two of target_epsilon, steps and "
        "noise_multiplier (the third is derived from them).")
  sampler = _accounting.resolve_sampler(sampler, None, None)
  target_delta = _checks.check_delta(target_delta)
  note = _checks.large_delta_note(target_delta, sampler.dataset_size)
  if note is not None:
    warnings.warn(note.removeprefix("WARNING: "), _checks.LargeDeltaWarning,
                  stacklevel=2)
  accountant = _accounting.resolve_accountant(accountant, sampler)
  if noise_multiplier is None:
    steps = _checks.check_int("steps", steps, 1)
    noise_multiplier = _calibration.calibrate_noise_multiplier(
        target_epsilon, target_delta, sampler=sampler, steps=steps,
        accountant=accountant)
    return PrivacyBudget(sampler, noise_multiplier, target_delta, steps, accountant,
                         float(target_epsilon))
  noise_multiplier = _checks.check_noise_multiplier(noise_multiplier)
  if noise_multiplier == 0:
    raise ValueError(
        "A privacy budget needs noise: noise_multiplier=0 is not differentially "
        "private at any epsilon.")
  if steps is not None:
    steps = _checks.check_int("steps", steps, 1)
    return PrivacyBudget(sampler, noise_multiplier, target_delta, steps, accountant,
                         None)
  target_epsilon = _checks.check_epsilon(target_epsilon)
  max_steps = _max_steps(noise_multiplier, target_delta, sampler, accountant,
                         target_epsilon)
  return PrivacyBudget(sampler, noise_multiplier, target_delta, max_steps, accountant,
                       target_epsilon)


def _max_steps(noise_multiplier, target_delta, sampler, accountant, target_epsilon,
               limit=10**8) -> int:
  """Largest steps with epsilon <= target (epsilon is nondecreasing in steps)."""
  def within(steps):
    return _cached_epsilon(noise_multiplier, target_delta, sampler, steps,
                           accountant) <= target_epsilon

  if not within(1):
    raise ValueError(
        f"Even one step at noise_multiplier={noise_multiplier} spends more than "
        f"target_epsilon={target_epsilon} (delta {target_delta}); raise the "
        "noise multiplier or the budget.")
  lo, hi = 1, 2  # within(lo); find hi with not within(hi)
  while within(hi):
    lo, hi = hi, hi * 2
    if hi > limit:
      raise ValueError(
          f"noise_multiplier={noise_multiplier} allows more than {limit} steps "
          f"within epsilon {target_epsilon}; pass steps= instead.")
  return _checks.bisect_boundary(within, lo, hi)[0]


def find_dp_state(tree: Any):
  """The single `DPAggregateState` inside an optimizer state or TrainState."""
  return _checks.find_one(tree, _aggregate.DPAggregateState,
                          "optax_dp.dp_aggregate")


def privacy_statement(
    noise_multiplier: float,
    target_delta: float,
    *,
    steps: int,
    sampler: Optional[_sampling.Sampler] = None,
    dataset_size: Optional[int] = None,
    batch_size: Optional[int] = None,
    accountant: Optional[str] = None,
    user_ids: Any = None,
) -> str:
  """The (epsilon, delta) guarantee of a DP-SGD run, in plain words.

  Like TF Privacy's `compute_dp_sgd_privacy_statement`, for optax_dp's
  samplers: it names the sampler, the neighbouring relation, the accountant
  and what the guarantee does and does not cover. A noise multiplier of 0
  gives an infinite epsilon, said as "NOT private". With `user_ids` (one per
  example) an example-level statement adds what it gives the person with the
  most examples (`group_privacy`); a user-level run protects each user itself.

  Examples:
    >>> import optax_dp
    >>> text = optax_dp.privacy_statement(1.0, 1e-5, steps=1000,
    ...                                   dataset_size=60000, batch_size=256)
    >>> text.splitlines()[1][:60]
    'Guarantee: (0.7276, 1e-05)-differential privacy for each sin'
  """
  sampler = _accounting.resolve_sampler(sampler, dataset_size, batch_size)
  accountant = _accounting.resolve_accountant(accountant, sampler)
  steps = _checks.check_int("steps", steps, 1)
  epsilon = _accounting.compute_epsilon(noise_multiplier, target_delta, sampler=sampler,
                                        steps=steps, accountant=accountant)
  epochs = steps * sampler.expected_batch_size / sampler.dataset_size
  accountant_name = {"pld": "privacy loss distribution (PLD, pessimistic)",
                     "rdp": "Renyi DP (RDP)"}[accountant]
  eps_text = "infinite (NOT private)" if math.isinf(epsilon) else f"{epsilon:.4g}"
  bands = getattr(sampler, "bands", None)
  mechanism = ("DP-SGD" if bands is None else
               f"DP-BandMF (banded matrix-factorisation noise, {bands} band"
               f"{'s' if bands != 1 else ''}; Choquette-Choo et al. 2023)")
  if sampler.privacy_unit == "user":
    unit = ("user (all of that user's examples, however many: each user's "
            "examples were clipped together)")
    scope = ("It protects users as identified by the user ids: a person who "
             "appears under several ids is protected as that many users.")
    clipped = "every user's combined gradient was clipped"
  else:
    unit = "single training example"
    scope = ("It protects examples, not people: a person with several examples "
             "gets a weaker guarantee (optax_dp.group_privacy says how much).")
    clipped = "every example's gradient was clipped"
  return "\n".join([
      f"{mechanism} with noise multiplier {noise_multiplier:g}, {steps} noisy steps "
      f"(~{epochs:.3g} epochs), {sampler.describe()}.",
      f"Guarantee: ({eps_text}, {target_delta:g})-differential privacy for each "
      f"{unit}, under the '{sampler.neighboring_relation}' "
      f"neighbouring relation, by dp-accounting's {accountant_name} accountant.",
      "This holds if the batches were drawn exactly as described, "
      f"{clipped} before the noise was added, and the "
      "noise multiplier and step count are those of the run. " + scope,
  ] + [note for note in [_checks.large_delta_note(target_delta, sampler.dataset_size),
                         _largest_person(noise_multiplier, target_delta, steps, sampler,
                                         accountant, user_ids)]
       if note is not None])


def _largest_person(noise_multiplier, target_delta, steps, sampler, accountant, user_ids):
  """The example-level guarantee of the person with the most examples."""
  if user_ids is None or sampler.privacy_unit != "example":
    return None
  owner, counts = _users.user_examples(user_ids)
  if len(owner) != sampler.dataset_size:
    raise ValueError(
        f"privacy_statement: user_ids has {len(owner)} entries for a sampler of "
        f"{sampler.dataset_size} examples: pass one user id per example.")
  m = max(len(c) for c in counts)
  group = _group_privacy.group_privacy(noise_multiplier, target_delta, m, steps=steps,
                                       sampler=sampler, accountant=accountant)
  bound = ("no guarantee (vacuous)" if math.isinf(group.epsilon) else
           f"({group.epsilon:.4g}, {target_delta:g})-differential privacy")
  return (f"Of the {len(counts)} people in user_ids, the one with the most examples "
          f"(m = {m}) is protected as a group of {m} examples: {bound}, by group "
          "privacy (optax_dp.group_privacy). A user-level run "
          "(optax_dp.UserPoissonSampler) protects each person directly.")

