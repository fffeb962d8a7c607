"""Tests for optax_dp._lifecycle._averaging: ema_params, polyak_params, averaged_params."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_dp


def _run(tx, grads_seq, params):
  """Applies `tx` to each gradient; returns (params after each step, state)."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = []
  for g in grads_seq:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return history, state


def _grads(steps=12):
  keys = jax.random.split(jax.random.key(0), steps)
  return [{"w": jax.random.normal(k, (3,)), "b": jax.random.normal(k, ())} for k in keys]


PARAMS = {"w": jnp.arange(3.0), "b": jnp.asarray(1.0)}


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_follows_its_recurrence(warmup):
  decay = 0.9
  history, state = _run(optax.chain(optax.sgd(0.1), optax_dp.ema_params(decay, warmup=warmup)),
                        _grads(), PARAMS)
  expected = {k: np.asarray(v, np.float64) for k, v in PARAMS.items()}
  for t, params in enumerate(history, start=1):
    d = min(decay, (1 + t) / (10 + t)) if warmup else decay
    expected = {k: d * expected[k] + (1 - d) * np.asarray(params[k]) for k in expected}
  got = optax_dp.averaged_params(state)
  for k in expected:
    np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6)
  assert int(state[1].count) == len(history)


def test_polyak_is_the_mean_of_the_iterates_after_start():
  history, state = _run(optax.chain(optax.sgd(0.1), optax_dp.polyak_params(start_step=4)),
                        _grads(), PARAMS)
  got = optax_dp.averaged_params(state)
  for k in PARAMS:
    mean = np.mean([np.asarray(p[k]) for p in history[4:]], axis=0)
    np.testing.assert_allclose(got[k], mean, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_averaging_leaves_the_private_updates_and_the_budget_alone():
  """Post-processing: the same trained parameters, the same DP state."""
  sampler = optax_dp.PoissonSampler(1000, 10)
  budget = optax_dp.privacy_budget(sampler=sampler, target_epsilon=5.0, target_delta=1e-5,
                                   steps=20)

  def private(*extra):
    return optax.chain(optax_dp.dp_aggregate(1.0, key=3, budget=budget),
                       optax.sgd(0.1, momentum=0.9), *extra)

  grads = [optax_dp.per_example_grads(lambda p, x: jnp.sum(p["w"] * x) + p["b"])(
      PARAMS, jax.random.normal(jax.random.key(t), (10, 3))) for t in range(5)]
  plain, plain_state = _run(private(), grads, PARAMS)
  averaged, averaged_state = _run(private(optax_dp.ema_params(0.9)), grads, PARAMS)
  for a, b in zip(plain, averaged):
    for k in PARAMS:
      np.testing.assert_array_equal(a[k], b[k])
  assert budget.steps_taken(plain_state) == budget.steps_taken(averaged_state) == 5
  assert budget.epsilon_spent(averaged_state) == budget.epsilon_spent(plain_state)


def test_linen_train_state_and_nnx_optimizer():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from flax.training import train_state  # pylint: disable=import-outside-toplevel

  x = jax.random.normal(jax.random.key(1), (8, 3))
  tx = optax.chain(optax.sgd(0.5), optax_dp.polyak_params())

  # Linen: TrainState.apply_gradients passes params; the average is a params tree.
  model = nn.Dense(2)
  params = model.init(jax.random.key(0), x)["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  loss = lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)
  step = jax.jit(lambda s: s.apply_gradients(grads=jax.grad(loss)(s.params)))
  seen = []
  for _ in range(3):
    state = step(state)
    seen.append(state.params)
  linen_avg = optax_dp.averaged_params(state.opt_state)
  np.testing.assert_allclose(linen_avg["kernel"], np.mean([p["kernel"] for p in seen], 0),
                             rtol=1e-6)

  # NNX: the same network and steps through nnx.Optimizer; the average goes
  # into an evaluation copy of the model with nnx.update.
  nnx_model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  nnx_model.kernel[...] = params["kernel"]
  nnx_model.bias[...] = params["bias"]
  optimizer = nnx.Optimizer(nnx_model, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer):
    optimizer.update(model, nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model))

  for _ in range(3):
    nnx_step(nnx_model, optimizer)
  eval_model = nnx.clone(nnx_model)
  nnx.update(eval_model, optax_dp.averaged_params(optimizer.opt_state))
  np.testing.assert_allclose(eval_model.kernel[...], linen_avg["kernel"], rtol=1e-5)
  assert not np.allclose(eval_model.kernel[...], nnx_model.kernel[...])


def test_bad_arguments_and_missing_state():
  with pytest.raises(ValueError, match="decay"):
    optax_dp.ema_params(1.0)
  with pytest.raises(ValueError, match="start_step"):
    optax_dp.polyak_params(-1)
  with pytest.raises(ValueError, match="exactly one AveragedParamsState"):
    optax_dp.averaged_params(optax.sgd(0.1).init(PARAMS))
  two = optax.chain(optax_dp.ema_params(), optax_dp.polyak_params()).init(PARAMS)
  with pytest.raises(ValueError, match="found 2"):
    optax_dp.averaged_params(two)
  tx = optax_dp.ema_params()
  with pytest.raises(ValueError, match="pass params"):
    tx.update(PARAMS, tx.init(PARAMS))
