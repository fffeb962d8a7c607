"""What an NNX module holds and how it computes, as the layer rules need to
know (`_nnx_layers`, `_nnx_recurrent`)."""

from __future__ import annotations

from typing import Optional

import jax

from optax_dp._flax._nnx import _nnx


def own_variables(module) -> Optional[dict]:
  """{attribute name: array} of the module's variables if all are its own
  (no submodule, container or random stream holds state); else None."""
  nnx = _nnx()
  own = {}
  for name, value in vars(module).items():
    if isinstance(value, nnx.Variable):
      if not isinstance(value, nnx.RngState):
        own[name] = value[...]
        continue
      return None
    if any(isinstance(x, (nnx.Variable, jax.Array, jax.core.Tracer))
           or nnx.graph.is_graph_node(x)
           for x in jax.tree.leaves(value, is_leaf=nnx.graph.is_graph_node)):
      return None
  return own or None


def default_dot(module) -> bool:
  return (getattr(module, "dot_general", None) in (None, jax.lax.dot_general)
          and getattr(module, "dot_general_cls", None) is None
          and module.preferred_element_type is None)


def default_promote_dtype():
  """NNX's default `promote_dtype` (a module given another may compute
  anything from its parameters)."""
  from flax.nnx.nn import dtypes  # pylint: disable=import-outside-toplevel
  return dtypes.promote_dtype
