"""Argument checks shared by the public functions (clear ValueErrors)."""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import threading
import warnings
from typing import Any, Callable, Iterator, Optional


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


class LargeDeltaWarning(UserWarning):
  """`target_delta >= 1 / dataset_size`: the guarantee is then vacuous.

  An (epsilon, delta) mechanism may release one example of a data set of N
  outright with probability about N * delta ("name and shame"): at
  delta >= 1/N that is no longer unlikely. Choose delta well below 1/N.
  """


def large_delta_note(target_delta: float, dataset_size: int) -> Optional[str]:
  """The warning text when `target_delta >= 1 / dataset_size`, else None.

  >>> large_delta_note(1e-5, 60000) is None
  True
  >>> large_delta_note(1e-3, 60000)[:44]
  'WARNING: delta 0.001 >= 1/N = 1.667e-05 (N ='
  """
  if target_delta * dataset_size < 1:
    return None
  return (f"WARNING: delta {target_delta:g} >= 1/N = {1 / dataset_size:.4g} (N = "
          f"{dataset_size} examples). At delta >= 1/N the guarantee allows "
          "releasing an example outright with non-negligible probability, so "
          "it says little; choose delta well below 1/N (e.g. 1/N^1.1 or "
          f"{_below_inverse(dataset_size):g}).")


def _below_inverse(dataset_size: int) -> float:
  """A power of ten at least 10x below 1/N (1e-6 for N = 60000)."""
  return 10.0 ** math.floor(math.log10(0.1 / dataset_size))


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


class PrivacyBudgetExceededError(RuntimeError):
  """A noisy update past the budget's `max_steps` was refused."""


class NoiseReplayError(RuntimeError):
  """The optimizer state's noise key does not belong to this run at its step."""


class AdaptiveClipMismatchError(ValueError):
  """A clipped sum made with another clip norm than the adaptive one of the
  optimizer state it updates."""


def leading_size(tree: Any, *, empty: str,
                 scalar: Callable[[str, list], str],
                 differ: Callable[[list], str]) -> int:
  """The leading (batch) dimension that every leaf of `tree` shares.

  The one batch-axis rule, for a batch and for per-example gradients: one
  row per example on every leaf, so a tree without leaves, a scalar leaf or
  leaves of different leading sizes are refused (ValueError); without it the
  rows are not "one example each" and no clip bounds an example. The
  callers word the errors: `empty` is the message for no leaves,
  `scalar(path, shapes)` for a scalar leaf at `path` (`shapes`: every leaf's
  shape), `differ(dims)` for `dims`, the `(path, leading size)` of each leaf.

  >>> import numpy as np
  >>> leading_size({"a": np.zeros((4, 2)), "b": np.zeros(4)}, empty="",
  ...              scalar=None, differ=None)
  4
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not flat:
    raise ValueError(empty)
  dims = []
  for path, leaf in flat:
    shape = jnp.shape(leaf)
    if not shape:
      raise ValueError(scalar(jax.tree_util.keystr(path),
                              [jnp.shape(x) for _, x in flat]))
    dims.append((jax.tree_util.keystr(path), shape[0]))
  sizes = {d for _, d in dims}
  if len(sizes) != 1:
    raise ValueError(differ(dims))
  return sizes.pop()


def missing_expected_batch_size(where: str, why: str) -> ValueError:
  """The error for a `dp_aggregate` that needs `expected_batch_size` and has
  neither it nor a budget (whose sampler gives it); the caller raises it.

  The one message for every place that needs the public normaliser: the
  realised batch size would leak the batch (Poisson sampling), so there is
  no fallback. `where` says which `dp_aggregate` (e.g. "under
  dp_accumulate"), `why` what the constant normalises there.

  >>> str(missing_expected_batch_size("under dp_accumulate", "why"))[:64]
  'dp_aggregate under dp_accumulate needs expected_batch_size= (the'
  """
  return ValueError(
      f"dp_aggregate {where} needs expected_batch_size= (the expected batch "
      "size, a public constant; under dp_accumulate the LOGICAL one) or "
      f"budget= (its sampler's): {why}.")


def find_states(tree: Any, cls: type) -> list:
  """Every instance of the state class `cls` in `tree`, in leaf order.

  `tree` is an optimizer state as the user holds it: a chain's, one nested
  in wrappers (`optax.MultiSteps`, `dp_accumulate`), a framework's train
  state or its optimizer's state (whose variables wrap the states' arrays,
  not the states). Matched by type: `optax.tree_utils.tree_get_all_with_path`
  matches a NamedTuple by its class *name*, which another library's class
  of the same name would also match.

  >>> import collections
  >>> Point = collections.namedtuple("Point", "x y")
  >>> find_states({"a": Point(1, 2), "b": [Point(3, 4), 5]}, Point)
  [Point(x=1, y=2), Point(x=3, y=4)]
  """
  import jax  # pylint: disable=import-outside-toplevel
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, cls))
  return [x for x in leaves if isinstance(x, cls)]


def find_one(tree: Any, cls: type, made_by: str) -> Any:
  """The one `cls` state in `tree` (as `find_states`), or ValueError.

  The error names the class, `made_by` (the function whose state it is) and
  how many were found: with none there is nothing to read, with several the
  answer would depend on which one was meant.

  >>> import collections
  >>> Point = collections.namedtuple("Point", "x y")
  >>> find_one([Point(1, 2), 3], Point, "make_point")
  Point(x=1, y=2)
  >>> find_one([3], Point, "make_point")  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: Expected exactly one Point (from make_point) in the ... found 0.
  """
  found = find_states(tree, cls)
  if len(found) != 1:
    raise ValueError(
        f"Expected exactly one {cls.__name__} (from {made_by}) in the "
        f"optimizer state, found {len(found)}.")
  return found[0]


def raise_if(predicate: Any, error: type[Exception], message: str) -> None:
  """Raises `error(message)` if `predicate` holds, also inside `jax.jit`.

  Outside a trace the check is an ordinary `if`. Inside one it is a
  `lax.cond` whose taken branch runs a host callback that raises: JAX then
  fails the jitted call with a `JaxRuntimeError` whose text contains
  `message`, and `reraise_refusals` turns it back into `error` (JAX's own
  log of the failed callback is silenced for these errors: one message).
  The callback costs nothing while the predicate is false. Callers also
  poison their outputs when the predicate holds, so that a platform without
  host callbacks still cannot release a refused update.
  """
  import jax  # local: keeps this module importable without touching devices

  if not isinstance(predicate, jax.core.Tracer):
    if bool(predicate):
      raise error(message)
    return

  def fail():
    refusal = error(message)
    with _LOCK:
      _REFUSALS.append(refusal)
      del _REFUSALS[:-8]
    raised = error(message + _JIT_HINT.format(name=error.__name__))
    setattr(raised, _MARK, True)
    raise raised

  _silence_callback_log()
  jax.lax.cond(predicate, lambda: jax.debug.callback(fail), lambda: None)


_MARK = "_optax_dp_refusal"
_JIT_HINT = (" [Raised inside a jitted step, JAX reports this as a JaxRuntimeError; "
             "run the loop under `with optax_dp.reraise_refusals():` to get it as "
             "optax_dp.{name}.]")
_REFUSALS: list = []
_LOCK = threading.Lock()


class _DropRefusalLogs(logging.Filter):
  """Drops JAX's log of a failed host callback when the failure is one of
  optax_dp's refusals: the refusal reaches the caller once, as the error."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not getattr(exc, _MARK, False)


_FILTER = _DropRefusalLogs()


def _silence_callback_log() -> None:
  for name in ("jax._src.debugging", "jax._src.callback"):
    log = logging.getLogger(name)
    if _FILTER not in log.filters:
      log.addFilter(_FILTER)


@contextlib.contextmanager
def reraise_refusals() -> Iterator[None]:
  """Re-raises optax_dp's refusals from inside `jax.jit` as their own types.

  A refusal checked inside a jitted step (`PrivacyBudgetExceededError`,
  `NoiseReplayError`, `AdaptiveClipMismatchError`) is raised by a host
  callback, which JAX reports as a `jax.errors.JaxRuntimeError`. Inside this
  context (or on a function decorated with it) that error is replaced by the
  optax_dp error it carries, so `except optax_dp.PrivacyBudgetExceededError`
  catches it; any other error passes unchanged. Outside `jax.jit` the
  refusals are raised with their own types anyway. Privacy: the refused
  update was not released either way (its outputs are poisoned).

  Examples:
    >>> import jax, jax.numpy as jnp, optax_dp
    >>> sampler = optax_dp.PoissonSampler(dataset_size=1000, expected_batch_size=4)
    >>> budget = optax_dp.privacy_budget(sampler=sampler, target_delta=1e-5,
    ...                                  noise_multiplier=1.0, steps=1)
    >>> tx = optax_dp.dp_aggregate(1.0, key=jax.random.key(0), budget=budget)
    >>> step = jax.jit(tx.update)
    >>> grads, state = {"w": jnp.ones((4, 2))}, tx.init({"w": jnp.zeros(2)})
    >>> _, state = step(grads, state)     # the one step the budget allows
    >>> try:
    ...   with optax_dp.reraise_refusals():
    ...     jax.block_until_ready(step(grads, state))
    ... except optax_dp.PrivacyBudgetExceededError as e:
    ...   print(type(e).__name__)
    PrivacyBudgetExceededError
  """
  import jax  # local: keeps this module importable without touching devices

  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    text = str(e)
    with _LOCK:
      found = [r for r in _REFUSALS if str(r) and str(r) in text]
      _REFUSALS.clear()
    if not found:
      raise
    raise found[-1] from None


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
