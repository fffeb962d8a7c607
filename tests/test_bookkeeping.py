"""optax_dp._grads._bookkeeping: the adapter choice, clipping_plan, and when auto's
per-example fallback is said (PerExampleFallbackWarning)."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import optax_dp
import test_nnx


def test_plan_of_an_nnx_model_names_each_rule():
  model, x = test_nnx._families()["norm_shared_direct"]  # pylint: disable=protected-access
  before = jax.tree.map(jnp.copy, nnx.as_pure(nnx.state(model)))
  plan = optax_dp.clipping_plan(test_nnx.loss_fn, model, (x, jnp.arange(6) % 3))
  assert plan == {
      "['l']['bias']": "dense", "['l']['kernel']": "dense",
      "['norm']['bias']": "norm", "['norm']['scale']": "norm",
      "['out']['bias']": "dense", "['out']['kernel']": "dense",
      "['scale']": "per-example",
      "['shared']['bias']": "per-example", "['shared']['kernel']": "per-example"}
  after = nnx.as_pure(nnx.state(model))
  assert all(bool(jnp.array_equal(a, b)) for a, b in
             zip(jax.tree.leaves(before), jax.tree.leaves(after)))  # state untouched
  conv, images = test_nnx._families()["conv"]  # pylint: disable=protected-access
  assert set(optax_dp.clipping_plan(test_nnx.loss_fn, conv, (images, jnp.arange(6) % 3)).values()) \
      == {"conv", "dense"}


@pytest.mark.parametrize("family, norms", [
    ("attention", ["['ln']", "['rms']", "['attn']['query_ln']", "['attn']['key_ln']"]),
    ("general", ["['gn']"])])
def test_nnx_normalisations_take_the_norm_rule(family, norms):
  """LayerNorm, RMSNorm (MultiHeadAttention's query/key norms too) and
  GroupNorm: their parameters book-kept by position sums (the equality with
  vmap: test_nnx.py::test_book_keeping_equals_vmap_for_each_layer_family)."""
  model, x = test_nnx._families()[family]  # pylint: disable=protected-access
  plan = optax_dp.clipping_plan(test_nnx.loss_fn, model, (x, jnp.arange(6) % 3))
  for norm in norms:
    assert {rule for path, rule in plan.items() if path.startswith(norm + "[")} == {"norm"}


class _LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(nn.Dense(4)(x))
    shared = nn.Dense(4)
    return shared(shared(x))


def test_plan_of_a_linen_model_and_the_fallback_warning():
  model = _LinenNet()
  x = jnp.ones((5, 3))
  params = model.init(jax.random.key(0), x)["params"]

  def loss_fn(params, batch):
    return jnp.mean(model.apply({"params": params}, batch) ** 2)

  plan = optax_dp.clipping_plan(loss_fn, params, x)
  assert plan["['Dense_0']['kernel']"] == "dense"
  assert plan["['LayerNorm_0']['scale']"] == "norm"          # position sums of g and g * n(x)
  assert plan["['Dense_1']['kernel']"] == "per-example"      # called twice: shared
  with pytest.warns(optax_dp.PerExampleFallbackWarning, match=r"Dense_1.*\(2 of 6\)"):
    optax_dp.clipped_grads(loss_fn, 1.0)(params, x)


def test_a_loss_of_plain_arrays_is_the_vmap_path_without_a_warning():
  def loss_fn(w, batch):
    return jnp.mean(batch @ w)

  assert optax_dp.clipping_plan(loss_fn, jnp.ones(3), jnp.ones((4, 3))) == {"": "per-example"}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    optax_dp.clipped_grads(loss_fn, 1.0)(jnp.ones(3), jnp.ones((4, 3)))


class _LinenNorms(nn.Module):
  @nn.compact
  def __call__(self, x):                                   # (B, T, 4)
    x = nn.LayerNorm()(x)
    x = nn.RMSNorm()(x)
    x = nn.GroupNorm(num_groups=2)(x)
    return nn.LayerNorm(reduction_axes=-2, feature_axes=-2)(x)  # parameters over T


def test_linen_normalisations_take_the_norm_rule_where_it_is_exact():
  """The norm rule needs the parameters over the output's trailing axes; a
  LayerNorm whose features are the positions keeps the generic rule (the
  equality of both with vmap: test_clipped.py::test_mixed_layer_types_generic_path)."""
  x = jnp.ones((5, 3, 4))
  params = _LinenNorms().init(jax.random.key(0), x)["params"]
  plan = optax_dp.clipping_plan(
      lambda p, b: jnp.mean(_LinenNorms().apply({"params": p}, b) ** 2), params, x)
  assert {path.split("]")[0] + "]": rule for path, rule in plan.items()} == {
      "['LayerNorm_0']": "norm", "['RMSNorm_0']": "norm", "['GroupNorm_0']": "norm",
      "['LayerNorm_1']": "generic"}


class _LinenGeneral(nn.Module):
  @nn.compact
  def __call__(self, x):                                   # (B, T, 2, 4)
    x = nn.DenseGeneral(6, axis=(-2, -1))(x)               # trailing axes: dense
    x = nn.DenseGeneral(3, axis=1)(x.reshape(x.shape[:2] + (2, 3)))  # over T: generic
    return x


def test_linen_dense_general_over_trailing_axes_is_dense():
  """A DenseGeneral contracting the trailing axes (Linen MultiHeadAttention's
  output projection) is a Dense over the flattened axes; over other axes it
  keeps the generic rule (equality with vmap: test_clipped.py::test_mixed_layer_types_generic_path,
  tests/test_lm_models.py for attention)."""
  x = jnp.ones((5, 3, 2, 4))
  params = _LinenGeneral().init(jax.random.key(0), x)["params"]
  plan = optax_dp.clipping_plan(
      lambda p, b: jnp.mean(_LinenGeneral().apply({"params": p}, b) ** 2), params, x)
  assert {path.split("]")[0] + "]": rule for path, rule in plan.items()} == {
      "['DenseGeneral_0']": "dense", "['DenseGeneral_1']": "generic"}
