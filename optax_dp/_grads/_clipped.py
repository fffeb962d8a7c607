"""Clipped gradient sums: what `dp_aggregate` accepts in place of per-example grads."""

from __future__ import annotations

from typing import Any, Optional, TypedDict, Unpack

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_dp._grads import _bookkeeping
from optax_dp._clip import _clip_norms
from optax_dp._clip import _clipping
from optax_dp._core import _devices
from optax_dp._flax import _linen
from optax_dp._flax import _nnx
from optax_dp._grads import _per_example
from optax_dp._grads import _privacy_units as _units


ClippedGrads = _clipping.ClippedGrads  # defined with the clipping rules


METHODS = ("auto", "ghost", "vmap")
PerExampleFallbackWarning = _bookkeeping.PerExampleFallbackWarning
clipping_plan = _bookkeeping.clipping_plan


class ClipOptions(TypedDict, total=False):
  """The keyword options every clipped-gradient builder takes.

  `value_and_clipped_grads` spells them out; `clipped_grads` and the
  `sharded_*` builders take them as `**options: Unpack[ClipOptions]` (type
  checkers and IDEs expand them) and pass them on, so they are validated and
  documented in one place.

  Keys:
    method: `"auto"` (default), `"ghost"` or `"vmap"`.
    has_aux: whether `loss_fn` returns `(loss, aux)` (default False).
    microbatch_size: process the batch in sequential chunks of this size
      (default None: one chunk).
    wrt: for a Flax NNX model: the variables trained (an nnx filter, default
      `nnx.Param`).
  """
  method: str
  has_aux: bool
  microbatch_size: Optional[int]
  wrt: Any


def value_and_clipped_grads(
    loss_fn: _per_example.LossFn,
    l2_norm_clip: _clip_norms.ClipNormLike,
    *,
    method: str = "auto",
    has_aux: bool = False,
    microbatch_size: Optional[int] = None,
    wrt: Any = None,
) -> _per_example.ClippedGradFn[tuple[Any, ClippedGrads]]:
  """Per-example losses and the clipped gradient sum, for `dp_aggregate`.

  `loss_fn(params, batch)` is the same ordinary batched loss as for
  `per_example_grads`; each example is evaluated as a batch of one (so a Flax
  Linen `BatchNorm` in training mode raises `ValueError`, as there). Returns
  `fn(params, batch, mask=None) -> (losses, ClippedGrads)` (or
  `((losses, aux), ClippedGrads)` with `has_aux`), where the clipped sum is
  `sum_i mask_i * clip_C(g_i)`, `clip_C(g) = g * min(1, C / ||g||)` over all
  parameters together, and an example with a non-finite gradient contributes
  zero. Pass it to `dp_aggregate(l2_norm_clip=C, ...)` (same C) in place of
  per-example gradients: the privacy contract is unchanged.

  Methods:
    * `"vmap"`: per-example gradients of every parameter (`per_example_grads`),
      then clip and sum. Always works; memory B x params.
    * `"ghost"`: book-keeping for Flax Linen models (Bu et al. 2023, arXiv
      2210.00038; see `optax_dp._clip._layer_rules` and its Linen adapter `optax_dp._flax._linen_layers`): no per-example gradients of Dense or
      Conv kernels are materialised (Conv via im2col, per-example kernel
      gradients when that is cheaper), nor of `nn.RNN` cells (GRU, LSTM, simple,
      MGU: per-step inputs and output gradients of their Dense sub-layers, one
      pass through the scan); other layers that own their parameters
      (Embed, LayerNorm, ...) get a vmapped VJP of that layer alone. Raises if
      some parameter is not owned by such a layer.
    * `"auto"` (default): `"ghost"` for the covered layers, per-example
      gradients for the parameters of the others, one global norm.

  Args:
    loss_fn: `loss_fn(params, batch) -> loss` (or `(loss, aux)`).
    l2_norm_clip: C > 0.
    method: `"auto"`, `"ghost"` or `"vmap"`.
    has_aux: whether `loss_fn` returns `(loss, aux)`.
    microbatch_size: process the batch in sequential chunks of this size
      (`lax.scan`), summing the chunks' clipped sums; same numbers, less memory.
    wrt: for a Flax NNX model only: the variables trained (an nnx filter,
      default `nnx.Param`; e.g. `nnx.LoRAParam`).

  Flax NNX: `params` may be an `nnx.Module`, with `loss_fn(model, batch)`; only
  the `wrt` variables are clipped (and later noised). The clipped sum is then
  an `nnx.State` of those variables, each holding a `ClippedGrads` of its own
  array, which `nnx.Optimizer(model, tx, wrt=...).update(model, grads)` passes
  to `dp_aggregate` (which gathers them into one): the swap is
  `optimizer.update(model, clipped_grads(loss_fn, C)(model, batch, mask))`.
  Random streams and `nnx.BatchNorm` as in `value_and_per_example_grads`.
  Book-keeping covers `nnx.Linear`, `nnx.Conv`, `nnx.Embed` and `nnx.RNN`
  over `nnx.GRUCell`/`LSTMCell`/`SimpleCell` (see `optax_dp._flax._nnx_layers`); `"auto"` computes per-example gradients for the other
  parameters (norms, attention, a Param used directly, shared layers) and
  says which, once (`PerExampleFallbackWarning`); `"ghost"` raises naming
  them.

  Returns:
    `fn(params, batch, mask=None) -> (losses, ClippedGrads)`.

  References:
    Bu, Wang, Zha & Karypis 2023, "Differentially Private Optimization on Large
    Model at Small Cost", https://arxiv.org/abs/2210.00038 (book-keeping).

  Examples:
    >>> import jax.numpy as jnp, optax_dp
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch[:, :2] @ params["w"] - batch[:, 2]) ** 2)
    >>> fn = optax_dp.value_and_clipped_grads(loss_fn, l2_norm_clip=1.0)
    >>> losses, clipped = fn({"w": jnp.zeros(2)}, jnp.ones((5, 3)))
    >>> losses.shape, clipped.batch_size, [round(float(v), 3) for v in clipped.clipped_sum["w"]]
    ((5,), 5, [-3.536, -3.536])
  """
  clip = _clip_norms.as_clip_norm(l2_norm_clip)
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  if microbatch_size is not None and (
      isinstance(microbatch_size, bool) or not isinstance(microbatch_size, int)
      or microbatch_size < 1):
    raise ValueError(
        f"microbatch_size must be a positive int or None, got {microbatch_size!r}.")

  def fn(params, batch, mask=None, *, l2_norm_clip=None, rngs=None):
    batch, mask = _per_example.unmask(batch, mask)
    current = l2_norm_clip
    norms, clip_norm = _clip_norms.clip_norms_now(clip, current)   # checks `current`
    if not _nnx.is_module(params):
      _nnx.refuse_nnx_options("clipped_grads", wrt=wrt, rngs=rngs)
      safe = _per_example.partitioner_check(loss_fn, has_aux, params, batch, mask)
      split = _devices.explicit_split_mesh(params)
      if split is not None and safe():   # parameters split over an explicit axis
        return auto_axes_run(split)(params, batch, mask, current)
      route = _devices.batch_route(batch, safe)
      if route is not None:
        return on_devices(fn, route)(params, batch, mask, l2_norm_clip=current)
      return one_device(params, batch, mask, norms, clip_norm, safe)
    values, clipped = _nnx.call(
        lambda pure: functools.partial(value_and_clipped_grads(
            pure, clip, method=method, has_aux=has_aux,
            microbatch_size=microbatch_size), l2_norm_clip=current),
        loss_fn, params, batch, mask, wrt, "clipped_grads", rngs=rngs)
    return values, _nnx.as_optimizer_grads(clipped)

  def auto_axes_run(mesh):
    """`fn` with the mesh's explicit axes turned Auto, so XLA's partitioner
    keeps each parameter split as the user placed it (`_devices.with_auto_axes`):
    the clipped sum comes back split like the parameters, the rest replicated."""
    def inner(params, batch, mask, current):
      return fn(params, batch, mask, l2_norm_clip=current)

    def out_sharding(params, batch, mask, current):
      replicated = NamedSharding(mesh, P())
      values, clipped = jax.eval_shape(
          jax.sharding.auto_axes(inner, out_sharding=replicated), params, batch, mask,
          current)
      everywhere = lambda tree: jax.tree.map(lambda _: replicated, tree)
      return everywhere(values), dataclasses.replace(
          everywhere(clipped), clipped_sum=_devices.shardings_of(params, mesh))

    return _devices.with_auto_axes(inner, mesh, out_sharding)

  def one_device(params, batch, mask, norms, clip_norm, safe=None):
    batch_size = _per_example.batch_rows(batch)
    params = _devices.local_params(params, batch, "clipped_grads", safe)
    if mask is None:
      mask = jnp.ones((batch_size,), bool)
    elif _units.examples_per_unit(mask) is None:
      mask = _per_example.check_mask(mask, batch_size)
    else:   # users x examples (a user-level sampler's batch): one unit per user
      _units.check_unit_batch(batch, jnp.shape(mask), "clipped_grads")
      mask = jnp.asarray(mask).astype(bool)
    k = _units.examples_per_unit(mask)
    groups = _clip_norms.leaf_groups(clip, params)

    def chunk_fn(params, batch, mask):
      return _bookkeeping.clipped_chunk(loss_fn, has_aux, groups, norms, method,
                                        params, batch, mask)

    # Trace-time check: a Linen BatchNorm in training mode is not per-example
    # (see _linen.no_cross_example_layers). It covers every method,
    # including the ghost path's discovery trace, which runs first.
    with _linen.no_cross_example_layers("clipped_grads"):
      if microbatch_size is None or microbatch_size >= batch_size:
        values, summed, nonfinite, unclipped = chunk_fn(params, batch, mask)
      else:
        values, summed, nonfinite, unclipped = _scan_chunks(
            chunk_fn, params, batch, mask, microbatch_size, batch_size)
    return (_per_example.batch_aux(values, has_aux) if k is None else values), ClippedGrads(
        clipped_sum=summed, nonfinite_examples=nonfinite, l2_norm_clip=clip,
        batch_size=batch_size, clip_norm=clip_norm,
        unclipped_count=None if clip_norm is None else unclipped,
        privacy_unit="example" if k is None else "user")

  return fn


def on_devices(fn: _per_example.BatchGradFn, route: _devices.BatchRoute,
               reduce: bool = True) -> _per_example.BatchGradFn:
  """`fn(params, batch, mask) -> (values, ClippedGrads)` run on each device of
  `route` for its slice of the batch, inside `jax.shard_map` (parameters
  replicated, batch and mask split along `route.axes`), the clipped sums and
  non-finite counts then summed across those devices in ONE all-reduce: the
  only cross-device traffic. The result is the global batch's `ClippedGrads`,
  replicated, so the `dp_aggregate` that follows draws the noise once. With
  `reduce=False` (one axis only) each device's own sum instead, stacked on a
  leading per-device axis and marked `unreduced_axis` (for `dp_accumulate(...,
  mesh=)`). The builders route here by themselves (`_devices.batch_route`);
  `sharded_value_and_clipped_grads` with its mesh.

  Privacy contract: every real row of the global batch is clipped once, on
  one device; the reduced sum equals the one-device sum up to float
  summation order."""
  if not reduce and len(route.axes) != 1:
    raise ValueError(f"per-device sums need one mesh axis, got {route.axes}.")

  def local(params, batch, mask, kwargs):
    values, clipped = fn(params, batch, mask, **kwargs)
    if reduce:
      clipped = _devices.psum_clipped(clipped, route.axes)
    else:   # this device's own sum: one row of a leading per-device axis
      clipped = dataclasses.replace(clipped, **jax.tree.map(
          lambda x: x[None], {"clipped_sum": clipped.clipped_sum,
                              "nonfinite_examples": clipped.nonfinite_examples,
                              "unclipped_count": clipped.unclipped_count}))
    return values, dataclasses.replace(
        clipped, batch_size=clipped.batch_size * route.devices,
        unreduced_axis=None if reduce else route.axes[0])

  def run(params, batch, mask=None, **kwargs):
    mask = (jnp.ones((_per_example.batch_rows(batch),), bool) if mask is None
            else mask)
    spec = route.spec()
    params, (batch, mask) = (_devices.on_route(params, route, P()),
                             _devices.on_route((batch, mask), route, spec))
    return jax.shard_map(local, mesh=route.mesh, in_specs=(P(), spec, spec, P()),
                         out_specs=(spec, P() if reduce else spec))(params, batch, mask, kwargs)

  return run


def clipped_grads(
    loss_fn: _per_example.LossFn,
    l2_norm_clip: _clip_norms.ClipNormLike,
    **options: Unpack[ClipOptions],
) -> _per_example.ClippedGradFn[Any]:
  """The clipped gradient sum of an ordinary batched loss, for `dp_aggregate`.

  Same as `value_and_clipped_grads`, with the same keyword options (`method`,
  `has_aux`, `microbatch_size`: `optax_dp.ClipOptions`), but returns only the
  `ClippedGrads` (or `(ClippedGrads, aux)` with `has_aux`):
  `fn(params, batch, mask=None)`. It
  replaces `per_example_grads(loss_fn)` in a train step, nothing else changes.
  Privacy contract: each real example (mask True) contributes at most
  `l2_norm_clip` to the sum; `dp_aggregate` with the same clip adds the noise.

  References:
    Bu, Wang, Zha & Karypis 2023, https://arxiv.org/abs/2210.00038.

  Examples:
    >>> import jax.numpy as jnp, optax_dp
    >>> def loss_fn(params, batch):
    ...   return jnp.mean((batch[:, :2] @ params["w"] - batch[:, 2]) ** 2)
    >>> grad_fn = optax_dp.clipped_grads(loss_fn, l2_norm_clip=1.0)
    >>> mask = jnp.array([True, True, True, False])   # the last row is padding
    >>> clipped = grad_fn({"w": jnp.zeros(2)}, jnp.ones((4, 3)), mask)
    >>> [round(float(v), 3) for v in clipped.clipped_sum["w"]]  # 3 examples, norm 1 each
    [-2.121, -2.121]
  """
  value_and_clipped = value_and_clipped_grads(loss_fn, l2_norm_clip, **options)
  has_aux = options.get("has_aux", False)

  def fn(params, batch, mask=None, *, l2_norm_clip=None, rngs=None):
    values, clipped = value_and_clipped(params, batch, mask, l2_norm_clip=l2_norm_clip,
                                        rngs=rngs)
    return (clipped, values[1]) if has_aux else clipped

  return fn


def _scan_chunks(chunk_fn, params, batch, mask, microbatch_size, batch_size):
  """Runs chunk_fn over sequential chunks, summing clipped sums; pads with masked rows."""
  num = -(-batch_size // microbatch_size)
  padded = num * microbatch_size
  pad = padded - batch_size

  def pad_rows(x):
    if pad == 0:
      return x
    return jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)], axis=0)

  chunks = jax.tree.map(lambda x: pad_rows(x).reshape((num, microbatch_size) + x.shape[1:]),
                        batch)
  mask_chunks = jnp.concatenate([mask, jnp.zeros((pad,) + mask.shape[1:], bool)]).reshape(
      (num, microbatch_size) + mask.shape[1:])

  def body(carry, xs):
    chunk, chunk_mask = xs
    values, summed, nonfinite, unclipped = chunk_fn(params, chunk, chunk_mask)
    total, count, unclipped_total = carry
    return (jax.tree.map(jnp.add, total, summed), count + nonfinite,
            unclipped_total + unclipped), values

  # The running total is in the clipped sums' dtype (float32 or wider), not
  # the params' (a bfloat16 carry would not match the chunks' float32 sums).
  init = _devices.make_varying(
      (jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _bookkeeping.compute_dtype_of(p)), params),
       jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)),
      _devices.varying_axes(batch))
  (summed, nonfinite, unclipped), values = jax.lax.scan(body, init, (chunks, mask_chunks))
  values = jax.tree.map(lambda v: v.reshape((padded,) + v.shape[2:])[:batch_size], values)
  return values, summed, nonfinite, unclipped
