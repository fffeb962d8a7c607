"""Users as the privacy unit (optax_dp/_grads/_privacy_units.py): a 2-D mask
(users x examples) makes `clipped_grads` clip each user's summed gradient.

Every path is checked against a float64 reference built from per-example
gradients: sum each user's real examples' gradients, clip to C, add.
"""

import warnings

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_dp
import example_runs
import models

lm = example_runs.import_example("lm_models")

U, K, T, VOCAB = 5, 3, 6, 23
# Users with 3, 1, 2, 0 (a padding row) and 3 real examples of K = 3 slots.
MASK = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1]], bool)
CONFIG = lm.LMConfig(vocab_size=VOCAB, length=T, features=16, heads=2, layers=1)
is_clipped = lambda x: isinstance(x, optax_dp.ClippedGrads)


def _windows(seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (U, K, T + 1)), jnp.int32)


def _features(seed=0, shape=(5,)):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(U, K) + shape), jnp.float32),
          jnp.asarray(rng.integers(0, 3, (U, K)), jnp.int32))


def _f64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _sums(clipped):
  """The leaves of a clipped sum (NNX: one ClippedGrads per variable)."""
  return [np.asarray(leaf, np.float64) for c in jax.tree.leaves(clipped, is_leaf=is_clipped)
          for leaf in jax.tree.leaves(c.clipped_sum)]


def _units(clipped):
  return {c.privacy_unit for c in jax.tree.leaves(clipped, is_leaf=is_clipped)}


def reference(loss_fn, params, batch, mask, clip, groups=None):
  """float64: per-example gradients (each example alone), summed per user
  over its real examples, clipped (per group of leaves if `groups`), added."""
  flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)
  rows = _f64(optax_dp.per_example_grads(loss_fn)(params, flat))
  m = np.asarray(mask).reshape(-1)
  users = [np.where(m.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0.0).reshape(
      (mask.shape[0], mask.shape[1]) + g.shape[1:]).sum(axis=1) for g in rows]
  groups = [0] * len(users) if groups is None else groups
  clips = clip if isinstance(clip, (list, tuple)) else [clip]
  out = [np.zeros(u.shape[1:]) for u in users]
  for u in range(mask.shape[0]):
    for g, c in enumerate(clips):
      idx = [i for i in range(len(users)) if groups[i] == g]
      norm = np.sqrt(sum(np.sum(users[i][u] ** 2) for i in idx))
      factor = min(1.0, c / norm) if norm > 0 else 1.0
      for i in idx:
        out[i] += users[i][u] * factor
  return out


def assert_close(got, want, rtol=1e-5):
  num = np.sqrt(sum(np.sum((g - w) ** 2) for g, w in zip(got, want)))
  den = np.sqrt(sum(np.sum(w ** 2) for w in want))
  assert num <= rtol * den, (num / den, [g.shape for g in got])


def _linen_mlp():
  model = models.MLP((7, 3), activation=jnp.tanh)
  params = model.init(jax.random.key(0), jnp.zeros((1, 5)))["params"]

  def loss_fn(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": params}, x), y).mean()
  return loss_fn, params, _features()


def _linen_cnn():
  model = models.SmallCNN(features=3, classes=3)
  params = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))["params"]

  def loss_fn(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": params}, x), y).mean()
  return loss_fn, params, _features(shape=(6, 6, 1))


def _linen_lm():
  model = lm.LinenCharTransformer(CONFIG)
  params = model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"]

  def loss_fn(params, window):
    return lm.next_char_loss(model.apply({"params": params}, window[:, :-1]), window)
  return loss_fn, params, _windows()


def _nnx_loss(model, window):
  return lm.nnx_loss(model, window)[0]


LINEN = {"mlp": _linen_mlp, "cnn": _linen_cnn, "transformer": _linen_lm}


@pytest.mark.parametrize("method,microbatch_size", [
    ("vmap", None), ("ghost", None), ("auto", None), ("ghost", 2), ("vmap", 2)])
@pytest.mark.parametrize("model", sorted(LINEN))
def test_linen_user_sum_equals_the_reference(model, method, microbatch_size):
  loss_fn, params, batch = LINEN[model]()
  clip = 0.05 if model == "transformer" else 0.3
  fn = jax.jit(optax_dp.clipped_grads(loss_fn, clip, method=method,
                                      microbatch_size=microbatch_size))
  out = fn(params, batch, MASK)
  assert out.privacy_unit == "user" and out.batch_size == U
  assert_close(_sums(out), reference(loss_fn, params, batch, MASK, clip))


def _nnx_models():
  transformer = lm.CharTransformer(CONFIG, rngs=nnx.Rngs(0))
  lstm = lm.CharLSTM(VOCAB, features=8, rngs=nnx.Rngs(1))
  lora = lm.add_lora(lm.CharTransformer(CONFIG, rngs=nnx.Rngs(2)), 2, rngs=nnx.Rngs(3))
  # LoRA's B starts at zero: move it, so that every adapter has a gradient.
  for _, v in nnx.iter_graph(lora):
    if isinstance(v, nnx.LoRAParam):
      v.value = v.value + 0.1
  return {"transformer": (transformer, nnx.Param), "lstm": (lstm, nnx.Param),
          "lora": (lora, nnx.LoRAParam)}


@pytest.mark.parametrize("method", ["auto", "vmap"])
@pytest.mark.parametrize("name", ["transformer", "lstm", "lora"])
def test_nnx_user_sum_equals_the_reference(name, method):
  model, wrt = _nnx_models()[name]
  windows, clip = _windows(1), 0.05
  with warnings.catch_warnings():
    warnings.simplefilter("error", optax_dp.PerExampleFallbackWarning)  # all book-kept
    out = optax_dp.clipped_grads(_nnx_loss, clip, method=method, wrt=wrt)(
        model, windows, MASK)
  assert _units(out) == {"user"}
  flat = windows.reshape((-1, T + 1))
  rows = _f64(nnx.as_pure(optax_dp.per_example_grads(_nnx_loss, wrt=wrt)(
      model, flat)))
  want = _reference_from_rows(rows, MASK, clip)
  assert_close(_sums(nnx.as_pure(out)), want)


def _reference_from_rows(rows, mask, clip):
  m = mask.reshape(-1)
  users = [np.where(m.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0.0).reshape(
      mask.shape + g.shape[1:]).sum(axis=1) for g in rows]
  norms = np.sqrt(sum(np.sum(u.reshape(len(u), -1) ** 2, axis=1) for u in users))
  factors = np.minimum(1.0, clip / np.where(norms > 0, norms, 1.0))
  return [np.tensordot(factors, u, axes=1) for u in users]


def test_group_wise_clipping_clips_each_users_groups():
  loss_fn, params, batch = _linen_mlp()
  groups = optax_dp.clip_groups({"Dense_0": 0.2, "Dense_1": 0.1})
  out = optax_dp.clipped_grads(loss_fn, groups, method="ghost")(params, batch, MASK)
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  leaf_groups = [0 if "Dense_0" in n else 1 for n in names]
  assert_close(_sums(out), reference(loss_fn, params, batch, MASK, [0.2, 0.1], leaf_groups))


def test_adaptive_clipping_counts_users():
  loss_fn, params, batch = _linen_mlp()
  adaptive = optax_dp.AdaptiveClip(initial_l2_norm_clip=0.3, target_quantile=0.5)
  out = optax_dp.clipped_grads(loss_fn, adaptive)(params, batch, MASK, l2_norm_clip=0.3)
  # The count is over the 4 real users: +1/2 for each unclipped, -1/2 for each clipped.
  user_norms = [np.sqrt(sum(np.sum(u ** 2) for u in user)) for user in _user_grads(
      loss_fn, params, batch, MASK)]
  want = sum(0.5 if n <= 0.3 else -0.5 for n in user_norms)
  assert float(out.unclipped_count) == pytest.approx(want)
  assert_close(_sums(out), reference(loss_fn, params, batch, MASK, 0.3))


def _user_grads(loss_fn, params, batch, mask):
  """Each real user's summed gradient (a list of leaves), float64."""
  flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)
  rows = _f64(optax_dp.per_example_grads(loss_fn)(params, flat))
  m = mask.reshape(-1)
  return [[np.sum(g.reshape(mask.shape + g.shape[1:])[u][mask[u]], axis=0) for g in rows]
          for u in range(mask.shape[0]) if mask[u].any()]


def test_accumulated_user_batches_equal_one_noiseless_release():
  loss_fn, params, batch = _linen_mlp()
  clip, expected = 0.3, 8
  fn = optax_dp.clipped_grads(loss_fn, clip)
  tx = optax_dp.dp_accumulate(optax_dp.dp_aggregate(clip, 0.0, key=0, expected_batch_size=expected), 2)
  state = tx.init(params)
  halves = [jax.tree.map(lambda x: x[:3], batch), jax.tree.map(lambda x: x[3:], batch)]
  masks = [MASK[:3], MASK[3:]]
  for half, m in zip(halves, masks):
    out, state = tx.update(fn(params, half, m), state, params)
  want = [w / expected for w in reference(loss_fn, params, batch, MASK, clip)]
  assert_close(_f64(out), want)


def _one_user_moves(loss_fn, params, batch, mask, clip):
  """The largest norm by which removing one user changes the clipped sum."""
  fn = jax.jit(optax_dp.clipped_grads(loss_fn, clip))
  full = _sums(fn(params, batch, mask))
  moves = []
  for u in range(mask.shape[0]):
    without = mask.copy()
    without[u] = False
    rest = _sums(fn(params, batch, without))
    moves.append(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(full, rest))))
  return max(moves)


def test_removing_one_user_moves_the_sum_by_at_most_c_and_an_adversary_attains_it():
  clip = 0.3
  params = {"w": jnp.zeros(4)}

  def loss_fn(w, x):   # the gradient of example x is x itself
    return jnp.mean(x @ w["w"])

  rng = np.random.default_rng(0)
  x = rng.normal(size=(U, K, 4)).astype(np.float32) * 0.05
  # An adversarial user: K examples of norm C each, all in one direction.
  x[0] = np.array([clip, 0, 0, 0], np.float32)
  mask = np.ones((U, K), bool)
  moved = _one_user_moves(loss_fn, params, jnp.asarray(x), mask, clip)
  assert moved == pytest.approx(clip, rel=1e-4)
  # Per-example clipping (the mask flattened) would let that user move it by K * C.
  flat = optax_dp.clipped_grads(loss_fn, clip)(
      params, jnp.asarray(x[:1]).reshape(K, 4), mask[:1].reshape(-1))
  assert np.linalg.norm(_sums(flat)[0]) == pytest.approx(K * clip, rel=1e-4)


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_removing_any_user_moves_a_real_model_by_at_most_c(model):
  loss_fn, params, batch = LINEN[model]()
  clip = 0.05
  assert _one_user_moves(loss_fn, params, batch, MASK, clip) <= clip * (1 + 1e-5)


def test_a_per_example_clip_fails_the_reference_check():
  """The planted bug: clipping each example instead of each user (the 2-D
  mask flattened) gives another sum, and the reference check says so."""
  loss_fn, params, batch = _linen_mlp()
  clip = 0.05
  flat_batch = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)
  per_example = optax_dp.clipped_grads(loss_fn, clip)(params, flat_batch, MASK.reshape(-1))
  assert per_example.privacy_unit == "example"
  with pytest.raises(AssertionError):
    assert_close(_sums(per_example), reference(loss_fn, params, batch, MASK, clip))


def test_values_and_aux_keep_the_users_layout():
  model = nn.Dense(3)
  params = model.init(jax.random.key(0), jnp.zeros((1, 5)))["params"]

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean(), logits

  batch = _features()
  for method in ("vmap", "ghost"):
    (losses, logits), clipped = optax_dp.value_and_clipped_grads(
        loss_fn, 1.0, has_aux=True, method=method)(params, batch, MASK)
    assert losses.shape == (U, K) and logits.shape == (U, K, 3)
    assert np.all(np.asarray(losses)[~MASK] == 0) and np.all(np.asarray(losses)[MASK] > 0)


def test_a_batch_without_the_users_axes_is_refused():
  loss_fn, params, (x, y) = _linen_mlp()
  with pytest.raises(ValueError, match=r"mask must have shape.*users x examples per user.*gather_batch"):
    optax_dp.clipped_grads(loss_fn, 1.0)(params, (x.reshape(U * K, 5), y.reshape(-1)), MASK)


def test_dp_aggregate_refuses_a_unit_its_budget_does_not_account_for():
  loss_fn, params, batch = _linen_mlp()
  ids = np.repeat(np.arange(20), 3)
  users = optax_dp.privacy_budget(
      sampler=optax_dp.UserPoissonSampler(ids, expected_users=4, max_examples_per_user=K),
      noise_multiplier=1.0, target_delta=1e-5, steps=10)
  examples = optax_dp.privacy_budget(
      sampler=optax_dp.PoissonSampler(60, 4), noise_multiplier=1.0, target_delta=1e-5,
      steps=10)
  fn = optax_dp.clipped_grads(loss_fn, 0.3)
  user_sum = fn(params, batch, MASK)
  flat_batch = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)
  example_sum = fn(params, flat_batch, MASK.reshape(-1))
  tx_users = optax_dp.dp_aggregate(0.3, key=0, budget=users)
  tx_users.update(user_sum, tx_users.init(params), params)   # accepted
  with pytest.raises(ValueError, match="clipped per example.*2-D mask"):
    tx_users.update(example_sum, tx_users.init(params), params)
  per_example = optax_dp.per_example_grads(loss_fn)(params, flat_batch)
  with pytest.raises(ValueError, match="clipped per example"):
    tx_users.update(per_example, tx_users.init(params), params)
  tx_examples = optax_dp.dp_aggregate(0.3, key=1, budget=examples)
  with pytest.raises(ValueError, match="clipped per user"):
    tx_examples.update(user_sum, tx_examples.init(params), params)


_DEVICES_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax, optax_dp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import models
assert len(jax.devices()) == 8
model = models.MLP((7, 3), activation=jnp.tanh)
params = model.init(jax.random.key(0), jnp.zeros((1, 5)))["params"]
def loss_fn(params, batch):
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y).mean()
rng = np.random.default_rng(0)
users, k = 16, 3
x = rng.normal(size=(users, k, 5)).astype(np.float32)
y = rng.integers(0, 3, (users, k)).astype(np.int32)
mask = rng.random((users, k)) < 0.7
mask[3] = False                           # a padding user
mesh = Mesh(np.array(jax.devices()), ("data",))
out = {}
for method in ("vmap", "auto"):
  fn = optax_dp.clipped_grads(loss_fn, 0.2, method=method)
  one = jax.jit(fn)(params, (x, y), mask)
  sharded = jax.device_put(((x, y), mask), NamedSharding(mesh, P("data")))
  jit_sharded = jax.jit(fn)(params, *sharded)
  shard_map = jax.jit(optax_dp.sharded_clipped_grads(loss_fn, 0.2, mesh=mesh, method=method))(
      params, (x, y), mask)
  ref = np.concatenate([np.ravel(a) for a in jax.tree.leaves(one.clipped_sum)])
  for name, got in (("jit_sharded", jit_sharded), ("shard_map", shard_map)):
    flat = np.concatenate([np.ravel(a) for a in jax.tree.leaves(got.clipped_sum)])
    out[f"{method}_{name}"] = [float(np.linalg.norm(flat - ref) / np.linalg.norm(ref)),
                               got.privacy_unit, got.batch_size]
json.dump(out, sys.stdout)
"""


@pytest.mark.subprocess
def test_user_batches_on_8_devices_equal_1_device():
  import os, subprocess, sys, json
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                 [here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
  done = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(done.stdout)
  assert len(results) == 4
  for name, (rel, unit, batch_size) in results.items():
    assert rel <= 1e-5, name
    assert unit == "user" and batch_size == 16, name


class _PositionTable(nn.Module):
  """A layer with no book-keeping rule (generic: its own VJP), called on an
  input without the batch axis: positions arange(T), shared by every row."""

  @nn.compact
  def __call__(self, positions):
    table = self.param("table", nn.initializers.normal(1.0), (T, 4))
    return jnp.tanh(table[positions] * 2.0)


class _WithPositions(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4)(x) + _PositionTable()(jnp.arange(x.shape[1]))[None]
    return nn.Dense(3)(nn.LayerNorm()(h))


def test_a_generic_layer_without_the_batch_axis_is_grouped_by_its_row_gradients():
  model = _WithPositions()
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(U, K, T, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, (U, K, T)), jnp.int32)
  params = model.init(jax.random.key(0), x[0])["params"]

  def loss_fn(params, batch):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": params}, batch[0]), batch[1]).mean()

  plan = optax_dp.clipping_plan(loss_fn, params, (x[:, 0], y[:, 0]))
  assert plan["['_PositionTable_0']['table']"] == "generic"
  out = optax_dp.clipped_grads(loss_fn, 0.05, method="ghost")(params, (x, y), MASK)
  assert_close(_sums(out), reference(loss_fn, params, (x, y), MASK, 0.05))
