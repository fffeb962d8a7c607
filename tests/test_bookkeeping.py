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
      "['norm']['bias']": "generic", "['norm']['scale']": "generic",
      "['out']['bias']": "dense", "['out']['kernel']": "dense",
      "['scale']": "per-example",
      "['shared']['bias']": "per-example", "['shared']['kernel']": "per-example"}
  after = nnx.as_pure(nnx.state(model))
  assert all(bool(jnp.array_equal(a, b)) for a, b in
             zip(jax.tree.leaves(before), jax.tree.leaves(after)))  # state untouched
  conv, images = test_nnx._families()["conv"]  # pylint: disable=protected-access
  assert set(optax_dp.clipping_plan(test_nnx.loss_fn, conv, (images, jnp.arange(6) % 3)).values()) \
      == {"conv", "dense"}


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
  assert plan["['LayerNorm_0']['scale']"] == "generic"       # a VJP of that layer alone
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
