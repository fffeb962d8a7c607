"""The optax wrapper matrix (docs/bad_inputs.md, "Optax wrappers"): every
wrapper a user combines optimizers with, around the DP step and after it in a
chain. Each either works with the privacy contract intact (the update is
params-shaped and equals what the mechanism releases) or is refused with a
message naming the composition that works."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import optax_dp
from optax_dp._core import _keys

import models

# The reference outputs are computed with a second transform from the same key,
# alive next to the one under test: the reuse warning is right there, and
# expected (test_inject_hyperparams checks the warning itself).
pytestmark = pytest.mark.filterwarnings("ignore::optax_dp.NoiseKeyReuseWarning")

PARAMS = {"a": jnp.zeros((3,)), "b": jnp.zeros((2,))}
BATCH = 6
CLIP, SIGMA, LR = 1.0, 1.0, 0.1


def _grads(seed=0):
  """Per-example gradients: every leaf (B, *param.shape)."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"a": jax.random.normal(k1, (BATCH, 3)), "b": 3 * jax.random.normal(k2, (BATCH, 2))}


def _loss(params, x):
  return jnp.mean(x[:, :3] @ params["a"] + jnp.sin(x[:, 3:] @ params["b"]))


def _clipped(seed=0):
  x = jax.random.normal(jax.random.key(seed + 10), (BATCH, 5))
  return optax_dp.clipped_grads(_loss, CLIP)(PARAMS, x)


def _agg(key=0):
  return optax_dp.dp_aggregate(CLIP, SIGMA, key=key, expected_batch_size=BATCH)


def _dpsgd(key=0):
  return optax_dp.dpsgd(LR, CLIP, SIGMA, key=key, expected_batch_size=BATCH)


def _released(grads, key=0):
  """What the mechanism releases at step 0: the reference noised mean."""
  agg = _agg(key)
  return agg.update(grads, agg.init(PARAMS), PARAMS)[0]


def _shapes(tree):
  return jax.tree.map(jnp.shape, tree)


def _close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def _update(tx, grads, params=PARAMS, jit=False, **extra):
  update = jax.jit(tx.update) if jit else tx.update
  return update(grads, tx.init(params), params, **extra)


# -- refusals around the DP step ----------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("wrapper", ["masked", "multi_transform", "partition"])
def test_masked_and_multi_transform(wrapper, jit):
  labels = {"a": "dp", "b": "frozen"}
  around = {
      "masked": lambda: optax.masked(_dpsgd(), {"a": True, "b": False}),
      "multi_transform": lambda: optax.multi_transform(
          {"dp": _dpsgd(), "frozen": optax.set_to_zero()}, labels),
      "partition": lambda: optax.partition(
          {"dp": _dpsgd(), "frozen": optax.set_to_zero()}, labels),
  }[wrapper]
  # Around: the leaves outside the mask would pass as raw per-example
  # gradients ((6, 2) for a (2,) param): refused, naming what works.
  with pytest.raises(ValueError, match=r"optax\.masked .*optax\.chain\(optax_dp\.dp_aggregate"):
    _update(around(), _grads(), jit=jit)
  # A ClippedGrads cannot be split by a mask at all: optax/JAX's pytree
  # structure error refuses it (before dp_aggregate runs).
  with pytest.raises(ValueError, match="structure"):
    _update(around(), _clipped(), jit=jit)
  # After the DP step: works; 'b' gets the noised update untouched (masked)
  # or zeroed (frozen), 'a' the SGD step; every shape is the param's.
  after = {
      "masked": lambda: optax.chain(_agg(), optax.masked(optax.sgd(LR), {"a": True, "b": False})),
      "multi_transform": lambda: optax.chain(_agg(), optax.multi_transform(
          {"dp": optax.sgd(LR), "frozen": optax.set_to_zero()}, labels)),
      "partition": lambda: optax.chain(_agg(), optax.partition(
          {"dp": optax.sgd(LR), "frozen": optax.set_to_zero()}, labels)),
  }[wrapper]
  out, _ = _update(after(), _grads(), jit=jit)
  assert _shapes(out) == _shapes(PARAMS)
  released = _released(_grads())
  _close(out["a"], -LR * released["a"])
  _close(out["b"], released["b"] if wrapper == "masked" else jnp.zeros((2,)))
  # An all-True mask hides nothing: the same as the DP step itself.
  out, _ = _update(optax.masked(_dpsgd(), {"a": True, "b": True}), _grads(), jit=jit)
  _close(out, jax.tree.map(lambda r: -LR * r, released))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("wrapper", ["apply_if_finite", "conditionally_mask",
                                     "conditionally_transform"])
def test_apply_if_finite_and_conditional_wrappers(wrapper, jit):
  around = {
      "apply_if_finite": lambda inner: optax.apply_if_finite(inner, 3),
      "conditionally_mask": lambda inner: optax.transforms.conditionally_mask(
          inner, lambda step: step < 5),
      "conditionally_transform": lambda inner: optax.transforms.conditionally_transform(
          inner, lambda step: step < 5),
  }[wrapper]
  for grads in (_grads(), _clipped()):
    with pytest.raises(ValueError, match=rf"wrapped in optax\.(transforms\.)?{wrapper}.*"
                       r"optax\.chain\(optax_dp\.dp_aggregate"):
      _update(around(_dpsgd()), grads, jit=jit)
  out, _ = _update(optax.chain(_agg(), around(optax.sgd(LR))), _grads(), jit=jit)
  _close(out, jax.tree.map(lambda r: -LR * r, _released(_grads())))


@pytest.mark.parametrize("jit", [False, True])
def test_multisteps(jit):
  # Around, per-example gradients: refused, pointing to dp_accumulate.
  for tx in (optax.MultiSteps(_dpsgd(), 2),
             optax.MultiSteps(_dpsgd(), 2, should_skip_update_fn=optax.skip_not_finite)):
    with pytest.raises(ValueError, match=r"wrapped in optax\.MultiSteps.*dp_accumulate"):
      _update(tx, _grads(), jit=jit)
  # Around, ClippedGrads: optax's accumulator (params-shaped) cannot be added
  # to it: a pytree structure error, before dp_aggregate runs.
  with pytest.raises(ValueError, match="structure"):
    _update(optax.MultiSteps(_dpsgd(), 2), _clipped(), jit=jit)
  # After: accumulating noised updates is post-processing; works.
  tx = optax.chain(_agg(), optax.MultiSteps(optax.sgd(LR), 2).gradient_transformation())
  state = tx.init(PARAMS)
  update = jax.jit(tx.update) if jit else tx.update
  first, state = update(_grads(0), state, PARAMS)
  second, state = update(_grads(1), state, PARAMS)
  assert _shapes(second) == _shapes(PARAMS)
  _close(first, jax.tree.map(jnp.zeros_like, PARAMS))
  agg = _agg()
  s = agg.init(PARAMS)
  r0, s = agg.update(_grads(0), s, PARAMS)
  r1, _ = agg.update(_grads(1), s, PARAMS)
  _close(second, jax.tree.map(lambda x, y: -LR * (x + y) / 2, r0, r1))


@pytest.mark.parametrize("jit", [False, True])
def test_flatten(jit):
  for grads in (_grads(), _clipped()):
    with pytest.raises(ValueError, match=r"wrapped in optax\.flatten.*optax\.flatten\(optax\.sgd"):
      _update(optax.flatten(_dpsgd()), grads, jit=jit)
  out, _ = _update(optax.chain(_agg(), optax.flatten(optax.sgd(LR))), _grads(), jit=jit)
  _close(out, jax.tree.map(lambda r: -LR * r, _released(_grads())))


# -- compositions that work ------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_chain_named_chain_and_with_extra_args_support(jit):
  expected = jax.tree.map(lambda r: -LR * r, _released(_grads()))
  for tx in (optax.chain(_agg(), optax.sgd(LR)),
             optax.named_chain(("dp", _agg()), ("sgd", optax.sgd(LR))),
             optax.with_extra_args_support(_dpsgd()),
             optax.chain(_agg(), optax.with_extra_args_support(optax.sgd(LR)))):
    out, _ = _update(tx, _grads(), jit=jit)
    _close(out, expected)
  out, _ = _update(optax.with_extra_args_support(_dpsgd()), _grads(), jit=jit, loss=1.0)
  _close(out, expected)


@pytest.mark.parametrize("jit", [False, True])
def test_apply_every_after(jit):
  tx = optax.chain(_agg(), optax.sgd(LR), optax.apply_every(2))
  state = tx.init(PARAMS)
  update = jax.jit(tx.update) if jit else tx.update
  first, state = update(_grads(0), state, PARAMS)
  second, _ = update(_grads(1), state, PARAMS)
  _close(first, jax.tree.map(jnp.zeros_like, PARAMS))
  agg = _agg()
  s = agg.init(PARAMS)
  r0, s = agg.update(_grads(0), s, PARAMS)
  r1, _ = agg.update(_grads(1), s, PARAMS)
  _close(second, jax.tree.map(lambda x, y: -LR * (x + y), r0, r1))


@pytest.mark.parametrize("jit", [False, True])
def test_lookahead(jit):
  params = optax.LookaheadParams.init_synced(PARAMS)
  # Around the DP optimizer (how lookahead is meant to be used): the DP step
  # sees the fast params and per-example gradients; works.
  out, _ = _update(optax.lookahead(_dpsgd(), 2, 0.5), _grads(), params=params, jit=jit)
  assert _shapes(out.fast) == _shapes(PARAMS)
  _close(out.fast, jax.tree.map(lambda r: -LR * r, _released(_grads())))
  # After dp_aggregate in a chain, the chain hands LookaheadParams to the DP
  # step: refused, naming the composition that works.
  with pytest.raises(ValueError, match=r"LookaheadParams.*optax\.lookahead\(optax\.chain\("):
    _update(optax.chain(_agg(), optax.lookahead(optax.sgd(LR), 2, 0.5)), _grads(),
            params=params, jit=jit)


@pytest.mark.parametrize("jit", [False, True])
def test_reduce_on_plateau_after(jit):
  # Works mechanically. Its `value` must be public (e.g. a public validation
  # loss) or privatised: the private batch's loss is not covered (not caught;
  # docs/bad_inputs.md).
  tx = optax.chain(_agg(), optax.sgd(LR), optax.contrib.reduce_on_plateau())
  out, _ = _update(tx, _grads(), jit=jit, value=jnp.float32(1.0))
  _close(out, jax.tree.map(lambda r: -LR * r, _released(_grads())))


@pytest.mark.parametrize("jit", [False, True])
def test_schedule_free(jit):
  # Around: schedule_free evaluates its base optimizer (the DP step) on the
  # per-example gradients and interpolates the noised iterates: post-processing.
  tx = optax.contrib.schedule_free(_dpsgd(), LR)
  out, state = _update(tx, _grads(), jit=jit)
  assert _shapes(out) == _shapes(PARAMS)
  reference = optax.contrib.schedule_free(optax.sgd(LR), LR)
  expected, _ = reference.update(_released(_grads()), reference.init(PARAMS), PARAMS)
  _close(out, expected)
  # After: the same.
  tx = optax.chain(_agg(), optax.contrib.schedule_free(optax.sgd(LR), LR))
  out, _ = _update(tx, _grads(), jit=jit)
  _close(out, expected)


def _inject(**static):
  static_args = tuple(static)
  kwargs = dict(learning_rate=LR, l2_norm_clip=CLIP, noise_multiplier=SIGMA, key=0,
                expected_batch_size=BATCH)
  return optax.inject_hyperparams(optax_dp.dpsgd, static_args=static_args)(**kwargs)


def _dpsgd_updates(steps):
  """The updates of plain dpsgd (key 0) over `steps` steps; the transform is
  garbage once this returns."""
  tx = _dpsgd()
  state, outs = tx.init(PARAMS), []
  for step in range(steps):
    out, state = tx.update(_grads(step), state, PARAMS)
    outs.append(out)
  return outs


@pytest.mark.parametrize("jit", [False, True])
def test_inject_hyperparams(jit):
  privacy = dict.fromkeys(("l2_norm_clip", "noise_multiplier", "key", "expected_batch_size"))
  expected = _dpsgd_updates(3)
  with warnings.catch_warnings():
    # A normal loop: no NoiseKeyReuseWarning (inject_hyperparams rebuilds the
    # DP step at every update; each rebuild replaces the last one).
    warnings.simplefilter("error", _keys.NoiseKeyReuseWarning)
    for tx in ([_inject(**privacy)] if jit else [_inject(), _inject(**privacy)]):
      state = tx.init(PARAMS)
      update = jax.jit(tx.update) if jit else tx.update
      for step in range(3):
        out, state = update(_grads(step), state, PARAMS)
        _close(out, expected[step])
      del tx, update, state
  # Two transforms from one key set up side by side still warn, even when one
  # is a jitted inject_hyperparams (whose inner transform is garbage once
  # traced): the other existed when it released.
  live = _inject(**privacy)
  other = _dpsgd()
  live_state = live.init(PARAMS)
  jax.jit(live.update)(_grads(), live_state, PARAMS)
  with pytest.warns(_keys.NoiseKeyReuseWarning, match="IDENTICAL noise"):
    other.update(_grads(), other.init(PARAMS), PARAMS)
  if jit:
    # The privacy parameters injected as tracers: refused, saying static_args.
    with pytest.raises(ValueError, match=r"traced.*static_args=\('l2_norm_clip'"):
      _update(_inject(), _grads(), jit=True)
    with pytest.raises(ValueError, match=r"traced.*static_args"):
      _update(_inject(key=None, expected_batch_size=None), _grads(), jit=True)
  # The learning rate stays injected (and can be scheduled) after the DP step.
  tx = optax.chain(_agg(), optax.inject_hyperparams(optax.sgd)(learning_rate=LR))
  out, _ = _update(tx, _grads(), jit=jit)
  _close(out, jax.tree.map(lambda r: -LR * r, _released(_grads())))


def test_flax_trainstate_and_donate_argnums():
  model = models.MLP((4, 2))
  x = jax.random.normal(jax.random.key(1), (BATCH, 3))
  y = jnp.arange(BATCH) % 2
  params = model.init(jax.random.key(0), x)

  def loss_fn(p, batch):
    xs, ys = batch
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xs), ys).mean()

  grad_fn = optax_dp.clipped_grads(loss_fn, CLIP)

  def step(state, batch):
    return state.apply_gradients(grads=grad_fn(state.params, batch))

  def run(donate):
    _keys._reset_noise_key_registry()  # pylint: disable=protected-access
    state = train_state.TrainState.create(  # a copy: donation deletes the buffers
        apply_fn=model.apply, params=jax.tree.map(jnp.copy, params), tx=_dpsgd())
    jitted = jax.jit(step, donate_argnums=(0,) if donate else ())
    for _ in range(3):
      state = jitted(state, (x, y))
    return state

  plain, donated = run(False), run(True)
  assert _shapes(plain.params) == _shapes(params)
  assert int(plain.opt_state[0].step) == 3
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(donated.params)):
    np.testing.assert_array_equal(a, b)
  # The DP step really ran: the update is the noised mean, not the raw one.
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), plain.params, params)
  assert min(jax.tree.leaves(moved)) > 0
