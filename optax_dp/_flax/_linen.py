"""The Flax Linen adapter's model entry: whether a loss runs Linen modules,
and the refusal of a Linen BatchNorm in training mode.

A Linen model is a pure function of its params pytree, so the builders take
it as it is (no split, no random streams: the NNX adapter `_nnx` needs
those); the book-keeping of its layers is `_linen_layers`. flax is optional:
without it nothing is a Linen module.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import jax

from optax_dp._flax import _adapter

try:  # flax is optional: without it everything is "uncovered" (vmap path).
  import flax.linen as nn
except ImportError:  # tested in a core-only environment (tests/core_only)
  nn = None


def calls_modules(loss_fn: Callable, params: Any, example: Any) -> bool:
  """Whether the loss runs any Flax Linen module (a shape-only trace)."""
  if nn is None:
    return False
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    seen.append(context.method_name)
    return next_fun(*args, **kwargs)

  def run(params, example):
    with nn.intercept_methods(interceptor):
      return loss_fn(params, jax.tree.map(lambda x: x[None], example))

  jax.eval_shape(run, params, example)
  return bool(seen)


def _batchnorm_trains(module, args, kwargs) -> bool:
  """Whether a Linen BatchNorm call normalises with the batch's statistics.

  `BatchNorm.__call__(x, use_running_average=None)` merges the call argument
  with the module attribute (`nn.merge_param`). When both or neither are set,
  flax raises its own error, so this returns False and lets it. A value that
  is not a concrete bool (a tracer) cannot be judged at trace time and passes.
  """
  call = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
  attr = module.use_running_average
  if (call is None) == (attr is None):
    return False
  return _adapter.batchnorm_trains(attr if call is None else call)


@contextlib.contextmanager
def no_cross_example_layers(caller: str):
  """Raises ValueError if a Flax Linen BatchNorm in training mode runs inside.

  Per-example gradients (and clipped sums) evaluate each example as a batch of
  one. A BatchNorm that normalises with batch statistics then sees a batch of
  one: its statistics are that example's own, so the function differentiated
  is a different model from the one trained without privacy, where BatchNorm
  mixes the examples of a batch (one example's output depends on the others,
  so clipping "its" gradient would not bound its influence). Either way the
  result is not what the user meant; the fix is a per-example normalisation
  (GroupNorm, LayerNorm) or frozen statistics (`use_running_average=True`,
  a per-example function, which passes).

  Implemented with `flax.linen.intercept_methods` around the traced loss, so it
  runs only while the loss is traced (once per compilation under `jax.jit`),
  never inside the compiled step. Without flax nothing is checked (a model
  without flax has no Linen BatchNorm). `nnx.BatchNorm` in training mode is
  refused by the NNX adapter (`_nnx`). Other cross-example operations
  (in-batch negatives, hand-written batch statistics) are not detected.
  """
  if nn is None:  # no flax: tests/core_only, in a core-only venv
    yield
    return

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name == "__call__" and isinstance(module, nn.BatchNorm)
        and _batchnorm_trains(module, args, kwargs)):
      where = "/".join(str(p) for p in module.path) or type(module).__name__
      raise _adapter.batchnorm_error(caller, "linen", where)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield
