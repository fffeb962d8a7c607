"""Tests for optax_dp._core._keys.as_typed_key: the key forms users may pass.

(The noise-key reuse warning is tested in test_bad_inputs.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_dp._core import _keys


def _bits(key):
  return np.asarray(jax.random.key_data(key)).tolist()


def test_typed_key_is_returned_as_is():
  key = jax.random.key(7)
  assert _keys.as_typed_key(key) is key


@pytest.mark.parametrize("seed", [0, 3, np.int64(3), np.uint32(5), jnp.int32(9)])
def test_int_seed_is_jax_random_key(seed):
  got = _keys.as_typed_key(seed)
  assert jnp.issubdtype(got.dtype, jax.dtypes.prng_key) and got.shape == ()
  assert _bits(got) == _bits(jax.random.key(int(seed)))


@pytest.mark.parametrize("to_array", [jnp.asarray, np.asarray])
def test_raw_uint32_key_keeps_its_bits_and_stream(to_array):
  raw = to_array(jax.random.PRNGKey(11))
  got = _keys.as_typed_key(raw)
  assert jnp.issubdtype(got.dtype, jax.dtypes.prng_key)
  assert _bits(got) == np.asarray(raw).tolist()
  # Same bits, same stream: what the legacy raw key itself would draw.
  np.testing.assert_array_equal(jax.random.normal(got, (3,)),
                                jax.random.normal(jnp.asarray(raw), (3,)))


@pytest.mark.parametrize("bad", [
    True,                                     # a bool is not a seed
    1.5,                                      # a float
    "0",                                      # a string
    None,
    jax.random.split(jax.random.key(0), 2),   # a batch of typed keys
    jnp.zeros((3,), jnp.uint32),              # raw data of the wrong size
    jnp.zeros((2,), jnp.int32),               # raw-looking, wrong dtype
    jnp.float32(2.0),                         # a float array scalar
], ids=["bool", "float", "str", "none", "key_batch", "uint32x3", "int32x2", "f32"])
def test_refusals_name_the_argument(bad):
  with pytest.raises(ValueError, match="noise_key"):
    _keys.as_typed_key(bad, name="noise_key")


@pytest.mark.parametrize("seed", [-1, 2**32, 2**32 + 5, 2**63 + 5, np.int64(-3)])
def test_int_seed_outside_32_bits_is_refused_not_truncated(seed):
  # jax.random.key(2**32 + 5) is jax.random.key(5), and key(-1) is key(2**32 - 1):
  # a seed outside [0, 2**32) would silently alias another one.
  with pytest.raises(ValueError, match=r"outside \[0, 2\*\*32\)"):
    _keys.as_typed_key(seed)
  assert _bits(_keys.as_typed_key(2**32 - 1)) == [0, 2**32 - 1]


def test_batch_of_keys_refusal_says_what_to_pass():
  with pytest.raises(ValueError, match="single PRNG key"):
    _keys.as_typed_key(jax.random.split(jax.random.key(0), 3))


def test_a_traced_key_or_seed_is_accepted_inside_jit():
  """The key only seeds the noise: a transform built inside jit from a traced
  key (or traced int seed) releases the same update as one built outside.
  (The parameters the accounting depends on may not be traced: see
  tests/test_composition.py::test_inject_hyperparams.)"""
  import optax_dp  # pylint: disable=import-outside-toplevel
  params, grads = {"w": jnp.zeros(3)}, {"w": jnp.ones((4, 3))}

  def release(key):
    tx = optax_dp.dp_aggregate(1.0, 1.0, key=key, expected_batch_size=4)
    return tx.update(grads, tx.init(params), params)[0]["w"]

  eager = release(7)
  np.testing.assert_allclose(jax.jit(release)(jnp.int32(7)), eager, rtol=1e-6)  # jit vs eager rounding
  np.testing.assert_allclose(jax.jit(release)(jax.random.key(7)), eager, rtol=1e-6)
  assert not np.allclose(jax.jit(release)(jnp.int32(8)), eager)
