"""Privacy units of a batch: examples, or users holding several examples.

A batch of a user-level sampler (`optax_dp.UserPoissonSampler`) has shape
`(U, k, ...)` with a mask `(U, k)`: row u holds user u's (at most k) examples.
The gradient builders evaluate its `U * k` examples as ordinary rows (each a
batch of one) and then clip per *unit*: user u's contribution is the sum of
its real examples' gradients, clipped to C as one vector. This module holds
the layout: flattening the units into rows, and grouping per-row quantities
back into units. A mask of shape `(B,)` is the example-level batch (each row
its own unit), and nothing changes.

Why the sum (not the mean) of a user's gradients: the sensitivity is C either
way, since the clip comes after the combination; the sum keeps every example
weighted as at example level before the clip (a user with one example is
clipped exactly as that example would be), and it is the contribution the
book-keeping rules compute for free (a user's examples are, for a Dense layer,
one longer sequence).

References:
  Charles et al. 2024, "Fine-Tuning Large Language Models with User-Level
  Differential Privacy", https://arxiv.org/abs/2407.07737 (user-level
  sampling: each sampled user's examples combined, then clipped).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from optax_dp._clip import _clipping


def examples_per_unit(mask: Any) -> Optional[int]:
  """k for a user-level mask `(U, k)`, None for an example-level one `(B,)`."""
  shape = jnp.shape(mask)
  if len(shape) == 2:
    return int(shape[1])
  return None


def check_unit_batch(batch: Any, mask_shape: tuple, caller: str) -> None:
  """Every leaf of a user-level batch has shape `(U, k, ...)`, as its mask."""
  bad = [jnp.shape(x) for x in jax.tree.leaves(batch)
         if tuple(jnp.shape(x)[:2]) != tuple(mask_shape)]
  if bad:
    raise ValueError(
        f"{caller}: mask must have shape (B,), one entry per example, or be a "
        "user-level sampler's (users x examples per user) with every leaf of the "
        f"batch starting with those two axes; got a mask of shape {tuple(mask_shape)} "
        f"and leaves of shape {bad[:4]}. Gather a user-level batch with "
        "optax_dp.gather_batch(data, batch), which keeps the (users, examples) "
        "layout.")


def flatten_units(batch: Any, mask: jax.Array) -> tuple[Any, jax.Array]:
  """`(U, k, ...)` leaves and `(U, k)` mask as `U * k` rows."""
  return (jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch),
          mask.reshape((-1,)))


def unit_mask(row_mask: jax.Array, k: int) -> jax.Array:
  """A unit is real iff any of its k rows is."""
  return jnp.any(row_mask.reshape((-1, k)), axis=1)


def zero_rows(tree: Any, row_mask: jax.Array) -> Any:
  """Rows with mask False set to zero (`where`: a NaN there does not leak)."""
  def zero(x):
    keep = row_mask.reshape((-1,) + (1,) * (jnp.ndim(x) - 1))
    return jnp.where(keep, x, jnp.zeros((), x.dtype))
  return jax.tree.map(zero, tree)


def sum_units(per_row: Any, k: int) -> Any:
  """Per-row arrays `(U * k, ...)` summed over each unit's rows: `(U, ...)`."""
  return jax.tree.map(lambda x: jnp.sum(x.reshape((-1, k) + x.shape[1:]), axis=1), per_row)


def merge_units(per_row: Any, k: int) -> Any:
  """Per-row layer inputs `(U * k, r, ...)` as per-unit ones `(U, k * r, ...)`.

  Each row was evaluated as a batch of one, so axis 1 of a captured layer
  input is that batch's rows (r = 1); merging the unit's k rows there makes
  the unit one example that ran as a batch of k rows, whose parameter
  gradient every book-keeping rule gives as the sum over those rows (as for
  augmentation multiplicity's views). A 1-D leaf becomes `(U, k)`."""
  def merge(x):
    if jnp.ndim(x) < 2:
      return x.reshape((-1, k))
    return x.reshape((-1, k * x.shape[1]) + x.shape[2:])
  return jax.tree.map(merge, per_row)


def repeat_units(per_unit: jax.Array, k: int) -> jax.Array:
  """A per-unit vector `(U,)` as a per-row one `(U * k,)`."""
  return jnp.repeat(per_unit, k, axis=0)


def unit_values(values: Any, k: int) -> Any:
  """Per-row values `(U * k, ...)` as `(U, k, ...)`."""
  return jax.tree.map(lambda x: x.reshape((-1, k) + jnp.shape(x)[1:]), values)


def leaf_sq_norms(per_row_grads: Any, row_mask: jax.Array, k: Optional[int]) -> list:
  """Each leaf's squared norms per unit `(units,)`: per row (example level,
  `k` None), or of each user's summed real rows."""
  if k is None:
    return _clipping.per_leaf_sq_norms(per_row_grads)
  return _clipping.per_leaf_sq_norms(sum_units(zero_rows(per_row_grads, row_mask), k))


def clip(leaf_sq: list, groups: tuple, norms: tuple, row_mask: jax.Array,
         k: Optional[int]) -> _clipping.RowClip:
  """`_clipping.clip_rows` over the units, its factors and `keep` given per
  row: a user's rows take its factors, and only its real rows are kept. The
  counts (non-finite, unclipped) are of units."""
  if k is None:
    return _clipping.clip_rows(leaf_sq, groups, norms, row_mask)
  units = _clipping.clip_rows(leaf_sq, groups, norms, unit_mask(row_mask, k))
  keep = repeat_units(units.keep, k) & row_mask
  return units._replace(
      factors=[jnp.where(keep, repeat_units(f, k), 0.0) for f in units.factors], keep=keep)


def clipped_sum(per_row_grads: Any, factors: list) -> Any:
  """`sum_rows factor_row * g_row` per leaf (`_clipping.clipped_sum`), with
  the per-row factors of `clip` (zero for rows not kept)."""
  return _clipping.clipped_sum(per_row_grads, factors)
