"""Turning what users pass as a PRNG key into a typed JAX key."""

from __future__ import annotations

import hashlib
import numbers
import threading
import warnings
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


# ---------------------------------------------------------------------------
# Noise-key reuse across dp_aggregate transforms.
#
# Two dp_aggregate transforms built from the same key draw the same noise at
# every step t (update t uses fold_in(key, t)). If both release updates, the
# adversary subtracts a suitably scaled copy of one from the other and the
# noise cancels: the two clipped sums' difference is released WITHOUT noise.
# The accountant cannot see this, so dp_aggregate warns when it is built from
# key data another dp_aggregate of this process was already built from.
#
# Design: a process-wide registry of the key data (impl name, uint32 bits).
# Only the construction of a transform registers (not init/update/jit), so one
# transform used for a whole run never warns; a second construction with the
# same bits always warns, even with identical arguments, since the library
# cannot tell whether the first one's updates were discarded. It only warns
# (never raises): rebuilding the same transform to resume in the same process
# (re-running a notebook cell, tests) is legitimate when the first one's
# outputs are discarded. Transforms that add no noise (noise_multiplier=0, which
# already warns that it is not private) are not registered: they share nothing.
# The warning never prints the key bits: the noise key must stay secret (whoever
# knows it can regenerate and subtract the noise), and warnings end up in logs.
# `_reset_noise_key_registry` clears it (tests/conftest.py does so before every
# test, so that separate test cases that reuse small seeds do not warn).


class NoiseKeyReuseWarning(UserWarning):
  """Two `dp_aggregate` transforms of one process were built from the same key."""


_REGISTRY_LOCK = threading.Lock()
# sha256(impl name, key bits) -> description of the first transform built from it
# (a digest, so the registry does not keep copies of secret key material).
_NOISE_KEY_REGISTRY: dict = {}


def _key_fingerprint(key: jax.Array):
  """A digest of (impl name, uint32 bits) of a concrete typed key; None if traced."""
  try:
    data = np.asarray(jax.random.key_data(key), dtype=np.uint32)
    impl = str(jax.random.key_impl(key))
  except Exception:  # pylint: disable=broad-except  (a tracer: cannot know the bits)
    return None
  return hashlib.sha256(impl.encode() + b"\0" + data.tobytes()).hexdigest()


def register_noise_key(key: jax.Array, owner: str, *, stacklevel: int = 2) -> None:
  """Records that `owner` draws its noise from `key`; warns if another did.

  Never raises: a failure to read the key (a traced key) skips the check.
  """
  fingerprint = _key_fingerprint(key)
  if fingerprint is None:
    return
  with _REGISTRY_LOCK:
    first = _NOISE_KEY_REGISTRY.get(fingerprint)
    if first is None:
      _NOISE_KEY_REGISTRY[fingerprint] = owner
      return
  warnings.warn(
      f"optax_dp: {owner} was built from the same noise key as an earlier "
      f"{first} in this process. The two "
      "transforms add IDENTICAL noise at every step, so the difference of their "
      "(rescaled) outputs cancels the noise and releases the difference of the "
      "clipped sums with no noise at all: releasing both breaks the privacy "
      "guarantee, whatever epsilon is reported. Give each transform its own key, "
      "e.g. k1, k2 = jax.random.split(jax.random.key(seed)). (Rebuilding the "
      "same transform to resume a run whose earlier updates are discarded is "
      "fine; this warning cannot tell the two apart.)",
      NoiseKeyReuseWarning, stacklevel=stacklevel + 1)


def _reset_noise_key_registry() -> None:
  """Forgets every registered noise key (for tests; see the note above)."""
  with _REGISTRY_LOCK:
    _NOISE_KEY_REGISTRY.clear()
