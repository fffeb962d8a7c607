"""How `dp_aggregate` clips: one surface for a fixed, a group-wise and an
adaptive clip norm, chosen once when the transformation is built.

A `ClipPolicy` answers, from the clip norm field of the optimizer state
(`()` for a fixed clip, the current norm for an adaptive one): the clipped
sum of what comes in (`take`: raw per-example gradients clipped at the
current norm, or a `ClippedGrads` checked to be made with this clip), the
std of the gradients' noise (`noise_std`) and the sensitivity it is calibrated to (`unit`), which
keys the release draws from (`split`), what the ledger must check
(`checks`), and the next clip norm (`next`).

Privacy contract: an example moves the clipped sum by at most `unit(c)` (`C`,
or `sqrt(sum_g C_g^2)` for groups, or the state's norm for an adaptive clip),
and `noise_std(c) = sigma * unit(c)`. For an adaptive clip the count of
unclipped examples (sensitivity 1/2) is a second Gaussian mechanism on the
same batch, with noise std `s = count_noise_stddev`; the gradients then get
`sigma = (z^-2 - (2 s)^-2)^-1/2`, so that the two together are one Gaussian
mechanism of the effective noise multiplier `z` the accountant is told
(Andrew et al. 2021, Theorem 1).

References:
  Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar & Zhang 2016, "Deep
  Learning with Differential Privacy", https://arxiv.org/abs/1607.00133.
  McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private
  Recurrent Language Models", https://arxiv.org/abs/1710.06963 (groups).
  Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private
  Learning with Adaptive Clipping", https://arxiv.org/abs/1905.03871.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from optax_dp._core import _checks
from optax_dp._clip import _clip_norms
from optax_dp._clip import _clipping

# One ledger entry: (refuse when this holds, the error, its message).
Check = tuple[Any, type, str]


class ClipPolicy(NamedTuple):
  """The clip of a `dp_aggregate`, as functions of the state's `clip_norm`
  field `c` (see the module docstring)."""
  clip: _clip_norms.ClipNorm
  init: Callable[[Any], Any]
  take: Callable[[Any, Any, Any], Any]
  noise_std: Callable[[Any], Any]
  unit: Callable[[Any], Any]
  split: Callable[[jax.Array], tuple[jax.Array, Optional[jax.Array]]]
  checks: Callable[[Any, Any], list[Check]]
  next: Callable[[Any, Any, Optional[jax.Array]], Any]


def _take(clip: _clip_norms.ClipNorm, current: Any, updates: Any,
          params: Any) -> _clipping.ClippedGrads:
  """The clipped sum of `updates`: raw per-example gradients clipped at the
  norms of `clip` now (`current`: an adaptive clip's norm), or a
  `ClippedGrads`, refused unless made with `clip` for these params."""
  if isinstance(updates, _clipping.ClippedGrads):
    if not _clip_norms.same_clip(updates.l2_norm_clip, clip):
      raise ValueError(
          f"dp_aggregate(l2_norm_clip={clip}) got a clipped sum made "
          f"with l2_norm_clip={updates.l2_norm_clip}: the noise would not match "
          "the sensitivity. Use the same l2_norm_clip in clipped_grads and "
          "dp_aggregate.")
    if params is not None:
      # Group-wise: the groups must cover these params as they covered the
      # ones clipped (raises for a prefix that does not fit them).
      _clip_norms.leaf_groups(clip, params)
    return updates
  norms, clip_norm = _clip_norms.clip_norms_now(clip, current)
  groups = _clip_norms.leaf_groups(clip, updates)
  return _clipping.sum_clipped(updates, clip, groups, norms, clip_norm)


def fixed(clip: _clip_norms.ClipNorm, noise_multiplier: float) -> ClipPolicy:
  """One norm `C`, or one per group: sensitivity `C` (`sqrt(sum_g C_g^2)`),
  noise std `noise_multiplier` times it; nothing in the state.

  Examples:
    >>> policy = fixed(2.0, noise_multiplier=1.5)
    >>> policy.noise_std(()), policy.unit(()), policy.init(None)
    (3.0, 2.0, ())
  """
  unit = _clip_norms.sensitivity(clip)
  std = noise_multiplier * unit

  def init(params):
    if params is not None:
      _clip_norms.leaf_groups(clip, params)   # the groups must fit the params
    return ()

  return ClipPolicy(
      clip=clip, init=init,
      take=lambda updates, params, c: _take(clip, None, updates, params),
      noise_std=lambda c: std,
      unit=lambda c: unit, split=lambda key: (key, None),
      checks=lambda c, clipped: [], next=lambda c, clipped, key: ())


_MISMATCH = (
    "dp_aggregate: the clipped sum was clipped with another clip norm than "
    "the adaptive one in the optimizer state; the noise would not match its "
    "sensitivity. Pass l2_norm_clip=optax_dp.l2_norm_clip_of(opt_state) of "
    "the state being updated to the gradient function, every step.")


def adaptive(clip: _clip_norms.AdaptiveClip, noise_multiplier: float,
             expected_batch_size: Optional[int]) -> ClipPolicy:
  """Andrew et al.'s quantile clip: the state holds the norm `c`; the
  gradients get noise `sigma * c` and the unclipped count noise `s` (from a
  key split off the step's), and `c` moves geometrically towards the target
  quantile of the per-example norms.

  Examples:
    >>> import optax_dp
    >>> policy = adaptive(optax_dp.AdaptiveClip(1.0), 1.0, expected_batch_size=256)
    >>> float(policy.init(None)), round(float(policy.noise_std(2.0)), 4)
    (1.0, 2.0015)
  """
  grad_multiplier, count_std = clip.noise_split(noise_multiplier, expected_batch_size)

  def next_clip(c, clipped, count_key):   # Andrew et al. 2021, Algorithm 1
    noisy_count = clipped.unclipped_count + count_std * jax.random.normal(count_key, ())
    unclipped_fraction = noisy_count / expected_batch_size + 0.5
    return (c * jnp.exp(-clip.learning_rate * (
        unclipped_fraction - clip.target_quantile))).astype(jnp.float32)

  def split(key):   # the gradients' and the count's noise from separate keys
    grad_key, count_key = jax.random.split(key)
    return grad_key, count_key

  return ClipPolicy(
      clip=clip,
      init=lambda params: jnp.asarray(clip.initial_l2_norm_clip, jnp.float32),
      take=lambda updates, params, c: _take(clip, c, updates, params),
      noise_std=lambda c: grad_multiplier * c,
      unit=lambda c: c, split=split,
      checks=lambda c, clipped: [
          (clipped.clip_norm != c, _checks.AdaptiveClipMismatchError, _MISMATCH)],
      next=next_clip)


def clip_policy(l2_norm_clip: Any, noise_multiplier: float,
                expected_batch_size: Optional[int], *, correlated: bool
                ) -> ClipPolicy:
  """The policy of `dp_aggregate`'s `l2_norm_clip`, checked here once
  (`_clip_norms.as_clip_norm`; a traced norm is refused by name).
  `correlated`: the noise is DP-BandMF's, which an adaptive clip refuses."""
  clip = _clip_norms.as_clip_norm(l2_norm_clip, caller="dp_aggregate")
  if not isinstance(clip, _clip_norms.AdaptiveClip):
    return fixed(clip, noise_multiplier)
  if correlated:
    raise ValueError(
        "dp_aggregate: adaptive clipping (optax_dp.AdaptiveClip) with DP-BandMF "
        "noise is not accounted here (the correlated noise's scale would change "
        "with the clip norm). Use a fixed l2_norm_clip with BandMF.")
  return adaptive(clip, noise_multiplier, expected_batch_size)
