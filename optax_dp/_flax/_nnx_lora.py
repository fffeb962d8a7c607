"""The "lora" rule for Flax NNX: the adapters of an `nnx.LoRA`,
`out = (x @ lora_a) @ lora_b + base_module(x)`, as two Dense layers without
bias (`_nnx_layers` finds and runs it; the framework-neutral terms are
`_layer_rules.lora_terms`)."""

from __future__ import annotations

from typing import Optional

import jax

from optax_dp._clip import _layer_rules
from optax_dp._flax._nnx import _nnx


def lora_parts(module, x, lora_a, lora_b):
  """(x, lora_a, lora_b) as `nnx.LoRA.__call__` promotes them."""
  return module.promote_dtype((x, lora_a, lora_b), dtype=module.dtype)


def lora_rule(module, args, kwargs, ids) -> Optional[dict]:
  """The entry fields of an `nnx.LoRA` call the "lora" rule covers, or None:
  its own variables are `lora_a` and `lora_b` (its base module apart)."""
  nnx = _nnx()
  if type(module) is not nnx.LoRA or kwargs or len(args) != 1 or not _layer_rules.is_array(
      args[0]):
    return None
  for name, value in vars(module).items():
    if name in ("lora_a", "lora_b"):
      if not isinstance(value, nnx.Variable) or isinstance(value, nnx.RngState):
        return None
    elif name != "base_module" and any(
        isinstance(x, (nnx.Variable, jax.Array, jax.core.Tracer)) or nnx.graph.is_graph_node(x)
        for x in jax.tree.leaves(value, is_leaf=nnx.graph.is_graph_node)):
      return None
  a, b = module.lora_a[...], module.lora_b[...]
  x, pa, pb = lora_parts(module, args[0], a, b)
  h = x @ pa
  out = h @ pb
  return {"index": {"lora_a": ids.get(id(a)), "lora_b": ids.get(id(b))},
          "rule": dict(kind="lora"),
          "out": {"lora_a": jax.ShapeDtypeStruct(h.shape, h.dtype),
                  "lora_b": jax.ShapeDtypeStruct(out.shape, out.dtype)}}


def run_lora(module, layer_params, args, zs):
  """An nnx.LoRA call computed from the layer's own adapters, a zero
  perturbation added to h = x @ lora_a and to h @ lora_b (their gradients:
  the two Dense layers' output gradients): (what it returns, {name: input})."""
  x, pa, pb = lora_parts(module, args[0], layer_params["lora_a"], layer_params["lora_b"])
  h = x @ pa + zs["lora_a"]
  out = h @ pb + zs["lora_b"]
  if module.base_module is not None:
    out += module.base_module(x)
  return out, {"lora_a": x, "lora_b": h}
