"""The noise sources (optax_dp._aggregation._noise): the in-place draw used on
a mesh of several devices is the 1-device draw, bit for bit.

`gaussian_noise` draws one N(0, 1) vector per dtype and cuts it into the
leaves. On a mesh it computes each leaf's piece where the leaf lives
(`_stream_normal`, from each coordinate's own threefry counter) so that no
device computes or receives the whole draw. These tests pin that piece to
`jax.random.normal`'s flat draw, and the counter arithmetic to distinct
counters (a dropped carry would reuse noise). The sharded equality itself:
tests/test_model_parallel.py and tests/test_multi_device.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_dp._aggregation import _noise

SHAPES = [(3, 5), (128,), (7, 11, 13), (), (64, 257)]


def _flat_and_pieces(key, dtype):
  """The flat draw and each leaf's piece computed in place, each compiled on
  its own (as a step compiles them: XLA's fusion of erf_inv with its
  neighbours can round a coordinate 1 ulp apart, so the two are not traced
  into one program here; op-by-op eager evaluation can differ by that too)."""
  total = sum(math.prod(s) for s in SHAPES)
  flat = jax.jit(jax.random.normal, static_argnums=(1, 2))(key, (total,), dtype)
  pieces, start = [], 0
  for shape in SHAPES:
    size = math.prod(shape)
    piece = jax.jit(_noise._stream_normal, static_argnums=(1, 2, 3))(key, start, shape, dtype)
    pieces.append((flat[start:start + size].reshape(shape), piece))
    start += size
  return pieces


@pytest.mark.parametrize("typed_key", [False, True])
def test_in_place_pieces_equal_the_flat_draw_bitwise(typed_key):
  key = jax.random.fold_in(jax.random.key(7) if typed_key else jax.random.PRNGKey(7), 1)
  for want, got in _flat_and_pieces(key, jnp.float32):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_in_place_pieces_equal_the_flat_draw_in_float64():
  with jax.enable_x64(True):
    for want, got in _flat_and_pieces(jax.random.key(3), jnp.float64):
      assert got.dtype == jnp.float64
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_counters_past_2_to_the_32_do_not_wrap_onto_the_first_ones():
  """Coordinates 2**32 .. 2**32 + 2 of a draw (a leaf that starts just below
  2**32 coordinates) are not coordinates 0 .. 2 again: the 64-bit counter's
  carry reaches its high half. Dropping the carry would add the same noise to
  two coordinates (the jax#3646 mistake)."""
  key = jax.random.key(0)
  across = np.asarray(_noise._stream_normal(key, 2 ** 32 - 3, (6,), jnp.float32))
  first = np.asarray(_noise._stream_normal(key, 0, (3,), jnp.float32))
  just_below = np.asarray(_noise._stream_normal(key, 2 ** 32 - 3, (3,), jnp.float32))
  np.testing.assert_array_equal(across[:3], just_below)
  assert not np.any(np.isin(across[3:], first)), (across, first)
  assert len(set(across.tolist())) == 6


def test_only_threefry_keys_take_the_in_place_draw():
  assert _noise._is_threefry(jax.random.key(0))
  assert _noise._is_threefry(jax.random.PRNGKey(0))
  assert not _noise._is_threefry(jax.random.key(0, impl="rbg"))
