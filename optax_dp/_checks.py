"""Argument checks shared by the public functions (clear ValueErrors)."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Optional


def check_int(name: str, value: Any, minimum: int) -> int:
  """`value` as an int, or ValueError unless it is a finite integer >= minimum."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not math.isfinite(value) or value != int(value) or value < minimum):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  return int(value)


def check_positive_finite(name: str, value: Any) -> float:
  """`value` as a float, or ValueError unless it is a finite number > 0."""
  if isinstance(value, bool):
    raise ValueError(f"{name} must be a number, got {value!r}.")
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number, got {value!r}.") from None
  if not math.isfinite(value) or value <= 0:
    raise ValueError(
        f"{name} must be a finite number > 0, got {value}. It bounds each "
        "example's influence: pick the scale of typical gradient norms "
        "(e.g. 0.1 to 1.0).")
  return value


def check_noise_multiplier(noise_multiplier: Any, *, warn_if_zero: bool = False) -> float:
  """`noise_multiplier` as a float, or ValueError unless finite and >= 0.

  The one rule for sigma = 0, everywhere: it is a valid mechanism with NO
  privacy (epsilon = inf). Where it runs (`dp_aggregate`, `warn_if_zero`) it
  warns loudly; `compute_epsilon` returns inf; whatever needs a finite target
  (`calibrate_noise_multiplier`, `privacy_budget`) refuses it as out of
  reach; the CLI prints "not differentially private". A bool is refused.
  """
  if isinstance(noise_multiplier, bool):
    raise ValueError("noise_multiplier must be a number, got a bool.")
  try:
    noise_multiplier = float(noise_multiplier)
  except (TypeError, ValueError):
    raise ValueError(
        f"noise_multiplier must be a number, got {noise_multiplier!r}.") from None
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
