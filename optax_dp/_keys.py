"""Turning what users pass as a PRNG key into a typed JAX key."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KeyLike = Any  # a typed key, a raw uint32[2] key, or a Python int seed


def as_typed_key(key: KeyLike, *, name: str = "key") -> jax.Array:
  """Returns `key` as a typed JAX PRNG key (`jax.random.key`).

  Accepts a typed key (returned as is), an integer seed (`jax.random.key(seed)`)
  or a legacy raw key, a `uint32[2]` array as `jax.random.PRNGKey` returns
  (wrapped with `jax.random.wrap_key_data`, so the same bits give the same
  stream).

  Raises:
    ValueError: for anything else (a float, a batch of keys, ...), with what to
      pass instead.
  """
  if isinstance(key, bool):
    raise ValueError(f"{name} must be a jax.random.key or an int seed, got a bool.")
  if isinstance(key, numbers.Integral):
    return jax.random.key(int(key))
  if isinstance(key, (jax.Array, np.ndarray)):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      if key.shape != ():
        raise ValueError(
            f"{name} must be a single PRNG key, got a batch of keys with shape "
            f"{key.shape}. Pass one key, e.g. jax.random.key(0).")
      return key
    if key.dtype == jnp.uint32 and key.shape == (2,):
      return jax.random.wrap_key_data(jnp.asarray(key))
    if key.shape == () and jnp.issubdtype(key.dtype, jnp.integer):
      return jax.random.key(int(key))
  raise ValueError(
      f"{name} must be a jax.random.key(...) (or a legacy uint32[2] "
      f"jax.random.PRNGKey) or an int seed; got {type(key).__name__} "
      f"{getattr(key, 'dtype', '')}{getattr(key, 'shape', '')}.")
