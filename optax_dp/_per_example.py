"""Per-example gradients of an ordinary batched loss function."""

from __future__ import annotations

from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp

LossFn = Callable[..., Any]  # loss_fn(params, batch) -> scalar (or (scalar, aux))


def _batch_size(batch: chex.ArrayTree) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("per_example_grads: the batch is empty (no array leaves).")
  sizes = set()
  for leaf in leaves:
    shape = jnp.shape(leaf)
    if len(shape) == 0:
      raise ValueError(
          "per_example_grads: every leaf of the batch needs a leading batch "
          f"axis, got a scalar leaf. Batch leaf shapes: "
          f"{[jnp.shape(x) for x in leaves]}.")
    sizes.add(shape[0])
  if len(sizes) != 1:
    raise ValueError(
        "per_example_grads: batch leaves have different leading dimensions "
        f"{sorted(sizes)}; every leaf must hold one row per example.")
  return sizes.pop()


def _check_mask(mask, batch_size: int) -> jax.Array:
  mask = jnp.asarray(mask)
  if mask.shape != (batch_size,):
    raise ValueError(
        f"per_example_grads: mask must have shape ({batch_size},), one entry "
        f"per example, got {mask.shape}.")
  return mask.astype(bool)


def _zero_masked(tree: chex.ArrayTree, mask: jax.Array) -> chex.ArrayTree:
  """Zeroes rows where mask is False (`where`, so NaN in padding cannot leak)."""

  def zero(x):
    m = mask.reshape((-1,) + (1,) * (jnp.ndim(x) - 1))
    return jnp.where(m, x, jnp.zeros_like(x))

  return jax.tree.map(zero, tree)


def value_and_per_example_grads(
    loss_fn: LossFn,
    *,
    has_aux: bool = False,
    microbatch_size: Optional[int] = None,
) -> Callable[..., Any]:
  """Per-example losses and gradients of an ordinary batched loss.

  `loss_fn(params, batch)` is the loss you would give `jax.value_and_grad`: it
  takes a batch (any pytree whose leaves all have a leading batch axis) and
  returns the mean loss (and, with `has_aux`, an auxiliary value). Each example
  is evaluated as a batch of one, `loss_fn(params, example[None])`, under
  `jax.vmap`, so the loss code stays as it is. A loss that mixes examples
  (BatchNorm in training mode, in-batch negatives) is not per-example and must
  not be used for DP-SGD.

  Args:
    loss_fn: `loss_fn(params, batch) -> loss` or `-> (loss, aux)`.
    has_aux: whether `loss_fn` returns `(loss, aux)`.
    microbatch_size: if set, the batch is processed in sequential chunks of
      this many examples (`jax.lax.map` with `batch_size`), which bounds the
      memory of the per-example gradients being built; the numbers are the
      same as without it.

  Returns:
    `fn(params, batch, mask=None)` returning `(losses, grads)`, or
    `((losses, aux), grads)` with `has_aux`, where `losses` has shape `(B,)`,
    every leaf of `grads` has shape `(B, *param.shape)` and `aux` has a leading
    batch axis (the aux of each batch of one, stacked: shape `(B, *aux_shape)`).
    `mask` (shape `(B,)`, bool or 0/1) marks real examples: rows
    where it is False (padding) get zero gradients and zero loss.
  """
  if microbatch_size is not None and (
      isinstance(microbatch_size, bool) or not isinstance(microbatch_size, int)
      or microbatch_size < 1):
    raise ValueError(
        f"microbatch_size must be a positive int or None, got {microbatch_size!r}.")

  def single_example_loss(params, example):
    return loss_fn(params, jax.tree.map(lambda x: x[None], example))

  value_and_grad = jax.value_and_grad(single_example_loss, has_aux=has_aux)

  def fn(params, batch, mask=None):
    batch_size = _batch_size(batch)
    if microbatch_size is None or microbatch_size >= batch_size:
      values, grads = jax.vmap(value_and_grad, in_axes=(None, 0))(params, batch)
    else:
      values, grads = jax.lax.map(
          lambda example: value_and_grad(params, example), batch,
          batch_size=microbatch_size)
    if mask is not None:
      mask = _check_mask(mask, batch_size)
      grads = _zero_masked(grads, mask)
      if has_aux:
        values = (_zero_masked(values[0], mask), values[1])
      else:
        values = _zero_masked(values, mask)
    return values, grads

  return fn


def per_example_grads(
    loss_fn: LossFn,
    *,
    has_aux: bool = False,
    microbatch_size: Optional[int] = None,
) -> Callable[..., Any]:
  """Per-example gradients of an ordinary batched loss, for `dp_aggregate`.

  Same contract as `value_and_per_example_grads`, returning only the gradients:
  `fn(params, batch, mask=None) -> grads`, or `-> (grads, aux)` with `has_aux`
  (like `jax.grad`). Every leaf of `grads` has shape `(B, *param.shape)`.
  """
  value_and_grads = value_and_per_example_grads(
      loss_fn, has_aux=has_aux, microbatch_size=microbatch_size)

  def fn(params, batch, mask=None):
    values, grads = value_and_grads(params, batch, mask)
    if has_aux:
      return grads, values[1]
    return grads

  return fn
