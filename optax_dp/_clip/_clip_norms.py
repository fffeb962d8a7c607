"""What `l2_norm_clip` may be: one norm, one norm per group of parameters, or
a norm that adapts to a quantile of the per-example norms.

* A number `C`: every example's gradient, all parameters together, is
  clipped to L2 norm `C` (Abadi et al. 2016). Sensitivity `C`.
* A pytree prefix of the params (`{"Dense_0": 0.5, "Dense_1": 0.3}`), or a
  `ClipGroups`: each group of parameters (the leaves under one prefix leaf)
  is clipped to its own norm `C_g`, per example. An example then moves the
  clipped sum by at most `sqrt(sum_g C_g^2)` in L2 norm: the sensitivity the
  noise is calibrated to (McMahan, Ramage, Talwar & Zhang 2018, per-layer
  clipping). Groups are matched to parameters by their key names, so one
  prefix serves a params dict, a framework's state of variables and the trees
  optax hands around.
* An `AdaptiveClip`: one norm, living in the optimizer state, moved after each
  step towards a target quantile of the per-example norms by a privatised
  count of unclipped examples (Andrew, Thakkar, McMahan & Ramaswamy 2021).

Nothing here touches arrays: these are the static (hashable) descriptions
that `ClippedGrads` carries and `dp_aggregate` compares.

References:
  Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar & Zhang 2016, "Deep
  Learning with Differential Privacy", https://arxiv.org/abs/1607.00133.
  McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private
  Recurrent Language Models", https://arxiv.org/abs/1710.06963 (per-layer
  clipping).
  Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private Learning
  with Adaptive Clipping", https://arxiv.org/abs/1905.03871.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from optax_dp._core import _checks


@dataclasses.dataclass(frozen=True)
class ClipGroups:
  """Group-wise clip norms: the parameters under key path `paths[g]` are
  clipped, per example, to L2 norm `norms[g]`.

  Build it from a pytree prefix of the params with `clip_groups`, or pass
  the prefix itself as `l2_norm_clip` anywhere a clip norm is taken.

  Attributes:
    paths: one key path per group, each a tuple of key names (str).
    norms: one clip norm per group, each finite and > 0.
  """
  paths: tuple[tuple[str, ...], ...]
  norms: tuple[float, ...]

  @property
  def sensitivity(self) -> float:
    """`sqrt(sum_g C_g^2)`: the most one example moves the clipped sum."""
    return math.sqrt(sum(c * c for c in self.norms))

  def __str__(self) -> str:
    return "{" + ", ".join(f"{'/'.join(p) or '<all>'}: {c:g}"
                           for p, c in zip(self.paths, self.norms)) + "}"


@dataclasses.dataclass(frozen=True)
class AdaptiveClip:
  """Adaptive quantile clipping (Andrew et al. 2021, geometric update).

  The clip norm starts at `initial_l2_norm_clip` and lives in
  `dp_aggregate`'s state. After each step it moves towards the
  `target_quantile` of the per-example gradient norms:
  `C <- C * exp(-learning_rate * (b - target_quantile))`, where `b` is the
  privatised fraction of the batch's examples whose norm was at most `C`:
  `b = (sum_i (1[|g_i| <= C] - 1/2) + N(0, count_noise_stddev^2)) /
  expected_batch_size + 1/2` (each example moves that sum by at most 1/2).

  Privacy: the count is a second Gaussian mechanism on the same batch. An
  example moves the clipped gradient sum by at most `C` (noise
  `sigma_grad * C`) and the count by at most 1/2 (noise
  `count_noise_stddev`); together that is ONE Gaussian mechanism of noise
  multiplier `(sigma_grad^-2 + (2 count_noise_stddev)^-2)^-1/2`. `dp_aggregate`
  takes that effective multiplier (`noise_multiplier=`, or the budget's) and
  gives the gradients `sigma_grad = (z^-2 - (2 count_noise_stddev)^-2)^-1/2`,
  so the accounting of `z` is exactly that of what runs.

  Attributes:
    initial_l2_norm_clip: the first step's clip norm, > 0.
    target_quantile: the fraction of examples meant to be unclipped, in
      (0, 1); Andrew et al. use 0.5.
    learning_rate: the geometric step size, > 0 (Andrew et al.: 0.2).
    count_noise_stddev: std of the noise on the count; default
      `expected_batch_size / 20` (the paper's choice). Must exceed
      `noise_multiplier / 2`.
  """
  initial_l2_norm_clip: float
  target_quantile: float = 0.5
  learning_rate: float = 0.2
  count_noise_stddev: Optional[float] = None

  def __post_init__(self):
    for name in ("initial_l2_norm_clip", "learning_rate"):
      object.__setattr__(self, name, _checks.check_positive_finite(name, getattr(self, name)))
    quantile = _checks.check_fraction("target_quantile", self.target_quantile)
    if quantile == 0:
      raise ValueError("target_quantile must be in (0, 1), got 0.")
    object.__setattr__(self, "target_quantile", quantile)
    if self.count_noise_stddev is not None:
      object.__setattr__(self, "count_noise_stddev", _checks.check_positive_finite(
          "count_noise_stddev", self.count_noise_stddev))

  def noise_split(self, noise_multiplier: float,
                  expected_batch_size: Optional[int]) -> tuple[float, float]:
    """`(gradient noise multiplier sigma, count noise std s)` whose two
    Gaussian mechanisms together have the effective `noise_multiplier` z:
    `sigma = (z^-2 - (2 s)^-2)^-1/2` (Andrew et al. 2021, Theorem 1), `s` the
    `count_noise_stddev` (default `expected_batch_size / 20`).

    >>> sigma, s = AdaptiveClip(1.0).noise_split(1.0, 256)
    >>> round(sigma, 6), s
    (1.000764, 12.8)
    """
    if expected_batch_size is None:
      raise _checks.missing_expected_batch_size(
          "with an adaptive clip (optax_dp.AdaptiveClip)",
          "the count of unclipped examples is normalised by it")
    count_std = (self.count_noise_stddev if self.count_noise_stddev is not None
                 else expected_batch_size / 20)
    if noise_multiplier == 0:
      return 0.0, 0.0
    if 2 * count_std <= noise_multiplier:
      raise ValueError(
          f"adaptive clipping: count_noise_stddev={count_std:g} must exceed "
          f"noise_multiplier / 2 = {noise_multiplier / 2:g}; at or below it the "
          "count alone would spend the whole privacy budget. Raise it (the default "
          "is expected_batch_size / 20) or use a larger batch.")
    return (noise_multiplier ** -2 - (2 * count_std) ** -2) ** -0.5, count_std

  def __str__(self) -> str:
    return (f"adaptive(initial {self.initial_l2_norm_clip:g}, quantile "
            f"{self.target_quantile:g}, learning rate {self.learning_rate:g})")


ClipNorm = Union[float, ClipGroups, AdaptiveClip]

# What a caller passes as `l2_norm_clip` (checked by `as_clip_norm`): a norm; a
# pytree prefix of the params whose leaves are norms (`{"Dense_0": 0.3,
# "Dense_1": 0.4}`, what `per_layer_clip_norms` returns; a list or tuple
# prefix); a `ClipGroups`; or an `AdaptiveClip`.
ClipNormLike = Union[float, ClipGroups, AdaptiveClip, Mapping[Any, Any], Sequence[Any]]


def key_name(entry: Any) -> str:
  """The name of one key of a pytree path (dict key, attribute or index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def path_names(path: tuple) -> tuple[str, ...]:
  return tuple(key_name(entry) for entry in path)


def clip_groups(prefix: Any) -> ClipGroups:
  """`ClipGroups` from a pytree prefix of the params whose leaves are norms.

  Raises:
    ValueError: for an empty tree or a norm that is not finite and > 0.

  Examples:
    >>> g = clip_groups({"Dense_0": 0.3, "Dense_1": {"kernel": 0.4}})
    >>> g.paths, g.norms, g.sensitivity
    ((('Dense_0',), ('Dense_1', 'kernel')), (0.3, 0.4), 0.5)
  """
  if isinstance(prefix, ClipGroups):
    return prefix
  flat = jax.tree_util.tree_flatten_with_path(prefix)[0]
  if not flat:
    raise ValueError("l2_norm_clip is an empty tree: give one clip norm per group.")
  paths, norms = [], []
  for path, value in flat:
    names = path_names(path)
    norms.append(_checks.check_positive_finite(
        f"l2_norm_clip[{'/'.join(names)}]", value))
    paths.append(names)
  return ClipGroups(paths=tuple(paths), norms=tuple(norms))


def as_clip_norm(l2_norm_clip: Any, caller: Optional[str] = None) -> ClipNorm:
  """The checked clip norm: a float, a `ClipGroups` (a prefix tree given) or
  an `AdaptiveClip`, unchanged. `caller`: the transformation being built, for
  which a traced norm (`optax.inject_hyperparams`) is refused by name."""
  if caller is not None:
    _checks.refuse_traced(caller, l2_norm_clip=l2_norm_clip)
  if isinstance(l2_norm_clip, (ClipGroups, AdaptiveClip)):
    return l2_norm_clip
  if isinstance(l2_norm_clip, (dict, list, tuple)) or hasattr(l2_norm_clip, "items"):
    return clip_groups(l2_norm_clip)
  return _checks.check_positive_finite("l2_norm_clip", l2_norm_clip)


def sensitivity(clip: ClipNorm) -> float:
  """The L2 sensitivity of the clipped sum to one example's presence, for a
  fixed clip: `C`, or `sqrt(sum_g C_g^2)` for groups. (An `AdaptiveClip`'s
  varies: `dp_aggregate` scales the noise by the state's clip norm.)"""
  if isinstance(clip, ClipGroups):
    return clip.sensitivity
  if isinstance(clip, AdaptiveClip):
    raise TypeError("an adaptive clip norm's sensitivity is the state's clip norm.")
  return clip


def same_clip(a: ClipNorm, b: ClipNorm) -> bool:
  """Whether two clip norms are the same, floats compared in float32 (the
  clip is applied in float32; `optax.inject_hyperparams` stores 0.1 as
  0.10000000149)."""
  import numpy as np   # pylint: disable=import-outside-toplevel
  if isinstance(a, ClipGroups) and isinstance(b, ClipGroups):
    return a.paths == b.paths and all(
        np.float32(x) == np.float32(y) for x, y in zip(a.norms, b.norms))
  if isinstance(a, (ClipGroups, AdaptiveClip)) or isinstance(b, (ClipGroups, AdaptiveClip)):
    return a == b
  return bool(np.float32(a) == np.float32(b))


def leaf_groups(clip: ClipNorm, tree: Any) -> tuple[int, ...]:
  """The group index of each leaf of `tree` (flattening order): all 0 for one
  norm; for `ClipGroups`, the group whose path is a prefix of the leaf's.

  Raises:
    ValueError: if a leaf falls in no group, or a group matches no leaf.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not isinstance(clip, ClipGroups):
    return (0,) * len(flat)
  out, unmatched = [], []
  for path, _ in flat:
    names = path_names(path)
    hits = [g for g, p in enumerate(clip.paths) if names[:len(p)] == p]
    if not hits:
      unmatched.append("/".join(names))
    out.append(hits[0] if hits else -1)
  if unmatched:
    raise ValueError(
        f"group-wise l2_norm_clip {clip} gives no clip norm to parameters "
        f"{unmatched[:6]}{' and more' if len(unmatched) > 6 else ''}: every "
        "parameter needs one (the groups must cover the params, as a prefix "
        "of their tree).")
  empty = [p for g, p in enumerate(clip.paths) if g not in out]
  if empty:
    raise ValueError(
        f"group-wise l2_norm_clip names groups {['/'.join(p) for p in empty]} "
        "that match no parameter (a typo, or not a prefix of the params' tree).")
  return tuple(out)


def clip_norms_now(clip: Any, current: Any = None) -> tuple[tuple, Any]:
  """`(norm of each group, clip_norm data field)` of a checked clip: a
  float's `(C,)`, groups' norms, or an `AdaptiveClip`'s `current` norm (a
  scalar, required; read it with `optax_dp.l2_norm_clip_of(opt_state)`)."""
  if isinstance(clip, AdaptiveClip):
    if current is None:
      raise ValueError(
          f"this gradient function clips adaptively ({clip}): pass the current "
          "clip norm from the optimizer state each step, "
          "fn(params, batch, mask, l2_norm_clip=optax_dp.l2_norm_clip_of(opt_state)).")
    current = jnp.asarray(current, jnp.float32)
    if current.shape != ():
      raise ValueError(f"l2_norm_clip= must be a scalar, got shape {current.shape}.")
    return (current,), current
  if current is not None:
    raise ValueError(
        "l2_norm_clip= at call time is the current norm of an adaptive clip "
        "(optax_dp.AdaptiveClip); this function was built with the fixed "
        f"l2_norm_clip {clip}.")
  if isinstance(clip, ClipGroups):
    return clip.norms, None
  return (clip,), None


def per_layer_clip_norms(params: Any, l2_norm_clip: float) -> dict:
  """One group per layer (the parameters that share a parent key path, e.g. a
  Dense layer's kernel and bias), each of norm `l2_norm_clip / sqrt(L)` for L
  layers: the total sensitivity stays `l2_norm_clip`. A nested dict prefix of
  the params for `l2_norm_clip=` (a params dict, or a framework's state of
  the trained variables).

  Examples:
    >>> params = {"Dense_0": {"kernel": 0, "bias": 0}, "Dense_1": {"kernel": 0}}
    >>> per_layer_clip_norms(params, 1.0)
    {'Dense_0': 0.7071067811865475, 'Dense_1': 0.7071067811865475}
  """
  l2_norm_clip = _checks.check_positive_finite("l2_norm_clip", l2_norm_clip)
  layers = []
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = path_names(path)
    if names and names[-1] == "value":   # a variable box's array, not a name
      names = names[:-1]
    layer = names[:-1]
    if layer not in layers:
      layers.append(layer)
  nested = [a for a in layers for b in layers if a != b and b[:len(a)] == a]
  if not layers or () in layers or nested:
    raise ValueError(
        "per_layer_clip_norms needs params nested by layer ({layer: {name: array}}), "
        "no layer holding both parameters and sub-layers"
        f"{f' (as {chr(47).join(nested[0])} does)' if nested else ''}: give the groups "
        "as a dict yourself.")
  norm = l2_norm_clip / math.sqrt(len(layers))
  out: dict = {}
  for layer in layers:
    node = out
    for name in layer[:-1]:
      node = node.setdefault(name, {})
    node[layer[-1]] = norm
  return out
