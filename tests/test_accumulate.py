"""dp_accumulate / clip_and_sum: virtual batches with noise once per logical batch."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import optax_dp

CLIP = 0.5
SIGMA = 1.0


def _loss(params, batch):
  x, y = batch
  pred = x @ params["w"] + params["b"]
  return jnp.mean(jnp.sum(jnp.square(pred - y), axis=-1))


def _params():
  return {"w": jnp.full((5, 3), 0.1, jnp.float32), "b": jnp.zeros((3,), jnp.float32)}


def _data(rows, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(rows, 5)).astype(np.float32)
  y = rng.normal(size=(rows, 3)).astype(np.float32) * 2
  return x, y


def _per_example(params, batch):
  return optax_dp.per_example_grads(_loss)(params, batch)


def _inner(key, expected_batch_size):
  return optax.chain(
      optax_dp.dp_aggregate(CLIP, SIGMA, key, expected_batch_size=expected_batch_size),
      optax.sgd(0.1, momentum=0.9))


def _dp_state(state):
  from optax_dp._lifecycle import _budget
  return _budget.find_dp_state(state)


# ---------------------------------------------------------------------------
# k physical batches = one logical batch: the property written once, for every
# clip kind (fixed, groups, adaptive) and noise kind (i.i.d., BandMF).
#
# dp_accumulate(tx, k) fed the clipped sums of k physical batches must release,
# at each k-th update, exactly what tx releases on their logical batch: the
# same clipped sum (one sensitivity), the same noise (one draw per logical
# batch, the same key and step), the same inner optimizer state (momentum
# 0.9: held updates may not reach it), and for an adaptive clip the same clip
# norm after each step (the privatised count holds the examples of that
# logical batch only). The noise is shared, so only float32 summation order
# separates the runs: rtol 1e-5 / atol 1e-6 on the updates (updates of size
# ~0.1; the summation error is ~16 * 6e-8 relative), rel 1e-6 on the clip (the
# count itself is a sum of halves, exact). A misaligned noise stream, noise
# added per physical batch, or a count carried into the next logical batch
# moves them far more (checked below: another key moves the parameters by
# > 1e-3; the adaptive counts are >= 2 in size).

ROWS, STEPS = 16, 3       # the logical batch (also the normaliser) and the logical steps
# The per-example norms of _data(48, seed=7) at _params() are 2.2 to 42 (w: 2
# to 39, b: 0.8 to 14): every clip below (the adaptive one from its start)
# clips some examples and not others, in each group.
CLIP_KINDS = {
    "fixed": 12.0,
    "groups": {"w": 10.0, "b": 5.0},     # a layer's kernel and bias in two groups
    "adaptive": optax_dp.AdaptiveClip(8.0, target_quantile=0.5, learning_rate=0.2),
}
# (clip, noise, k, route): every clip x noise kind at k = 2 through
# clipped_grads (but adaptive x BandMF, which dp_aggregate refuses:
# test_clip_norms.py's test_adaptive_refusals); fixed i.i.d. also at k = 1
# and 4 through per_example_grads + clip_and_sum.
ACCUMULATION_CASES = (
    [("fixed", "iid", k, "clip_and_sum") for k in (1, 2, 4)]
    + [(clip, noise, 2, "clipped_grads") for clip in CLIP_KINDS for noise in ("iid", "bandmf")
       if (clip, noise) != ("adaptive", "bandmf")])


def _logical_data():
  """48 rows (3 logical batches of 16), rows 5 and 30 padding (mask False)."""
  x, y = _data(ROWS * STEPS, seed=7)
  mask = np.ones(ROWS * STEPS, bool)
  mask[[5, 30]] = False
  return x, y, mask


def _clip_noise_tx(clip, noise, key):
  strategy = None
  if noise == "bandmf":
    pytest.importorskip("jax_privacy")
    # 6 steps, 3 of them run: each logical batch's noise is correlated with the last.
    strategy = optax_dp.bandmf_strategy(6, 3)
  return optax.chain(optax_dp.dp_aggregate(CLIP_KINDS[clip], SIGMA, key, expected_batch_size=ROWS,
                                           noise_strategy=strategy),
                     optax.sgd(0.1, momentum=0.9))


def _clip_noise_step(tx, clip, route):
  """A jitted step: (params, state, batch, mask) -> (params, state, updates, clipped)."""
  if route == "clip_and_sum":
    grad_fn = lambda p, batch, mask: optax_dp.clip_and_sum(  # noqa: E731
        optax_dp.per_example_grads(_loss)(p, batch, mask), CLIP_KINDS[clip])
  else:
    grad_fn = optax_dp.clipped_grads(_loss, CLIP_KINDS[clip])

  @jax.jit
  def step(params, state, batch, mask):
    if clip == "adaptive":
      clipped = grad_fn(params, batch, mask, l2_norm_clip=optax_dp.l2_norm_clip_of(state))
    else:
      clipped = grad_fn(params, batch, mask)
    updates, state = tx.update(clipped, state, params)
    return optax.apply_updates(params, updates), state, updates, clipped
  return step


@functools.lru_cache(maxsize=None)
def _logical_run(clip, noise, route, key):
  """STEPS plain (unaccumulated) steps on the logical batches: the updates,
  the clip norm after each step (adaptive), the unclipped counts, the params."""
  x, y, mask = _logical_data()
  tx = _clip_noise_tx(clip, noise, key)
  step = _clip_noise_step(tx, clip, route)
  params, state = _params(), tx.init(_params())
  updates, clips, counts = [], [], []
  for t in range(STEPS):
    rows = slice(ROWS * t, ROWS * (t + 1))
    params, state, u, clipped = step(params, state, (x[rows], y[rows]), mask[rows])
    updates.append(u)
    if clip == "adaptive":
      clips.append(float(optax_dp.l2_norm_clip_of(state)))
      counts.append(float(clipped.unclipped_count))
  return updates, clips, counts, params


@pytest.mark.parametrize("clip,noise,k,route", [   # BandMF (jax_privacy's optimisation): slow
    pytest.param(*case, id="{}-{}-k{}-{}".format(*case),
                 marks=pytest.mark.slow if case[1] == "bandmf" else ())
    for case in ACCUMULATION_CASES])
def test_k_physical_batches_equal_one_logical_batch(clip, noise, k, route):
  want_updates, want_clips, counts, want = _logical_run(clip, noise, route, 3)
  x, y, mask = _logical_data()
  tx = optax_dp.dp_accumulate(_clip_noise_tx(clip, noise, 3), k)
  step = _clip_noise_step(tx, clip, route)
  params, state = _params(), tx.init(_params())
  phys = ROWS // k
  for t in range(STEPS):
    for j in range(k):
      rows = slice(ROWS * t + phys * j, ROWS * t + phys * (j + 1))
      params, state, u, _ = step(params, state, (x[rows], y[rows]), mask[rows])
      if j < k - 1:                       # held: exactly zero, nothing released
        for leaf in jax.tree.leaves(u):
          assert not np.any(np.asarray(leaf)), f"logical step {t + 1}, physical {j + 1}"
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(want_updates[t])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"logical step {t + 1}")
    if clip == "adaptive":
      assert float(optax_dp.l2_norm_clip_of(state)) == pytest.approx(
          want_clips[t], rel=1e-6), f"logical step {t + 1}"
      assert float(state.unclipped_count) == 0.0     # the count starts afresh
  assert int(_dp_state(state).step) == STEPS and int(state.micro_step) == 0
  for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)

  # The noise dominates the difference between runs: a misaligned noise stream
  # cannot pass the comparisons above.
  other = _logical_run(clip, noise, route, 4)[3]
  gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in
            zip(jax.tree.leaves(other), jax.tree.leaves(want)))
  assert gap > 1e-3
  if clip == "adaptive":   # a count carried over into the next logical batch would show
    assert all(abs(c) >= 2 for c in counts[:2]), counts


def _per_device(clipped):
  """What sharded_clipped_grads(..., reduce=False) returns on a one-device mesh."""
  return dataclasses.replace(
      clipped, clipped_sum=jax.tree.map(lambda s: s[None], clipped.clipped_sum),
      nonfinite_examples=clipped.nonfinite_examples[None], unreduced_axis="data")


@pytest.mark.parametrize("per_device", [False, True])
def test_noise_is_added_once_per_logical_batch(per_device):
  """`per_device`: per-device sums accumulated by dp_accumulate(mesh=) (one
  device here; 8 in test_multi_device.py's
  test_noise_of_accumulated_per_device_sums_is_added_once_per_logical_batch)."""
  k, normaliser, n_a, n_b = 4, 16, 60_000, 40_000
  params = {"a": jnp.zeros((n_a,)), "b": jnp.zeros((n_b,))}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)) if per_device else None
  tx = optax_dp.dp_accumulate(
      optax_dp.dp_aggregate(CLIP, SIGMA, jax.random.key(0), expected_batch_size=normaliser), k,
      mesh=mesh)
  zeros = {"a": jnp.zeros((2, n_a)), "b": jnp.zeros((2, n_b))}
  layout = _per_device if per_device else lambda clipped: clipped
  update = jax.jit(lambda g, s: tx.update(layout(optax_dp.clip_and_sum(g, CLIP)), s, params))
  state = tx.init(params)
  released = []
  for i in range(2 * k):
    out, state = update(zeros, state)
    assert int(state.micro_step) == (i + 1) % k
    assert int(_dp_state(state).step) == (i + 1) // k
    if (i + 1) % k:
      for leaf in jax.tree.leaves(out):                      # hold: exactly zero
        assert not np.any(np.asarray(leaf))
    else:
      released.append(out)
  assert not np.array_equal(released[0]["a"], released[1]["a"])
  # Each released coordinate is (noise on the logical sum) / L with noise
  # std sigma*C, i.e. sigma*C/L * z, z iid N(0,1) (noise added k times would
  # give sqrt(k) = 2 times that). With the mean known to be 0,
  # S = sum(out^2) / (sigma*C/L)^2 is chi-square with n = 2 * 100_000 degrees
  # of freedom; accept S within its 5e-7 and 1 - 5e-7 quantiles (false alarm
  # 1e-6; about +-1.2% on the std).
  n = 2 * (n_a + n_b)
  std = SIGMA * CLIP / normaliser
  s = sum(float(np.sum(np.square(np.asarray(x, np.float64))))
          for out in released for x in jax.tree.leaves(out)) / std ** 2
  assert stats.chi2.ppf(5e-7, n) < s < stats.chi2.isf(5e-7, n)


# Eager dp_accumulate updates run op by op (slow on CPU): keep that run short.
@pytest.mark.parametrize("jit,max_steps,k", [(False, 1, 2), (True, 4, 3)])
def test_accountant_sees_logical_steps_and_guard_fires(jit, max_steps, k):
  sampler = optax_dp.PoissonSampler(dataset_size=1000, expected_batch_size=50)
  budget = optax_dp.privacy_budget(sampler=sampler, target_delta=1e-5,
                                   noise_multiplier=1.0, steps=max_steps,
                                   accountant="rdp")
  tx = optax_dp.dp_accumulate(
      optax.chain(optax_dp.dp_aggregate(CLIP, key=1, budget=budget), optax.sgd(0.1)), k)
  params = _params()
  x, y = _data(4)
  grads = optax_dp.clip_and_sum(_per_example(params, (x, y)), CLIP)
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  for u in range(1, budget.max_steps * k + k):       # max_steps released, k-1 held
    out, state = update(grads, state, params)
    jax.block_until_ready(out)
    assert budget.steps_taken(state) == u // k
    assert budget.epsilon_spent(state) == budget.epsilon(u // k)
  assert int(state.micro_step) == k - 1
  # The next update releases logical step max_steps + 1: refused, with the
  # budget's own exception outside jit, from a host callback inside it.
  if not jit:
    with pytest.raises(optax_dp.PrivacyBudgetExceededError, match="refusing step"):
      update(grads, state, params)
  else:
    with pytest.raises(Exception) as info:
      out, _ = update(grads, state, params)
      jax.block_until_ready(out)
    assert "PrivacyBudgetExceededError" in str(info.value)


def test_replayed_state_is_refused_through_dp_accumulate():
  params = _params()
  clipped = optax_dp.clip_and_sum(_per_example(params, _data(4)), CLIP)
  ours = optax_dp.dp_accumulate(_inner(1, 8), 2)
  theirs = optax_dp.dp_accumulate(_inner(2, 8), 2)
  _, held = theirs.update(clipped, theirs.init(params), params)   # micro_step 1
  with pytest.raises(optax_dp.NoiseReplayError):
    ours.update(clipped, held, params)
  with pytest.raises(Exception) as info:
    jax.block_until_ready(jax.jit(ours.update)(clipped, held, params))
  assert "NoiseReplayError" in str(info.value)
  # A consistent state of this run is accepted, eagerly and under jit alike.
  _, mine = ours.update(clipped, ours.init(params), params)
  eager, eager_state = ours.update(clipped, mine, params)
  jitted, jitted_state = jax.jit(ours.update)(clipped, mine, params)
  for a, b in zip(jax.tree.leaves((eager, eager_state)), jax.tree.leaves((jitted, jitted_state))):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [2, 4])
def test_fast_path_sampler_chunks_in_trainstate_equal_logical_batches(k):
  from flax.training import train_state

  import models

  model = models.SmallCNN(3, 3)
  n, expected, steps, seed = 40, 6, 3, 5
  rng = np.random.default_rng(1)
  data = (rng.normal(size=(n, 5, 5, 1)).astype(np.float32), rng.integers(0, 3, n))
  params = model.init(jax.random.key(0), data[0][:1])["params"]
  sampler = optax_dp.PoissonSampler(dataset_size=n, expected_batch_size=expected)
  budget = optax_dp.privacy_budget(sampler=sampler, target_delta=1e-5,
                                   noise_multiplier=SIGMA, steps=steps, accountant="rdp")

  def loss_fn(p, batch):
    xb, yb = batch
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, xb), yb).mean()

  grad_fn = optax_dp.clipped_grads(loss_fn, CLIP, method="auto")

  def run(accumulation_steps):
    tx = optax.chain(optax_dp.dp_aggregate(CLIP, key=9, budget=budget),
                     optax.sgd(0.1, momentum=0.9))
    if accumulation_steps > 1:
      tx = optax_dp.dp_accumulate(tx, accumulation_steps)
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    @jax.jit
    def train_step(state, batch, mask):
      return state.apply_gradients(grads=grad_fn(state.params, batch, mask))

    seen = []
    for b in sampler.batches(seed, steps=steps, accumulation_steps=accumulation_steps):
      seen.append(b.indices[b.mask])
      state = train_step(state, optax_dp.gather_batch(data, b), b.mask)
    return state, np.sort(np.concatenate(seen))

  want, want_seen = run(1)
  got, got_seen = run(k)
  np.testing.assert_array_equal(got_seen, want_seen)   # the same examples
  assert int(got.step) == steps * k and int(want.step) == steps
  assert budget.steps_taken(got) == budget.steps_taken(want) == steps
  assert budget.epsilon_spent(got) == budget.epsilon_spent(want)
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(want.params), jax.tree.leaves(params)))
  assert moved > 1e-3


def test_raw_per_example_grads_are_refused():
  params = _params()
  tx = optax_dp.dp_accumulate(_inner(0, 8), 2)
  grads = _per_example(params, _data(4))
  with pytest.raises(ValueError, match="ClippedGrads"):
    tx.update(grads, tx.init(params), params)
  with pytest.raises(ValueError, match="ClippedGrads"):
    jax.jit(tx.update)(grads, tx.init(params), params)


def test_mismatched_clipped_sum_tree_is_refused():
  params = _params()
  tx = optax_dp.dp_accumulate(_inner(0, 8), 2)
  clipped = optax_dp.clip_and_sum({"w": jnp.ones((4, 5, 3))}, CLIP)
  with pytest.raises(ValueError, match="does not match params"):
    tx.update(clipped, tx.init(params), params)


@pytest.mark.parametrize("kind", ["per_example", "clipped"])
def test_naive_multisteps_raises_instead_of_running(kind):
  params = _params()
  tx = optax.MultiSteps(_inner(0, 8), 2)
  grads = _per_example(params, _data(4))
  if kind == "clipped":
    grads = optax_dp.clip_and_sum(grads, CLIP)
  state = tx.init(params)
  with pytest.raises(ValueError):
    tx.update(grads, state, params)
  with pytest.raises(ValueError):
    jax.jit(tx.update)(grads, state, params)


def test_nonfinite_examples_are_counted_per_logical_batch():
  params = _params()
  tx = optax_dp.dp_accumulate(_inner(0, 8), 2)
  grads = _per_example(params, _data(4))
  poisoned = jax.tree.map(lambda g: g.at[1].set(jnp.nan), grads)
  state = tx.init(params)
  out, state = tx.update(optax_dp.clip_and_sum(poisoned, CLIP), state, params)
  assert int(state.nonfinite_examples) == 1 and int(_dp_state(state).nonfinite_examples) == 0
  out, state = tx.update(optax_dp.clip_and_sum(grads, CLIP), state, params)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))
  assert int(state.nonfinite_examples) == 0 and int(_dp_state(state).nonfinite_examples) == 1


def _numpy_clipped_sum(tree, clip):
  """Independent reference: flatten each example, clip in float64, sum."""
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
  flat = np.concatenate([x.reshape(x.shape[0], -1) for x in leaves], axis=1)
  norms = np.linalg.norm(flat, axis=1)
  factors = np.where(np.isfinite(norms), np.minimum(1.0, clip / np.maximum(norms, 1e-300)), 0.0)
  return [np.tensordot(factors, np.nan_to_num(x), axes=1) for x in leaves], norms


def test_clip_and_sum_is_dp_aggregate_clipping():
  clip = 10.0
  params = _params()
  grads = _per_example(params, _data(8, seed=2))
  grads = jax.tree.map(lambda g: g.at[3].set(jnp.inf), grads)
  want, norms = _numpy_clipped_sum(grads, clip)
  finite = norms[np.isfinite(norms)]
  assert np.sum(finite > clip) >= 2 and np.sum(finite < clip) >= 2   # both regimes

  clipped = optax_dp.clip_and_sum(grads, clip)
  assert clipped.batch_size == 8 and clipped.l2_norm_clip == clip
  assert int(clipped.nonfinite_examples) == 1
  for got, ref in zip(jax.tree.leaves(clipped.clipped_sum), want):
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-5, atol=1e-6)

  # dp_aggregate without noise and normaliser 1 is the clipped sum itself.
  with pytest.warns(UserWarning, match="NOT differentially private"):
    plain = optax_dp.dp_aggregate(clip, 0.0, 0, expected_batch_size=1)
  out, state = plain.update(grads, plain.init(params), params)
  assert int(state.nonfinite_examples) == 1
  for got, ref in zip(jax.tree.leaves(out), jax.tree.leaves(clipped.clipped_sum)):
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)

  # With noise: per-example gradients and their clip_and_sum give the same update.
  noisy = optax_dp.dp_aggregate(clip, SIGMA, 4, expected_batch_size=8)
  a, sa = noisy.update(grads, noisy.init(params), params)
  b, sb = noisy.update(clipped, noisy.init(params), params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert int(sa.nonfinite_examples) == int(sb.nonfinite_examples) == 1

  # A sum clipped at another norm does not match dp_aggregate's sensitivity.
  with pytest.raises(ValueError, match="l2_norm_clip"):
    noisy.update(optax_dp.clip_and_sum(grads, 2 * clip), noisy.init(params), params)


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_bad_accumulation_steps_raise(k):
  with pytest.raises(ValueError, match="accumulation_steps"):
    optax_dp.dp_accumulate(_inner(0, 8), k)


def test_accumulated_batch_needs_a_public_normaliser():
  # Physical chunks may have different (padded) sizes, so "k times the last
  # chunk's size" is not a public constant: without expected_batch_size (or a
  # budget) it is refused, already at the first physical batch (the release
  # branch is traced then), eagerly and under jit.
  params = {"w": jnp.zeros((3,))}
  inner = optax.chain(optax_dp.dp_aggregate(1.0, 1.0, 0), optax.sgd(0.1))
  tx = optax_dp.dp_accumulate(inner, 2)
  chunk = optax_dp.clip_and_sum({"w": jnp.ones((4, 3))}, 1.0)
  for update in (tx.update, jax.jit(tx.update)):
    with pytest.raises(ValueError, match="expected_batch_size"):
      update(chunk, tx.init(params), params)
