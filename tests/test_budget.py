"""privacy_budget / PrivacyBudget, the budget guard in dp_aggregate, and the
noise-key ledger (NoiseReplayError)."""


import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import optax_dp
from optax_dp._core import _checks

DELTA = 1e-5
# q = 50 / 1000 = 0.05.
SAMPLER = optax_dp.PoissonSampler(dataset_size=1000, expected_batch_size=50)


def _budget(max_steps=3, sigma=1.0, accountant="rdp", sampler=SAMPLER):
  return optax_dp.privacy_budget(sampler=sampler, target_delta=DELTA,
                                 noise_multiplier=sigma, steps=max_steps,
                                 accountant=accountant)


def _grads(batch=4, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(batch, 3, 2)) * scale, jnp.float32),
          "b": jnp.asarray(rng.normal(size=(batch, 2)) * scale, jnp.float32)}


def _params():
  return {"w": jnp.zeros((3, 2)), "b": jnp.zeros((2,))}


def _all_finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def _all_nan(tree):
  return all(bool(np.all(np.isnan(np.asarray(x)))) for x in jax.tree.leaves(tree))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------
# privacy_budget's three modes


def test_epsilon_and_steps_calibrate_the_noise():
  budget = optax_dp.privacy_budget(sampler=SAMPLER, target_delta=DELTA,
                                   target_epsilon=2.0, steps=20)
  assert budget.max_steps == 20
  assert budget.accountant == "pld"           # the Poisson sampler's default
  assert budget.target_epsilon == 2.0
  assert budget.epsilon() <= 2.0
  assert budget.epsilon() == optax_dp.compute_epsilon(
      budget.noise_multiplier, DELTA, steps=20, sampler=SAMPLER, accountant="pld")
  # The calibration is the public one, and tight: 1% less noise (10x the 0.1%
  # calibrate_noise_multiplier promises) overspends the target.
  assert budget.noise_multiplier == optax_dp.calibrate_noise_multiplier(
      2.0, DELTA, steps=20, sampler=SAMPLER)
  assert optax_dp.compute_epsilon(0.99 * budget.noise_multiplier, DELTA, steps=20,
                                  sampler=SAMPLER) > 2.0


@pytest.mark.parametrize("accountant,target", [("rdp", 2.0), ("pld", 1.0)])
def test_noise_and_epsilon_give_the_largest_step_count(accountant, target):
  budget = optax_dp.privacy_budget(sampler=SAMPLER, target_delta=DELTA,
                                   target_epsilon=target, noise_multiplier=1.5,
                                   accountant=accountant)
  assert budget.noise_multiplier == 1.5
  assert budget.accountant == accountant
  assert budget.max_steps > 1
  eps = lambda steps: optax_dp.compute_epsilon(1.5, DELTA, steps=steps, sampler=SAMPLER,
                                               accountant=accountant)
  assert eps(budget.max_steps) <= target < eps(budget.max_steps + 1)
  assert budget.epsilon() == eps(budget.max_steps)


def test_noise_and_steps_fix_the_step_count():
  budget = _budget(max_steps=37, sigma=1.2, accountant="rdp")
  assert (budget.max_steps, budget.noise_multiplier) == (37, 1.2)
  assert budget.target_epsilon is None
  assert budget.epsilon() == optax_dp.compute_epsilon(
      1.2, DELTA, steps=37, sampler=SAMPLER, accountant="rdp")


@pytest.mark.parametrize("kwargs", [
    {},
    {"target_epsilon": 1.0},
    {"steps": 10},
    {"noise_multiplier": 1.0},
    {"target_epsilon": 1.0, "steps": 10, "noise_multiplier": 1.0},
])
def test_needs_exactly_two_of_epsilon_steps_noise(kwargs):
  with pytest.raises(ValueError, match="exactly two"):
    optax_dp.privacy_budget(sampler=SAMPLER, target_delta=DELTA, **kwargs)


@pytest.mark.parametrize("other", [{"steps": 10}, {"target_epsilon": 1.0}])
def test_zero_noise_budget_raises(other):
  with pytest.raises(ValueError, match="noise"):
    optax_dp.privacy_budget(sampler=SAMPLER, target_delta=DELTA, noise_multiplier=0.0,
                            accountant="rdp", **other)


def test_noise_too_small_for_even_one_step_raises():
  # sigma = 0.3 at q = 0.05 spends far more than epsilon 0.1 in one step.
  assert optax_dp.compute_epsilon(0.3, DELTA, steps=1, sampler=SAMPLER,
                                  accountant="rdp") > 0.1
  with pytest.raises(ValueError, match="one step"):
    optax_dp.privacy_budget(sampler=SAMPLER, target_delta=DELTA, target_epsilon=0.1,
                            noise_multiplier=0.3, accountant="rdp")


# ----------------------------------------------------------------------------
# epsilon / epsilon_spent


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_is_compute_epsilon_and_zero_at_zero_steps(accountant):
  budget = _budget(max_steps=30, sigma=1.1, accountant=accountant)
  assert budget.epsilon(0) == 0.0
  previous = 0.0
  for steps in (1, 7, 30):
    want = optax_dp.compute_epsilon(1.1, DELTA, steps=steps, sampler=SAMPLER,
                                    accountant=accountant)
    assert budget.epsilon(steps) == want
    assert want > previous
    previous = want


def test_epsilon_spent_reads_the_step_counter_of_an_opt_state():
  budget = _budget(max_steps=10)
  tx = optax.chain(optax_dp.dp_aggregate(1.0, key=0, budget=budget), optax.sgd(0.1))
  params = _params()
  state = tx.init(params)
  assert budget.steps_taken(state) == 0 and budget.epsilon_spent(state) == 0.0
  update = jax.jit(tx.update)
  for _ in range(3):
    _, state = update(_grads(), state, params)
  assert budget.steps_taken(state) == 3
  assert budget.epsilon_spent(state) == optax_dp.compute_epsilon(
      1.0, DELTA, steps=3, sampler=SAMPLER, accountant="rdp")


def test_epsilon_spent_reads_a_flax_trainstate():
  from flax.training import train_state

  budget = _budget(max_steps=10)
  tx = optax.chain(optax_dp.dp_aggregate(1.0, key=0, budget=budget), optax.sgd(0.1))
  state = train_state.TrainState.create(apply_fn=None, params=_params(), tx=tx)
  apply = jax.jit(lambda s, g: s.apply_gradients(grads=g))
  for _ in range(2):
    state = apply(state, _grads())
  assert int(state.step) == 2
  assert budget.steps_taken(state) == 2
  assert budget.epsilon_spent(state) == budget.epsilon(2) > 0


def test_epsilon_spent_reads_through_dp_accumulate():
  budget = _budget(max_steps=10)
  tx = optax_dp.dp_accumulate(
      optax.chain(optax_dp.dp_aggregate(1.0, key=0, budget=budget), optax.sgd(0.1)), 2)
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(5):                                  # 2 logical steps + 1 held
    _, state = update(optax_dp.clip_and_sum(_grads(), 1.0), state, params)
  assert budget.steps_taken(state) == 2
  assert budget.epsilon_spent(state) == budget.epsilon(2)


def test_epsilon_spent_needs_exactly_one_dp_state():
  budget = _budget()
  params = _params()
  with pytest.raises(ValueError, match="found 0"):
    budget.epsilon_spent(optax.sgd(0.1, momentum=0.9).init(params))
  two = optax.chain(optax_dp.dp_aggregate(1.0, 1.0, 0), optax_dp.dp_aggregate(1.0, 1.0, 1))
  with pytest.raises(ValueError, match="found 2"):
    budget.epsilon_spent(two.init(params))


# ----------------------------------------------------------------------------
# The budget guard


@pytest.mark.parametrize("jit", [False, True])
def test_guard_refuses_the_step_after_max_steps(jit):
  tx = optax_dp.dp_aggregate(1.0, key=0, budget=_budget(max_steps=3))
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(None)
  for i in range(3):
    out, state = update(_grads(seed=i), state)
    jax.block_until_ready(out)
    assert _all_finite(out)
  assert int(state.step) == 3
  if not jit:
    with pytest.raises(optax_dp.PrivacyBudgetExceededError, match="allows 3 noisy steps"):
      update(_grads(seed=3), state)
  else:
    with pytest.raises(Exception) as info:
      out, _ = update(_grads(seed=3), state)
      jax.block_until_ready(out)
    assert "PrivacyBudgetExceededError" in str(info.value)
    assert "allows 3 noisy steps" in str(info.value)


@pytest.mark.parametrize("jit", [False, True])
def test_guard_refuses_the_step_after_max_steps_of_a_user_level_run(jit):
  sampler = optax_dp.UserPoissonSampler(np.arange(60) // 3, expected_users=4,
                                        max_examples_per_user=2)
  budget = optax_dp.privacy_budget(sampler=sampler, target_epsilon=4.0, target_delta=1e-5,
                                   noise_multiplier=1.5)
  tx = optax_dp.dp_aggregate(1.0, key=0, budget=budget)
  grad_fn = optax_dp.clipped_grads(lambda w, x: jnp.mean(x @ w), 1.0)
  step = jax.jit(lambda g, s: tx.update(g, s)) if jit else tx.update
  x = np.random.default_rng(0).normal(size=(60, 3)).astype(np.float32)
  batches = sampler.batches(seed=0, steps=budget.max_steps + 1)
  state = tx.init(jnp.zeros(3))
  for _ in range(budget.max_steps):
    out, state = step(grad_fn(jnp.zeros(3), optax_dp.gather_batch(x, next(batches))), state)
  assert budget.epsilon_spent(state) == budget.epsilon() <= 4.0
  grads = grad_fn(jnp.zeros(3), optax_dp.gather_batch(x, next(batches)))
  assert grads.privacy_unit == "user"
  with pytest.raises(Exception) as info:
    jax.block_until_ready(step(grads, state))
  assert "PrivacyBudgetExceededError" in repr(info.value) + str(info.type)


def test_guard_fires_through_flax_trainstate_in_a_jitted_step():
  from flax.training import train_state

  import models

  model = models.MLP((4, 2))
  x = jax.random.normal(jax.random.key(0), (6, 3))
  y = jnp.arange(6) % 2
  params = model.init(jax.random.key(1), x[:1])["params"]

  def loss_fn(p, batch):
    xb, yb = batch
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, xb), yb).mean()

  budget = _budget(max_steps=3)
  tx = optax.chain(optax_dp.dp_aggregate(1.0, key=3, budget=budget),
                   optax.sgd(0.1, momentum=0.9))
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  grad_fn = optax_dp.per_example_grads(loss_fn)

  @jax.jit
  def step(state, batch):
    return state.apply_gradients(grads=grad_fn(state.params, batch))

  for _ in range(3):
    state = step(state, (x, y))
  assert budget.steps_taken(state) == 3 and _all_finite(state.params)
  with pytest.raises(Exception) as info:
    jax.block_until_ready(step(state, (x, y)))
  assert "PrivacyBudgetExceededError" in str(info.value)


@pytest.mark.parametrize("jit", [False, True])
def test_allow_budget_overrun_continues_and_epsilon_grows(jit):
  budget = _budget(max_steps=3)
  tx = optax_dp.dp_aggregate(1.0, key=0, budget=budget, allow_budget_overrun=True)
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(None)
  spent = []
  for i in range(6):
    out, state = update(_grads(seed=i), state)
    assert _all_finite(out)
    spent.append(budget.epsilon_spent(state))
  assert budget.steps_taken(state) == 6
  assert spent[2] == budget.epsilon()
  assert all(a < b for a, b in zip(spent, spent[1:]))
  assert spent[3] > budget.epsilon()


@pytest.mark.parametrize("jit", [False, True])
def test_refused_update_is_nan_where_callbacks_cannot_raise(monkeypatch, jit):
  # Simulate a platform where the host callback does nothing: the output itself
  # must then refuse to release the update.
  monkeypatch.setattr(_checks, "raise_if", lambda *args, **kwargs: None)
  tx = optax_dp.dp_aggregate(1.0, key=0, budget=_budget(max_steps=3))
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(None)
  for i in range(3):
    out, state = update(_grads(seed=i), state)
    assert _all_finite(out)
  out, state = update(_grads(seed=3), state)
  assert _all_nan(out)
  out, _ = update(_grads(seed=4), state)
  assert _all_nan(out)


def test_replayed_update_is_nan_where_callbacks_cannot_raise(monkeypatch):
  monkeypatch.setattr(_checks, "raise_if", lambda *args, **kwargs: None)
  a = optax_dp.dp_aggregate(1.0, 1.0, key=1)
  b = optax_dp.dp_aggregate(1.0, 1.0, key=2)
  _, state_a = a.update(_grads(), a.init(None))
  out, _ = jax.jit(b.update)(_grads(), state_a)
  assert _all_nan(out)
  out, _ = jax.jit(a.update)(_grads(), state_a)
  assert _all_finite(out)


def test_budget_conflicting_with_explicit_arguments_raises():
  budget = _budget(max_steps=3, sigma=1.0)
  with pytest.raises(ValueError, match="noise_multiplier"):
    optax_dp.dp_aggregate(1.0, 1.5, key=0, budget=budget)
  with pytest.raises(ValueError, match="expected_batch_size"):
    optax_dp.dp_aggregate(1.0, key=0, budget=budget, expected_batch_size=49)
  with pytest.raises(ValueError, match="allow_budget_overrun"):
    optax_dp.dp_aggregate(1.0, 1.0, key=0, allow_budget_overrun=True)
  # Restating the budget's own values is not a conflict.
  tx = optax_dp.dp_aggregate(1.0, 1.0, key=0, budget=budget, expected_batch_size=50)
  out, _ = tx.update(_grads(), tx.init(None))
  assert _all_finite(out)


def test_budget_noise_and_normaliser_are_used():
  sigma, clip, batch = 1.3, 2.0, 7
  budget = _budget(max_steps=5, sigma=sigma)
  normaliser = SAMPLER.expected_batch_size                 # 50, not the 7 rows
  tx = optax_dp.dp_aggregate(clip, key=11, budget=budget)
  n_a, n_b = 60_000, 40_000
  zeros = {"a": jnp.zeros((batch, n_a)), "b": jnp.zeros((batch, n_b))}
  out, _ = jax.jit(tx.update)(zeros, tx.init(None))
  # With zero gradients every output coordinate is sigma * C / L * z, z iid
  # N(0, 1). With the mean known to be 0, S = sum(out^2) / (sigma C / L)^2 is
  # chi-square with n = 100_000 degrees of freedom; accept S within its
  # 5e-7 and 1 - 5e-7 quantiles (false alarm 1e-6). That band is about +-1.7%
  # on the std: sigma 1.0 (-23%) or normaliser 7 (x7) cannot pass.
  n = n_a + n_b
  std = sigma * clip / normaliser
  s = sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in jax.tree.leaves(out))
  s /= std ** 2
  assert stats.chi2.ppf(5e-7, n) < s < stats.chi2.isf(5e-7, n)

  # Normaliser, deterministically: same key, same step, so the same noise is
  # added to the sum of g (norms < C, so unclipped) and to the sum of zeros;
  # their outputs differ by exactly sum(g) / L, up to float32 rounding (each
  # output is within 2 ulps of its magnitude: one add, one divide).
  g = _grads(batch=batch, scale=0.1)
  assert float(jnp.max(jax.vmap(lambda e: optax.tree.norm(e))(g))) < clip
  out_g, _ = tx.update(g, tx.init(None))
  out_0, _ = tx.update(jax.tree.map(jnp.zeros_like, g), tx.init(None))
  for key in g:
    want = np.asarray(g[key], np.float64).sum(0) / normaliser
    diff = np.asarray(out_g[key], np.float64) - np.asarray(out_0[key], np.float64)
    scale = max(np.max(np.abs(out_g[key])), np.max(np.abs(out_0[key])))
    np.testing.assert_allclose(diff, want, rtol=0, atol=4 * np.finfo(np.float32).eps * scale)
    assert np.max(np.abs(want)) > 100 * 4 * np.finfo(np.float32).eps * scale


# ----------------------------------------------------------------------------
# The noise-key ledger


def _run(tx, steps, state=None, first=0, jit=False):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(None) if state is None else state
  outs, states = [], [state]
  for t in range(first, first + steps):
    out, state = update(_grads(seed=100 + t), state)
    outs.append(out)
    states.append(state)
  return outs, states


@pytest.mark.parametrize("jit", [False, True])
def test_state_from_another_run_raises(jit):
  ours = optax_dp.dp_aggregate(1.0, 1.0, key=1)
  theirs = optax_dp.dp_aggregate(1.0, 1.0, key=2)
  _, states = _run(theirs, 2)
  update = jax.jit(ours.update) if jit else ours.update
  for foreign in states:                              # at step 0, 1 and 2
    if jit:
      with pytest.raises(Exception) as info:
        jax.block_until_ready(update(_grads(), foreign))
      assert "NoiseReplayError" in str(info.value)
    else:
      with pytest.raises(optax_dp.NoiseReplayError):
        update(_grads(), foreign)


@pytest.mark.parametrize("jit", [False, True])
def test_key_and_step_out_of_step_raise(jit):
  tx = optax_dp.dp_aggregate(1.0, 1.0, key=1)
  _, states = _run(tx, 3)
  update = jax.jit(tx.update) if jit else tx.update
  spliced = [states[2]._replace(step=states[2].step + 1),
             states[2]._replace(step=states[2].step - 1),
             states[3]._replace(noise_key=states[1].noise_key)]
  for bad in spliced:
    if jit:
      with pytest.raises(Exception) as info:
        jax.block_until_ready(update(_grads(), bad))
      assert "NoiseReplayError" in str(info.value)
    else:
      with pytest.raises(optax_dp.NoiseReplayError, match="does not match"):
        update(_grads(), bad)


@pytest.mark.parametrize("jit", [False, True])
def test_restored_earlier_state_resumes_the_same_updates(jit):
  tx = optax_dp.dp_aggregate(0.5, 1.0, key=7, expected_batch_size=10)
  outs, states = _run(tx, 5, jit=jit)
  # "Restore" the state after 2 updates (host numpy arrays, as a checkpoint
  # gives back) into a freshly built transformation with the same key.
  restored = jax.tree.map(np.asarray, states[2])
  fresh = optax_dp.dp_aggregate(0.5, 1.0, key=7, expected_batch_size=10)
  resumed, resumed_states = _run(fresh, 3, state=restored, first=2, jit=jit)
  for a, b in zip(outs[2:], resumed):
    _assert_trees_equal(a, b)
  _assert_trees_equal(states[-1], resumed_states[-1])
  # Consecutive updates do not repeat their noise.
  assert not np.array_equal(outs[2]["w"], outs[3]["w"])


def test_noise_depends_only_on_key_and_step():
  zeros = jax.tree.map(jnp.zeros_like, _grads())
  a = optax_dp.dp_aggregate(1.0, 1.0, key=5)
  b = optax_dp.dp_aggregate(1.0, 1.0, key=5)
  other = optax_dp.dp_aggregate(1.0, 1.0, key=6)
  # Different gradient histories, then zero gradients at update 3 (t = 2):
  # what is released is the noise alone, and it must coincide.
  _, sa = _run(a, 2)
  state_b = b.init(None)
  for i in range(2):
    _, state_b = b.update(_grads(seed=i, scale=5.0), state_b)
  out_a, _ = a.update(zeros, sa[-1])
  out_b, _ = b.update(zeros, state_b)
  _assert_trees_equal(out_a, out_b)
  assert _all_finite(out_a) and np.any(np.asarray(out_a["w"]) != 0)
  # Another step, or another key, gives other noise.
  out_a0, _ = a.update(zeros, a.init(None))
  _, so = _run(other, 2)
  out_other, _ = other.update(zeros, so[-1])
  assert not np.any(np.asarray(out_a0["w"]) == np.asarray(out_a["w"]))
  assert not np.any(np.asarray(out_other["w"]) == np.asarray(out_a["w"]))


# ---------------------------------------------------------------------------
# delta >= 1/N: a warning from the library and a line in every statement.

@pytest.mark.parametrize("dataset_size, delta, warns", [
    (2000, 1e-2, True), (2000, 1 / 2000, True), (2000, 1e-4, False), (60000, 1e-5, False)])
def test_delta_at_or_above_one_over_n_warns(dataset_size, delta, warns):
  sampler = optax_dp.PoissonSampler(dataset_size=dataset_size, expected_batch_size=20)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    budget = optax_dp.privacy_budget(sampler=sampler, target_delta=delta,
                                     noise_multiplier=1.0, steps=10)
  large = [w for w in caught if issubclass(w.category, optax_dp.LargeDeltaWarning)]
  assert len(large) == (1 if warns else 0)
  statement = budget.statement()
  assert ("WARNING: delta" in statement) == warns
  if warns:
    assert f"1/N = {1 / dataset_size:.4g}" in str(large[0].message)
    assert f"1/N = {1 / dataset_size:.4g}" in statement
