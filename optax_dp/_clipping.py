"""Per-example clipping rules, framework-neutral: norms, factors, sums, noise.

The one home of the arithmetic every clipping path shares (per-example
gradients in `dp_aggregate` and `clip_and_sum`, the book-keeping rules of
`_ghost`, `clipped_grads`, accumulation, sharding). Nothing here knows about
optax or Flax.

Complex parameters: `C^n` is treated as `R^2n` (the real and imaginary parts
are separate coordinates). An example's squared norm is `sum |z|^2`, its clip
bounds that norm, and the Gaussian noise gives the real and the imaginary part
of every coordinate each `N(0, stddev^2)`: exactly the real Gaussian mechanism
on `R^2n`, so the privacy analysis and accounting are unchanged.

References:
  Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar & Zhang 2016, "Deep
  Learning with Differential Privacy", arXiv 1607.00133.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp


def compute_dtype(dtype: Any) -> jnp.dtype:
  """The dtype clipping, summing and noise run in: `dtype`, at least float32.

  bfloat16/float16 become float32; float64, complex64 and complex128 stay.

  >>> compute_dtype(jnp.bfloat16), compute_dtype(jnp.complex64)
  (dtype('float32'), dtype('complex64'))
  """
  return jnp.promote_types(dtype, jnp.float32)


def leaf_dtype(x: Any) -> jnp.dtype:
  """The dtype of an array or a Python scalar leaf (`2.5` -> float32)."""
  return jnp.result_type(x)


def squared_abs(x: jax.Array) -> jax.Array:
  """Elementwise `|x|^2`, real: `re^2 + im^2` for complex `x`, `x * x` else.

  `jnp.square` of a complex number is `z^2`, whose real part can be 0 or
  negative: never use it for a norm.

  >>> squared_abs(jnp.array([3 + 4j, 1 + 1j]))
  Array([25.,  2.], dtype=float32)
  """
  if jnp.iscomplexobj(x):
    return jnp.square(jnp.real(x)) + jnp.square(jnp.imag(x))
  return x * x


def per_example_sq_norms(per_example_grads: chex.ArrayTree) -> jax.Array:
  """Squared global L2 norm of each example's gradient, float32, shape `(B,)`.

  Every leaf has a leading batch axis; each is promoted to its compute dtype
  (at least float32) before squaring, so a bf16/f16 norm cannot overflow or
  round the clip bound away. Complex leaves count `sum |z|^2`.

  >>> per_example_sq_norms({"w": jnp.array([[3.0, 4.0], [0.0, 1.0]])})
  Array([25.,  1.], dtype=float32)
  """
  sq = [jnp.sum(squared_abs(g.astype(compute_dtype(g.dtype))),
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

  >>> clip_factors(jnp.array([0.0, 4.0, jnp.inf]), 1.0)
  Array([1. , 0.5, 0. ], dtype=float32)
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
    ct = compute_dtype(g.dtype)
    keep = (factors > 0).reshape((-1,) + (1,) * (g.ndim - 1))
    g = jnp.where(keep, g.astype(ct), jnp.zeros((), ct))
    return jnp.tensordot(factors.astype(ct), g, axes=1)

  return jax.tree.map(weighted_sum, per_example_grads)


def clip_and_sum_rows(per_example_grads: chex.ArrayTree, l2_norm_clip: float
                      ) -> tuple[chex.ArrayTree, jax.Array, jax.Array]:
  """Clips each example (row) to global norm `l2_norm_clip` and sums.

  Returns:
    `(clipped sum, squared norms (B,), number of non-finite examples)`.
  """
  sq_norms = per_example_sq_norms(per_example_grads)
  summed = clipped_sum(per_example_grads, clip_factors(sq_norms, l2_norm_clip))
  return summed, sq_norms, jnp.sum(~jnp.isfinite(sq_norms), dtype=jnp.int32)


def gaussian_like(key: jax.Array, x: jax.Array, stddev: float) -> jax.Array:
  """`N(0, stddev^2)` noise shaped like `x`, in `x`'s dtype.

  For complex `x` the real and imaginary parts are drawn independently, each
  with standard deviation `stddev` (`C^n` as `R^2n`; note that
  `jax.random.normal` of a complex dtype would give each part variance 1/2).
  """
  if jnp.iscomplexobj(x):
    real = jnp.real(x).dtype
    k_re, k_im = jax.random.split(key)
    return (stddev * jax.random.normal(k_re, x.shape, real)
            + 1j * stddev * jax.random.normal(k_im, x.shape, real)).astype(x.dtype)
  return stddev * jax.random.normal(key, x.shape, x.dtype)


def add_gaussian_noise(tree: chex.ArrayTree, key: jax.Array, stddev: float
                       ) -> tuple[chex.ArrayTree, jax.Array]:
  """Adds independent N(0, stddev^2) to every (real) coordinate of `tree`.

  Splits `key` into one subkey per leaf plus the key to carry forward, so no
  two leaves and no two steps share noise (the mistake of jax#3646). Noise is
  drawn in the leaf's dtype (callers pass the compute dtype, float32 or
  wider); complex leaves get it on their real and imaginary parts.

  Returns:
    (noised tree, next key).
  """
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves) + 1)
  if stddev == 0:
    return tree, keys[0]
  noised = [leaf + gaussian_like(k, leaf, stddev) for leaf, k in zip(leaves, keys[1:])]
  return jax.tree.unflatten(treedef, noised), keys[0]
