"""Argument checks shared by the public functions (clear ValueErrors)."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Optional


def _to_float(name: str, value: Any) -> float:
  if isinstance(value, bool):
    raise ValueError(f"{name} must be a number, got a bool.")
  try:
    return float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number, got {value!r}.") from None


def check_int(name: str, value: Any, minimum: int) -> int:
  """`value` as an int, or ValueError unless it is a finite integer >= minimum."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not math.isfinite(value) or value != int(value) or value < minimum):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  return int(value)


def check_positive_finite(name: str, value: Any) -> float:
  """`value` as a float, or ValueError unless it is a finite number > 0."""
  value = _to_float(name, value)
  if not math.isfinite(value) or value <= 0:
    raise ValueError(
        f"{name} must be a finite number > 0, got {value}. It bounds each "
        "example's influence: pick the scale of typical gradient norms "
        "(e.g. 0.1 to 1.0).")
  return value


def check_fraction(name: str, value: Any) -> float:
  """`value` as a float, or ValueError unless it is in [0, 1)."""
  value = _to_float(name, value)
  if not 0.0 <= value < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
  return value


def check_delta(target_delta: Any) -> float:
  """`target_delta` as a float in (0, 1), or ValueError."""
  target_delta = _to_float("target_delta", target_delta)
  if not 0 < target_delta < 1:
    raise ValueError(
        f"target_delta must be in (0, 1), got {target_delta}. A common choice "
        "is well below 1/dataset_size, e.g. 1e-5 for 60000 examples.")
  return target_delta


def check_epsilon(target_epsilon: Any) -> float:
  """`target_epsilon` as a finite float > 0, or ValueError."""
  target_epsilon = _to_float("target_epsilon", target_epsilon)
  if not math.isfinite(target_epsilon) or target_epsilon <= 0:
    raise ValueError(
        f"target_epsilon must be a finite number > 0, got {target_epsilon}.")
  return target_epsilon


def check_noise_multiplier(noise_multiplier: Any, *, warn_if_zero: bool = False) -> float:
  """`noise_multiplier` as a float, or ValueError unless finite and >= 0.

  The one rule for sigma = 0, everywhere: it is a valid mechanism with NO
  privacy (epsilon = inf). Where it runs (`dp_aggregate`, `warn_if_zero`) it
  warns loudly; `compute_epsilon` returns inf; whatever needs a finite target
  (`calibrate_noise_multiplier`, `privacy_budget`) refuses it as out of
  reach; the CLI prints "not differentially private". A bool is refused.
  """
  noise_multiplier = _to_float("noise_multiplier", noise_multiplier)
  if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
    raise ValueError(
        f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}."
        " Use optax_dp.calibrate_noise_multiplier(target_epsilon, target_delta,"
        " ...) to pick it from a privacy budget.")
  if noise_multiplier == 0 and warn_if_zero:
    warnings.warn(
        "optax_dp: noise_multiplier=0 adds NO noise: this training run is NOT "
        "differentially private, whatever epsilon anyone reports for it. Use "
        "it only to debug clipping.", UserWarning, stacklevel=3)
  return noise_multiplier


def refuse_traced(caller: str, **privacy_args: Any) -> None:
  """ValueError if a privacy parameter is a tracer (built inside a trace)."""
  import jax  # local: keeps this module importable without touching devices
  for name, value in privacy_args.items():
    if isinstance(value, jax.core.Tracer):
      raise ValueError(
          f"{caller}: {name} is a traced value ({type(value).__name__}): the "
          "transform is being built inside jax.jit, typically by "
          "optax.inject_hyperparams, which turns numeric arguments into "
          "optimizer-state arrays. The privacy parameters must be fixed Python "
          "values when the transform is built (the noise and the accounting "
          "depend on them). Pass them as static arguments: "
          "optax.inject_hyperparams(optax_dp.dpsgd, static_args=('l2_norm_clip', "
          "'noise_multiplier', 'key', 'expected_batch_size'))(learning_rate=..., "
          "...); the learning rate and momentum can stay injected.")


def check_expected_batch_size(expected_batch_size: Any) -> Optional[int]:
  """The public normaliser as an int (None stays None), or ValueError."""
  if expected_batch_size is None:
    return None
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  if (isinstance(expected_batch_size, (jax.Array, np.ndarray))
      and expected_batch_size.shape == ()
      and jnp.issubdtype(expected_batch_size.dtype, jnp.integer)):
    # A concrete integer array (optax.inject_hyperparams stores ints so).
    expected_batch_size = int(expected_batch_size)
  if (isinstance(expected_batch_size, bool)
      or not isinstance(expected_batch_size, numbers.Real)
      or expected_batch_size != int(expected_batch_size)
      or expected_batch_size < 1):
    raise ValueError(
        "expected_batch_size must be a positive integer (a public constant, "
        f"e.g. q * dataset_size for Poisson sampling), got {expected_batch_size!r}.")
  return int(expected_batch_size)


def raise_if(predicate: Any, error: type[Exception], message: str) -> None:
  """Raises `error(message)` if `predicate` holds, also inside `jax.jit`.

  Outside a trace the check is an ordinary `if`. Inside one it is a
  `lax.cond` whose taken branch runs a host callback that raises: the jitted
  call then fails with a `JaxRuntimeError` whose text contains `message`
  (JAX wraps exceptions raised in callbacks). The callback costs nothing
  while the predicate is false. Callers also poison their outputs when the
  predicate holds, so that a platform without host callbacks still cannot
  release a refused update.
  """
  import jax  # local: keeps this module importable without touching devices

  if not isinstance(predicate, jax.core.Tracer):
    if bool(predicate):
      raise error(message)
    return

  def fail():
    raise error(message)

  jax.lax.cond(predicate, lambda: jax.debug.callback(fail), lambda: None)


def bisect_boundary(predicate, lo: int, hi: int) -> tuple[int, int]:
  """`(lo, hi)` with `hi == lo + 1`, `predicate(lo)` True and `predicate(hi)`
  False, for a predicate that is True up to a point and False after it.

  The caller vouches for the ends (`predicate(lo)` True, or `lo` a sentinel
  below the range; `predicate(hi)` False); each step halves the interval, so
  it ends after about log2(hi - lo) calls.

  >>> bisect_boundary(lambda n: n * n <= 50, 0, 100)
  (7, 8)
  """
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if predicate(mid):
      lo = mid
    else:
      hi = mid
  return lo, hi
