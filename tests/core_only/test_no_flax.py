"""optax_dp with its core dependencies only: a plain-JAX model, no Flax installed.

The library depends on jax, optax, chex, dp-accounting, numpy and scipy; Flax
is an extra. This file is what must work for a user who installed only those
(issue 31, point 1): `clipped_grads` / `value_and_clipped_grads` /
`per_example_grads` on a loss of plain arrays, `dp_aggregate` in an optax
chain with a privacy budget, the accountant and the `optax-dp` CLI.

It runs in a real second environment: `tests/test_packaging.py` builds the
wheel, installs it with pytest (nothing else) into a fresh virtual
environment, checks that `import flax` fails there, and runs this file in it
(it must pass there with nothing skipped). In the main test environment Flax
is installed, so the whole module skips: a mocked-out import would not prove
that optax_dp never touches Flax on these paths.

Every figure is checked against an independent reference written here with
`jax.vmap(jax.grad(...))` and the clipping formula
`clip_C(g) = g * min(1, C / ||g||)`.
"""

import importlib.util
import math
import os
import pathlib
import subprocess
import sys
import warnings

import pytest

if importlib.util.find_spec("flax") is not None:
  pytest.skip("core-only environment test: flax is installed here (tests/test_packaging.py "
              "runs this file in a fresh venv with the core dependencies only)",
              allow_module_level=True)

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_dp

IN_DIM, HIDDEN, CLASSES = 6, 24, 3
BATCH = 16        # static batch shape
REAL = 11         # real rows; the rest is padding (garbage values, mask False)


def _init_mlp(key):
  """A two-layer MLP as a dict of plain arrays (no Flax)."""
  k1, k2 = jax.random.split(key)
  return {
      "hidden": {"w": jax.random.normal(k1, (IN_DIM, HIDDEN)) / math.sqrt(IN_DIM),
                 "b": jnp.zeros(HIDDEN)},
      "out": {"w": jax.random.normal(k2, (HIDDEN, CLASSES)) / math.sqrt(HIDDEN),
              "b": jnp.zeros(CLASSES)},
  }


def _logits(params, x):
  h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
  return h @ params["out"]["w"] + params["out"]["b"]


def loss_fn(params, batch):
  """An ordinary batched loss: the mean cross-entropy of `batch = (x, y)`."""
  x, y = batch
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(_logits(params, x), y))


def _data(key, n):
  kx, ky = jax.random.split(key)
  x = jax.random.normal(kx, (n, IN_DIM))
  y = jax.random.randint(ky, (n,), 0, CLASSES)
  return x, y


def _batch_and_mask():
  """A padded batch: REAL real rows, then padding rows of large garbage values."""
  x, y = _data(jax.random.key(1), BATCH)
  x = x.at[REAL:].set(1e3 * x[REAL:])   # padding that would dominate if not masked
  mask = jnp.arange(BATCH) < REAL
  return (x, y), mask


def _reference_per_example(params, batch):
  """Per-example gradients by hand: jax.grad of the loss on a batch of one."""
  x, y = batch
  return jax.vmap(lambda xi, yi: jax.grad(loss_fn)(params, (xi[None], yi[None])))(x, y)


def _reference_norms(per_example):
  leaves = jax.tree.leaves(per_example)
  return jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in leaves))


def _reference_clipped_sum(params, batch, mask, clip):
  per_example = _reference_per_example(params, batch)
  norms = _reference_norms(per_example)
  factor = jnp.minimum(1.0, clip / norms)
  weight = factor if mask is None else factor * mask
  return jax.tree.map(lambda g: jnp.tensordot(weight, g, axes=1), per_example)


def _clip_norm(params, batch, mask):
  """A clip between the real rows' per-example norms: some clipped, some not."""
  norms = np.asarray(_reference_norms(_reference_per_example(params, batch)))[np.asarray(mask)]
  clip = float(np.median(norms))
  assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any(), norms
  return clip


def _assert_trees_close(actual, expected, rtol=2e-5, atol=1e-6):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


def _global_norm(tree):
  return math.sqrt(sum(float(np.sum(np.square(leaf))) for leaf in jax.tree.leaves(tree)))


def test_flax_is_not_installed_and_optax_dp_does_not_need_it():
  with pytest.raises(ModuleNotFoundError):
    import flax  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  assert "flax" not in sys.modules
  assert optax_dp.__version__.count(".") >= 2


def test_version_matches_the_installed_metadata():
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  assert metadata.version("optax_dp") == optax_dp.__version__


@pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("method", [None, "auto", "vmap"], ids=["default", "auto", "vmap"])
def test_clipped_grads_equal_the_clipped_per_example_reference(method, use_mask):
  params = _init_mlp(jax.random.key(0))
  batch, mask = _batch_and_mask()
  if not use_mask:   # no padding: the real rows only
    batch, mask = jax.tree.map(lambda a: a[:REAL], batch), None
  clip = _clip_norm(params, batch, jnp.ones(REAL, bool) if mask is None else mask)
  options = {} if method is None else {"method": method}
  with warnings.catch_warnings():
    # Plain arrays have no layers to book-keep: "auto" must not warn about a fallback.
    warnings.simplefilter("error", optax_dp.PerExampleFallbackWarning)
    grad_fn = jax.jit(optax_dp.clipped_grads(loss_fn, clip, **options))
    clipped = grad_fn(params, batch) if mask is None else grad_fn(params, batch, mask)
  assert isinstance(clipped, optax_dp.ClippedGrads)
  assert float(clipped.l2_norm_clip) == pytest.approx(clip)
  expected = _reference_clipped_sum(params, batch, mask, clip)
  _assert_trees_close(clipped.clipped_sum, expected)
  # Each of the REAL examples contributes at most C.
  assert _global_norm(clipped.clipped_sum) <= REAL * clip * (1 + 1e-5)


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_value_and_clipped_grads_losses_and_sum(method):
  params = _init_mlp(jax.random.key(2))
  batch, mask = _batch_and_mask()
  clip = _clip_norm(params, batch, mask)
  fn = jax.jit(optax_dp.value_and_clipped_grads(loss_fn, clip, method=method))
  losses, clipped = fn(params, batch, mask)
  x, y = batch
  expected_losses = jax.vmap(lambda xi, yi: loss_fn(params, (xi[None], yi[None])))(x, y)
  assert losses.shape == (BATCH,)
  np.testing.assert_allclose(np.asarray(losses)[:REAL], np.asarray(expected_losses)[:REAL],
                             rtol=2e-5)
  _assert_trees_close(clipped.clipped_sum, _reference_clipped_sum(params, batch, mask, clip))


def test_per_example_grads_equal_vmap_grad_and_padding_is_zeroed():
  params = _init_mlp(jax.random.key(3))
  batch, mask = _batch_and_mask()
  grads = jax.jit(optax_dp.per_example_grads(loss_fn))(params, batch, mask)
  expected = jax.tree.map(lambda g: g * mask.reshape((-1,) + (1,) * (g.ndim - 1)),
                          _reference_per_example(params, batch))
  _assert_trees_close(grads, expected)
  assert all(float(jnp.abs(g[REAL:]).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_clipping_plan_of_a_plain_jax_loss_is_per_example():
  params = _init_mlp(jax.random.key(4))
  batch, _ = _batch_and_mask()
  plan = optax_dp.clipping_plan(loss_fn, params, batch)
  assert len(plan) == len(jax.tree.leaves(params))
  assert all(name in path for path, name in zip(
      sorted(plan), ["b", "w", "b", "w"])), plan   # keys are the parameter paths
  assert set(plan.values()) == {"per-example"}, plan


def test_per_example_grads_through_dp_aggregate_equal_clipped_grads():
  """dp_aggregate clips raw per-example gradients itself; no noise: exact."""
  params = _init_mlp(jax.random.key(5))
  batch, mask = _batch_and_mask()
  clip = _clip_norm(params, batch, mask)
  with pytest.warns(UserWarning, match="NOT differentially private"):
    tx = optax.chain(optax_dp.dp_aggregate(clip, noise_multiplier=0.0, key=jax.random.key(6),
                                           expected_batch_size=REAL),
                     optax.sgd(0.5))
  state = tx.init(params)
  from_per_example, _ = jax.jit(tx.update)(
      optax_dp.per_example_grads(loss_fn)(params, batch, mask), state, params)
  from_clipped, _ = jax.jit(tx.update)(
      optax_dp.clipped_grads(loss_fn, clip)(params, batch, mask), state, params)
  expected = jax.tree.map(lambda s: -0.5 * s / REAL,
                          _reference_clipped_sum(params, batch, mask, clip))
  _assert_trees_close(from_per_example, expected)
  _assert_trees_close(from_clipped, expected)


def test_private_training_with_a_poisson_sampler_and_a_budget():
  """The README's loop on a plain-JAX MLP: sampler, budget, chain, epsilon spent."""
  dataset_size, expected_batch_size, steps, lr = 1024, 64, 4, 0.5
  data = _data(jax.random.key(7), dataset_size)
  # padding_buckets=None: one static batch shape, one compilation of the step.
  sampler = optax_dp.PoissonSampler(dataset_size=dataset_size,
                                    expected_batch_size=expected_batch_size,
                                    padding_buckets=None)
  budget = optax_dp.privacy_budget(sampler=sampler, noise_multiplier=1.0, target_delta=1e-5,
                                   steps=steps)   # calibration: test_calibration_and_epsilon
  assert budget.max_steps == steps and budget.noise_multiplier == 1.0
  clip = 0.5
  tx = optax.chain(optax_dp.dp_aggregate(l2_norm_clip=clip, key=jax.random.key(8),
                                         budget=budget),
                   optax.sgd(lr))
  grad_fn = optax_dp.clipped_grads(loss_fn, l2_norm_clip=clip)

  @jax.jit
  def train_step(params, opt_state, rows):
    grads = grad_fn(params, rows)   # rows: gather_batch's MaskedBatch (rows and mask together)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, updates, grads

  params = _init_mlp(jax.random.key(9))
  opt_state = tx.init(params)
  sigma_c = budget.noise_multiplier * clip
  num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
  noise_parts = []
  for batch in sampler.batches(0, steps=budget.max_steps):
    params, opt_state, updates, grads = train_step(params, opt_state,
                                                   optax_dp.gather_batch(data, batch))
    # update = -lr * (clipped sum + N(0, (sigma C)^2)) / expected_batch_size
    updates, clipped_sum = jax.device_get((updates, grads.clipped_sum))
    noise_parts.extend(np.ravel(-u * expected_batch_size / lr - s) for u, s in
                       zip(jax.tree.leaves(updates), jax.tree.leaves(clipped_sum)))
    assert _global_norm(clipped_sum) <= int(batch.mask.sum()) * clip * (1 + 1e-5)
  assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(params))
  noise = np.concatenate(noise_parts)
  assert noise.size == steps * num_params
  # The noise has the budget's standard deviation sigma * C (a 6-standard-error band).
  assert abs(noise.std() / sigma_c - 1) < 6 / math.sqrt(2 * noise.size)
  assert abs(noise.mean()) < 6 * sigma_c / math.sqrt(noise.size)
  spent = budget.epsilon_spent(opt_state)
  assert spent == pytest.approx(budget.epsilon(steps))
  assert spent == pytest.approx(optax_dp.compute_epsilon(1.0, 1e-5, steps=steps, sampler=sampler))
  assert 0 < spent < budget.epsilon(steps + 1)
  with pytest.raises(optax_dp.PrivacyBudgetExceededError):   # step max_steps + 1, eagerly
    tx.update(grads, opt_state, params)


def test_calibration_and_epsilon():
  args = dict(steps=100, dataset_size=60000, batch_size=256)
  sigma = optax_dp.calibrate_noise_multiplier(1.0, 1e-5, **args)
  assert optax_dp.compute_epsilon(sigma, 1e-5, **args) <= 1.0
  assert optax_dp.compute_epsilon(sigma - 2e-3, 1e-5, **args) > 1.0   # the smallest such sigma
  sampler = optax_dp.PoissonSampler(dataset_size=60000, expected_batch_size=256)
  budget = optax_dp.privacy_budget(sampler=sampler, target_epsilon=1.0, target_delta=1e-5,
                                   steps=100)
  assert budget.noise_multiplier == pytest.approx(sigma, rel=1e-9)
  # The value the CLI's doctest prints, through the library.
  assert round(optax_dp.compute_epsilon(1.1, 1e-5, steps=1000, dataset_size=60000,
                                        batch_size=256), 2) == 0.6


def test_cli_version_and_calibrate(capsys):
  # The installed console script (in a virtual environment, beside the interpreter).
  script = pathlib.Path(sys.executable).with_name("optax-dp")
  command = [str(script)] if script.exists() else [sys.executable, "-m", "optax_dp"]
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  flags = ["--dataset-size", "60000", "--batch-size", "256", "--steps", "100",
           "--epsilon", "1", "--delta", "1e-5"]
  text = subprocess.run(command + ["calibrate", *flags], capture_output=True, text=True,
                        timeout=300, env=env, check=False)
  assert text.returncode == 0, text.stderr
  sigma = optax_dp.calibrate_noise_multiplier(1.0, 1e-5, steps=100, dataset_size=60000,
                                              batch_size=256)
  assert text.stdout.splitlines()[0] == f"Noise multiplier: {sigma}"
  assert "60000" in text.stdout   # the statement names the run it describes
  version = subprocess.run([sys.executable, "-m", "optax_dp", "--version"], capture_output=True,
                           text=True, timeout=300, env=env, check=False)
  assert version.stdout.strip() == f"optax-dp {optax_dp.__version__}", version.stderr
  # Bad input: status 2 and a message (in-process: no third interpreter start).
  from optax_dp import _cli  # pylint: disable=import-outside-toplevel
  assert _cli.main(["calibrate", *flags[:-1], "2"]) == 2   # delta 2
  assert "delta" in capsys.readouterr().err
