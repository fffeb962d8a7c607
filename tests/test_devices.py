"""Tests for optax_dp._core._devices: device-varying casts (trap 2 of _sharding).

One-device mesh only: the varying/invariant types inside `shard_map` do not
depend on the device count. (Eight simulated devices: test_multi_device.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from optax_dp._core import _devices


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))


def test_plain_arrays_vary_along_no_axis():
  tree = {"w": jnp.ones((2, 3)), "b": np.zeros(3), "n": 1.0}
  assert _devices.varying_axes(tree) == ()
  assert _devices.varying_axes({}) == ()


def test_make_varying_without_axes_is_identity():
  tree = {"w": jnp.ones(2)}
  assert _devices.make_varying(tree, ()) is tree


def test_inside_shard_map_batch_varies_and_params_are_cast():
  seen = {}

  def local(params, batch):
    seen["batch"] = _devices.varying_axes(batch)
    seen["params"] = _devices.varying_axes(params)
    cast = _devices.make_varying(params, _devices.varying_axes(batch))
    seen["cast"] = _devices.varying_axes(cast)
    seen["local"] = _devices.varying_axes(
        _devices.local_params(params, batch, "test"))
    return jnp.sum(batch)[None]

  jax.shard_map(local, mesh=_mesh(), in_specs=(P(), P("data")),
                out_specs=P("data"))(jnp.ones(3), jnp.ones((4, 3)))
  assert seen == {"batch": ("data",), "params": (), "cast": ("data",),
                  "local": ("data",)}


def test_local_params_outside_shard_map_returns_params_unchanged():
  params = {"w": jnp.ones(2)}
  assert _devices.local_params(params, jnp.ones((4, 2)), "test") is params
