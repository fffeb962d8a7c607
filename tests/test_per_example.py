"""Tests of per_example_grads / value_and_per_example_grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_dp


def _params():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return {"conv": jax.random.normal(k1, (3, 3, 1, 4)) * 0.3,
          "dense": {"w": jax.random.normal(k2, (4 * 6 * 6, 5)) * 0.1,
                    "b": jax.random.normal(k3, (5,)) * 0.1}}


def _loss(params, batch):
  """An ordinary batched mean loss with a conv, a dense layer and aux."""
  x, y = batch["x"], batch["y"]
  h = jax.lax.conv_general_dilated(x, params["conv"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jnp.tanh(h).reshape((x.shape[0], -1))
  logits = h @ params["dense"]["w"] + params["dense"]["b"]
  logp = jax.nn.log_softmax(logits)
  losses = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
  return losses.mean(), jnp.argmax(logits, -1)


def _batch(n=10, seed=1):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.normal(size=(n, 6, 6, 1)), jnp.float32),
          "y": jnp.asarray(rng.integers(0, 5, size=n), jnp.int32)}


def _loop_reference(params, batch):
  """Per-example gradients from a Python loop over batches of one."""
  n = batch["y"].shape[0]
  grad = jax.jit(jax.grad(lambda p, b: _loss(p, b)[0]))
  outs = [grad(params, jax.tree.map(lambda x: x[i:i + 1], batch)) for i in range(n)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def _assert_trees_close(a, b, **kw):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape
    np.testing.assert_allclose(x, y, **kw)


def test_equals_single_example_loop():
  params, batch = _params(), _batch()
  grads, aux = jax.jit(optax_dp.per_example_grads(_loss, has_aux=True))(params, batch)
  _assert_trees_close(grads, _loop_reference(params, batch), rtol=1e-5, atol=1e-6)
  assert aux.shape == (10,)  # as _loss returns it for a batch: one prediction per row


@pytest.mark.parametrize("microbatch_size", [1, 3, 5, 10, 64])
def test_microbatched_equals_vmapped(microbatch_size):
  params, batch = _params(), _batch()
  full = optax_dp.per_example_grads(_loss, has_aux=True)(params, batch)
  chunked = jax.jit(optax_dp.per_example_grads(
      _loss, has_aux=True, microbatch_size=microbatch_size))(params, batch)
  _assert_trees_close(full, chunked, rtol=1e-5, atol=1e-7)


def test_value_and_per_example_grads_losses():
  params, batch = _params(), _batch()
  (losses, preds), grads = optax_dp.value_and_per_example_grads(_loss, has_aux=True)(
      params, batch)
  want = [float(_loss(params, jax.tree.map(lambda x: x[i:i + 1], batch))[0])
          for i in range(10)]
  np.testing.assert_allclose(losses, want, rtol=1e-5)
  assert preds.shape == (10,)
  # The mean of per-example gradients is the ordinary batch gradient.
  batch_grad = jax.grad(lambda p: _loss(p, batch)[0])(params)
  _assert_trees_close(jax.tree.map(lambda g: g.mean(0), grads), batch_grad,
                      rtol=1e-4, atol=1e-6)


def test_without_aux():
  params, batch = _params(), _batch()
  loss = lambda p, b: _loss(p, b)[0]
  losses, grads = optax_dp.value_and_per_example_grads(loss)(params, batch)
  assert losses.shape == (10,)
  _assert_trees_close(optax_dp.per_example_grads(loss)(params, batch), grads, rtol=0)


def test_mask_zeroes_padding_even_if_it_is_nan():
  params, batch = _params(), _batch()
  batch = {"x": batch["x"].at[7:].set(jnp.nan), "y": batch["y"]}
  mask = np.arange(10) < 7
  fn = jax.jit(optax_dp.value_and_per_example_grads(_loss, has_aux=True))
  (losses, _), grads = fn(params, batch, mask)
  for g in jax.tree.leaves(grads):
    assert np.all(g[7:] == 0)
    assert np.all(np.isfinite(g))
  assert np.all(losses[7:] == 0)
  ref = _loop_reference(params, jax.tree.map(lambda x: x[:7], batch))
  _assert_trees_close(jax.tree.map(lambda g: g[:7], grads), ref, rtol=1e-5, atol=1e-6)


def test_mask_is_linear():
  # Masked grads == grads * mask (for finite inputs), for any 0/1 mask.
  params, batch = _params(), _batch()
  fn = optax_dp.per_example_grads(_loss, has_aux=True)
  full, _ = fn(params, batch)
  rng = np.random.default_rng(0)
  for _ in range(3):
    mask = rng.integers(0, 2, size=10).astype(bool)
    masked, _ = fn(params, batch, mask)
    want = jax.tree.map(lambda g: g * mask.reshape((-1,) + (1,) * (g.ndim - 1)), full)
    _assert_trees_close(masked, want, rtol=0, atol=0)


def test_bad_batches_raise():
  params = _params()
  fn = optax_dp.per_example_grads(lambda p, b: _loss(p, b)[0])
  with pytest.raises(ValueError, match="different leading dimensions"):
    fn(params, {"x": _batch()["x"], "y": _batch(n=9)["y"]})
  with pytest.raises(ValueError, match="scalar"):
    fn(params, {"x": _batch()["x"], "y": jnp.array(1)})
  with pytest.raises(ValueError, match="mask"):
    fn(params, _batch(), np.ones(9, bool))
  with pytest.raises(ValueError, match="microbatch_size"):
    optax_dp.per_example_grads(_loss, microbatch_size=0)
