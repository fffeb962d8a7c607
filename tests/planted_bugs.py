"""Deliberately broken DP aggregation transforms, for testing the audit.

Each takes per-example gradients like `optax_dp.dp_aggregate` and claims the
same (l2_norm_clip, noise_multiplier), but breaks the mechanism in one way
(issue 5's list). Used by tests/test_audit.py and benchmarks/audit_table.py;
never by the library.
"""

import jax
import jax.numpy as jnp
import optax

import optax_dp
from optax_dp._clip import _clipping
from optax_dp._aggregation import _noise


def _noisy(summed, key, std):
  leaves, treedef = jax.tree.flatten(summed)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      treedef, [x + std * jax.random.normal(k, x.shape, x.dtype)
                for x, k in zip(leaves, keys)])


def no_clipping(l2_norm_clip, noise_multiplier, key, expected_batch_size):
  """(a) Sums the raw per-example gradients: clipping disabled."""
  def init(params):
    del params
    return jax.random.key(key)

  def update(grads, state, params=None):
    del params
    state, sub = jax.random.split(state)
    summed = jax.tree.map(lambda g: jnp.sum(g.astype(jnp.float32), axis=0), grads)
    out = _noisy(summed, sub, noise_multiplier * l2_norm_clip)
    return jax.tree.map(lambda x: x / expected_batch_size, out), state

  return optax.GradientTransformation(init, update)


def halved_noise(l2_norm_clip, noise_multiplier, key, expected_batch_size):
  """(b) The real transform with half the noise std it claims."""
  return optax_dp.dp_aggregate(l2_norm_clip, noise_multiplier / 2, key,
                               expected_batch_size=expected_batch_size)


def reused_key(l2_norm_clip, noise_multiplier, key, expected_batch_size):
  """(c) The same noise key every step (the state never advances)."""
  inner = optax_dp.dp_aggregate(l2_norm_clip, noise_multiplier, key,
                                expected_batch_size=expected_batch_size)

  def update(grads, state, params=None):
    out, _ = inner.update(grads, state, params)
    return out, state

  return optax.GradientTransformation(inner.init, update)


def realised_normaliser(l2_norm_clip, noise_multiplier, key, expected_batch_size):
  """(d) Clips and noises correctly, then divides by the realised batch size
  (the number of non-zero rows) instead of the public expected one."""
  del expected_batch_size

  def init(params):
    del params
    return jax.random.key(key)

  def update(grads, state, params=None):
    del params
    state, sub = jax.random.split(state)
    sq_norms = _clipping.per_example_sq_norms(grads)
    summed = _clipping.clipped_sum(grads, _clipping.clip_factors(sq_norms, l2_norm_clip))
    realised = jnp.maximum(jnp.sum(sq_norms > 0), 1)
    out = _noisy(summed, sub, noise_multiplier * l2_norm_clip)
    return jax.tree.map(lambda x: x / realised, out), state

  return optax.GradientTransformation(init, update)


def unscaled_noise(l2_norm_clip, noise_multiplier, key, expected_batch_size):
  """(e) The real transform with noise std `noise_multiplier` instead of
  `noise_multiplier * l2_norm_clip` (the clip's scale left out of the noise).
  Identical to the real one at C = 1, which is why the audit of it runs at
  C != 1 (`CLIP_SETTINGS`)."""
  return optax_dp.dp_aggregate(l2_norm_clip, noise_multiplier / l2_norm_clip, key,
                               expected_batch_size=expected_batch_size)


def complex_square_norm(l2_norm_clip, noise_multiplier, key, expected_batch_size):
  """(f) Complex parameters clipped by `Re(sum z^2)` instead of `sum |z|^2`
  (the bug of issue 10: `jnp.square` of a complex gradient), noise as the real
  transform (each part N(0, (sigma C)^2)). For a random complex direction
  `Re(sum z^2)` is near 0 or negative: canaries are released barely clipped."""
  def init(params):
    del params
    return jax.random.key(key)

  def update(grads, state, params=None):
    del params
    state, sub = jax.random.split(state)
    sq = sum(jnp.real(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))))
             for g in jax.tree.leaves(grads))
    sq = jnp.abs(sq)  # (the NaN of a negative one would only hide the bug)
    summed = _clipping.clipped_sum(grads, _clipping.clip_factors(sq, l2_norm_clip))
    noised = _noise.add_gaussian_noise(summed, sub, noise_multiplier * l2_norm_clip)
    return jax.tree.map(lambda x: x / expected_batch_size, noised), state

  return optax.GradientTransformation(init, update)


def correct(l2_norm_clip, noise_multiplier, key, expected_batch_size):
  """The real `dp_aggregate` (for the same table)."""
  return optax_dp.dp_aggregate(l2_norm_clip, noise_multiplier, key,
                               expected_batch_size=expected_batch_size)


PLANTED = {
    "(a) clipping disabled": no_clipping,
    "(b) noise std halved": halved_noise,
    "(c) same noise key every step": reused_key,
    "(d) normalised by the realised batch size": realised_normaliser,
}


# The audit settings of the docs' results table (docs/audit.md) and of
# tests/test_audit.py: (name, transform factory, noise_multiplier,
# num_canaries, canaries_per_step). One canary per step for (d): its signal is
# the update's norm, which only separates single canaries.
PARAMS_SHAPES = {"w": (100, 100), "b": (10,)}  # 10010 coordinates
L2_NORM_CLIP = 1.0
EXPECTED_BATCH_SIZE = 16
SETTINGS = [
    ("dp_aggregate", correct, 1.0, 10000, 100),
    ("dp_aggregate", correct, 2.0, 10000, 100),
    ("dp_aggregate", correct, 0.5, 10000, 100),
    ("dp_aggregate", correct, 1.0, 2000, 1),
    ("(a) clipping disabled", no_clipping, 1.0, 10000, 100),
    ("(b) noise std halved", halved_noise, 1.0, 10000, 100),
    ("(c) same noise key every step", reused_key, 1.0, 10000, 100),
    ("(d) normalised by the realised batch size", realised_normaliser, 1.0, 2000, 1),
]


def _audit(factory, l2_norm_clip, noise_multiplier, num_canaries, canaries_per_step,
           seed, dtype=jnp.float32):
  """optax_dp.audit of `factory`'s transform on params of PARAMS_SHAPES."""
  from optax_dp import audit  # pylint: disable=g-import-not-at-top

  params = {k: jnp.zeros(s, dtype) for k, s in PARAMS_SHAPES.items()}
  return audit.audit_transformation(
      lambda: factory(l2_norm_clip, noise_multiplier, 1234, EXPECTED_BATCH_SIZE),
      params, l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
      num_canaries=num_canaries, canaries_per_step=canaries_per_step, seed=seed)


def run_setting(factory, noise_multiplier, num_canaries, canaries_per_step, seed=0):
  """Runs optax_dp.audit on one row of SETTINGS; returns the AuditReport."""
  return _audit(factory, L2_NORM_CLIP, noise_multiplier, num_canaries,
                canaries_per_step, seed)


# Audits at a clip norm C != 1, where bugs that confuse the noise multiplier
# with the noise std show: (name, factory, l2_norm_clip, noise_multiplier,
# num_canaries, canaries_per_step); the sizes of SETTINGS' 10^4-canary rows.
# At C = 4, unscaled_noise adds std 1 = sigma C / 4: the effective noise
# multiplier is 0.25 against a claimed 1.
CLIP_SETTINGS = [
    ("dp_aggregate", correct, 4.0, 1.0, 10000, 100),
    ("(e) noise std sigma, not sigma * C", unscaled_noise, 4.0, 1.0, 10000, 100),
]


def run_clip_setting(factory, l2_norm_clip, noise_multiplier, num_canaries,
                     canaries_per_step, seed=0):
  """Runs optax_dp.audit on one row of CLIP_SETTINGS; returns the AuditReport."""
  return _audit(factory, l2_norm_clip, noise_multiplier, num_canaries,
                canaries_per_step, seed)


# Audits of complex parameters (C^n as R^2n: the canaries and scores use both
# parts): (name, factory, noise_multiplier, num_canaries, canaries_per_step).
COMPLEX_SETTINGS = [
    ("dp_aggregate", correct, 1.0, 2000, 20),
    ("(f) complex norm as Re(sum z^2)", complex_square_norm, 1.0, 2000, 20),
]


def run_complex_setting(factory, noise_multiplier, num_canaries, canaries_per_step, seed=0):
  """Runs optax_dp.audit on one row of COMPLEX_SETTINGS (complex64 params)."""
  return _audit(factory, L2_NORM_CLIP, noise_multiplier, num_canaries,
                canaries_per_step, seed, dtype=jnp.complex64)
