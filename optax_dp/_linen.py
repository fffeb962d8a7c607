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

Exactness guard: the layer's parameters as they appear in the params tree must
be unused in the traced per-example loss (checked on the jaxpr), so they can
only influence the loss through the intercepted call; otherwise the layer is
treated as uncovered.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from optax_dp import _layer_rules

try:  # flax is optional: without it everything is "uncovered" (vmap path).
  import flax.linen as nn
except ImportError:  # pragma: no cover
  nn = None


@dataclasses.dataclass
class _Layer:
  """A covered layer call, found by the shape-only trace."""
  path: tuple
  module: Any            # an unbound clone of the module
  leaf_index: dict       # param name -> index in the flattened params
  out_struct: Any        # per-example (batch of one) output shapes
  arg_treedef: Any = None
  arg_statics: Any = None  # non-array leaves of (args, kwargs), by position
  kind: str = "generic"


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
      and _is_unit(module.input_dilation) and _conv_padding_supported(module.padding)):
    return "conv"
  if (type(module) is nn.DenseGeneral and module.axis in (-1, (-1,)) and not module.batch_dims
      and module.dot_general is None and module.dot_general_cls is None):
    return "dense"  # contracts the last axis: a Dense with flattened features
  if type(module) is nn.Embed:
    return "embed"
  return "generic"


def _is_unit(x) -> bool:
  if x is None:
    return True
  if isinstance(x, int):
    return x == 1
  return all(v == 1 for v in x)


def _conv_padding_supported(padding) -> bool:
  if isinstance(padding, str):
    return padding in ("SAME", "VALID")
  return True


def discover(loss_fn: Callable, params: Any, example: Any, has_aux: bool,
             exclude: frozenset = frozenset()) -> list[_Layer]:
  """Finds the covered layers (shape-only trace of one example)."""
  if nn is None:
    return []
  calls: dict[tuple, list] = {}

  def run(params, example):
    ids = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(params))}

    def interceptor(next_fun, args, kwargs, context):
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
  layers, owners = [], {}
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
    if layer.kind in ("dense", "conv", "embed") and not (
        len(args) == 1 and not kwargs and _layer_rules.is_array(args[0])):
      layer.kind = "generic"
    if layer.kind == "embed":
      ids_shape = jnp.shape(args[0])
      positions = math.prod(ids_shape)
      table = direct["embedding"].shape if (direct := _direct_params(module)) else (0, 0)
      # Ghost with token equality costs T^2 per example; the generic VJP
      # materialises vocab x features per example: take the smaller.
      if (not jnp.issubdtype(jnp.result_type(args[0]), jnp.integer)
          or positions * positions > table[0] * table[1]):
        layer.kind = "generic"
    layers.append(layer)
  # A leaf owned by two layers (shared parameters) is not covered. The call
  # count above cannot see this case: two modules at different paths, each
  # called once, that the loss hands the same array (weight tying outside the
  # model, `apply({"params": {"a": p["w"], "b": p["w"]}}, x)`); covering both
  # would lose one layer's clipped sum and mis-add their norms
  # (tests/test_linen.py::test_shared_parameters_are_not_covered_and_auto_is_exact).
  for layer in layers:
    for i in layer.leaf_index.values():
      owners[i] = owners.get(i, 0) + 1
  return [l for l in layers if all(owners[i] == 1 for i in l.leaf_index.values())]


def calls_modules(loss_fn: Callable, params: Any, example: Any) -> bool:
  """Whether the loss runs any Flax Linen module (a shape-only trace)."""
  if nn is None:
    return False
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    seen.append(context.method_name)
    return next_fun(*args, **kwargs)

  def run(params, example):
    with nn.intercept_methods(interceptor):
      return loss_fn(params, jax.tree.map(lambda x: x[None], example))

  jax.eval_shape(run, params, example)
  return bool(seen)


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
      inputs[k] = _layer_rules.split_call(args, kwargs)[0]
      inside[0] = True
      try:
        out = layers[k].module.apply({"params": layer_params[k]}, *args, **kwargs)
      finally:
        inside[0] = False
      return jax.tree.map(jnp.add, out, zs[k])

    with nn.intercept_methods(interceptor):
      result = loss_fn(params, jax.tree.map(lambda x: x[None], example))
    loss, aux = result if has_aux else (result, None)
    if any(x is None for x in inputs):
      missing = [layers[k].path for k, x in enumerate(inputs) if x is None]
      raise RuntimeError(f"optax_dp ghost clipping: layers {missing} were not called.")
    return loss, (aux, inputs)

  return example_loss, covered, uncovered


def layer_terms(layer: _Layer, layer_params, inputs, out_grad):
  """(per-example squared norms, `sums(c, keep) -> {param name: clipped sum}`)
  of one covered Linen layer, by the framework-neutral rule of its kind."""
  use_bias = "bias" in layer.leaf_index
  if layer.kind == "dense":
    return _layer_rules.dense_terms(inputs[0], out_grad, use_bias)
  if layer.kind == "conv":
    m = layer.module
    return _layer_rules.conv_terms(
        inputs[0], out_grad, kernel_size=m.kernel_size, strides=m.strides,
        kernel_dilation=m.kernel_dilation, padding=m.padding, use_bias=use_bias)
  if layer.kind == "embed":
    return _layer_rules.embed_terms(inputs[0], out_grad,
                                    layer_params["embedding"].shape[0])

  def apply_fn(params, arrays):
    args, kwargs = _layer_rules.rebuild_call(layer.arg_treedef, layer.arg_statics, arrays)
    return layer.module.apply({"params": params}, *args, **kwargs)

  return _layer_rules.vjp_terms(apply_fn, layer_params, inputs, out_grad)
