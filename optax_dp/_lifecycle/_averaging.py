"""Parameter averaging (EMA, Polyak) as the last link of the optimizer chain.

Averaging the iterates of DP-SGD and evaluating the average is one of the
cheapest accuracy gains in private training (De et al. 2022; Shejwalkar et
al. 2022): the noise of successive updates averages out. It is
*post-processing*: the average is a function of the released (noised)
parameters alone, so it costs no privacy, and the training updates pass
through unchanged (the epsilon of the run is that of the chain before it).

`ema_params(decay)` and `polyak_params(start_step)` are identity
`optax.GradientTransformation`s on the updates that keep, in their state, the
average of the parameters *after* each update (`params + updates`). Put them
last in the chain (inside `dp_accumulate`, whose micro-steps are not updates)
so that the updates they see are the final ones; read the average with
`averaged_params(opt_state)`, for a Linen `TrainState.opt_state` or an
`nnx.Optimizer`'s `opt_state`. The moment update is optax's
(`optax.tree_utils.tree_update_moment`).

References:
  De, Berrada, Hayes, Smith & Balle 2022, "Unlocking High-Accuracy
  Differentially Private Image Classification through Scale",
  https://arxiv.org/abs/2204.13650 (EMA of the DP-SGD iterates, with warm-up).
  Polyak & Juditsky 1992, "Acceleration of Stochastic Approximation by
  Averaging", SIAM J. Control Optim. 30(4).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_dp._core import _checks


class AveragedParamsState(NamedTuple):
  """State of `ema_params` / `polyak_params`.

  Attributes:
    count: int32, the updates seen.
    averaged: the average of the parameters after each update (the initial
      parameters until the first update counts).
  """
  count: jax.Array
  averaged: Any


def _averaging(weight_of_new: Callable[[jax.Array], jax.Array]
               ) -> optax.GradientTransformation:
  """Identity on the updates; `averaged <- (1 - w) averaged + w params_new`
  with `w = weight_of_new(count after this update)`."""

  def init_fn(params):
    return AveragedParamsState(count=jnp.zeros([], jnp.int32),
                               averaged=jax.tree.map(jnp.asarray, params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          "ema_params/polyak_params average the parameters: the optimizer must "
          "pass params to update (optax.apply_updates users: "
          "tx.update(grads, opt_state, params); TrainState and nnx.Optimizer do).")
    count = state.count + 1
    new_params = optax.apply_updates(params, updates)
    averaged = optax.tree_utils.tree_update_moment(
        new_params, state.averaged, 1.0 - weight_of_new(count), 1)
    averaged = jax.tree.map(lambda a, p: a.astype(jnp.result_type(p)), averaged, new_params)
    return updates, AveragedParamsState(count=count, averaged=averaged)

  return optax.GradientTransformation(init_fn, update_fn)


def ema_params(decay: float = 0.999, *, warmup: bool = True
               ) -> optax.GradientTransformation:
  """An exponential moving average of the parameters, as a chain link.

  After update t, `averaged = d_t * averaged + (1 - d_t) * params_t`, with
  `d_t = min(decay, (1 + t) / (10 + t))` if `warmup` (De et al. 2022: early
  iterates, far from the final ones, are forgotten quickly) else `decay`.

  Privacy contract: post-processing of the parameters the chain releases; no
  privacy cost, and the updates are returned unchanged. Place it last in the
  chain, so that `params + updates` is what the optimizer applies.

  Args:
    decay: in [0, 1).
    warmup: the warm-up schedule above.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_dp
    >>> tx = optax.chain(optax.sgd(1.0), optax_dp.ema_params(0.5, warmup=False))
    >>> params = {"w": jnp.zeros(())}
    >>> state = tx.init(params)
    >>> for _ in range(2):   # params 0 -> -1 -> -2 (gradient 1, lr 1)
    ...   updates, state = tx.update({"w": jnp.ones(())}, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> float(optax_dp.averaged_params(state)["w"])   # 0.5 * (0.5 * 0 - 0.5) - 1
    -1.25
  """
  decay = _checks.check_fraction("decay", decay)
  if not isinstance(warmup, bool):
    raise ValueError(f"warmup must be a bool, got {warmup!r}.")

  def weight_of_new(count):
    d = jnp.asarray(decay, jnp.float32)
    if warmup:
      t = count.astype(jnp.float32)
      d = jnp.minimum(d, (1.0 + t) / (10.0 + t))
    return 1.0 - d

  return _averaging(weight_of_new)


def polyak_params(start_step: int = 0) -> optax.GradientTransformation:
  """The uniform (Polyak-Ruppert) average of the parameters after updates
  `start_step + 1, start_step + 2, ...` (before then: the current parameters).

  Privacy contract: as `ema_params`'s (post-processing, updates unchanged,
  last in the chain).

  Examples:
    >>> import jax.numpy as jnp, optax, optax_dp
    >>> tx = optax.chain(optax.sgd(1.0), optax_dp.polyak_params())
    >>> params = {"w": jnp.zeros(())}
    >>> state = tx.init(params)
    >>> for _ in range(3):   # params -1, -2, -3
    ...   updates, state = tx.update({"w": jnp.ones(())}, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> float(optax_dp.averaged_params(state)["w"])
    -2.0
  """
  start_step = _checks.check_int("start_step", start_step, 0)

  def weight_of_new(count):
    averaged_steps = jnp.maximum(count - start_step, 1).astype(jnp.float32)
    return 1.0 / averaged_steps

  return _averaging(weight_of_new)


def averaged_params(opt_state: Any) -> Any:
  """The averaged parameters kept by the one `ema_params` or `polyak_params`
  in an optimizer state (a chain's, a Linen `TrainState.opt_state`, an
  `nnx.Optimizer.opt_state`), with the parameters' structure.

  Raises:
    ValueError: unless exactly one averaging state is found.
  """
  return _checks.find_one(
      opt_state, AveragedParamsState,
      "optax_dp.ema_params or optax_dp.polyak_params").averaged
