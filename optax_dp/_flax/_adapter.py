"""The decisions the Linen and NNX adapters make alike, in one place.

The two adapters differ in how they hook a model (Linen:
`nn.intercept_methods`; NNX: per-class `__call__` patches) and in what a layer
is made of, not in what they decide: which conv options and embedding lookups
the rules cover, which layers a shared parameter disqualifies, which
framework-neutral rule (`_layer_rules`) computes each kind, what a missing
layer call and a BatchNorm in training mode are told. `_linen`/`_linen_layers`
and `_nnx`/`_nnx_layers` call these.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax.numpy as jnp

from optax_dp._clip import _layer_rules
from optax_dp._clip import _recurrent_rules


def is_unit(x) -> bool:
  """Whether a dilation (None, an int or a tuple) is 1 along every axis."""
  return x is None or (x == 1 if isinstance(x, int) else all(v == 1 for v in x))


def conv_padding_supported(padding) -> bool:
  """The paddings the "conv" rule covers: "SAME", "VALID" or explicit pairs."""
  if isinstance(padding, str):
    return padding in ("SAME", "VALID")
  return True


def embed_is_ghost(ids, vocab: int, features: int) -> bool:
  """Whether an embedding lookup takes the "embed" rule: integer ids, and
  ghost with token equality (T^2 per example) costs no more than the generic
  VJP, which materialises vocab x features per example."""
  positions = math.prod(jnp.shape(ids))
  return (bool(jnp.issubdtype(jnp.result_type(ids), jnp.integer))
          and positions * positions <= vocab * features)


def trailing_contracted_axes(axis, ndim: int) -> Optional[int]:
  """How many trailing input axes a DenseGeneral / LinearGeneral contracts
  (`axis`: an int or a sequence, of an input with `ndim` axes), or None if
  they are not the trailing ones (then the layer keeps the generic rule)."""
  axes = sorted(a % ndim for a in ((axis,) if isinstance(axis, int) else tuple(axis)))
  return len(axes) if axes == list(range(ndim - len(axes), ndim)) else None


def flatten_trailing(x, n: int):
  """`x` with its last `n` axes flattened into one: the input of a
  DenseGeneral over n trailing axes as a Dense sees it."""
  return x.reshape(x.shape[:x.ndim - n] + (math.prod(x.shape[x.ndim - n:]),))


def norm_is_affine(feature_axes, axis_name, ndim: int, param_shapes: list, out_shape) -> bool:
  """Whether a LayerNorm, RMSNorm or GroupNorm call takes the "norm" rule
  (`_layer_rules.affine_norm_terms`): no cross-device statistics
  (`axis_name`), and its parameters broadcast over the output's trailing
  axes: `feature_axes` (an int or a sequence, of an input with `ndim` axes)
  are the last ones, and each parameter's shape equals the output's trailing
  shape. Anything else keeps the generic rule."""
  axes = (feature_axes,) if isinstance(feature_axes, int) else tuple(feature_axes)
  axes = sorted(a % ndim for a in axes)
  return (axis_name is None and axes == list(range(ndim - len(axes), ndim))
          and all(tuple(s) == tuple(out_shape[len(out_shape) - len(axes):])
                  and len(s) == len(axes) for s in param_shapes))


def unshared(layers: list) -> list:
  """The layers none of whose parameter leaves another layer owns.

  A leaf owned by two layers (shared parameters) is not covered. A call count
  cannot see this case: two modules, each called once, that the loss hands
  the same array (weight tying outside the model); covering both would lose
  one layer's clipped sum and mis-add their norms
  (tests/test_linen.py::test_shared_parameters_are_not_covered_and_auto_is_exact).
  """
  owners: dict = {}
  for layer in layers:
    for i in layer.leaf_index.values():
      owners[i] = owners.get(i, 0) + 1
  return [l for l in layers if all(owners[i] == 1 for i in l.leaf_index.values())]


def check_called(layers: list, inputs: list, subject: Callable[[list], str]) -> None:
  """RuntimeError if a covered layer was not called while the per-example loss
  ran (`inputs[k]` still None); `subject(missing paths)` names them."""
  if any(x is None for x in inputs):
    missing = [layers[k].path for k, x in enumerate(inputs) if x is None]
    raise RuntimeError(f"optax_dp ghost clipping: {subject(missing)} not called.")


def layer_terms(layer, layer_params, inputs, out_grad, *,
                dense_input: Callable[[Any], Any] = lambda x: x,
                conv: Callable[[], dict], vocab: Callable[[], tuple],
                apply_fn: Callable[[Any, Any], Any], per_example: bool = False):
  """(per-example squared norms, `sums(c, keep) -> {param name: clipped sum}`)
  of one covered layer, by the framework-neutral rule of its kind; with
  `per_example`, its materialised per-example gradients `{name: (B, ...)}`
  instead (the layer's VJP, any kind).

  The adapter supplies what only it knows: `dense_input(x)` (the input as a
  Dense sees it), `conv()` (the conv options), `vocab()` (`embed_terms`'s
  trailing arguments) and `apply_fn(params, arrays)` (the layer alone, for the
  generic VJP and the normalisation of a "norm" layer).
  """
  if per_example:
    return _layer_rules.vjp_grads(apply_fn, layer_params, inputs, out_grad)
  use_bias = "bias" in layer.leaf_index
  if layer.kind == "dense":
    return _layer_rules.dense_terms(dense_input(inputs[0]), out_grad, use_bias)
  if layer.kind == "conv":
    return _layer_rules.conv_terms(inputs[0], out_grad, use_bias=use_bias, **conv())
  if layer.kind == "embed":
    return _layer_rules.embed_terms(inputs[0], out_grad, *vocab())
  if layer.kind == "lora":
    return _layer_rules.lora_terms(inputs["lora_a"], inputs["lora_b"], out_grad["lora_a"],
                                   out_grad["lora_b"])
  if layer.kind == "recurrent":
    return _recurrent_rules.recurrent_terms(
        inputs, out_grad, {sub: f"{sub}/bias" in layer.leaf_index for sub in out_grad},
        layer.groups)
  if layer.kind == "norm":
    return _layer_rules.affine_norm_terms(apply_fn, layer_params, inputs, out_grad)
  return _layer_rules.vjp_terms(apply_fn, layer_params, inputs, out_grad)


def batchnorm_trains(value) -> bool:
  """Whether a BatchNorm's `use_running_average` value means training mode; a
  value that is not a concrete bool (a tracer) cannot be judged at trace time
  and passes."""
  try:
    return not bool(value)
  except Exception:  # pylint: disable=broad-except
    return False


def batchnorm_error(caller: str, api: str, where: str = "",
                    hint: str = "") -> ValueError:
  """The refusal of a Flax BatchNorm in training mode (`api`: "linen" or
  "nnx"; `where`: the module's path, if known; `hint`: how to freeze it)."""
  short = "nn" if api == "linen" else api
  where = f" ({where})" if where else ""
  return ValueError(
      f"{caller}: the model calls flax.{api}.BatchNorm{where} in training "
      "mode (use_running_average=False). Per-example gradients evaluate "
      "each example as a batch of one, so BatchNorm's statistics would be "
      "that one example's: a different model from the one trained without "
      "privacy, where BatchNorm mixes the examples of a batch (which "
      f"per-example clipping cannot bound). Use {short}.GroupNorm or "
      f"{short}.LayerNorm instead, or BatchNorm with use_running_average=True "
      f"(frozen statistics{hint}).")
