"""The release step of `dp_aggregate`, around the clip and the noise: what
comes in (per-example gradients or a `ClippedGrads`, checked against the
transformation), what the run is (a budget or explicit arguments, i.i.d. or
DP-BandMF noise), and the ledger checked before each release (the noise key
at the step counter, the budget's steps, the clip policy's and the noise
source's own checks).

Privacy contract: `guard` refuses (raises, also under `jax.jit`, and poisons
the update) a release whose noise would replay or mix another run's stream,
whose clipped sum was made for another sensitivity, or that the budget does
not cover; `incoming` refuses an input that a transformation before the DP
step has already changed.
"""

from __future__ import annotations

import typing
from typing import Any, Optional

import jax
import jax.numpy as jnp

from optax_dp._core import _checks
from optax_dp._clip import _clipping
from optax_dp._core import _composition
from optax_dp._aggregation import _correlated
from optax_dp._flax import _nnx
from optax_dp._core import _keys

# One ledger entry: (refuse when this holds, the error, its message).
Check = tuple[Any, type, str]


@typing.runtime_checkable
class Budget(typing.Protocol):
  """What dp_aggregate reads of an `optax_dp.PrivacyBudget` (defined above
  this layer, in the lifecycle layer, which imports this one). Read-only
  properties: a frozen dataclass's fields are read-only, and a type checker
  refuses it for a protocol whose attributes are writable."""

  @property
  def noise_multiplier(self) -> float: ...

  @property
  def target_delta(self) -> float: ...

  @property
  def max_steps(self) -> int: ...

  @property
  def sampler(self) -> Any: ...

  def epsilon(self, steps: Optional[int] = None) -> float: ...


def resolve_budget(noise_multiplier, expected_batch_size, budget, allow_budget_overrun):
  """(noise_multiplier, expected_batch_size, max_steps or None) from the args."""
  if not isinstance(allow_budget_overrun, bool):
    raise ValueError(f"allow_budget_overrun must be a bool, got {allow_budget_overrun!r}.")
  if budget is None:
    if allow_budget_overrun:
      raise ValueError("allow_budget_overrun=True needs a budget= to overrun.")
    if noise_multiplier is None:
      raise ValueError(
          "dp_aggregate needs noise_multiplier= (or budget=optax_dp.privacy_budget"
          "(...), which calibrates it from a target epsilon).")
    return noise_multiplier, expected_batch_size, None
  if not isinstance(budget, Budget):
    raise ValueError(
        f"budget must be an optax_dp.PrivacyBudget, got {type(budget).__name__}.")
  if noise_multiplier is not None and float(noise_multiplier) != budget.noise_multiplier:
    raise ValueError(
        f"dp_aggregate got noise_multiplier={noise_multiplier} and a budget "
        f"calibrated for {budget.noise_multiplier}: pass only the budget.")
  normaliser = budget.sampler.expected_batch_size
  if expected_batch_size is not None and expected_batch_size != normaliser:
    raise ValueError(
        f"dp_aggregate got expected_batch_size={expected_batch_size}, but the "
        f"budget's sampler has expected batch size {normaliser}: pass only the "
        "budget.")
  return budget.noise_multiplier, normaliser, (
      None if allow_budget_overrun else budget.max_steps)


def resolve_noise_strategy(noise_strategy, budget, allow_budget_overrun):
  """The DP-BandMF strategy of the run, or None for DP-SGD's i.i.d. noise.

  A budget whose sampler has bands (`CyclicPoissonSampler`) decides it: the
  strategy for its `max_steps` and bands, the mechanism its accounting is
  about. A strategy with any other budget is refused: the budget's epsilon
  would not be that of the noise that runs."""
  bands = getattr(getattr(budget, "sampler", None), "bands", None)
  if noise_strategy is not None and not all(
      hasattr(noise_strategy, a) for a in ("n", "bands", "inverse_as_streaming_matrix")):
    raise ValueError(
        "noise_strategy must be a DP-BandMF strategy from optax_dp.bandmf_strategy"
        f"(steps, bands), got {type(noise_strategy).__name__}.")
  if budget is None or bands is None:
    if budget is not None and noise_strategy is not None:
      raise ValueError(
          "dp_aggregate got a noise_strategy (DP-BandMF) and a budget whose sampler "
          f"({type(budget.sampler).__name__}) is accounted for DP-SGD's independent "
          "noise: that epsilon would not be the run's. Build the budget with "
          "sampler=optax_dp.CyclicPoissonSampler(..., bands=B) and omit noise_strategy.")
    return noise_strategy
  if allow_budget_overrun:
    raise ValueError(
        "allow_budget_overrun=True with DP-BandMF (a CyclicPoissonSampler budget): "
        f"the noise strategy is built for the budget's {budget.max_steps} steps and "
        "has no rows past them. Build the budget for the steps you will run.")
  strategy = noise_strategy or _correlated.bandmf_strategy(budget.max_steps, bands)
  if (strategy.n, strategy.bands) != (budget.max_steps, bands):
    raise ValueError(
        f"dp_aggregate got a noise_strategy for {strategy.n} steps and "
        f"{strategy.bands} bands, but the budget is for {budget.max_steps} steps of "
        f"a {bands}-band cyclic sampler: omit noise_strategy (the budget builds it).")
  return strategy


def resolve(noise_multiplier, expected_batch_size, budget, allow_budget_overrun,
            noise_strategy):
  """`(noise_multiplier, expected_batch_size, max_steps or None, BandMF
  strategy or None)` of the run, from dp_aggregate's arguments, checked."""
  noise_multiplier, expected_batch_size, max_steps = resolve_budget(
      noise_multiplier, expected_batch_size, budget, allow_budget_overrun)
  strategy = resolve_noise_strategy(noise_strategy, budget, allow_budget_overrun)
  return (_checks.check_noise_multiplier(noise_multiplier, warn_if_zero=True),
          _checks.check_expected_batch_size(expected_batch_size), max_steps,
          strategy)


def refuse_params_shaped(updates, params) -> None:
  """ValueError if `updates` is not per-example but a stripped or averaged tree.

  A tree shaped exactly like `params` (no batch axis) is either batch-averaged
  gradients or the arrays of a `ClippedGrads` whose wrapper was stripped on
  the way here (a tree_map, nnx.Optimizer); an nnx.State with a
  `clipped_sum` entry is a `ClippedGrads` that `nnx.state` flattened
  (`_nnx.refuse_stripped_state`). The message says what happened and what
  to do (for an nnx.State, `_nnx.params_shaped_origin`).
  """
  _nnx.refuse_stripped_state(updates)
  if params is None:
    return
  if jax.tree.structure(updates) != jax.tree.structure(params) or any(
      jnp.shape(u) != jnp.shape(p)
      for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params))):
    return
  said = _nnx.params_shaped_origin(updates)
  if said is None:
    said = (
        "Either (a) they are ordinary batch-averaged gradients (jax.grad of the "
        "mean loss), which clipping cannot make private: compute the clipped sum "
        "with optax_dp.clipped_grads(loss_fn, l2_norm_clip) or per-example "
        "gradients with optax_dp.per_example_grads(loss_fn); or (b) they are "
        "the arrays of a ClippedGrads from clipped_grads whose wrapper was "
        "removed on the way here (a jax.tree.map or tree_util round trip over "
        "the gradients, an nnx.state, a wrapper that rebuilds the tree): pass "
        "the ClippedGrads to tx.update unchanged, and accumulate with "
        "optax_dp.dp_accumulate.")
  raise ValueError(
      "dp_aggregate got gradients shaped exactly like the parameters, with no "
      "batch axis: not per-example gradients, and not a ClippedGrads. " + said)


def incoming(updates, params, privacy_unit: Optional[str] = None):
  """`(updates, output dtypes)`: per-example gradients or a `ClippedGrads`
  (NNX's per-variable ones gathered into one), refused where something
  before the DP step changed them or they do not fit `params`. The clip
  policy then clips them or checks their clip (`ClipPolicy.take`).

  Output dtypes: the gradients' (bf16 in, bf16 out), or the params' for a
  ClippedGrads (whose sum is float32 or wider).

  `privacy_unit`: the budget's sampler's (None without a budget): a
  user-level budget takes only a user-level `ClippedGrads` (each user's
  examples clipped together), whose sensitivity its accounting assumes.
  """
  updates = _clipping.gather_clipped_leaves(updates)  # NNX: one per parameter
  check_privacy_unit(updates, privacy_unit)
  if not isinstance(updates, _clipping.ClippedGrads):
    refuse_params_shaped(updates, params)
    _clipping.batch_size_of(updates)
    if params is not None:
      _composition.check_against_params(updates, params)
    return updates, jax.tree.map(lambda g: g.dtype, updates)
  if not jnp.issubdtype(jnp.result_type(updates.nonfinite_examples), jnp.integer):
    # Its integer count became a float: a transformation (optax.sgd, a
    # scale) mapped over the ClippedGrads before the DP step.
    raise ValueError(
        "dp_aggregate got a ClippedGrads that a transformation before it has "
        "already changed (its integer count of non-finite examples became "
        f"{jnp.result_type(updates.nonfinite_examples)}): the DP step must come "
        "first in the chain, optax.chain(optax_dp.dp_aggregate(...), "
        "optax.sgd(...)), so that nothing sees the clipped sum before its noise.")
  if updates.unreduced_axis is not None:
    raise ValueError(
        "dp_aggregate got the per-device clipped sums of sharded_clipped_grads("
        f"..., reduce=False), not yet summed over mesh axis "
        f"{updates.unreduced_axis!r}: noise on them would not be the mechanism. "
        "Feed them to optax_dp.dp_accumulate(tx, k, mesh=mesh), which sums them "
        "across devices once per logical batch, or use reduce=True (the default).")
  summed = updates.clipped_sum
  if params is not None:
    if jax.tree.structure(summed) != jax.tree.structure(params):
      raise ValueError("dp_aggregate: the clipped sum's tree does not match params.")
    for s, p in zip(jax.tree.leaves(summed), jax.tree.leaves(params)):
      if jnp.shape(s) != jnp.shape(p):
        raise ValueError(
            f"dp_aggregate: clipped sum leaf of shape {jnp.shape(s)} for a "
            f"parameter of shape {jnp.shape(p)}.")
  return updates, jax.tree.map(_clipping.leaf_dtype, summed if params is None else params)


def check_privacy_unit(updates, privacy_unit: Optional[str]) -> None:
  """Refuses example-level gradients under a user-level budget (and the
  reverse): the noise is calibrated for one clipped term per unit."""
  if privacy_unit is None:
    return
  got = (updates.privacy_unit if isinstance(updates, _clipping.ClippedGrads)
         else "example")
  if got == privacy_unit:
    return
  if privacy_unit == "user":
    raise ValueError(
        "dp_aggregate: the budget's sampler is user-level (UserPoissonSampler: "
        "the accounting protects each user, all of its examples), but these "
        "gradients were clipped per example, so one user with m examples could "
        "move the sum by m * C. Pass the batch's 2-D mask (users x examples) "
        "whole to optax_dp.clipped_grads, grad_fn(params, "
        "optax_dp.gather_batch(data, batch)), which clips each user's examples "
        "together; do not flatten it.")
  raise ValueError(
      f"dp_aggregate: these gradients were clipped per {got} (a 2-D mask), but "
      f"the budget's sampler accounts per {privacy_unit}: build the budget from "
      "the sampler that drew the batches (optax_dp.UserPoissonSampler for "
      "user-level batches).")


def normaliser(expected_batch_size: Optional[int], batch_size: Optional[int]) -> int:
  """The public normaliser: `expected_batch_size`, else the static batch size."""
  if expected_batch_size is None and batch_size is None:
    raise _checks.missing_expected_batch_size(
        "under dp_accumulate",
        "the accumulated batch has no static size to fall back on")
  return expected_batch_size or batch_size


def replay_check(state: Any, key_data: jax.Array) -> list[Check]:
  """The state's noise key must be this transformation's at its step counter
  (`key_data`: that of `fold_in(key, state.step)`)."""
  return [(~jnp.all(jnp.asarray(state.noise_key) == key_data),
           _checks.NoiseReplayError, _REPLAY)]


def budget_checks(max_steps: Optional[int], budget: Optional[Budget]):
  """`step -> [Check]`: the step is within the budget's `max_steps` (nothing
  to check without a budget, or when it may be overrun)."""
  if max_steps is None:
    return lambda step: []
  message = (
      f"dp_aggregate: the privacy budget allows {max_steps} noisy steps "
      f"(epsilon {budget.epsilon():.4g} at delta {budget.target_delta:g}); "
      f"refusing step {max_steps + 1} and later ones. Stop training, or pass "
      "allow_budget_overrun=True to dp_aggregate to continue and report the "
      "larger epsilon (budget.epsilon_spent(state)).")
  return lambda step: [(step >= max_steps, _checks.PrivacyBudgetExceededError,
                        message)]


_REPLAY = (
    "dp_aggregate: the optimizer state's noise key does not match this "
    "transformation's key at the state's step counter. The state comes "
    "from another run (a different key or seed), or its key and step were "
    "restored from different points. Continuing would replay or mix noise "
    "streams, which breaks the privacy guarantee. Restore the whole "
    "optimizer state of this run, and build dp_aggregate with that run's key.")


def guard(checks: list[Check]) -> jax.Array:
  """Walks the ledger before a release: raises the first refusal (also under
  `jax.jit`, `_checks.raise_if`), and returns whether all hold (the caller
  poisons the update otherwise)."""
  ok = jnp.bool_(True)
  for bad, error, message in checks:
    bad = jnp.asarray(bad)
    _checks.raise_if(bad, error, message)
    ok = ok & ~bad
  return ok


def typed_key(key: Optional[_keys.KeyLike]) -> jax.Array:
  """dp_aggregate's required noise key, typed (concrete even inside jit)."""
  if key is None:
    raise ValueError(
        "dp_aggregate needs key=: the PRNG key of the noise (a jax.random.key or "
        "an int seed that nothing else uses).")
  with jax.ensure_compile_time_eval():
    return _keys.as_typed_key(key)
