"""Tests for optax_dp._sharding on a one-device mesh, in this process.

The sharded gradient functions must equal their single-device counterparts
(the mechanism, hence the accounting, is unchanged), and the batch helpers
must keep exactly the sampler's examples. Gradient functions are jitted, as
in training (eager shard_map dispatch is slow). Eight simulated devices (trap 1 and
2, one all-reduce, divisibility): test_multi_device.py, in a subprocess.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import optax_dp

L2_NORM_CLIP = 1.0


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))


def _loss(params, batch):
  pred = batch["x"] @ params["w"] + params["b"]
  return jnp.mean((pred - batch["y"]) ** 2)


def _problem(n=6):
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32), "b": jnp.float32(0.5)}
  batch = {"x": jnp.asarray(rng.normal(size=(n, 3)) * 3, jnp.float32),
           "y": jnp.asarray(rng.normal(size=(n,)), jnp.float32)}
  mask = jnp.asarray([True] * (n - 2) + [False] * 2)
  return params, batch, mask


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


def test_sharded_clipped_grads_equal_clipped_grads():
  params, batch, mask = _problem()
  got = jax.jit(optax_dp.sharded_clipped_grads(_loss, L2_NORM_CLIP, mesh=_mesh()))(
      params, batch, mask)
  want = jax.jit(optax_dp.clipped_grads(_loss, L2_NORM_CLIP))(params, batch, mask)
  _close(got.clipped_sum, want.clipped_sum)
  assert got.batch_size == want.batch_size == 6
  assert got.l2_norm_clip == L2_NORM_CLIP
  assert int(got.nonfinite_examples) == 0
  # Some examples really are clipped (the equality is not vacuous).
  grads = jax.jit(optax_dp.per_example_grads(_loss))(params, batch, mask)
  norms = np.sqrt(np.asarray(grads["w"]) ** 2 @ np.ones(3) + np.asarray(grads["b"]) ** 2)
  assert norms.max() > 2 * L2_NORM_CLIP


def test_sharded_values_and_per_example_grads_equal_single_device():
  params, batch, mask = _problem()
  values, clipped = jax.jit(optax_dp.sharded_value_and_clipped_grads(
      _loss, L2_NORM_CLIP, mesh=_mesh()))(params, batch, mask)
  want_values, want_grads = jax.jit(optax_dp.value_and_per_example_grads(_loss))(
      params, batch, mask)
  _close(values, want_values)
  assert clipped.batch_size == 6
  got_values, got_grads = jax.jit(optax_dp.sharded_per_example_grads(_loss, mesh=_mesh()))(
      params, batch, mask)
  _close(got_values, want_values)
  _close(got_grads, want_grads)


def test_pad_batch_for_devices_keeps_the_examples_and_interleaves():
  batch = optax_dp.Batch(indices=np.array([4, 8, 1, 6, -1]),
                         mask=np.array([True, True, True, True, False]))
  padded = optax_dp.pad_batch_for_devices(batch, 4)
  assert padded.indices.shape == padded.mask.shape == (8,)
  assert sorted(padded.indices[padded.mask].tolist()) == [1, 4, 6, 8]
  assert (padded.indices[~padded.mask] == -1).all()
  # Device d's contiguous slice of 2 rows holds rows d and d + 4 of the input.
  assert padded.indices.reshape(4, 2).tolist() == [[4, -1], [8, -1], [1, -1], [6, -1]]
  same = optax_dp.pad_batch_for_devices(batch, 1)
  assert same.indices.tolist() == batch.indices.tolist()
  assert same.mask.tolist() == batch.mask.tolist()


def test_gather_sharded_batch_equals_gather_batch():
  data = {"x": np.arange(30.0).reshape(10, 3), "y": np.arange(10)}
  batch = next(optax_dp.PoissonSampler(10, 3, max_batch_size=6).batches(0, steps=1))
  sharding = NamedSharding(_mesh(), P("data"))
  rows, mask = optax_dp.gather_sharded_batch(data, batch, sharding)
  want = optax_dp.gather_batch(data, batch)
  for name in data:
    np.testing.assert_array_equal(np.asarray(rows[name]), want[name])
    assert rows[name].sharding == sharding
  np.testing.assert_array_equal(np.asarray(mask), batch.mask)


@pytest.mark.parametrize("sharding", [
    lambda mesh: NamedSharding(mesh, P(None, "data")),   # splits a feature axis
    lambda mesh: jax.sharding.SingleDeviceSharding(jax.devices()[0]),  # no spec
])
def test_gather_sharded_batch_refuses_other_shardings(sharding):
  batch = optax_dp.Batch(indices=np.array([0, 1]), mask=np.array([True, True]))
  with pytest.raises(ValueError, match="splits the batch axis"):
    optax_dp.gather_sharded_batch({"x": np.ones((4, 2))}, batch, sharding(_mesh()))
