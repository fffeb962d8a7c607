"""Book-keeping rules of recurrent layers, framework-neutral.

A recurrent layer whose cell is made of Dense sub-layers (a GRU's gates, an
LSTM's), run over T steps: `run_recurrence` runs a framework's `RNN` call as a
scan over time and records each sub-layer's per-step inputs, and
`recurrent_terms` treats each sub-layer as a Dense over the T positions
(`_layer_rules.dense_terms`). The framework adapters call these.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from optax_dp._clip._layer_rules import Terms
from optax_dp._clip._layer_rules import dense_terms


def recurrence_time_axis(ndim: int, time_major: bool, num_feature_axes: int) -> int:
  """The time axis of a framework's `RNN` inputs (every adapter's alike)."""
  return 0 if time_major else ndim - (num_feature_axes + 1)


def rnn_option(rnn: Any, kwargs: dict, name: str) -> Any:
  """A framework's `RNN` call's option: the call's keyword, else the module's
  field (the adapters' RNNs name them alike: time_major, reverse, keep_order, ...)."""
  value = kwargs.get(name)
  return getattr(rnn, name) if value is None else value


def run_recurrence(rnn: Any, kwargs: dict, cell_step: Callable, inputs: jax.Array,
                   initial_carry: Any, zs: dict, groups: dict, time_axis: int
                   ) -> tuple[Any, dict]:
  """A framework's `RNN` call (`rnn`, its keyword arguments `kwargs`) run as a scan
  over time, with its sub-layers' taps.

  The semantics of the adapters' `RNN` (one for both) without sequence lengths:
  `inputs` scanned along `time_axis` (reversed first if `reverse`; outputs
  flipped back if also `keep_order`), outputs stacked on the same axis,
  `(final carry, outputs)` returned if `return_carry`, else the outputs.
  `cell_step(carry, x_t, tap) -> (carry, y_t)` is one step of the cell, which
  must call `tap(name, a, out)` exactly once for each of its sub-layers (a
  Dense applied at every step, its parameters shared over time) and use what
  it returns, `out + zs[name][t]`: a zero perturbation whose gradient is that
  sub-layer's output gradient at step t. `zs[name]` is (T, *out shape).
  `groups` maps a head sub-layer to the sub-layers that take the very same
  input (a GRU's three input gates read x_t; `recurrent_groups` finds them):
  one copy of that input is kept per group (checked by identity, each step).

  Returns (what the RNN returns, {head: the group's inputs, (T, ...)}):
  with the output gradients, the per-example gradient of a sub-layer's kernel
  is `sum_t a_t g_t^T`, a Dense over T positions (`recurrent_terms`).
  """
  head_of = {name: head for head, names in groups.items() for name in names}
  reverse = rnn_option(rnn, kwargs, "reverse")
  if reverse:
    inputs = jnp.flip(inputs, time_axis)
  xs = jnp.moveaxis(inputs, time_axis, 0)

  def body(carry, step):
    x, z = step
    taken = {}

    def tap(name, a, out):
      if name in taken:
        raise RuntimeError(f"optax_dp: recurrent sub-layer {name!r} ran twice in one step.")
      taken[name] = a
      return out + z[name]

    carry, y = cell_step(carry, x, tap)
    if set(taken) != set(z) or any(taken[n] is not taken[h] for n, h in head_of.items()):
      raise RuntimeError("optax_dp: a recurrent cell's sub-layers ran differently "
                         "from its shape trace.")
    return carry, (y, {head: taken[head] for head in groups})

  carry, (ys, taken) = lax.scan(body, initial_carry, (xs, zs), unroll=rnn.unroll)
  outputs = jax.tree.map(lambda y: jnp.moveaxis(y, 0, time_axis), ys)
  if reverse and rnn_option(rnn, kwargs, "keep_order"):
    outputs = jax.tree.map(lambda y: jnp.flip(y, time_axis), outputs)
  return ((carry, outputs) if rnn_option(rnn, kwargs, "return_carry") else outputs), taken


def recurrent_groups(taps: list) -> dict:
  """`{head: (names...)}` from one step's `(name, input)` taps, in order:
  sub-layers whose input is the very same array form one group."""
  groups: dict = {}
  for name, a in taps:
    head = next((h for h, (x, _) in groups.items() if x is a), None)
    if head is None:
      groups[name] = (a, (name,))
    else:
      groups[head] = (a, groups[head][1] + (name,))
  return {head: names for head, (_, names) in groups.items()}


def recurrent_terms(inputs: dict, out_grads: dict, use_bias: dict, groups: dict) -> Terms:
  """A recurrent layer: each sub-layer a Dense shared over T steps.

  inputs[head]: (B, T, ..., d) the per-step inputs of a group of sub-layers
  (`run_recurrence`), out_grads[name]: (B, T, ..., p) each sub-layer's
  per-step output gradients. The per-example kernel gradient is
  `sum_t a_t g_t^T`: `dense_terms` over the T positions (ghost or
  materialised, whichever is cheaper), each bias `sum_t g_t`; the sub-layers
  of a group share their input (XLA computes its Gram matrix once). The
  norms and sums come back as `{"name/kernel": ..., "name/bias": ...}`.
  """
  sq, sum_fns = {}, {}
  for head, names in groups.items():
    for n in names:
      n_sq, sum_fns[n] = dense_terms(inputs[head], out_grads[n], use_bias[n])
      sq.update({f"{n}/{k}": v for k, v in n_sq.items()})

  def sums(c, keep):
    out = {}
    for n, fn in sum_fns.items():
      part = fn({k: c[f"{n}/{k}"] for k in ("kernel", "bias") if f"{n}/{k}" in sq}, keep)
      out.update({f"{n}/{k}": v for k, v in part.items()})
    return out

  return sq, sums
