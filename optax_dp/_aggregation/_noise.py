"""Noise sources of the Gaussian mechanism: i.i.d. or correlated across steps.

`dp_aggregate` adds noise to the clipped sum through one `NoiseSource`, chosen
once when the transformation is built:

* `iid()`: DP-SGD's independent `N(0, std^2)` on every coordinate, fresh at
  every step (Abadi et al. 2016);
* `bandmf(strategy)`: DP-BandMF's `(C^{-1} z)_t`, the same i.i.d. draws `z`
  correlated across steps through a banded strategy matrix `C`
  (`optax_dp._aggregation._correlated`; Choquette-Choo et al. 2023).

Both are the same shape, as jax_privacy's privatizers are: i.i.d. noise is the
correlated noise of the identity strategy. A source has `init(params)` (its
state), `add(summed, key, std, state)` (the noised sum and the next state) and
`checks(step, state)`, the ledger entries it needs before a release (a BandMF
strategy has rows for a fixed number of steps, and its buffers must be at the
step counter).

Privacy contract: `add` adds, to every real coordinate of `summed`, noise
whose marginal per step is `N(0, std^2)` times the strategy's column (norm 1);
`key` is only read, and the caller derives a fresh one for every release.

References:
  Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar & Zhang 2016, "Deep
  Learning with Differential Privacy", https://arxiv.org/abs/1607.00133.
  Choquette-Choo, Ganesh, McKenna, McMahan, Rush, Thakurta & Xu 2023,
  "(Amplified) Banded Matrix Factorization: A unified approach to private
  training", https://arxiv.org/abs/2306.08153.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from optax_dp._core import _checks
from optax_dp._core import _devices
from optax_dp._clip import _clipping
from optax_dp._aggregation import _correlated


def gaussian_noise(tree: chex.ArrayTree, key: jax.Array, stddev: float) -> chex.ArrayTree:
  """Independent N(0, stddev^2) for every (real) coordinate of `tree`: a tree
  of `tree`'s structure, shapes and dtypes (`stddev > 0`).

  One draw of `N(0, 1)` per real dtype (from `fold_in(key, j)` for the j-th
  dtype, all those keys derived in one call), as long as all coordinates of
  that dtype together, cut into disjoint pieces, one per leaf (a complex leaf
  takes two: its real and imaginary parts): no two coordinates, leaves or
  steps share noise (the mistake of jax#3646), and XLA compiles one
  random-number kernel instead of one per leaf (which cost seconds of compile
  time). Noise is drawn in the leaf's dtype (callers pass the compute dtype,
  float32 or wider). `key` is only read, never returned: the caller derives a
  fresh one for every release.
  """
  mesh = _devices.explicit_split_mesh(tree)
  if mesh is not None:   # drawn where each split leaf lives, not whole on every device
    return _devices.with_auto_axes(
        gaussian_noise, mesh, lambda t, *_: _devices.shardings_of(t, mesh))(
            tree, key, jnp.asarray(stddev))
  leaves, treedef = jax.tree.flatten(tree)
  reals = [jnp.real(leaf).dtype if jnp.iscomplexobj(leaf) else jnp.result_type(leaf)
           for leaf in leaves]
  parts = [2 if jnp.iscomplexobj(leaf) else 1 for leaf in leaves]
  dtypes = list(dict.fromkeys(reals))
  draw_keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(len(dtypes)))
  noises = [None] * len(leaves)
  for j, dtype in enumerate(dtypes):
    members = [i for i, d in enumerate(reals) if d == dtype]
    total = sum(parts[i] * math.prod(jnp.shape(leaves[i])) for i in members)
    draw = stddev * jax.random.normal(draw_keys[j], (total,), dtype)
    start = 0
    for i in members:
      shape, size = jnp.shape(leaves[i]), math.prod(jnp.shape(leaves[i]))
      noise = draw[start:start + size].reshape(shape)
      if parts[i] == 2:
        noise = noise + 1j * draw[start + size:start + 2 * size].reshape(shape)
      start += parts[i] * size
      noises[i] = noise.astype(jnp.result_type(leaves[i]))
  return jax.tree.unflatten(treedef, noises)


def add_gaussian_noise(tree: chex.ArrayTree, key: jax.Array, stddev: float
                       ) -> chex.ArrayTree:
  """`tree` plus `gaussian_noise(tree, key, stddev)`: independent
  N(0, stddev^2) added to every (real) coordinate; `tree` itself when
  `stddev` is the number 0 (a traced `stddev` always draws)."""
  if isinstance(stddev, (int, float)) and stddev == 0:
    return tree
  return jax.tree.map(jnp.add, tree, gaussian_noise(tree, key, stddev))


# One ledger entry: (refuse when this holds, the error, its message).
Check = tuple[Any, type, str]


class NoiseSource(NamedTuple):
  """How the noise of each release is made (see the module docstring).

  Attributes:
    init: `params -> state`, the source's part of the optimizer state.
    add: `(summed, key, std, state) -> (summed + noise, next state)`.
    checks: `(step, state) -> [Check]`, what must hold before a release.
  """
  init: Callable[[Any], Any]
  add: Callable[[Any, jax.Array, Any, Any], tuple[Any, Any]]
  checks: Callable[[jax.Array, Any], list[Check]]


def iid() -> NoiseSource:
  """DP-SGD's noise: independent `N(0, std^2)` on every coordinate, every
  step (the identity strategy: no state, nothing to check).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> noised, _ = iid().add({"w": jnp.zeros(3)}, jax.random.key(0), 1.0, ())
    >>> noised["w"].shape
    (3,)
  """
  return NoiseSource(
      init=lambda params: (),
      add=lambda summed, key, std, state: (add_gaussian_noise(summed, key, std), ()),
      checks=lambda step, state: [])


def bandmf(strategy: Any) -> NoiseSource:
  """DP-BandMF's noise: update t adds `(C^{-1} z)_t` for the i.i.d. draws `z`
  that `iid()` would add (same key, same std) and the banded `strategy`
  (`optax_dp.bandmf_strategy`); its state is `bands` buffers per parameter
  leaf, and step `strategy.n + 1` is refused (the strategy has no row for it).

  Examples:
    >>> import jax, jax.numpy as jnp, optax_dp
    >>> source = bandmf(optax_dp.bandmf_strategy(3, 1))
    >>> state = source.init({"w": jnp.zeros(2)})
    >>> noised, state = source.add({"w": jnp.zeros(2)}, jax.random.key(0), 1.0, state)
    >>> noised["w"].shape
    (2,)
  """
  def init(params):
    return _correlated.init_noise_state(strategy, jax.tree.map(
        lambda p: jnp.zeros(jnp.shape(p), _clipping.compute_dtype(jnp.result_type(p))),
        params))

  def add(summed, key, std, state):
    correlated, state = _correlated.correlate(
        strategy, gaussian_noise(summed, key, std), state)
    return jax.tree.map(jnp.add, summed, correlated), state

  def checks(step, state):
    return [
        (step >= strategy.n, _checks.PrivacyBudgetExceededError,
         f"dp_aggregate: the DP-BandMF noise strategy covers {strategy.n} steps; "
         f"refusing step {strategy.n + 1} and later ones (it has no rows past "
         "them)."),
        (_correlated.noise_index(state) != step, _checks.NoiseReplayError,
         "dp_aggregate: the DP-BandMF noise buffers of the optimizer state are "
         "not at its step counter (restored from a different point, or another "
         "run). Restore the whole optimizer state of this run."),
    ]

  return NoiseSource(init=init, add=add, checks=checks)


def noise_source(strategy: Any, noise_multiplier: float) -> NoiseSource:
  """DP-BandMF's source for a strategy, else (and at sigma 0, where there is
  no noise to correlate) i.i.d. noise."""
  if strategy is not None and noise_multiplier > 0:
    return bandmf(strategy)
  return iid()
