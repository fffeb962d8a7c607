"""The "recurrent" rule for Flax NNX: `nnx.RNN` over a covered cell,
book-kept through the scan over time (`_nnx_layers` finds and runs it; the
framework-neutral terms are `_recurrent_rules.recurrent_terms`)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from optax_dp._clip import _layer_rules
from optax_dp._clip import _recurrent_rules
from optax_dp._flax import _nnx_modules
from optax_dp._flax._nnx import intercept
from optax_dp._flax._nnx import _nnx


# The "recurrent" rule: `nnx.RNN` over a cell of these types (exact), whose
# every variable belongs to a plain `nnx.Linear` applied once a step (checked
# again on a shape trace of one step of each call).
RNN_KEYWORDS = frozenset({"initial_carry", "seq_lengths", "return_carry", "time_major",
                           "reverse", "keep_order", "rngs"})


def recurrent_cells() -> tuple:
  nnx = _nnx()
  return (nnx.GRUCell, nnx.LSTMCell, nnx.SimpleCell)


def cell_variables(cell) -> Optional[dict]:
  """{"sub/variable": nnx.Variable} of a covered cell's Linear sub-layers, or None."""
  nnx = _nnx()
  if type(cell) not in recurrent_cells():
    return None
  flat = {}
  for name, value in vars(cell).items():
    if isinstance(value, nnx.Variable):
      return None
    if not nnx.graph.is_graph_node(value):
      if any(isinstance(x, (nnx.Variable, jax.Array, jax.core.Tracer))
             or nnx.graph.is_graph_node(x)
             for x in jax.tree.leaves(value, is_leaf=nnx.graph.is_graph_node)):
        return None
      continue
    if type(value) is not nnx.Linear or not _nnx_modules.default_dot(value):
      return None
    own = _nnx_modules.own_variables(value)
    if own is None or "kernel" not in own or set(own) - {"kernel", "bias"}:
      return None
    flat.update({f"{name}/{var}": getattr(value, var) for var in own})
  return flat or None


def rnn_setup(rnn, args, kwargs):
  """(inputs, initial carry, time axis) of an nnx.RNN call, as nnx.RNN makes them."""
  nnx = _nnx()
  inputs = args[0]
  time_axis = _recurrent_rules.recurrence_time_axis(
      inputs.ndim, _recurrent_rules.rnn_option(rnn, kwargs, "time_major"),
      rnn.cell.num_feature_axes)
  carry = kwargs.get("initial_carry")
  if carry is None:
    rngs = _recurrent_rules.rnn_option(rnn, kwargs, "rngs")
    if isinstance(rngs, nnx.Rngs):
      rngs = rngs.carry.fork()
    carry = rnn.cell.initialize_carry(
        inputs.shape[:time_axis] + inputs.shape[time_axis + 1:], rngs)
  return inputs, carry, time_axis


def recurrent_rule(rnn, args, kwargs, ids) -> Optional[dict]:
  """The entry fields of an `nnx.RNN` call the "recurrent" rule covers, or None."""
  flat = cell_variables(rnn.cell)
  state_axes = rnn.state_axes
  if (flat is None or rnn.broadcast_rngs is not None
      or tuple(state_axes.filters) != (...,) or len(state_axes.axes) != 1
      or len(args) != 1 or not _layer_rules.is_array(args[0])
      or set(kwargs) - RNN_KEYWORDS or kwargs.get("seq_lengths") is not None):
    return None
  subs = {name.split("/")[0] for name in flat}
  linears = {id(getattr(rnn.cell, sub)): sub for sub in subs}
  inputs, carry, time_axis = rnn_setup(rnn, args, kwargs)
  x0 = jnp.take(inputs, 0, axis=time_axis)
  outs: dict = {}
  taps: list = []

  def step(carry, x):
    def handler(module, original, args, kwargs):
      out = original(module, *args, **kwargs)
      if id(module) in linears:
        outs.setdefault(linears[id(module)], []).append(out)
        taps.append((linears[id(module)], args[0]))
      return out
    with intercept((_nnx().Linear,), handler):
      return rnn.cell(carry, x)

  try:
    jax.eval_shape(step, carry, x0)
  except Exception:  # pylint: disable=broad-except
    return None
  if set(outs) != subs or any(len(v) != 1 for v in outs.values()):
    return None
  steps = inputs.shape[time_axis]
  return {"index": {name: ids.get(id(v[...])) for name, v in flat.items()},
          "rule": dict(kind="recurrent", groups=_recurrent_rules.recurrent_groups(taps)),
          "out": {sub: jax.ShapeDtypeStruct((steps,) + o.shape, o.dtype)
                  for sub, (o,) in outs.items()}}


def run_rnn(rnn, flat, layer, layer_params, args, kwargs, zs, tapping):
  """An nnx.RNN call computed from the layer's own params (`run_recurrence`),
  its Linear sub-layers tapped: (what nnx.RNN returns, {sub: per-step inputs})."""
  inputs, carry, time_axis = rnn_setup(rnn, args, kwargs)
  saved = {name: v[...] for name, v in flat.items()}
  subs = {name.split("/")[0] for name in flat}

  def cell_step(carry, x, tap):
    for sub in subs:
      tapping[id(getattr(rnn.cell, sub))] = (sub, tap)
    try:
      return rnn.cell(carry, x)
    finally:
      tapping.clear()

  for name, v in flat.items():
    v[...] = layer_params[name]
  try:
    return _recurrent_rules.run_recurrence(rnn, kwargs, cell_step, inputs, carry, zs,
                                       layer.groups, time_axis)
  finally:
    for name, v in flat.items():
      v[...] = saved[name]
