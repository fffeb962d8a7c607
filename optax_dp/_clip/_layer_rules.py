"""Book-keeping rules per layer type, framework-neutral.

Given one layer's per-example inputs and output gradients (each example a
batch of one, stacked: leading axis B), each rule returns the per-example
squared norms of each of that layer's parameter gradients, `{param name:
(B,)}`, and a function `sums(c, keep) -> {param name: sum_i c[name]_i g_i}`
for the clip factors `c = {param name: (B,)}` (one vector per parameter, so
that group-wise clipping may clip a kernel and its bias in different groups),
without materialising per-example gradients where a cheaper form exists:

* `dense_terms`: y = a @ W (+ b) over T positions: `|a|^2 |g|^2` (T = 1), the
  ghost norm `<A A^H, G G^H>` or the materialised `A^T G`, whichever costs
  less for the shapes.
* `conv_terms`: a convolution as im2col + `dense_terms`, or per-example kernel
  gradients block by block (one kernel offset at a time) when cheaper.
* `embed_terms`: a table lookup, by token equality.
* `recurrent_terms`: an RNN whose cell is made of Dense sub-layers, from
  their per-step inputs and output gradients (`run_recurrence` records them
  in the scan over time): each sub-layer a Dense over T positions.
* `vjp_terms`: any other layer: a vmapped VJP of that layer alone.

Every per-example quantity depends on its own row only (a NaN stays in that
example's norm), and rows with `keep` False are zeroed with `where` before the
sums. Complex parameters follow `optax_dp._clip._clipping` (C^n as R^2n). The
framework adapters, a layer above, find the layers and call these.

References:
  Bu, Wang, Zha & Karypis 2023, "Differentially Private Optimization on Large
  Model at Small Cost", https://arxiv.org/abs/2210.00038 (book-keeping).
  Li, Tramer, Liang & Hashimoto 2022, "Large Language Models Can Be Strong
  Differentially Private Learners", https://arxiv.org/abs/2110.05679 (ghost
  norms of sequence layers).
  Bu, Mao & Xu 2022, "Scalable and Efficient Training of Large Convolutional
  Neural Networks with Differential Privacy", https://arxiv.org/abs/2205.10683
  (mixed ghost clipping: the cheaper of the two forms per layer).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from optax_dp._clip import _clipping

Terms = tuple  # ({name: per-example squared norms (B,)}, sums(c, keep) -> {name: array})


_sq = _clipping.squared_abs  # |x|^2 elementwise, real (complex-safe)


def _compute(x):
  """In the compute dtype (float32 or wider): in bf16 the norms would round
  the clip bound away (a sensitivity breach, tested through the adapters)."""
  return x.astype(_clipping.compute_dtype(x.dtype))


def _zero_rows(x, keep):
  """Zeroes rows (leading axis) where keep is False, so 0 * NaN cannot leak."""
  return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


def _sq_and_sum_linear(a, g, use_bias):
  """Per-example squared norms and a clipped-sum function for y = a @ W (+ b).

  a: (B, T, d), g: (B, T, p), float32. Every per-example quantity depends on
  its own row only, so a NaN in one example stays in that example's norm.
  Returns (sq, sums) with `sums(c, keep) -> {"kernel": (d, p), "bias": (p,)}`.
  """
  # (sq: the kernel's per-example squared norms; _with_bias adds the bias's.)
  positions, d = a.shape[1], a.shape[2]
  p = g.shape[-1]
  if positions == 1:
    a1, g1 = a[:, 0], g[:, 0]
    sq = jnp.sum(_sq(a1), -1) * jnp.sum(_sq(g1), -1)
    def kernel_sum(c, keep):
      return jnp.dot((_zero_rows(a1, keep) * c[:, None]).T, _zero_rows(g1, keep))
  elif positions * positions * (d + p) < positions * d * p:  # ghost norm is cheaper
    # Complex: ||sum_t a_t g_t^T||^2 = sum_{t,s} (A A^H)_ts (G G^H)_ts, real.
    aa = jnp.einsum("btd,bsd->bts", a, jnp.conj(a))
    gg = jnp.einsum("btp,bsp->bts", g, jnp.conj(g))
    sq = jnp.real(jnp.sum(aa * gg, axis=(1, 2)))
    def kernel_sum(c, keep):
      return jnp.einsum("btd,btp->dp", _zero_rows(a, keep) * c[:, None, None],
                        _zero_rows(g, keep))
  else:  # materialise each example's kernel gradient (small for image convs)
    return _terms_from_per_example(jnp.einsum("btd,btp->bdp", a, g), g, use_bias)
  return _with_bias(sq, kernel_sum, g, use_bias)


def _terms_from_per_example(per_example, g, use_bias):
  """Terms from materialised per-example kernel gradients (B, d, p)."""
  sq = jnp.sum(_sq(per_example), axis=(1, 2))
  def kernel_sum(c, keep):
    return jnp.tensordot(c, _zero_rows(per_example, keep), axes=1)
  return _with_bias(sq, kernel_sum, g, use_bias)


def _with_bias(sq, kernel_sum, g, use_bias):
  if not use_bias:
    return {"kernel": sq}, lambda c, keep: {"kernel": kernel_sum(c["kernel"], keep)}
  gb = jnp.sum(g, axis=1)
  return ({"kernel": sq, "bias": jnp.sum(_sq(gb), -1)},
          lambda c, keep: {"kernel": kernel_sum(c["kernel"], keep),
                           "bias": jnp.dot(c["bias"], _zero_rows(gb, keep))})


def _to_tuple(x, n, default):
  if x is None:
    return (default,) * n
  if isinstance(x, int):
    return (x,) * n
  return tuple(x)


def _conv_shifts(x, kernel_size, strides, kernel_dilation, padding):
  """The strided input slices, one per kernel offset, in the kernel's HWIO order.

  x: (B, *spatial, cin) -> list of (B, T, cin), with T the output positions:
  concatenated along the last axis they are the im2col patches.
  """
  n = x.ndim - 2
  kernel = _to_tuple(kernel_size, n, 1)
  strides = _to_tuple(strides, n, 1)
  dilation = _to_tuple(kernel_dilation, n, 1)
  spatial = x.shape[1:-1]
  eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(spatial, eff, strides, padding)
  elif isinstance(padding, int):
    pads = [(padding, padding)] * n
  else:
    pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  x = jnp.pad(x, [(0, 0)] + [tuple(p) for p in pads] + [(0, 0)])
  out = [(s + lo + hi - e) // st + 1 for s, (lo, hi), e, st in zip(spatial, pads, eff, strides)]
  shifts = []
  for offsets in itertools.product(*(range(k) for k in kernel)):
    start = [0] + [o * d for o, d in zip(offsets, dilation)] + [0]
    limit = ([x.shape[0]] + [s0 + (o - 1) * st + 1 for s0, o, st in zip(start[1:-1], out, strides)]
             + [x.shape[-1]])
    piece = lax.slice(x, start, limit, [1] + list(strides) + [1])
    shifts.append(piece.reshape((x.shape[0], math.prod(out), x.shape[-1])))
  return shifts


def dense_terms(x: jax.Array, out_grad: jax.Array, use_bias: bool) -> Terms:
  """A Dense layer (a last-axis contraction): x (B, ..., d), out_grad (B, ..., p)."""
  x, g = _compute(x), _compute(out_grad)
  batch = x.shape[0]
  a = x.reshape((batch, -1, x.shape[-1]))
  # Output dims past the input's leading dims are the (flattened) features.
  g = g.reshape((batch, a.shape[1], -1))
  return _sq_and_sum_linear(a, g, use_bias)


def conv_terms(x: jax.Array, out_grad: jax.Array, *, kernel_size, strides,
               kernel_dilation, padding, use_bias: bool) -> Terms:
  """A convolution (one feature group, no input dilation), channels last.

  x: (B, R, *spatial, cin): each example R images (R = 1: a batch of one;
  more with augmentation multiplicity, whose per-example gradient sums over
  its views), out_grad likewise.
  """
  x, g = _compute(x), _compute(out_grad)
  batch = x.shape[0]
  n = x.ndim - 3 if isinstance(kernel_size, int) else len(kernel_size)
  image_shape = x.shape[x.ndim - n - 1:]           # (*spatial, cin)
  images = x.reshape((-1,) + image_shape)           # (B * R, *spatial, cin)
  shifts = [s.reshape((batch, -1, s.shape[-1]))    # (B, R * T, cin)
            for s in _conv_shifts(images, kernel_size, strides, kernel_dilation, padding)]
  g = g.reshape((batch, -1, g.shape[-1]))
  positions, d, p = g.shape[1], len(shifts) * x.shape[-1], g.shape[-1]
  if positions == 1 or positions * positions * (d + p) < positions * d * p:
    a = jnp.concatenate(shifts, axis=-1) if len(shifts) > 1 else shifts[0]
    return _sq_and_sum_linear(a, g, use_bias)
  # Per-example kernel gradients block by block (one kernel offset at a
  # time), so the (B, T, k*k*cin) im2col matrix is never materialised.
  blocks = [jnp.einsum("btc,btp->bcp", s, g) for s in shifts]
  per_example = jnp.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]
  return _terms_from_per_example(per_example, g, use_bias)


def embed_terms(ids: jax.Array, out_grad: jax.Array, vocab: int,
                name: str = "embedding") -> Terms:
  """A table lookup `table[ids]`: ids (B, ...) integers, out_grad (B, ..., d)."""
  batch = out_grad.shape[0]
  ids = ids.reshape((batch, -1))
  g = _compute(out_grad).reshape((batch, ids.shape[1], -1))
  # ||sum_t onehot(id_t) g_t^T||^2 = sum_{t,s} [id_t == id_s] <g_t, conj g_s>.
  same = ids[:, :, None] == ids[:, None, :]
  gg = jnp.einsum("btd,bsd->bts", g, jnp.conj(g))
  sq = jnp.real(jnp.sum(jnp.where(same, gg, jnp.zeros((), gg.dtype)), axis=(1, 2)))

  def embed_sum(c, keep):
    rows = (_zero_rows(g, keep) * c[name][:, None, None]).reshape((-1, g.shape[-1]))
    return {name: jnp.zeros((vocab, g.shape[-1]), rows.dtype).at[ids.reshape(-1)].add(rows)}

  return {name: sq}, embed_sum


def vjp_terms(apply_fn: Callable[[Any, Any], Any], layer_params: dict, inputs: Any,
              out_grad: Any) -> Terms:
  """Any layer: `apply_fn(layer_params, example_inputs) -> outputs`, whose
  per-example parameter gradients are a vmapped VJP of that layer alone."""

  def one(example_inputs, cotangent):
    _, vjp = jax.vjp(lambda p: apply_fn(p, example_inputs), layer_params)
    return vjp(cotangent)[0]

  per_example = jax.tree.map(_compute, jax.vmap(one)(inputs, out_grad))
  sq = {name: _clipping.per_example_sq_norms(x) for name, x in per_example.items()}
  return sq, lambda c, keep: {name: jnp.tensordot(c[name], _zero_rows(x, keep), axes=1)
                              for name, x in per_example.items()}


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


def lora_terms(x: jax.Array, h: jax.Array, h_grad: jax.Array, out_grad: jax.Array) -> Terms:
  """A low-rank adapter `out = (x @ A) @ B` (LoRA), as two Dense layers
  without bias: per example grad A = x^T h_grad (h = x @ A) and grad B =
  h^T out_grad, each by `dense_terms`; keys "lora_a" and "lora_b".

  References:
    Hu et al. 2021, "LoRA: Low-Rank Adaptation of LLMs" (arXiv:2106.09685).
  """
  a_sq, a_sums = dense_terms(x, h_grad, False)
  b_sq, b_sums = dense_terms(h, out_grad, False)

  def sums(c, keep):
    return {"lora_a": a_sums({"kernel": c["lora_a"]}, keep)["kernel"],
            "lora_b": b_sums({"kernel": c["lora_b"]}, keep)["kernel"]}

  return {"lora_a": a_sq["kernel"], "lora_b": b_sq["kernel"]}, sums


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


def is_array(x) -> bool:
  """Whether a layer-call argument is an array (traced or not), not a static."""
  return isinstance(x, (jax.Array, jax.core.Tracer)) or hasattr(x, "__jax_array__") or (
      hasattr(x, "shape") and hasattr(x, "dtype"))


def split_call(args, kwargs) -> tuple[list, Any, list]:
  """A layer call's `(args, kwargs)` as (arrays, treedef, statics): statics
  holds the non-array leaves by position (None where an array goes), so
  `rebuild_call` can put other arrays (per-example rows) in their place."""
  leaves, treedef = jax.tree.flatten((args, kwargs))
  return ([x for x in leaves if is_array(x)], treedef,
          [None if is_array(x) else x for x in leaves])


def rebuild_call(treedef, statics, arrays) -> tuple[tuple, dict]:
  """`(args, kwargs)` from `split_call`'s treedef and statics, and arrays."""
  it = iter(arrays)
  return jax.tree.unflatten(treedef, [next(it) if s is None else s for s in statics])


def split_leaf_indices(layers, num_leaves: int) -> tuple[list, list]:
  """(covered, uncovered) flat-parameter indices, for an adapter's `layers`
  (each with a `leaf_index` of param name -> index)."""
  covered = sorted(i for layer in layers for i in layer.leaf_index.values())
  taken = set(covered)
  return covered, [i for i in range(num_leaves) if i not in taken]


def merge_leaves(num_leaves: int, *groups) -> list:
  """The flat parameter list from `(indices, leaves)` groups."""
  leaves = [None] * num_leaves
  for indices, values in groups:
    for i, x in zip(indices, values):
      leaves[i] = x
  return leaves


def check_covered_unused(example_loss, args) -> set:
  """Indices (into covered_leaves) of covered leaves the jaxpr uses directly.

  The exactness guard of every adapter: `example_loss(uncovered, covered,
  layer_params, zs, example)` computes each covered layer from
  `layer_params`; a covered leaf that the jaxpr still reads reaches the loss
  some other way (weight tying, a direct use), so its layer must not be
  covered (its book-keeping norm would miss that path).
  """
  closed = jax.make_jaxpr(example_loss)(*args)
  jaxpr = closed.jaxpr
  sizes = [len(jax.tree.leaves(a)) for a in args]
  start = sizes[0]
  covered_vars = jaxpr.invars[start:start + sizes[1]]
  used = set()
  for eqn in jaxpr.eqns:
    for v in eqn.invars:
      used.add(id(v))
  for v in jaxpr.outvars:
    used.add(id(v))
  return {j for j, v in enumerate(covered_vars) if id(v) in used}
