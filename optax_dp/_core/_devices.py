"""Per-example gradients of a batch split across devices: routing, checks
and the one all-reduce (the public entry points are in `_sharding`).

* Routing: `batch_route` decides at trace time whether a batch placed on a
  mesh runs per device (`jax.shard_map` over the axes that split its rows)
  or as on one device; `on_route` places a tree (a mask, the params) as an
  explicit-sharding mesh's `shard_map` needs it.
* Refusal: `local_params` refuses, outside `shard_map`, a batch partitioned
  across devices (trap 1 of docs/multi_device.md: XLA's per-example
  convolution gradients are wrong there, so no clip would bound an example;
  under `jax.jit` at compile time, for free) and, inside `shard_map`,
  makes the params device-varying so their cotangents stay per device
  (trap 2); `varying_axes`/`make_varying` read and set that.
* Reduction: `psum_clipped` (inside `shard_map`) and `reduce_clipped_grads`
  (after it, for `reduce=False`) sum the per-device `ClippedGrads` in ONE
  all-reduce.

Kept apart from `_sharding` so that `_per_example` and `_clipped` can use it
without an import cycle.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.extend.core
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
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


class BatchRoute(NamedTuple):
  """Where a batch split across devices is routed: `jax.shard_map` over
  `axes` of `mesh` (a `Mesh` or `AbstractMesh`), the batch's leading axis
  split along them."""
  mesh: Any
  axes: tuple[str, ...]

  @property
  def devices(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.axes)

  def spec(self) -> P:
    """The batch's `PartitionSpec`: leading axis split along `axes`."""
    return P(self.axes[0] if len(self.axes) == 1 else self.axes)


def _leading_axes(spec: P) -> tuple[str, ...]:
  entries = tuple(spec)
  first = entries[0] if entries else None
  if first is None:
    return ()
  return (first,) if isinstance(first, str) else tuple(first)


def _leaf_layout(leaf) -> Optional[tuple[Any, tuple[str, ...], bool]]:
  """`(abstract mesh, leading-axis mesh axes, certain)` of one batch leaf, or
  None where it is on no mesh of several devices. `certain` is False where
  the split of the leading axis is the partitioner's to choose (a traced
  array on a mesh with Auto axes: its type does not say)."""
  if jnp.ndim(leaf) == 0:
    return None
  if isinstance(leaf, jax.core.Tracer):
    sharding = getattr(jax.typeof(leaf), "sharding", None)
  elif isinstance(leaf, jax.Array):
    sharding = leaf.sharding          # concrete: the spec is the real one
  else:
    return None                       # host data: jit places it on one device
  if not isinstance(sharding, NamedSharding) or sharding.mesh.size <= 1:
    return None
  mesh = sharding.mesh   # concrete for a concrete array (eager calls need it)
  axes = _leading_axes(sharding.spec)
  certain = not isinstance(leaf, jax.core.Tracer) or all(
      kind == AxisType.Explicit or mesh.shape[name] == 1
      for name, kind in zip(mesh.axis_names, mesh.axis_types))
  return mesh, axes, certain or bool(axes)


def _abstract(mesh):
  return getattr(mesh, "abstract_mesh", mesh)


def batch_route(batch: Any, safe: Optional[Callable[[], bool]] = None
                ) -> Optional[BatchRoute]:
  """The per-device route for a batch split (or splittable) across devices
  outside `shard_map`, or None: run as on one device.

  Decided at trace time from the batch's types, so the routing costs nothing
  per step:

  * a concrete `jax.Array`, or a traced one on a mesh in explicit-sharding
    mode (`AxisType.Explicit`), says which mesh axes split its leading axis:
    the route is over those (None if it is not split);
  * a traced array on a mesh with Auto axes does not: XLA's partitioner
    decides, at compile time, whether to split it. If `safe()` says the
    computation is `partitioner_safe`, None: the partitioner follows the
    user's shardings (a parameter split over a model axis stays split).
    Otherwise, if the mesh has exactly one
    Auto axis with several devices and the rows divide among them, the route
    is over that axis (the batch is split there, whatever its placement:
    the result is the same, and the per-example work is then data-parallel);
    otherwise None, and `local_params`'s compile-time check refuses the batch
    if the partitioner does split it.

  None also inside `shard_map` (the batch is already per device), for a batch
  on one device or host memory, for leaves on different meshes or split along
  different axes, and for rows that do not divide among the route's devices.
  """
  if varying_axes(batch):
    return None
  layouts = [layout for layout in map(_leaf_layout, jax.tree.leaves(batch)) if layout]
  if not layouts:
    return None
  if len({_abstract(mesh) for mesh, _, _ in layouts}) != 1:
    return None
  split = {axes for _, axes, _ in layouts if axes}
  if len(split) > 1:
    return None
  concrete = [mesh for mesh, _, _ in layouts if isinstance(mesh, jax.sharding.Mesh)]
  mesh = concrete[0] if concrete else layouts[0][0]
  if split:
    axes = split.pop()
  elif all(certain for _, _, certain in layouts):
    return None                       # replicated, and known to stay so
  elif safe is not None and safe():
    return None                       # the partitioner follows the user's shardings
  else:
    auto = [name for name, kind in zip(mesh.axis_names, mesh.axis_types)
            if kind == AxisType.Auto and mesh.shape[name] > 1]
    if len(auto) != 1:
      return None
    axes = (auto[0],)
  route = BatchRoute(mesh, axes)
  rows = jnp.shape(jax.tree.leaves(batch)[0])[0]
  return route if rows % route.devices == 0 else None


def on_route(tree: Any, route: BatchRoute, spec: P) -> Any:
  """`tree` placed as `spec` on the route's mesh where its type says otherwise,
  on a mesh in explicit-sharding mode, whose `shard_map` takes only matching
  inputs (e.g. a mask made inside the step, or replicated parameters); on
  Auto axes `shard_map` places its inputs itself."""
  if not any(kind == AxisType.Explicit for kind in route.mesh.axis_types):
    return tree

  def place(x):
    x = jnp.asarray(x)
    want = P(*(tuple(spec) + (None,) * x.ndim)[:x.ndim])
    sharding = jax.typeof(x).sharding
    if sharding.mesh == _abstract(route.mesh) and sharding.spec == want:
      return x
    return jax.reshard(x, NamedSharding(route.mesh, want))

  return jax.tree.map(place, tree)


#: Primitives whose per-example gradients XLA's SPMD partitioner computes
#: wrongly when it splits the batch (trap 1: a convolution's kernel, measured
#: on jax 0.10.2; every other leaf of the same model was right, and so is a
#: language model of Embed, attention, LayerNorm and Dense layers on 2-D
#: meshes: tests/test_model_parallel.py; other layers are trusted, unmeasured).
PARTITIONER_UNSAFE_PRIMITIVES = frozenset({"conv_general_dilated"})


def _primitive_names(jaxpr) -> set[str]:
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          names |= _primitive_names(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          names |= _primitive_names(sub)
  return names


def partitioner_safe(fn, *args) -> bool:
  """Whether XLA's partitioner may split the per-example work of `fn(*args)`
  (the gradient of one example's loss) across devices: True where it holds
  none of `PARTITIONER_UNSAFE_PRIMITIVES`, looked for in its jaxpr and every
  sub-jaxpr (scan, cond, custom rules), at trace time.

  Then a batch under `jax.jit` runs with the user's shardings (data, FSDP
  and tensor-parallel axes alike): no parameter is gathered, and the
  per-example norms include XLA's reduction over the axes that split a
  parameter. Otherwise (a convolution) the batch must be routed to
  `shard_map` or refused (`local_params`)."""
  jaxpr = jax.make_jaxpr(fn)(*args)
  return not _primitive_names(jaxpr.jaxpr) & PARTITIONER_UNSAFE_PRIMITIVES


def _split_axes(spec: P) -> set[str]:
  names: set[str] = set()
  for entry in spec:
    if entry is not None:
      names |= {entry} if isinstance(entry, str) else set(entry)
  return names


def explicit_split_mesh(tree: Any) -> Any:
  """The (abstract) mesh in explicit-sharding mode (`AxisType.Explicit`) over
  one of whose axes some leaf of `tree` is split (a parameter sharded
  FSDP-style or tensor-parallel; an axis of one device included, where a
  model's own sharding constraints must hold as well), or None. Read from
  the leaves' types at trace time."""
  for leaf in jax.tree.leaves(tree):
    try:
      sharding = jax.typeof(leaf).sharding
    except (AttributeError, TypeError):
      continue
    if not isinstance(sharding, NamedSharding):
      continue
    mesh = sharding.mesh
    kinds = dict(zip(mesh.axis_names, mesh.axis_types))
    if any(kinds.get(name) == AxisType.Explicit for name in _split_axes(sharding.spec)):
      return _abstract(mesh)
  return None


def with_auto_axes(fn: Callable[..., Any], mesh: Any,
                   out_sharding: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` run with `mesh`'s explicit axes turned Auto (`jax.sharding.auto_axes`):
  inside, XLA's partitioner follows the inputs' shardings as it does on a mesh
  of Auto axes (`partitioner_safe`), so a parameter split over an explicit
  axis stays split instead of being gathered for `shard_map`. Its results
  come back placed as `out_sharding(*args)` says (a tree of `NamedSharding`s
  of `mesh`, or a prefix of the results' tree)."""
  def run(*args):
    with jax.sharding.use_abstract_mesh(mesh):
      return jax.sharding.auto_axes(fn, out_sharding=out_sharding(*args))(*args)
  return run


def shardings_of(tree: Any, mesh: Any) -> Any:
  """Each leaf's `NamedSharding` on `mesh` as its type says (replicated where
  it says none)."""
  def one(leaf):
    sharding = getattr(jax.typeof(leaf), "sharding", None)
    spec = sharding.spec if isinstance(sharding, NamedSharding) else P()
    return NamedSharding(mesh, spec)
  return jax.tree.map(one, tree)


def on_mesh(batch: Any) -> bool:
  """Whether some leaf of `batch` is on a mesh of several devices."""
  return any(map(_leaf_layout, jax.tree.leaves(batch)))


def _partitioned_error(caller: str) -> ValueError:
  return ValueError(
      f"{caller}: the batch is split across devices by XLA's partitioner "
      "(a sharded jax.Array under jax.jit, outside shard_map) in a way optax_dp "
      "cannot route to its per-device path: its mesh has several Auto axes "
      "of more than one device (the batch's types do not say which one splits "
      "it), or its rows do not divide among the devices, and the loss holds a "
      "convolution: XLA computes per-example gradients of convolutions "
      "wrongly there (jax 0.10.2; see docs/multi_device.md), which would "
      "break the clipping bound silently (a model without convolutions runs "
      "under the partitioner with any layout, FSDP and tensor-parallel "
      "included). For a convolutional model, use a mesh with one data axis "
      "and the parameters replicated, or "
      "use optax_dp.sharded_clipped_grads(loss_fn, l2_norm_clip, mesh=mesh, "
      "axis_name=...) (or sharded_per_example_grads), or JAX's explicit "
      "sharding (jax.make_mesh(..., axis_types=(AxisType.Explicit, ...))), "
      "whose types say how the batch is split; pad the batch with "
      "optax_dp.pad_batch_for_devices.")


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


def local_params(params: Any, batch: Any, caller: str,
                 safe: Optional[Callable[[], bool]] = None) -> Any:
  """The params to differentiate for per-example gradients of `batch`.

  Inside `shard_map` (the batch is device-varying) they are cast to varying
  along the batch's axes, so their cotangents stay per device (trap 2).
  Outside, the batch must not be partitioned across devices (trap 1) unless
  `safe()` says the computation is `partitioner_safe`.
  """
  axes = varying_axes(batch)
  if axes:
    return make_varying(params, axes)
  if safe is not None and on_mesh(batch) and safe():
    return params
  _check_not_partitioned(batch, caller)
  return params


def psum_clipped(clipped: Any, axis_name) -> Any:
  """Inside `shard_map`: a `ClippedGrads` whose clipped sums, non-finite
  counts (and adaptive clipping's unclipped counts) are those of all devices
  on `axis_name`, summed in ONE all-reduce (the non-finite count rides along
  as float32, exact below 2**24)."""
  summed, count, unclipped = jax.lax.psum(
      (clipped.clipped_sum, clipped.nonfinite_examples.astype(jnp.float32),
       clipped.unclipped_count), axis_name)
  return dataclasses.replace(clipped, clipped_sum=summed,
                             nonfinite_examples=count.astype(jnp.int32),
                             unclipped_count=unclipped)


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

  def local(summed, nonfinite, unclipped):
    own = dataclasses.replace(
        clipped, clipped_sum=jax.tree.map(lambda x: x[0], summed),
        nonfinite_examples=nonfinite[0],
        unclipped_count=None if unclipped is None else unclipped[0], clip_norm=None)
    reduced = psum_clipped(own, axis)
    return reduced.clipped_sum, reduced.nonfinite_examples, reduced.unclipped_count

  summed, nonfinite, unclipped = jax.shard_map(
      local, mesh=mesh, in_specs=P(axis), out_specs=P())(
          clipped.clipped_sum, clipped.nonfinite_examples, clipped.unclipped_count)
  return dataclasses.replace(clipped, clipped_sum=summed, nonfinite_examples=nonfinite,
                             unclipped_count=unclipped, unreduced_axis=None)
