"""Device-placement checks for per-example gradients (see `_sharding`).

Kept apart from `_sharding` so that `_per_example` and `_clipped` can use them
without an import cycle.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def varying_axes(tree: Any) -> tuple[str, ...]:
  """The manual mesh axes along which some leaf of `tree` is device-varying
  (non-empty only inside `shard_map`)."""
  axes = set()
  for leaf in jax.tree.leaves(tree):
    try:
      axes |= set(jax.typeof(leaf).manual_axis_type.varying)
    except (AttributeError, TypeError):
      pass
  return tuple(sorted(axes))


def make_varying(tree: Any, axes: tuple[str, ...]) -> Any:
  """Casts every leaf of `tree` to device-varying along `axes` (trap 2)."""
  if not axes:
    return tree

  def cast(x):
    x = jnp.asarray(x)
    missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast, tree)


def _partitioned_error(caller: str) -> ValueError:
  return ValueError(
      f"{caller}: the batch is split across devices by XLA's partitioner "
      "(a sharded jax.Array under jax.jit, outside shard_map). XLA computes "
      "per-example gradients of convolutions wrongly there (jax 0.10.2; see "
      "docs/multi_device.md), which would break the clipping bound silently. "
      "Use optax_dp.sharded_clipped_grads(loss_fn, l2_norm_clip, mesh=mesh) "
      "(or sharded_per_example_grads), which computes per-example work on each "
      "device and all-reduces only the clipped sum.")


def _check_not_partitioned(batch: Any, caller: str) -> None:
  """Refuses a batch partitioned across devices outside shard_map (trap 1).

  Concrete arrays are checked directly; traced ones with
  `jax.debug.inspect_array_sharding`, whose callback runs at compile time with
  the sharding the partitioner chose, so the refusal costs nothing per step.
  """
  def bad(sharding) -> bool:
    return len(sharding.device_set) > 1 and not sharding.is_fully_replicated

  def callback(sharding):
    if bad(sharding):
      raise _partitioned_error(caller)

  for leaf in jax.tree.leaves(batch):
    if isinstance(leaf, jax.core.Tracer):
      jax.debug.inspect_array_sharding(leaf, callback=callback)
    elif isinstance(leaf, jax.Array) and bad(leaf.sharding):
      raise _partitioned_error(caller)


def local_params(params: Any, batch: Any, caller: str) -> Any:
  """The params to differentiate for per-example gradients of `batch`.

  Inside `shard_map` (the batch is device-varying) they are cast to varying
  along the batch's axes, so their cotangents stay per device (trap 2).
  Outside, the batch must not be partitioned across devices (trap 1).
  """
  axes = varying_axes(batch)
  if axes:
    return make_varying(params, axes)
  _check_not_partitioned(batch, caller)
  return params


def psum_clipped(clipped_sum, nonfinite, axis_name):
  """Inside `shard_map`: the clipped sums and non-finite counts of all devices
  on `axis_name`, summed in ONE all-reduce (the count rides along as float32,
  exact below 2**24)."""
  summed, count = jax.lax.psum((clipped_sum, nonfinite.astype(jnp.float32)), axis_name)
  return summed, count.astype(jnp.int32)


def reduce_clipped_grads(clipped: Any, mesh: jax.sharding.Mesh) -> Any:
  """The global `ClippedGrads` of per-device ones (`reduce=False`): sums the
  per-device clipped sums and non-finite counts over `clipped.unreduced_axis`
  of `mesh` in one all-reduce; the result is replicated, for `dp_aggregate`.
  A `ClippedGrads` that is already global is returned as it is.

  Privacy contract: the sum covers every device's rows, so the noise that
  `dp_aggregate` adds next is added once, to the global clipped sum.
  """
  axis = clipped.unreduced_axis
  if axis is None:
    return clipped

  def local(summed, nonfinite):
    return psum_clipped(jax.tree.map(lambda x: x[0], summed), nonfinite[0], axis)

  summed, nonfinite = jax.shard_map(local, mesh=mesh, in_specs=P(axis), out_specs=P())(
      clipped.clipped_sum, clipped.nonfinite_examples)
  return dataclasses.replace(clipped, clipped_sum=summed, nonfinite_examples=nonfinite,
                             unreduced_axis=None)
