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
* `affine_norm_terms`: a normalisation layer (LayerNorm, RMSNorm, GroupNorm)
  `y = n(x) * scale + bias`: position sums of `g * n(x)` and of `g`.
* `vjp_terms`: any other layer: a vmapped VJP of that layer alone.

Recurrent layers (an RNN whose cell is made of Dense sub-layers) have their
rule in `_recurrent_rules`: each sub-layer a Dense over T positions.

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


def vjp_grads(apply_fn: Callable[[Any, Any], Any], layer_params: dict, inputs: Any,
              out_grad: Any) -> dict:
  """Any layer's per-example parameter gradients `{name: (B, ...)}`: a vmapped
  VJP of `apply_fn(layer_params, example_inputs) -> outputs` alone."""

  def one(example_inputs, cotangent):
    _, vjp = jax.vjp(lambda p: apply_fn(p, example_inputs), layer_params)
    return vjp(cotangent)[0]

  return jax.tree.map(_compute, jax.vmap(one)(inputs, out_grad))


def vjp_terms(apply_fn: Callable[[Any, Any], Any], layer_params: dict, inputs: Any,
              out_grad: Any) -> Terms:
  """Any layer, from its materialised per-example gradients (`vjp_grads`)."""
  return _materialised_terms(vjp_grads(apply_fn, layer_params, inputs, out_grad))


def affine_norm_terms(apply_fn: Callable[[Any, Any], Any], layer_params: dict, inputs: Any,
                      out_grad: jax.Array) -> Terms:
  """A normalisation layer `y = n(x) * scale + bias` (LayerNorm, RMSNorm,
  GroupNorm): `n(x)` the normalised input, which depends on neither parameter,
  and `scale`, `bias` (either may be absent) broadcast over the output's
  trailing axes, which their shape must equal (the adapter checks).

  Per example, `grad scale = sum_t g_t * n(x_t)` and `grad bias = sum_t g_t`
  over the positions t: vectors of the feature size, materialised (B x
  features). `n(x)` is the layer itself at scale 1 and bias 0, so the rule
  holds for each framework's normalisation exactly as it computes it (its
  epsilon, reduction axes, groups and dtypes); one forward pass of the layer
  where `vjp_terms` would vmap its whole VJP.
  """
  unit = {name: jnp.ones_like(p) if name == "scale" else jnp.zeros_like(p)
          for name, p in layer_params.items()}
  normalised = _compute(jax.vmap(lambda x: apply_fn(unit, x))(inputs))
  g = _compute(out_grad)
  batch = g.shape[0]

  def position_sum(x, shape):
    return jnp.sum(x.reshape((batch, -1) + tuple(shape)), axis=1)

  return _materialised_terms({
      name: position_sum(g * normalised if name == "scale" else g, jnp.shape(p))
      for name, p in layer_params.items()})


def _materialised_terms(per_example: dict) -> Terms:
  """Terms from materialised per-example gradients `{name: (B, ...)}`."""
  sq = {name: _clipping.per_example_sq_norms(x) for name, x in per_example.items()}
  return sq, lambda c, keep: {name: jnp.tensordot(c[name], _zero_rows(x, keep), axes=1)
                              for name, x in per_example.items()}


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
