"""Book-keeping for Flax Linen models: the Linen adapter of `_layer_rules`.

The clipped sum `sum_i clip_C(g_i)` without materialising per-example
gradients of the big layers (Bu, Wang, Zha & Karypis 2023, "Differentially
Private Optimization on Large Model at Small Cost", arXiv 2210.00038; ghost
norms: Goodfellow 2015, Li et al. 2022 arXiv 2110.05679; mixed ghost clipping:
Bu, Mao & Xu 2022, arXiv 2205.10683).

How, without touching the user's model code:

1. A shape-only trace of the loss on one example, under
   `flax.linen.intercept_methods`, finds every module that owns parameters
   directly and is called exactly once (through `__call__`): the *covered*
   layers. Their parameter leaves are located in the params tree by identity.
2. One forward and one backward pass, each example as a batch of one under
   `jax.vmap` (the same semantics as `per_example_grads`): the interceptor
   computes each covered layer from its own parameters, records the layer's
   inputs, and adds a zero perturbation to its output, whose gradient is the
   layer's output gradient. Parameters of uncovered layers get ordinary
   per-example gradients from the same backward pass.
3. Per covered layer, each example's squared gradient norm from its inputs A
   and output gradients G: for Dense and Conv (via im2col) either
   `||a||^2 ||g||^2` (one position), the ghost form `<A A^T, G G^T>` or the
   materialised `A^T G`, whichever costs less for the shapes; for any other
   layer, a vmapped VJP of that layer alone.
4. Clip factors from the global norms; the clipped sum per layer as
   `A^T diag(c) G` (or `sum_i c_i g_i`).

Recurrent layers: an `nn.RNN` call over a `GRUCell`, `LSTMCell`,
`SimpleCell` or `MGUCell` (exact types: each parameter belongs to a Dense
sub-layer applied once a step) with the default lifting and no
`seq_lengths` is one covered layer: the interceptor runs the recurrence
itself (`_recurrent_rules.run_recurrence`, nn.RNN's semantics), recording each
sub-layer's per-step inputs and perturbing its per-step outputs, so each
sub-layer is a Dense over T positions (`_recurrent_rules.recurrent_terms`).
Anything else inside `nn.scan` (or a cell subclass) keeps the fallback.

Exactness guard: the layer's parameters as they appear in the params tree must
be unused in the traced per-example loss (checked on the jaxpr), so they can
only influence the loss through the intercepted call; otherwise the layer is
treated as uncovered.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from optax_dp._clip import _layer_rules
from optax_dp._clip import _recurrent_rules
from optax_dp._flax import _adapter

from optax_dp._flax._linen import nn


def _intercept(interceptor):
  """`nn.intercept_methods(interceptor)`, or nothing without flax (no Linen
  module can run then, so there is nothing to intercept)."""
  if nn is None:
    return contextlib.nullcontext()
  return nn.intercept_methods(interceptor)


@dataclasses.dataclass
class _Layer:
  """A covered layer call, found by the shape-only trace."""
  path: tuple
  module: Any            # an unbound clone of the module
  leaf_index: dict       # param name -> index in the flattened params
  out_struct: Any        # per-example (batch of one) output shapes
  arg_treedef: Any = None
  arg_statics: Any = None  # non-array leaves of (args, kwargs), by position
  kind: str = "generic"    # "dense", "conv", "embed", "norm", "recurrent" or "generic"
  groups: Any = None       # "recurrent": sub-layers sharing an input (recurrent_groups)
  contracted_axes: int = 1   # "dense": trailing input axes contracted (DenseGeneral)


def _direct_params(module) -> Optional[dict]:
  """The module's params if it owns only arrays directly (no submodules)."""
  try:
    variables = module.variables
  except Exception:  # pylint: disable=broad-except
    return None
  if set(variables.keys()) != {"params"}:
    return None
  params = variables["params"]
  if not params or any(isinstance(v, dict) or hasattr(v, "items") for v in params.values()):
    return None
  return dict(params)


def _kind(module) -> str:
  if type(module) is nn.Dense and module.dot_general is None and module.dot_general_cls is None:
    return "dense"
  if (type(module) is nn.Conv and module.feature_group_count == 1 and module.mask is None
      and module.conv_general_dilated is None and module.conv_general_dilated_cls is None
      and _adapter.is_unit(module.input_dilation)
      and _adapter.conv_padding_supported(module.padding)):
    return "conv"
  if (type(module) is nn.DenseGeneral and not module.batch_dims
      and module.dot_general is None and module.dot_general_cls is None):
    return "dense"  # over trailing axes (checked in `discover`): a Dense, flattened
  if type(module) is nn.Embed:
    return "embed"
  if type(module) in (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm):
    return "norm"  # checked against the call's shapes in `discover`
  return "generic"


def discover(loss_fn: Callable, params: Any, example: Any, has_aux: bool,
             exclude: frozenset = frozenset()) -> list[_Layer]:
  """Finds the covered layers (shape-only trace of one example)."""
  if nn is None:
    return []
  calls: dict[tuple, list] = {}
  recurrent: dict[tuple, list] = {}

  def run(params, example):
    ids = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(params))}

    def interceptor(next_fun, args, kwargs, context):
      if type(context.module) is nn.RNN and context.method_name == "__call__":
        recurrent.setdefault(context.module.path, []).append(
            _recurrent_layer(context.module, args, kwargs, ids))
      out = next_fun(*args, **kwargs)
      module = context.module
      direct = None if context.method_name == "setup" else _direct_params(module)
      if direct is not None:
        index = {name: ids.get(id(leaf)) for name, leaf in direct.items()}
        calls.setdefault(module.path, []).append(
            (context.method_name, module, index,
             jax.tree.map(lambda o: jax.ShapeDtypeStruct(jnp.shape(o), jnp.result_type(o)), out),
             (args, kwargs)))
      return out

    with nn.intercept_methods(interceptor):
      return loss_fn(params, jax.tree.map(lambda x: x[None], example))

  jax.eval_shape(run, params, example)
  layers = []
  for path, entries in calls.items():
    method, module, index, out_struct, (args, kwargs) = entries[0]
    if (len(entries) != 1 or method != "__call__" or path in exclude
        or any(i is None for i in index.values())):
      continue
    if any(not isinstance(o, jax.ShapeDtypeStruct) for o in jax.tree.leaves(out_struct)):
      continue
    _, treedef, statics = _layer_rules.split_call(args, kwargs)
    layer = _Layer(path=path, module=module.clone(parent=None, name=None),
                   leaf_index=index, out_struct=out_struct, arg_treedef=treedef,
                   arg_statics=statics, kind=_kind(module))
    if layer.kind in ("dense", "conv", "embed", "norm") and not (
        len(args) == 1 and not kwargs and _layer_rules.is_array(args[0])):
      layer.kind = "generic"
    if layer.kind == "dense" and type(module) is nn.DenseGeneral:
      axes = _adapter.trailing_contracted_axes(module.axis, jnp.ndim(args[0]))
      layer.kind, layer.contracted_axes = ("generic", 1) if axes is None else ("dense", axes)
    if layer.kind == "norm" and not (
        isinstance(out_struct, jax.ShapeDtypeStruct) and _adapter.norm_is_affine(
            getattr(module, "feature_axes", -1), module.axis_name, jnp.ndim(args[0]),
            [jnp.shape(p) for p in (_direct_params(module) or {}).values()],
            out_struct.shape)):
      layer.kind = "generic"
    if layer.kind == "embed":
      table = direct["embedding"].shape if (direct := _direct_params(module)) else (0, 0)
      if not _adapter.embed_is_ghost(args[0], *table):
        layer.kind = "generic"
    layers.append(layer)
  layers += [entries[0] for path, entries in recurrent.items()
             if len(entries) == 1 and entries[0] is not None and path not in exclude]
  # The call count above cannot see a parameter shared by two modules at
  # different paths (`apply({"params": {"a": p["w"], "b": p["w"]}}, x)`).
  return _adapter.unshared(layers)


# Cells whose every parameter belongs to an nn.Dense sub-layer applied once a
# step (checked again on each call's shape trace): the "recurrent" rule.
_RECURRENT_CELLS = () if nn is None else (nn.GRUCell, nn.LSTMCell, nn.SimpleCell, nn.MGUCell)
_RNN_KEYWORDS = frozenset({"initial_carry", "init_key", "seq_lengths", "return_carry",
                           "time_major", "reverse", "keep_order"})


def _rnn_setup(rnn, cell, args, kwargs):
  """(inputs, initial carry, time axis) of an nn.RNN call, as nn.RNN makes them."""
  inputs = args[0]
  time_axis = _recurrent_rules.recurrence_time_axis(
      inputs.ndim, _recurrent_rules.rnn_option(rnn, kwargs, "time_major"),
      cell.num_feature_axes)
  carry = kwargs.get("initial_carry")
  if carry is None:
    key = kwargs.get("init_key")
    key = jax.random.key(0) if key is None else key
    carry = cell.initialize_carry(
        key, inputs.shape[:time_axis] + inputs.shape[time_axis + 1:])
  return inputs, carry, time_axis


def _cell_step(cell, cell_params):
  """One step of an unbound cell from its params, its Dense sub-layers tapped."""
  def step(carry, x, tap):
    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if (context.method_name == "__call__" and type(module) is nn.Dense
          and len(module.path) == 1):
        return tap(module.path[0], args[0], next_fun(*args, **kwargs))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      return cell.apply({"params": cell_params}, carry, x)
  return step


def _nest(flat: dict) -> dict:
  """{"sub/param": x} -> {sub: {param: x}}."""
  out: dict = {}
  for name, x in flat.items():
    sub, param = name.split("/")
    out.setdefault(sub, {})[param] = x
  return out


def _recurrent_layer(rnn, args, kwargs, ids) -> Optional[_Layer]:
  """The covered layer of an `nn.RNN` call (the "recurrent" rule), or None.

  Covered: a cell of `_RECURRENT_CELLS` (exact type) whose parameters all
  belong to plain `nn.Dense` sub-layers, each applied once a step; the
  default lifting (parameters broadcast over time, no other collections);
  one input array and no `seq_lengths`.
  """
  cell = rnn.cell
  if (type(cell) not in _RECURRENT_CELLS or dict(rnn.variable_axes)
      or rnn.variable_broadcast != "params" or rnn.variable_carry is not False
      or dict(rnn.split_rngs) != {"params": False}
      or len(args) != 1 or not _layer_rules.is_array(args[0])
      or set(kwargs) - _RNN_KEYWORDS or kwargs.get("seq_lengths") is not None):
    return None
  try:
    variables = cell.variables
  except Exception:  # pylint: disable=broad-except
    return None
  if set(variables.keys()) != {"params"}:
    return None
  subs = variables["params"]
  if not all(hasattr(p, "items") and "kernel" in p and set(p) <= {"kernel", "bias"}
             for p in subs.values()):
    return None
  flat = {f"{sub}/{name}": leaf for sub, p in subs.items() for name, leaf in p.items()}
  index = {name: ids.get(id(leaf)) for name, leaf in flat.items()}
  unbound = cell.clone(parent=None, name=None)
  inputs, carry, time_axis = _rnn_setup(rnn, unbound, args, kwargs)
  x0 = jnp.take(inputs, 0, axis=time_axis)
  outs: dict = {}
  taps: list = []

  def tap(name, a, out):
    outs[name] = outs.get(name, ()) + (out,)
    taps.append((name, a))
    return out

  try:
    jax.eval_shape(lambda c, x, p: _cell_step(unbound, p)(c, x, tap), carry, x0, _nest(flat))
  except Exception:  # pylint: disable=broad-except
    return None
  if set(outs) != set(subs) or any(len(v) != 1 for v in outs.values()):
    return None  # a sub-layer that is not a plain Dense, or one applied twice a step
  steps = inputs.shape[time_axis]
  out_struct = {name: jax.ShapeDtypeStruct((steps,) + o.shape, o.dtype)
                for name, (o,) in outs.items()}
  return _Layer(path=rnn.path, module=rnn.clone(parent=None, name=None, cell=unbound),
                leaf_index=index, out_struct=out_struct, kind="recurrent",
                groups=_recurrent_rules.recurrent_groups(taps))


def _run_rnn(layer, layer_params, args, kwargs, zs):
  """An nn.RNN call computed from the layer's own params (`run_recurrence`):
  (what nn.RNN returns, {sub-layer: its per-step inputs})."""
  rnn = layer.module
  inputs, carry, time_axis = _rnn_setup(rnn, rnn.cell, args, kwargs)
  return _recurrent_rules.run_recurrence(
      rnn, kwargs, _cell_step(rnn.cell, _nest(layer_params)), inputs, carry, zs,
      layer.groups, time_axis)


def make_example_loss(loss_fn: Callable, layers: list[_Layer], has_aux: bool,
                      params_treedef, num_leaves: int):
  """The per-example loss with covered layers computed from their own params.

  Signature: `(uncovered_leaves, covered_leaves, layer_params, zs, example) ->
  (loss, (aux, layer_inputs))`, where `covered_leaves` stand in the params tree
  (and must be unused: see `check_covered_unused`).
  """
  by_path = {layer.path: k for k, layer in enumerate(layers)}
  covered, uncovered = _layer_rules.split_leaf_indices(layers, num_leaves)

  def example_loss(uncovered_leaves, covered_leaves, layer_params, zs, example):
    leaves = _layer_rules.merge_leaves(num_leaves, (uncovered, uncovered_leaves),
                                       (covered, covered_leaves))
    params = jax.tree.unflatten(params_treedef, leaves)
    inputs: list[Any] = [None] * len(layers)
    inside = [False]

    def interceptor(next_fun, args, kwargs, context):
      if inside[0] or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      k = by_path.get(context.module.path)
      if k is None:
        return next_fun(*args, **kwargs)
      inside[0] = True
      try:
        if layers[k].kind == "recurrent":
          out, inputs[k] = _run_rnn(layers[k], layer_params[k], args, kwargs, zs[k])
          return out
        inputs[k] = _layer_rules.split_call(args, kwargs)[0]
        out = layers[k].module.apply({"params": layer_params[k]}, *args, **kwargs)
      finally:
        inside[0] = False
      return jax.tree.map(jnp.add, out, zs[k])

    with _intercept(interceptor):
      result = loss_fn(params, jax.tree.map(lambda x: x[None], example))
    loss, aux = result if has_aux else (result, None)
    _adapter.check_called(layers, inputs, lambda missing: f"layers {missing} were")
    return loss, (aux, inputs)

  return example_loss, covered, uncovered


def layer_terms(layer: _Layer, layer_params, inputs, out_grad, per_example: bool = False):
  """(per-example squared norms, `sums(c, keep) -> {param name: clipped sum}`)
  of one covered Linen layer, by the framework-neutral rule of its kind
  (`_adapter.layer_terms`)."""
  m = layer.module

  def apply_fn(params, arrays):
    args, kwargs = _layer_rules.rebuild_call(layer.arg_treedef, layer.arg_statics, arrays)
    return layer.module.apply({"params": params}, *args, **kwargs)

  return _adapter.layer_terms(
      layer, layer_params, inputs, out_grad,
      dense_input=lambda x: _adapter.flatten_trailing(x, layer.contracted_axes),
      conv=lambda: dict(kernel_size=m.kernel_size, strides=m.strides,
                        kernel_dilation=m.kernel_dilation, padding=m.padding),
      vocab=lambda: (layer_params["embedding"].shape[0],), apply_fn=apply_fn,
      per_example=per_example)
