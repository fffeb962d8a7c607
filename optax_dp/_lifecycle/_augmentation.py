"""Augmentation multiplicity: K augmented views per example, averaged before the clip.

De et al. 2022 train DP-SGD with K augmentations of every example and
average the K gradients *before* clipping: the average is still one
example's gradient, so it is clipped to C like any other and the privacy
analysis is unchanged, while the averaging lowers the variance that the
augmentations add (augmenting without averaging, as K separate examples,
would let one example contribute K clipped gradients).

`augmentation_multiplicity(loss_fn, augment_fn, num_views)` is a loss
wrapper: the loss of the K views of each example, merged into one batch,
so that for a batch of one (how every per-example gradient builder evaluates
an example) its gradient is the mean of the K view gradients. It works with
every builder and method (`clipped_grads` auto/ghost/vmap, where a covered
layer sees K rows for the example and book-keeps their sum;
`per_example_grads`; masks and microbatches), with Linen params and NNX
modules alike.

References:
  De, Berrada, Hayes, Smith & Balle 2022, "Unlocking High-Accuracy
  Differentially Private Image Classification through Scale",
  https://arxiv.org/abs/2204.13650 (augmentation multiplicity, section 3.1).
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from optax_dp._core import _checks


def augmentation_multiplicity(
    loss_fn: Callable[[Any, Any], Any],
    augment_fn: Callable[[jax.Array, Any], Any],
    num_views: int,
) -> Callable[[Any, Any], Any]:
  """The loss of `num_views` augmented views of each example of a batch.

  Returns `loss(params, (batch, keys))`: `keys` holds one PRNG key per
  example (shape `(B,)`); example i's views are `augment_fn(k, example_i)`
  for the `num_views` keys `jax.random.split(keys[i], num_views)`, and
  `loss_fn(params, views)` is called on the B * num_views views (example by
  example, views consecutive). `loss_fn` must be a mean over the rows of its
  batch (the ordinary batched loss; it may return `(loss, aux)`), so that
  for one example the gradient is the mean of its view gradients.

  Privacy contract: each example's views depend only on that example and its
  own key, so the averaged gradient is one example's and the clip bounds
  its contribution by C: the mechanism, and its accounting, are those of
  ordinary DP-SGD. Draw the keys independently of the data (e.g.
  `jax.random.split(step_key, B)`); they are not private.

  Args:
    loss_fn: `loss_fn(params, batch)`, a mean over the rows of `batch`.
    augment_fn: `augment_fn(key, example) -> view`, on one example (a pytree
      without the batch axis), returning a pytree of the same structure.
    num_views: K >= 1.

  Examples:
    >>> import jax, jax.numpy as jnp, optax_dp
    >>> def loss_fn(w, x):
    ...   return jnp.mean(x @ w)
    >>> flip = lambda key, x: jnp.where(jax.random.bernoulli(key), x[::-1], x)
    >>> loss = optax_dp.augmentation_multiplicity(loss_fn, flip, num_views=4)
    >>> x, keys = jnp.ones((8, 3)), jax.random.split(jax.random.key(0), 8)
    >>> clipped = optax_dp.clipped_grads(loss, l2_norm_clip=1.0)(jnp.ones(3), (x, keys))
    >>> clipped.clipped_sum.shape
    (3,)
  """
  num_views = _checks.check_int("num_views", num_views, 1)

  def views_of(key, example):
    return jax.vmap(augment_fn, in_axes=(0, None))(jax.random.split(key, num_views), example)

  def loss(params, batch_and_keys):
    batch, keys = batch_and_keys
    views = jax.vmap(views_of)(keys, batch)              # (B, K, ...)
    merged = jax.tree.map(lambda v: v.reshape((-1,) + v.shape[2:]), views)
    return loss_fn(params, merged)

  return loss
