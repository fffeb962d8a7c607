"""Virtual (logical) batches: accumulate clipped sums, add noise once.

Large logical batches are how DP-SGD reaches good accuracy (De et al. 2022,
"Unlocking High-Accuracy Differentially Private Image Classification through
Scale", arXiv 2204.13650), and memory limits physical batches. Because the
clipped sum over a logical batch is the sum of the clipped sums over its
physical pieces, accumulating *clipped sums* and noising once is exactly the
mechanism of one logical step. Accumulating raw gradients, averaging them, or
noising each piece are not (optax issues #515 and #527; TF Privacy's
`gradient_accumulation_steps` adds noise at every piece).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from optax_dp._aggregation import _aggregate
from optax_dp._core import _checks
from optax_dp._clip import _clipping
from optax_dp._core import _devices


class DPAccumulateState(NamedTuple):
  """State of `dp_accumulate`.

  Attributes:
    micro_step: int32 in [0, k): physical batches accumulated so far in the
      current logical batch.
    clipped_sum: float32 (or wider) tree like the params: the running clipped
      sum of the current logical batch, WITHOUT noise: not private. It is
      zero at logical-batch boundaries (`micro_step == 0`); checkpoint there
      (the MNIST example does), or treat a mid-batch checkpoint as raw data.
      With `mesh=`: each leaf has a leading axis of one entry per device,
      split over the mesh axis (each device's own running sum).
    nonfinite_examples: int32, examples dropped so far in this logical batch
      (with `mesh=`: per device, shape `(devices,)`).
    inner_state: the wrapped optimizer's state (its `dp_aggregate` counts
      logical steps).
    unclipped_count: adaptive clipping only (`()` otherwise): float32, the
      running unclipped count of this logical batch (not private, like
      `clipped_sum`).
  """
  micro_step: jax.Array
  clipped_sum: Any
  nonfinite_examples: jax.Array
  inner_state: Any
  unclipped_count: Any = ()


clip_and_sum = _clipping.clip_and_sum  # the clipping rules' home


def dp_accumulate(tx: optax.GradientTransformation, accumulation_steps: int,
                  *, mesh: Optional[jax.sharding.Mesh] = None,
                  axis_name: str = "data") -> optax.GradientTransformation:
  """Runs `tx` once per logical batch of `accumulation_steps` physical batches.

  `tx` must start with `optax_dp.dp_aggregate` (e.g. `optax.chain(
  dp_aggregate(...), optax.sgd(...))`). Each update takes the `ClippedGrads`
  of one physical batch (`optax_dp.clipped_grads`, or `clip_and_sum` of
  per-example gradients) and adds its clipped sum to an accumulator in the
  state. On every k-th update it passes the logical batch's clipped sum to
  `tx`, whose `dp_aggregate` adds the noise once (std `noise_multiplier *
  l2_norm_clip` on the sum) and normalises by its `expected_batch_size`, which
  must be the expected *logical* batch size. The other k-1 updates return
  zeros and leave `tx`'s state (momentum, noise key, step counter) untouched,
  as `optax.MultiSteps` does, so parameters move once per logical batch.

  Privacy: k physical updates are exactly one DP-SGD step on their union,
  so the accountant counts logical steps (`dp_aggregate`'s `state.step`) with
  the logical batch's sampler: draw logical batches from the sampler and split
  them with `sampler.batches(..., accumulation_steps=k)`.

  Data parallel, one all-reduce per logical batch: with `mesh=`, each update
  takes the per-device clipped sums of `sharded_clipped_grads(loss_fn, C,
  mesh=mesh, axis_name=axis_name, reduce=False)` and adds them up on each
  device (no communication); the k-th update sums the accumulators of all
  devices (and their non-finite counts) in ONE all-reduce of the parameters'
  size, and only that global sum reaches `tx`'s `dp_aggregate`, which adds
  the noise once, as without `mesh`. The default `sharded_clipped_grads`
  all-reduces every physical batch: k all-reduces per logical batch. The
  accumulator then holds `devices` copies of the parameters' size, split over
  the devices (one per device). Per-device sums without `mesh=`, or global
  sums with it, are refused (`ValueError`).

  Checkpoints: save at logical-batch boundaries (`state.micro_step == 0`),
  where the accumulator is zero; mid-batch it holds an unnoised sum.

  Why not `optax.MultiSteps(optax.chain(dp_aggregate(...), ...))`: MultiSteps
  accumulates its *inputs*, which would be per-example gradients (their rows
  do not line up across batches) or a sum without the clipping type that lets
  `dp_aggregate` check the sensitivity. It raises on both, rather than
  running a wrong mechanism (tested).

  Args:
    tx: the optimizer to run on logical batches, starting with dp_aggregate.
    accumulation_steps: k >= 1, physical batches per logical batch.
    mesh: the `jax.sharding.Mesh` of `sharded_clipped_grads(..., reduce=False)`,
      whose per-device sums this then accumulates (default None: global sums).
    axis_name: the mesh axis the batch is split over (with `mesh`).

  Returns:
    An `optax.GradientTransformation` whose state is a `DPAccumulateState`.

  References:
    De et al. 2022, "Unlocking High-Accuracy Differentially Private Image
    Classification through Scale", https://arxiv.org/abs/2204.13650 (large
    logical batches).

  Examples:
    >>> import jax.numpy as jnp, optax, optax_dp
    >>> inner = optax.chain(optax_dp.dp_aggregate(1.0, 1.1, key=0,
    ...                                           expected_batch_size=8),
    ...                     optax.sgd(0.1))
    >>> tx = optax_dp.dp_accumulate(inner, accumulation_steps=2)
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> half = optax_dp.clip_and_sum({"w": jnp.ones((4, 3))}, 1.0)
    >>> first, state = tx.update(half, state, params)    # held: zeros
    >>> second, state = tx.update(half, state, params)   # released, noised once
    >>> bool(jnp.all(first["w"] == 0)), int(state.micro_step)
    (True, 0)
  """
  k = _checks.check_int("accumulation_steps", accumulation_steps, 1)
  per_device = _per_device_layout(mesh, axis_name)

  def init_fn(params):
    acc = jax.tree.map(
        lambda p: jnp.zeros(jnp.shape(p), _clipping.compute_dtype(_clipping.leaf_dtype(p))),
        params)
    nonfinite = jnp.zeros([], jnp.int32)
    if per_device is not None:
      acc, nonfinite = per_device.zeros((acc, nonfinite))
    inner = tx.init(params)
    adaptive = _aggregate.adaptive_clip_norm(inner) is not None
    if adaptive and per_device is not None:
      raise ValueError(
          "dp_accumulate(mesh=...) with adaptive clipping (optax_dp.AdaptiveClip) "
          "is not supported: accumulate without mesh= (the clipped sums are then "
          "summed across devices each physical batch), or use a fixed l2_norm_clip.")
    return DPAccumulateState(micro_step=jnp.zeros([], jnp.int32), clipped_sum=acc,
                             nonfinite_examples=nonfinite, inner_state=inner,
                             unclipped_count=jnp.zeros([], jnp.float32) if adaptive else ())

  def update_fn(updates, state, params=None):
    updates = _clipping.gather_clipped_leaves(updates)  # NNX: one per parameter
    if not isinstance(updates, _clipping.ClippedGrads):
      raise ValueError(
          "dp_accumulate takes the ClippedGrads of each physical batch: use "
          "optax_dp.clipped_grads(loss_fn, l2_norm_clip), or "
          "optax_dp.clip_and_sum(per_example_grads, l2_norm_clip). Accumulating "
          "raw per-example gradients would mix examples across batches.")
    _check_layout(updates, state, mesh, axis_name)
    current = _aggregate.adaptive_clip_norm(state.inner_state)
    if (updates.clip_norm is None) != (current is None):
      raise ValueError(
          "dp_accumulate: the clipped sum and the dp_aggregate inside disagree on "
          "adaptive clipping: build both with the same l2_norm_clip.")
    unclipped = ()
    if current is not None:   # every physical batch clipped with the state's norm
      _checks.raise_if(
          updates.clip_norm != current, _checks.AdaptiveClipMismatchError,
          "dp_accumulate: a physical batch was clipped with another clip norm than "
          "the adaptive one of the optimizer state. Pass "
          "l2_norm_clip=optax_dp.l2_norm_clip_of(opt_state) every step.")
      unclipped = state.unclipped_count + updates.unclipped_count
    acc = jax.tree.map(lambda a, s: a + s.astype(a.dtype), state.clipped_sum,
                       updates.clipped_sum)
    nonfinite = state.nonfinite_examples + updates.nonfinite_examples
    if per_device is not None:   # stays on each device: no communication
      acc, nonfinite = per_device.constrain((acc, nonfinite))

    def release(_):
      # batch_size=None: the logical batch's size is not a static public
      # constant (physical shapes may vary with padding), so dp_aggregate must
      # normalise by its expected_batch_size (or budget), and refuses otherwise.
      logical = _clipping.ClippedGrads(
          clipped_sum=acc, nonfinite_examples=nonfinite,
          l2_norm_clip=updates.l2_norm_clip, batch_size=None,
          unreduced_axis=updates.unreduced_axis, clip_norm=updates.clip_norm,
          unclipped_count=unclipped if current is not None else None,
          privacy_unit=updates.privacy_unit)
      # Per-device sums: the one all-reduce of the logical batch, before the
      # noise (dp_aggregate refuses an unreduced sum).
      logical = _devices.reduce_clipped_grads(logical, mesh)
      out, inner = tx.update(logical, state.inner_state, params)
      return (out, inner, jax.tree.map(jnp.zeros_like, acc),
              jnp.zeros_like(nonfinite), jnp.zeros([], jnp.int32),
              jax.tree.map(jnp.zeros_like, unclipped))

    out_shape = jax.eval_shape(release, None)[0]

    def hold(_):
      out = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
      return out, state.inner_state, acc, nonfinite, state.micro_step + 1, unclipped

    releasing = state.micro_step == k - 1
    if isinstance(releasing, jax.core.Tracer):
      out, inner, acc, nonfinite, micro, unclipped = jax.lax.cond(
          releasing, release, hold, None)
    else:
      # Outside a trace, pick the branch in Python: the inner dp_aggregate then
      # runs eagerly too, so its checks raise their own exception types
      # (PrivacyBudgetExceededError, NoiseReplayError) rather than a
      # JaxRuntimeError from a host callback inside lax.cond.
      out, inner, acc, nonfinite, micro, unclipped = (
          release if bool(releasing) else hold)(None)
      micro = jnp.asarray(micro, jnp.int32)
    return out, DPAccumulateState(micro_step=micro, clipped_sum=acc,
                                  nonfinite_examples=nonfinite, inner_state=inner,
                                  unclipped_count=unclipped)

  return optax.GradientTransformation(init_fn, update_fn)


class _PerDevice(NamedTuple):
  """The per-device accumulator's layout: a leading axis of `devices` entries
  split over `mesh[axis_name]`."""
  devices: int
  sharding: NamedSharding

  def zeros(self, tree):
    """Zeros shaped `(devices, *leaf.shape)`, created in place on the devices
    (jit with out_shardings: also right when several processes share the mesh)."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((self.devices,) + jnp.shape(x),
                                                         jnp.result_type(x)), tree)
    make = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.jit(make, out_shardings=self.sharding)()

  def constrain(self, tree):
    return jax.lax.with_sharding_constraint(tree, self.sharding)


def _per_device_layout(mesh, axis_name) -> Optional[_PerDevice]:
  if mesh is None:
    return None
  if not isinstance(mesh, jax.sharding.Mesh) or axis_name not in mesh.shape:
    raise ValueError(
        f"dp_accumulate(mesh=...) needs a jax.sharding.Mesh with axis "
        f"{axis_name!r} (the axis_name of sharded_clipped_grads), got {mesh!r}.")
  return _PerDevice(mesh.shape[axis_name], NamedSharding(mesh, P(axis_name)))


def _check_layout(updates, state, mesh, axis_name) -> None:
  """Per-device sums only with `mesh=` (on its axis), global sums only without;
  leaf shapes must match the accumulator's (static checks)."""
  axis = updates.unreduced_axis
  if mesh is None and axis is not None:
    raise ValueError(
        "dp_accumulate got per-device clipped sums (sharded_clipped_grads(..., "
        "reduce=False)) but was built without mesh=: build it with "
        "optax_dp.dp_accumulate(tx, k, mesh=mesh, axis_name="
        f"{axis!r}), which sums them across devices once per logical batch.")
  if mesh is not None and axis != axis_name:
    got = ("a global clipped sum" if axis is None
           else f"per-device sums on mesh axis {axis!r}")
    raise ValueError(
        f"dp_accumulate(mesh=..., axis_name={axis_name!r}) accumulates the "
        "per-device clipped sums of sharded_clipped_grads(..., mesh=mesh, "
        f"axis_name={axis_name!r}, reduce=False); got {got}.")
  if jax.tree.structure(updates.clipped_sum) != jax.tree.structure(state.clipped_sum):
    raise ValueError("dp_accumulate: the clipped sum's tree does not match params.")
  for s, a in zip(jax.tree.leaves(updates.clipped_sum), jax.tree.leaves(state.clipped_sum)):
    if jnp.shape(s) != jnp.shape(a):
      raise ValueError(
          f"dp_accumulate: clipped sum leaf of shape {jnp.shape(s)} for an "
          f"accumulator of shape {jnp.shape(a)} (per-device sums need as many "
          "devices on the mesh axis as dp_accumulate's mesh).")
