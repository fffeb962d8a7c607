"""The bad-input matrix (docs/bad_inputs.md): one test per row, asserting the
behaviour the row states. Fixed seeds throughout; every statistical bound says
where it comes from and its false-alarm probability."""

import ast
import functools
import math
import pathlib
import re
import warnings

import dp_accounting
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import optax_dp
from optax_dp._clip import _clipping
from optax_dp._core import _keys

import models

ROOT = pathlib.Path(__file__).resolve().parent.parent
DELTA = 1e-5


# ---------------------------------------------------------------------------
# Helpers


def _per_example_tree(batch=6, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(batch, 3, 4)) * scale, jnp.float32),
          "b": jnp.asarray(rng.normal(size=(batch, 4)) * scale, jnp.float32)}


def _params_of(tree):
  return jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), tree)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)


def _all_finite(tree):
  return all(np.all(np.isfinite(x)) for x in _leaves(tree))


def _noiseless(clip, **kw):
  """dp_aggregate without noise (it warns that this is not private)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    return optax_dp.dp_aggregate(clip, 0.0, 0, **kw)


def _linear_loss(params, batch):
  x, y = batch
  pred = x @ params["w"] + params["b"]
  return jnp.mean(jnp.sum(jnp.square(pred - y), axis=-1))


def _linear_params():
  return {"w": jnp.full((5, 3), 0.1, jnp.float32), "b": jnp.zeros((3,), jnp.float32)}


def _linear_data(rows, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(rows, 5)), jnp.float32),
          jnp.asarray(rng.normal(size=(rows, 3)) * 2, jnp.float32))


_MLP = models.MLP((8, 3))


def _mlp_setup(batch=6):
  model = _MLP
  x = jax.random.normal(jax.random.key(0), (batch, 5))
  params = model.init(jax.random.key(1), x[:1])["params"]

  def loss_fn(p, b):
    return jnp.mean(jnp.square(model.apply({"params": p}, b)))

  return loss_fn, params, x


# ---------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("where", ["every leaf", "one leaf"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_gradient_in_one_example_per_example_path(bad, where):
  grads = _per_example_tree(batch=6, scale=0.5)
  leaves = ("w", "b") if where == "every leaf" else ("b",)
  poisoned = {k: (g.at[2].set(bad) if k in leaves else g) for k, g in grads.items()}
  zeroed = jax.tree.map(lambda g: g.at[2].set(0.0), grads)
  tx = optax_dp.dp_aggregate(0.3, 1.1, jax.random.key(4), expected_batch_size=6)
  update = tx.update  # eagerly: the op-by-op compilations are shared by the cases
  state = tx.init(None)
  out, new_state = update(poisoned, state)
  want, want_state = update(zeroed, state)
  # The same operations, key and step: the noise is identical, and a zeroed
  # example contributes exactly what a dropped one does (nothing), so the
  # outputs are bitwise equal: the others' clipped sum is unchanged.
  assert _all_finite(out)
  _assert_trees_equal(out, want)
  assert int(new_state.nonfinite_examples) == 1
  assert int(want_state.nonfinite_examples) == 0
  # The count accumulates in the state.
  _, later = update(poisoned, new_state)
  assert int(later.nonfinite_examples) == 2


@functools.lru_cache(maxsize=None)
def _mlp_fast_path(method, clip):
  """(loss_fn, params, x, jitted clipped_grads, jitted per-example reference),
  compiled once per method for the parametrized cases."""
  loss_fn, params, x = _mlp_setup(batch=6)
  grad_fn = jax.jit(optax_dp.clipped_grads(loss_fn, clip, method=method))
  ref_fn = jax.jit(lambda p, b, m: optax_dp.clip_and_sum(
      optax_dp.per_example_grads(loss_fn)(p, b, m), clip))
  return loss_fn, params, x, grad_fn, ref_fn


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_nonfinite_gradient_in_one_example_fast_path(method, bad):
  clip = 0.05
  _, params, x, grad_fn, ref_fn = _mlp_fast_path(method, clip)
  poisoned = grad_fn(params, x.at[2].set(bad))
  masked = grad_fn(params, x, np.arange(6) != 2)
  assert int(poisoned.nonfinite_examples) == 1 and int(masked.nonfinite_examples) == 0
  # Bitwise equal to the same batch with that example masked out: the same
  # compiled program, in which example 2's rows are replaced by zeros (`where`)
  # before any sum over examples, and every other example's terms depend on
  # its own rows only.
  assert _all_finite(poisoned.clipped_sum)
  _assert_trees_equal(poisoned.clipped_sum, masked.clipped_sum)
  # And to the independent per-example reference without that example.
  ref = ref_fn(params, x, np.arange(6) != 2)
  for a, b in zip(_leaves(poisoned.clipped_sum), _leaves(ref.clipped_sum)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-8)
  tx = optax_dp.dp_aggregate(clip, 1.0, jax.random.key(5), expected_batch_size=6)
  state = tx.init(params)
  out, new_state = tx.update(poisoned, state, params)
  want, _ = tx.update(masked, state, params)
  assert _all_finite(out)
  assert int(new_state.nonfinite_examples) == 1
  _assert_trees_equal(out, want)          # equal sums, same key and step


def test_nonfinite_gradient_in_a_padding_row():
  params = _linear_params()
  x, y = _linear_data(6)
  mask = np.arange(6) < 4                                   # rows 4, 5: padding
  garbage = (x.at[4:].set(jnp.nan), y.at[5].set(jnp.inf))
  clean = (x, y)
  # Per-example path: the mask zeroes the padding rows (with `where`).
  tx = optax_dp.dp_aggregate(0.5, 1.0, jax.random.key(6), expected_batch_size=4)
  state = tx.init(params)
  grads_fn = jax.jit(optax_dp.per_example_grads(_linear_loss))
  update = jax.jit(tx.update)
  out, new_state = update(grads_fn(params, garbage, mask), state, params)
  want, _ = update(grads_fn(params, clean, mask), state, params)
  _assert_trees_equal(out, want)
  assert _all_finite(out) and int(new_state.nonfinite_examples) == 0
  # Fast path: padding rows are neither summed nor counted.
  clipped_fn = jax.jit(optax_dp.clipped_grads(_linear_loss, 0.5))
  got = clipped_fn(params, garbage, mask)
  ref = clipped_fn(params, clean, mask)
  assert int(got.nonfinite_examples) == 0
  _assert_trees_equal(got.clipped_sum, ref.clipped_sum)


def test_zero_norm_examples():
  clip = 0.4
  # Per-example path: all-zero batch, and zero rows mixed with others.
  zeros = jax.tree.map(jnp.zeros_like, _per_example_tree(batch=3))
  tx = _noiseless(clip, expected_batch_size=3)
  update = jax.jit(tx.update)
  out, state = update(zeros, tx.init(None))
  assert _all_finite(out) and all(np.all(x == 0) for x in _leaves(out))
  assert int(state.nonfinite_examples) == 0
  grads = _per_example_tree(batch=4, scale=2.0)
  mixed = jax.tree.map(lambda g: g.at[1].set(0.0).at[3].set(0.0), grads)
  only = jax.tree.map(lambda g: g[jnp.array([0, 2])], grads)
  a, sa = update(mixed, tx.init(None))
  b, _ = update(only, tx.init(None))
  assert int(sa.nonfinite_examples) == 0
  for x, y in zip(_leaves(a), _leaves(b)):     # same sum, same normaliser 3
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)
  # The clip factor of a zero norm is 1, not 0/0.
  np.testing.assert_array_equal(
      _clipping.clip_factors(jnp.array([0.0, 4.0]), 1.0), [1.0, 0.5])
  # Fast path (Flax MLP, book-keeping): examples with loss weight 0 have an
  # exactly zero gradient (0 * finite), i.e. zero norm in every layer's terms.
  loss_fn, params, x = _mlp_setup(batch=4)
  weights = jnp.array([1.0, 0.0, 1.0, 0.0])

  def weighted(p, batch):
    xb, wb = batch
    return jnp.mean(wb * jnp.sum(jnp.square(_MLP.apply({"params": p}, xb)), -1))

  for method in ("auto", "vmap"):
    fn = jax.jit(optax_dp.clipped_grads(weighted, clip, method=method))
    got = fn(params, (x, weights))
    ref = fn(params, (x, weights), weights > 0)    # zero-weight rows masked out
    assert int(got.nonfinite_examples) == 0 and _all_finite(got.clipped_sum)
    for g, r in zip(_leaves(got.clipped_sum), _leaves(ref.clipped_sum)):
      np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-9)
    all_zero = fn(params, (x, jnp.zeros(4)))
    assert int(all_zero.nonfinite_examples) == 0
    assert all(np.all(s == 0) for s in _leaves(all_zero.clipped_sum))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_gradients_get_float32_clipping_and_noise(dtype):
  dtype = jnp.dtype(dtype)
  batch, dim, clip, sigma, normaliser = 4, 2 ** 18, 1.0, 1.0, 4
  # Every example's gradient is 4.0 in every coordinate: norm 4 * 2^9 = 2048,
  # squared norm 16 * 2^18 = 4.2e6, which overflows float16 (max 65504). In
  # float32 the clip factor is C / 2048 = 2^-11 exactly, each clipped
  # coordinate 2^-9, the sum 2^-7 and the clipped mean 2^-9: all exact.
  grads = {"w": jnp.full((batch, dim), 4.0, dtype)}
  exact_mean = batch * clip * 4.0 / 2048 / normaliser          # 2^-9
  noiseless = _noiseless(clip, expected_batch_size=normaliser)
  out0, state0 = noiseless.update(grads, noiseless.init(None))
  assert out0["w"].dtype == dtype and int(state0.nonfinite_examples) == 0
  np.testing.assert_array_equal(np.asarray(out0["w"], np.float64), exact_mean)
  # The fast path keeps the clipped sum in float32 until the noise.
  params = {"w": jnp.zeros((dim,), dtype)}
  loss = lambda p, x: jnp.mean(jnp.sum(p["w"] * x, axis=-1))   # gradient = x
  clipped = optax_dp.clipped_grads(loss, clip, method="vmap")(params, grads["w"])
  assert clipped.clipped_sum["w"].dtype == jnp.float32
  assert int(clipped.nonfinite_examples) == 0
  np.testing.assert_array_equal(np.asarray(clipped.clipped_sum["w"]), batch * 2.0 ** -9)

  # The noise: the effective noise in the low-precision output.
  tx = optax_dp.dp_aggregate(clip, sigma, jax.random.key(11), expected_batch_size=normaliser)
  out, _ = tx.update(grads, tx.init(None))
  assert out["w"].dtype == dtype
  released = np.asarray(out["w"], np.float64)
  effective = released - exact_mean
  target = sigma * clip / normaliser
  # Model: x = exact_mean + w, w = sigma*C*z/n with z ~ N(0, 1) iid (float32
  # noise), then rounded: |released - x| <= u_t |x| + eta, where u_t is the
  # dtype's unit roundoff plus 2^-22 for the float32 add and divide, and eta is
  # half the smallest subnormal (float16 rounds tiny values absolutely).
  u_t = float(jnp.finfo(dtype).eps) / 2 + 2.0 ** -22
  eta = float(jnp.finfo(dtype).smallest_subnormal) / 2
  rms = lambda v: math.sqrt(float(np.mean(np.square(v))))
  rms_x = (rms(released) + eta) / (1 - u_t)           # |x| <= (|released| + eta) / (1 - u_t)
  rounding = u_t * rms_x + eta                        # >= rms(effective - w) (Minkowski)
  # sum(w^2) / target^2 ~ chi2(dim): two-sided bounds at false alarm 9e-7.
  lo = math.sqrt(stats.chi2.ppf(4.5e-7, dim) / dim)  # 0.9932
  hi = math.sqrt(stats.chi2.isf(4.5e-7, dim) / dim)  # 1.0068
  assert target * lo - rounding <= rms(effective) <= target * hi + rounding, (
      rms(effective) / target, lo, hi, rounding / target)
  # Gaussian tails: some |w_i| > 4 target unless an event of probability
  # (1 - P(|Z| > 4))^dim = 6e-8 happened; such a w_i shows in the output as
  # |effective| > 4 target (1 - u_t) - u_t |exact_mean| - eta. Noise drawn in
  # bf16/f16 by jax.random.normal never exceeds 2.9 / 3.5 standard deviations.
  false_alarm = (1 - 2 * stats.norm.sf(4.0)) ** dim
  assert false_alarm < 1e-7                           # total with chi2: < 1e-6
  threshold = 4 * target * (1 - u_t) - u_t * exact_mean - eta
  assert np.sum(np.abs(effective) > threshold) >= 1


@pytest.mark.parametrize("case", ["scalar leaf", "only scalars", "averaged, params passed",
                                  "averaged, params passed, leaves of one size"])
def test_grads_without_a_batch_axis(case):
  tx = optax_dp.dp_aggregate(1.0, 1.0, 0)
  params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((4,))}
  if case == "scalar leaf":
    args = ({"w": jnp.zeros((3, 4)), "s": jnp.zeros(())}, tx.init(None))
  elif case == "only scalars":
    args = ({"s": jnp.zeros(())}, tx.init(None))
  elif case == "averaged, params passed":
    # jax.grad of the mean loss: shaped like the params (leading dims 5 and 3).
    p = {"w": jnp.zeros((5, 3)), "b": jnp.zeros((3,))}
    args = (jax.grad(_linear_loss)(p, _linear_data(8)), tx.init(p), p)
  else:
    # Leaves sharing leading dim 4 look like a batch of 4; params expose them.
    args = (params, tx.init(params), params)
  with pytest.raises(ValueError, match=r"optax_dp\.per_example_grads"):
    tx.update(*args)


def test_mismatched_leading_dims():
  tx = optax_dp.dp_aggregate(1.0, 1.0, 0)
  grads = {"w": jnp.zeros((8, 3)), "b": jnp.zeros((6, 3))}
  with pytest.raises(ValueError, match="same leading batch axis"):
    tx.update(grads, tx.init(None))
  with pytest.raises(ValueError, match="same leading batch axis"):
    optax_dp.clip_and_sum(grads, 1.0)
  x, y = _linear_data(8)
  for fn in (optax_dp.per_example_grads(_linear_loss),
             optax_dp.clipped_grads(_linear_loss, 1.0)):
    with pytest.raises(ValueError, match="different leading dimensions"):
      fn(_linear_params(), (x, y[:6]))


def test_params_tree_mismatch():
  grads = _per_example_tree(batch=4)
  params = _params_of(grads)
  tx = optax_dp.dp_aggregate(1.0, 1.0, 0)
  other = {"w": params["w"]}                                  # other structure
  with pytest.raises(ValueError, match="does not match the params tree"):
    tx.update(grads, tx.init(other), other)
  transposed = {"w": jnp.zeros((4, 4, 3)), "b": grads["b"]}  # (B, 4, 3) for a (3, 4) param
  with pytest.raises(ValueError, match="per-example gradients of a parameter"):
    tx.update(transposed, tx.init(params), params)
  clipped = optax_dp.clip_and_sum(grads, 1.0)
  with pytest.raises(ValueError, match="does not match params"):
    tx.update(clipped, tx.init(other), other)
  acc = optax_dp.dp_accumulate(optax.chain(tx, optax.sgd(0.1)), 2)
  with pytest.raises(ValueError, match="does not match params"):
    acc.update(clipped, acc.init(other), other)


def _bn_model(mode):
  """Dense -> BatchNorm -> Dense; BatchNorm's mode set as the attribute or at the call."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = nn.Dense(4)(x)
      if mode == "train (call argument)":
        x = nn.BatchNorm(momentum=0.9)(x, use_running_average=not train)
      else:
        x = nn.BatchNorm(use_running_average=mode == "eval")(x)
      return nn.Dense(1)(x)

  return Net()


_BN_FUNCTIONS = ["per_example_grads", "value_and_per_example_grads(microbatch_size=2)",
                 "clipped_grads(auto)", "clipped_grads(vmap)", "clipped_grads(ghost)",
                 "jit(value_and_clipped_grads(auto))"]


# method='ghost' is left out in eval mode: it refuses BatchNorm's parameters in
# any mode (they sit next to batch_stats, so no layer owns them alone), with
# its own ValueError; "auto" handles them with per-example gradients.
@pytest.mark.parametrize("fn_name,mode", [
    (fn, mode) for mode in ("train (attribute)", "train (call argument)", "eval")
    for fn in _BN_FUNCTIONS if not (mode == "eval" and "ghost" in fn)])
def test_batchnorm_in_training_mode(fn_name, mode):
  model = _bn_model(mode)
  x = jax.random.normal(jax.random.key(0), (4, 5))
  variables = model.init(jax.random.key(1), x, train=False)
  stats_ = variables["batch_stats"]

  def loss_fn(p, batch):
    if mode == "eval":
      out = model.apply({"params": p, "batch_stats": stats_}, batch, train=False)
    else:  # what a user of BatchNorm writes for training
      out, _ = model.apply({"params": p, "batch_stats": stats_}, batch, train=True,
                           mutable=["batch_stats"])
    return jnp.mean(jnp.square(out))

  fn = {
      "per_example_grads": lambda: optax_dp.per_example_grads(loss_fn),
      "value_and_per_example_grads(microbatch_size=2)":
          lambda: optax_dp.value_and_per_example_grads(loss_fn, microbatch_size=2),
      "clipped_grads(auto)": lambda: optax_dp.clipped_grads(loss_fn, 1.0),
      "clipped_grads(vmap)": lambda: optax_dp.clipped_grads(loss_fn, 1.0, method="vmap"),
      "clipped_grads(ghost)": lambda: optax_dp.clipped_grads(loss_fn, 1.0, method="ghost"),
      "jit(value_and_clipped_grads(auto))":
          lambda: jax.jit(optax_dp.value_and_clipped_grads(loss_fn, 1.0)),
  }[fn_name]()
  if mode != "eval":
    with pytest.raises(ValueError, match="BatchNorm") as info:
      fn(variables["params"], x)
    message = str(info.value)
    for words in ("batch of one", "nn.GroupNorm", "nn.LayerNorm",
                  "use_running_average=True", "BatchNorm_0"):
      assert words in message, words
    return
  result = fn(variables["params"], x)
  assert _all_finite(result)
  # Frozen statistics make the loss per-example: compare with jax.grad of the
  # single-example loss of example 1 (per-example paths only).
  if fn_name == "per_example_grads":
    want = jax.grad(loss_fn)(variables["params"], x[1:2])
    for got, ref in zip(_leaves(jax.tree.map(lambda g: g[1], result)), _leaves(want)):
      np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# Batches


@pytest.mark.parametrize("path", ["per_example", "clipped"])
def test_empty_poisson_batch_is_a_released_noise_step(path):
  # q = 1/1000: a step is empty with probability (1 - 1/1000)^1000 = 0.37.
  sampler = optax_dp.PoissonSampler(dataset_size=1000, expected_batch_size=1)
  empty = next(b for b in sampler.batches(0, steps=50) if b.size == 0)
  assert not empty.mask.any() and np.all(empty.indices == -1)
  data = _linear_data(1000)
  x, y = optax_dp.gather_batch(data, empty).data
  # Padding may hold anything: make it NaN to show that the mask is what counts.
  batch = (jnp.full_like(x, jnp.nan), jnp.full_like(y, jnp.nan))
  params = _linear_params()
  budget = optax_dp.privacy_budget(sampler=sampler, target_delta=DELTA,
                                   noise_multiplier=1.0, steps=10, accountant="rdp")
  tx = optax_dp.dp_aggregate(0.5, key=jax.random.key(8), budget=budget)
  state = tx.init(params)
  if path == "per_example":
    grads = optax_dp.per_example_grads(_linear_loss)(params, batch, empty.mask)
    assert all(np.all(g == 0) for g in _leaves(grads))
  else:
    grads = optax_dp.clipped_grads(_linear_loss, 0.5)(params, batch, empty.mask)
    assert all(np.all(s == 0) for s in _leaves(grads.clipped_sum))
    assert int(grads.nonfinite_examples) == 0
  out, new_state = tx.update(grads, state, params)
  zeros = jax.tree.map(lambda p: jnp.zeros((3,) + p.shape, p.dtype), params)
  noise_only, _ = tx.update(zeros, state, params)
  _assert_trees_equal(out, noise_only)                 # pure noise ...
  assert _all_finite(out) and any(np.any(v != 0) for v in _leaves(out))  # ... and not nothing
  assert int(new_state.nonfinite_examples) == 0
  assert int(new_state.step) == 1                      # a released step
  assert budget.epsilon_spent(new_state) == budget.epsilon(1) > 0


@pytest.mark.parametrize("truncate", [False, True])
def test_poisson_batch_above_the_static_maximum(truncate):
  # Batch sizes ~ Binomial(100, 0.5); P(size <= 10) = 1.7e-18 per step, so
  # every step overflows max_batch_size=10 (and the seed is fixed).
  sampler = optax_dp.PoissonSampler(100, 50, max_batch_size=10, truncate=truncate)
  batches = sampler.batches(0, steps=20)
  if not truncate:
    with pytest.raises(RuntimeError, match="max_batch_size"):
      next(batches)
    return
  for batch in batches:
    assert batch.mask.all() and len(np.unique(batch.indices)) == 10
  event = sampler.dp_event(1.0, 20)
  assert isinstance(event, dp_accounting.SelfComposedDpEvent) and event.count == 20
  inner = event.event
  assert isinstance(inner, dp_accounting.TruncatedSubsampledGaussianDpEvent)
  assert (inner.truncated_batch_size, inner.sampling_probability,
          inner.dataset_size) == (10, 0.5, 100)
  assert sampler.accountants == ("pld",)


def test_mask_of_the_wrong_shape():
  x, y = _linear_data(6)
  for mask in (np.ones(5, bool), np.ones((6, 1), bool)):
    for fn in (optax_dp.per_example_grads(_linear_loss),
               optax_dp.clipped_grads(_linear_loss, 1.0)):
      with pytest.raises(ValueError, match="mask must have shape"):
        fn(_linear_params(), (x, y), mask)


# ---------------------------------------------------------------------------
# Arguments of the mechanism


@pytest.mark.parametrize("clip", [0.0, -1.0, np.inf, np.nan, "a"])
@pytest.mark.parametrize("fn", ["dp_aggregate", "dpsgd", "clipped_grads", "clip_and_sum"])
def test_bad_l2_norm_clip(fn, clip):
  call = {
      "dp_aggregate": lambda: optax_dp.dp_aggregate(clip, 1.0, 0),
      "dpsgd": lambda: optax_dp.dpsgd(0.1, clip, 1.0, 0),
      "clipped_grads": lambda: optax_dp.clipped_grads(_linear_loss, clip),
      "clip_and_sum": lambda: optax_dp.clip_and_sum(_per_example_tree(), clip),
  }[fn]
  with pytest.raises(ValueError, match="l2_norm_clip"):
    call()


@pytest.mark.parametrize("sigma", [-0.1, np.nan, np.inf, "a", True])
@pytest.mark.parametrize(
    "fn", ["dp_aggregate", "compute_epsilon", "privacy_budget", "dpsgd_event"])
def test_bad_noise_multiplier(fn, sigma):
  sampler = optax_dp.PoissonSampler(1000, 10)
  call = {
      "dp_aggregate": lambda: optax_dp.dp_aggregate(1.0, sigma, 0),
      "compute_epsilon": lambda: optax_dp.compute_epsilon(sigma, DELTA, sampler=sampler, steps=10),
      "privacy_budget": lambda: optax_dp.privacy_budget(
          sampler=sampler, target_delta=DELTA, noise_multiplier=sigma, steps=10),
      "dpsgd_event": lambda: optax_dp.dpsgd_event(sigma, sampler=sampler, steps=10),
  }[fn]
  with pytest.raises(ValueError, match="noise_multiplier"):
    call()


def test_zero_noise_multiplier():
  with pytest.warns(UserWarning, match="NOT differentially private"):
    optax_dp.dp_aggregate(1.0, 0.0, 0)
  with pytest.warns(UserWarning, match="NOT differentially private"):
    optax_dp.dpsgd(0.1, 1.0, 0.0, 0)
  sampler = optax_dp.PoissonSampler(1000, 10)
  assert optax_dp.compute_epsilon(0.0, DELTA, sampler=sampler, steps=10) == math.inf
  with pytest.raises(ValueError, match="noise_multiplier=0"):
    optax_dp.privacy_budget(sampler=sampler, target_delta=DELTA, noise_multiplier=0.0,
                            steps=10)


@pytest.mark.parametrize("ebs", [0, -3, 2.5, True, "8"])
def test_bad_expected_batch_size(ebs):
  with pytest.raises(ValueError, match="expected_batch_size"):
    optax_dp.dp_aggregate(1.0, 1.0, 0, expected_batch_size=ebs)


def test_clipped_sum_made_with_another_clip():
  clipped = optax_dp.clip_and_sum(_per_example_tree(), 0.5)
  tx = optax_dp.dp_aggregate(1.0, 1.0, 0)
  with pytest.raises(ValueError, match="same l2_norm_clip"):
    tx.update(clipped, tx.init(None))


def _range_calls():
  sampler = optax_dp.PoissonSampler(1000, 10)
  calls = []
  for delta in (0.0, 1.0, -1e-5, 1.5, np.nan):
    calls += [
        ("compute_epsilon", "target_delta", delta,
         lambda d: optax_dp.compute_epsilon(1.0, d, sampler=sampler, steps=10)),
        ("calibrate_noise_multiplier", "target_delta", delta,
         lambda d: optax_dp.calibrate_noise_multiplier(1.0, d, sampler=sampler, steps=10)),
        ("privacy_budget", "target_delta", delta,
         lambda d: optax_dp.privacy_budget(sampler=sampler, target_delta=d,
                                           target_epsilon=1.0, steps=10)),
    ]
  for eps in (0.0, -1.0, np.inf, np.nan):
    calls += [
        ("calibrate_noise_multiplier", "target_epsilon", eps,
         lambda e: optax_dp.calibrate_noise_multiplier(e, DELTA, sampler=sampler, steps=10)),
        ("privacy_budget(steps)", "target_epsilon", eps,
         lambda e: optax_dp.privacy_budget(sampler=sampler, target_delta=DELTA,
                                           target_epsilon=e, steps=10)),
        ("privacy_budget(noise_multiplier)", "target_epsilon", eps,
         lambda e: optax_dp.privacy_budget(sampler=sampler, target_delta=DELTA,
                                           target_epsilon=e, noise_multiplier=1.0)),
    ]
  return [pytest.param(argument, value, call, id=f"{name}-{argument}={value}")
          for name, argument, value, call in calls]


@pytest.mark.parametrize("argument,value,call", _range_calls())
def test_epsilon_or_delta_out_of_range(argument, value, call):
  with pytest.raises(ValueError, match=argument):
    call(value)


@pytest.mark.parametrize("case", ["fixed sampler, PLD", "truncated Poisson, RDP"])
@pytest.mark.parametrize("fn", ["compute_epsilon", "calibrate_noise_multiplier", "privacy_budget"])
def test_sampler_accountant_mismatch(fn, case):
  if case == "fixed sampler, PLD":
    sampler, accountant, fix = optax_dp.FixedBatchSampler(1000, 10), "pld", "accountant='rdp'"
  else:
    sampler = optax_dp.PoissonSampler(1000, 10, max_batch_size=20, truncate=True)
    accountant, fix = "rdp", "accountant='pld'"
  call = {
      "compute_epsilon": lambda: optax_dp.compute_epsilon(
          1.0, DELTA, sampler=sampler, steps=10, accountant=accountant),
      "calibrate_noise_multiplier": lambda: optax_dp.calibrate_noise_multiplier(
          1.0, DELTA, sampler=sampler, steps=10, accountant=accountant),
      "privacy_budget": lambda: optax_dp.privacy_budget(
          sampler=sampler, target_delta=DELTA, noise_multiplier=1.0, steps=10,
          accountant=accountant),
  }[fn]
  with pytest.raises(ValueError, match=re.escape(fix)):
    call()


# ---------------------------------------------------------------------------
# Keys


def _first_update(key, grads, live):
  tx = optax_dp.dp_aggregate(1.0, 1.0, key, expected_batch_size=6)
  live.append(tx)                                      # kept alive by the caller
  return tx.update(grads, tx.init(None))[0]


def test_key_forms():
  grads, live = _per_example_tree(), []
  raw = jax.random.PRNGKey(5)                          # legacy uint32[2]
  assert raw.dtype == jnp.uint32 and raw.shape == (2,)
  np.testing.assert_array_equal(jax.random.key_data(jax.random.key(5)), raw)
  from_raw = _first_update(raw, grads, live)
  # The same bits as a typed key: the same key, so it warns (row 22) ...
  with pytest.warns(_keys.NoiseKeyReuseWarning):
    typed = _first_update(jax.random.wrap_key_data(raw), grads, live)
  _assert_trees_equal(from_raw, typed)                 # ... and gives the same noise.
  with pytest.warns(_keys.NoiseKeyReuseWarning):
    from_int = _first_update(5, grads, live)           # int seed == jax.random.key(5)
  _assert_trees_equal(from_raw, from_int)
  other = _first_update(jax.random.key(6), grads, live)
  assert not np.any(_leaves(other)[0] == _leaves(from_raw)[0])


@pytest.mark.parametrize("key", [
    1.5, jnp.zeros((2,), jnp.float32), jnp.zeros((3,), jnp.uint32),
    jax.random.split(jax.random.key(0), 2),
    jnp.stack([jax.random.PRNGKey(0), jax.random.PRNGKey(1)]), True, None,
    2**32 + 5, -1],   # int seeds JAX would keep modulo 2**32 (5 and 2**32 - 1)
    ids=["float", "float array", "uint32[3]", "batch of typed keys", "batch of raw keys",
         "bool", "missing", "seed above 32 bits", "negative seed"])
def test_bad_keys(key):
  with pytest.raises(ValueError, match="key"):
    optax_dp.dp_aggregate(1.0, 1.0, key)


def _release_once(key, grads, clip=1.0, sigma=1.0, batch=4):
  """Builds a transform, releases one update; the transform is garbage after."""
  tx = optax_dp.dp_aggregate(clip, sigma, key=key, expected_batch_size=batch)
  return tx.update(grads, tx.init(None))[0]


def test_same_noise_key_for_two_transforms():
  ga = _per_example_tree(batch=4, seed=1)
  gb = _per_example_tree(batch=4, seed=2, scale=3.0)
  seed = 987654321                                     # key data [0, 987654321]
  with warnings.catch_warnings():
    warnings.simplefilter("error")                     # any warning fails here
    first = optax_dp.dp_aggregate(1.0, 1.0, key=seed, expected_batch_size=4)
    state = first.init(None)
    update = jax.jit(first.update)
    out_a, _ = update(ga, state)                       # using it never warns,
    update(gb, update(ga, state)[1])
    first.update(ga, state)                            # eagerly or retraced
    jax.jit(first.update)(gb, state)
    k1, k2 = jax.random.split(jax.random.key(seed))    # split keys: fine
    t1 = optax_dp.dp_aggregate(1.0, 1.0, key=k1, expected_batch_size=4)
    t2 = optax_dp.dpsgd(0.1, 1.0, 1.0, key=k2, expected_batch_size=4)
    t1.update(ga, t1.init(None))
    t2.update(ga, t2.init(_params_of(ga)), _params_of(ga))
  # A second live transform from the same key bits, in every form and with
  # other arguments, warns at its first release (building it does not).
  for same in (seed, jax.random.key(seed), jax.random.PRNGKey(seed)):
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      second = optax_dp.dp_aggregate(0.5, 2.0, key=same, expected_batch_size=8)
    with pytest.warns(_keys.NoiseKeyReuseWarning, match="IDENTICAL noise") as record:
      out_b, _ = second.update(gb, second.init(None))
    message = str(record[0].message)
    assert "cancels the noise" in message and "jax.random.split" in message
    assert issubclass(record[0].category, UserWarning)
    assert str(seed) not in message                    # the key stays out of logs
  with pytest.warns(_keys.NoiseKeyReuseWarning):       # dpsgd builds a dp_aggregate
    third = optax_dp.dpsgd(0.1, 1.0, 1.0, key=k1, expected_batch_size=4)
    third.update(ga, third.init(_params_of(ga)), _params_of(ga))
  # Both built first, then released in either order: the second release warns,
  # even once the first transform is gone (it released while the other existed).
  _keys._reset_noise_key_registry()  # pylint: disable=protected-access
  early = optax_dp.dp_aggregate(1.0, 1.0, key=11, expected_batch_size=4)
  _release_once(11, ga)
  with pytest.warns(_keys.NoiseKeyReuseWarning):
    early.update(ga, early.init(None))
  # Why: both draw z at step 0, first releases (S_a + 1 * 1 * z) / 4 and second
  # (S_b + 2 * 0.5 * z) / 8, so 4 * out_a - 8 * out_b = S_a - S_b, noise-free.
  s_a = optax_dp.clip_and_sum(ga, 1.0).clipped_sum
  s_b = optax_dp.clip_and_sum(gb, 0.5).clipped_sum
  for oa, ob, sa, sb in zip(_leaves(out_a), _leaves(out_b), _leaves(s_a), _leaves(s_b)):
    cancelled = 4 * oa.astype(np.float64) - 8 * ob.astype(np.float64)
    # float32 rounding of each output (relative 2^-23 after the add and divide)
    # scaled by 4 and 8: 2^-20 of the noisy magnitudes bounds the residual.
    atol = 2.0 ** -20 * (np.max(np.abs(4 * oa)) + np.max(np.abs(8 * ob)))
    np.testing.assert_allclose(cancelled, sa - sb, rtol=0, atol=atol)
    assert np.max(np.abs(4 * oa - sa)) > 1000 * atol   # the noise itself is not small
  # A rebuild that replaces a transform does not warn: each is built after the
  # previous one's last release and is garbage by the next one's (a re-run
  # notebook cell, one transform per benchmark row, a resumed run).
  _keys._reset_noise_key_registry()  # pylint: disable=protected-access
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for _ in range(3):
      _release_once(seed, ga)
    # No noise, nothing shared: noise_multiplier=0 transforms are not registered.
    warnings.simplefilter("ignore", UserWarning)
    zero = optax_dp.dp_aggregate(1.0, 0.0, key=seed, expected_batch_size=4)
    zero.update(ga, zero.init(None))
    warnings.simplefilter("error")
    kept = optax_dp.dp_aggregate(1.0, 1.0, key=seed, expected_batch_size=4)
    kept.update(ga, kept.init(None))
    # The private reset helper forgets every key (conftest.py uses it per test).
    _keys._reset_noise_key_registry()  # pylint: disable=protected-access
    _release_once(seed, ga)


# ---------------------------------------------------------------------------
# Misuse of the optimizer


@pytest.mark.parametrize("case", ["raw grads into dp_accumulate",
                                  "MultiSteps, per-example grads", "MultiSteps, ClippedGrads"])
def test_accumulation_misuse(case):
  params = _linear_params()
  inner = optax.chain(optax_dp.dp_aggregate(0.5, 1.0, 0, expected_batch_size=8),
                      optax.sgd(0.1))
  grads = optax_dp.per_example_grads(_linear_loss)(params, _linear_data(4))
  if case == "raw grads into dp_accumulate":
    tx, match = optax_dp.dp_accumulate(inner, 2), "ClippedGrads"
  elif case == "MultiSteps, per-example grads":
    # MultiSteps would hand dp_aggregate averaged gradients: refused by name.
    tx, match = optax.MultiSteps(inner, 2), r"wrapped in optax\.MultiSteps.*dp_accumulate"
  else:
    # A pytree-structure error from optax/JAX (no fix in its message).
    tx, match = optax.MultiSteps(inner, 2), None
    grads = optax_dp.clip_and_sum(grads, 0.5)
  with pytest.raises(ValueError, match=match):
    tx.update(grads, tx.init(params), params)


def test_stripped_clipped_grads_get_the_right_advice():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  x = jax.random.normal(jax.random.key(0), (4, 3))

  def loss_fn(p, batch):
    return jnp.mean(nnx.merge(graphdef, p)(batch) ** 2)

  clipped = optax_dp.clipped_grads(loss_fn, 1.0)(params, x)
  tx = optax_dp.dpsgd(0.1, 1.0, 1.0, key=0, expected_batch_size=4)
  # nnx.Optimizer.update calls nnx.state(grads, wrt): the ClippedGrads becomes
  # a State holding 'clipped_sum'. The message says so and gives the way out,
  # not "compute per-example gradients" (which the user already did).
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  with pytest.raises(ValueError, match=r"nnx\.Optimizer\.update.*stripped the ClippedGrads") as err:
    optimizer.update(model, clipped)
  assert "look like ordinary" not in str(err.value)
  # The arrays of a ClippedGrads passed without their wrapper (a tree_map
  # round trip): shaped exactly like the params; the message names both
  # possible origins and what to do for each.
  state = tx.init(params)
  stripped = jax.tree.map(lambda a: a, clipped.clipped_sum)
  with pytest.raises(ValueError, match=r"shaped exactly like the parameters") as err:
    tx.update(stripped, state, params)
  assert "ClippedGrads" in str(err.value) and "optax_dp.clipped_grads" in str(err.value)
  # The unstripped ClippedGrads, and per-example gradients through
  # nnx.Optimizer, work.
  updates, _ = tx.update(clipped, state, params)
  assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
  optimizer.update(model, optax_dp.per_example_grads(loss_fn)(params, x))
  assert int(optimizer.opt_state[0].step) == 1


# ---------------------------------------------------------------------------
# The table and its tests


def _table_rows():
  rows = []
  for line in (ROOT / "docs" / "bad_inputs.md").read_text().splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("|") and cells[0].isdigit():
      rows.append(cells)
  return rows


def _function_source(path, name):
  tree = ast.parse(path.read_text())
  for node in tree.body:
    if isinstance(node, ast.FunctionDef) and node.name == name:
      return ast.get_source_segment(path.read_text(), node)
  return None


def test_every_row_names_a_test_that_asserts_it():
  rows = _table_rows()
  assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
  named = set()
  for number, _, happens, _, test in rows:
    found = re.fullmatch(r"`(tests/\w+\.py)::(test_\w+)`", test)
    assert found, (number, test)
    path, name = ROOT / found.group(1), found.group(2)
    source = _function_source(path, name)
    assert source is not None, (number, test)
    # Each exception or warning the row states is named in its test.
    for exc in re.findall(r"`(\w+(?:Error|Warning))`", happens):
      assert exc in source, (number, exc, test)
    if path.name == "test_bad_inputs.py":
      named.add(name)
  # And every test of this file (but this one) is a row of the table.
  here = {n.name for n in ast.parse(pathlib.Path(__file__).read_text()).body
          if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
  assert here - {"test_every_row_names_a_test_that_asserts_it"} == named
