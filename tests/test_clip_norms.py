"""optax_dp._clip._clip_norms: group-wise clipping (a pytree prefix of the params)
and adaptive quantile clipping (Andrew et al. 2021), through every path that
clips: per-example gradients into dp_aggregate, clip_and_sum, clipped_grads
(vmap, auto, ghost, microbatched), NNX, the accounting and the one-run audit.
Accumulation with either (k physical batches = one logical batch) is
test_accumulate.py's test_k_physical_batches_equal_one_logical_batch, for
every clip kind and noise kind."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import optax_dp
from optax_dp._clip import _clip_norms

import models

# Groups of the SmallCNN: the conv layer, the dense kernel, the dense bias
# (a layer's kernel and bias in different groups).
GROUPS = {"Conv_0": 0.3, "Dense_0": {"kernel": 0.2, "bias": 0.05}}
SENSITIVITY = math.sqrt(0.3 ** 2 + 0.2 ** 2 + 0.05 ** 2)


def _setup(batch=6, seed=0):
  model = models.SmallCNN(features=4, classes=3)
  x = jax.random.normal(jax.random.key(seed), (batch, 6, 6, 1))
  y = jnp.arange(batch) % 3
  params = model.init(jax.random.key(1), x[:1])["params"]

  def loss_fn(params, batch):
    x, y = batch
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss_fn, params, (x, y)


def _by_hand(per_example, groups_of_leaf, norms, mask=None):
  """Group-wise clipping on per-example gradients, in float64 numpy."""
  leaves, treedef = jax.tree.flatten(per_example)
  leaves = [np.asarray(l, np.float64) for l in leaves]
  batch = leaves[0].shape[0]
  mask = np.ones(batch, bool) if mask is None else np.asarray(mask)
  sums = [np.zeros(l.shape[1:]) for l in leaves]
  for i in range(batch):
    if not mask[i]:
      continue
    for g, c in enumerate(norms):
      members = [k for k, gk in enumerate(groups_of_leaf) if gk == g]
      norm = math.sqrt(sum(np.sum(leaves[k][i] ** 2) for k in members))
      scale = min(1.0, c / norm) if norm > 0 else 1.0
      for k in members:
        sums[k] += scale * leaves[k][i]
  return jax.tree.unflatten(treedef, sums)


def _assert_tree_close(got, want, rtol=1e-5, atol=1e-6):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol, atol=atol)


def _leaf_groups_by_name(params):
  names = ["/".join(_clip_norms.path_names(p)) for p, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  return [0 if n.startswith("Conv_0") else 1 if n.endswith("kernel") else 2 for n in names]


# ----------------------------------------------------------------- group-wise

def test_clip_groups_parse_and_refuse():
  g = optax_dp.clip_groups(GROUPS)
  assert g.paths == (("Conv_0",), ("Dense_0", "bias"), ("Dense_0", "kernel"))
  assert g.norms == (0.3, 0.05, 0.2)
  assert math.isclose(g.sensitivity, SENSITIVITY)
  _, params, _ = _setup()
  assert _clip_norms.leaf_groups(g, params) == (0, 0, 1, 2)
  with pytest.raises(ValueError, match="no clip norm to parameters"):
    _clip_norms.leaf_groups(optax_dp.clip_groups({"Conv_0": 1.0}), params)
  with pytest.raises(ValueError, match="match no parameter"):
    _clip_norms.leaf_groups(optax_dp.clip_groups({**GROUPS, "Dense_9": 1.0}), params)
  with pytest.raises(ValueError, match="finite number > 0"):
    optax_dp.clip_groups({"Conv_0": 0.0})
  with pytest.raises(ValueError, match="empty tree"):
    optax_dp.clip_groups({})


@pytest.mark.parametrize("path", ["clip_and_sum", "dp_aggregate", "vmap", "auto", "ghost",
                                  "microbatch"])
def test_groupwise_equals_clipping_each_group_by_hand(path):
  """Every path's clipped sum equals clipping each group of each example's
  gradient to its own norm by hand (float64), with a padding row masked
  out. The groups split the Dense layer (kernel and bias apart), so the
  book-keeping rules' per-parameter norms are what is tested."""
  loss_fn, params, batch = _setup()
  mask = jnp.array([True, True, True, True, True, False])
  per_example = optax_dp.per_example_grads(loss_fn)(params, batch)
  want = _by_hand(per_example, _leaf_groups_by_name(params), (0.3, 0.2, 0.05), mask)
  if path == "clip_and_sum":
    masked = jax.tree.map(lambda g: g * mask.reshape((-1,) + (1,) * (g.ndim - 1)), per_example)
    got = optax_dp.clip_and_sum(masked, GROUPS).clipped_sum
  elif path == "dp_aggregate":
    masked = jax.tree.map(lambda g: g * mask.reshape((-1,) + (1,) * (g.ndim - 1)), per_example)
    with pytest.warns(UserWarning, match="NOT differentially private"):
      tx = optax_dp.dp_aggregate(GROUPS, 0.0, key=0, expected_batch_size=1)
    got, _ = tx.update(masked, tx.init(params), params)
  else:
    options = ({"method": "auto", "microbatch_size": 4} if path == "microbatch"
               else {"method": path})
    clipped = jax.jit(optax_dp.clipped_grads(loss_fn, GROUPS, **options))(params, batch, mask)
    assert clipped.l2_norm_clip == optax_dp.clip_groups(GROUPS)
    got = clipped.clipped_sum
  _assert_tree_close(got, jax.tree.leaves(want))


def test_groupwise_nnx_optimizer_equals_by_hand():
  """NNX: clipped_grads of a module with groups named by its attributes,
  through nnx.Optimizer (noise 0): the update is minus the by-hand sum."""
  nnx = pytest.importorskip("flax.nnx")

  def loss_fn(model, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  _, _, batch = _setup()
  groups = {"conv": 0.3, "out": {"kernel": 0.2, "bias": 0.05}}
  model = models.NNXSmallCNN(nnx.Rngs(0))
  before = nnx.state(model, nnx.Param)
  before = jax.tree.map(lambda v: np.asarray(v), before)
  per_example = optax_dp.per_example_grads(loss_fn)(model, batch)
  names = ["/".join(_clip_norms.path_names(p)) for p, _ in
           jax.tree_util.tree_flatten_with_path(per_example)[0]]
  groups_of_leaf = [0 if n.startswith("conv") else 1 if "kernel" in n else 2 for n in names]
  want = _by_hand(per_example, groups_of_leaf, (0.3, 0.2, 0.05))
  with pytest.warns(UserWarning, match="NOT differentially private"):
    tx = optax.chain(optax_dp.dp_aggregate(groups, 0.0, key=0, expected_batch_size=1),
                     optax.sgd(1.0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  optimizer.update(model, optax_dp.clipped_grads(loss_fn, groups)(model, batch))
  after = nnx.state(model, nnx.Param)
  for b, a, w in zip(jax.tree.leaves(before), jax.tree.leaves(after), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(b) - np.asarray(a), w, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_groupwise_sensitivity_bound_holds_and_is_attained():
  """Removing one example moves the clipped sum by at most sqrt(sum_g C_g^2)
  (the noise's scale), for random examples and for adversarial ones whose
  every group is far above its norm, which attain the bound (so it is the
  tight one, not a loose over-estimate)."""
  loss_fn, params, batch = _setup(batch=8, seed=3)
  per_example = optax_dp.per_example_grads(loss_fn)(params, batch)
  fn = jax.jit(lambda g: optax_dp.clip_and_sum(g, GROUPS).clipped_sum)

  def moved(grads, i):
    full = jax.tree.leaves(fn(grads))
    without = jax.tree.leaves(fn(jax.tree.map(lambda g: jnp.delete(g, i, axis=0), grads)))
    return math.sqrt(sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(full, without)))

  for i in range(8):
    assert moved(per_example, i) <= SENSITIVITY * (1 + 1e-5)
  adversarial = jax.tree.map(lambda g: g.at[2].multiply(1e4), per_example)
  assert moved(adversarial, 2) == pytest.approx(SENSITIVITY, rel=1e-4)


@pytest.mark.slow
def test_groupwise_noise_is_the_flat_noise_at_the_total_sensitivity():
  """dp_aggregate with groups adds exactly the noise of a flat clip at
  C = sqrt(sum_g C_g^2) (same key): std noise_multiplier * sensitivity; and
  a single group holding every parameter gives the flat transform's update
  bit for bit (noise and accounting unchanged)."""
  loss_fn, params, batch = _setup(batch=2)
  zeros = jax.tree.map(lambda p: jnp.zeros((2,) + p.shape), params)
  grouped = optax_dp.dp_aggregate(GROUPS, 1.3, key=7, expected_batch_size=2)
  flat = optax_dp.dp_aggregate(SENSITIVITY, 1.3, key=7, expected_batch_size=2)
  a, _ = grouped.update(zeros, grouped.init(params), params)
  b, _ = flat.update(zeros, flat.init(params), params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  per_example = optax_dp.per_example_grads(loss_fn)(params, batch)
  whole = optax_dp.dp_aggregate(optax_dp.ClipGroups(paths=((),), norms=(0.5,)), 1.3, key=13,
                                expected_batch_size=2)
  u1, _ = whole.update(per_example, whole.init(params), params)
  flat = optax_dp.dp_aggregate(0.5, 1.3, key=13, expected_batch_size=2)
  u2, _ = flat.update(per_example, flat.init(params), params)
  for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_array_equal(x, y)


def test_groupwise_refuses_a_mismatch():
  loss_fn, params, batch = _setup()
  clipped = optax_dp.clipped_grads(loss_fn, GROUPS)(params, batch)
  for other in (SENSITIVITY, {"Conv_0": 0.3, "Dense_0": 0.2}):
    tx = optax_dp.dp_aggregate(other, 1.0, key=0, expected_batch_size=6)
    with pytest.raises(ValueError, match="the noise would not match"):
      tx.update(clipped, tx.init(params), params)
  flat = optax_dp.clipped_grads(loss_fn, 0.5)(params, batch)
  tx = optax_dp.dp_aggregate(GROUPS, 1.0, key=0, expected_batch_size=6)
  with pytest.raises(ValueError, match="the noise would not match"):
    tx.update(flat, tx.init(params), params)
  with pytest.raises(ValueError, match="no clip norm to parameters"):
    optax_dp.dp_aggregate({"Conv_0": 1.0}, 1.0, key=0, expected_batch_size=6).init(params)


def test_per_layer_clip_norms_keeps_the_total_sensitivity():
  _, params, _ = _setup()
  norms = optax_dp.per_layer_clip_norms(params, 0.1)
  assert set(norms) == {"Conv_0", "Dense_0"}
  assert math.isclose(optax_dp.clip_groups(norms).sensitivity, 0.1)


# ------------------------------------------------------------------ adaptive

def _norm_rows(key, batch, dim, log_sd):
  """Rows whose norms are lognormal (median 1, log-sd `log_sd`), random
  directions: per-example gradients of `loss(w, x) = mean(x @ w)`."""
  k1, k2 = jax.random.split(key)
  direction = jax.random.normal(k1, (batch, dim))
  direction = direction / jnp.linalg.norm(direction, axis=1, keepdims=True)
  return direction * jnp.exp(log_sd * jax.random.normal(k2, (batch, 1)))


@pytest.mark.parametrize("initial", [10.0, 0.1])
def test_adaptive_clip_converges_to_the_target_quantile(initial):
  """The fast path (clipped_grads, auto) with an adaptive clip from 10x and
  0.1x the target: after 400 steps log C is within the stationary band of
  the target quantile of the norm distribution.

  Tolerance, derived: near the target C*, log C follows
  x' = (1 - eta k) x - eta e, k = pdf of log-norm at log C* (the CDF's slope
  in log C), e the noise of the unclipped fraction: var = q(1-q)/m (the
  batch) + (s/m)^2 (the count noise). The stationary sd of x is
  sqrt(eta^2 var / (1 - (1 - eta k)^2)); 6 sd (false alarm < 2e-9), plus the
  transient from |log 10| = 2.3 (at most eta max(q, 1-q) per step until the
  band, then a factor (1 - eta k) per step: < 1e-6 after 400 steps)."""
  m, dim, steps, q, eta, log_sd = 256, 8, 400, 0.7, 0.2, 0.5
  count_std = m / 20
  target = math.exp(log_sd * stats.norm.ppf(q))
  k = stats.norm.pdf(stats.norm.ppf(q)) / log_sd
  var = q * (1 - q) / m + (count_std / m) ** 2
  sd = math.sqrt(eta ** 2 * var / (1 - (1 - eta * k) ** 2))
  clip = optax_dp.AdaptiveClip(initial, target_quantile=q, learning_rate=eta)
  tx = optax.chain(optax_dp.dp_aggregate(clip, 1.0, key=5, expected_batch_size=m),
                   optax.sgd(0.0))
  grad_fn = optax_dp.clipped_grads(lambda w, x: jnp.mean(x @ w), clip)
  w = jnp.zeros(dim)

  @jax.jit
  def run(state):
    def body(state, t):
      rows = _norm_rows(jax.random.fold_in(jax.random.key(99), t), m, dim, log_sd)
      clipped = grad_fn(w, rows, l2_norm_clip=optax_dp.l2_norm_clip_of(state))
      _, state = tx.update(clipped, state, w)
      return state, optax_dp.l2_norm_clip_of(state)
    return jax.lax.scan(body, state, jnp.arange(steps))

  _, path = run(tx.init(w))
  assert abs(math.log(float(path[-1]) / target)) < 6 * sd, (float(path[-1]), target, sd)
  # It did move: from 10x (0.1x) down (up) by more than the band.
  assert abs(math.log(float(path[0]) / initial)) > 0


def test_adaptive_noise_split_and_count_noise_are_what_run():
  """With effective multiplier z and count std s, the gradients get noise
  std sigma C (sigma = (z^-2 - (2s)^-2)^-1/2) and the count gets std s:
  both measured on zero gradients (chi-square bands at false alarm 1e-6
  each), the count noise read back from the clip updates."""
  z, m, s, c0, eta = 1.1, 400, 20.0, 0.5, 0.2
  sigma = (z ** -2 - (2 * s) ** -2) ** -0.5
  clip = optax_dp.AdaptiveClip(c0, target_quantile=0.5, learning_rate=eta,
                               count_noise_stddev=s)
  tx = optax_dp.dp_aggregate(clip, z, key=3, expected_batch_size=m)
  d, steps = 20000, 400
  params = {"w": jnp.zeros(d)}
  # 2 examples of norm 1e-3, cancelling: unclipped (count +1), sum exactly 0.
  zeros = {"w": jnp.zeros((2, d)).at[0, 0].set(1e-3).at[1, 0].set(-1e-3)}
  state = tx.init(params)
  out, state1 = jax.jit(tx.update)(zeros, state, params)
  noise = np.asarray(out["w"], np.float64) * m / (sigma * c0)
  lo, hi = stats.chi2.ppf([5e-7, 1 - 5e-7], d)
  assert lo < np.sum(noise ** 2) < hi

  @jax.jit
  def counts(state):
    def body(state, _):
      before = optax_dp.l2_norm_clip_of(state)
      _, state = tx.update(zeros, state, params)
      after = optax_dp.l2_norm_clip_of(state)
      fraction = 0.5 - jnp.log(after / before) / eta
      return state, (fraction - 0.5) * m - 1.0   # minus the exact count sum(1 - 1/2)
    return jax.lax.scan(body, state, None, length=steps)[1]

  count_noise = np.asarray(counts(tx.init(params)), np.float64) / s
  lo, hi = stats.chi2.ppf([5e-7, 1 - 5e-7], steps)
  assert lo < np.sum(count_noise ** 2) < hi


def test_adaptive_count_moves_by_one_half_and_the_noise_split_composes_to_z():
  """The count's sensitivity, measured: adding or removing one real example
  (masking it in or out, on the fast path) moves the unclipped count by
  exactly 1/2, up for an unclipped example and down for a clipped one (both
  seen). So the count with noise std s is a Gaussian mechanism of noise
  multiplier s / (1/2) = 2s, and `noise_split(z, .)` must give the gradients
  the sigma that composes with it to z: (sigma^-2 + (2s)^-2)^-1/2 = z (Andrew
  et al. 2021, Theorem 1), here checked with the measured sensitivity, for
  given and default (expected_batch_size / 20) count stds. A split made at
  sensitivity 1 ((z^-2 - s^-2)^-1/2) composes to another z (2e-3 off at the
  doctest's z = 1, s = 12.8; undefined for s <= z)."""
  clip = optax_dp.AdaptiveClip(1.0)
  grad_fn = jax.jit(optax_dp.clipped_grads(lambda w, x: jnp.mean(x @ w), clip))
  rows = _norm_rows(jax.random.key(8), 12, 4, 1.0)   # norms around C = 1
  norms = np.asarray(jnp.linalg.norm(rows, axis=1))
  assert 0 < np.sum(norms <= 1.0) < 12
  base = np.ones(12, bool)
  base[-1] = False                                      # a padding row

  def count(mask):
    return float(grad_fn(jnp.zeros(4), rows, jnp.asarray(mask), l2_norm_clip=1.0).unclipped_count)

  full = count(base)
  moves = []
  for i in range(12):
    neighbour = base.copy()
    neighbour[i] = not neighbour[i]     # remove a real example, or add the padding row's
    moves.append((count(neighbour) - full) * (1 if neighbour[i] else -1))
  want = np.where(norms <= 1.0, 0.5, -0.5)   # the example's own contribution
  np.testing.assert_array_equal(moves, want)
  sensitivity = max(abs(m) for m in moves)
  assert sensitivity == 0.5

  for z, s, m in [(1.0, None, 256), (1.0, 12.8, 100), (1.0, 0.55, 100), (1.0, 2.0, 100),
                  (0.5, 0.3, 64), (3.0, None, 64), (0.8, 50.0, 1000)]:
    sigma, count_std = optax_dp.AdaptiveClip(1.0, count_noise_stddev=s).noise_split(z, m)
    assert count_std == (m / 20 if s is None else s)
    effective = (sigma ** -2 + (sensitivity / count_std) ** 2) ** -0.5
    assert effective == pytest.approx(z, rel=1e-12), (z, s, m, sigma)


@pytest.mark.parametrize("count_std", [0.55, 2.0])
def test_adaptive_gradient_and_count_noise_at_a_small_count_noise_stddev(count_std):
  """Where the count takes a large share of z the split matters: at z = 1,
  s = 0.55 the gradients need sigma = (1 - 1.1^-2)^-1/2 = 2.40 (noise at z
  instead would be 0.17x the variance), at s = 2 sigma = 1.033 (a split at
  count sensitivity 1 would give 1.155: 1.25x the variance). 400 steps on
  zero gradients (2 examples, both unclipped) of 100 coordinates: the
  gradient noise over its 40000 draws, each scaled by that step's clip
  (read from the state), and the count noise read back from the clip
  updates (400 draws): each a chi-square band of false-alarm probability
  1e-6 (two-sided, 5e-7 a side); the gradient band is +-5% of the variance."""
  z, m, c0, eta, d, steps = 1.0, 100, 0.5, 0.2, 100, 400
  sigma = (z ** -2 - (2 * count_std) ** -2) ** -0.5
  clip = optax_dp.AdaptiveClip(c0, target_quantile=0.5, learning_rate=eta,
                               count_noise_stddev=count_std)
  tx = optax_dp.dp_aggregate(clip, z, key=23, expected_batch_size=m)
  params = {"w": jnp.zeros(d)}
  # Two examples of norm 1e-3 (both unclipped: count sum(1 - 1/2) = 1
  # exactly) whose gradients cancel, so the released sum is the noise alone.
  # (Not zero rows: an all-zero per-example row is padding, no example.)
  zeros = {"w": jnp.zeros((2, d)).at[0, 0].set(1e-3).at[1, 0].set(-1e-3)}

  @jax.jit
  def run(state):
    def body(state, _):
      before = optax_dp.l2_norm_clip_of(state)
      out, state = tx.update(zeros, state, params)
      after = optax_dp.l2_norm_clip_of(state)
      fraction = 0.5 - jnp.log(after / before) / eta
      return state, (out["w"] * m / before, (fraction - 0.5) * m - 1.0)
    return jax.lax.scan(body, state, None, length=steps)[1]

  grad_noise, count_noise = (np.asarray(a, np.float64) for a in run(tx.init(params)))
  lo, hi = stats.chi2.ppf([5e-7, 1 - 5e-7], steps * d)
  ratio = np.sum((grad_noise / sigma) ** 2) / (steps * d)
  assert lo / (steps * d) < ratio < hi / (steps * d), (
      f"gradient noise variance {ratio:.3f}x (sigma C)^2, sigma = {sigma:.4f}")
  lo, hi = stats.chi2.ppf([5e-7, 1 - 5e-7], steps)
  assert lo < np.sum((count_noise / count_std) ** 2) < hi


def test_adaptive_noise_follows_the_current_clip_as_it_grows():
  """The gradient noise of each step is sigma times THAT step's clip norm
  (the state's), not the initial one. Every example is clipped (norm 1000,
  in +- pairs, so the clipped sum is 0 off the first coordinate), so with
  target quantile 0.9 and learning rate 1 the clip grows by
  exp(0.9 +- s/m) per step, s/m = 0.05: after 4 updates by more than e^3 =
  20x at 6 sd. Each of 6 steps' noise (3999 coordinates), scaled by sigma C
  of the clip the step used, is in its chi-square band (false alarm 1e-6 in
  all: 1e-6 / 6 a step, two-sided, +-12% of the variance); noise scaled by
  the initial clip is 0.17x that variance from step 2 on."""
  z, m, c0, q, eta, d, steps = 1.0, 64, 0.05, 0.9, 1.0, 4000, 6
  sigma = (z ** -2 - (2 * m / 20) ** -2) ** -0.5      # the default count std m / 20
  clip = optax_dp.AdaptiveClip(c0, target_quantile=q, learning_rate=eta)
  tx = optax_dp.dp_aggregate(clip, z, key=31, expected_batch_size=m)
  params = {"w": jnp.zeros(d)}
  rows = {"w": jnp.zeros((m, d)).at[:, 0].set(jnp.where(jnp.arange(m) % 2 == 0, 1e3, -1e3))}
  update = jax.jit(tx.update)
  state = tx.init(params)
  lo, hi = stats.chi2.ppf([5e-7 / steps, 1 - 5e-7 / steps], d - 1)
  clips = []
  for _ in range(steps):
    before = float(optax_dp.l2_norm_clip_of(state))
    clips.append(before)
    out, state = update(rows, state, params)
    noise = np.asarray(out["w"][1:], np.float64) * m / (sigma * before)
    ratio = np.sum(noise ** 2) / (d - 1)
    assert lo / (d - 1) < ratio < hi / (d - 1), (
        f"step {len(clips)}: clip {before:.4g} (initial {c0}), noise variance "
        f"{ratio:.4f}x (sigma C)^2")
  assert clips[0] == pytest.approx(c0)
  assert clips[4] > 20 * c0, clips


@pytest.mark.slow
def test_adaptive_epsilon_is_the_composition_of_both_mechanisms():
  """A budget's epsilon for the effective z equals, computed here with
  dp_accounting, the PLD of T Poisson-subsampled Gaussian mechanisms whose
  noise multiplier combines the gradients' sigma and the count's 2s (one
  mechanism per step on the same batch: sensitivities C and 1/2). Composing
  the two mechanisms separately is a different (looser) bound, and the
  gradient noise alone would claim a smaller epsilon (the count's cost)."""
  n, m, steps, delta, s = 60000, 256, 400, 1e-5, 256 / 20
  sampler = optax_dp.PoissonSampler(n, m)
  budget = optax_dp.privacy_budget(sampler=sampler, target_epsilon=2.0, target_delta=delta,
                                   steps=steps)
  z = budget.noise_multiplier
  sigma = (z ** -2 - (2 * s) ** -2) ** -0.5
  effective = (sigma ** -2 + (2 * s) ** -2) ** -0.5
  assert effective == pytest.approx(z, rel=1e-12)

  def pld(*multipliers):
    acc = dp_accounting.pld.PLDAccountant()
    for mult in multipliers:
      acc.compose(dp_accounting.PoissonSampledDpEvent(
          m / n, dp_accounting.GaussianDpEvent(mult)), steps)
    return acc.get_epsilon(delta)

  assert budget.epsilon() == pytest.approx(pld(effective), rel=1e-3)
  assert pld(sigma) < budget.epsilon()   # the count is paid for
  # The transform built from that budget splits z as above.
  tx = optax_dp.dp_aggregate(optax_dp.AdaptiveClip(1.0), key=0, budget=budget)
  params = {"w": jnp.zeros(20000)}
  out, _ = jax.jit(tx.update)({"w": jnp.zeros((1, 20000))}, tx.init(params), params)
  measured = float(jnp.std(out["w"])) * m
  assert measured == pytest.approx(sigma, rel=6 * math.sqrt(1 / (2 * 20000)))


def test_adaptive_resumes_bitwise():
  """The clip norm is optimizer state: 4 steps equal 2 steps, a numpy round
  trip of the whole state and a rebuilt transform, then 2 more (updates and
  clip bit for bit). (dp_accumulate with an adaptive clip: test_accumulate.py,
  test_k_physical_batches_equal_one_logical_batch.)"""
  clip = optax_dp.AdaptiveClip(0.5, target_quantile=0.5)
  make = lambda: optax.chain(optax_dp.dp_aggregate(clip, 1.0, key=4, expected_batch_size=64),  # noqa: E731
                             optax.sgd(0.1))
  grad_fn = jax.jit(optax_dp.clipped_grads(lambda w, x: jnp.mean(x @ w), clip))
  w0 = jnp.zeros(8)
  data = [_norm_rows(jax.random.key(t), 64, 8, 0.5) for t in range(4)]

  def run(tx, state, w, batches):
    for rows in batches:
      u, state = tx.update(grad_fn(w, rows, l2_norm_clip=optax_dp.l2_norm_clip_of(state)),
                           state, w)
      w = optax.apply_updates(w, u)
    return state, w

  tx = make()
  straight, w_straight = run(tx, tx.init(w0), w0, data)
  half, w_half = run(tx, tx.init(w0), w0, data[:2])
  saved = jax.tree.map(np.asarray, (half, w_half))
  tx2 = make()
  resumed, w_resumed = run(tx2, jax.tree.map(jnp.asarray, saved[0]), jnp.asarray(saved[1]),
                           data[2:])
  np.testing.assert_array_equal(w_straight, w_resumed)
  assert float(optax_dp.l2_norm_clip_of(straight)) == float(optax_dp.l2_norm_clip_of(resumed))
  assert float(optax_dp.l2_norm_clip_of(straight)) != 0.5


def test_adaptive_refusals():
  clip = optax_dp.AdaptiveClip(1.0)
  grad_fn = optax_dp.clipped_grads(lambda w, x: jnp.mean(x @ w), clip)
  tx = optax_dp.dp_aggregate(clip, 1.0, key=0, expected_batch_size=100)
  w = jnp.zeros(2)
  state = tx.init(w)
  x = jnp.ones((3, 2))
  with pytest.raises(ValueError, match="pass the current clip norm"):
    grad_fn(w, x)
  with pytest.raises(ValueError, match="fixed l2_norm_clip"):
    optax_dp.clipped_grads(lambda w, x: jnp.mean(x @ w), 1.0)(w, x, l2_norm_clip=1.0)
  stale = grad_fn(w, x, l2_norm_clip=0.5)
  with pytest.raises(optax_dp.AdaptiveClipMismatchError, match="another clip norm"):
    tx.update(stale, state, w)
  with pytest.raises(Exception, match="another clip norm"):   # inside jit: a callback
    jax.jit(tx.update)(stale, state, w)
  with pytest.raises(ValueError, match="must exceed noise_multiplier / 2"):
    optax_dp.dp_aggregate(clip, 1.0, key=0, expected_batch_size=10)
  with pytest.raises(ValueError, match="needs expected_batch_size"):
    optax_dp.dp_aggregate(clip, 1.0, key=0)
  with pytest.raises(ValueError, match="not an adaptive one"):
    optax_dp.l2_norm_clip_of(optax_dp.dp_aggregate(1.0, 1.0, key=0).init(w))
  with pytest.raises(ValueError, match="target_quantile"):
    optax_dp.AdaptiveClip(1.0, target_quantile=1.0)
  with pytest.raises(ValueError, match="DP-BandMF"):
    optax_dp.dp_aggregate(clip, 1.0, key=0, expected_batch_size=100,
                          noise_strategy=optax_dp.bandmf_strategy(5, 3))


@pytest.mark.slow
def test_audit_stays_consistent_with_adaptive_and_group_clipping():
  """The one-run canary audit (one canary per step, 400 steps) finds no
  violation of the per-step Gaussian claim for an adaptive clip (its norm
  moving under the canaries, the gradients' share of z) nor for groups
  (claimed at the total sensitivity)."""
  adaptive = optax_dp.audit.audit_transformation(
      lambda: optax_dp.dp_aggregate(optax_dp.AdaptiveClip(1.0), 1.0, jax.random.key(3),
                                    expected_batch_size=100),
      {"w": jnp.zeros(64)}, l2_norm_clip=1.0, noise_multiplier=1.0,
      num_canaries=400, fillers_per_step=2)
  groups = {"a": 0.6, "b": 0.8}
  grouped = optax_dp.audit.audit_transformation(
      lambda: optax_dp.dp_aggregate(groups, 1.0, jax.random.key(4), expected_batch_size=1),
      {"a": jnp.zeros(32), "b": jnp.zeros(32)}, l2_norm_clip=1.0, noise_multiplier=1.0,
      num_canaries=400, fillers_per_step=2)
  for report in (adaptive, grouped):
    assert report.steps == 400
    assert report.verdict == "consistent", report
    assert math.isfinite(report.epsilon_lower_bound)


def test_adaptive_count_ignores_padding_rows_on_the_per_example_path():
  """Per-example gradients carry no mask; their padding rows arrive zeroed.
  Counted as unclipped examples (+1/2 each), their number (which depends on
  the realised batch size) would move the count by 1 per example added or
  removed, twice the sensitivity the noise is calibrated for. The
  per-example path's count equals the fast path's (mask-aware) count."""
  clip = optax_dp.AdaptiveClip(1.0)
  loss = lambda w, x: jnp.mean(x @ w)
  w = jnp.zeros(3)
  x = jnp.array([[3.0, 0, 0], [0.1, 0, 0], [5.0, 0, 0], [7.0, 0, 0], [2.0, 0, 0]])
  for real in (1, 3, 5):   # real rows first, the rest padding
    mask = jnp.arange(5) < real
    fast = optax_dp.clipped_grads(loss, clip)(w, x, mask, l2_norm_clip=1.0)
    per_example = optax_dp.per_example_grads(loss)(w, x, mask)
    slow = optax_dp.clip_and_sum(per_example, clip, current_l2_norm_clip=1.0)
    # Real rows' norms 3, 0.1, 5, 7, 2 against C = 1: only the 0.1 is unclipped.
    want = sum(0.5 if n <= 1.0 else -0.5 for n in [3.0, 0.1, 5.0, 7.0, 2.0][:real])
    assert float(fast.unclipped_count) == want
    assert float(slow.unclipped_count) == want
