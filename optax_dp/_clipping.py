"""Per-example clipping rules, framework-neutral: norms, factors, sums, noise.

The one home of the arithmetic every clipping path shares (per-example
gradients in `dp_aggregate` and `clip_and_sum`, the book-keeping rules of
`_layer_rules`, `clipped_grads`, accumulation, sharding). Nothing here knows about
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

import dataclasses
import math
from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp

from optax_dp import _checks


@dataclasses.dataclass(frozen=True)
class ClippedGrads:
  """The sum over a batch of per-example gradients, each clipped to norm C.

  Produced by `optax_dp.clipped_grads`; `dp_aggregate` constructed with the
  same `l2_norm_clip` adds the noise and normalises, and refuses a sum clipped
  with another norm (the noise would then not match the sensitivity).

  Attributes:
    clipped_sum: a pytree shaped like the params: `sum_i clip_C(g_i)`, in
      float32 or wider (cast to the params' dtype by `dp_aggregate`, after
      the noise).
    nonfinite_examples: int32 scalar, examples dropped for a non-finite
      gradient (debugging aid; data-dependent, do not publish).
    l2_norm_clip: the clip norm C used (static).
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
  """
  clipped_sum: Any
  nonfinite_examples: Any
  l2_norm_clip: float
  batch_size: Optional[int]
  unreduced_axis: Optional[str] = None

  def __contains__(self, key) -> bool:
    # flax's TrainState.apply_gradients asks `OVERWRITE_WITH_GRADIENT in grads`:
    # a clipped sum is never a dict of raw gradients, so the answer is no.
    del key
    return False


jax.tree_util.register_dataclass(
    ClippedGrads,
    data_fields=["clipped_sum", "nonfinite_examples"],
    meta_fields=["l2_norm_clip", "batch_size", "unreduced_axis"])


def _is_clipped(x: Any) -> bool:
  return isinstance(x, ClippedGrads)


def gather_clipped_leaves(updates: Any) -> Any:
  """One `ClippedGrads` from a tree whose every leaf is a `ClippedGrads`.

  The NNX adapter hands `nnx.Optimizer` the clipped sum as one `ClippedGrads`
  per parameter (each of one array: the optimizer keeps only its `wrt`
  variables); this gathers them back. A `ClippedGrads`, or a tree with no
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
      {(c.l2_norm_clip, c.batch_size, c.unreduced_axis) for c in clipped}) != 1:
    raise ValueError(
        "dp_aggregate got a gradient tree mixing clipped sums (ClippedGrads) "
        "with other leaves, or clipped sums of different clip norms or batch "
        "sizes: pass the whole result of one optax_dp.clipped_grads call.")
  first = clipped[0]
  return ClippedGrads(
      clipped_sum=jax.tree.map(lambda c: c.clipped_sum, updates, is_leaf=_is_clipped),
      nonfinite_examples=first.nonfinite_examples,
      l2_norm_clip=first.l2_norm_clip, batch_size=first.batch_size,
      unreduced_axis=first.unreduced_axis)


def _empty_hint(tree) -> str:
  if type(tree).__module__.startswith("flax.nnx"):
    return (" It is an empty nnx.State: nnx.Optimizer.update(model, grads) "
            "strips a ClippedGrads to the nnx.Param arrays it holds (see the "
            "error dp_aggregate gives for a non-empty one).")
  return ""


def batch_size_of(per_example_grads: chex.ArrayTree) -> int:
  """Returns the common leading (batch) dimension of per-example gradients.

  Raises:
    ValueError: if the tree is empty, a leaf has no leading axis, or the
      leaves' leading axes differ: these are not per-example gradients.
  """
  leaves = jax.tree.leaves(per_example_grads)
  if not leaves:
    raise ValueError("dp_aggregate got an empty gradient tree." + _empty_hint(per_example_grads))
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
  `stddev` is 0."""
  if stddev == 0:
    return tree
  return jax.tree.map(jnp.add, tree, gaussian_noise(tree, key, stddev))


def clip_and_sum(per_example_grads: chex.ArrayTree, l2_norm_clip: float) -> ClippedGrads:
  """Clips each example's gradient to global norm `l2_norm_clip` and sums.

  The clipping `dp_aggregate` applies (non-finite examples contribute zero),
  returned as a `ClippedGrads` for `dp_accumulate` or `dp_aggregate`. The fast
  path that never materialises per-example gradients is
  `optax_dp.clipped_grads`.

  Privacy contract: each example (row) contributes at most `l2_norm_clip` in
  L2 norm over all leaves together: the sensitivity `dp_aggregate`'s noise is
  calibrated to. Nothing here is private yet: the sum is unnoised.

  References:
    Abadi et al. 2016, "Deep Learning with Differential Privacy",
    https://arxiv.org/abs/1607.00133 (per-example clipping, Algorithm 1).

  Examples:
    >>> grads = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}  # norms 5 and 0.5
    >>> clipped = clip_and_sum(grads, l2_norm_clip=1.0)
    >>> [round(float(v), 2) for v in clipped.clipped_sum["w"]], clipped.batch_size
    ([0.9, 1.2], 2)
  """
  l2_norm_clip = _checks.check_positive_finite("l2_norm_clip", l2_norm_clip)
  batch_size = batch_size_of(per_example_grads)
  summed, _, nonfinite = clip_and_sum_rows(per_example_grads, l2_norm_clip)
  return ClippedGrads(clipped_sum=summed, nonfinite_examples=nonfinite,
                      l2_norm_clip=l2_norm_clip, batch_size=batch_size)
