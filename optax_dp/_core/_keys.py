"""Noise keys: what users pass as a PRNG key, as a typed JAX key; the key of
each release (`step_key_data`, `step_keys`); and the process-wide registry
that warns when two transforms share one.

`as_typed_key` accepts a typed key, a legacy raw `uint32[2]` key or an int
seed in `[0, 2**32)`, and refuses anything ambiguous.

The registry is this module's one piece of process-wide state (optax keeps
none). It exists because two `dp_aggregate` transforms built from the same
key add IDENTICAL noise: releasing both cancels it, which no accountant can
see and no single transform can notice on its own. Each noisy transform
holds a `NoiseStream` token; `note_release` records its first release and
warns (`NoiseKeyReuseWarning`, never an error) if another transform from
the same key bits releases side by side with it. It keeps sha256 digests
and weak references only: no key material, and a dropped transform is
forgotten. The rules are in the note above `NoiseKeyReuseWarning`; tests
clear it with `_reset_noise_key_registry` (tests/conftest.py, every test).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import numbers
import threading
import warnings
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KeyLike = Any  # a typed key, a raw uint32[2] key, or a Python int seed


def as_typed_key(key: KeyLike, *, name: str = "key") -> jax.Array:
  """Returns `key` as a typed JAX PRNG key (`jax.random.key`).

  Accepts a typed key (returned as is), an integer seed in `[0, 2**32)`
  (`jax.random.key(seed)`; outside it JAX would silently keep the low 32 bits)
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
    if not 0 <= int(key) < 2**32:
      # jax.random.key keeps the seed modulo 2**32 (without jax_enable_x64):
      # 2**32 + 5 and 5, or -1 and 2**32 - 1, would silently be the same key.
      raise ValueError(
          f"{name}: int seed {int(key)} is outside [0, 2**32); JAX keeps only "
          "its low 32 bits, so it would silently equal another seed. Pass a "
          "seed in that range, or for more secret bits a key built from them: "
          "jax.random.wrap_key_data(np.array([hi, lo], np.uint32)).")
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
      return jax.random.key(key)  # also for a traced seed (no int())
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
# The accountant cannot see this, so dp_aggregate warns.
#
# The rule: when a transform T releases for the first time (its update runs,
# eagerly or while being traced), it warns if another transform U built from
# the same key bits has released and
#   (a) U is still alive, or
#   (b) U released while T already existed (U was not replaced by T).
# Each noisy transform owns a `NoiseStream` token, held only by its update
# function, so "alive" means the transform can still release; the registry
# holds weak references to the tokens plus the sequence number of their last
# release. So
#   * one transform used for a whole run (init, update, jit, retraces) never
#     warns;
#   * a rebuild that replaces a transform (a re-run notebook cell, a resumed
#     run, one transform per benchmark row, `optax.inject_hyperparams`, which
#     rebuilds its inner transform at every update or trace) does not warn:
#     the new one is built after the old one's last release, and by its first
#     release the old one is garbage;
#   * two transforms releasing side by side from one key warn, at the first
#     release of the second, whichever order they were built in (also when
#     one of them is a jitted `inject_hyperparams`, whose inner transform is
#     garbage once traced: rule (b)).
# Not caught: two runs one after the other from the same key, the first one
# discarded before the second releases (e.g. a sweep reusing one seed): each
# release is private on its own, publishing both is not.
# Transforms that add no noise (noise_multiplier=0, which already warns that
# it is not private) get no token: they share nothing. The warning never
# prints the key bits: the noise key must stay secret (whoever knows it can
# regenerate the noise), and warnings end up in logs.
# `_reset_noise_key_registry` clears it (tests/conftest.py does so before every
# test).


class NoiseKeyReuseWarning(UserWarning):
  """Two live `dp_aggregate` transforms release updates from the same key."""


class NoiseStream:
  """The identity of one noisy transform's noise stream (see the note above).

  Held by the transform's update function, so it lives exactly as long as the
  transform; the registry holds a weak reference to it and its `record`.
  """
  __slots__ = ("record", "fingerprint", "created", "__weakref__")

  def __init__(self, owner: str, fingerprint):
    self.record = _Release(owner)
    self.fingerprint = fingerprint
    self.created = next(_SEQUENCE)


class _Release:
  """What the registry remembers of a stream, also once it is garbage."""
  __slots__ = ("owner", "last")

  def __init__(self, owner: str):
    self.owner = owner
    self.last = None  # sequence number of its latest release; None: none yet


_SEQUENCE = itertools.count()
_REGISTRY_LOCK = threading.Lock()
_REMEMBERED = 64  # released streams remembered per key (the most recent)
# sha256(impl name, key bits) -> deque of (weakref to NoiseStream, _Release)
# of the streams built from those bits that have released (a digest, so the
# registry keeps no copy of secret key material).
_NOISE_KEY_REGISTRY: dict = {}


def _key_fingerprint(key: jax.Array):
  """A digest of (impl name, uint32 bits) of a concrete typed key; None if traced."""
  try:
    # A concrete key stays concrete inside a jit trace (dp_aggregate built
    # there, e.g. by optax.inject_hyperparams with static_args).
    with jax.ensure_compile_time_eval():
      data = np.asarray(jax.random.key_data(key), dtype=np.uint32)
    impl = str(jax.random.key_impl(key))
  except Exception:  # pylint: disable=broad-except  (a tracer: cannot know the bits)
    return None
  return hashlib.sha256(impl.encode() + b"\0" + data.tobytes()).hexdigest()


def noise_stream(key: jax.Array, owner: str) -> NoiseStream:
  """The token of a new noisy transform drawing its noise from `key`."""
  return NoiseStream(owner, _key_fingerprint(key))


def note_release(stream: NoiseStream, *, stacklevel: int = 2) -> None:
  """Records that `stream`'s transform releases; at its first release, warns
  if another transform from the same key bits releases side by side with it
  (rules (a) and (b) above).

  Never raises; a key whose bits could not be read (a traced key) is skipped.
  """
  if stream.fingerprint is None:
    return
  with _REGISTRY_LOCK:
    first = stream.record.last is None
    stream.record.last = next(_SEQUENCE)
    if not first:
      return
    entries = _NOISE_KEY_REGISTRY.setdefault(
        stream.fingerprint, collections.deque(maxlen=_REMEMBERED))
    clash = next((record for ref, record in entries
                  if ref() is not None or record.last > stream.created), None)
    entries.append((weakref.ref(stream), stream.record))
  if clash is None:
    return
  warnings.warn(
      f"optax_dp: {stream.record.owner} releases updates with the same noise "
      f"key as {clash.owner}, which released updates side by side with it in "
      "this process. The two transforms add IDENTICAL noise at every step, so "
      "the difference of their (rescaled) outputs cancels the noise and "
      "releases the difference of the clipped sums with no noise at all: "
      "releasing both breaks the privacy guarantee, whatever epsilon is "
      "reported. Give each transform its own key, e.g. k1, k2 = "
      "jax.random.split(jax.random.key(seed)). (A transform rebuilt to replace "
      "an earlier one does not warn: build it after the earlier one's last "
      "update and drop every reference to the earlier one, e.g. the TrainState "
      "or jitted step that holds it.)",
      NoiseKeyReuseWarning, stacklevel=stacklevel + 1)


def _reset_noise_key_registry() -> None:
  """Forgets every registered noise key (for tests; see the note above)."""
  with _REGISTRY_LOCK:
    _NOISE_KEY_REGISTRY.clear()


def step_key_data(key: jax.Array, step: Any) -> jax.Array:
  """The key data of `fold_in(key, step)`: what a noisy transform's state
  holds as the key of its release number `step`."""
  return jax.random.key_data(jax.random.fold_in(key, step))


def step_keys(key: jax.Array, step: Any) -> tuple[jax.Array, jax.Array]:
  """`fold_in(key, step)` (this release's key) and the key data of
  `fold_in(key, step + 1)` (the next one's), in one call: one random-number
  kernel to compile, not two."""
  both = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.stack([step, step + 1]))
  return both[0], jax.random.key_data(both[1])
