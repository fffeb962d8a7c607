"""Data-parallel DP-SGD over a device mesh: local per-example work, one
all-reduce of the clipped sum, noise drawn once.

Two traps make this more than "it just works" (measured on jax/jaxlib 0.10.2,
8 simulated CPU devices; reproductions in docs/multi_device.md):

1. `jax.jit(jax.vmap(jax.grad(loss)))` with the batch sharded over devices by
   XLA's SPMD partitioner returns wrong per-example gradients for a
   convolution's kernel (as large as the gradients themselves).
2. Inside `shard_map`, `jax.vmap(jax.grad(...))` with respect to a replicated
   (device-invariant) value sums its cotangents across devices, so every
   "per-example" gradient mixes examples from all devices, unless the value
   is first cast to device-varying (`jax.lax.pcast(..., to="varying")`).

Both break DP silently: the clip no longer bounds any one example. optax_dp
therefore (a) computes per-example work inside `shard_map`, where the
partitioner cannot touch it (`sharded_clipped_grads`,
`sharded_per_example_grads`), (b) casts parameters and every other
differentiated value to device-varying whenever the batch is varying, so even
a hand-written `shard_map` around `per_example_grads` or `clipped_grads` is
right, (c) routes the one-device builders (`clipped_grads`,
`per_example_grads`, ...) to the same per-device path by themselves when
their batch is on a mesh under `jax.jit` (`_devices.batch_route`: a
`NamedSharding` on a mesh of one Auto axis, or explicit sharding), and (d)
refuses, at compile time, a batch that XLA has partitioned across devices
outside `shard_map` where that routing is impossible.

The examples below use a one-device mesh, `Mesh(np.array(jax.devices()[:1]),
("data",))`; with more devices only the mesh changes.
"""

from __future__ import annotations

import functools

from typing import Any, Optional, Unpack

import jax
import jax.numpy as jnp
import numpy as np

from optax_dp._sample import _batches
from optax_dp._clip import _clip_norms
from optax_dp._grads import _clipped
from optax_dp._core import _devices
from optax_dp._flax import _nnx
from optax_dp._grads import _per_example


def _check_divisible(batch, mesh, axis_name, caller):
  size = _per_example.batch_rows(batch)
  devices = mesh.shape[axis_name]
  if size % devices:
    raise ValueError(
        f"{caller}: the batch has {size} rows, not a multiple of the {devices} "
        f"devices on mesh axis {axis_name!r}. Pad it with "
        "optax_dp.pad_batch_for_devices(batch, num_devices) (padding rows are "
        "masked out).")


def sharded_value_and_clipped_grads(
    loss_fn: _per_example.LossFn,
    l2_norm_clip: _clip_norms.ClipNormLike,
    *,
    mesh: jax.sharding.Mesh,
    axis_name: str = "data",
    reduce: bool = True,
    **options: Unpack[_clipped.ClipOptions],
) -> _per_example.ClippedGradFn[tuple[Any, _clipped.ClippedGrads]]:
  """`value_and_clipped_grads` over a batch split across `mesh[axis_name]`.

  Each device computes the per-example values and the clipped sum of its
  slice of the batch with `optax_dp.value_and_clipped_grads` (any `method`,
  `microbatch_size` per device) inside `jax.shard_map`; the clipped sums (and
  the non-finite counts) are then summed across devices with one `psum`: the
  only cross-device traffic, one all-reduce of the parameters' size per step.
  The result is a replicated `ClippedGrads` for the global batch, so the
  `dp_aggregate` that follows draws the noise once, identically on every
  device (the same key): exactly the single-device mechanism, whose
  accounting is unchanged. Parameters are replicated (`P()`), the batch and
  mask are split along their leading axis, whose size must be a multiple of
  the number of devices on the axis. `**options` are
  `value_and_clipped_grads`'s (`method`, `has_aux`, `microbatch_size`: see
  `optax_dp.ClipOptions`), applied per device. `params` may be a Flax NNX
  model (with `wrt=` among the options), as for `clipped_grads`: it is split
  on the global batch, outside `shard_map`, so each example's random streams
  are numbered globally, and the result is what `nnx.Optimizer.update` takes.

  `reduce=False` (for gradient accumulation) skips the `psum`: the
  `ClippedGrads` then holds each device's own clipped sum, stacked on a
  leading axis of one entry per device and split over `mesh[axis_name]`
  (leaves of shape `(devices, *param.shape)`, marked `unreduced_axis=
  axis_name`), and no cross-device traffic happens in the step.
  `dp_accumulate(tx, k, mesh=mesh, axis_name=axis_name)` adds these up on
  each device and all-reduces once per logical batch of k physical batches,
  instead of once per physical batch (k times less traffic). `dp_aggregate`
  refuses them (a partial sum is not the mechanism).

  Privacy contract: the same as on one device (`value_and_clipped_grads`): a
  per-example `loss_fn`, and the noise added once to the global sum, by a
  `dp_aggregate` with the same key on every device and process. Every process
  must feed its slice of the same global batch (one sampler seed for all, see
  `gather_sharded_batch`), padded with `pad_batch_for_devices` (padding rows
  masked), never a batch sampled per device. With `reduce=False` the per-device
  sums are not private and not the mechanism's input until summed: only
  `dp_accumulate(..., mesh=mesh)` sums them (all devices, then the noise once).

  Returns:
    `fn(params, batch, mask=None) -> (values, ClippedGrads)`; `values` (the
    per-example losses, and aux) are split along the batch axis like the batch.

  References:
    Abadi et al. 2016, "Deep Learning with Differential Privacy",
    https://arxiv.org/abs/1607.00133 (the mechanism, unchanged by sharding).

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> import optax_dp
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> def loss_fn(w, x):
    ...   return jnp.mean(x @ w)
    >>> fn = jax.jit(optax_dp.sharded_value_and_clipped_grads(loss_fn, 1.0, mesh=mesh))
    >>> losses, clipped = fn(jnp.ones(2), jnp.array([[3.0, 4.0], [0.0, 0.5]]))
    >>> losses.tolist(), [round(g, 3) for g in clipped.clipped_sum.tolist()]
    ([7.0, 0.5], [0.6, 1.3])
    >>> clipped.batch_size  # the global batch
    2
  """
  if not isinstance(reduce, bool):
    raise ValueError(f"reduce must be a bool, got {reduce!r}.")
  options = dict(options)
  wrt = options.pop("wrt", None)  # NNX: chosen outside shard_map, by _nnx.call
  clip = l2_norm_clip
  on_devices = _clipped.on_devices(
      _clipped.value_and_clipped_grads(loss_fn, clip, **options),
      _devices.BatchRoute(mesh, (axis_name,)), reduce)

  def fn(params, batch, mask=None, *, l2_norm_clip=None, rngs=None):
    # l2_norm_clip: an adaptive clip's current norm (see value_and_clipped_grads).
    current = {} if l2_norm_clip is None else {"l2_norm_clip": l2_norm_clip}
    batch, mask = _per_example.unmask(batch, mask)
    if _nnx.is_module(params):
      # The model is split (and each example's row numbered) on the global
      # batch, outside shard_map: row numbers, hence random streams, are global.
      values, clipped = _nnx.call(
          lambda pure: functools.partial(sharded_value_and_clipped_grads(
              pure, clip, mesh=mesh, axis_name=axis_name, reduce=reduce,
              **options), **current),
          loss_fn, params, batch, mask, wrt, "sharded_clipped_grads", rngs=rngs)
      return values, _nnx.as_optimizer_grads(clipped)
    # Plain params with wrt= are not refused here (as before).
    _nnx.refuse_nnx_options("sharded_clipped_grads", rngs=rngs)
    _check_divisible(batch, mesh, axis_name, "sharded_clipped_grads")
    return on_devices(params, batch, mask, **current)

  return fn


def sharded_clipped_grads(
    loss_fn: _per_example.LossFn,
    l2_norm_clip: _clip_norms.ClipNormLike,
    *,
    mesh: jax.sharding.Mesh,
    axis_name: str = "data",
    reduce: bool = True,
    **options: Unpack[_clipped.ClipOptions],
) -> _per_example.ClippedGradFn[_clipped.ClippedGrads]:
  """`sharded_value_and_clipped_grads` without the values: `fn(params, batch,
  mask=None) -> ClippedGrads`, replicated, for `dp_aggregate`.

  With `reduce=False`, the per-device clipped sums, not summed, for
  `dp_accumulate(tx, k, mesh=mesh)` only (one all-reduce per logical batch
  instead of one per physical batch; see `sharded_value_and_clipped_grads`).

  Privacy contract: as `sharded_value_and_clipped_grads`'s. The result equals
  `clipped_grads(loss_fn, l2_norm_clip)` on the whole batch (up to float
  summation order), so the accounting is the single-device one.

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np, optax_dp
    >>> loss_fn = lambda w, x: jnp.mean(x @ w)
    >>> x = jnp.array([[3.0, 4.0], [0.0, 0.5]])  # gradient norms 5 and 0.5
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> sharded = jax.jit(optax_dp.sharded_clipped_grads(loss_fn, 1.0, mesh=mesh))
    >>> single = jax.jit(optax_dp.clipped_grads(loss_fn, 1.0))
    >>> bool(jnp.allclose(sharded(jnp.ones(2), x).clipped_sum,
    ...                   single(jnp.ones(2), x).clipped_sum))
    True
    >>> per_device = jax.jit(optax_dp.sharded_clipped_grads(loss_fn, 1.0, mesh=mesh,
    ...                                                     reduce=False))(jnp.ones(2), x)
    >>> per_device.clipped_sum.shape, per_device.unreduced_axis  # (devices, *param.shape)
    ((1, 2), 'data')
  """
  fn = sharded_value_and_clipped_grads(
      loss_fn, l2_norm_clip, mesh=mesh, axis_name=axis_name, reduce=reduce, **options)
  return lambda params, batch, mask=None, **kwargs: fn(params, batch, mask, **kwargs)[1]


def sharded_per_example_grads(
    loss_fn: _per_example.LossFn,
    *,
    mesh: jax.sharding.Mesh,
    axis_name: str = "data",
    has_aux: bool = False,
    microbatch_size: Optional[int] = None,
) -> _per_example.BatchGradFn[tuple[Any, Any]]:
  """`value_and_per_example_grads` over a batch split across `mesh[axis_name]`.

  Per-example gradients are computed on each device for its slice (inside
  `shard_map`, parameters cast to varying) and returned split along the batch
  axis. Feeding them to `dp_aggregate` makes XLA all-reduce the clipped sum;
  prefer `sharded_clipped_grads`, which never materialises them.

  Privacy contract: as `value_and_per_example_grads`'s (a per-example loss;
  nothing private until `dp_aggregate`), with the batch as for
  `sharded_value_and_clipped_grads`.

  Returns:
    `fn(params, batch, mask=None) -> (values, per_example_grads)`.

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> import optax_dp
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> fn = jax.jit(optax_dp.sharded_per_example_grads(lambda w, x: jnp.mean(x @ w),
    ...                                                 mesh=mesh))
    >>> losses, grads = fn(jnp.ones(2), jnp.array([[3.0, 4.0], [0.0, 0.5]]))
    >>> grads.tolist()
    [[3.0, 4.0], [0.0, 0.5]]
  """
  on_devices = _per_example.on_devices(
      _per_example.value_and_per_example_grads(
          loss_fn, has_aux=has_aux, microbatch_size=microbatch_size),
      _devices.BatchRoute(mesh, (axis_name,)))

  def fn(params, batch, mask=None, *, rngs=None):
    if rngs is not None:
      raise ValueError("sharded_per_example_grads takes no rngs= (plain pytree params); "
                       "for a Flax NNX model use sharded_clipped_grads.")
    batch, mask = _per_example.unmask(batch, mask)
    _check_divisible(batch, mesh, axis_name, "sharded_per_example_grads")
    return on_devices(params, batch, mask)

  return fn


def pad_batch_for_devices(batch: _batches.Batch, num_devices: int) -> _batches.Batch:
  """Pads a sampled batch with padding rows (index -1, mask False) to a
  multiple of `num_devices` and interleaves it, so that each device's
  contiguous slice (`PartitionSpec("data")`) gets every `num_devices`-th row:
  the real examples, which the samplers put first, spread evenly. Row order
  does not change the clipped sum. A user-level batch `(users, k)` is padded
  and spread by whole users.

  Privacy contract: the real examples are exactly the sampler's (none added,
  dropped or repeated); keep passing the returned `mask`.

  Examples:
    >>> import numpy as np
    >>> import optax_dp
    >>> batch = optax_dp.Batch(indices=np.array([5, 2, 9, -1, -1]),
    ...                        mask=np.array([True, True, True, False, False]))
    >>> padded = optax_dp.pad_batch_for_devices(batch, 2)
    >>> padded.indices.tolist()  # device 0: [5, 9, -1], device 1: [2, -1, -1]
    [5, 9, -1, 2, -1, -1]
  """
  n = int(num_devices)
  size = len(batch.indices)
  padded = -(-size // n) * n
  rest = np.shape(batch.indices)[1:]   # (k,) for a user-level batch: whole users move
  indices = np.full((padded,) + rest, -1, np.int64)
  mask = np.zeros((padded,) + rest, bool)
  indices[:size], mask[:size] = batch.indices, batch.mask
  order = np.arange(padded).reshape(-1, n).T.reshape(-1)
  return _batches.Batch(indices=indices[order], mask=mask[order])


def gather_sharded_batch(data: Any, batch: _batches.Batch,
                         sharding: jax.sharding.Sharding) -> tuple[Any, jax.Array]:
  """`gather_batch` straight into sharded global arrays: each process loads
  only the rows of its own devices' slices (`jax.make_array_from_callback`).

  Every host derives the same `batch` from the shared sampler seed; this is
  how each then loads just its shard (multi-host: `jax.distributed`).

  `sharding` must split the batch (leading) axis only, e.g.
  `NamedSharding(mesh, PartitionSpec("data"))`; other shardings are refused.

  Privacy contract: every process must pass the same `batch` (the same
  sampler and seed), so the global batch is the one sampler's; the padding
  rows are zeros, but the returned `mask` must still be passed on.

  Returns:
    `(data rows, mask)`, both split along the batch axis by `sharding`.

  Examples:
    >>> import jax, numpy as np
    >>> import optax_dp
    >>> from jax.sharding import NamedSharding, PartitionSpec
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> batch = optax_dp.Batch(indices=np.array([3, 1, -1]),
    ...                        mask=np.array([True, True, False]))
    >>> rows, mask = optax_dp.gather_sharded_batch(
    ...     {"x": np.arange(10.0)}, batch, NamedSharding(mesh, PartitionSpec("data")))
    >>> rows["x"].tolist(), mask.tolist()
    ([3.0, 1.0, 0.0], [True, True, False])
  """
  spec = getattr(sharding, "spec", None)
  if spec is None or any(axis is not None for axis in tuple(spec)[1:]):
    raise ValueError(
        "gather_sharded_batch needs a NamedSharding that splits the batch axis "
        f"only, e.g. NamedSharding(mesh, PartitionSpec('data')); got {sharding}.")
  def load(x):
    x = np.asarray(x)
    shape = (len(batch.indices),) + x.shape[1:]

    def rows(index):
      part = _batches.Batch(indices=batch.indices[index[0]], mask=batch.mask[index[0]])
      return _batches.gather_rows(x, part)

    return jax.make_array_from_callback(shape, sharding, rows)

  mask = jax.make_array_from_callback(
      batch.mask.shape, sharding, lambda index: batch.mask[index])
  return jax.tree.map(load, data), mask
