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
import optax
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
  want = optax_dp.gather_batch(data, batch).data
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


# Per-device sums (reduce=False) for dp_accumulate(mesh=): on this one-device
# mesh the leading per-device axis has one entry; 8 devices, the equality with
# the default path and the compiled all-reduce count: test_multi_device.py.


def _accumulate(k, mesh=None, axis_name="data"):
  inner = optax.chain(optax_dp.dp_aggregate(L2_NORM_CLIP, 1.0, 5, expected_batch_size=4 * k),
                      optax.sgd(0.1, momentum=0.9))
  return optax_dp.dp_accumulate(inner, k, mesh=mesh, axis_name=axis_name)


def test_per_device_sums_have_a_leading_device_axis_and_the_global_batch_size():
  params, batch, mask = _problem()
  got = jax.jit(optax_dp.sharded_clipped_grads(_loss, L2_NORM_CLIP, mesh=_mesh(),
                                               reduce=False))(params, batch, mask)
  want = jax.jit(optax_dp.clipped_grads(_loss, L2_NORM_CLIP))(params, batch, mask)
  assert got.unreduced_axis == "data" and want.unreduced_axis is None
  assert got.batch_size == 6 and got.l2_norm_clip == L2_NORM_CLIP
  assert got.nonfinite_examples.shape == (1,)
  _close(jax.tree.map(lambda s: s[0], got.clipped_sum), want.clipped_sum)
  values, _ = jax.jit(optax_dp.sharded_value_and_clipped_grads(
      _loss, L2_NORM_CLIP, mesh=_mesh(), reduce=False))(params, batch, mask)
  assert values.shape == (6,)


@pytest.mark.parametrize("k", [1, 3])
def test_dp_accumulate_of_per_device_sums_equals_dp_accumulate_of_global_sums(k):
  """2 logical batches of k physical ones, jitted: the same parameters and
  ledger (same key, float32 summation order only)."""
  params, _, _ = _problem()
  grad_fns = {None: optax_dp.clipped_grads(_loss, L2_NORM_CLIP),
              _mesh(): optax_dp.sharded_clipped_grads(_loss, L2_NORM_CLIP, mesh=_mesh(),
                                                      reduce=False)}
  results = []
  for mesh, grad_fn in grad_fns.items():
    tx = _accumulate(k, mesh)

    @jax.jit
    def step(p, state, batch, mask, tx=tx, grad_fn=grad_fn):
      updates, state = tx.update(grad_fn(p, batch, mask), state, p)
      return optax.apply_updates(p, updates), state

    p, state = params, tx.init(params)
    for i in range(2 * k):
      _, batch, mask = _problem()
      batch = jax.tree.map(lambda x: x + i, batch)
      p, state = step(p, state, batch, mask)
    results.append((p, state))
  (p1, s1), (p8, s8) = results
  _close(p8, p1)
  assert jax.tree.leaves(s8.clipped_sum)[0].shape[0] == 1
  assert int(s8.micro_step) == int(s1.micro_step) == 0
  assert int(s8.inner_state[0].step) == int(s1.inner_state[0].step) == 2


def test_dp_aggregate_refuses_per_device_sums():
  params, batch, mask = _problem()
  clipped = optax_dp.sharded_clipped_grads(_loss, L2_NORM_CLIP, mesh=_mesh(),
                                           reduce=False)(params, batch, mask)
  tx = optax_dp.dp_aggregate(L2_NORM_CLIP, 1.0, 0, expected_batch_size=4)
  for p in (params, None):
    with pytest.raises(ValueError, match="not yet summed over mesh axis 'data'"):
      tx.update(clipped, tx.init(params), p)
    with pytest.raises(ValueError, match="not yet summed"):
      jax.jit(tx.update)(clipped, tx.init(params), p)


def test_dp_accumulate_refuses_sums_of_the_wrong_layout():
  params, batch, mask = _problem()
  per_device = optax_dp.sharded_clipped_grads(_loss, L2_NORM_CLIP, mesh=_mesh(),
                                              reduce=False)(params, batch, mask)
  global_sum = optax_dp.clipped_grads(_loss, L2_NORM_CLIP)(params, batch, mask)
  plain, with_mesh = _accumulate(2), _accumulate(2, _mesh())
  with pytest.raises(ValueError, match="built without mesh="):
    plain.update(per_device, plain.init(params), params)
  with pytest.raises(ValueError, match="got a global clipped sum"):
    with_mesh.update(global_sum, with_mesh.init(params), params)
  other_axis = _accumulate(2, jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",)),
                           axis_name="batch")
  with pytest.raises(ValueError, match="per-device sums on mesh axis 'data'"):
    other_axis.update(per_device, other_axis.init(params), params)
  with pytest.raises(ValueError, match="with axis 'model'"):
    _accumulate(2, _mesh(), axis_name="model")
  with pytest.raises(ValueError, match="reduce must be a bool"):
    optax_dp.sharded_clipped_grads(_loss, L2_NORM_CLIP, mesh=_mesh(), reduce="no")
