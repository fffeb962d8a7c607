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
* book-keeps `nnx.Linear`, `nnx.Conv` and `nnx.Embed` (below: `discover`,
  `make_example_loss`, `layer_terms`, the NNX twins of `_linen`'s, feeding the
  same `_layer_rules`), other parameters falling back to per-example
  gradients;
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
import dataclasses
import math
import sys
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from optax_dp import _clipping
from optax_dp import _layer_rules


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
         caller: str, advance_streams: bool = True):
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
  step_keys = [stream() if advance_streams
               else jax.random.fold_in(stream.key[...], stream.count[...])
               for stream in _streams(model)]
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

  setattr(pure_loss, NNX_ADAPTER, True)
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


# ---------------------------------------------------------------------------
# Book-keeping for NNX layers: the NNX twin of `_linen`'s discovery, feeding
# the same framework-neutral rules (`_layer_rules`). `_clipped` calls these
# on the pure loss that `call` builds (marked `NNX_ADAPTER`).
#
# Covered: `nnx.Linear` (default dot_general), `nnx.Conv` (one feature group,
# no mask, no input dilation, SAME/VALID or explicit padding) and `nnx.Embed`
# through `__call__` with integer ids, each called exactly once with one array,
# whose parameters are trained leaves owned by that layer alone. Calls are
# intercepted by patching those classes' `__call__` while the loss is traced
# (exact type only: a subclass such as `nnx.LoRALinear` is not intercepted).
# The exactness guard (`_layer_rules.check_covered_unused`) then drops any
# layer whose parameters reach the loss some other way (weight tying through
# `Embed.attend`, a direct use). Everything else falls back per parameter to
# per-example gradients.

NNX_ADAPTER = "optax_dp_nnx_pure_loss"


@dataclasses.dataclass
class Layer:
  """A covered NNX layer call, found by the shape-only trace."""
  path: tuple            # its leaf indices: the same layer in every trace
  leaf_index: dict       # param name ("kernel", "bias", "embedding") -> leaf index
  out_struct: Any
  kind: str              # "dense", "conv" or "embed"
  conv: Optional[dict] = None


def _param_names(module) -> tuple:
  return ("embedding",) if isinstance(module, _nnx().Embed) else ("kernel", "bias")


def _direct(module) -> dict:
  """{name: array} of the layer's own parameter variables (bias may be absent)."""
  out = {}
  for name in _param_names(module):
    variable = getattr(module, name, None)
    if variable is not None:
      out[name] = variable[...]
  return out


def _unit(x) -> bool:
  return x is None or (x == 1 if isinstance(x, int) else all(v == 1 for v in x))


def _kind(module, args, kwargs) -> Optional[str]:
  nnx = _nnx()
  if kwargs or len(args) != 1 or not hasattr(args[0], "shape"):
    return None
  if (type(module) is nnx.Linear and module.dot_general is jax.lax.dot_general
      and module.preferred_element_type is None):
    return "dense"
  if (type(module) is nnx.Conv and module.feature_group_count == 1 and module.mask is None
      and module.conv_general_dilated is jax.lax.conv_general_dilated
      and module.preferred_element_type is None and _unit(module.input_dilation)
      and (not isinstance(module.padding, str) or module.padding in ("SAME", "VALID"))):
    return "conv"
  if type(module) is nnx.Embed and jnp.issubdtype(jnp.result_type(args[0]), jnp.integer):
    return "embed"
  return None


@contextlib.contextmanager
def _intercept(handler):
  """Routes calls of nnx.Linear/Conv/Embed (exact types) through `handler`."""
  nnx = _nnx()
  classes = (nnx.Linear, nnx.Conv, nnx.Embed)
  originals = {cls: cls.__call__ for cls in classes}

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
      cls.__call__ = original


def discover(loss_fn, params, example, has_aux, exclude=frozenset()) -> list:
  """Finds the covered NNX layers (shape-only trace of one example)."""
  del has_aux
  calls: dict = {}

  def run(params, example):
    ids = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(params))}

    def handler(module, original, args, kwargs):
      out = original(module, *args, **kwargs)
      index = {name: ids.get(id(v)) for name, v in _direct(module).items()}
      entry = calls.setdefault(id(module), [module, index, [], None, None])
      entry[2].append(_kind(module, args, kwargs))
      entry[3] = jax.tree.map(lambda o: jax.ShapeDtypeStruct(jnp.shape(o), jnp.result_type(o)), out)
      entry[4] = jnp.shape(args[0]) if args else None
      return out

    with _intercept(handler):
      return loss_fn(params, jax.tree.map(lambda x: x[None], example))

  jax.eval_shape(run, params, example)
  layers = []
  for module, index, kinds, out_struct, in_shape in calls.values():
    kind = kinds[0]
    path = tuple(sorted(i for i in index.values() if i is not None))
    if (len(kinds) != 1 or kind is None or None in index.values() or path in exclude
        or not isinstance(out_struct, jax.ShapeDtypeStruct)):
      continue
    if kind == "embed":
      vocab, features = module.embedding[...].shape
      positions = math.prod(in_shape)
      if positions * positions > vocab * features:   # the ghost form would cost more
        continue
    conv = None
    if kind == "conv":
      conv = dict(kernel_size=module.kernel_size, strides=module.strides,
                  kernel_dilation=module.kernel_dilation, padding=module.padding)
    layers.append(Layer(path=path, leaf_index=index, out_struct=out_struct, kind=kind,
                        conv=conv))
  owners: dict = {}
  for layer in layers:
    for i in layer.leaf_index.values():
      owners[i] = owners.get(i, 0) + 1
  return [l for l in layers if all(owners[i] == 1 for i in l.leaf_index.values())]


def make_example_loss(loss_fn, layers, has_aux, params_treedef, num_leaves):
  """`_linen.make_example_loss`'s NNX twin: covered layers computed from their
  own parameters (`layer_params`), their inputs recorded, a zero perturbation
  `zs` added to their outputs (whose gradient is the output gradient)."""
  by_path = {layer.path: k for k, layer in enumerate(layers)}
  covered, uncovered = _layer_rules.split_leaf_indices(layers, num_leaves)

  def example_loss(uncovered_leaves, covered_leaves, layer_params, zs, example):
    leaves = _layer_rules.merge_leaves(num_leaves, (uncovered, uncovered_leaves),
                                       (covered, covered_leaves))
    ids = {id(leaf): i for i, leaf in enumerate(leaves)}
    inputs: list = [None] * len(layers)

    def handler(module, original, args, kwargs):
      direct = _direct(module)
      k = by_path.get(tuple(sorted(ids.get(id(v), -1) for v in direct.values())))
      if k is None or inputs[k] is not None:
        return original(module, *args, **kwargs)
      inputs[k] = [args[0]]
      # Computed from the layer's own copy of its parameters, then put back:
      # any other use of the variables sees the covered leaves, which the
      # exactness guard then finds in the jaxpr.
      for name in direct:
        getattr(module, name)[...] = layer_params[k][name]
      try:
        out = original(module, *args, **kwargs)
      finally:
        for name, value in direct.items():
          getattr(module, name)[...] = value
      return out + zs[k]

    params = jax.tree.unflatten(params_treedef, leaves)
    with _intercept(handler):
      result = loss_fn(params, jax.tree.map(lambda x: x[None], example))
    loss, aux = result if has_aux else (result, None)
    if any(x is None for x in inputs):
      raise RuntimeError("optax_dp ghost clipping: a covered NNX layer was not called.")
    return loss, (aux, inputs)

  return example_loss, covered, uncovered


def layer_terms(layer: Layer, layer_params, inputs, out_grad):
  """(per-example squared norms, `sums(c, keep)`) of one covered NNX layer."""
  use_bias = "bias" in layer.leaf_index
  if layer.kind == "dense":
    return _layer_rules.dense_terms(inputs[0], out_grad, use_bias)
  if layer.kind == "conv":
    return _layer_rules.conv_terms(inputs[0], out_grad, use_bias=use_bias, **layer.conv)
  return _layer_rules.embed_terms(inputs[0], out_grad, layer_params["embedding"].shape[0])
