"""optax_dp._clip._layer_rules: each framework-neutral book-keeping rule against the
per-example gradients it replaces, computed directly with jax.vjp per example
(float64 numpy reference), on plain arrays: no Flax involved."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_dp._clip import _layer_rules

B = 4


def _normal(shape, seed, dtype=jnp.float32):
  x = jax.random.normal(jax.random.key(seed), shape)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    x = x + 1j * jax.random.normal(jax.random.key(seed + 100), shape)
  return x.astype(dtype)


def _per_example(apply_fn, params, inputs, out_grads):
  """Per-example parameter gradients: the VJP of each example alone."""
  def one(x, g):
    _, vjp = jax.vjp(lambda p: apply_fn(p, x), params)
    return vjp(g)[0]
  return jax.vmap(one)(inputs, out_grads)


def _check(terms, per_example, keep=None):
  """Each parameter's per-example squared norms, and its sum under factors
  that differ per parameter (group-wise clipping gives a kernel and its bias
  different factors)."""
  sq, sums = terms
  assert set(sq) == set(per_example)
  for name, g in per_example.items():
    flat = np.asarray(g, np.complex128).reshape(B, -1)
    np.testing.assert_allclose(sq[name], np.sum(np.abs(flat) ** 2, axis=1), rtol=2e-5)
  base = np.array([0.5, 1.0, 0.25, 2.0])
  c = {name: jnp.asarray(base * (1 + k), jnp.float32)
       for k, name in enumerate(sorted(per_example))}
  keep = jnp.ones((B,), bool) if keep is None else keep
  got = sums(c, keep)
  for name, g in per_example.items():
    weights = np.where(np.asarray(keep), np.asarray(c[name]), 0.0)
    want = np.tensordot(weights, np.asarray(g, np.complex128), axes=1)
    # A conv kernel's sum comes flattened (k*k*cin, cout), in HWIO order.
    np.testing.assert_allclose(np.reshape(got[name], want.shape), want, rtol=2e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64])
@pytest.mark.parametrize("positions, d, p", [
    (1, 5, 3),     # |a|^2 |g|^2
    (3, 16, 16),   # the ghost norm <A A^H, G G^H> is cheaper
    (16, 3, 2),    # materialised A^T G is cheaper
])
def test_dense_terms(positions, d, p, dtype):
  params = {"kernel": _normal((d, p), 0, dtype), "bias": _normal((p,), 1, dtype)}
  x = _normal((B, 1, positions, d), 2, dtype)        # each example a batch of one
  g = _normal((B, 1, positions, p), 3, dtype)
  apply_fn = lambda q, xi: xi @ q["kernel"] + q["bias"]
  _check(_layer_rules.dense_terms(x, g, use_bias=True), _per_example(apply_fn, params, x, g))


@pytest.mark.parametrize("padding, strides", [("SAME", 1), ("VALID", 2), ([(1, 0), (2, 1)], 1)])
def test_conv_terms(padding, strides):
  kernel = _normal((3, 2, 2, 4), 0)                  # HWIO
  params = {"kernel": kernel, "bias": _normal((4,), 1)}

  def apply_fn(q, xi):
    pads = padding if isinstance(padding, str) else padding
    y = jax.lax.conv_general_dilated(xi, q["kernel"], (strides, strides), pads,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + q["bias"]

  x = _normal((B, 1, 6, 5, 2), 2)
  out = jax.vmap(lambda xi: apply_fn(params, xi))(x)
  g = _normal(out.shape, 3)
  terms = _layer_rules.conv_terms(x, g, kernel_size=(3, 2), strides=strides,
                                  kernel_dilation=1, padding=padding, use_bias=True)
  _check(terms, _per_example(apply_fn, params, x, g))


def test_embed_terms_with_repeated_tokens():
  table = _normal((7, 3), 0)
  ids = jnp.array([[0, 3, 3, 6], [1, 1, 1, 1], [2, 4, 5, 6], [0, 0, 2, 2]])[:, None]
  g = _normal((B, 1, 4, 3), 1)
  apply_fn = lambda q, i: q["embedding"][i]
  terms = _layer_rules.embed_terms(ids, g, vocab=7)
  _check(terms, _per_example(apply_fn, {"embedding": table}, ids, g))


def test_vjp_terms_any_layer_and_keep_zeroes_a_nan_row():
  params = {"scale": _normal((3,), 0), "offset": _normal((3,), 1)}
  apply_fn = lambda q, xi: jnp.tanh(xi * q["scale"]) + q["offset"]
  x = _normal((B, 1, 3), 2)
  g = _normal((B, 1, 3), 3)
  _check(_layer_rules.vjp_terms(apply_fn, params, x, g), _per_example(apply_fn, params, x, g))
  # A NaN in example 0's output gradient: its norm is NaN, the others'
  # are untouched, and with keep False for it the sums stay finite.
  g = g.at[0].set(jnp.nan)
  sq, sums = _layer_rules.vjp_terms(apply_fn, params, x, g)
  total = sum(sq.values())
  assert np.isnan(total[0]) and np.all(np.isfinite(total[1:]))
  keep = jnp.array([False, True, True, True])
  ones = {name: jnp.ones((B,)) for name in sq}
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in sums(ones, keep).values())


def _layer_norm(q, x):
  """LayerNorm over the last axis, its parameters over the trailing `q` axes."""
  mean = jnp.mean(x, -1, keepdims=True)
  n = (x - mean) * jax.lax.rsqrt(jnp.var(x, -1, keepdims=True) + 1e-6)
  return n * q.get("scale", 1.0) + q.get("bias", 0.0)


def _rms_norm(q, x):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * q["scale"]


@pytest.mark.parametrize("norm, names, shape", [
    (_layer_norm, ("scale", "bias"), (B, 1, 5, 6)),     # a sequence of 5 positions
    (_layer_norm, ("scale", "bias"), (B, 1, 6)),        # one position
    (_layer_norm, ("bias",), (B, 1, 5, 6)),             # no scale
    (_rms_norm, ("scale",), (B, 1, 3, 2, 6)),           # two leading position axes
    (_layer_norm, ("scale", "bias"), (B, 1, 5, 2, 6)),  # parameters over two axes (2, 6)
])
def test_affine_norm_terms(norm, names, shape):
  feature_shape = shape[-2:] if len(shape) == 5 and norm is _layer_norm else shape[-1:]
  params = {name: _normal(feature_shape, k) for k, name in enumerate(names)}
  x = _normal(shape, 2) * 3.0 + 1.0
  g = _normal(shape, 3)
  apply_fn = lambda q, xi: norm(q, xi[0])       # split_call's form: a list of arrays
  terms = _layer_rules.affine_norm_terms(apply_fn, params, [x], g)
  _check(terms, _per_example(apply_fn, params, [x], g))
  # A NaN in example 0's output gradient: its norm is NaN, the others' are
  # untouched, and with keep False for it the sums stay finite.
  sq, sums = _layer_rules.affine_norm_terms(apply_fn, params, [x], g.at[0].set(jnp.nan))
  total = sum(sq.values())
  assert np.isnan(total[0]) and np.all(np.isfinite(total[1:]))
  keep = jnp.array([False, True, True, True])
  assert all(bool(jnp.all(jnp.isfinite(v)))
             for v in sums({name: jnp.ones((B,)) for name in sq}, keep).values())
