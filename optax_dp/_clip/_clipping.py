"""Per-example clipping rules, framework-neutral: norms, factors, sums.

The one home of the arithmetic every clipping path shares (per-example
gradients in `dp_aggregate` and `clip_and_sum`, the book-keeping rules of
`_layer_rules`, `clipped_grads`, accumulation, sharding). Nothing here knows about
optax or any framework.

Complex parameters: `C^n` is treated as `R^2n` (the real and imaginary parts
are separate coordinates). An example's squared norm is `sum |z|^2`, its clip
bounds that norm (and `_noise` gives the real and the imaginary part of every
coordinate each its own Gaussian draw): exactly the real Gaussian mechanism on
`R^2n`, so the privacy analysis and accounting are unchanged.

References:
  Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar & Zhang 2016, "Deep
  Learning with Differential Privacy", arXiv 1607.00133.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from optax_dp._core import _checks
from optax_dp._clip import _clip_norms


class _ClippedGradsType(type):
  """The class of `ClippedGrads`, whose name says where it belongs.

  A transformation placed before optax_dp's DP step in `optax.chain` gets a
  `ClippedGrads` (or a framework's tree of them) in place of gradients shaped like
  the params; optax then fails on a pytree-structure mismatch whose message
  names the type it found. This `repr` makes that message say the fix.
  """

  def __repr__(cls) -> str:
    return (f"<class 'optax_dp.{cls.__name__}'> (optax_dp: a clipped gradient "
            "sum that only optax_dp.dp_aggregate / dpsgd / dp_accumulate take: put "
            "the DP step FIRST, optax.chain(optax_dp.dp_aggregate(...), "
            "optax.adam(...)); a transformation before it would see per-example "
            "information before the noise)")


@dataclasses.dataclass(frozen=True)
class ClippedGrads(metaclass=_ClippedGradsType):
  """The sum over a batch of per-example gradients, each clipped to norm C.

  Produced by `optax_dp.clipped_grads`; `dp_aggregate` constructed with the
  same `l2_norm_clip` adds the noise and normalises, and refuses a sum clipped
  with another norm, other groups or another adaptive clip (the noise would
  then not match the sensitivity).

  Attributes:
    clipped_sum: a pytree shaped like the params: `sum_i clip_C(g_i)`, in
      float32 or wider (cast to the params' dtype by `dp_aggregate`, after
      the noise).
    nonfinite_examples: int32 scalar, examples dropped for a non-finite
      gradient (debugging aid; data-dependent, do not publish).
    l2_norm_clip: the clip used (static): a float C, a
      `_clip_norms.ClipGroups` (each group of parameters clipped to its own
      norm) or a `_clip_norms.AdaptiveClip`.
    batch_size: the static number of rows B, padding included (static); None
      for a logical batch accumulated by `dp_accumulate` (no static size).
    unreduced_axis: None (default) for a sum over the whole batch, what
      `dp_aggregate` takes. A mesh axis name for the per-device sums of
      `sharded_clipped_grads(..., reduce=False)` (static): every leaf of
      `clipped_sum`, and `nonfinite_examples`, then has a leading axis with
      one entry per device along that axis, split over it, each that device's
      clipped sum of its own rows, NOT yet summed across devices. Only
      `dp_accumulate(..., mesh=mesh)` takes it (it sums once per logical
      batch); `dp_aggregate` refuses it, since noise on one device's partial
      sum would not be the mechanism.
    clip_norm: adaptive clipping only (else None): the float32 clip norm
      this sum was clipped with, which `dp_aggregate` checks against the one
      in its state.
    unclipped_count: adaptive clipping only (else None): float32, `sum` over
      real examples of `1[unclipped] - 1/2` (`RowClip`), not yet private:
      `dp_aggregate` adds its noise.
    privacy_unit: what one clipped term is (static): `"example"` (default),
      or `"user"` for the sum of a user-level batch (a 2-D mask: each user's
      examples clipped together; `batch_size` and the counts are then of
      users). `dp_aggregate` checks it against its budget's sampler.
  """
  clipped_sum: Any
  nonfinite_examples: Any
  l2_norm_clip: Any
  batch_size: Optional[int]
  unreduced_axis: Optional[str] = None
  clip_norm: Any = None
  unclipped_count: Any = None
  privacy_unit: str = "example"

  def __contains__(self, key) -> bool:
    # a train state's apply_gradients may ask `OVERWRITE_WITH_GRADIENT in grads`:
    # a clipped sum is never a dict of raw gradients, so the answer is no.
    del key
    return False


jax.tree_util.register_dataclass(
    ClippedGrads,
    data_fields=["clipped_sum", "nonfinite_examples", "clip_norm", "unclipped_count"],
    meta_fields=["l2_norm_clip", "batch_size", "unreduced_axis", "privacy_unit"])


def _is_clipped(x: Any) -> bool:
  return isinstance(x, ClippedGrads)


def gather_clipped_leaves(updates: Any) -> Any:
  """One `ClippedGrads` from a tree whose every leaf is a `ClippedGrads`.

  A framework adapter may hand its optimizer the clipped sum as one
  `ClippedGrads` per parameter (each of one array, when the optimizer keeps
  only its trained variables); this gathers them back. A `ClippedGrads`, or a tree with no
  `ClippedGrads` leaf, is returned as it is.

  Raises:
    ValueError: if only some leaves are `ClippedGrads`, or they disagree on
      the clip norm or the batch size (sums of different batches or clips).
  """
  if _is_clipped(updates):
    return updates
  leaves = jax.tree.leaves(updates, is_leaf=_is_clipped)
  clipped = [leaf for leaf in leaves if _is_clipped(leaf)]
  if not clipped:
    return updates
  if len(clipped) != len(leaves) or len(
      {(c.l2_norm_clip, c.batch_size, c.unreduced_axis, c.privacy_unit)
       for c in clipped}) != 1:
    raise ValueError(
        "dp_aggregate got a gradient tree mixing clipped sums (ClippedGrads) "
        "with other leaves, or clipped sums of different clip norms or batch "
        "sizes: pass the whole result of one optax_dp.clipped_grads call.")
  return dataclasses.replace(
      clipped[0],
      clipped_sum=jax.tree.map(lambda c: c.clipped_sum, updates, is_leaf=_is_clipped))


_EMPTY_HINTS: list = []   # hint(tree) -> str: a framework adapter's, for its trees


def register_empty_hint(hint) -> None:
  """Adds `hint(tree) -> str` to `batch_size_of`'s empty-tree message."""
  _EMPTY_HINTS.append(hint)


def batch_size_of(per_example_grads: chex.ArrayTree) -> int:
  """Returns the common leading (batch) dimension of per-example gradients.

  Raises:
    ValueError: if the tree is empty, a leaf has no leading axis, or the
      leaves' leading axes differ: these are not per-example gradients
      (`_checks.leading_size`, in `dp_aggregate`'s words).
  """
  def scalar(path, _):
    return (
        "dp_aggregate needs per-example gradients, with a leading batch axis "
        f"on every leaf, but leaf {path} is a scalar. Compute them with "
        "optax_dp.per_example_grads(loss_fn) instead of jax.grad(loss_fn).")

  def differ(dims):
    listing = ", ".join(f"{p}: {d}" for p, d in dims[:6])
    return (
        "dp_aggregate needs per-example gradients whose leaves all share the "
        f"same leading batch axis; got leading dims {listing}. These look like "
        "ordinary (batch-averaged) gradients: compute per-example gradients "
        "with optax_dp.per_example_grads(loss_fn).")

  return _checks.leading_size(
      per_example_grads,
      empty=("dp_aggregate got an empty gradient tree."
             + "".join(hint(per_example_grads) for hint in _EMPTY_HINTS)),
      scalar=scalar, differ=differ)


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


def per_leaf_sq_norms(per_example_grads: chex.ArrayTree) -> list[jax.Array]:
  """Each leaf's per-example squared L2 norm, float32, a list of `(B,)` in
  flattening order (each leaf promoted to its compute dtype, at least
  float32, before squaring: a bf16/f16 norm cannot overflow or round the clip
  bound away; complex leaves count `sum |z|^2`)."""
  return [jnp.sum(squared_abs(g.astype(compute_dtype(g.dtype))),
                  axis=tuple(range(1, g.ndim))).astype(jnp.float32)
          for g in jax.tree.leaves(per_example_grads)]


def per_example_sq_norms(per_example_grads: chex.ArrayTree) -> jax.Array:
  """Squared global L2 norm of each example's gradient, float32, shape `(B,)`:
  the sum of `per_leaf_sq_norms`.

  >>> per_example_sq_norms({"w": jnp.array([[3.0, 4.0], [0.0, 1.0]])})
  Array([25.,  1.], dtype=float32)
  """
  sq = per_leaf_sq_norms(per_example_grads)
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


def clipped_sum(per_example_grads: chex.ArrayTree, factors: Any) -> chex.ArrayTree:
  """`sum_i factors[i] * g_i` per leaf, in the compute dtype; `factors` one
  `(B,)` vector for every leaf, or a list of them, one per leaf.

  Rows with factor 0 (non-finite examples) are replaced by zeros first, so that
  0 * NaN cannot poison the sum. The `where` fuses into the producer of the
  per-example gradients; a `lax.cond` around the whole tree instead made XLA
  materialise the largest per-example gradient twice (measured in benchmarks/).
  """

  def weighted_sum(g, f):
    ct = compute_dtype(g.dtype)
    keep = (f > 0).reshape((-1,) + (1,) * (g.ndim - 1))
    g = jnp.where(keep, g.astype(ct), jnp.zeros((), ct))
    return jnp.tensordot(f.astype(ct), g, axes=1)

  leaves, treedef = jax.tree.flatten(per_example_grads)
  per_leaf = factors if isinstance(factors, (list, tuple)) else [factors] * len(leaves)
  return jax.tree.unflatten(treedef, [weighted_sum(g, f) for g, f in zip(leaves, per_leaf)])


class RowClip(NamedTuple):
  """The clip of each row (example) of a batch, from its squared norms.

  Attributes:
    factors: one `(B,)` vector per parameter leaf (flattening order): the
      scale of that leaf's per-example gradient, `min(1, C_g / ||g_i||_g)`
      for the leaf's group g (its norm over that group's leaves); 0 for rows
      not kept.
    keep: `(B,)` bool, rows that count: real (mask True) and finite.
    nonfinite_examples: int32, real rows dropped for a non-finite norm.
    unclipped_count: float32, `sum` over real rows of `1[factor 1 in every
      group] - 1/2` (a non-finite row counts as clipped): each example moves
      it by at most 1/2. Adaptive clipping privatises it.
  """
  factors: list
  keep: jax.Array
  nonfinite_examples: jax.Array
  unclipped_count: jax.Array


def clip_rows(leaf_sq: list, groups: tuple[int, ...], norms: tuple,
              mask: Optional[jax.Array] = None) -> RowClip:
  """The factors that clip each row, group by group.

  Args:
    leaf_sq: each parameter leaf's per-example squared norms, `(B,)` each.
    groups: the group index of each leaf (`_clip_norms.leaf_groups`).
    norms: the clip norm of each group (a float, or a traced scalar for an
      adaptive clip).
    mask: `(B,)` bool, False for padding rows (default: all real).

  Privacy contract: a kept row's leaves of group g are scaled to norm at
  most `norms[g]`, so the row moves the clipped sum by at most
  `sqrt(sum_g norms[g]^2)`; a non-finite row (NaN or inf in any group's
  norm) is dropped whole.

  >>> rc = clip_rows([jnp.array([9.0, 1.0]), jnp.array([16.0, 0.0])], (0, 1), (1.5, 2.0))
  >>> [f.tolist() for f in rc.factors], float(rc.unclipped_count)
  ([[0.5, 1.0], [0.5, 1.0]], 0.0)
  """
  batch = leaf_sq[0].shape[0]
  mask = jnp.ones((batch,), bool) if mask is None else mask
  group_sq = [sum((leaf_sq[i] for i in range(len(groups)) if groups[i] == g),
                  jnp.zeros((batch,), jnp.float32)) for g in range(len(norms))]
  finite = jnp.isfinite(sum(group_sq[1:], group_sq[0]))
  keep = finite & mask
  group_factors = [jnp.where(keep, clip_factors(sq, c), 0.0)
                   for sq, c in zip(group_sq, norms)]
  unclipped = keep
  for f in group_factors:
    unclipped = unclipped & (f >= 1.0)
  count = jnp.sum(jnp.where(mask, jnp.where(unclipped, 0.5, -0.5), 0.0), dtype=jnp.float32)
  return RowClip(factors=[group_factors[g] for g in groups], keep=keep,
                 nonfinite_examples=jnp.sum(~finite & mask, dtype=jnp.int32),
                 unclipped_count=count)


def clip_and_sum(per_example_grads: chex.ArrayTree, l2_norm_clip: Any, *,
                 current_l2_norm_clip: Any = None) -> ClippedGrads:
  """Clips each example's gradient to global norm `l2_norm_clip` and sums.

  The clipping `dp_aggregate` applies (non-finite examples contribute zero),
  returned as a `ClippedGrads` for `dp_accumulate` or `dp_aggregate`. The fast
  path that never materialises per-example gradients is
  `optax_dp.clipped_grads`. `l2_norm_clip` may also be a pytree prefix of the
  params (each group of parameters clipped to its own norm), or an
  `optax_dp.AdaptiveClip`, whose current norm `current_l2_norm_clip` is then
  required (`optax_dp.l2_norm_clip_of(opt_state)`).

  Privacy contract: each example (row) contributes at most `l2_norm_clip` in
  L2 norm over all leaves together (`sqrt(sum_g C_g^2)` for groups): the
  sensitivity `dp_aggregate`'s noise is calibrated to. Nothing here is
  private yet: the sum is unnoised. An all-zero row (a padding row, zeroed by
  `per_example_grads`' mask) is no example: it adds nothing to the sum nor,
  for an adaptive clip, to the unclipped count.

  References:
    Abadi et al. 2016, "Deep Learning with Differential Privacy",
    https://arxiv.org/abs/1607.00133 (per-example clipping, Algorithm 1).

  Examples:
    >>> grads = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}  # norms 5 and 0.5
    >>> clipped = clip_and_sum(grads, l2_norm_clip=1.0)
    >>> [round(float(v), 2) for v in clipped.clipped_sum["w"]], clipped.batch_size
    ([0.9, 1.2], 2)
  """
  clip = _clip_norms.as_clip_norm(l2_norm_clip)
  norms, clip_norm = _clip_norms.clip_norms_now(clip, current_l2_norm_clip)
  return sum_clipped(per_example_grads, clip,
                     _clip_norms.leaf_groups(clip, per_example_grads), norms,
                     clip_norm)


def sum_clipped(per_example_grads: chex.ArrayTree, clip: Any,
                groups: tuple[int, ...], norms: tuple, clip_norm: Any
                ) -> ClippedGrads:
  """`clip_and_sum` of a checked clip norm, given the group of each leaf and
  the norm of each group (`_clip_norms.leaf_groups`, `clip_norms_now`):
  `clip_norm`, an adaptive clip's current norm (None for a fixed one), is
  recorded in the result."""
  batch_size = batch_size_of(per_example_grads)
  leaf_sq = per_leaf_sq_norms(per_example_grads)
  # Per-example gradients carry no mask: a padding row arrives as zeros (the
  # mask of per_example_grads). It adds nothing to the sum, and it must add
  # nothing to the adaptive count either (the number of padding rows depends
  # on the realised batch size), so an all-zero row is not an example here.
  # A real example with an exactly zero gradient then counts 0, not +1/2:
  # one example still moves the count by at most 1/2.
  # (Exactly zero entries, not a zero squared norm, which underflows for a
  # real gradient of ~1e-23.)
  nonzero = functools.reduce(jnp.logical_or, [
      jnp.any(g != 0, axis=tuple(range(1, g.ndim)))
      for g in jax.tree.leaves(per_example_grads)])
  rows = clip_rows(leaf_sq, groups, norms, nonzero)
  return ClippedGrads(
      clipped_sum=clipped_sum(per_example_grads, rows.factors),
      nonfinite_examples=rows.nonfinite_examples, l2_norm_clip=clip,
      batch_size=batch_size, clip_norm=clip_norm,
      unclipped_count=None if clip_norm is None else rows.unclipped_count)
