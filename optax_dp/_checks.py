"""Argument checks shared by the public functions (clear ValueErrors)."""

from __future__ import annotations

import math
import numbers
from typing import Any


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
