"""optax_dp._core._checks: the validators every public function uses, one rule each.

The public entry points are tested with the same bad values in
test_bad_inputs.py (one row of docs/bad_inputs.md each); this module pins the
rules themselves, so that a validator loosened in one place fails here.
"""

import logging
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_dp._core import _checks


@pytest.mark.parametrize("value", [0.5, 1, np.float32(2.0)])
def test_positive_finite_accepts_numbers(value):
  assert _checks.check_positive_finite("l2_norm_clip", value) == float(value)


@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, True, "1.0x", None])
def test_positive_finite_refuses(value):
  with pytest.raises(ValueError, match="l2_norm_clip"):
    _checks.check_positive_finite("l2_norm_clip", value)


@pytest.mark.parametrize("value,minimum", [(1, 1), (0, 0), (5.0, 1), (np.int64(3), 1)])
def test_int_accepts_integers(value, minimum):
  assert _checks.check_int("steps", value, minimum) == int(value)


@pytest.mark.parametrize("value", [0, 2.5, True, math.inf, "3", None])
def test_int_refuses(value):
  with pytest.raises(ValueError, match=r"steps must be an integer >= 1"):
    _checks.check_int("steps", value, 1)


@pytest.mark.parametrize("delta", [0, 1, -1e-5, 1.5, math.nan, True])
def test_delta_is_in_the_open_unit_interval(delta):
  with pytest.raises(ValueError, match="target_delta"):
    _checks.check_delta(delta)
  assert _checks.check_delta(1e-5) == 1e-5


@pytest.mark.parametrize("epsilon", [0, -1.0, math.inf, math.nan, False])
def test_epsilon_is_finite_and_positive(epsilon):
  with pytest.raises(ValueError, match="target_epsilon"):
    _checks.check_epsilon(epsilon)
  assert _checks.check_epsilon(8) == 8.0


def test_noise_multiplier_zero_is_valid_and_warns_only_where_it_runs():
  """The one rule for sigma = 0: a valid value (epsilon inf), a loud warning
  where the noise is added (warn_if_zero), silence elsewhere."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert _checks.check_noise_multiplier(0) == 0.0          # accounting: no warning
  with pytest.warns(UserWarning, match="NOT differentially private"):
    _checks.check_noise_multiplier(0.0, warn_if_zero=True)
  for bad in (-0.1, math.inf, math.nan, True, "one"):
    with pytest.raises(ValueError, match="noise_multiplier"):
      _checks.check_noise_multiplier(bad)


def test_expected_batch_size_is_a_public_positive_integer():
  assert _checks.check_expected_batch_size(None) is None
  assert _checks.check_expected_batch_size(256) == 256
  assert _checks.check_expected_batch_size(jnp.asarray(8)) == 8   # inject_hyperparams' form
  for bad in (0, -4, 2.5, True, "8", jnp.asarray(8.0)):
    with pytest.raises(ValueError, match="expected_batch_size"):
      _checks.check_expected_batch_size(bad)


def test_refuse_traced_names_the_parameter_and_static_args():
  _checks.refuse_traced("dp_aggregate", l2_norm_clip=1.0)      # concrete: fine

  def build(c):
    _checks.refuse_traced("dp_aggregate", l2_norm_clip=c)
    return c

  with pytest.raises(ValueError, match=r"l2_norm_clip is a traced value.*static_args"):
    jax.jit(build)(1.0)


def test_raise_if_raises_eagerly_and_under_jit():
  _checks.raise_if(False, RuntimeError, "never")
  with pytest.raises(RuntimeError, match="over budget"):
    _checks.raise_if(True, RuntimeError, "over budget")

  @jax.jit
  def guarded(x):
    _checks.raise_if(x > 1, RuntimeError, "over budget")
    return x

  assert float(guarded(0.5)) == 0.5
  with pytest.raises(Exception, match="over budget"):
    jax.block_until_ready(guarded(2.0))


@pytest.mark.parametrize("boundary", [0, 1, 7, 99])
def test_bisect_boundary_finds_the_last_true(boundary):
  calls = []

  def predicate(n):
    calls.append(n)
    return n <= boundary

  lo, hi = _checks.bisect_boundary(predicate, 0, 100)
  assert (lo, hi) == (boundary, boundary + 1)
  assert len(calls) <= math.ceil(math.log2(100))


# ---------------------------------------------------------------------------
# Refusals inside jax.jit: one message, and catchable by their own type.

def _exhausted_step():
  import optax_dp   # pylint: disable=import-outside-toplevel
  sampler = optax_dp.PoissonSampler(dataset_size=1000, expected_batch_size=4)
  budget = optax_dp.privacy_budget(sampler=sampler, target_delta=1e-5,
                                   noise_multiplier=1.0, steps=1)
  tx = optax_dp.dp_aggregate(1.0, key=jax.random.key(0), budget=budget)
  step = jax.jit(tx.update)
  grads, state = {"w": jnp.ones((4, 2))}, tx.init({"w": jnp.zeros(2)})
  _, state = step(grads, state)   # the one step the budget allows
  return step, grads, state


def test_budget_refusal_under_jit_is_caught_by_type_and_said_once(caplog):
  import optax_dp   # pylint: disable=import-outside-toplevel
  step, grads, state = _exhausted_step()
  with caplog.at_level(logging.DEBUG):
    with pytest.raises(optax_dp.PrivacyBudgetExceededError, match="allows 1 noisy steps"):
      with optax_dp.reraise_refusals():
        jax.block_until_ready(step(grads, state))
  # JAX's own "callback failed" log of the same error is silenced.
  assert not [r for r in caplog.records if "callback failed" in r.getMessage()]


def test_refusal_under_jit_without_the_context_names_it():
  step, grads, state = _exhausted_step()
  with pytest.raises(jax.errors.JaxRuntimeError, match=r"optax_dp\.reraise_refusals"):
    jax.block_until_ready(step(grads, state))


def test_reraise_refusals_passes_other_errors_unchanged():
  import optax_dp   # pylint: disable=import-outside-toplevel
  with pytest.raises(KeyError):
    with optax_dp.reraise_refusals():
      raise KeyError("not ours")

  @optax_dp.reraise_refusals()
  def fails():
    raise ValueError("also not ours")

  with pytest.raises(ValueError, match="also not ours"):
    fails()
