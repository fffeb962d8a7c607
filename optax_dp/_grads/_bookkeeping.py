"""The clipped sum of one chunk of `clipped_grads` (`clipped_chunk`): from
per-example gradients (`"vmap"`), or by book-keeping: which framework adapter,
which layers are covered (after the exactness guard), and the clipped sum from
the framework-neutral layer rules; `clipping_plan` shows the choice.

Adapters: `_linen_layers` (Flax Linen, `nn.intercept_methods`) and
`_nnx_layers` (Flax NNX, for the pure loss `_nnx.call` builds). Both expose `discover`,
`make_example_loss` and `layer_terms`; `_layer_rules` holds the rules and the
guard. References: Bu, Wang, Zha & Karypis 2023, "Differentially Private
Optimization on Large Model at Small Cost", https://arxiv.org/abs/2210.00038.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp

from optax_dp._clip import _clipping
from optax_dp._core import _devices
from optax_dp._clip import _layer_rules
from optax_dp._flax import _linen
from optax_dp._flax import _linen_layers
from optax_dp._flax import _nnx
from optax_dp._flax import _nnx_layers
from optax_dp._grads import _per_example
from optax_dp._grads import _privacy_units as _units


class PerExampleFallbackWarning(UserWarning):
  """`clipped_grads(method="auto")` computes per-example gradients for some
  parameters: no book-keeping rule covers them. The numbers and the privacy
  are the same; only speed and memory differ. Said once per set of parameters
  (filter it with `warnings.filterwarnings("ignore", category=...)`)."""


def compute_dtype_of(x):
  # The clipped sum stays in float32 (or wider) until the noise is added:
  # rounding it to a narrower dtype first would perturb each example's
  # contribution after clipping. dp_aggregate casts the noised result.
  # (result_type: a leaf may be a Python scalar, e.g. params {'w': 2.5}.)
  return _clipping.compute_dtype(_clipping.leaf_dtype(x))


def mask_values(values, mask, has_aux):
  if has_aux:
    return (_per_example.zero_masked(values[0], mask), values[1])
  return _per_example.zero_masked(values, mask)


def settle(loss_fn, has_aux, params, example0):
  """The covered layers after the exactness guard: `(adapter, layers,
  example_loss, covered, uncovered)`; `covered`/`uncovered` index the flat
  params. Shape-only traces: runs at trace time, nothing is compiled."""
  leaves, treedef = jax.tree.flatten(params)
  # The framework adapter: NNX for the pure loss of an nnx.Module, else Linen.
  adapter = _nnx_layers if getattr(loss_fn, _nnx.NNX_ADAPTER, False) else _linen_layers
  exclude = frozenset()
  # Each pass that finds a leaky layer excludes at least one more layer, and
  # each layer owns at least one leaf: at most len(leaves) + 1 passes.
  for _ in range(len(leaves) + 2):
    layers = adapter.discover(loss_fn, params, example0, has_aux, exclude)
    example_loss, covered, uncovered = adapter.make_example_loss(
        loss_fn, layers, has_aux, treedef, len(leaves))
    layer_params = [{name: leaves[i] for name, i in layer.leaf_index.items()}
                    for layer in layers]
    zs1 = [jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), layer.out_struct)
           for layer in layers]
    args1 = ([leaves[i] for i in uncovered], [leaves[i] for i in covered], layer_params,
             zs1, example0)
    used = _layer_rules.check_covered_unused(example_loss, args1)
    if not used:
      break
    leaky = {covered[j] for j in used}
    exclude = exclude | {l.path for l in layers
                         if set(l.leaf_index.values()) & leaky}
  else:  # pragma: no cover (unreachable: see the bound above)
    raise RuntimeError("optax_dp ghost clipping: layer discovery did not settle.")
  return adapter, layers, example_loss, covered, uncovered


def clipping_plan(loss_fn: _per_example.LossFn, params: Any, batch: Any, *,
                  has_aux: bool = False, wrt: Any = None) -> dict[str, str]:
  """How `clipped_grads(loss_fn, C, method="auto")` computes each parameter's
  share of the per-example norms, for this model and batch shape.

  Returns `{parameter path: rule}`, the rule one of `"dense"`, `"conv"`,
  `"embed"`, `"norm"`, `"recurrent"`, `"lora"` (book-keeping: no per-example
  gradient of that parameter; `"norm"`: a LayerNorm, RMSNorm or GroupNorm
  whose parameters span the output's trailing axes; `"recurrent"`: a Flax
  `RNN` over a GRU, LSTM, simple or MGU cell, book-kept through the scan
  over time; `"lora"`: the adapters of an `nnx.LoRA`),
  `"generic"` (a vmapped VJP of the owning layer alone) or
  `"per-example"` (the fallback: ordinary per-example gradients, exact but
  slower; `PerExampleFallbackWarning` names them when a step traces).
  `method="ghost"` works iff no rule is `"per-example"`. Nothing is
  computed on data: the plan comes from shape-only traces. For a Flax NNX
  model pass it as `params` (with `wrt=` as for `clipped_grads`); its random
  streams are not advanced. Privacy: none involved (a function of shapes and
  the model's code).

  Examples:
    >>> import jax.numpy as jnp, flax.linen as nn, optax_dp
    >>> model = nn.Dense(3)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> def loss_fn(params, x):
    ...   return jnp.mean(model.apply({"params": params}, x) ** 2)
    >>> optax_dp.clipping_plan(loss_fn, params, jnp.ones((8, 4)))
    {"['bias']": 'dense', "['kernel']": 'dense'}
  """
  def plan(pure_loss):
    def fn(params, batch, mask=None):
      del mask
      example0 = jax.tree.map(lambda x: x[0], batch)
      _, layers, _, _, uncovered = settle(pure_loss, has_aux, params, example0)
      names = [jax.tree_util.keystr(p).removesuffix(".value") for p, _ in
               jax.tree_util.tree_flatten_with_path(params)[0]]
      rules = {i: layer.kind for layer in layers for i in layer.leaf_index.values()}
      rules.update({i: "per-example" for i in uncovered})
      return {names[i]: rules[i] for i in range(len(names))}
    return fn

  batch, _ = _per_example.unmask(batch, None)
  if _nnx.is_module(params):
    return _nnx.call(plan, loss_fn, params, batch, None, wrt, "clipping_plan",
                     advance_streams=False)
  return plan(loss_fn)(params, batch)


def clipped_chunk(loss_fn, has_aux, groups, norms, method, params, batch, mask):
  """`(values, clipped sum, non-finite count, unclipped count)` of one chunk
  by `method`: `"vmap"` (per-example gradients of every parameter, then clip
  and sum) or book-keeping (`"auto"`, `"ghost"`: `ghost_chunk`).

  A 2-D mask `(U, k)` makes the units users (`_units`): the batch's `U * k`
  examples are evaluated as rows, and each user's real rows are summed and
  clipped together; the counts are of users."""
  k = _units.examples_per_unit(mask)
  if k is not None:
    batch, mask = _units.flatten_units(batch, mask)
  if method == "vmap":
    values, grads = _per_example.value_and_per_example_grads(
        loss_fn, has_aux=has_aux)(params, batch)
    rows = _units.clip(_units.leaf_sq_norms(grads, mask, k), groups, norms, mask, k)
    return (unit_values(mask_values(values, mask, has_aux), has_aux, k),
            _units.clipped_sum(grads, rows.factors),
            rows.nonfinite_examples, rows.unclipped_count)
  return ghost_chunk(loss_fn, has_aux, groups, norms, method, params, batch, mask, k)


def unit_values(values, has_aux, k):
  """Per-row values as `(U, k, ...)` for users (aux squeezed per row first)."""
  if k is None:
    return values
  return _units.unit_values(_per_example.batch_aux(values, has_aux), k)


# Rules that run the layer itself (the normalisation, the generic VJP): a
# unit's merged input is a batch of its rows only when axis 1 of every
# captured input is the batch-of-one axis; otherwise (e.g. a position Embed
# of arange(T), with no batch axis) the layer's per-row gradients are summed.
_RUNS_THE_LAYER = ("norm", "generic")


def _unit_terms(adapter, layer, layer_params, inputs, out_grads, row_mask, k):
  """Per-unit squared norms of one layer, its rows grouped into units."""
  inputs, out_grads = _units.zero_rows(inputs, row_mask), _units.zero_rows(out_grads, row_mask)
  if layer.kind in _RUNS_THE_LAYER and any(
      jnp.ndim(x) < 2 or jnp.shape(x)[1] != 1 for x in jax.tree.leaves(inputs)):
    grads = adapter.layer_terms(layer, layer_params, inputs, out_grads, per_example=True)
    return dict(zip(grads, _units.leaf_sq_norms(list(grads.values()), row_mask, k)))
  sq, _ = adapter.layer_terms(layer, layer_params, _units.merge_units(inputs, k),
                              _units.merge_units(out_grads, k))
  return sq


def ghost_chunk(loss_fn, has_aux, groups, norms, method, params, batch, mask, k=None):
  """`(values, clipped sum, non-finite count, unclipped count)` of one chunk:
  each parameter leaf i clipped with the norm of its group `groups[i]`
  (`norms`), from the layers' per-parameter squared norms. With `k` (users
  of k rows each, the batch flattened), the norms are of each user's summed
  rows and the clip factors apply to all of its rows."""
  leaves, treedef = jax.tree.flatten(params)
  dtypes = [compute_dtype_of(leaf) for leaf in leaves]   # of each leaf's clipped sum
  example0 = jax.tree.map(lambda x: x[0], batch)
  adapter, layers, example_loss, covered, uncovered = settle(
      loss_fn, has_aux, params, example0)
  layer_params = [{name: leaves[i] for name, i in layer.leaf_index.items()}
                  for layer in layers]
  if uncovered:
    names = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(params)[0]]
    missing = [names[i] for i in uncovered]
    shown = f"{missing[:8]}" + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    if method == "ghost":
      raise ValueError(
          f"clipped_grads(method='ghost'): parameters {shown} are not owned by a "
          "layer (a Flax Linen or NNX module holding only its own parameters, "
          "called once through __call__): they are shared, reused, used outside "
          "their module, held by a module with submodules or random streams, or "
          "frozen beside trained ones. Use method='auto' (per-example gradients "
          "for those) or 'vmap'.")
    # Said for a Flax model (some layer ran, or an NNX module); a loss of
    # plain arrays, with no layers at all, is the vmap path by definition.
    flax_model = bool(layers) or adapter is _nnx_layers or _linen.calls_modules(
        loss_fn, params, example0)
  if uncovered and flax_model:
    warnings.warn(
        f"clipped_grads(method='auto'): no book-keeping rule covers parameters "
        f"{shown} ({len(missing)} of {len(leaves)}): they get per-example "
        "gradients (the same clipped sum, slower and more memory). Covered: "
        "parameters of layers (Flax Linen or NNX modules holding only their own "
        "parameters), each called once through __call__; optax_dp.clipping_plan "
        "shows the rule of each parameter.",
        PerExampleFallbackWarning, stacklevel=2)

  batch_size = mask.shape[0]
  zs = [jax.tree.map(lambda s: jnp.zeros((batch_size,) + s.shape, s.dtype), layer.out_struct)
        for layer in layers]
  # Inside shard_map the output perturbations must be device-varying like the
  # batch, or their per-example cotangents are summed across devices.
  zs = _devices.make_varying(zs, _devices.varying_axes(batch))
  grad_fn = jax.value_and_grad(example_loss, argnums=(0, 3), has_aux=True)
  (losses, (aux, inputs)), (uncovered_grads, out_grads) = jax.vmap(
      grad_fn, in_axes=(None, None, None, 0, 0))(
          [leaves[i] for i in uncovered], [leaves[i] for i in covered], layer_params,
          zs, batch)

  leaf_sq = [None] * len(leaves)
  sum_fns = []
  for j, layer in enumerate(layers):
    layer_sq, sums = adapter.layer_terms(layer, layer_params[j], inputs[j], out_grads[j])
    if k is not None:
      layer_sq = _unit_terms(adapter, layer, layer_params[j], inputs[j], out_grads[j],
                             mask, k)
    for name, i in layer.leaf_index.items():
      leaf_sq[i] = layer_sq[name].astype(jnp.float32)
    sum_fns.append(sums)
  for i, sq in zip(uncovered, _units.leaf_sq_norms(uncovered_grads, mask, k)):
    leaf_sq[i] = sq
  rows = _units.clip(leaf_sq, groups, norms, mask, k)

  out = [None] * len(leaves)
  for j, layer in enumerate(layers):
    sums = sum_fns[j]({name: rows.factors[i] for name, i in layer.leaf_index.items()},
                      rows.keep)
    for name, i in layer.leaf_index.items():
      out[i] = sums[name].reshape(leaves[i].shape).astype(dtypes[i])
  if uncovered_grads:
    for i, s in zip(uncovered, _units.clipped_sum(
        uncovered_grads, [rows.factors[i] for i in uncovered])):
      out[i] = s.astype(dtypes[i])
  values = unit_values(mask_values((losses, aux) if has_aux else losses, mask, has_aux),
                       has_aux, k)
  return (values, jax.tree.unflatten(treedef, out),
          rows.nonfinite_examples, rows.unclipped_count)
