"""clipped_grads: the ghost / book-keeping path equals the vmap reference."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_dp

import models


def _reference_clipped_sum(loss_fn, params, batch, clip, mask=None):
  """Independent reference: per-example grads by a Python loop, clipped in float64."""
  n = jax.tree.leaves(batch)[0].shape[0]
  grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b)))
  total = None
  norms = []
  for i in range(n):
    g = grad(params, jax.tree.map(lambda x: x[i:i + 1], batch))
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(g)]
    norm = np.sqrt(sum(np.sum(x * x) for x in leaves))
    norms.append(norm)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    if mask is not None and not mask[i]:
      factor = 0.0
    scaled = [x * factor for x in leaves]
    total = scaled if total is None else [a + b for a, b in zip(total, scaled)]
  return total, np.array(norms)


def _check_model(model, x, y=None, method="auto", rtol=2e-5, batch=6, seed=0,
                 init_kwargs=None, loss_kind="mse"):
  params = model.init(jax.random.key(seed), x[:1], **(init_kwargs or {}))["params"]
  params = jax.tree.map(
      lambda p: p + 0.3 * jax.random.normal(jax.random.key(seed + 1), p.shape, p.dtype), params)

  def loss_fn(p, b):
    out = model.apply({"params": p}, b[0])
    if loss_kind == "mse":
      return jnp.mean(jnp.sum(jnp.square(out - 0.5).reshape(out.shape[0], -1), -1))
    return optax.softmax_cross_entropy_with_integer_labels(
        out.reshape(out.shape[0], -1, out.shape[-1]),
        b[1].reshape(out.shape[0], -1)).mean()

  data = (x, y if y is not None else jnp.zeros((x.shape[0],), jnp.int32))
  # Clip at the median norm: about half the examples are clipped, half not.
  _, norms = _reference_clipped_sum(loss_fn, params, data, 1.0)
  clip = float(np.median(norms))
  assert np.sum(norms > clip) >= 1 and np.sum(norms < clip) >= 1
  mask = np.arange(x.shape[0]) != 1           # one padding example
  want, _ = _reference_clipped_sum(loss_fn, params, data, clip, mask)
  got = jax.jit(optax_dp.clipped_grads(loss_fn, clip, method=method))(params, data, mask)
  assert isinstance(got, optax_dp.ClippedGrads)
  scale = max(np.max(np.abs(w)) for w in want)
  for g, w in zip(jax.tree.leaves(got.clipped_sum), want):
    assert g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol, atol=rtol * scale)
  return got


def _x(shape, seed=3):
  return jax.random.normal(jax.random.key(seed), shape)


_MLP = models.MLP((7, 3), nn.tanh)


@pytest.mark.parametrize("method", ["ghost", "auto"])
def test_dense(method):
  _check_model(_MLP, _x((6, 5)), method=method)


class SeqDense(nn.Module):
  features: int = 4

  @nn.compact
  def __call__(self, x):  # x: (B, T, d): Dense over a sequence, T=9 and T=2
    h = nn.Dense(self.features)(x)
    return nn.Dense(2, use_bias=False)(nn.relu(h))


@pytest.mark.slow
@pytest.mark.parametrize("seq,features", [(9, 4), (2, 64), (16, 3)])
def test_dense_with_sequence_dims_both_norm_formulas(seq, features):
  # (T=2, p=64) takes the ghost formula, (T=9/16, small p) the materialised one.
  _check_model(SeqDense(features=features), _x((6, seq, 5)), method="ghost")


class ConvNet(nn.Module):
  kernel: tuple = (3, 3)
  strides: tuple = (1, 1)
  padding: object = "SAME"
  dilation: tuple = (1, 1)
  groups: int = 1

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(4, self.kernel, strides=self.strides, padding=self.padding,
                kernel_dilation=self.dilation, feature_group_count=self.groups)(x)
    h = nn.tanh(h).reshape((x.shape[0], -1))
    return nn.Dense(3)(h)


@pytest.mark.parametrize("kw", [
    dict(),
    pytest.param(dict(kernel=(3, 2), strides=(2, 1), padding="VALID"), marks=pytest.mark.slow),
    pytest.param(dict(kernel=(2, 2), strides=(2, 2), padding=((1, 0), (0, 2))),
                 marks=pytest.mark.slow),
    pytest.param(dict(kernel=(3, 3), dilation=(2, 1), padding=1), marks=pytest.mark.slow),
    dict(kernel=(1, 1)),
    dict(groups=2),                      # grouped: generic per-layer VJP
])
def test_conv2d_variants(kw):
  _check_model(ConvNet(**kw), _x((6, 7, 6, 2)), method="ghost")


class Conv1D3D(nn.Module):
  dims: int = 1

  @nn.compact
  def __call__(self, x):
    k = (3,) * self.dims
    s = (2,) + (1,) * (self.dims - 1)
    h = nn.Conv(3, k, strides=s, padding="SAME")(x)
    return nn.Dense(2)(nn.relu(h).reshape((x.shape[0], -1)))


@pytest.mark.slow
@pytest.mark.parametrize("dims,shape", [(1, (6, 9, 2)), (3, (6, 4, 5, 3, 2))])
def test_conv_1d_and_3d(dims, shape):
  _check_model(Conv1D3D(dims=dims), _x(shape), method="ghost")


class Mixed(nn.Module):
  """Embed, LayerNorm, GroupNorm, RMSNorm (the norm rule), DenseGeneral,
  ConvTranspose, a LayerNorm over positions (the generic rule)."""

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(11, 8)(tokens)                          # (B, T, 8)
    h = nn.LayerNorm()(h)
    h = nn.DenseGeneral((2, 4))(h)                       # (B, T, 2, 4)
    h = nn.DenseGeneral(8, axis=(-2, -1))(h)             # (B, T, 8): dense, flattened
    h = nn.RMSNorm()(nn.gelu(h))
    h = nn.GroupNorm(num_groups=2)(h)
    h = nn.LayerNorm(reduction_axes=-2, feature_axes=-2)(h)  # over positions: generic
    h = nn.ConvTranspose(3, (2,), strides=(2,))(h)       # (B, 2T, 3)
    return nn.Dense(5)(h)


@pytest.mark.slow
def test_mixed_layer_types_generic_path():
  tokens = jax.random.randint(jax.random.key(5), (6, 5), 0, 11)
  labels = jax.random.randint(jax.random.key(6), (6, 10), 0, 5)
  _check_model(Mixed(), tokens, labels, method="ghost", loss_kind="ce")


class Shared(nn.Module):
  """A Dense called twice (shared weights) and a raw self.param: not coverable."""

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(5)
    scale = self.param("scale", nn.initializers.ones, (5,))
    return nn.Dense(2)(nn.tanh(dense(nn.tanh(dense(x))) * scale))


def test_auto_falls_back_for_shared_and_raw_params():
  _check_model(Shared(), _x((6, 5)), method="auto")


def test_ghost_refuses_what_it_cannot_cover():
  with pytest.raises(ValueError, match="not owned by a layer"):
    _check_model(Shared(), _x((6, 5)), method="ghost")


class Leaky(nn.Module):
  """Reads a child's kernel outside the child's call: must not be 'covered'."""

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(5, name="inner")
    h = dense(x)
    return h * jnp.sum(dense.variables["params"]["kernel"])


def test_parameter_used_outside_its_layer_is_detected():
  # The exactness guard finds the extra use in the jaxpr and falls back.
  _check_model(Leaky(), _x((6, 5)), method="auto")
  with pytest.raises(ValueError, match="not owned"):
    _check_model(Leaky(), _x((6, 5)), method="ghost")


def test_plain_jax_loss_without_flax_goes_vmap_in_auto():
  w = jax.random.normal(jax.random.key(0), (4, 3))

  def loss_fn(p, b):
    return jnp.mean(jnp.square(b[0] @ p["w"]))

  x = _x((5, 4))
  data = (x, jnp.zeros((5,), jnp.int32))
  want, _ = _reference_clipped_sum(loss_fn, {"w": w}, data, 0.5)
  got = optax_dp.clipped_grads(loss_fn, 0.5)({"w": w}, data)
  np.testing.assert_allclose(got.clipped_sum["w"], want[0], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vmap", "auto"])
def test_microbatching_gives_the_same_sum(method):
  model = ConvNet()
  x = _x((10, 7, 6, 2))
  params = model.init(jax.random.key(0), x[:1])["params"]
  loss_fn = lambda p, b: jnp.mean(jnp.square(model.apply({"params": p}, b)))
  mask = np.arange(10) < 9
  full = optax_dp.clipped_grads(loss_fn, 0.05, method=method)(params, x, mask)
  for m in (3, 4):
    chunked = jax.jit(optax_dp.clipped_grads(loss_fn, 0.05, method=method,
                                             microbatch_size=m))(params, x, mask)
    for a, b in zip(jax.tree.leaves(full.clipped_sum), jax.tree.leaves(chunked.clipped_sum)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_nonfinite_example_is_dropped_in_ghost_path():
  model = _MLP
  x = _x((6, 5))
  params = model.init(jax.random.key(0), x[:1])["params"]
  loss_fn = lambda p, b: jnp.mean(jnp.square(model.apply({"params": p}, b)))
  clean = optax_dp.clipped_grads(loss_fn, 0.1)(params, x, np.arange(6) != 2)
  poisoned = optax_dp.clipped_grads(loss_fn, 0.1)(params, x.at[2].set(jnp.nan))
  assert int(poisoned.nonfinite_examples) == 1
  for a, b in zip(jax.tree.leaves(clean.clipped_sum), jax.tree.leaves(poisoned.clipped_sum)):
    assert np.all(np.isfinite(b))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_values_and_aux_match_per_example_path():
  model = _MLP
  x = _x((6, 5))
  params = model.init(jax.random.key(0), x[:1])["params"]

  def loss_fn(p, b):
    out = model.apply({"params": p}, b)
    return jnp.mean(jnp.square(out)), jnp.sum(out, -1)

  mask = np.arange(6) < 5
  (l1, a1), _ = optax_dp.value_and_clipped_grads(loss_fn, 0.1, has_aux=True)(params, x, mask)
  (l2, a2), _ = optax_dp.value_and_per_example_grads(loss_fn, has_aux=True)(params, x, mask)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  np.testing.assert_allclose(a1, a2, rtol=1e-6)


@pytest.mark.slow
def test_dp_aggregate_accepts_clipped_and_matches_per_example_path():
  model = ConvNet()
  x = _x((8, 7, 6, 2))
  params = model.init(jax.random.key(0), x[:1])["params"]
  loss_fn = lambda p, b: jnp.mean(jnp.square(model.apply({"params": p}, b)))
  tx = optax_dp.dp_aggregate(0.05, 1.3, jax.random.key(9), expected_batch_size=10)
  a, sa = tx.update(optax_dp.per_example_grads(loss_fn)(params, x), tx.init(params), params)
  b, sb = tx.update(optax_dp.clipped_grads(loss_fn, 0.05)(params, x), tx.init(params), params)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-7)  # same key: same noise
  assert int(sa.step) == int(sb.step) == 1


def test_dp_aggregate_refuses_a_different_clip():
  model = _MLP
  x = _x((4, 5))
  params = model.init(jax.random.key(0), x[:1])["params"]
  loss_fn = lambda p, b: jnp.mean(jnp.square(model.apply({"params": p}, b)))
  clipped = optax_dp.clipped_grads(loss_fn, 0.5)(params, x)
  tx = optax_dp.dp_aggregate(0.1, 1.0, 0)
  with pytest.raises(ValueError, match="l2_norm_clip=0.5"):
    tx.update(clipped, tx.init(params), params)


def test_bad_arguments():
  with pytest.raises(ValueError, match="method"):
    optax_dp.clipped_grads(lambda p, b: 0.0, 1.0, method="fast")
  with pytest.raises(ValueError, match="l2_norm_clip"):
    optax_dp.clipped_grads(lambda p, b: 0.0, -1.0)
  with pytest.raises(ValueError, match="microbatch_size"):
    optax_dp.clipped_grads(lambda p, b: 0.0, 1.0, microbatch_size=0)


def test_flax_trainstate_apply_gradients_with_clipped_grads():
  from flax.training import train_state
  model = _MLP
  x = _x((8, 5))
  params = model.init(jax.random.key(0), x[:1])["params"]
  loss_fn = lambda p, b: jnp.mean(jnp.square(model.apply({"params": p}, b) - 1.0))

  def make_state():
    tx = optax.chain(optax_dp.dp_aggregate(0.05, 1.0, jax.random.key(3)), optax.sgd(0.1))
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  fast = jax.jit(lambda s: s.apply_gradients(
      grads=optax_dp.clipped_grads(loss_fn, 0.05)(s.params, x)))(make_state())
  slow = jax.jit(lambda s: s.apply_gradients(
      grads=optax_dp.per_example_grads(loss_fn)(s.params, x)))(make_state())
  for a, b in zip(jax.tree.leaves(fast.params), jax.tree.leaves(slow.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert not np.allclose(jax.tree.leaves(fast.params)[0], jax.tree.leaves(params)[0])


class RematMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.tanh(nn.remat(nn.Dense)(7)(x)))


class _ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    return jnp.tanh(nn.Dense(5)(carry)), None


class ScanMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    scanned = nn.scan(_ScanBlock, variable_axes={"params": 0},
                      split_rngs={"params": True}, length=2)
    carry, _ = scanned()(x, None)
    return nn.Dense(3)(carry)


@pytest.mark.slow
@pytest.mark.parametrize("model", [RematMLP(), ScanMLP()])
def test_lifted_transforms_fall_back_exactly(model):
  # Layers inside nn.remat / nn.scan are not intercepted: "auto" gives their
  # parameters per-example gradients (still exact), "ghost" refuses.
  _check_model(model, _x((6, 5)), method="auto")
  with pytest.raises(ValueError, match="not owned"):
    _check_model(model, _x((6, 5)), method="ghost")


class TokenModel(nn.Module):
  vocab: int = 7

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(self.vocab, 6)(tokens)        # repeated ids within an example
    return nn.Dense(4)(nn.tanh(h))


@pytest.mark.parametrize("vocab,seq", [(7, 12), (50, 3)])
def test_embed_ghost_path_with_repeated_tokens(vocab, seq):
  tokens = jax.random.randint(jax.random.key(8), (6, seq), 0, vocab)
  labels = jax.random.randint(jax.random.key(9), (6, seq), 0, 4)
  _check_model(TokenModel(vocab=vocab), tokens, labels, method="ghost", loss_kind="ce")


from hypothesis import given, settings, strategies as st  # noqa: E402


# 6 examples in the full suite, 2 in the fast tier (hypothesis profile "dev": tests/conftest.py).
@settings(max_examples=max(2, math.ceil(6 * settings.default.max_examples / 100)), deadline=None,
          derandomize=True)
@pytest.mark.slow   # test_conv2d_variants is the fast tier's conv check
@given(kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       strides=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       padding=st.sampled_from(["SAME", "VALID", 1]),
       features=st.integers(1, 5), height=st.integers(4, 7), channels=st.integers(1, 3))
def test_conv_random_shapes(kernel, strides, padding, features, height, channels):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Conv(features, kernel, strides=strides, padding=padding)(x)
      return nn.Dense(2)(jnp.tanh(h).reshape((x.shape[0], -1)))

  _check_model(Net(), _x((6, height, 5, channels)), method="ghost")


class GeneralDense(nn.Module):
  @nn.compact
  def __call__(self, x):  # (B, T, d) -> (B, T, 2, 3) -> (B, T, 6) -> (B, T, 2)
    h = nn.DenseGeneral((2, 3))(x)
    return nn.DenseGeneral(2, use_bias=False)(jnp.tanh(h.reshape(h.shape[:2] + (6,))))


def test_dense_general_takes_the_dense_path():
  model = GeneralDense()
  x = _x((6, 4, 5))
  params = model.init(jax.random.key(0), x[:1])["params"]
  layers = optax_dp._flax._linen_layers.discover(
      lambda p, b: jnp.sum(model.apply({"params": p}, b)), params, x[0], False)
  assert sorted(l.kind for l in layers) == ["dense", "dense"]
  _check_model(model, x, method="ghost")


def test_bf16_params_keep_a_float32_clipped_sum_until_the_noise():
  params = {"w": jnp.ones((5, 3), jnp.bfloat16)}
  x = _x((4, 5))
  loss_fn = lambda p, b: jnp.mean(jnp.square(b @ p["w"].astype(jnp.float32)))
  for method in ("auto", "vmap"):
    clipped = optax_dp.clipped_grads(loss_fn, 0.1, method=method)(params, x)
    assert clipped.clipped_sum["w"].dtype == jnp.float32
  tx = optax_dp.dp_aggregate(0.1, 1.0, 0)
  update, _ = tx.update(clipped, tx.init(params), params)
  assert update["w"].dtype == jnp.bfloat16


# Recurrent layers: nn.RNN over a cell of Dense sub-layers is book-kept
# through the scan (per-step inputs and output gradients of each sub-layer).
_CELLS = {"gru": lambda: nn.GRUCell(6), "lstm": lambda: nn.LSTMCell(5),
          "simple": lambda: nn.SimpleCell(4), "mgu": lambda: nn.MGUCell(6)}


class RecurrentNet(nn.Module):
  """A Dense encoder, an RNN (options as given), a Dense head on its outputs
  and (with return_carry) its final carry; `carry_from_input` starts the
  recurrence from a Dense of the first step (gradients through the carry)."""
  cell: str = "gru"
  options: tuple = ()
  carry_from_input: bool = False

  @nn.compact
  def __call__(self, x):
    options = dict(self.options)
    cell = _CELLS[self.cell]()
    h = nn.tanh(nn.Dense(4)(x))
    if self.carry_from_input:
      start = nn.Dense(cell.features)(x[:, 0])
      options["initial_carry"] = (start, start) if self.cell == "lstm" else start
    out = nn.RNN(cell)(h, **options)
    if isinstance(out, tuple):
      carry, out = out
      out = out + jax.tree.leaves(carry)[-1][:, None]
    return nn.Dense(3)(out.mean(1))


def _plan_rules(model, x):
  params = model.init(jax.random.key(0), x[:1])["params"]
  loss_fn = lambda p, b: jnp.sum(model.apply({"params": p}, b))
  return optax_dp.clipping_plan(loss_fn, params, x)


@pytest.mark.parametrize("cell,options,carry_from_input", [
    pytest.param("gru", (), False, marks=pytest.mark.slow),
    pytest.param("lstm", (("reverse", True),), True, marks=pytest.mark.slow),
    ("simple", (("reverse", True), ("keep_order", True), ("return_carry", True)), False),
    ("mgu", (("time_major", True),), False),
    pytest.param("gru", (("return_carry", True),), True, marks=pytest.mark.slow),
])
def test_recurrent_layers_are_book_kept_through_the_scan(cell, options, carry_from_input):
  model = RecurrentNet(cell, options, carry_from_input)
  x = _x((6, 7, 3))
  rules = _plan_rules(model, x)
  assert {rule for name, rule in rules.items() if "Cell" in name} == {"recurrent"}
  assert set(rules.values()) == {"dense", "recurrent"}
  _check_model(model, x, method="ghost")   # every parameter book-kept


@pytest.mark.slow
@pytest.mark.parametrize("microbatch_size", [4, 6])
def test_recurrent_rule_with_microbatches(microbatch_size):
  model = RecurrentNet("lstm", (("return_carry", True),))
  x = _x((6, 5, 3))
  params = model.init(jax.random.key(0), x[:1])["params"]
  loss_fn = lambda p, b: jnp.mean(jnp.square(model.apply({"params": p}, b[0])))
  mask = np.arange(6) != 2
  want = optax_dp.clipped_grads(loss_fn, 0.01, method="vmap")((params), (x,), mask)
  got = jax.jit(optax_dp.clipped_grads(loss_fn, 0.01, method="ghost",
                                       microbatch_size=microbatch_size))(params, (x,), mask)
  for w, g in zip(jax.tree.leaves(want.clipped_sum), jax.tree.leaves(got.clipped_sum)):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(w))))


class _CustomGRU(nn.GRUCell):
  """A subclass: its call may differ from GRUCell's, so it is not covered."""


class SeqLengthRNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    lengths = jnp.full(x.shape[:1], x.shape[1] - 1)
    return nn.Dense(2)(nn.RNN(nn.GRUCell(4))(x, seq_lengths=lengths).mean(1))


class CustomCellRNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(nn.RNN(_CustomGRU(4))(x).mean(1))


class SharedCellRNN(nn.Module):
  """One cell in two RNNs (both directions share it): not a single layer."""
  @nn.compact
  def __call__(self, x):
    cell = nn.GRUCell(4)
    return nn.Dense(2)((nn.RNN(cell)(x) + nn.RNN(cell, reverse=True)(x)).mean(1))


@pytest.mark.slow
@pytest.mark.parametrize("model", [SeqLengthRNN(), CustomCellRNN(), SharedCellRNN()])
def test_recurrent_calls_the_rule_does_not_cover_fall_back_exactly(model):
  x = _x((6, 5, 3))
  rules = _plan_rules(model, x)
  assert {rule for name, rule in rules.items() if "Cell" in name or "GRU" in name} \
      == {"per-example"}
  _check_model(model, x, method="auto")


# ---------------------------------------------------------------------------
# The aux as the loss returns it for a batch; rows and mask travelling together.

def _linear_loss_with_logits(params, batch):
  x, y = batch
  logits = x @ params["w"] + params["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


def _linear_problem(rows=8, classes=10, seed=0):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(5, classes)), jnp.float32),
            "b": jnp.zeros((classes,), jnp.float32)}
  data = (rng.normal(size=(rows, 5)).astype(np.float32),
          rng.integers(0, classes, rows).astype(np.int32))
  return params, data


@pytest.mark.parametrize("method", ["vmap", "auto"])
@pytest.mark.parametrize("microbatch_size", [None, 3])
def test_aux_is_shaped_as_for_the_whole_batch(method, microbatch_size):
  params, (x, y) = _linear_problem()
  fn = optax_dp.value_and_clipped_grads(_linear_loss_with_logits, 1.0, has_aux=True,
                                        method=method, microbatch_size=microbatch_size)
  (losses, logits), _ = jax.jit(fn)(params, (x, y))
  assert losses.shape == (8,) and logits.shape == (8, 10)   # not (8, 1, 10)
  np.testing.assert_allclose(logits, x @ params["w"] + params["b"], rtol=1e-5, atol=1e-6)
  grads, aux = optax_dp.per_example_grads(_linear_loss_with_logits, has_aux=True)(
      params, (x, y))
  assert aux.shape == (8, 10) and grads["w"].shape == (8, 5, 10)


def test_masked_batch_carries_its_mask():
  """gather_batch's MaskedBatch, passed whole, gives the clipped sum of its
  real rows alone: what the bare real rows give (no mask= needed)."""
  params, data = _linear_problem(rows=20)
  batch = optax_dp.Batch(indices=np.array([4, 11, 2, -1, -1, -1]),
                         mask=np.array([True, True, True, False, False, False]))
  rows = optax_dp.gather_batch(data, batch)
  fn = optax_dp.clipped_grads(_linear_loss_with_logits, 0.5, has_aux=True)
  got, aux = jax.jit(fn)(params, rows)
  want, _ = fn(params, jax.tree.map(lambda a: a[[4, 11, 2]], data))
  for g, w in zip(jax.tree.leaves(got.clipped_sum), jax.tree.leaves(want.clipped_sum)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  assert aux.shape == (6, 10) and got.batch_size == 6
  # A mask= beside it is and-ed with the batch's own: never widens it.
  narrower, _ = fn(params, rows, np.array([True, False, True, True, True, True]))
  only, _ = fn(params, jax.tree.map(lambda a: a[[4, 2]], data))
  for g, w in zip(jax.tree.leaves(narrower.clipped_sum), jax.tree.leaves(only.clipped_sum)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_unpacking_a_masked_batch_raises_naming_the_fix():
  params, data = _linear_problem(rows=5)
  batch = optax_dp.Batch(indices=np.array([1, -1]), mask=np.array([True, False]))
  with pytest.raises(TypeError, match=r"batch\.data"):
    x, y = optax_dp.gather_batch(data, batch)   # the old idiom: the mask would be lost


def test_forgotten_mask_moves_the_sum_by_2c_the_masked_batch_by_c():
  """Why the mask must travel with the rows. D' is D without example e; the
  same Poisson draw otherwise, so the static batch holds one more padding row
  in place of e. Counted as an example (a forgotten mask), that zero row's
  clipped gradient enters the sum: here it points against e's, and the sum
  moves by ~2C while the noise is calibrated for C. Through gather_batch's
  MaskedBatch it moves by at most C."""
  c = 0.5
  params = {"w": jnp.zeros((2,), jnp.float32), "b": jnp.zeros((), jnp.float32)}

  def loss_fn(p, batch):   # logistic; for a zero input at b = 0, d/db = 1/2 - t
    x, t = batch
    z = x @ p["w"] + p["b"]
    return jnp.mean(jax.nn.softplus(z) - t * z)

  # e = example 2, a zero input with target 1: gradient (0, 0; b: -1/2); a
  # zero padding row (target 0): (0, 0; b: +1/2). Both have norm C = 1/2.
  data = (np.array([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0]], np.float32),
          np.array([1.0, 0.0, 1.0], np.float32))
  with_e = optax_dp.Batch(indices=np.array([0, 1, 2, -1]), mask=np.array([1, 1, 1, 0], bool))
  without_e = optax_dp.Batch(indices=np.array([0, 1, -1, -1]), mask=np.array([1, 1, 0, 0], bool))
  fn = optax_dp.clipped_grads(loss_fn, c, method="vmap")

  def flat(clipped):
    return np.concatenate([np.ravel(v) for v in jax.tree.leaves(clipped.clipped_sum)])

  masked = [flat(fn(params, optax_dp.gather_batch(data, b))) for b in (with_e, without_e)]
  forgotten = [flat(fn(params, optax_dp.gather_batch(data, b).data)) for b in (with_e, without_e)]
  assert np.linalg.norm(masked[0] - masked[1]) <= c * (1 + 1e-6)
  assert np.linalg.norm(forgotten[0] - forgotten[1]) > 1.9 * c
