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
import optax

from optax_dp import _budget
from optax_dp import _checks
from optax_dp import _clipped
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


def _check_positive_finite(name: str, value: Any) -> float:
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number, got {value!r}.") from None
  if not math.isfinite(value) or value <= 0:
    raise ValueError(
        f"{name} must be a finite number > 0, got {value}. It bounds each "
        "example's influence: pick the scale of typical gradient norms "
        "(e.g. 0.1 to 1.0).")
  return value


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


def _check_expected_batch_size(expected_batch_size: Any) -> Optional[int]:
  if expected_batch_size is None:
    return None
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
    raise ValueError("dp_aggregate got an empty gradient tree.")
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


def _check_against_params(per_example_grads, params) -> None:
  """Checks per-example grads have shape (B, *param.shape) for every param."""
  g_def = jax.tree.structure(per_example_grads)
  p_def = jax.tree.structure(params)
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


def _compute_dtype(dtype) -> jnp.dtype:
  """Clipping, summing and noise run in at least float32 (see bf16 note)."""
  return jnp.promote_types(dtype, jnp.float32)


def per_example_sq_norms(per_example_grads: chex.ArrayTree) -> jax.Array:
  """Squared global L2 norm of each example's gradient, in float32 or wider."""
  sq = [jnp.sum(jnp.square(g.astype(_compute_dtype(g.dtype))),
                axis=tuple(range(1, g.ndim))).astype(jnp.float32)
        for g in jax.tree.leaves(per_example_grads)]
  return sum(sq[1:], sq[0])


def clip_factors(sq_norms: jax.Array, l2_norm_clip: float) -> jax.Array:
  """Per-example scale factors `min(1, C / ||g_i||)`, 0 for non-finite norms.

  An example whose squared norm is NaN or inf contributes nothing: its factor is
  0 (and `clipped_sum` replaces its gradient by zeros so that 0 * NaN cannot
  poison the sum). Dropping an example is within the sensitivity bound, so the
  privacy guarantee is unchanged; a NaN in the output would instead reveal that
  some example produced one.
  """
  finite = jnp.isfinite(sq_norms)
  norms = jnp.sqrt(jnp.where(finite, sq_norms, 0.0))
  tiny = jnp.finfo(jnp.float32).tiny
  factors = jnp.minimum(1.0, l2_norm_clip / jnp.maximum(norms, tiny))
  return jnp.where(finite, factors, 0.0)


def clipped_sum(per_example_grads: chex.ArrayTree, factors: jax.Array) -> chex.ArrayTree:
  """`sum_i factors[i] * g_i` per leaf, in the compute dtype.

  Rows with factor 0 (non-finite examples) are replaced by zeros first, so that
  0 * NaN cannot poison the sum. The `where` fuses into the producer of the
  per-example gradients; a `lax.cond` around the whole tree instead made XLA
  materialise the largest per-example gradient twice (measured in benchmarks/).
  """

  def weighted_sum(g):
    ct = _compute_dtype(g.dtype)
    keep = (factors > 0).reshape((-1,) + (1,) * (g.ndim - 1))
    g = jnp.where(keep, g.astype(ct), jnp.zeros((), ct))
    return jnp.tensordot(factors.astype(ct), g, axes=1)

  return jax.tree.map(weighted_sum, per_example_grads)


def add_gaussian_noise(tree: chex.ArrayTree, key: jax.Array, stddev: float
                       ) -> tuple[chex.ArrayTree, jax.Array]:
  """Adds independent N(0, stddev^2) to every coordinate of `tree`.

  Splits `key` into one subkey per leaf plus the key to carry forward, so no
  two leaves and no two steps share noise (the mistake of jax#3646). Noise is
  drawn in the leaf's compute dtype (float32 or wider).

  Returns:
    (noised tree, next key).
  """
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves) + 1)
  if stddev == 0:
    return tree, keys[0]
  noised = [leaf + stddev * jax.random.normal(k, leaf.shape, leaf.dtype)
            for leaf, k in zip(leaves, keys[1:])]
  return jax.tree.unflatten(treedef, noised), keys[0]


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
      the noise. Building a second noisy `dp_aggregate` from the same key in
      one process warns (`NoiseKeyReuseWarning`, a `UserWarning`): both would
      add identical noise, which cancels in the difference of their outputs.
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
  l2_norm_clip = _check_positive_finite("l2_norm_clip", l2_norm_clip)
  noise_multiplier, expected_batch_size, max_steps = _resolve_budget(
      noise_multiplier, expected_batch_size, budget, allow_budget_overrun)
  noise_multiplier = _check_noise_multiplier(noise_multiplier)
  expected_batch_size = _check_expected_batch_size(expected_batch_size)
  if key is None:
    raise ValueError(
        "dp_aggregate needs key=: the PRNG key of the noise (a jax.random.key or "
        "an int seed that nothing else uses).")
  key = _keys.as_typed_key(key)
  key_impl = jax.random.key_impl(key)
  noise_std = noise_multiplier * l2_norm_clip
  rescale = l2_norm_clip if rescale_to_unit_norm else 1.0
  if noise_std > 0:
    # Warns (NoiseKeyReuseWarning) if another noisy dp_aggregate of this
    # process was built from the same key: the two would add identical noise,
    # which cancels in the difference of their outputs. See _keys.py.
    _keys.register_noise_key(
        key, f"dp_aggregate(l2_norm_clip={l2_norm_clip:g}, "
        f"noise_multiplier={noise_multiplier:g})", stacklevel=2)

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
    if isinstance(updates, _clipped.ClippedGrads):
      summed, num_nonfinite, batch_size, dtypes = _from_clipped(updates, params)
    else:
      batch_size = batch_size_of(updates)
      if params is not None:
        _check_against_params(updates, params)
      sq_norms = per_example_sq_norms(updates)
      factors = clip_factors(sq_norms, l2_norm_clip)
      num_nonfinite = jnp.sum(~jnp.isfinite(sq_norms), dtype=jnp.int32)
      summed = clipped_sum(updates, factors)
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
    if clipped.l2_norm_clip != l2_norm_clip:
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
    dtypes = jax.tree.map(lambda s: s.dtype, summed if params is None else params)
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
