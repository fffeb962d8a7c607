"""UserPoissonSampler (optax_dp/_sample/_users.py): users sampled, accounted
over users; and group_privacy (optax_dp/_sample/_group_privacy.py)."""

import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats

import optax_dp

FALSE_ALARM = 1e-6


def _ids(num_users=200, seed=0):
  """Users with 1 to 9 examples each, rows shuffled."""
  rng = np.random.default_rng(seed)
  ids = np.repeat(np.arange(num_users), rng.integers(1, 10, num_users))
  return rng.permutation(ids)


def _band(n, p):
  """The two-sided binomial band holding Binomial(n, p) w.p. 1 - FALSE_ALARM."""
  return stats.binom.ppf(FALSE_ALARM / 2, n, p), stats.binom.isf(FALSE_ALARM / 2, n, p)


def test_users_are_included_at_rate_q_and_never_with_more_than_k_rows():
  ids = _ids()
  k, steps = 3, 400
  sampler = optax_dp.UserPoissonSampler(ids, expected_users=20, max_examples_per_user=k)
  assert sampler.num_users == 200 and sampler.dataset_size == 200
  assert sampler.sampling_probability == 20 / 200
  included = 0
  for batch in sampler.batches(seed=3, steps=steps):
    assert batch.indices.shape == batch.mask.shape and batch.indices.shape[1] == k
    assert np.array_equal(batch.mask, batch.indices >= 0)
    for row, m in zip(batch.indices, batch.mask):
      if not m.any():
        continue
      included += 1
      real = row[m]
      assert len(set(ids[real])) == 1                      # one user per row
      user = ids[real[0]]
      assert len(set(real)) == len(real) <= k              # distinct, at most k
      assert len(real) == min(k, int(np.sum(ids == user)))  # all, up to the cap
    users = [ids[row[m][0]] for row, m in zip(batch.indices, batch.mask) if m.any()]
    assert len(users) == len(set(users))                   # each user once per batch
  lo, hi = _band(200 * steps, 0.1)
  assert lo <= included <= hi


def test_a_users_examples_are_chosen_uniformly():
  ids = np.array([0] * 5 + [1])
  sampler = optax_dp.UserPoissonSampler(ids, expected_users=1, max_examples_per_user=2)
  counts = np.zeros(6)
  steps = 4000
  for batch in sampler.batches(seed=1, steps=steps):
    np.add.at(counts, batch.indices[batch.mask], 1)
  times_user0 = counts[:5].sum() / 2
  for c in counts[:5]:   # each of user 0's five examples: 2 of 5 when user 0 is in
    lo, hi = _band(int(times_user0), 2 / 5)
    assert lo <= c <= hi


def test_user_level_epsilon_is_the_poisson_gaussian_over_users():
  ids = _ids()
  sampler = optax_dp.UserPoissonSampler(ids, expected_users=20, max_examples_per_user=4)
  got = optax_dp.compute_epsilon(1.3, 1e-5, steps=300, sampler=sampler)
  accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
  accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      20 / 200, dp_accounting.GaussianDpEvent(1.3)), 300))
  assert got == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)
  # The planted bug: q from the examples (E / N), not the users (E / U), is
  # another, smaller epsilon, which the same check refuses.
  wrong = optax_dp.compute_epsilon(1.3, 1e-5, steps=300, sampler=optax_dp.PoissonSampler(
      len(ids), 20))
  assert wrong != pytest.approx(got, rel=1e-6)
  assert len(ids) > 200


def test_budget_and_statement_speak_of_users():
  ids = _ids()
  sampler = optax_dp.UserPoissonSampler(ids, expected_users=20, max_examples_per_user=4)
  budget = optax_dp.privacy_budget(sampler=sampler, target_epsilon=3.0, target_delta=1e-5,
                                   steps=100)
  assert budget.epsilon() <= 3.0
  text = optax_dp.privacy_statement(budget.noise_multiplier, 1e-5, steps=100, sampler=sampler)
  assert "for each user (all of that user's examples" in text
  assert f"each of the 200 users (holding {len(ids)} examples)" in text
  assert "at most 4 of each included user's examples" in text
  assert "add or remove one user" in text


def test_resumed_and_accumulated_batches_are_the_runs_batches():
  sampler = optax_dp.UserPoissonSampler(_ids(), expected_users=20, max_examples_per_user=3)
  whole = list(sampler.batches(seed=5, steps=6))
  resumed = list(sampler.batches(seed=5, steps=6, start_step=4))
  for a, b in zip(whole[4:], resumed):
    assert np.array_equal(a.indices, b.indices)
  split = list(sampler.batches(seed=5, steps=6, accumulation_steps=2))
  for t, logical in enumerate(whole):
    parts = np.concatenate([split[2 * t].indices, split[2 * t + 1].indices])
    real = lambda x: x[(x >= 0).any(axis=1)]
    assert np.array_equal(real(parts), real(logical.indices))


def test_ids_may_be_strings_and_the_repr_stays_short():
  sampler = optax_dp.UserPoissonSampler(["ann", "bob", "ann"] * 100, expected_users=1,
                                        max_examples_per_user=2)
  assert sampler.num_users == 2 and sampler.num_examples == 300
  assert "ann" not in repr(sampler)
  assert sampler.examples_per_user().tolist() == [200, 100]


@pytest.mark.parametrize("kwargs,match", [
    (dict(user_ids=[], expected_users=1, max_examples_per_user=1), "non-empty 1-D"),
    (dict(user_ids=[0, 1], expected_users=3, max_examples_per_user=1), "number of distinct"),
    (dict(user_ids=[0, 1], expected_users=1, max_examples_per_user=0), "max_examples_per_user"),
])
def test_bad_arguments_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optax_dp.UserPoissonSampler(**kwargs)


def test_group_privacy_is_the_lemma_at_the_best_delta():
  sampler = optax_dp.PoissonSampler(60000, 256)
  one = optax_dp.group_privacy(1.1, 1e-5, 1, steps=1000, sampler=sampler)
  assert one.epsilon == optax_dp.compute_epsilon(1.1, 1e-5, steps=1000, sampler=sampler)
  previous = one.epsilon
  for m in (2, 3, 10):
    g = optax_dp.group_privacy(1.1, 1e-5, m, steps=1000, sampler=sampler)
    # The example-level pair is the accountants' bound at delta_0 (the least of PLD's and RDP's).
    assert g.example_epsilon == min(
        optax_dp.compute_epsilon(1.1, g.example_delta, steps=1000, sampler=sampler),
        optax_dp.compute_epsilon(1.1, g.example_delta, steps=1000, sampler=sampler,
                                 accountant="rdp")) or math.isclose(
        g.example_epsilon, optax_dp.compute_epsilon(
            1.1, g.example_delta, steps=1000, sampler=sampler, accountant="rdp"), rel_tol=1e-9)
    assert g.epsilon == m * g.example_epsilon
    assert math.log(m) + (m - 1) * g.example_epsilon + math.log(g.example_delta) <= \
        math.log(1e-5)
    # A larger group, a larger epsilon.
    assert g.epsilon > previous
    previous = g.epsilon
  assert math.isinf(optax_dp.group_privacy(1.1, 1e-5, 1000, steps=1000,
                                           sampler=sampler).epsilon)


def test_group_privacy_refuses_a_user_level_run():
  sampler = optax_dp.UserPoissonSampler(_ids(), expected_users=20, max_examples_per_user=2)
  with pytest.raises(ValueError, match="already protects each user"):
    optax_dp.group_privacy(1.0, 1e-5, 2, steps=10, sampler=sampler)


def test_cyclic_user_sampling_is_bandmf_over_users():
  ids = _ids()
  sampler = optax_dp.UserPoissonSampler(ids, expected_users=10, max_examples_per_user=2,
                                        bands=4)
  over_users = optax_dp.CyclicPoissonSampler(200, 10, bands=4)
  assert optax_dp.compute_epsilon(1.0, 1e-5, steps=40, sampler=sampler) == pytest.approx(
      optax_dp.compute_epsilon(1.0, 1e-5, steps=40, sampler=over_users), rel=1e-9)
  groups = over_users.groups(seed=7)
  for t, batch in enumerate(sampler.batches(seed=7, steps=8)):
    users = set(ids[batch.indices[batch.mask]])
    assert users <= set(groups[t % 4])       # step t draws from group t mod 4 only
  budget = optax_dp.privacy_budget(sampler=sampler, noise_multiplier=1.0,
                                   target_delta=1e-5, steps=8)
  assert budget.statement().startswith("DP-BandMF")


def test_padding_for_devices_moves_whole_users():
  sampler = optax_dp.UserPoissonSampler(_ids(), expected_users=20, max_examples_per_user=3)
  batch = next(sampler.batches(seed=2, steps=1))
  padded = optax_dp.pad_batch_for_devices(batch, 8)
  assert padded.indices.shape[0] % 8 == 0 and padded.indices.shape[1] == 3
  rows = lambda b: sorted(map(tuple, b.indices[b.mask.any(axis=1)].tolist()))
  assert rows(padded) == rows(batch)            # the same users, each with its examples
  assert np.array_equal(padded.mask, padded.indices >= 0)
