"""optax_dp._flax._linen_layers (the book-keeping path of clipped_grads): the clip bound of
every clipping path in bfloat16 and float16, and shared parameters.

The clip bound is the whole sensitivity argument of DP-SGD: each example's
contribution to the released sum must have L2 norm at most C. In a low
precision model the norms must be computed in float32 (or wider): the
book-keeping rules compute them from the layers' inputs and output gradients,
and in bfloat16 those norms are off by up to 2^-8 relative, which lets
clipped contributions exceed C (measured: up to 1.0024 C on the bf16 MLP
below when `layer_terms` drops its float32 promotion).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_dp

# ---------------------------------------------------------------------------
# The clip bound in bf16 / f16.

C = 1e-3          # far below every per-example gradient norm here (2 to 20)
NUM_EXAMPLES = 8
DTYPES = [jnp.bfloat16, jnp.float16]

# Tolerance on ||clip_C(g)|| / C - 1, float32 rounding only. The clipped
# contribution is c * g with c = C / sqrt(s), s the float32 sum of squares of
# g's coordinates (bf16/f16 values, exact in float32; or, on the book-keeping
# path, of products of such values). With u = 2^-24 (float32 unit roundoff):
# the products and squares cost 1-2 u; a tree-shaped sum (XLA vectorises and
# combines partial sums) at most depth * u, depth <= 15 for the
# 2^15-coordinate leaves here; the sqrt, the division and the products c * g a
# few u more: the relative error of ||c g|| is at most ~ (15 / 2 + 8) u ~
# 2^-20. We allow 2^-16 = 256 u (16x that; measured <= 5 u on every path).
# It is 1/16 of float16's unit roundoff 2^-11 and 1/256 of bfloat16's 2^-8:
# norms computed in the model's dtype are off by that order, which the test
# must see (measured with the float32 promotion of `layer_terms` removed, the
# largest contribution per model: 1.0024 C (dense) and 1.00023 C (conv) in
# bf16, 1.00016 C and 1.00028 C in f16, all >= 10x the tolerance).
REL_TOL = 2.0 ** -16


class MLP(nn.Module):
  """Dense 512-10, parameters and computation in `dtype`: the one-position
  book-keeping rule ||a||^2 ||g||^2 for both layers."""
  dtype: object = jnp.bfloat16

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(512, dtype=self.dtype, param_dtype=self.dtype)(x))
    return nn.Dense(NUM_CLASSES, dtype=self.dtype, param_dtype=self.dtype)(x)


class CNN(nn.Module):
  """Two 2x2 convolutions, the logits the mean of the last one over positions;
  parameters and computation in `dtype`.

  On 6x6x2 inputs the first conv (36 positions, im2col kernel 8 x 8) takes
  the materialised per-example kernel gradients, the second (stride 2: 9
  positions, 32 x 16) the ghost norm <A A^T, G G^T> (`_linen_layers.layer_terms`
  picks the cheaper: T^2 (d + p) against T d p).
  """
  dtype: object = jnp.bfloat16

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.dtype)
    x = nn.relu(nn.Conv(8, (2, 2), **kw)(x))
    x = nn.Conv(NUM_CLASSES, (2, 2), strides=(2, 2), **kw)(x)
    return jnp.mean(x, axis=(1, 2))


NUM_CLASSES = 16
MODELS = {"dense": (MLP, (64,)), "conv": (CNN, (6, 6, 2))}
# clipped_grads(method, microbatch_size) paths; "dp_aggregate" is
# per_example_grads + dp_aggregate(noise_multiplier=0), "clip_and_sum" the
# float32 clipped sum dp_aggregate noises (per_example_grads + clip_and_sum).
CLIPPED_PATHS = [("auto", None), ("ghost", None), ("vmap", None),
                 ("auto", 3), ("ghost", 3), ("vmap", 3)]
PATHS = [f"{m}/microbatch={mb}" for m, mb in CLIPPED_PATHS] + [
    "dp_aggregate", "clip_and_sum"]


@functools.lru_cache(maxsize=None)
def _problem(model_name, dtype):
  """(loss_fn, params, (x, y)) for a model in `dtype`, fixed seeds."""
  cls, shape = MODELS[model_name]
  model = cls(dtype=dtype)
  x = jax.random.normal(jax.random.key(1), (NUM_EXAMPLES,) + shape).astype(dtype)
  y = jax.random.randint(jax.random.key(2), (NUM_EXAMPLES,), 0, NUM_CLASSES)
  params = model.init(jax.random.key(0), x[:1])["params"]

  def loss_fn(p, batch):
    logits = model.apply({"params": p}, batch[0]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

  return loss_fn, params, (x, y)


def _norm(tree):
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree.leaves(tree))))


@functools.lru_cache(maxsize=None)
def _contribution_norms(model_name, dtype):
  """{path: float64 norms of the 8 examples' clipped contributions}.

  Every path in one jitted function of (params, batch, i), compiled once per
  model and dtype (compilation dominates the cost). Without microbatching,
  `clipped_grads` runs on a batch of one example, whose clipped sum IS that
  example's contribution; with microbatch_size=3, on the whole batch of 8 (3
  chunks, the last padded) with only example i unmasked. dp_aggregate, with
  no noise and the default normaliser (the batch of one), releases the
  example's clipped gradient itself, cast to the gradients' dtype.
  """
  loss_fn, params, batch = _problem(model_name, dtype)
  fns = [optax_dp.clipped_grads(loss_fn, C, method=m, microbatch_size=mb)
         for m, mb in CLIPPED_PATHS]
  with pytest.warns(UserWarning, match="NO noise"):
    tx = optax_dp.dp_aggregate(C, 0.0, key=0)
  state = tx.init(params)

  @jax.jit
  def contributions(params, batch, i):
    one = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, i, 1), batch)
    mask = jnp.arange(NUM_EXAMPLES) == i
    out = [(f(params, one) if mb is None else f(params, batch, mask)).clipped_sum
           for f, (_, mb) in zip(fns, CLIPPED_PATHS)]
    grads = optax_dp.per_example_grads(loss_fn)(params, one)
    update, _ = tx.update(grads, state, params)
    return out + [update, optax_dp.clip_and_sum(grads, C).clipped_sum]

  norms = {path: [] for path in PATHS}
  for i in range(NUM_EXAMPLES):
    for path, tree in zip(PATHS, contributions(params, batch, i)):
      want = dtype if path == "dp_aggregate" else jnp.float32
      assert all(x.dtype == want for x in jax.tree.leaves(tree)), (path, tree)
      norms[path].append(_norm(tree))
  return {path: np.array(n) for path, n in norms.items()}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("model_name", [   # the conv model compiles for seconds: slow
    pytest.param(m, marks=pytest.mark.slow) if m == "conv" else m for m in sorted(MODELS)])
def test_each_clipped_contribution_has_norm_c_in_low_precision(model_name, dtype, path):
  """Each example's clipped contribution has norm C: at most C(1 + 2^-16).

  Every gradient here is far larger than C, so a correct clip gives norm C:
  above is a sensitivity breach; below (e.g. zero: the example was dropped)
  would make the upper check vacuous, so it fails too. dp_aggregate's
  release is cast to the gradients' dtype (post-processing), which may grow
  each coordinate, so the norm, by the dtype's unit roundoff u: there the
  bound is C(1 + 2^-16)(1 + u) (its float32 clipped sum is `clip_and_sum`).
  """
  norms = _contribution_norms(model_name, dtype)[path] / C
  extra = float(jnp.finfo(dtype).eps) / 2 if path == "dp_aggregate" else 0.0
  hi, lo = (1 + REL_TOL) * (1 + extra), (1 - REL_TOL) * (1 - extra)
  assert np.all(norms <= hi), f"{path}: contributions / C = {norms.tolist()} > {hi}"
  assert np.all(norms >= lo), f"{path}: contributions / C = {norms.tolist()} < {lo}"


# ---------------------------------------------------------------------------
# Shared parameters.
#
# `discover` covers a layer only if its module path is called exactly once and
# every parameter it owns is found (by identity) among the params tree's
# leaves. The call count excludes a module called twice, including one
# instance shared by two parents or called through two paths (it keeps its
# first path, so both calls land on it). It does not exclude two distinct
# modules, each called once, that the loss function hands the same array:
# weight tying done outside the model (`model.apply({"params": {"a": p["w"],
# "b": p["w"]}}, x)`). Both then own the same params-tree leaf; covering both
# would write that leaf's clipped sum twice (one layer's part lost) and
# compute its norm as |g_a|^2 + |g_b|^2 instead of |g_a + g_b|^2. The last
# check of `discover` (one owner per leaf) is what excludes them: reachable,
# tested here.


class TwoDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(5, name="b")(jnp.tanh(nn.Dense(5, name="a")(x)))


class _Wrap(nn.Module):
  inner: nn.Module

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(self.inner(x))


class SharedChild(nn.Module):
  """One Dense instance handed to two parents (Flax module sharing)."""

  def setup(self):
    self.shared = nn.Dense(5)
    self.left = _Wrap(self.shared)
    self.right = _Wrap(self.shared)

  def __call__(self, x):
    return self.right(self.left(x))


def _tied_problem():
  model = TwoDense()
  x = jax.random.normal(jax.random.key(3), (6, 5))
  params = {"w": model.init(jax.random.key(4), x[:1])["params"]["a"]}

  def loss_fn(p, batch):  # layers "a" and "b" share every parameter
    out = model.apply({"params": {"a": p["w"], "b": p["w"]}}, batch)
    return jnp.mean(jnp.sum(jnp.square(out - 0.5), -1))

  return loss_fn, params, x


def _shared_child_problem():
  model = SharedChild()
  x = jax.random.normal(jax.random.key(5), (6, 5))
  params = model.init(jax.random.key(6), x[:1])["params"]

  def loss_fn(p, batch):
    return jnp.mean(jnp.sum(jnp.square(model.apply({"params": p}, batch) - 0.5), -1))

  return loss_fn, params, x


@pytest.mark.parametrize("problem", [_tied_problem, _shared_child_problem],
                         ids=["tied_in_loss", "shared_child"])
def test_shared_parameters_are_not_covered_and_auto_is_exact(problem):
  """method='auto' gives shared parameters per-example gradients: the same
  clipped sum as method='vmap'; method='ghost' refuses them."""
  loss_fn, params, x = problem()
  # Clip at the median per-example norm: some examples clipped, some not.
  grads = jax.jit(optax_dp.per_example_grads(loss_fn))(params, x)
  norms = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)).reshape(len(x), -1), 1)
                      for g in jax.tree.leaves(grads)))
  clip = float(np.median(norms))
  assert np.sum(norms > clip) >= 1 and np.sum(norms < clip) >= 1
  want = jax.jit(optax_dp.clipped_grads(loss_fn, clip, method="vmap"))(params, x)
  got = jax.jit(optax_dp.clipped_grads(loss_fn, clip, method="auto"))(params, x)
  for g, w in zip(jax.tree.leaves(got.clipped_sum), jax.tree.leaves(want.clipped_sum)):
    # The same per-example gradients (one backward pass each), clipped and
    # summed in float32 in another order: equal up to a few float32 roundings
    # of sums of 6 terms (~1e-7 relative); a lost layer's part or a wrong
    # clip factor moves them by O(1) of their scale.
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(w))))
  with pytest.raises(ValueError, match="not owned by a layer"):
    jax.jit(optax_dp.clipped_grads(loss_fn, clip, method="ghost"))(params, x)
  assert optax_dp._flax._linen_layers.discover(loss_fn, params, x[0], False) == []  # pylint: disable=protected-access
