"""DP-BandMF: correlated noise through dp_aggregate (optax_dp/_correlated.py),
its sampler (CyclicPoissonSampler) and its ledger.

The reference for the noise is jax_privacy: its banded strategy (materialised)
and its `matrix_factorization_privatizer`; for the accounting, its
`amplified_bandmf_event` composed in dp-accounting's accountants.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import optax_dp
from optax_dp._clip import _clipping
from optax_dp._aggregation import _noise
from optax_dp._aggregation import _correlated

jax_privacy = pytest.importorskip("jax_privacy")
from jax_privacy import noise_addition  # noqa: E402  pylint: disable=g-import-not-at-top
from jax_privacy.experimental import accounting as jp_accounting  # noqa: E402
import dp_accounting  # noqa: E402  pylint: disable=g-import-not-at-top,g-bad-import-order
from dp_accounting import pld, rdp  # noqa: E402  pylint: disable=g-import-not-at-top

C, SIGMA, E = 1.0, 1.3, 4
PARAMS = {"w": jnp.zeros((40, 25)), "b": jnp.zeros((7,))}
DIM = 40 * 25 + 7


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _zero_grads(batch=3):
  """Per-example gradients that are all zero: the update is the noise / E."""
  return jax.tree.map(lambda p: jnp.zeros((batch,) + p.shape), PARAMS)


def _noise_stream(tx, steps, params=PARAMS):
  """The noise of `steps` updates of `tx` (zero gradients), (steps, dim)."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  rows = []
  for _ in range(steps):
    out, state = update(_zero_grads(), state, params)
    rows.append(_flat(out) * E)
  return np.stack(rows), state


# ------------------------------------------------------------------ strategy


# The (steps, bands) of this file's strategies are few and shared between its
# tests: jax_privacy's optimisation takes ~2 s per distinct pair, and
# bandmf_strategy caches them (lru_cache of 8; this file builds 6 with
# bands > 1: (10, 3), (12, 2), (12, 5), (6, 3), (5, 3), (400, 4)).
@pytest.mark.parametrize("steps,bands", [(8, 1), (10, 3),
                                         pytest.param(12, 5, marks=pytest.mark.slow)])
def test_strategy_is_banded_lower_triangular_with_unit_columns(steps, bands):
  strategy = optax_dp.bandmf_strategy(steps, bands)
  assert (strategy.n, strategy.bands) == (steps, bands)
  m = np.asarray(strategy.materialize(), np.float64)
  i, j = np.indices(m.shape)
  np.testing.assert_array_equal(m[i < j], 0.0)              # lower triangular
  np.testing.assert_array_equal(m[i - j >= bands], 0.0)     # banded
  np.testing.assert_allclose(np.linalg.norm(m, axis=0), 1.0, rtol=1e-6)  # sensitivity 1
  if bands == 1:
    np.testing.assert_array_equal(m, np.eye(steps))
  else:
    assert np.all(np.abs(np.diag(m, -1)) > 1e-3)            # really correlated


@pytest.mark.parametrize("steps,bands", [(4, 5), (4, 0), (0, 1), (4, 1.5), (4, True)])
def test_strategy_refuses_bad_sizes(steps, bands):
  with pytest.raises(ValueError):
    optax_dp.bandmf_strategy(steps, bands)


# ------------------------------------------------------------------ the noise


def test_noise_is_the_inverse_strategy_applied_to_dpsgd_draws():
  """Update t adds (C^{-1} z)_t for the i.i.d. draws z_t DP-SGD adds with the
  same key at step t: C @ (released noise) == the DP-SGD noise stream, which
  is itself sigma*C*N(0, 1) drawn from fold_in(key, t)."""
  steps, bands, key = 10, 3, jax.random.key(7)
  strategy = optax_dp.bandmf_strategy(steps, bands)
  bandmf, _ = _noise_stream(optax_dp.dp_aggregate(
      C, SIGMA, key, expected_batch_size=E, noise_strategy=strategy), steps)
  dpsgd, _ = _noise_stream(optax_dp.dp_aggregate(C, SIGMA, key, expected_batch_size=E), steps)
  draws = np.stack([_flat(_noise.gaussian_noise(PARAMS, jax.random.fold_in(key, t),
                                                   SIGMA * C)) for t in range(steps)])
  np.testing.assert_allclose(dpsgd, draws, rtol=1e-6, atol=1e-6)
  mixed = np.asarray(strategy.materialize(), np.float64) @ bandmf
  np.testing.assert_allclose(mixed, draws, rtol=1e-4, atol=1e-4 * SIGMA * C)
  assert not np.allclose(bandmf, dpsgd, atol=0.1)          # correlated, not i.i.d.


@pytest.mark.parametrize("bands", [1, 2, 5])
def test_streaming_multiply_equals_jax_privacys(bands):
  """optax_dp's streaming C^{-1} (weights laid on the buffers, no gather)
  equals jax_privacy's inverse_as_streaming_matrix over 12 steps of random
  inputs, within float32 summation-order rounding; bitwise for 1 band."""
  strategy = optax_dp.bandmf_strategy(12, bands)
  reference = strategy.inverse_as_streaming_matrix()
  tree = {"a": jnp.zeros((30, 4)), "b": jnp.zeros((9,))}
  ours, theirs = _correlated.init_noise_state(strategy, tree), reference.init_multiply(tree)
  # Compiled once (the same programs every step), not once per step.
  ours_next = jax.jit(lambda z, s: _correlated.correlate(strategy, z, s))
  theirs_next = jax.jit(reference.multiply_next)
  for t in range(12):
    z = jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(jax.random.key(t),
                                                                    x.size), x.shape), tree)
    got, ours = ours_next(z, ours)
    want, theirs = theirs_next(z, theirs)
    if bands == 1:
      np.testing.assert_array_equal(_flat(got), _flat(want))
    else:
      np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-5, atol=1e-5)
  assert int(_correlated.noise_index(ours)) == 12


@pytest.mark.slow
def test_noise_covariance_is_jax_privacy_privatizers():
  """Over d = 40,000 coordinates (each an independent stream of n = 6 steps),
  the empirical step-by-step covariance S of our BandMF noise and of
  jax_privacy's matrix_factorization_privatizer (same strategy, its own key:
  the keys cannot be aligned) both estimate Sigma = (sigma C)^2 C^{-1} C^{-T}.
  For Gaussian streams Var(S_ij) = (Sigma_ii Sigma_jj + Sigma_ij^2) / d; each
  entry must lie within 5.5 of those standard deviations (false alarm about
  21 x 4e-8 per stream, the S_ij being asymptotically normal). DP-SGD's i.i.d.
  noise (covariance (sigma C)^2 I) fails the same test: the band is far
  narrower than the off-diagonal entries."""
  steps, bands, d, std = 6, 3, 40_000, SIGMA * C
  strategy = optax_dp.bandmf_strategy(steps, bands)
  inverse = np.linalg.inv(np.asarray(strategy.materialize(), np.float64))
  sigma = std ** 2 * inverse @ inverse.T
  tol = 5.5 * np.sqrt((np.outer(np.diag(sigma), np.diag(sigma)) + sigma ** 2) / d)
  params = {"v": jnp.zeros((d,))}

  def ours(noise_strategy, seed):
    tx = optax_dp.dp_aggregate(C, SIGMA, seed, expected_batch_size=1,
                               noise_strategy=noise_strategy)
    state, rows = tx.init(params), []
    for _ in range(steps):
      out, state = jax.jit(tx.update)({"v": jnp.zeros((1, d))}, state, params)
      rows.append(np.asarray(out["v"], np.float64))
    return np.stack(rows)

  privatizer = noise_addition.matrix_factorization_privatizer(
      strategy.inverse_as_streaming_matrix(), stddev=std, prng_key=jax.random.key(99))
  state, rows = privatizer.init(params), []
  for _ in range(steps):
    out, state = privatizer.update(params, state)
    rows.append(np.asarray(out["v"], np.float64))
  theirs = np.stack(rows)

  for name, z in (("optax_dp", ours(strategy, 11)), ("jax_privacy", theirs)):
    err = np.abs(z @ z.T / d - sigma)
    assert np.all(err < tol), (name, np.max(err / tol))
  iid = ours(None, 12)
  assert np.max(np.abs(iid @ iid.T / d - sigma) / tol) > 5   # the test has power


def test_bands_1_is_dpsgd_bit_for_bit():
  """A budget of CyclicPoissonSampler(bands=1): the same batches, epsilon and
  updates (through the correlated-noise code path, 1-band identity strategy)
  as PoissonSampler's DP-SGD, bit for bit."""
  poisson = optax_dp.PoissonSampler(1000, 10)
  cyclic = optax_dp.CyclicPoissonSampler(1000, 10, bands=1)
  for a, b in zip(poisson.batches(3, steps=6), cyclic.batches(3, steps=6)):
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.mask, b.mask)
  budgets = [optax_dp.privacy_budget(sampler=s, target_delta=1e-5, noise_multiplier=SIGMA,
                                     steps=6) for s in (poisson, cyclic)]
  assert budgets[0].epsilon() == budgets[1].epsilon()
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=(5,) + p.shape), jnp.float32),
                       PARAMS)
  outs = []
  for budget in budgets:
    tx = optax.chain(optax_dp.dp_aggregate(C, key=4, budget=budget), optax.sgd(0.1))
    state, run = tx.init(PARAMS), []
    for _ in range(6):
      update, state = jax.jit(tx.update)(grads, state, PARAMS)
      run.append(_flat(update))
    outs.append(np.stack(run))
  assert jax.tree.leaves(state[0].noise_state)            # the 1-band streaming state ran
  np.testing.assert_array_equal(outs[0], outs[1])


# ------------------------------------------------------------------ sampler


def test_cyclic_sampler_groups_batches_and_resume():
  sampler = optax_dp.CyclicPoissonSampler(dataset_size=2000, expected_batch_size=20, bands=4)
  groups = sampler.groups(seed=5)
  together = np.sort(np.concatenate(groups))
  np.testing.assert_array_equal(together, np.arange(2000))  # a partition of the data
  assert groups[0].tolist() != sampler.groups(seed=6)[0].tolist()
  batches = list(sampler.batches(5, steps=40))
  sizes = []
  for t, batch in enumerate(batches):
    real = batch.indices[batch.mask]
    assert set(real.tolist()) <= set(groups[t % 4].tolist()), t
    np.testing.assert_array_equal(batch.indices[~batch.mask], -1)
    sizes.append(len(real))
  # Mean batch size: 40 batches of Binomial(|G|, 0.04), |G| ~ 500: mean 20,
  # std of the mean about sqrt(20 / 40) = 0.7; 5 of those.
  assert abs(np.mean(sizes) - 20) < 3.5
  resumed = list(sampler.batches(5, steps=40, start_step=17))
  for a, b in zip(batches[17:], resumed):
    np.testing.assert_array_equal(a.indices, b.indices)


@pytest.mark.parametrize("kwargs", [
    {"bands": 0}, {"bands": 2.5}, {"bands": 200},               # 200 * 10 > 1000
    {"bands": 2, "truncate": True, "max_batch_size": 40}])
def test_cyclic_sampler_refuses_bad_settings(kwargs):
  with pytest.raises(ValueError):
    optax_dp.CyclicPoissonSampler(1000, 10, **kwargs)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_accounting_equals_amplified_bandmf_event(accountant):
  """epsilon of the budget == jax_privacy's amplified_bandmf_event (ceil(steps
  / bands) Poisson-subsampled Gaussians at rate bands * E / N) composed in
  dp-accounting's accountant, and well below DP-SGD's with the same sigma."""
  sampler = optax_dp.CyclicPoissonSampler(60_000, 256, bands=8)
  steps, noise = 1000, 1.0
  event = jp_accounting.amplified_bandmf_event(noise, steps, num_bands=8,
                                               sampling_prob=8 * 256 / 60_000)
  assert event == sampler.dp_event(noise, steps)
  got = optax_dp.compute_epsilon(noise, 1e-5, steps=steps, sampler=sampler,
                                 accountant=accountant)
  if accountant == "rdp":
    want = rdp.RdpAccountant().compose(event).get_epsilon(1e-5)
    assert got == want
  else:
    want = pld.PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(1e-5)
    assert got == pytest.approx(want, rel=1e-2)
  # ceil(1000 / 8) = 125 rounds at rate 0.0341 vs DP-SGD's 1000 at 0.00427.
  assert isinstance(event, dp_accounting.SelfComposedDpEvent) and event.count == 125


# ------------------------------------------------------------------ ledger


def test_budget_builds_the_strategy_and_refuses_what_it_cannot_account():
  sampler = optax_dp.CyclicPoissonSampler(1000, 10, bands=3)
  budget = optax_dp.privacy_budget(sampler=sampler, target_delta=1e-5, noise_multiplier=2.0,
                                   steps=5)
  tx = optax_dp.dp_aggregate(C, key=0, budget=budget)
  state = tx.init(PARAMS)
  assert jax.tree.map(jnp.shape, state.noise_state) == {
      "b": ((), (3, 7)), "w": ((), (3, 40, 25))}             # 3 buffers per leaf
  update = jax.jit(tx.update)
  for _ in range(5):
    _, state = update(_zero_grads(), state, PARAMS)
  with pytest.raises(Exception, match="allows 5 noisy steps"):
    jax.block_until_ready(update(_zero_grads(), state, PARAMS))
  # Noise buffers from another step than the counter: a replay.
  early = tx.init(PARAMS)
  _, one = update(_zero_grads(), early, PARAMS)
  mixed = one._replace(noise_state=early.noise_state)
  with pytest.raises(optax_dp.NoiseReplayError):
    tx.update(_zero_grads(), mixed, PARAMS)
  with pytest.raises(ValueError, match="allow_budget_overrun"):
    optax_dp.dp_aggregate(C, key=0, budget=budget, allow_budget_overrun=True)
  with pytest.raises(ValueError, match="omit noise_strategy"):
    optax_dp.dp_aggregate(C, key=0, budget=budget,
                          noise_strategy=optax_dp.bandmf_strategy(6, 3))
  poisson_budget = optax_dp.privacy_budget(sampler=optax_dp.PoissonSampler(1000, 10),
                                           target_delta=1e-5, noise_multiplier=2.0, steps=5)
  with pytest.raises(ValueError, match="CyclicPoissonSampler"):
    optax_dp.dp_aggregate(C, key=0, budget=poisson_budget,
                          noise_strategy=optax_dp.bandmf_strategy(5, 3))
  with pytest.raises(ValueError, match="noise_strategy must be"):
    optax_dp.dp_aggregate(C, SIGMA, 0, expected_batch_size=E, noise_strategy="bandmf")


def test_strategy_without_budget_refuses_steps_past_it():
  # (6, 3): the covariance test's strategy (cached), a run of 6 steps.
  tx = optax_dp.dp_aggregate(C, SIGMA, 3, expected_batch_size=E,
                             noise_strategy=optax_dp.bandmf_strategy(6, 3))
  _, state = _noise_stream(tx, 6)
  with pytest.raises(optax_dp.PrivacyBudgetExceededError, match="covers 6 steps"):
    tx.update(_zero_grads(), state, PARAMS)


@pytest.mark.slow
def test_audit_stays_consistent_on_bandmf():
  """The one-run canary audit of dp_aggregate with BandMF noise (one canary
  per step, 400 steps, 4 bands) finds no violation of the per-step Gaussian
  claim: each canary takes part once, through a column of norm 1."""
  steps = 400
  strategy = optax_dp.bandmf_strategy(steps, 4)
  report = optax_dp.audit.audit_transformation(
      lambda: optax_dp.dp_aggregate(C, 1.0, jax.random.key(3), expected_batch_size=1,
                                    noise_strategy=strategy),
      {"w": jnp.zeros(64)}, l2_norm_clip=C, noise_multiplier=1.0,
      num_canaries=steps, fillers_per_step=2)
  assert report.steps == steps
  assert report.verdict == "consistent", report
  assert math.isfinite(report.epsilon_lower_bound)


@pytest.mark.slow
def test_nnx_optimizer_with_a_bandmf_budget_equals_the_plain_pytree_run():
  """nnx.Optimizer(model, chain(dp_aggregate(budget of a cyclic sampler), sgd)):
  its noise state lives in the optimizer's own variables; 3 steps give the
  parameters of the same chain run on the plain parameter dict (same key,
  same clipped sums), and the budget reads the steps from its state."""
  nnx = pytest.importorskip("flax.nnx")
  # bands=3 over 5 steps: the (5, 3) strategy of the budget test above (cached).
  sampler = optax_dp.CyclicPoissonSampler(1000, 10, bands=3)
  budget = optax_dp.privacy_budget(sampler=sampler, target_delta=1e-5, noise_multiplier=1.0,
                                   steps=5)
  make_tx = lambda: optax.chain(optax_dp.dp_aggregate(1.0, key=0, budget=budget),  # noqa: E731
                                optax.sgd(0.1))
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  plain = {"kernel": model.kernel[...], "bias": model.bias[...]}
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)

  @nnx.jit
  def nnx_step(model, optimizer, x):
    optimizer.update(model, optax_dp.clipped_grads(lambda m, b: jnp.mean(m(b) ** 2), 1.0)(
        model, x))

  def plain_loss(p, b):
    return jnp.mean((b @ p["kernel"] + p["bias"]) ** 2)

  tx = make_tx()
  state = tx.init(plain)
  for _ in range(3):
    nnx_step(model, optimizer, x)
    updates, state = tx.update(optax_dp.clipped_grads(plain_loss, 1.0)(plain, x), state, plain)
    plain = optax.apply_updates(plain, updates)
  assert budget.steps_taken(optimizer.opt_state) == 3
  np.testing.assert_allclose(np.asarray(model.kernel[...]), plain["kernel"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(model.bias[...]), plain["bias"], rtol=1e-5, atol=1e-6)
