"""Device-placement checks for per-example gradients (see `_sharding`).

Kept apart from `_sharding` so that `_per_example` and `_clipped` can use them
without an import cycle.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


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
