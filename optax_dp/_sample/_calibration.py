"""Calibration: the smallest noise multiplier whose epsilon meets a target.

`calibrate_noise_multiplier` searches sigma for a sampler, a number of steps and
(epsilon, delta), with the accountants of `_accounting`, rounds it UP to
`_SIGNIFICANT_DIGITS` significant digits and verifies the rounded value with
the same accountant that reports epsilon: a calibrated run never spends more
than its target.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Unpack

import dp_accounting
from dp_accounting import mechanism_calibration

from optax_dp._core import _checks
from optax_dp._sample import _accounting

# The noise multiplier is reported rounded up to this many significant digits.
_SIGNIFICANT_DIGITS = 4
# Calibration never searches below this noise multiplier (epsilon there is
# astronomically large for any sampler; at 0 some RDP formulas divide by 0).
_MIN_SIGMA = 1e-2
# The verification after calibration steps sigma up one unit in its last
# (4th significant) digit at a time until the accountant confirms the budget.
# A correct calibration lands within 0.1% of the smallest sigma meeting it
# (tested), i.e. at most 10 such units (0.1% of 9.999 is 10 units of 0.001),
# so it needs at most ~10 steps; this bound is 5x that. Past it the
# calibration itself is broken (a sigma far below the budget, or a rounding
# that goes down), and stepping on would spin for hours: raise instead.
_MAX_VERIFY_STEPS = 50


def _round_up(x: float, digits: int = _SIGNIFICANT_DIGITS) -> float:
  """Rounds x > 0 up to `digits` significant digits."""
  exponent = math.floor(math.log10(x)) - digits + 1
  scale = 10.0 ** exponent
  # Format to drop float noise (0.7706000000000001 -> 0.7706); callers verify
  # the budget on the returned value itself.
  return float(f"{math.ceil(x / scale - 1e-9) * scale:.{digits}g}")


def _secant_root(f, x0, x1, target, rel_tol, max_iter=12):
  """x with f(x) ~= target by the secant method on a smooth decreasing f, or None."""
  f0, f1 = f(x0), f(x1)
  for _ in range(max_iter):
    if f1 == f0 or not (math.isfinite(f0) and math.isfinite(f1)):
      return None
    x2 = x1 + (target - f1) * (x1 - x0) / (f1 - f0)
    if not 0 < x2 < 4 * max(x0, x1):
      return None
    x0, f0, x1, f1 = x1, f1, x2, f(x2)
    if abs(f1 - target) <= rel_tol * target:
      return x1
  return None


def _calibrate_pld(target_epsilon, target_delta, sampler, steps) -> tuple[float, float]:
  """PLD calibration in few evaluations of the fine accountant (~0.2 s each).

  Returns `(sigma, sigma_rdp)`: the estimate (not yet rounded or verified;
  it may be off, or even negative, for targets the coarse grid cannot
  resolve) and RDP's sigma for the same target (an upper end for PLD's).

  1. RDP (fast, looser) gives sigma_rdp, an upper end for PLD's sigma, which
     also keeps PLD away from tiny sigmas whose distributions are huge. (For
     truncated Poisson, which RDP cannot account, the untruncated sampler's
     RDP sigma is only a starting guess.)
  2. The secant method on the coarse PLD grid (1e-3; cheap, epsilon smooth in
     sigma) finds sigma_c, with Brent's method as the fallback.
  3. One Newton step on the fine epsilon from sigma_c, with the coarse slope.
     The caller rounds up and verifies with the fine accountant, so the result
     always meets the budget whatever these steps return.
  """
  def fine(sigma):
    return _accounting.cached_epsilon(sigma, target_delta, sampler, steps, "pld")

  def coarse(sigma):
    return _accounting.cached_epsilon(sigma, target_delta, sampler, steps, "pld", coarse=True)

  rdp_sampler = sampler
  if "rdp" not in sampler.accountants:
    rdp_sampler = dataclasses.replace(sampler, truncate=False)
  # dp-accounting's RDP logs an absl warning for every Renyi order whose series
  # does not converge at a large sampling rate (e.g. cyclic Poisson's q > 0.5)
  # and leaves that order out: a looser bound, harmless for a starting point
  # that PLD then replaces. Silenced here, where nothing reported comes from it.
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    sigma_rdp = dp_accounting.calibrate_dp_mechanism(
        lambda: _accounting.make_accountant("rdp", rdp_sampler),
        lambda s: rdp_sampler.dp_event(s, steps), target_epsilon, target_delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(_MIN_SIGMA, 1.0), tol=1e-2)
  finally:
    absl_logger.setLevel(level)
  sigma_c = _secant_root(coarse, sigma_rdp, 0.95 * sigma_rdp, target_epsilon, 1e-4)
  if sigma_c is None or not 0.25 * sigma_rdp < sigma_c < 2 * sigma_rdp:
    sigma_c = dp_accounting.calibrate_dp_mechanism(
        lambda: _accounting.make_accountant("pld", sampler, coarse=True),
        lambda s: sampler.dp_event(s, steps), target_epsilon, target_delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(0.0, sigma_rdp),
        tol=1e-4 * sigma_rdp)
  h = 1e-2 * sigma_c
  slope = (coarse(sigma_c + h) - coarse(sigma_c)) / h  # < 0
  if not slope < 0:
    return sigma_c, sigma_rdp
  return sigma_c + (target_epsilon - fine(sigma_c)) / slope, sigma_rdp


def calibrate_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    *,
    steps: int,
    **sampling: Unpack[_accounting.SamplingArgs],
) -> float:
  """The smallest noise multiplier whose epsilon is at most `target_epsilon`.

  With `"rdp"`: dp-accounting's `calibrate_dp_mechanism` (Brent's method). With
  `"pld"`: an RDP bracket, the secant method on a coarse PLD grid, one Newton
  step on the fine grid (see `_calibrate_pld`). Either way the result is then
  rounded *up* to 4 significant digits and checked with the same accountant
  `compute_epsilon` uses, stepping up until it meets the budget: the returned
  `sigma` always satisfies `compute_epsilon(sigma, ...) <= target_epsilon` for
  the same arguments, and is within 0.1% of the smallest such value (tested).
  Results are cached per argument tuple.

  Privacy contract: as `compute_epsilon`'s; pass the returned sigma to
  `dp_aggregate` and stop after `steps` updates (`privacy_budget` does both).

  Args:
    target_epsilon: the privacy budget, > 0.
    target_delta: in (0, 1).
    steps: as in `compute_epsilon`.
    **sampling: `dataset_size`, `batch_size`, `sampler`, `accountant`, as in
      `compute_epsilon` (`SamplingArgs`).

  Returns:
    The noise multiplier sigma to pass to `dp_aggregate`.

  Raises:
    ValueError: for out-of-range arguments.
    RuntimeError: if the verification does not confirm the budget within
      `_MAX_VERIFY_STEPS` steps up (a calibration bug: no sigma is returned
      rather than one that overspends the budget).

  Examples:
    >>> import optax_dp
    >>> sigma = optax_dp.calibrate_noise_multiplier(
    ...     1.0, 1e-5, steps=1000, dataset_size=60000, batch_size=256, accountant="rdp")
    >>> sigma, optax_dp.compute_epsilon(sigma, 1e-5, steps=1000, dataset_size=60000,
    ...                                 batch_size=256, accountant="rdp") <= 1.0
    (1.04, True)
  """
  unknown = sorted(set(sampling) - set(_accounting.SamplingArgs.__annotations__))
  if unknown:
    raise TypeError("calibrate_noise_multiplier() got unexpected keyword "
                    f"arguments {unknown}; it takes steps= and "
                    f"{sorted(_accounting.SamplingArgs.__annotations__)}.")
  target_epsilon = _checks.check_epsilon(target_epsilon)
  target_delta, sampler, steps, accountant = _accounting.resolve_schedule(
      target_delta, steps, **sampling)
  return _calibrate(target_epsilon, target_delta, sampler, steps, accountant)


@functools.lru_cache(maxsize=256)
def _calibrate(target_epsilon, target_delta, sampler, steps, accountant):
  """calibrate_noise_multiplier on validated arguments (pure, so cached)."""
  if accountant == "rdp":
    sigma = dp_accounting.calibrate_dp_mechanism(
        lambda: _accounting.make_accountant("rdp", sampler),
        lambda s: sampler.dp_event(s, steps), target_epsilon, target_delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(_MIN_SIGMA, 1.0), tol=1e-5)
    return _verify_budget(_round_up(sigma), target_epsilon, target_delta, sampler,
                          steps, accountant)
  sigma, sigma_rdp = _calibrate_pld(target_epsilon, target_delta, sampler, steps)
  if math.isfinite(sigma) and sigma > 0:
    try:
      return _verify_budget(_round_up(sigma), target_epsilon, target_delta, sampler,
                            steps, accountant)
    except RuntimeError:
      pass
  # The fast path's coarse grid (1e-3) cannot resolve a small target epsilon
  # (about 0.1 and below): Brent's method on the fine accountant itself
  # (slower, always right), from a quarter of RDP's sigma (PLD needs less noise
  # than RDP, never 4x less; below that PLD's distributions grow huge).
  try:
    sigma = dp_accounting.calibrate_dp_mechanism(
        lambda: _accounting.make_accountant("pld", sampler), lambda s: sampler.dp_event(s, steps),
        target_epsilon, target_delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(0.25 * sigma_rdp, sigma_rdp),
        tol=1e-5 * sigma_rdp)
  except mechanism_calibration.NoBracketIntervalFoundError as e:
    raise ValueError(
        f"no noise multiplier reaches epsilon {target_epsilon:g} at delta "
        f"{target_delta:g} over {steps} steps with the PLD accountant: the target "
        "is below what its discretisation (1e-4) resolves. Ask for a larger "
        "epsilon, or use accountant='rdp'.") from e
  return _verify_budget(_round_up(sigma), target_epsilon, target_delta, sampler,
                        steps, accountant)


def _verify_budget(sigma, target_epsilon, target_delta, sampler, steps, accountant):
  """`sigma`, or the next 4-digit values above it, until epsilon <= target.

  PLD's discretised epsilon is not exactly monotone in sigma: the reported
  value is confirmed with the accountant `compute_epsilon` uses, stepping up in
  the last digit. At most `_MAX_VERIFY_STEPS` steps, each strictly up: a
  RuntimeError (a bug in the calibration, never a budget overrun) otherwise.
  """
  start = sigma
  epsilon = _accounting.cached_epsilon(sigma, target_delta, sampler, steps, accountant)
  for _ in range(_MAX_VERIFY_STEPS):
    if epsilon <= target_epsilon:
      return sigma
    bigger = _round_up(sigma * (1 + 10.0 ** -_SIGNIFICANT_DIGITS))
    if not bigger > sigma:
      raise RuntimeError(
          f"optax_dp calibration bug: stepping sigma={sigma!r} up in its last "
          f"digit gave {bigger!r} (the rounding must go up). No noise "
          "multiplier is returned rather than one that overspends the budget.")
    sigma = bigger
    epsilon = _accounting.cached_epsilon(sigma, target_delta, sampler, steps, accountant)
  if epsilon <= target_epsilon:
    return sigma
  raise RuntimeError(
      f"optax_dp calibration bug: the calibrated noise multiplier {start!r} "
      f"still spends epsilon {epsilon:.6g} > target {target_epsilon:g} (delta "
      f"{target_delta:g}, {steps} steps, {accountant}) after "
      f"{_MAX_VERIFY_STEPS} steps up to {sigma!r}; a correct calibration is "
      "within 0.1% of the budget. No noise multiplier is returned rather than "
      "one that overspends it.")
