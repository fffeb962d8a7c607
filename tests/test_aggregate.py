"""Tests of dp_aggregate / dpsgd: clipping, noise, keys, normalisation, errors."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_dp


def _per_example_tree(batch=8, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return {
      "w": jnp.asarray(rng.normal(size=(batch, 3, 4)) * scale, jnp.float32),
      "b": jnp.asarray(rng.normal(size=(batch, 4)) * scale, jnp.float32),
      "nested": {"v": jnp.asarray(rng.normal(size=(batch, 5)) * scale, jnp.float32)},
  }


def _params_like(tree):
  return jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), tree)


def _numpy_clipped_mean(tree, clip, normaliser):
  """Independent reference: flatten each example, clip in float64, sum, divide."""
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
  batch = leaves[0].shape[0]
  flat = np.concatenate([x.reshape(batch, -1) for x in leaves], axis=1)
  norms = np.linalg.norm(flat, axis=1)
  factors = np.minimum(1.0, clip / np.maximum(norms, 1e-300))
  out = []
  for x in leaves:
    out.append(np.tensordot(factors, x, axes=1) / normaliser)
  return out


def _no_noise(clip, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    return optax_dp.dp_aggregate(clip, 0.0, jax.random.key(0), **kw)


@pytest.mark.parametrize("clip", [0.05, 0.5, 2.0, 1e6])
def test_zero_noise_equals_clipped_mean(clip):
  grads = _per_example_tree(batch=16, scale=0.3)
  tx = _no_noise(clip)
  out, _ = jax.jit(tx.update)(grads, tx.init(None))
  want = _numpy_clipped_mean(grads, clip, 16)
  for got, ref in zip(jax.tree.leaves(out), want):
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-7)


def test_each_clipped_contribution_has_norm_at_most_clip():
  # With batch 1 and no noise, the output times B is the clipped example itself.
  clip = 0.1
  for seed in range(5):
    grads = _per_example_tree(batch=1, seed=seed, scale=10.0 ** (seed - 2))
    tx = _no_noise(clip)
    out, _ = tx.update(grads, tx.init(None))
    norm = float(optax.tree.norm(out))
    orig = float(optax.tree.norm(grads))
    assert norm <= clip * (1 + 1e-6)
    # Below the clip the example is untouched; above it, it is scaled to exactly C.
    np.testing.assert_allclose(norm, min(orig, clip), rtol=1e-5)


def test_global_norm_not_per_leaf():
  # Example norm 5 split as (3, 4) across two leaves: one factor 1/5 applies to both.
  grads = {"a": jnp.array([[3.0]]), "b": jnp.array([[4.0]])}
  tx = _no_noise(1.0)
  out, _ = tx.update(grads, tx.init(None))
  np.testing.assert_allclose(out["a"], [0.6], rtol=1e-6)
  np.testing.assert_allclose(out["b"], [0.8], rtol=1e-6)


def test_expected_batch_size_is_the_normaliser():
  grads = _per_example_tree(batch=8, scale=0.01)  # all below clip
  tx = _no_noise(1.0, expected_batch_size=32)
  out, _ = tx.update(grads, tx.init(None))
  want = jax.tree.map(lambda g: g.sum(0) / 32, grads)
  for got, ref in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_zero_rows_do_not_change_the_sum_but_the_normaliser_stays_public():
  # Padding rows (zero gradients) must not change the output: normalisation is
  # by expected_batch_size, never by how many rows are non-zero.
  grads = _per_example_tree(batch=4, scale=0.5)
  padded = jax.tree.map(lambda g: jnp.concatenate([g, jnp.zeros_like(g)]), grads)
  tx = _no_noise(0.3, expected_batch_size=5)
  a, _ = tx.update(grads, tx.init(None))
  b, _ = tx.update(padded, tx.init(None))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6)


def test_zero_norm_example_is_fine():
  grads = {"w": jnp.zeros((3, 4))}
  tx = _no_noise(1.0)
  out, _ = tx.update(grads, tx.init(None))
  assert np.all(np.isfinite(out["w"])) and np.all(out["w"] == 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_example_is_dropped_and_counted(bad):
  grads = _per_example_tree(batch=6, scale=0.01)
  poisoned = jax.tree.map(lambda g: g.at[2].set(bad), grads)
  tx = _no_noise(1.0, expected_batch_size=6)
  out, state = jax.jit(tx.update)(poisoned, tx.init(None))
  without = jax.tree.map(lambda g: g.at[2].set(0.0), grads)
  want = jax.tree.map(lambda g: g.sum(0) / 6, without)
  for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)
  assert int(state.nonfinite_examples) == 1


def test_noise_std_matches_contract():
  # One leaf of n = 200_000 coordinates, zero gradients: the output is pure
  # noise with std sigma*C/B. The sample std of n normals has relative standard
  # error 1/sqrt(2n) = 0.16%; allow 5 standard errors (0.8%).
  clip, sigma, batch = 0.7, 1.9, 4
  grads = {"w": jnp.zeros((batch, 200_000))}
  tx = optax_dp.dp_aggregate(clip, sigma, jax.random.key(3))
  out, _ = tx.update(grads, tx.init(None))
  x = np.asarray(out["w"], np.float64)
  want = sigma * clip / batch
  rel_se = 1 / math.sqrt(2 * x.size)
  assert abs(x.std() / want - 1) < 5 * rel_se
  assert abs(x.mean()) < 5 * want / math.sqrt(x.size)


def test_noise_is_fresh_each_step_and_independent_across_leaves():
  n = 50_000
  grads = {"a": jnp.zeros((2, n)), "b": jnp.zeros((2, n))}
  tx = optax_dp.dp_aggregate(1.0, 1.0, jax.random.key(7))
  update = jax.jit(tx.update)
  state = tx.init(None)
  out1, state = update(grads, state)
  out2, state = update(grads, state)
  assert int(state.step) == 2
  # Independent standard normals have sample correlation ~ N(0, 1/n): |r| < 5/sqrt(n).
  bound = 5 / math.sqrt(n)
  pairs = [(out1["a"], out2["a"]), (out1["a"], out1["b"]), (out1["b"], out2["b"]),
           (out1["a"], out2["b"])]
  for x, y in pairs:
    r = np.corrcoef(np.asarray(x), np.asarray(y))[0, 1]
    assert abs(r) < bound, r


def test_key_determinism_and_key_forms():
  grads = _per_example_tree()
  def first_update(key):
    tx = optax_dp.dp_aggregate(1.0, 1.0, key)
    return tx.update(grads, tx.init(None))[0]
  a = first_update(jax.random.key(5))
  b = first_update(jax.random.key(5))
  c = first_update(5)                                 # int seed == jax.random.key(5)
  d = first_update(jax.random.PRNGKey(5))             # legacy raw key, same bits
  e = first_update(jax.random.key(6))
  for x, y, z, w in zip(*(jax.tree.leaves(t) for t in (a, b, c, d))):
    np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(x, z)
    np.testing.assert_array_equal(x, w)
  assert not np.allclose(jax.tree.leaves(a)[0], jax.tree.leaves(e)[0])


def test_state_is_a_namedtuple_pytree_that_advances_the_key():
  tx = optax_dp.dp_aggregate(1.0, 1.0, 0)
  state = tx.init(None)
  assert isinstance(state, optax_dp.DPAggregateState)
  _, new = tx.update(_per_example_tree(), state)
  # The state holds plain uint32 key data (checkpointable by any tool): the
  # data of fold_in(key, step), which moves on with the step.
  assert state.noise_key.dtype == jnp.uint32 and new.noise_key.dtype == jnp.uint32
  assert not np.array_equal(state.noise_key, new.noise_key)
  np.testing.assert_array_equal(
      new.noise_key, jax.random.key_data(jax.random.fold_in(jax.random.key(0), 1)))
  assert int(new.step) == 1
  assert len(jax.tree.leaves(new)) == 3


@pytest.mark.parametrize("clip", [0.0, -1.0, np.nan, np.inf, "a"])
def test_bad_clip_raises(clip):
  with pytest.raises(ValueError, match="l2_norm_clip"):
    optax_dp.dp_aggregate(clip, 1.0, 0)


@pytest.mark.parametrize("sigma", [-0.1, np.nan, np.inf])
def test_bad_noise_multiplier_raises(sigma):
  with pytest.raises(ValueError, match="noise_multiplier"):
    optax_dp.dp_aggregate(1.0, sigma, 0)


def test_zero_noise_warns_loudly():
  with pytest.warns(UserWarning, match="NOT differentially private"):
    optax_dp.dp_aggregate(1.0, 0.0, 0)


@pytest.mark.parametrize("ebs", [0, -3, 2.5, True, "8"])
def test_bad_expected_batch_size_raises(ebs):
  with pytest.raises(ValueError, match="expected_batch_size"):
    optax_dp.dp_aggregate(1.0, 1.0, 0, expected_batch_size=ebs)


@pytest.mark.parametrize("key", [1.5, jnp.zeros((3,), jnp.uint32),
                                 jax.random.split(jax.random.key(0), 2), None])
def test_bad_key_raises(key):
  with pytest.raises(ValueError, match="key"):
    optax_dp.dp_aggregate(1.0, 1.0, key)


def test_grads_without_common_batch_axis_raise():
  tx = optax_dp.dp_aggregate(1.0, 1.0, 0)
  with pytest.raises(ValueError, match="same leading batch axis"):
    tx.update({"w": jnp.zeros((3, 4)), "b": jnp.zeros((4,))}, tx.init(None))
  with pytest.raises(ValueError, match="scalar"):
    tx.update({"w": jnp.zeros((3, 4)), "s": jnp.zeros(())}, tx.init(None))


def test_batch_averaged_grads_are_caught_with_params():
  # All leaves happen to share a leading dim, but they have the params' shape:
  # with params passed (as optax.chain / TrainState do) this is detected.
  params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((4,))}
  tx = optax_dp.dp_aggregate(1.0, 1.0, 0)
  with pytest.raises(ValueError, match="shaped exactly like the parameters.*per_example_grads"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="does not match the params tree"):
    tx.update({"w": jnp.zeros((2, 4, 3))}, tx.init(params), params)


def test_bf16_grads_get_float32_noise_and_keep_dtype():
  n = 100_000
  grads = {"w": jnp.zeros((2, n), jnp.bfloat16)}
  tx = optax_dp.dp_aggregate(1.0, 1.0, 0, expected_batch_size=1)
  out, _ = tx.update(grads, tx.init(None))
  assert out["w"].dtype == jnp.bfloat16
  x = np.asarray(out["w"], np.float64)
  # bf16 rounding has relative error <= 2^-8 per value, far below the 5-SE band.
  assert abs(x.std() - 1.0) < 5 / math.sqrt(2 * n) + 2 ** -8


def test_dpsgd_is_chain_of_aggregate_and_sgd():
  grads = _per_example_tree(scale=0.5)
  params = _params_like(grads)
  a = optax_dp.dpsgd(0.1, 0.3, 1.2, jax.random.key(1), momentum=0.9, expected_batch_size=8)
  b = optax.chain(optax_dp.dp_aggregate(0.3, 1.2, jax.random.key(1), expected_batch_size=8),
                  optax.sgd(0.1, momentum=0.9))
  sa, sb = a.init(params), b.init(params)
  for _ in range(2):
    ua, sa = a.update(grads, sa, params)
    ub, sb = b.update(grads, sb, params)
    for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
      np.testing.assert_array_equal(x, y)


def test_flax_trainstate_swap_under_jit():
  pytest.importorskip("flax")
  from flax.training import train_state

  import models

  model = models.MLP((8, 3))
  x = jax.random.normal(jax.random.key(0), (16, 5))
  y = jnp.arange(16) % 3
  params = model.init(jax.random.key(1), x[:1])["params"]

  def loss_fn(p, batch):
    xb, yb = batch
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, xb), yb).mean()

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    tx = optax.chain(optax_dp.dp_aggregate(1e6, 0.0, jax.random.key(2)), optax.sgd(0.1))
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  grad_fn = optax_dp.per_example_grads(loss_fn)

  @jax.jit
  def step(state, batch):
    return state.apply_gradients(grads=grad_fn(state.params, batch))

  new = step(state, (x, y))
  # With no clipping and no noise, DP-SGD is ordinary SGD on the mean loss.
  ref = jax.tree.map(lambda p, g: p - 0.1 * g, params, jax.grad(loss_fn)(params, (x, y)))
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(new.opt_state[0].step) == 1


def test_rescale_to_unit_norm_divides_by_clip_including_noise():
  grads = _per_example_tree(batch=8, scale=0.5)
  plain = optax_dp.dp_aggregate(0.2, 1.5, jax.random.key(4), expected_batch_size=10)
  unit = optax_dp.dp_aggregate(0.2, 1.5, jax.random.key(4), expected_batch_size=10,
                               rescale_to_unit_norm=True)
  a, _ = plain.update(grads, plain.init(None))
  b, _ = unit.update(grads, unit.init(None))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x) / 0.2, y, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# The DP step first in the chain: a transformation before it is refused by an
# optax_dp message, whatever it does to the clipped sum.

def _clipped_and_params():
  params = {"w": jnp.zeros(3)}
  loss = lambda p, b: jnp.mean((b @ p["w"] - 1.0) ** 2)
  return optax_dp.clipped_grads(loss, 1.0)(params, jnp.ones((4, 3))), params


@pytest.mark.parametrize("before", [
    optax.adam(1e-3),                       # two trees: structure mismatch
    optax.sgd(0.1, momentum=0.9),
    optax.add_decayed_weights(1e-4),
    optax.sgd(0.1),                         # one tree: maps over the ClippedGrads
    optax.scale(-0.5),
], ids=["adam", "momentum", "weight_decay", "sgd", "scale"])
def test_transformation_before_the_dp_step_is_refused(before):
  clipped, params = _clipped_and_params()
  tx = optax.chain(before, optax_dp.dp_aggregate(1.0, 1.0, jax.random.key(0),
                                                 expected_batch_size=4))
  with pytest.raises((ValueError, TypeError)) as info:
    tx.update(clipped, tx.init(params), params)
  text = str(info.value)
  assert "optax_dp" in text and "FIRST" in text.upper() and "optax.chain(optax_dp.dp_aggregate" in text


def test_nnx_transformation_before_the_dp_step_is_refused():
  from flax import nnx   # pylint: disable=import-outside-toplevel
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(
      optax.adam(1e-3), optax_dp.dp_aggregate(1.0, 1.0, jax.random.key(0),
                                              expected_batch_size=4)), wrt=nnx.Param)
  loss = lambda m, b: jnp.mean(m(b) ** 2)
  grads = optax_dp.clipped_grads(loss, 1.0)(model, jnp.ones((4, 3)))
  with pytest.raises(ValueError, match=r"put the DP step FIRST"):
    optimizer.update(model, grads)


def test_dpsgd_takes_every_keyword_of_dp_aggregate():
  import inspect   # pylint: disable=import-outside-toplevel
  aggregate = inspect.signature(optax_dp.dp_aggregate).parameters
  sgd = inspect.signature(optax_dp.dpsgd).parameters
  missing = [name for name in aggregate if name not in sgd]
  assert not missing, f"dpsgd lacks dp_aggregate's {missing}"
  for name, p in aggregate.items():
    assert sgd[name].default == p.default, name


def test_dpsgd_with_a_noise_strategy_is_the_chain_with_it():
  strategy = optax_dp.bandmf_strategy(3, 2)
  per_example = _per_example_tree(batch=4)
  params = _params_like(per_example)
  ref = optax.chain(
      optax_dp.dp_aggregate(1.0, 1.1, key=3, expected_batch_size=4,
                            noise_strategy=strategy), optax.sgd(0.1))
  tx = optax_dp.dpsgd(0.1, 1.0, 1.1, key=3, expected_batch_size=4,
                      noise_strategy=strategy)
  s_ref, s_tx = ref.init(params), tx.init(params)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optax_dp.NoiseKeyReuseWarning)
    for _ in range(3):
      u_ref, s_ref = ref.update(per_example, s_ref, params)
      u_tx, s_tx = tx.update(per_example, s_tx, params)
      for a, b in zip(jax.tree.leaves(u_ref), jax.tree.leaves(u_tx)):
        np.testing.assert_array_equal(a, b)
  # Step 4 is past the strategy's rows: refused, as with dp_aggregate.
  with pytest.raises(optax_dp.PrivacyBudgetExceededError, match="covers 3 steps"):
    tx.update(per_example, s_tx, params)

