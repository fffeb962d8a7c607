"""Book-keeping for Flax NNX layers: the NNX twin of `_linen_layers`.

The layer discovery, per-example loss and per-layer terms that `_bookkeeping`
runs on the pure loss `_nnx.call` builds, feeding the same framework-neutral
rules (`_layer_rules`). flax is imported lazily (`_nnx._nnx`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from optax_dp._clip import _layer_rules
from optax_dp._flax import _adapter
from optax_dp._flax import _nnx_lora
from optax_dp._flax import _nnx_modules
from optax_dp._flax import _nnx_recurrent
from optax_dp._flax._nnx import NNX_ADAPTER
from optax_dp._flax._nnx import intercept
from optax_dp._flax._nnx import _nnx

# Book-keeping for NNX layers: the NNX twin of `_linen_layers`' discovery, feeding
# the same framework-neutral rules (`_layer_rules`). `_clipped` calls these
# on the pure loss that `call` builds (marked `NNX_ADAPTER`, which holds the
# module classes of the model's graph).
#
# A *layer* is a module whose variables are all its own (attributes holding
# `nnx.Variable`s, no submodules, no random streams), all of them trained,
# called exactly once through `__call__` with arrays and static Python
# values, returning arrays, whose parameters no other layer owns. Its rule:
#
# * "dense": `nnx.Linear`, and `nnx.LinearGeneral` contracting the trailing
#   axes without batch axes (so the projections of `nnx.MultiHeadAttention`),
#   with the default dot_general;
# * "conv": `nnx.Conv` (one feature group, no mask, no input dilation,
#   SAME/VALID or explicit padding);
# * "embed": `nnx.Embed` looked up with integer ids, when the ghost form is
#   the cheaper;
# * "recurrent": `nnx.RNN` over an `nnx.GRUCell`, `LSTMCell` or `SimpleCell`
#   (exact types, every variable in a plain `nnx.Linear` applied once a
#   step), default state axes, no `seq_lengths`: the recurrence is run by
#   `_recurrent_rules.run_recurrence` with the Linears tapped, each then a Dense
#   over T positions (the RNN module itself holds no parameters: it is
#   matched by its cell's);
# * "lora": `nnx.LoRA` (exact type, called with one array), its adapters
#   `lora_a` and `lora_b` (`out = (x @ lora_a) @ lora_b + base_module(x)`):
#   two Dense layers without bias, `lora_a` from x to h = x @ lora_a,
#   `lora_b` from h (its base module, an `nnx.Linear`, is a layer of its own,
#   or frozen with `wrt=nnx.LoRAParam`);
# * "norm": `nnx.LayerNorm`, `nnx.RMSNorm`, `nnx.GroupNorm` (exact types,
#   one array, the default promote_dtype, no axis_name, parameters over the
#   trailing axes): `y = n(x) * scale + bias`, each example's parameter
#   gradients position sums (`_layer_rules.affine_norm_terms`), `n(x)` the
#   layer itself at scale 1 and bias 0, rebuilt from its graph definition;
# * "generic": any other layer (other normalisations, `nnx.Einsum`, a
#   grouped or circular `nnx.Conv`, a module using its `nnx.Param`
#   directly in `__call__`): a vmapped VJP of
#   that layer alone, rebuilt from its graph definition.
#
# Calls are intercepted by patching `__call__` of the model's module classes
# while the loss is traced (each class for its exact type). The exactness
# guard (`_layer_rules.check_covered_unused`) then drops any layer whose
# parameters reach the loss some other way (weight tying through
# `Embed.attend`, a direct use by a parent). Everything else falls back per
# parameter to per-example gradients.

_STATIC_TYPES = (bool, int, float, complex, str, type(None))


@dataclasses.dataclass
class Layer:
  """A covered NNX layer call, found by the shape-only trace."""
  path: tuple            # its leaf indices: the same layer in every trace
  leaf_index: dict       # variable attribute name -> leaf index
  out_struct: Any
  kind: str              # "dense", "conv", "embed", "norm", "recurrent", "lora" or "generic"
  conv: Optional[dict] = None
  contracted_axes: int = 1   # "dense": trailing input axes contracted
  vocab: int = 0             # "embed": table rows
  graphdef: Any = None       # "generic": the layer alone, rebuilt by nnx.merge
  state_treedef: Any = None
  state_names: tuple = ()
  arg_treedef: Any = None
  arg_statics: Any = None
  groups: Any = None         # "recurrent": sub-layers sharing an input


def _plain_call(args, kwargs) -> bool:
  """One array argument (an `out_sharding=None` keyword allowed)."""
  return (len(args) == 1 and _layer_rules.is_array(args[0])
          and all(k == "out_sharding" and v is None for k, v in kwargs.items()))


def _rule(module, own, args, kwargs, out) -> Optional[dict]:
  """The Layer fields of a layer call's rule, or None if not a layer."""
  nnx = _nnx()
  if not all(_layer_rules.is_array(o) for o in jax.tree.leaves(out)):
    return None
  plain = _plain_call(args, kwargs)
  cls = type(module)
  if plain and cls is nnx.Linear and _nnx_modules.default_dot(module):
    return dict(kind="dense")
  if plain and cls is nnx.LinearGeneral and _nnx_modules.default_dot(module):
    axes = (None if module.batch_axis
            else _adapter.trailing_contracted_axes(module.axis, jnp.ndim(args[0])))
    if axes is not None:
      return dict(kind="dense", contracted_axes=axes)
  if (plain and cls is nnx.Conv and module.feature_group_count == 1 and module.mask is None
      and module.conv_general_dilated is jax.lax.conv_general_dilated
      and module.preferred_element_type is None and _adapter.is_unit(module.input_dilation)
      and _adapter.conv_padding_supported(module.padding)):
    return dict(kind="conv", conv=dict(
        kernel_size=module.kernel_size, strides=module.strides,
        kernel_dilation=module.kernel_dilation, padding=module.padding))
  if plain and cls is nnx.Embed:
    vocab, features = module.embedding[...].shape
    if _adapter.embed_is_ghost(args[0], vocab, features):
      return dict(kind="embed", vocab=vocab)
  norm = (plain and cls in (nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)
          and module.promote_dtype is _nnx_modules.default_promote_dtype()
          and _adapter.norm_is_affine(
              getattr(module, "feature_axes", -1), module.axis_name, jnp.ndim(args[0]),
              [jnp.shape(v) for v in own.values()], jnp.shape(out)))
  leaves = jax.tree.leaves((args, kwargs), is_leaf=nnx.graph.is_graph_node)
  if not all(_layer_rules.is_array(x) or isinstance(x, _STATIC_TYPES) for x in leaves):
    return None
  _, arg_treedef, arg_statics = _layer_rules.split_call(args, kwargs)
  graphdef, state = nnx.split(module)
  names = tuple(path[0].key for path, _ in jax.tree_util.tree_flatten_with_path(state)[0])
  if sorted(names) != sorted(own):
    return None
  return dict(kind="norm" if norm else "generic", graphdef=graphdef,
              state_treedef=jax.tree.structure(state), state_names=names,
              arg_treedef=arg_treedef, arg_statics=arg_statics)


def discover(loss_fn, params, example, has_aux, exclude=frozenset()) -> list:
  """Finds the covered NNX layers (shape-only trace of one example)."""
  del has_aux
  nnx = _nnx()
  classes = getattr(loss_fn, NNX_ADAPTER)
  calls: dict = {}
  probing: list = []   # non-empty while a recurrent layer's step is probed

  def run(params, example):
    ids = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(params))}

    def handler(module, original, args, kwargs):
      if probing:
        return original(module, *args, **kwargs)
      if type(module) is nnx.RNN and id(module) not in calls:
        probing.append(True)
        try:
          found = _nnx_recurrent.recurrent_rule(module, args, kwargs, ids)
        finally:
          probing.pop()
        calls[id(module)] = {"count": 0, **(found or {})}
      out = original(module, *args, **kwargs)
      entry = calls.setdefault(id(module), {"count": 0})
      entry["count"] += 1
      if entry["count"] == 1 and type(module) is nnx.LoRA:
        entry.update(_nnx_lora.lora_rule(module, args, kwargs, ids) or {})
      elif entry["count"] == 1 and type(module) is not nnx.RNN:
        own = _nnx_modules.own_variables(module)
        if own is not None:
          entry["index"] = {name: ids.get(id(v)) for name, v in own.items()}
          entry["rule"] = _rule(module, own, args, kwargs, out)
          entry["out"] = jax.tree.map(
              lambda o: jax.ShapeDtypeStruct(jnp.shape(o), jnp.result_type(o)), out)
      return out

    with intercept(classes, handler):
      return loss_fn(params, jax.tree.map(lambda x: x[None], example))

  jax.eval_shape(run, params, example)
  layers = []
  for entry in calls.values():
    if entry["count"] != 1 or entry.get("rule") is None:
      continue
    index = entry["index"]
    path = tuple(sorted(i for i in index.values() if i is not None))
    if None in index.values() or path in exclude:
      continue
    layers.append(Layer(path=path, leaf_index=index, out_struct=entry["out"], **entry["rule"]))
  return _adapter.unshared(layers)


def make_example_loss(loss_fn, layers, has_aux, params_treedef, num_leaves):
  """`_linen_layers.make_example_loss`'s NNX twin: covered layers computed from their
  own parameters (`layer_params`), their inputs recorded, a zero perturbation
  `zs` added to their outputs (whose gradient is the output gradient)."""
  nnx = _nnx()
  classes = getattr(loss_fn, NNX_ADAPTER)
  by_path = {layer.path: k for k, layer in enumerate(layers)}
  covered, uncovered = _layer_rules.split_leaf_indices(layers, num_leaves)
  tapping: dict = {}   # id(sub-layer) -> (name, tap) while a recurrence runs

  def example_loss(uncovered_leaves, covered_leaves, layer_params, zs, example):
    leaves = _layer_rules.merge_leaves(num_leaves, (uncovered, uncovered_leaves),
                                       (covered, covered_leaves))
    ids = {id(leaf): i for i, leaf in enumerate(leaves)}
    inputs: list = [None] * len(layers)

    def handler(module, original, args, kwargs):
      if id(module) in tapping:
        name, tap = tapping[id(module)]
        return tap(name, args[0], original(module, *args, **kwargs))
      if type(module) is nnx.RNN:
        flat = _nnx_recurrent.cell_variables(module.cell) or {}
        k = by_path.get(tuple(sorted(ids.get(id(v[...]), -1) for v in flat.values())))
        if k is None or inputs[k] is not None:
          return original(module, *args, **kwargs)
        out, inputs[k] = _nnx_recurrent.run_rnn(module, flat, layers[k], layer_params[k], args, kwargs,
                                  zs[k], tapping)
        return out
      if type(module) is nnx.LoRA:
        k = by_path.get(tuple(sorted(ids.get(id(v[...]), -1)
                                     for v in (module.lora_a, module.lora_b))))
        if k is None or inputs[k] is not None or layers[k].kind != "lora":
          return original(module, *args, **kwargs)
        out, inputs[k] = _nnx_lora.run_lora(module, layer_params[k], args, zs[k])
        return out
      own = _nnx_modules.own_variables(module)
      k = None if own is None else by_path.get(
          tuple(sorted(ids.get(id(v), -1) for v in own.values())))
      if k is None or inputs[k] is not None:
        return original(module, *args, **kwargs)
      layer = layers[k]
      inputs[k] = ([args[0]] if layer.kind not in ("generic", "norm")
                   else _layer_rules.split_call(args, kwargs)[0])
      # Computed from the layer's own copy of its parameters, then put back:
      # any other use of the variables sees the covered leaves, which the
      # exactness guard then finds in the jaxpr.
      for name in own:
        getattr(module, name)[...] = layer_params[k][name]
      try:
        out = original(module, *args, **kwargs)
      finally:
        for name, value in own.items():
          getattr(module, name)[...] = value
      return jax.tree.map(jnp.add, out, zs[k])

    params = jax.tree.unflatten(params_treedef, leaves)
    with intercept(classes, handler):
      result = loss_fn(params, jax.tree.map(lambda x: x[None], example))
    loss, aux = result if has_aux else (result, None)
    _adapter.check_called(layers, inputs, lambda _: "a covered NNX layer was")
    return loss, (aux, inputs)

  return example_loss, covered, uncovered


def layer_terms(layer: Layer, layer_params, inputs, out_grad, per_example: bool = False):
  """(per-example squared norms, `sums(c, keep)`) of one covered NNX layer
  (`_adapter.layer_terms`)."""
  def apply_fn(params, arrays):
    args, kwargs = _layer_rules.rebuild_call(layer.arg_treedef, layer.arg_statics, arrays)
    state = jax.tree.unflatten(layer.state_treedef,
                               [params[name] for name in layer.state_names])
    return _nnx().merge(layer.graphdef, state)(*args, **kwargs)

  return _adapter.layer_terms(
      layer, layer_params, inputs, out_grad,
      dense_input=lambda x: _adapter.flatten_trailing(x, layer.contracted_axes),
      conv=lambda: layer.conv, vocab=lambda: (layer.vocab, *layer.leaf_index),
      apply_fn=apply_fn,
      per_example=per_example)
