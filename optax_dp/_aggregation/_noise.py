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
from jax.extend.random import threefry2x32_p
import jax.numpy as jnp
import numpy as np

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
  # On a mesh of several devices each leaf's piece of the draw is computed
  # where the leaf lives (`_stream_normal`: the same values), instead of the
  # whole draw on every device and then moved.
  in_place = _devices.on_mesh(tree) and _is_threefry(key) and all(
      _stream_normal_supports(d, math.prod(jnp.shape(leaf)))
      for d, leaf in zip(reals, leaves))
  noises = [None] * len(leaves)
  for j, dtype in enumerate(dtypes):
    members = [i for i, d in enumerate(reals) if d == dtype]
    total = sum(parts[i] * math.prod(jnp.shape(leaves[i])) for i in members)
    if not in_place:
      draw = stddev * jax.random.normal(draw_keys[j], (total,), dtype)
    start = 0
    for i in members:
      shape, size = jnp.shape(leaves[i]), math.prod(jnp.shape(leaves[i]))

      def piece(begin, shape=shape, size=size):
        if in_place:
          return stddev * _stream_normal(draw_keys[j], begin, shape, dtype)
        return draw[begin:begin + size].reshape(shape)

      noise = piece(start)
      if parts[i] == 2:
        noise = noise + 1j * piece(start + size)
      start += parts[i] * size
      noises[i] = noise.astype(jnp.result_type(leaves[i]))
  return jax.tree.unflatten(treedef, noises)


def _is_threefry(key: jax.Array) -> bool:
  """Whether `key` is a threefry2x32 key (a typed key, or a raw uint32[2]
  one under the default implementation), whose stream `_stream_normal`
  reproduces."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return str(jax.random.key_impl(key)) == "threefry2x32"
  return jnp.shape(key) == (2,) and jax.config.jax_default_prng_impl == "threefry2x32"


def _stream_normal_supports(dtype: Any, size: int) -> bool:
  return jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)) and size < 2 ** 32


def _stream_normal(key: jax.Array, start: int, shape: tuple[int, ...], dtype: Any
                   ) -> jax.Array:
  """`jax.random.normal(key, (total,), dtype)[start:start + size].reshape(shape)`
  with JAX's partitionable threefry (its default), bit for bit (float32 and
  float64, a threefry key, size < 2**32), computed from the coordinates'
  own counters: coordinate k of the flat draw is threefry2x32 of the key and
  the 64-bit counter k (as two uint32 halves), its bits turned into a
  uniform in (-1, 1) and then a normal as `jax.random.normal` does. Each
  device computes only the coordinates of its shard: nothing to gather or
  move. tests/test_noise_sources.py checks the equality."""
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  local = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in range(len(shape) - 1, -1, -1):
    local = local + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  low = local + jnp.uint32(start & 0xFFFFFFFF)
  if (start & 0xFFFFFFFF) + stride <= 2 ** 32:   # no carry within the leaf
    high = jnp.full(shape, start >> 32, jnp.uint32)
  else:
    high = jnp.uint32(start >> 32) + (low < local).astype(jnp.uint32)   # the carry
  bits1, bits2 = threefry2x32_p.bind(data[0], data[1], high, low)
  finfo = jnp.finfo(dtype)
  if finfo.bits == 32:
    bits, uint = bits1 ^ bits2, jnp.uint32
  else:
    uint = jnp.uint64
    bits = (bits1.astype(uint) << uint(32)) | bits2.astype(uint)
  mantissa = jax.lax.shift_right_logical(bits, jnp.asarray(finfo.bits - finfo.nmant, uint))
  one = jnp.asarray(np.array(1.0, dtype).view(uint), uint)
  floats = jax.lax.bitcast_convert_type(mantissa | one, dtype) - jnp.asarray(1.0, dtype)
  lowest = np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype), dtype=dtype)
  uniform = jax.lax.max(jnp.asarray(lowest, dtype),
                        floats * jnp.asarray(np.array(1.0, dtype) - lowest, dtype)
                        + jnp.asarray(lowest, dtype))
  return jnp.asarray(np.sqrt(2), dtype) * jax.lax.erf_inv(uniform)


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
