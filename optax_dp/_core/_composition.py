"""Optax wrappers that break the privacy contract when placed around the DP step.

`dp_aggregate` must see every example's raw gradient first: anything that
looks at, averages, reshapes or passes through raw per-example gradients
before the noise is added is outside the accounted mechanism. Each wrapper
below does one of those when it wraps `dp_aggregate` (or `dpsgd`), and each
works when placed *after* it in `optax.chain`, where it only post-processes
the noised update. `dp_aggregate` asks `refusal_for_caller()` at every update
(a walk up the Python call stack, at trace time under `jax.jit`) and refuses
with the composition that works.

The wrappers are recognised by the code objects of their public factories
(`optax.apply_if_finite`, ...), nested functions included: no private optax
name is imported. If a future optax restructures one, the tests of the
wrapper matrix (tests/test_composition.py) fail.
"""

from __future__ import annotations

import sys
import types
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

_MAX_FRAMES = 400  # the call stack is walked at most this deep

_NAN_ADVICE = (
    "dp_aggregate already drops an example whose gradient is not finite (it "
    "contributes zero and is counted in state.nonfinite_examples), so no step "
    "needs skipping for it.")


def _wrappers() -> list[tuple[str, Callable, str]]:
  """(name, public factory or class, why it breaks the contract + the fix)."""
  table = [
      ("optax.apply_if_finite", optax.apply_if_finite,
       "it tests the raw per-example gradients for NaN/inf and skips the whole "
       "step if one example's is not finite: whether a step is released would "
       "then depend on a single example, which the accountant does not cover "
       "(and its rejected branch returns per-example-shaped zeros, so it cannot "
       "run). " + _NAN_ADVICE + " Put it after the DP step: optax.chain("
       "optax_dp.dp_aggregate(...), optax.apply_if_finite(optax.sgd(...), "
       "max_consecutive_errors=...))."),
      ("optax.MultiSteps", optax.MultiSteps,
       "it averages its inputs across mini-steps before dp_aggregate sees them "
       "(raw per-example gradients mixed across batches, or ClippedGrads turned "
       "into plain arrays), so the clip no longer bounds one example and the "
       "noise would be added to the wrong sum. Use optax_dp.dp_accumulate("
       "optax.chain(optax_dp.dp_aggregate(...), optax.sgd(...)), k) with "
       "optax_dp.clipped_grads: it accumulates clipped sums and adds the noise "
       "once per logical batch. (optax.MultiSteps after dp_aggregate, "
       "accumulating noised updates, is post-processing and fine.)"),
      ("optax.flatten", optax.flatten,
       "it concatenates every gradient leaf into one vector, the batch axis "
       "included, so the rows of one example are no longer what dp_aggregate "
       "clips. Put it after the DP step: optax.chain(optax_dp.dp_aggregate(...), "
       "optax.flatten(optax.sgd(...)))."),
  ]
  transforms = getattr(optax, "transforms", None)
  for name in ("conditionally_mask", "conditionally_transform"):
    factory = getattr(transforms, name, None)
    if factory is not None:
      table.append((
          f"optax.transforms.{name}", factory,
          "when its condition is false, its rejected branch passes the raw "
          "per-example gradients through unchanged (conditionally_transform) "
          "or returns zeros shaped like them (conditionally_mask), batch axis "
          "and all, instead of a noised update (JAX refuses to build it: the "
          "two branches differ in shape). "
          f"Put it after the DP step: optax.chain(optax_dp.dp_aggregate(...), "
          f"optax.transforms.{name}(optax.sgd(...), ...))."))
  return table


def _nested_code(root: types.CodeType) -> set[types.CodeType]:
  found, todo = set(), [root]
  while todo:
    code = todo.pop()
    if code in found:
      continue
    found.add(code)
    todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
  return found


_CODE_TO_WRAPPER: Optional[dict] = None


def _code_to_wrapper() -> dict:
  global _CODE_TO_WRAPPER
  if _CODE_TO_WRAPPER is None:
    table = {}
    for name, factory, advice in _wrappers():
      functions = ([v for v in vars(factory).values() if isinstance(v, types.FunctionType)]
                   if isinstance(factory, type) else [factory])
      for function in functions:
        for code in _nested_code(function.__code__):
          table[code] = (name, advice)
    _CODE_TO_WRAPPER = table
  return _CODE_TO_WRAPPER


def refusal_for_caller(caller: str) -> Optional[str]:
  """The error message if an optax wrapper that breaks the contract is on the
  call stack around `caller` (e.g. "dp_aggregate"); None if there is none."""
  table = _code_to_wrapper()
  frame = sys._getframe(1)  # pylint: disable=protected-access
  for _ in range(_MAX_FRAMES):
    if frame is None:
      return None
    hit = table.get(frame.f_code)
    if hit is not None:
      name, advice = hit
      return (f"{caller} is wrapped in {name}, which breaks the privacy "
              f"contract around it: {advice}")
    frame = frame.f_back
  return None


def masked_refusal(caller: str) -> str:
  """The message for `optax.masked` (or `multi_transform`/`partition`) around
  the DP step, which `dp_aggregate` detects by the `optax.MaskedNode` leaves
  it is handed."""
  return (
      f"{caller} is wrapped in optax.masked (optax.multi_transform and "
      "optax.partition use it): the leaves outside its mask are passed through "
      "untouched, and those are raw per-example gradients, batch axis and all, "
      "which would reach the next transform and the parameters with no clipping "
      "and no noise. Apply the DP step to all parameters first and split after "
      "it: optax.chain(optax_dp.dp_aggregate(...), optax.multi_transform("
      "{'train': optax.sgd(...), 'frozen': optax.set_to_zero()}, labels)) (or "
      "optax.masked(optax.sgd(...), mask) after it). Discarding the noised "
      "update of frozen parameters is post-processing: privacy is unchanged.")


def contains_masked_node(tree) -> bool:
  """Whether `tree` has an `optax.MaskedNode` (a leaf `optax.masked` hid)."""
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  return any(is_masked(x) for x in jax.tree.leaves(tree, is_leaf=is_masked))


# ---------------------------------------------------------------------------
# What the DP step is handed: per-example gradients, or a stripped/averaged tree.


def check_composition(updates) -> None:
  """Refuses the optax wrappers that break the contract around dp_aggregate."""
  refusal = refusal_for_caller("dp_aggregate")
  if refusal is None and contains_masked_node(updates):
    refusal = masked_refusal("dp_aggregate")
  if refusal is not None:
    raise ValueError(refusal)


def check_against_params(per_example_grads, params) -> None:
  """Checks per-example grads have shape (B, *param.shape) for every param."""
  g_def = jax.tree.structure(per_example_grads)
  p_def = jax.tree.structure(params)
  if g_def != p_def and isinstance(params, optax.LookaheadParams):
    raise ValueError(
        "dp_aggregate got optax.LookaheadParams as params: it runs inside "
        "optax.chain after optax.lookahead's params were handed to the chain. "
        "optax.lookahead must wrap the whole DP optimizer, so that the DP step "
        "sees the fast params: optax.lookahead(optax.chain(optax_dp."
        "dp_aggregate(...), optax.sgd(...)), sync_period, slow_step_size) "
        "(or optax.lookahead(optax_dp.dpsgd(...), ...)).")
  if g_def != p_def:
    raise ValueError(
        "dp_aggregate: the gradient tree does not match the params tree "
        f"(grads {g_def} vs params {p_def}).")
  for (path, g), p in zip(jax.tree_util.tree_flatten_with_path(per_example_grads)[0],
                          jax.tree.leaves(params)):
    if tuple(jnp.shape(g)[1:]) != tuple(jnp.shape(p)):
      raise ValueError(
          f"dp_aggregate: gradient leaf {jax.tree_util.keystr(path)} has shape "
          f"{jnp.shape(g)}, but per-example gradients of a parameter of shape "
          f"{jnp.shape(p)} must have shape (batch, *{tuple(jnp.shape(p))}). "
          "Pass per-example gradients (optax_dp.per_example_grads), and put "
          "dp_aggregate first in optax.chain.")
