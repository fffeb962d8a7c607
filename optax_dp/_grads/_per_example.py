"""Per-example gradients of an ordinary batched loss function."""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, TypeVar

import functools

import chex
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_dp._sample import _batches
from optax_dp._core import _checks
from optax_dp._core import _devices
from optax_dp._flax import _linen
from optax_dp._flax import _nnx

# loss_fn(params, batch) -> scalar loss, or (loss, aux) with has_aux. Any
# function of two positional arguments: `params` is a pytree of parameters or a
# Flax NNX module, `batch` any pytree; a user's annotated loss (say
# `(params: dict[str, jax.Array], batch: tuple[jax.Array, jax.Array])`) must
# fit, so the parameter types are Any (a callable's parameters are
# contravariant: `chex.ArrayTree` here rejected every annotated loss).
LossFn = Callable[[Any, Any], Any]

_Out = TypeVar("_Out", covariant=True)


class BatchGradFn(Protocol[_Out]):
  """What optax_dp's gradient builders return: `fn(params, batch, mask=None)`.

  `params` is the parameters' pytree or a Flax NNX module (typed Any: a
  pytree is any registered structure); `batch` is a pytree whose leaves share
  a leading batch axis `B`, or `gather_batch`'s `MaskedBatch` (rows and mask
  together); `mask` (shape `(B,)`, bool or 0/1, default all True) marks the
  real examples, False for padding (and-ed with a `MaskedBatch`'s own). `rngs`:
  for a Flax NNX model whose loss takes random streams at call time,
  `loss_fn(model, batch, rngs)`: an `nnx.Rngs`, each example gets its own
  streams from it. The result type `_Out` depends on the builder (per-example
  gradients, a `ClippedGrads`, or `(values, ...)` for the `value_and_` forms).
  """

  def __call__(self, params: Any, batch: Any, mask: Optional[chex.Array] = None, *,
               rngs: Any = None) -> _Out:
    ...


class ClippedGradFn(Protocol[_Out]):
  """What the clipped-gradient builders return (`clipped_grads`,
  `value_and_clipped_grads` and their `sharded_` forms):
  `fn(params, batch, mask=None, *, l2_norm_clip=None, rngs=None)`.

  `params`, `batch`, `mask` and `rngs` as for `BatchGradFn` (`params` a pytree of
  parameters or a Flax NNX module). `l2_norm_clip`: for an
  `optax_dp.AdaptiveClip`, the current clip norm
  (`optax_dp.l2_norm_clip_of(opt_state)`); None for a fixed clip.
  """

  def __call__(self, params: Any, batch: Any, mask: Optional[chex.Array] = None, *,
               l2_norm_clip: Optional[Any] = None, rngs: Any = None) -> _Out:
    ...


def batch_rows(batch: chex.ArrayTree) -> int:
  """The number of examples in `batch`: its leaves' common leading size
  (`_checks.leading_size`, in `per_example_grads`' words)."""
  return _checks.leading_size(
      batch,
      empty="per_example_grads: the batch is empty (no array leaves).",
      scalar=lambda _, shapes: (
          "per_example_grads: every leaf of the batch needs a leading batch "
          f"axis, got a scalar leaf. Batch leaf shapes: {shapes}."),
      differ=lambda dims: (
          "per_example_grads: batch leaves have different leading dimensions "
          f"{sorted({d for _, d in dims})}; every leaf must hold one row per "
          "example."))


def check_mask(mask, batch_size: int) -> jax.Array:
  mask = jnp.asarray(mask)
  if mask.shape != (batch_size,):
    raise ValueError(
        f"per_example_grads: mask must have shape ({batch_size},), one entry "
        f"per example, got {mask.shape}.")
  return mask.astype(bool)


def unmask(batch: Any, mask: Any) -> tuple[Any, Any]:
  """`(data, mask)` of what a gradient function was called with: a
  `MaskedBatch` carries its own mask (and-ed with `mask` if both are given),
  a bare batch the `mask` argument (None: every row real)."""
  if not isinstance(batch, _batches.MaskedBatch):
    return batch, mask
  if mask is None:
    return batch.data, batch.mask
  return batch.data, jnp.logical_and(jnp.asarray(batch.mask, bool),
                                     jnp.asarray(mask, bool))


def batch_aux(values: Any, has_aux: bool) -> Any:
  """The per-example values with the aux shaped as the loss returns it for a
  whole batch: each example ran as a batch of one, so an aux leaf of
  per-example shape `(1, *s)` (e.g. logits `(1, 10)`) is stacked to `(B, *s)`
  (`(B, 10)`), not `(B, 1, *s)`; a per-example scalar stays `(B,)`."""
  if not has_aux:
    return values

  def squeeze(x):
    shape = jnp.shape(x)
    return jnp.reshape(x, shape[:1] + shape[2:]) if len(shape) >= 2 and shape[1] == 1 else x

  return values[0], jax.tree.map(squeeze, values[1])


def zero_masked(tree: chex.ArrayTree, mask: jax.Array) -> chex.ArrayTree:
  """Zeroes rows where mask is False (`where`, so NaN in padding cannot leak)."""

  def zero(x):
    m = mask.reshape((-1,) + (1,) * (jnp.ndim(x) - 1))
    return jnp.where(m, x, jnp.zeros_like(x))

  return jax.tree.map(zero, tree)


def partitioner_check(loss_fn: Callable[..., Any], has_aux: bool, params: Any,
                      batch: Any, mask: Any) -> Callable[[], bool]:
  """`safe()`: whether XLA's partitioner may split this batch's per-example
  work (`_devices.partitioner_safe` of one row's loss gradient), traced once
  and only when asked (a batch on a mesh of several devices). A loss that
  cannot be traced on one row is not called safe: the batch is then routed
  or refused as before."""
  lead = 1 if mask is None else jnp.ndim(mask)

  def one_row(x):
    x = jnp.asarray(x)
    return x.reshape((-1,) + x.shape[lead:])[:1]

  def grad(params, rows):
    def value(params):
      out = loss_fn(params, rows)
      return out[0] if has_aux else out
    return jax.grad(value)(params)

  verdict: list[bool] = []

  def one_row_grad(params, batch):
    return grad(params, jax.tree.map(one_row, batch))

  def safe() -> bool:
    if not verdict:
      mesh = _devices.explicit_split_mesh(params)
      check = one_row_grad if mesh is None else _devices.with_auto_axes(   # (types allow no slice)
          one_row_grad, mesh, lambda params, _: _devices.shardings_of(params, mesh))
      try:
        verdict.append(_devices.partitioner_safe(check, params, batch))
      except Exception:   # pylint: disable=broad-except
        verdict.append(False)
    return verdict[0]

  return safe


def value_and_per_example_grads(
    loss_fn: LossFn,
    *,
    has_aux: bool = False,
    microbatch_size: Optional[int] = None,
    wrt: Any = None,
) -> BatchGradFn[tuple[Any, Any]]:
  """Per-example losses and gradients of an ordinary batched loss.

  `loss_fn(params, batch)` is the loss you would give `jax.value_and_grad`: it
  takes a batch (any pytree whose leaves all have a leading batch axis) and
  returns the mean loss (and, with `has_aux`, an auxiliary value). Each example
  is evaluated as a batch of one, `loss_fn(params, example[None])`, under
  `jax.vmap`, so the loss code stays as it is. A loss that mixes examples
  (BatchNorm in training mode, in-batch negatives) is not per-example and must
  not be used for DP-SGD: a Flax Linen `BatchNorm` called in training mode
  (`use_running_average=False`) is detected while tracing and raises
  `ValueError` (use `nn.GroupNorm`/`nn.LayerNorm`, or frozen statistics).

  Privacy contract: row i of the gradients must depend on example i alone,
  which holds when `loss_fn` is a mean of per-example terms (no batch
  statistics, no in-batch negatives): only then does clipping a row bound
  one example's influence. Nothing returned is private yet: clip, sum and
  noise the gradients (`dp_aggregate`), and never publish the losses.

  Args:
    loss_fn: `loss_fn(params, batch) -> loss` or `-> (loss, aux)`.
    has_aux: whether `loss_fn` returns `(loss, aux)`.
    microbatch_size: if set, the batch is processed in sequential chunks of
      this many examples (`jax.lax.map` with `batch_size`), which bounds the
      memory of the per-example gradients being built; the numbers are the
      same as without it.
    wrt: for a Flax NNX model only: the variables trained, an `nnx` filter
      (default `nnx.Param`; e.g. `nnx.LoRAParam`). See "Flax NNX" below.

  Flax NNX: `params` may be an `nnx.Module` and `loss_fn(model, batch)` the
  loss you would give `nnx.value_and_grad`. The gradients are then an
  `nnx.State` of the `wrt` variables (what `nnx.Optimizer.update(model,
  grads)` takes); other variables are read, not trained; every example gets
  its own random streams (independent dropout masks, new ones each call);
  `nnx.BatchNorm` in training mode raises `ValueError`. See `optax_dp._flax._nnx`.

  Returns:
    `fn(params, batch, mask=None)` returning `(losses, grads)`, or
    `((losses, aux), grads)` with `has_aux`, where `losses` has shape `(B,)`,
    every leaf of `grads` has shape `(B, *param.shape)` and `aux` is shaped as
    `loss_fn` returns it for the whole batch: each example's aux (of its batch
    of one) stacked, that batch-of-one axis removed (logits `(1, 10)` per
    example give `(B, 10)`; a per-example scalar gives `(B,)`). Padding rows'
    aux is not zeroed: compute metrics with the mask (e.g. flax's
    `metrics.update(..., mask=mask)`).
    `mask` (shape `(B,)`, bool or 0/1) marks real examples: rows
    where it is False (padding) get zero gradients and zero loss.

  References:
    Abadi et al. 2016, "Deep Learning with Differential Privacy",
    https://arxiv.org/abs/1607.00133 (per-example gradients, Algorithm 1).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_dp
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
    >>> batch = {"x": jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]),
    ...          "y": jnp.array([-1.0, -1.0, 0.0])}
    >>> fn = optax_dp.value_and_per_example_grads(loss_fn)
    >>> losses, grads = fn({"w": jnp.zeros(2)}, batch, jnp.array([1, 1, 0]))
    >>> losses.tolist(), grads["w"].tolist()
    ([1.0, 1.0, 0.0], [[2.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
  """
  if microbatch_size is not None and (
      isinstance(microbatch_size, bool) or not isinstance(microbatch_size, int)
      or microbatch_size < 1):
    raise ValueError(
        f"microbatch_size must be a positive int or None, got {microbatch_size!r}.")

  def single_example_loss(params, example):
    return loss_fn(params, jax.tree.map(lambda x: x[None], example))

  value_and_grad = jax.value_and_grad(single_example_loss, has_aux=has_aux)

  if wrt is not None and _nnx.is_module(wrt):
    raise ValueError("per_example_grads: wrt= is an nnx filter (e.g. nnx.Param), "
                     "not a module: pass the model as the first argument of fn.")

  def fn(params, batch, mask=None, *, rngs=None):
    batch, mask = unmask(batch, mask)
    if _nnx.is_module(params):
      return _nnx.call(
          lambda pure: value_and_per_example_grads(
              pure, has_aux=has_aux, microbatch_size=microbatch_size),
          loss_fn, params, batch, mask, wrt, "per_example_grads", rngs=rngs)
    _nnx.refuse_nnx_options("per_example_grads", wrt=wrt, rngs=rngs)
    safe = partitioner_check(loss_fn, has_aux, params, batch, mask)
    split = _devices.explicit_split_mesh(params)
    if split is not None and safe():   # parameters split over an explicit axis
      return _devices.with_auto_axes(fn, split, functools.partial(_split_like, split))(
          params, batch, mask)
    route = _devices.batch_route(batch, safe)
    if route is not None:
      return on_devices(fn, route)(params, batch, mask)
    batch_size = batch_rows(batch)
    params = _devices.local_params(params, batch, "per_example_grads", safe)
    with _linen.no_cross_example_layers("per_example_grads"):
      if microbatch_size is None or microbatch_size >= batch_size:
        values, grads = jax.vmap(value_and_grad, in_axes=(None, 0))(params, batch)
      else:
        values, grads = jax.lax.map(
            lambda example: value_and_grad(params, example), batch,
            batch_size=microbatch_size)
    if mask is not None:
      mask = check_mask(mask, batch_size)
      grads = zero_masked(grads, mask)
      if has_aux:
        values = (zero_masked(values[0], mask), values[1])
      else:
        values = zero_masked(values, mask)
    return batch_aux(values, has_aux), grads

  return fn


def _split_like(mesh: Any, params: Any, batch: Any, mask: Any) -> Any:
  """Where `per_example_grads`' results go when the parameters are split over
  explicit axes: each example's gradient split like its parameter (the
  example axis whole), the per-example values replicated."""
  del batch, mask
  replicated = NamedSharding(mesh, P())
  grads = jax.tree.map(lambda s: NamedSharding(mesh, P(None, *s.spec)),
                       _devices.shardings_of(params, mesh))
  return replicated, grads


def on_devices(fn: BatchGradFn, route: _devices.BatchRoute) -> BatchGradFn:
  """`fn(params, batch, mask) -> (values, per-example grads)` run on each
  device of `route` for its slice of the batch, inside `jax.shard_map`
  (parameters replicated, the batch, mask and results split along
  `route.axes`): the per-example work XLA's partitioner never touches (see
  `optax_dp._sharding`). The builders route here by themselves
  (`_devices.batch_route`); `sharded_per_example_grads` with its mesh."""
  def run(params, batch, mask=None):
    mask = jnp.ones((batch_rows(batch),), bool) if mask is None else mask
    spec = route.spec()
    params, (batch, mask) = (_devices.on_route(params, route, P()),
                             _devices.on_route((batch, mask), route, spec))
    return jax.shard_map(fn, mesh=route.mesh, in_specs=(P(), spec, spec),
                         out_specs=(spec, spec))(params, batch, mask)

  return run


def per_example_grads(
    loss_fn: LossFn,
    *,
    has_aux: bool = False,
    microbatch_size: Optional[int] = None,
    wrt: Any = None,
) -> BatchGradFn[Any]:
  """Per-example gradients of an ordinary batched loss, for `dp_aggregate`.

  Same contract as `value_and_per_example_grads`, returning only the gradients:
  `fn(params, batch, mask=None) -> grads`, or `-> (grads, aux)` with `has_aux`
  (like `jax.grad`). Every leaf of `grads` has shape `(B, *param.shape)`.

  Privacy contract: as `value_and_per_example_grads`'s: a per-example loss;
  the gradients are private only once `dp_aggregate` clips and noises them.

  References:
    Abadi et al. 2016, "Deep Learning with Differential Privacy",
    https://arxiv.org/abs/1607.00133.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_dp
    >>> def loss_fn(params, batch):
    ...   return jnp.mean(batch @ params)
    >>> grads = optax_dp.per_example_grads(loss_fn)(jnp.zeros(2), jnp.eye(2) * 3)
    >>> grads.tolist()  # row i is example i's gradient
    [[3.0, 0.0], [0.0, 3.0]]
  """
  value_and_grads = value_and_per_example_grads(
      loss_fn, has_aux=has_aux, microbatch_size=microbatch_size, wrt=wrt)

  def fn(params, batch, mask=None, *, rngs=None):
    values, grads = value_and_grads(params, batch, mask, rngs=rngs)
    if has_aux:
      return grads, values[1]
    return grads

  return fn
