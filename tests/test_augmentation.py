"""Tests for optax_dp._lifecycle._augmentation: augmentation multiplicity equals
explicit averaging of the view gradients, then clipping."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_dp

import models
from models import SmallCNN

B, K, C = 6, 3, 0.05
MASK = jnp.array([True, True, False, True, True, True])


def _augment(key, example):
  """A random horizontal flip and a random shift of the intensities."""
  image, label = example
  flip_key, shift_key = jax.random.split(key)
  image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
  return image + 0.1 * jax.random.normal(shift_key, ()), label


def _setup():
  model = SmallCNN(features=4, classes=3)
  images = jax.random.normal(jax.random.key(0), (B, 6, 6, 1))
  labels = jnp.arange(B) % 3
  params = model.init(jax.random.key(1), images[:1])["params"]

  def loss_fn(params, batch):
    x, y = batch
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  keys = jax.random.split(jax.random.key(2), B)
  return loss_fn, params, (images, labels), keys


def _by_hand(loss_fn, params, batch, keys, mask):
  """For each example: the mean of its K view gradients, clipped to C; summed."""
  total = jax.tree.map(jnp.zeros_like, params)
  norms = []
  for i in range(B):
    example = jax.tree.map(lambda x: x[i], batch)
    grads = []
    for view_key in jax.random.split(keys[i], K):
      view = jax.tree.map(lambda x: x[None], _augment(view_key, example))
      grads.append(jax.grad(loss_fn)(params, view))
    g = jax.tree.map(lambda *xs: sum(xs) / K, *grads)
    norm = float(optax.tree.norm(g))
    norms.append(norm)
    if mask[i]:
      total = jax.tree.map(lambda t, x: t + x * min(1.0, C / norm), total, g)
  return total, norms


@pytest.mark.parametrize("method,microbatch_size", [
    pytest.param("auto", None, marks=pytest.mark.slow),
    pytest.param("ghost", None, marks=pytest.mark.slow), ("vmap", None),
    pytest.param("auto", 4, marks=pytest.mark.slow)])
def test_multiplicity_equals_averaging_then_clipping(method, microbatch_size):
  loss_fn, params, batch, keys = _setup()
  expected, norms = _by_hand(loss_fn, params, batch, keys, MASK)
  assert sum(n > C for n in norms) >= 3       # the clip is active
  loss = optax_dp.augmentation_multiplicity(loss_fn, _augment, K)
  with warnings.catch_warnings():
    warnings.simplefilter("error", optax_dp.PerExampleFallbackWarning)  # all book-kept
    got = jax.jit(optax_dp.clipped_grads(loss, C, method=method,
                                         microbatch_size=microbatch_size))(
        params, (batch, keys), MASK)
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got.clipped_sum)):
    np.testing.assert_allclose(g, e, rtol=2e-5, atol=1e-7 * C)


@pytest.mark.slow
def test_per_example_gradients_are_the_view_means():
  loss_fn, params, batch, keys = _setup()
  loss = optax_dp.augmentation_multiplicity(loss_fn, _augment, K)
  per_example = optax_dp.per_example_grads(loss)(params, (batch, keys))
  _, norms = _by_hand(loss_fn, params, batch, keys, MASK)
  got = [float(n) for n in jnp.sqrt(sum(
      jnp.sum(x.reshape(B, -1) ** 2, 1) for x in jax.tree.leaves(per_example)))]
  np.testing.assert_allclose(got, norms, rtol=1e-5)
  # One view is not K views: the averaging changes the gradients.
  single = optax_dp.per_example_grads(
      optax_dp.augmentation_multiplicity(loss_fn, _augment, 1))(params, (batch, keys))
  assert not np.allclose(jax.tree.leaves(single)[0], jax.tree.leaves(per_example)[0])


@pytest.mark.slow
def test_nnx_module_auto_equals_vmap():
  from flax import nnx  # pylint: disable=import-outside-toplevel

  def loss_fn(model, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  _, _, batch, keys = _setup()
  model = models.NNXSmallCNN(nnx.Rngs(0))
  loss = optax_dp.augmentation_multiplicity(loss_fn, _augment, K)
  sums = {m: nnx.as_pure(optax_dp.clipped_grads(loss, C, method=m)(model, (batch, keys), MASK))
          for m in ("ghost", "vmap")}
  is_clipped = lambda x: isinstance(x, optax_dp.ClippedGrads)
  for a, b in zip(jax.tree.leaves(sums["ghost"], is_leaf=is_clipped),
                  jax.tree.leaves(sums["vmap"], is_leaf=is_clipped)):
    np.testing.assert_allclose(a.clipped_sum, b.clipped_sum, rtol=2e-5, atol=1e-7 * C)


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_num_views_must_be_a_positive_int(bad):
  with pytest.raises(ValueError, match="num_views"):
    optax_dp.augmentation_multiplicity(lambda p, b: 0.0, _augment, bad)
