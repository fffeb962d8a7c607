"""DP-SGD's private aggregation step as an `optax.GradientTransformation`.

Clip each example's gradient, sum, add Gaussian noise, normalise by a public
constant: the Gaussian mechanism at the heart of DP-SGD (Abadi et al. 2016,
"Deep Learning with Differential Privacy", arXiv 1607.00133).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_dp import _budget
from optax_dp import _checks
from optax_dp import _clipped
from optax_dp import _clipping
from optax_dp import _composition
from optax_dp import _keys


class NoiseReplayError(RuntimeError):
  """The optimizer state's noise key does not belong to this run at its step."""


class DPAggregateState(NamedTuple):
  """State of `dp_aggregate`: plain arrays, so any checkpointer saves it.

  Attributes:
    noise_key: uint32 key data (`jax.random.key_data`) of the key the *next*
      update draws its noise from: `fold_in(key, step)` for the transform's
      `key`. Noise for update t is a function of (key, t) alone, so a resumed
      run continues the exact noise stream, and a state whose key does not
      match its counter (an old key with a newer counter, or a state from
      another run) is detected at the next update (`NoiseReplayError`).
    step: int32, the number of noisy updates released so far (what the
      accountant must be told; `PrivacyBudget.epsilon_spent` reads it).
    nonfinite_examples: int32, running count of examples whose gradient had a
      NaN or inf (or a squared norm that overflows float32) and whose
      contribution was therefore dropped (set to zero). This count depends on
      the data: it is a debugging aid, not something to publish.
  """
  noise_key: jax.Array
  step: jax.Array
  nonfinite_examples: jax.Array


_check_positive_finite = _checks.check_positive_finite


def _check_noise_multiplier(noise_multiplier: Any) -> float:
  try:
    noise_multiplier = float(noise_multiplier)
  except (TypeError, ValueError):
    raise ValueError(
        f"noise_multiplier must be a number, got {noise_multiplier!r}.") from None
  if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
    raise ValueError(
        f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}."
        " Use optax_dp.calibrate_noise_multiplier(target_epsilon, target_delta,"
        " ...) to pick it from a privacy budget.")
  if noise_multiplier == 0:
    warnings.warn(
        "optax_dp: noise_multiplier=0 adds NO noise: this training run is NOT "
        "differentially private, whatever epsilon anyone reports for it. Use "
        "it only to debug clipping.", UserWarning, stacklevel=3)
  return noise_multiplier


def _refuse_traced(**privacy_args: Any) -> None:
  """ValueError if a privacy parameter is a tracer (built inside a trace)."""
  for name, value in privacy_args.items():
    if isinstance(value, jax.core.Tracer):
      raise ValueError(
          f"dp_aggregate: {name} is a traced value ({type(value).__name__}): the "
          "transform is being built inside jax.jit, typically by "
          "optax.inject_hyperparams, which turns numeric arguments into "
          "optimizer-state arrays. The privacy parameters must be fixed Python "
          "values when the transform is built (the noise and the accounting "
          "depend on them). Pass them as static arguments: "
          "optax.inject_hyperparams(optax_dp.dpsgd, static_args=('l2_norm_clip', "
          "'noise_multiplier', 'key', 'expected_batch_size'))(learning_rate=..., "
          "...); the learning rate and momentum can stay injected.")


def _check_expected_batch_size(expected_batch_size: Any) -> Optional[int]:
  if expected_batch_size is None:
    return None
  if (isinstance(expected_batch_size, (jax.Array, np.ndarray))
      and expected_batch_size.shape == ()
      and jnp.issubdtype(expected_batch_size.dtype, jnp.integer)):
    # A concrete integer array (optax.inject_hyperparams stores ints so).
    expected_batch_size = int(expected_batch_size)
  if (isinstance(expected_batch_size, bool)
      or not isinstance(expected_batch_size, numbers.Real)
      or expected_batch_size != int(expected_batch_size)
      or expected_batch_size < 1):
    raise ValueError(
        "expected_batch_size must be a positive integer (a public constant, "
        f"e.g. q * dataset_size for Poisson sampling), got {expected_batch_size!r}.")
  return int(expected_batch_size)


def _resolve_budget(noise_multiplier, expected_batch_size, budget, allow_budget_overrun):
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
  if not isinstance(budget, _budget.PrivacyBudget):
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


def batch_size_of(per_example_grads: chex.ArrayTree) -> int:
  """Returns the common leading (batch) dimension of per-example gradients.

  Raises:
    ValueError: if the tree is empty, a leaf has no leading axis, or the
      leaves' leading axes differ: these are not per-example gradients.
  """
  leaves = jax.tree.leaves(per_example_grads)
  if not leaves:
    hint = (" If it came from nnx.Optimizer.update with a ClippedGrads: "
            + _NNX_STRIPPED) if _is_nnx_state(per_example_grads) else ""
    raise ValueError("dp_aggregate got an empty gradient tree." + hint)
  dims = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(per_example_grads)[0]:
    shape = jnp.shape(leaf)
    if len(shape) == 0:
      raise ValueError(
          f"dp_aggregate needs per-example gradients, with a leading batch axis on "
          f"every leaf, but leaf {jax.tree_util.keystr(path)} is a scalar. Compute "
          "them with optax_dp.per_example_grads(loss_fn) instead of jax.grad(loss_fn).")
    dims.append((jax.tree_util.keystr(path), shape[0]))
  sizes = {d for _, d in dims}
  if len(sizes) != 1:
    listing = ", ".join(f"{p}: {d}" for p, d in dims[:6])
    raise ValueError(
        "dp_aggregate needs per-example gradients whose leaves all share the "
        f"same leading batch axis; got leading dims {listing}. These look like "
        "ordinary (batch-averaged) gradients: compute per-example gradients "
        "with optax_dp.per_example_grads(loss_fn).")
  return sizes.pop()


def _check_composition(updates) -> None:
  """Refuses the optax wrappers that break the contract around dp_aggregate."""
  refusal = _composition.refusal_for_caller("dp_aggregate")
  if refusal is None and _composition.contains_masked_node(updates):
    refusal = _composition.masked_refusal("dp_aggregate")
  if refusal is not None:
    raise ValueError(refusal)


def _is_nnx_state(tree) -> bool:
  return type(tree).__module__.startswith("flax.nnx")


_NNX_STRIPPED = (
    "nnx.Optimizer.update(model, grads) stripped the ClippedGrads to a plain "
    "nnx.State of its arrays (it calls nnx.state(grads, wrt)), losing the clip "
    "norm and the batch size dp_aggregate needs. Until NNX is supported "
    "natively, either pass per-example gradients (optax_dp.per_example_grads, "
    "which nnx.Optimizer passes through intact), or update by hand: params = "
    "nnx.state(model, nnx.Param); updates, opt_state = tx.update(clipped, "
    "opt_state, params); nnx.update(model, optax.apply_updates(params, "
    "updates)).")


def _has_clipped_sum_key(tree) -> bool:
  try:
    return "clipped_sum" in tree.keys()
  except (AttributeError, TypeError):
    return False


def _refuse_params_shaped(updates, params) -> None:
  """ValueError if `updates` is not per-example but a stripped or averaged tree.

  A tree shaped exactly like `params` (no batch axis) is either batch-averaged
  gradients or the arrays of a `ClippedGrads` whose wrapper was stripped on
  the way here (a tree_map, nnx.Optimizer); an nnx.State with a
  `clipped_sum` entry is a `ClippedGrads` that `nnx.state` flattened. The
  message says what happened and what to do.
  """
  if _is_nnx_state(updates) and _has_clipped_sum_key(updates):
    raise ValueError(
        "dp_aggregate got an nnx.State holding 'clipped_sum': a ClippedGrads "
        "from optax_dp.clipped_grads that nnx turned into a State. " + _NNX_STRIPPED)
  if params is None:
    return
  if jax.tree.structure(updates) != jax.tree.structure(params) or any(
      jnp.shape(u) != jnp.shape(p)
      for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params))):
    return
  if _is_nnx_state(updates):
    origin = (
        "It is an nnx.State: if it came from optax_dp.clipped_grads, "
        + _NNX_STRIPPED + " If it came from nnx.grad, those are batch-averaged "
        "gradients: use per-example gradients instead.")
  else:
    origin = (
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
      "batch axis: not per-example gradients, and not a ClippedGrads. " + origin)


def _check_against_params(per_example_grads, params) -> None:
  """Checks per-example grads have shape (B, *param.shape) for every param."""
  g_def = jax.tree.structure(per_example_grads)
  p_def = jax.tree.structure(params)
  if g_def != p_def and isinstance(params, optax.LookaheadParams):
    raise ValueError(
        "dp_aggregate got optax.LookaheadParams as params: it runs inside "
        "optax.chain after optax.lookahead's params were handed to the chain. "
        "optax.lookahead must wrap the whole DP optimizer, so that the DP step "
        "sees the fast params: optax.lookahead(optax.chain(optax_dp."
        "dp_aggregate(...), optax.sgd(...)), sync_period, slow_step_size) "
        "(or optax.lookahead(optax_dp.dpsgd(...), ...)).")
  if g_def != p_def:
    raise ValueError(
        "dp_aggregate: the gradient tree does not match the params tree "
        f"(grads {g_def} vs params {p_def}).")
  for (path, g), p in zip(jax.tree_util.tree_flatten_with_path(per_example_grads)[0],
                          jax.tree.leaves(params)):
    if tuple(jnp.shape(g)[1:]) != tuple(jnp.shape(p)):
      raise ValueError(
          f"dp_aggregate: gradient leaf {jax.tree_util.keystr(path)} has shape "
          f"{jnp.shape(g)}, but per-example gradients of a parameter of shape "
          f"{jnp.shape(p)} must have shape (batch, *{tuple(jnp.shape(p))}). "
          "Pass per-example gradients (optax_dp.per_example_grads), and put "
          "dp_aggregate first in optax.chain.")


# The numeric rules live in _clipping (one home); these names stay importable
# from here for the callers and tests that reach them through this module.
compute_dtype = _clipping.compute_dtype
per_example_sq_norms = _clipping.per_example_sq_norms
clip_factors = _clipping.clip_factors
clipped_sum = _clipping.clipped_sum
add_gaussian_noise = _clipping.add_gaussian_noise
_compute_dtype = _clipping.compute_dtype


def dp_aggregate(
    l2_norm_clip: float,
    noise_multiplier: Optional[float] = None,
    key: Optional[_keys.KeyLike] = None,
    *,
    expected_batch_size: Optional[int] = None,
    rescale_to_unit_norm: bool = False,
    budget: Optional[_budget.PrivacyBudget] = None,
    allow_budget_overrun: bool = False,
) -> optax.GradientTransformation:
  """DP-SGD's clip-sum-noise-normalise step, as an optax transformation.

  Takes *per-example* gradients: every leaf with the same leading batch axis
  `B` (use `optax_dp.per_example_grads`), or a `ClippedGrads` from
  `optax_dp.clipped_grads` (the fast path: the clipped sum computed without
  materialising per-example gradients), which must have been made with the same
  `l2_norm_clip`. For each example it scales its whole
  gradient (the global L2 norm over all leaves) to norm at most `l2_norm_clip`,
  sums over the batch, adds independent Gaussian noise of standard deviation
  `noise_multiplier * l2_norm_clip` to every coordinate of the sum, and divides
  by `expected_batch_size`. This is the Gaussian mechanism of DP-SGD (Abadi et
  al. 2016, arXiv 1607.00133).

  Privacy contract: with Poisson sampling at rate
  `q = expected_batch_size / dataset_size`, each update is a Poisson-subsampled
  Gaussian mechanism with noise multiplier `noise_multiplier` under add/remove
  adjacency, and `optax_dp.compute_epsilon(noise_multiplier, delta,
  dataset_size=..., batch_size=expected_batch_size, steps=state.step)` bounds
  the privacy loss of all updates released so far. This holds only if

  * it comes FIRST in `optax.chain` (anything before it sees raw per-example
    gradients and is not covered; anything after it is post-processing);
  * the batches are Poisson-sampled (`optax_dp.poisson_batches`) and padding
    examples are masked out (their gradients are zero);
  * `expected_batch_size` is the *expected* batch size `q * dataset_size`, a
    public constant, never the realised one (default: the static leading
    dimension `B`, right only for full-batch or fixed-size batches).

  Examples whose gradient is not finite (NaN or inf) contribute zero and are
  counted in `state.nonfinite_examples`.

  Complex parameters: `C^n` is treated as `R^2n`. An example's norm is
  `sqrt(sum |z|^2)`, and the real and the imaginary part of every coordinate
  each get noise of standard deviation `noise_multiplier * l2_norm_clip`: the
  real Gaussian mechanism, with the same accounting.

  Composition: wrappers that would see, average, reshape or pass through the
  raw per-example gradients (`optax.masked`, `optax.multi_transform`,
  `optax.apply_if_finite`, `optax.MultiSteps`, `optax.flatten`, the
  conditional wrappers) are refused around it with the composition that works
  (almost always: put them after it in `optax.chain`).

  Noise is fresh on every update: update t draws from `fold_in(key, t)`, split
  into one subkey per leaf. The state holds that key's data next to the step
  counter; an update whose state key does not match `fold_in(key, step)` (a
  state restored from another run, or with its key and counter out of step)
  raises `NoiseReplayError` instead of replaying or mixing noise streams.

  Budget: with `budget=optax_dp.privacy_budget(...)`, the noise multiplier and
  `expected_batch_size` come from the budget (its sampler), and an update
  past `budget.max_steps` raises `PrivacyBudgetExceededError`, also inside
  `jax.jit` (a host callback; where callbacks cannot run, the refused
  update is NaN, which releases nothing). With `allow_budget_overrun=True` the
  updates continue and `budget.epsilon_spent(state)` grows past the target. Clipping, summation and noise run in float32
  (or wider) even for bfloat16/float16 gradients; the result is cast back to
  each leaf's dtype (post-processing, so privacy is unaffected).

  Args:
    l2_norm_clip: the bound `C > 0` on each example's global gradient norm.
    noise_multiplier: `sigma >= 0`; the noise std is `sigma * C`. 0 gives a
      non-private run and warns loudly. Omit it when passing `budget`.
    key: the PRNG key for the noise (required): a `jax.random.key`, a legacy
      `uint32[2]` key (the same noise as `jax.random.wrap_key_data` of it), or
      an int seed (the same noise as `jax.random.key(seed)`). Use a key that
      nothing else uses, and keep it secret: whoever knows it can regenerate
      the noise. Two live noisy transforms that release from the same key
      warn (`NoiseKeyReuseWarning`, a `UserWarning`): both add identical
      noise, which cancels in the difference of their outputs. A rebuild that
      replaces a transform (the old one discarded) does not warn.
    expected_batch_size: the public normaliser; see above. Omit it when
      passing `budget` (the budget's sampler fixes it).
    rescale_to_unit_norm: also divide the result by `l2_norm_clip`, as if each
      example were clipped to norm 1 (De et al. 2022, arXiv 2204.13650): the
      learning rate then need not be retuned when the clip changes. A public
      rescaling, so privacy is unchanged. jax_privacy's Flax tutorial uses it.
    budget: an `optax_dp.PrivacyBudget`; see above.
    allow_budget_overrun: continue past `budget.max_steps` (the epsilon
      reported by `budget.epsilon_spent` then exceeds the budget's target).

  Returns:
    An `optax.GradientTransformation` whose state is a `DPAggregateState`.

  Raises:
    ValueError: for `l2_norm_clip <= 0`, `noise_multiplier < 0`, a bad key or
      `expected_batch_size`; at update time, for gradients without a common
      leading batch axis or whose shapes do not match `params`.
  """
  _refuse_traced(l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
                 key=key, expected_batch_size=expected_batch_size)
  l2_norm_clip = _check_positive_finite("l2_norm_clip", l2_norm_clip)
  noise_multiplier, expected_batch_size, max_steps = _resolve_budget(
      noise_multiplier, expected_batch_size, budget, allow_budget_overrun)
  noise_multiplier = _check_noise_multiplier(noise_multiplier)
  expected_batch_size = _check_expected_batch_size(expected_batch_size)
  if key is None:
    raise ValueError(
        "dp_aggregate needs key=: the PRNG key of the noise (a jax.random.key or "
        "an int seed that nothing else uses).")
  with jax.ensure_compile_time_eval():  # concrete even when built inside jit
    key = _keys.as_typed_key(key)
  key_impl = jax.random.key_impl(key)
  noise_std = noise_multiplier * l2_norm_clip
  rescale = l2_norm_clip if rescale_to_unit_norm else 1.0
  # NoiseKeyReuseWarning if another live transform built from this key has
  # released updates when this one releases (see _keys.py for the rule).
  stream = (_keys.noise_stream(key, f"dp_aggregate(l2_norm_clip={l2_norm_clip:g}, "
                               f"noise_multiplier={noise_multiplier:g})")
            if noise_std > 0 else None)

  def key_data_at(step):
    return jax.random.key_data(jax.random.fold_in(key, step))

  def init_fn(params):
    del params
    step = jnp.zeros([], jnp.int32)
    return DPAggregateState(noise_key=key_data_at(step), step=step,
                            nonfinite_examples=jnp.zeros([], jnp.int32))

  def guard(state):
    """Checks the ledger before releasing update number `state.step`."""
    key_ok = jnp.all(jnp.asarray(state.noise_key) == key_data_at(state.step))
    _checks.raise_if(
        ~key_ok, NoiseReplayError,
        "dp_aggregate: the optimizer state's noise key does not match this "
        "transformation's key at the state's step counter. The state comes "
        "from another run (a different key or seed), or its key and step were "
        "restored from different points. Continuing would replay or mix noise "
        "streams, which breaks the privacy guarantee. Restore the whole "
        "optimizer state of this run, and build dp_aggregate with that run's key.")
    ok = key_ok
    if max_steps is not None:
      within = state.step < max_steps
      _checks.raise_if(
          ~within, _budget.PrivacyBudgetExceededError,
          f"dp_aggregate: the privacy budget allows {max_steps} noisy steps "
          f"(epsilon {budget.epsilon():.4g} at delta {budget.target_delta:g}); "
          f"refusing step {max_steps + 1} and later ones. Stop training, or pass allow_budget_overrun=True to dp_aggregate to "
          "continue and report the larger epsilon (budget.epsilon_spent(state)).")
      ok = ok & within
    return ok

  def update_fn(updates, state, params=None):
    if stream is not None:
      _keys.note_release(stream, stacklevel=2)
    _check_composition(updates)
    if isinstance(updates, _clipped.ClippedGrads):
      summed, num_nonfinite, batch_size, dtypes = _from_clipped(updates, params)
    else:
      _refuse_params_shaped(updates, params)
      batch_size = batch_size_of(updates)
      if params is not None:
        _check_against_params(updates, params)
      summed, _, num_nonfinite = _clipping.clip_and_sum_rows(updates, l2_norm_clip)
      dtypes = jax.tree.map(lambda g: g.dtype, updates)
    ok = guard(state)
    noise_key = jax.random.wrap_key_data(jnp.asarray(state.noise_key), impl=key_impl)
    noised, _ = add_gaussian_noise(summed, noise_key, noise_std)
    if expected_batch_size is None and batch_size is None:
      raise ValueError(
          "dp_aggregate under dp_accumulate needs expected_batch_size= (the "
          "expected LOGICAL batch size, a public constant) or budget=: the "
          "accumulated batch has no static size to fall back on.")
    normaliser = (expected_batch_size or batch_size) * rescale
    out = jax.tree.map(
        lambda s, d: jnp.where(ok, s / normaliser, jnp.nan).astype(d), noised, dtypes)
    step = state.step + 1
    new_state = DPAggregateState(
        noise_key=key_data_at(step),
        step=step,
        nonfinite_examples=state.nonfinite_examples + num_nonfinite)
    return out, new_state

  def _from_clipped(clipped, params):
    # Equal in float32 counts as equal: the clip is applied in float32, and
    # optax.inject_hyperparams stores C as a float32 array (0.1 -> 0.10000000149).
    if np.float32(clipped.l2_norm_clip) != np.float32(l2_norm_clip):
      raise ValueError(
          f"dp_aggregate(l2_norm_clip={l2_norm_clip}) got a clipped sum made "
          f"with l2_norm_clip={clipped.l2_norm_clip}: the noise would not match "
          "the sensitivity. Use the same l2_norm_clip in clipped_grads and "
          "dp_aggregate.")
    summed = clipped.clipped_sum
    if params is not None:
      if jax.tree.structure(summed) != jax.tree.structure(params):
        raise ValueError("dp_aggregate: the clipped sum's tree does not match params.")
      for s, p in zip(jax.tree.leaves(summed), jax.tree.leaves(params)):
        if jnp.shape(s) != jnp.shape(p):
          raise ValueError(
              f"dp_aggregate: clipped sum leaf of shape {jnp.shape(s)} for a "
              f"parameter of shape {jnp.shape(p)}.")
    dtypes = jax.tree.map(_clipping.leaf_dtype, summed if params is None else params)
    summed = jax.tree.map(lambda s: s.astype(_compute_dtype(s.dtype)), summed)
    return summed, clipped.nonfinite_examples, clipped.batch_size, dtypes

  return optax.GradientTransformation(init_fn, update_fn)


def dpsgd(
    learning_rate: optax.ScalarOrSchedule,
    l2_norm_clip: float,
    noise_multiplier: Optional[float] = None,
    key: Optional[_keys.KeyLike] = None,
    *,
    momentum: Optional[float] = None,
    nesterov: bool = False,
    expected_batch_size: Optional[int] = None,
    rescale_to_unit_norm: bool = False,
    budget: Optional[_budget.PrivacyBudget] = None,
    allow_budget_overrun: bool = False,
) -> optax.GradientTransformation:
  """DP-SGD: `optax.chain(dp_aggregate(...), optax.sgd(...))`.

  See `dp_aggregate` for the privacy contract and the arguments it shares;
  `learning_rate`, `momentum` and `nesterov` are those of `optax.sgd`.
  """
  return optax.chain(
      dp_aggregate(l2_norm_clip, noise_multiplier, key,
                   expected_batch_size=expected_batch_size,
                   rescale_to_unit_norm=rescale_to_unit_norm, budget=budget,
                   allow_budget_overrun=allow_budget_overrun),
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))
