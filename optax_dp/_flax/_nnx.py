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
* book-keeps every layer (a module holding only its own trained variables,
  called once): `nnx.Linear`, `nnx.LinearGeneral` (so `nnx.MultiHeadAttention`'s
  projections), `nnx.Conv` and `nnx.Embed` by their rules, any other (norms,
  `nnx.Einsum`, custom modules) by a VJP of that layer alone (`_nnx_layers`:
  `discover`, `make_example_loss`, `layer_terms`, the NNX twins of
  `_linen_layers`'s, feeding the same `_layer_rules`), other parameters
  falling back to per-example gradients;
* refuses `nnx.BatchNorm` in training mode (its statistics would be those of a
  batch of one, and one example's output would depend on the others);
* returns what `nnx.Optimizer.update(model, grads)` accepts: an `nnx.State` of
  the trained variables. For a clipped sum, each variable holds a
  `ClippedGrads` of its own array (the clip norm, batch size and non-finite
  count ride along, as `nnx.Optimizer` keeps only the `wrt` variables of what
  it is given); `dp_aggregate` and `dp_accumulate` gather them back into one
  `ClippedGrads` (`optax_dp._clip._clipping.gather_clipped_leaves`).

Other variables that the model writes while it runs (a call counter, batch
statistics) are not written back: each example's evaluation is a function of
the trained variables, and the writes of B batches of one have no meaning for
the model. flax is imported lazily: the core never needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from optax_dp._clip import _clipping
from optax_dp._flax import _adapter


def _nnx():
  """`flax.nnx`, or None without flax (lazy: flax is optional for the core)."""
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel
  except ImportError:  # no flax: tests/core_only, in a core-only venv
    return None
  return nnx


def is_module(x: Any) -> bool:
  """Whether `x` is a Flax NNX module (never imports flax: without flax.nnx
  loaded, nothing can be one)."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.Module)


def refuse_nnx_options(caller: str, *, wrt: Any = None,
                       rngs: Any = None) -> None:
  """For params that are a plain pytree, not an NNX module: ValueError if
  the NNX-only options were given (`rngs=`, then `wrt=`), which would
  otherwise be ignored. The entry points call `call` for a module and this
  for anything else, so each says the same thing."""
  if rngs is not None:
    raise ValueError("rngs= passes an nnx.Rngs to the loss of a Flax NNX model "
                     "(loss_fn(model, batch, rngs)); these params are a plain "
                     "pytree.")
  if wrt is not None:
    raise ValueError(f"{caller}(wrt=...) selects the variables of a Flax NNX "
                     "model; these params are a plain pytree.")


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
  return _adapter.batchnorm_trains(module.use_running_average if use_running_average is None
                                   else use_running_average)


@contextlib.contextmanager
def no_batchnorm_in_training(caller: str):
  """Raises ValueError if an `nnx.BatchNorm` runs in training mode inside.

  The NNX twin of `_linen.no_cross_example_layers`: per-example
  evaluation sees batches of one, so batch statistics would be one example's.
  Checked while the loss is traced, never inside the compiled step.
  """
  nnx = _nnx()
  original = nnx.BatchNorm.__call__

  def checked(self, x, use_running_average=None, **kwargs):
    if _batchnorm_trains(self, use_running_average):
      raise _adapter.batchnorm_error(
          caller, "nnx", hint="; e.g. model.eval() for the norm layers")
    return original(self, x, use_running_average=use_running_average, **kwargs)

  nnx.BatchNorm.__call__ = checked
  try:
    yield
  finally:
    nnx.BatchNorm.__call__ = original


def call(build: Callable[[Callable[..., Any]], Callable[..., Any]],
         loss_fn: Callable[..., Any], model, batch, mask, wrt: Optional[Any],
         caller: str, advance_streams: bool = True, rngs: Any = None):
  """Runs `build(pure_loss)(trained, batch', mask)` for an NNX `model`.

  `build` makes a framework-neutral builder's `fn(params, batch, mask)` from a
  loss of `(params, batch)`; here params are the model's `wrt` variables (an
  `nnx.State`) and the batch carries each example's row number alongside, for
  its random streams. Returns what that `fn` returns.

  Random streams, the model's own and those of a call-time `rngs` (an
  `nnx.Rngs` the caller passes to the gradient function, which hands each
  example's copy to `loss_fn(model, batch, rngs=...)`, Flax's tutorial idiom):
  each stream is drawn once per step (its counter advances, as in a batched
  step), and example i uses `fold_in(step key, i)`, so every example gets its
  own dropout mask.
  """
  nnx = _nnx()
  wrt = nnx.Param if wrt is None else wrt
  if rngs is not None and not isinstance(rngs, (nnx.Rngs, nnx.RngStream)):
    raise TypeError(f"{caller}: rngs= takes an nnx.Rngs (the random streams "
                    f"loss_fn(model, batch, rngs) uses), got {type(rngs).__name__}.")
  graphdef, trained, rest = nnx.split(model, wrt, ...)
  # One draw of each stream per step, as a batched step makes (the model's
  # counters advance); example i then uses fold_in(step key, i).
  def draw(stream):
    return (stream() if advance_streams
            else jax.random.fold_in(stream.key[...], stream.count[...]))

  step_keys = [draw(stream) for stream in _streams(model)]
  if rngs is not None:
    rngs_graphdef, rngs_state = nnx.split(rngs)
    rngs_keys = [draw(stream) for stream in _streams(rngs)]
  leaves = jax.tree.leaves(batch)
  rows = jnp.shape(leaves[0])[0] if leaves and jnp.ndim(leaves[0]) else 0
  # One row number per example: a user-level mask (users, examples) numbers
  # every example of every user.
  index_shape = (tuple(jnp.shape(mask)) if mask is not None and jnp.ndim(mask) == 2
                 else (rows,))

  def reseed(streams, keys, row):
    for stream, key in zip(streams, keys):
      stream.key[...] = jax.random.fold_in(key, row)
      stream.count[...] = jnp.zeros_like(stream.count[...])

  def pure_loss(trained_state, indexed_batch):
    example_batch, index = indexed_batch
    local = nnx.merge(graphdef, trained_state, rest, copy=True)
    row = jnp.reshape(index, (-1,))[0]
    reseed(_streams(local), step_keys, row)
    if rngs is None:
      return loss_fn(local, example_batch)
    local_rngs = nnx.merge(rngs_graphdef, rngs_state, copy=True)
    reseed(_streams(local_rngs), rngs_keys, row)
    return loss_fn(local, example_batch, rngs=local_rngs)

  setattr(pure_loss, NNX_ADAPTER, module_classes(model))
  trace_error = getattr(sys.modules.get("flax.errors"), "TraceContextError", ())
  try:
    with no_batchnorm_in_training(caller):
      index = jnp.arange(math.prod(index_shape), dtype=jnp.int32).reshape(index_shape)
      return build(pure_loss)(trained, (batch, index), mask)
  except trace_error as e:
    raise ValueError(
        f"{caller}: loss_fn changed Flax state created outside it (most often "
        "an nnx.Rngs it closes over, e.g. model(x, rngs=rngs) for dropout): "
        "optax_dp runs the loss once per example, inside jax.vmap, so it must "
        "not mutate outer objects. Pass the Rngs to the gradient function "
        "instead, grad_fn(model, batch, rngs=rngs), with loss_fn(model, batch, "
        "rngs): each example then gets its own streams and your Rngs advances "
        f"once per step. (Flax said: {str(e).splitlines()[0]})") from e


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
    return variable.replace(dataclasses.replace(clipped, clipped_sum=variable[...]))

  return jax.tree.map(per_variable, clipped.clipped_sum,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))



# The pure loss that `call` builds carries the module classes of the model's
# graph under this attribute: `_bookkeeping` picks the NNX book-keeping
# (`_nnx_layers`) by it, which patches `__call__` of those classes
# (`intercept`: NNX's hook, where Linen has `nn.intercept_methods`).
NNX_ADAPTER = "optax_dp_nnx_module_classes"


def module_classes(model) -> tuple:
  """The classes of the modules in `model`'s graph, each once."""
  nnx = _nnx()
  classes: dict = {}
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      classes.setdefault(type(node), None)
  return tuple(classes)


@contextlib.contextmanager
def intercept(classes, handler):
  """Routes `__call__` of instances of `classes` (exact type) through
  `handler(module, original, args, kwargs)`."""
  originals = {cls: cls.__call__ for cls in classes}
  defined = {cls for cls in classes if "__call__" in vars(cls)}

  def patched(cls):
    original = originals[cls]

    def call_(self, *args, **kwargs):
      if type(self) is not cls:
        return original(self, *args, **kwargs)
      return handler(self, original, args, kwargs)
    return call_

  for cls in classes:
    cls.__call__ = patched(cls)
  try:
    yield
  finally:
    for cls, original in originals.items():
      if cls in defined:
        cls.__call__ = original
      else:
        del cls.__call__


# ---------------------------------------------------------------------------
# What dp_aggregate says of an nnx.State it cannot take: the NNX cases of
# `_release.refuse_params_shaped` (the first two) and of the empty-tree error
# of `_clipping.batch_size_of` (registered there on import, below).

def is_state(tree) -> bool:
  return type(tree).__module__.startswith("flax.nnx")


STRIPPED = (
    "nnx.Optimizer.update(model, grads) stripped the ClippedGrads to a plain "
    "nnx.State of its arrays (it calls nnx.state(grads, wrt)), losing the clip "
    "norm and the batch size dp_aggregate needs. It happens to a ClippedGrads "
    "computed on the split-off parameters (a pure loss of params): give the "
    "model itself to the gradient function instead, "
    "optax_dp.clipped_grads(loss_fn, l2_norm_clip)(model, batch) with "
    "loss_fn(model, batch), whose nnx.State of per-variable clipped sums "
    "nnx.Optimizer passes intact. Or pass per-example gradients "
    "(optax_dp.per_example_grads, also passed intact), or update by hand: "
    "params = "
    "nnx.state(model, nnx.Param); updates, opt_state = tx.update(clipped, "
    "opt_state, params); nnx.update(model, optax.apply_updates(params, "
    "updates)).")


def _has_clipped_sum_key(tree) -> bool:
  try:
    return "clipped_sum" in tree.keys()
  except (AttributeError, TypeError):
    return False


def refuse_stripped_state(updates) -> None:
  """ValueError if `updates` is an nnx.State with a `clipped_sum` entry: a
  `ClippedGrads` that `nnx.state` flattened."""
  if is_state(updates) and _has_clipped_sum_key(updates):
    raise ValueError(
        "dp_aggregate got an nnx.State holding 'clipped_sum': a ClippedGrads "
        "from optax_dp.clipped_grads that nnx turned into a State. " + STRIPPED)


def params_shaped_origin(updates) -> Optional[str]:
  """`_release.refuse_params_shaped`'s account of a params-shaped
  nnx.State (None for any other tree)."""
  if not is_state(updates):
    return None
  return ("It is an nnx.State: if it came from optax_dp.clipped_grads, "
          + STRIPPED + " If it came from nnx.grad, those are batch-averaged "
          "gradients: use per-example gradients instead.")


def empty_state_hint(tree) -> str:
  """What `_clipping.batch_size_of` adds for an empty nnx.State."""
  if is_state(tree):
    return (" It is an empty nnx.State: nnx.Optimizer.update(model, grads) "
            "strips a ClippedGrads to the nnx.Param arrays it holds (see the "
            "error dp_aggregate gives for a non-empty one).")
  return ""


_clipping.register_empty_hint(empty_state_hint)
