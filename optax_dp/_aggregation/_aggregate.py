"""DP-SGD's private aggregation step as an `optax.GradientTransformation`.

Clip each example's gradient, sum, add Gaussian noise, normalise by a public
constant: the Gaussian mechanism at the heart of DP-SGD (Abadi et al. 2016,
"Deep Learning with Differential Privacy", arXiv 1607.00133).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_dp._core import _checks
from optax_dp._clip import _clip_norms
from optax_dp._clip import _clip_policy
from optax_dp._clip import _clipping
from optax_dp._core import _composition
from optax_dp._core import _keys
from optax_dp._aggregation import _noise
from optax_dp._aggregation import _release
from optax_dp._core._checks import AdaptiveClipMismatchError  # re-exported
from optax_dp._core._checks import NoiseReplayError  # re-exported
from optax_dp._core._checks import PrivacyBudgetExceededError  # re-exported
from optax_dp._aggregation._release import Budget as _Budget


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
    noise_state: DP-BandMF only (`()` for DP-SGD): per parameter leaf, the
      streaming state of the correlated noise, `(index, buffers)` with
      `bands` buffers of the leaf's shape (`optax_dp._aggregation._correlated`). A
      function of the key and the steps so far; its index must equal `step`.
    clip_norm: adaptive clipping only (`()` otherwise): float32, the clip
      norm of the next update (`optax_dp.l2_norm_clip_of(opt_state)` reads
      it). A function of the released noisy counts: public.
  """
  noise_key: jax.Array
  step: jax.Array
  nonfinite_examples: jax.Array
  noise_state: Any = ()
  clip_norm: Any = ()


def adaptive_clip_norm(opt_state: Any) -> Any:
  """The adaptive clip norm of the `DPAggregateState`s in `opt_state` (the
  first found), or None if none clips adaptively."""
  for s in _checks.find_states(opt_state, DPAggregateState):
    clip = getattr(s.clip_norm, "value", s.clip_norm)   # nnx.Optimizer's wrapping
    if not (isinstance(clip, tuple) and not clip):
      return clip
  return None


def l2_norm_clip_of(opt_state: Any) -> Any:
  """The clip norm the next update of `dp_aggregate` takes, from an optimizer
  state that holds one `DPAggregateState` (a chain's, `dp_accumulate`'s,
  Linen `TrainState.opt_state`, or `nnx.Optimizer.opt_state`).

  For an adaptive clip (`optax_dp.AdaptiveClip`) a float32 scalar array that
  changes each step: pass it to the gradient function,
  `grad_fn(params, batch, mask, l2_norm_clip=l2_norm_clip_of(opt_state))`.
  Public (a function of released noisy counts), so it may be logged.

  Raises:
    ValueError: if the state holds no adaptive `DPAggregateState`, or more than one.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_dp
    >>> tx = optax.chain(optax_dp.dp_aggregate(
    ...     optax_dp.AdaptiveClip(initial_l2_norm_clip=2.0), noise_multiplier=1.0,
    ...     key=0, expected_batch_size=100), optax.sgd(0.1))
    >>> float(optax_dp.l2_norm_clip_of(tx.init({"w": jnp.zeros(2)})))
    2.0
  """
  found = _checks.find_states(opt_state, DPAggregateState)
  if len(found) != 1:
    raise ValueError(
        f"l2_norm_clip_of: the optimizer state holds {len(found)} dp_aggregate "
        "states; it needs exactly one.")
  clip = adaptive_clip_norm(found[0])
  if clip is None:
    raise ValueError(
        "l2_norm_clip_of: this dp_aggregate clips with a fixed l2_norm_clip, "
        "not an adaptive one (optax_dp.AdaptiveClip); its gradient function "
        "takes no l2_norm_clip= at call time.")
  return clip


def dp_aggregate(
    l2_norm_clip: _clip_norms.ClipNormLike,
    noise_multiplier: Optional[float] = None,
    key: Optional[_keys.KeyLike] = None,
    *,
    expected_batch_size: Optional[int] = None,
    rescale_to_unit_norm: bool = False,
    budget: Optional[_Budget] = None,
    allow_budget_overrun: bool = False,
    noise_strategy: Optional[Any] = None,
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

  Noise is fresh on every update: update t draws from `fold_in(key, t)`
  (one flat draw per dtype, cut into the leaves). The state holds that key's data next to the step
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
      Or group-wise: a pytree prefix of the params whose leaves are norms
      (`{"Dense_0": 0.3, "Dense_1": 0.4}`; `optax_dp.per_layer_clip_norms`
      builds one per layer): each group of parameters is clipped, per
      example, to its own norm `C_g`, and the noise std is
      `noise_multiplier * sqrt(sum_g C_g^2)`, the sensitivity of the sum (an
      example moves it by at most that), so the accounting is unchanged. Or
      adaptive: an `optax_dp.AdaptiveClip`, whose norm lives in this state
      (`clip_norm`) and follows a target quantile of the per-example norms
      through a privatised count of unclipped examples (Andrew et al. 2021).
      The gradient function must then be given the current norm each step,
      `l2_norm_clip=optax_dp.l2_norm_clip_of(opt_state)` (a sum clipped with
      another norm raises `AdaptiveClipMismatchError`). `noise_multiplier`
      (or the budget's) is then the effective multiplier `z` of the two
      Gaussian mechanisms together, one per step on the same batch: the
      gradients get `sigma = (z^-2 - (2 s)^-2)^-1/2` times the clip norm and
      the count (sensitivity 1/2) noise of std `s = count_noise_stddev`, so
      the accounting of `z` is that of what runs.
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
    rescale_to_unit_norm: also divide the result by `l2_norm_clip` (group-wise:
      by `sqrt(sum_g C_g^2)`; adaptive: by the step's clip norm), as if each
      example were clipped to norm 1 (De et al. 2022, arXiv 2204.13650): the
      learning rate then need not be retuned when the clip changes. A public
      rescaling, so privacy is unchanged. jax_privacy's Flax tutorial uses it.
    budget: an `optax_dp.PrivacyBudget`; see above.
    allow_budget_overrun: continue past `budget.max_steps` (the epsilon
      reported by `budget.epsilon_spent` then exceeds the budget's target).
      Refused with DP-BandMF (its strategy has no rows past them).
    noise_strategy: DP-BandMF's correlated noise instead of independent noise:
      a strategy from `optax_dp.bandmf_strategy(steps, bands)`. Update t then
      adds `(C^{-1} z)_t`, for the i.i.d. draws `z` DP-SGD would add (same
      key, same scale) and the banded strategy matrix `C` (column norm 1);
      the state carries `bands` buffers of the parameters' size; step
      `steps + 1` is refused. Leave it out with a budget: a budget whose
      sampler is `optax_dp.CyclicPoissonSampler(..., bands=B)` builds the
      strategy for its `max_steps` and B bands, the mechanism its epsilon is
      about (`bands=1`: DP-SGD's noise, bit for bit). Without a budget,
      account with that sampler yourself (`compute_epsilon(...,
      sampler=CyclicPoissonSampler(...))`): BandMF's epsilon is right only
      for cyclic Poisson batches (Choquette-Choo et al. 2023).

  Returns:
    An `optax.GradientTransformation` whose state is a `DPAggregateState`.

  Raises:
    ValueError: for `l2_norm_clip <= 0`, `noise_multiplier < 0`, a bad key or
      `expected_batch_size`; at update time, for gradients without a common
      leading batch axis or whose shapes do not match `params`, and for the
      optax wrappers that break the contract around it.

  References:
    Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar & Zhang 2016, "Deep
    Learning with Differential Privacy", https://arxiv.org/abs/1607.00133.
    De, Berrada, Hayes, Smith & Balle 2022, "Unlocking High-Accuracy
    Differentially Private Image Classification through Scale",
    https://arxiv.org/abs/2204.13650 (`rescale_to_unit_norm`).
    Choquette-Choo, Ganesh, McKenna, McMahan, Rush, Thakurta & Xu 2023,
    "(Amplified) Banded Matrix Factorization: A unified approach to private
    training", https://arxiv.org/abs/2306.08153 (`noise_strategy`).
    McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private
    Recurrent Language Models", https://arxiv.org/abs/1710.06963 (group-wise,
    per-layer clipping).
    Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private
    Learning with Adaptive Clipping", https://arxiv.org/abs/1905.03871
    (`AdaptiveClip`).

  Examples:
    >>> import jax.numpy as jnp, optax_dp
    >>> tx = optax_dp.dp_aggregate(l2_norm_clip=1.0, noise_multiplier=1.1,
    ...                            key=0, expected_batch_size=4)
    >>> params = {"w": jnp.zeros(3)}
    >>> per_example = {"w": jnp.ones((4, 3))}   # 4 examples, each of norm 1.73
    >>> update, state = tx.update(per_example, tx.init(params), params)
    >>> update["w"].shape, int(state.step)
    ((3,), 1)
  """
  # The key may be traced (it only seeds the noise); the parameters the noise
  # scale and the accounting depend on may not.
  # (The clip norm is checked, once, by its policy.)
  _checks.refuse_traced("dp_aggregate", noise_multiplier=noise_multiplier,
                        expected_batch_size=expected_batch_size)
  noise_multiplier, expected_batch_size, max_steps, strategy = _release.resolve(
      noise_multiplier, expected_batch_size, budget, allow_budget_overrun,
      noise_strategy)
  key = _release.typed_key(key)
  # The three parts, each chosen once here: the clip, the noise, the ledger.
  policy = _clip_policy.clip_policy(l2_norm_clip, noise_multiplier, expected_batch_size,
                                    correlated=strategy is not None)
  source = _noise.noise_source(strategy, noise_multiplier)
  budget_checks = _release.budget_checks(max_steps, budget)
  # What one clipped term must be (checked on every update): the budget's unit.
  privacy_unit = None if budget is None else budget.sampler.privacy_unit
  # NoiseKeyReuseWarning if another live transform built from this key has
  # released updates when this one releases (see _keys.py for the rule).
  stream = _keys.noise_stream(key, (
      f"dp_aggregate(l2_norm_clip={policy.clip}, noise_multiplier={noise_multiplier:g})"
  )) if noise_multiplier > 0 else None

  def init_fn(params):
    step = jnp.zeros([], jnp.int32)
    return DPAggregateState(
        noise_key=_keys.step_key_data(key, step), step=step,
        nonfinite_examples=jnp.zeros([], jnp.int32),
        noise_state=source.init(params), clip_norm=policy.init(params))

  def update_fn(updates, state, params=None):
    if stream is not None:
      _keys.note_release(stream, stacklevel=2)
    _composition.check_composition(updates)
    # One path: raw per-example gradients become a ClippedGrads on entry.
    updates, dtypes = _release.incoming(updates, params, privacy_unit)
    clipped = policy.take(updates, params, state.clip_norm)
    step_key, next_key_data = _keys.step_keys(key, state.step)
    ok = _release.guard(   # the ledger, walked before the release
        _release.replay_check(state, jax.random.key_data(step_key))
        + policy.checks(state.clip_norm, clipped)
        + budget_checks(state.step)
        + source.checks(state.step, state.noise_state))
    grad_key, count_key = policy.split(step_key)
    noised, noise_state = source.add(
        jax.tree.map(lambda s: s.astype(_clipping.compute_dtype(s.dtype)),
                     clipped.clipped_sum),
        grad_key, policy.noise_std(state.clip_norm), state.noise_state)
    normaliser = _release.normaliser(expected_batch_size, clipped.batch_size) * (
        policy.unit(state.clip_norm) if rescale_to_unit_norm else 1.0)
    return jax.tree.map(
        lambda s, d: jnp.where(ok, s / normaliser, jnp.nan).astype(d),
        noised, dtypes), DPAggregateState(
            noise_key=next_key_data, step=state.step + 1,
            nonfinite_examples=state.nonfinite_examples + clipped.nonfinite_examples,
            noise_state=noise_state,
            clip_norm=policy.next(state.clip_norm, clipped, count_key))

  return optax.GradientTransformation(init_fn, update_fn)


def dpsgd(
    learning_rate: optax.ScalarOrSchedule,
    l2_norm_clip: _clip_norms.ClipNormLike,
    noise_multiplier: Optional[float] = None,
    key: Optional[_keys.KeyLike] = None,
    *,
    momentum: Optional[float] = None,
    nesterov: bool = False,
    # dp_aggregate's keywords, spelled out (not **options): optax's
    # inject_hyperparams reads this signature to inject or fix them.
    expected_batch_size: Optional[int] = None,
    rescale_to_unit_norm: bool = False,
    budget: Optional[_Budget] = None,
    allow_budget_overrun: bool = False,
    noise_strategy: Optional[Any] = None,
) -> optax.GradientTransformation:
  """DP-SGD: `optax.chain(dp_aggregate(...), optax.sgd(...))`.

  See `dp_aggregate` for the privacy contract and the arguments it shares
  (`l2_norm_clip`, `noise_multiplier`, `key`, `expected_batch_size`,
  `rescale_to_unit_norm`, `budget`, `allow_budget_overrun`,
  `noise_strategy`: every keyword it takes); `learning_rate`, `momentum` and
  `nesterov` are
  those of `optax.sgd` (the SGD step after the noise is post-processing: it
  costs no privacy).

  References:
    Abadi et al. 2016, "Deep Learning with Differential Privacy",
    https://arxiv.org/abs/1607.00133 (Algorithm 1).

  Examples:
    >>> import jax.numpy as jnp, optax, optax_dp
    >>> tx = optax_dp.dpsgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.1, key=0,
    ...                     expected_batch_size=4)
    >>> params = {"w": jnp.zeros(3)}
    >>> updates, _ = tx.update({"w": jnp.ones((4, 3))}, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"].shape
    (3,)
  """
  return optax.chain(
      dp_aggregate(l2_norm_clip, noise_multiplier, key,
                   expected_batch_size=expected_batch_size,
                   rescale_to_unit_norm=rescale_to_unit_norm, budget=budget,
                   allow_budget_overrun=allow_budget_overrun,
                   noise_strategy=noise_strategy),
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))
