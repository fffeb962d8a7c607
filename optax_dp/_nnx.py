"""The Flax NNX adapter: an `nnx.Module` as the first argument of the gradient builders.

`per_example_grads`, `value_and_per_example_grads`, `clipped_grads` and
`value_and_clipped_grads` take `params` as any pytree; given an `nnx.Module`
instead, they call this adapter, which

* splits the model into the variables trained (the `wrt` filter, default
  `nnx.Param`; e.g. `nnx.LoRAParam` to fine-tune LoRA adapters of a frozen
  model) and the rest, and runs the framework-neutral builder on the pure
  function `loss_fn(nnx.merge(graphdef, trained, rest), batch)` of the trained
  variables: only they get per-example gradients, clipping and noise; the
  others are read, never trained;
* gives every example its own random streams: each `nnx.RngStream` of the
  model (dropout's, ...) is advanced once per call, exactly as one batched
  training step would advance it, and example i draws from
  `fold_in(that step's key, i)`, so per-example evaluation (each example a
  batch of one) still gives every example an independent dropout mask, as in
  ordinary batched training, and the next step new ones;
* refuses `nnx.BatchNorm` in training mode (its statistics would be those of a
  batch of one, and one example's output would depend on the others);
* returns what `nnx.Optimizer.update(model, grads)` accepts: an `nnx.State` of
  the trained variables. For a clipped sum, each variable holds a
  `ClippedGrads` of its own array (the clip norm, batch size and non-finite
  count ride along, as `nnx.Optimizer` keeps only the `wrt` variables of what
  it is given); `dp_aggregate` and `dp_accumulate` gather them back into one
  `ClippedGrads` (`optax_dp._clipping.gather_clipped_leaves`).

Other variables that the model writes while it runs (a call counter, batch
statistics) are not written back: each example's evaluation is a function of
the trained variables, and the writes of B batches of one have no meaning for
the model. flax is imported lazily: the core never needs it.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from optax_dp import _clipping


def _nnx():
  """`flax.nnx`, or None without flax (lazy: flax is optional for the core)."""
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    return None
  return nnx


def is_module(x: Any) -> bool:
  """Whether `x` is a Flax NNX module (never imports flax: without flax.nnx
  loaded, nothing can be one)."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.Module)


def _streams(model) -> list:
  """The model's `nnx.RngStream`s, each once, in graph order."""
  nnx = _nnx()
  seen, out = set(), []
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.RngStream) and id(node) not in seen:
      seen.add(id(node))
      out.append(node)
  return out


def _batchnorm_trains(module, use_running_average) -> bool:
  value = (module.use_running_average if use_running_average is None
           else use_running_average)
  try:
    return not bool(value)
  except Exception:  # pylint: disable=broad-except  (a tracer: cannot judge)
    return False


@contextlib.contextmanager
def no_batchnorm_in_training(caller: str):
  """Raises ValueError if an `nnx.BatchNorm` runs in training mode inside.

  The NNX twin of `_per_example.no_cross_example_layers` (Linen): per-example
  evaluation sees batches of one, so batch statistics would be one example's.
  Checked while the loss is traced, never inside the compiled step.
  """
  nnx = _nnx()
  original = nnx.BatchNorm.__call__

  def checked(self, x, use_running_average=None, **kwargs):
    if _batchnorm_trains(self, use_running_average):
      raise ValueError(
          f"{caller}: the model calls flax.nnx.BatchNorm in training mode "
          "(use_running_average=False). Per-example gradients evaluate each "
          "example as a batch of one, so BatchNorm's statistics would be that "
          "one example's: a different model from the one trained without "
          "privacy, where BatchNorm mixes the examples of a batch (which "
          "per-example clipping cannot bound). Use nnx.GroupNorm or "
          "nnx.LayerNorm instead, or BatchNorm with use_running_average=True "
          "(frozen statistics; e.g. model.eval() for the norm layers).")
    return original(self, x, use_running_average=use_running_average, **kwargs)

  nnx.BatchNorm.__call__ = checked
  try:
    yield
  finally:
    nnx.BatchNorm.__call__ = original


def call(build: Callable[[Callable[..., Any]], Callable[..., Any]],
         loss_fn: Callable[..., Any], model, batch, mask, wrt: Optional[Any],
         caller: str):
  """Runs `build(pure_loss)(trained, batch', mask)` for an NNX `model`.

  `build` makes a framework-neutral builder's `fn(params, batch, mask)` from a
  loss of `(params, batch)`; here params are the model's `wrt` variables (an
  `nnx.State`) and the batch carries each example's row number alongside, for
  its random streams. Returns what that `fn` returns.
  """
  nnx = _nnx()
  wrt = nnx.Param if wrt is None else wrt
  graphdef, trained, rest = nnx.split(model, wrt, ...)
  # One draw of each stream per step, as a batched step makes (the model's
  # counters advance); example i then uses fold_in(step key, i).
  step_keys = [stream() for stream in _streams(model)]
  leaves = jax.tree.leaves(batch)
  rows = jnp.shape(leaves[0])[0] if leaves and jnp.ndim(leaves[0]) else 0

  def pure_loss(trained_state, indexed_batch):
    example_batch, index = indexed_batch
    local = nnx.merge(graphdef, trained_state, rest, copy=True)
    row = jnp.reshape(index, (-1,))[0]
    for stream, key in zip(_streams(local), step_keys):
      stream.key[...] = jax.random.fold_in(key, row)
      stream.count[...] = jnp.zeros_like(stream.count[...])
    return loss_fn(local, example_batch)

  with no_batchnorm_in_training(caller):
    return build(pure_loss)(trained, (batch, jnp.arange(rows, dtype=jnp.int32)), mask)


def as_optimizer_grads(clipped: _clipping.ClippedGrads):
  """The `ClippedGrads` of an NNX model as `nnx.Optimizer.update` takes it.

  `nnx.Optimizer.update(model, grads)` keeps only the `wrt` variables of
  `grads` (`nnx.state(grads, wrt)`) and hands their values to the optax chain:
  each variable therefore holds a `ClippedGrads` of its own array, with the
  batch's clip norm, size and non-finite count, which `dp_aggregate` gathers
  back into one.
  """
  nnx = _nnx()

  def per_variable(variable):
    return variable.replace(_clipping.ClippedGrads(
        clipped_sum=variable[...], nonfinite_examples=clipped.nonfinite_examples,
        l2_norm_clip=clipped.l2_norm_clip, batch_size=clipped.batch_size))

  return jax.tree.map(per_variable, clipped.clipped_sum,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
