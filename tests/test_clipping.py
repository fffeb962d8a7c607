"""Tests for optax_dp._clip._clipping: complex parameters (C^n as R^2n) and Python
scalar leaves, through every clipping path (issue 10, points 1 and 2)."""

import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_dp
from optax_dp._clip import _clipping

C64 = jnp.complex64


def _np_norm(tree):
  """Global L2 norm in float64 numpy, |z|^2 for complex (the reference)."""
  return math.sqrt(sum(float(np.sum(np.abs(np.asarray(x, np.complex128)) ** 2))
                       for x in jax.tree.leaves(tree)))


def _no_noise(clip, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # noise 0 warns: not private
    return optax_dp.dp_aggregate(clip, 0.0, key=0, **kw)


# --- the rule itself -------------------------------------------------------


def test_complex_squared_norm_is_the_sum_of_abs_squared():
  grads = {"w": jnp.array([[1 + 1j, 1 + 1j], [3 + 4j, 0]], C64),
           "b": jnp.array([[0.0], [1j]], C64)}
  np.testing.assert_allclose(_clipping.per_example_sq_norms(grads), [4.0, 26.0])
  assert _clipping.squared_abs(jnp.array(1 + 1j, C64)).dtype == jnp.float32


@pytest.mark.parametrize("row, expected", [
    # norm 2: the example, whose Re(sum z^2) is 0 (released unclipped)
    ([1 + 1j, 1 + 1j], [0.05 + 0.05j, 0.05 + 0.05j]),
    # norm 5: Re(sum z^2) = -7, whose sqrt was NaN
    ([3 + 4j, 0], [0.06 + 0.08j, 0]),
])
def test_complex_example_is_clipped_to_c_by_dp_aggregate_and_clip_and_sum(row, expected):
  clip = 0.1
  grads = {"w": jnp.array([row], C64)}
  params = {"w": jnp.zeros((2,), C64)}
  tx = _no_noise(clip, expected_batch_size=1)
  out, _ = tx.update(grads, tx.init(params), params)
  assert out["w"].dtype == C64
  np.testing.assert_allclose(out["w"], expected, rtol=1e-6, atol=1e-7)
  assert _np_norm(out) <= clip * (1 + 1e-6)
  summed = optax_dp.clip_and_sum(grads, clip).clipped_sum
  np.testing.assert_allclose(summed["w"], expected, rtol=1e-6, atol=1e-7)


# --- every clipping path on complex Flax Linen models ----------------------


class ComplexMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(6, param_dtype=C64, dtype=C64)(x)
    return nn.Dense(3, param_dtype=C64, dtype=C64)(jnp.tanh(x))


class ComplexSeqDense(nn.Module):
  """Dense over a sequence: the ghost-norm formula for T=4, d=p=16, and the
  materialised per-example kernel for T=16, d=p=4 (see optax_dp._clip._layer_rules)."""
  features: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, param_dtype=C64, dtype=C64)(x)


class ComplexConvEmbed(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(11, 4, param_dtype=C64, dtype=C64)(tokens)  # (B, T, 4)
    x = nn.Conv(5, (3,), param_dtype=C64, dtype=C64)(x)
    x = nn.LayerNorm(param_dtype=C64, dtype=C64)(x)  # the norm rule
    return nn.Dense(2, param_dtype=C64, dtype=C64)(x.reshape((x.shape[0], -1)))


def _complex_input(shape, seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(k1, shape) + 1j * jax.random.normal(k2, shape)).astype(C64) * 3


_CASES = {
    "mlp": (ComplexMLP(), lambda: _complex_input((5, 4), 1)),
    "seq_ghost_norm": (ComplexSeqDense(16), lambda: _complex_input((5, 4, 16), 2)),
    "seq_materialised": (ComplexSeqDense(4), lambda: _complex_input((5, 16, 4), 3)),
    "conv_embed_layernorm": (ComplexConvEmbed(),
                             lambda: jax.random.randint(jax.random.key(4), (5, 7), 0, 11)),
}


def _setup(case):
  model, make_x = _CASES[case]
  x = make_x()
  params = model.init(jax.random.key(0), x)

  def loss_fn(p, batch):
    return jnp.mean(jnp.abs(model.apply(p, batch) - (1 + 2j)) ** 2)

  return params, x, loss_fn


def _reference(params, x, loss_fn, clip):
  """Per-example gradients clipped and summed in float64 numpy."""
  grads = optax_dp.per_example_grads(loss_fn)(params, x)
  rows = []
  for i in range(x.shape[0]):
    g = jax.tree.map(lambda a: np.asarray(a[i], np.complex128), grads)
    factor = min(1.0, clip / _np_norm(g))
    rows.append(jax.tree.map(lambda a: factor * a, g))
  return jax.tree.map(lambda *r: sum(r), *rows), grads


# The fast tier runs every model per example ("vmap") and the MLP by
# book-keeping; the other models' book-keeping compiles for seconds each.
@pytest.mark.parametrize("case,method", [
    pytest.param(case, method, marks=pytest.mark.slow
                 if method == "auto" or (method == "ghost" and case != "mlp") else ())
    for method in ("auto", "ghost", "vmap") for case in sorted(_CASES)])
def test_complex_models_clip_each_example_to_c_on_every_method(case, method):
  params, x, loss_fn = _setup(case)
  clip = 0.05
  expected, grads = _reference(params, x, loss_fn, clip)
  # Every example's gradient is far above C: each is clipped.
  assert min(_np_norm(jax.tree.map(lambda a: a[i], grads)) for i in range(x.shape[0])) > 10 * clip
  fn = jax.jit(optax_dp.clipped_grads(loss_fn, clip, method=method))
  got = fn(params, x).clipped_sum
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert g.dtype == C64
    np.testing.assert_allclose(g, e, rtol=2e-4, atol=2e-6 * clip)
  # One example at a time: its released contribution has norm <= C.
  for i in range(x.shape[0]):
    one = fn(params, x[i:i + 1])
    assert _np_norm(one.clipped_sum) <= clip * (1 + 1e-5)
    assert _np_norm(one.clipped_sum) >= clip * (1 - 1e-5)


@pytest.mark.slow
def test_complex_microbatched_sharded_and_accumulated_paths_match():
  params, x, loss_fn = _setup("conv_embed_layernorm")
  clip = 0.05
  expected, _ = _reference(params, x, loss_fn, clip)

  def close(tree):
    for g, e in zip(jax.tree.leaves(tree), jax.tree.leaves(expected)):
      np.testing.assert_allclose(g, e, rtol=2e-4, atol=2e-6 * clip)

  close(jax.jit(optax_dp.clipped_grads(loss_fn, clip, microbatch_size=2))(params, x)
        .clipped_sum)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  close(jax.jit(optax_dp.sharded_clipped_grads(loss_fn, clip, mesh=mesh))(params, x)
        .clipped_sum)
  # dp_accumulate: two physical batches (3 + 2 rows) are one logical batch.
  tx = optax_dp.dp_accumulate(_no_noise(clip, expected_batch_size=1), 2)
  state = tx.init(params)
  fn = optax_dp.clipped_grads(loss_fn, clip)
  update = jax.jit(lambda batch, state: tx.update(fn(params, batch), state, params))
  _, state = update(x[:3], state)
  out, state = update(x[3:], state)
  close(out)


def test_complex_noise_gives_real_and_imaginary_parts_each_the_std():
  # C^n as R^2n: each real coordinate gets N(0, (sigma C)^2). With n = 2^16
  # complex coordinates the sample variance of each part has relative standard
  # deviation sqrt(2/n) = 0.0055; 6 of them bound it (false alarm ~2e-9).
  # jax.random.normal of a complex dtype would give each part variance 1/2:
  # 29% below, far outside the bound.
  n, clip, sigma = 2 ** 16, 2.0, 1.5
  tx = optax_dp.dp_aggregate(clip, sigma, key=7, expected_batch_size=1)
  params = {"w": jnp.zeros((n,), C64)}
  out, _ = tx.update({"w": jnp.zeros((1, n), C64)}, tx.init(params), params)
  w = np.asarray(out["w"], np.complex128)
  std = sigma * clip
  tol = 6 * math.sqrt(2 / n)
  for part in (w.real, w.imag):
    assert abs(np.mean(part ** 2) / std ** 2 - 1) < tol
  # Independent parts: correlation ~ N(0, 1/n); 6/sqrt(n) bounds it.
  assert abs(np.mean(w.real * w.imag)) / std ** 2 < 6 / math.sqrt(n)


# optax's own complex test problems (its alias_test `test_optimization`, which
# ran dpsgd on them): gradients conjugated, a batch axis of one, 10000 steps,
# the same tolerance. optax.contrib.dpsgd converges on them; before the fix
# optax_dp.dpsgd ended in NaN.


def _parabola(dtype):
  start = jnp.array([-1.0, 10.0, 1.0], dtype)
  final = jnp.array([1.0, -1.0, 1.0], dtype)
  return start, final, lambda p: jnp.sum(jnp.abs(p - final) ** 2)


def _rosenbrock(dtype):
  start = jnp.array([0.0, 0.0], dtype)
  final = jnp.array([1.0, 1.0], dtype)
  return start, final, lambda p: (jnp.abs(1.0 - p[0]) ** 2
                                  + 100.0 * jnp.abs(p[1] - p[0] ** 2) ** 2)


def _optimise(tx, problem, dtype, steps=10000):
  start, final, objective = problem(dtype)
  grad = jax.grad(objective)

  def step(carry, _):
    params, state = carry
    updates = jnp.conj(grad(params))[None]
    updates, state = tx.update(updates, state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))(
      (start, tx.init(start)))
  return params, final


# optax.contrib.dpsgd only takes `seed`, which its aggregate now deprecates.
@pytest.mark.filterwarnings("ignore:\"seed\" is deprecated:DeprecationWarning")
@pytest.mark.parametrize("problem", [_parabola, _rosenbrock])
@pytest.mark.parametrize("dtype", [jnp.float32, C64])
def test_optax_complex_test_problems_converge_as_with_optax_contrib(problem, dtype):
  kwargs = dict(momentum=0.2)
  ours, final = _optimise(optax_dp.dpsgd(1e-3, 10.0, 1e-3, key=0, expected_batch_size=1,
                                         **kwargs), problem, dtype)
  theirs, _ = _optimise(optax.contrib.dpsgd(1e-3, 10.0, 1e-3, 0, **kwargs), problem, dtype)
  np.testing.assert_allclose(theirs, final, rtol=3e-2, atol=3e-2)
  assert bool(jnp.all(jnp.isfinite(ours)))
  np.testing.assert_allclose(ours, final, rtol=3e-2, atol=3e-2)


# --- Python scalar leaves (jax_privacy's PRNG tests use {'w': 2.5, 'b': 1.0}) --


def _scalar_problem():
  params = {"w": 2.5, "b": 1.0}
  x = jnp.arange(12.0).reshape(6, 2)

  def loss_fn(p, batch):
    return jnp.mean((p["w"] * batch[:, 0] + p["b"] - batch[:, 1]) ** 2)

  return params, x, loss_fn


@pytest.mark.parametrize("method", ["auto", "vmap"])
@pytest.mark.parametrize("microbatch_size", [None, 4])
def test_python_float_leaves_work_with_every_method(method, microbatch_size):
  params, x, loss_fn = _scalar_problem()
  clip = 1.0
  grads = optax_dp.per_example_grads(loss_fn, microbatch_size=microbatch_size)(params, x)
  expected = optax_dp.clip_and_sum(grads, clip).clipped_sum
  got = optax_dp.clipped_grads(loss_fn, clip, method=method,
                               microbatch_size=microbatch_size)(params, x)
  for g, e in zip(jax.tree.leaves(got.clipped_sum), jax.tree.leaves(expected)):
    assert jnp.shape(g) == ()
    np.testing.assert_allclose(g, e, rtol=1e-6)
  assert float(jnp.abs(got.clipped_sum["w"])) > 0
  tx = optax_dp.dp_aggregate(clip, 1.0, key=3)
  state = tx.init(params)
  for inputs in (got, grads):
    out, _ = tx.update(inputs, state, params)
    assert jax.tree.map(jnp.shape, out) == {"w": (), "b": ()}
    assert all(jnp.result_type(v) == jnp.float32 for v in jax.tree.leaves(out))
  acc = optax_dp.dp_accumulate(optax_dp.dp_aggregate(clip, 1.0, key=4, expected_batch_size=6), 1)
  out, _ = acc.update(got, acc.init(params), params)
  assert jax.tree.map(jnp.shape, out) == {"w": (), "b": ()}
  # 'ghost': no Linen layer owns them, so it refuses exactly as for array
  # leaves (its ValueError, not an AttributeError about .dtype).
  with pytest.raises(ValueError, match="not owned by a layer"):
    optax_dp.clipped_grads(loss_fn, clip, method="ghost",
                           microbatch_size=microbatch_size)(params, x)
