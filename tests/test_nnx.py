"""Flax NNX through optax_dp._flax._nnx: the swap through nnx.Optimizer, wrt filters
(LoRA), random streams per example, BatchNorm refusal, the auto fallback.

The reference for every update is computed by hand from per-example gradients
of the pure function of the trained variables (jax.vmap(jax.grad)), clipped
and summed in float64 with numpy: the NNX adapter is checked against the
definition, not against itself.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_dp

B, C, LR = 6, 0.5, 0.1
MASK = jnp.array([1, 1, 1, 1, 1, 0], bool)


class Net(nnx.Module):
  """Linear 4-8, relu, dropout, Linear 8-3."""

  def __init__(self, rngs, rate=0.0):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.drop = nnx.Dropout(rate, rngs=rngs)
    self.l2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.drop(nnx.relu(self.l1(x))))


def loss_fn(model, batch):
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _batch():
  return (jax.random.normal(jax.random.key(0), (B, 4)), jnp.arange(B) % 3)


def _pure(model):
  return nnx.as_pure(nnx.state(model, nnx.Param))


def _hand_update(model, batch, mask, wrt=nnx.Param):
  """params - LR * sum_i mask_i clip_C(g_i) / B, in float64, from jax.grad per example."""
  graphdef, trained, rest = nnx.split(model, wrt, ...)

  def one(t, x, y):
    return loss_fn(nnx.merge(graphdef, t, rest, copy=True), (x[None], y[None]))

  grads = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(trained, *batch)
  flat = [np.asarray(g, np.float64).reshape(B, -1) for g in jax.tree.leaves(grads)]
  norms = np.sqrt(sum((f ** 2).sum(1) for f in flat))
  factors = np.minimum(1.0, C / norms) * np.asarray(mask)
  return jax.tree.map(lambda p, g: np.asarray(p, np.float64)
                      - LR * np.tensordot(factors, np.asarray(g, np.float64), 1) / B,
                      nnx.as_pure(trained), nnx.as_pure(grads))


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _optimizer(model, wrt=nnx.Param, sigma=0.0):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # sigma 0: "NOT private", on purpose
    tx = optax.chain(optax_dp.dp_aggregate(C, sigma, 0, expected_batch_size=B),
                     optax.sgd(LR))
  return nnx.Optimizer(model, tx, wrt=wrt)


@pytest.mark.parametrize("builder", ["clipped_auto", "clipped_vmap", "per_example",
                                     "clipped_microbatch"])
def test_the_nnx_swap_equals_the_update_by_hand(builder):
  model = Net(nnx.Rngs(0))
  expected = _hand_update(model, _batch(), MASK)
  grad_fn = {
      "clipped_auto": lambda: optax_dp.clipped_grads(loss_fn, C),
      "clipped_vmap": lambda: optax_dp.clipped_grads(loss_fn, C, method="vmap"),
      "clipped_microbatch": lambda: optax_dp.clipped_grads(loss_fn, C, microbatch_size=4),
      "per_example": lambda: optax_dp.per_example_grads(loss_fn),
  }[builder]()
  optimizer = _optimizer(model)

  @nnx.jit
  def train_step(model, optimizer, batch, mask):
    optimizer.update(model, grad_fn(model, batch, mask))

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optax_dp.PerExampleFallbackWarning)
    train_step(model, optimizer, _batch(), MASK)
  # float32 per-example gradients and sums against float64: 1e-6 of the
  # O(1) parameters is far above float32 rounding of B = 6 terms.
  assert _max_diff(_pure(model), expected) < 1e-6


def test_has_aux_values_and_mask():
  model = Net(nnx.Rngs(0))

  def loss_with_aux(model, batch):
    logits = model(batch[0])
    return (optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean(),
            jnp.argmax(logits, -1))

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optax_dp.PerExampleFallbackWarning)
    (losses, preds), grads = optax_dp.value_and_clipped_grads(
        loss_with_aux, C, has_aux=True)(model, _batch(), MASK)
    _, per_example = optax_dp.value_and_per_example_grads(loss_fn)(model, _batch(), MASK)
  assert losses.shape == (B,) and preds.shape == (B,)   # aux as for the whole batch
  assert float(losses[-1]) == 0.0 and float(losses[0]) > 0.0   # padding row zeroed
  # One ClippedGrads per variable, all with the batch's clip, size and count.
  leaves = jax.tree.leaves(nnx.as_pure(grads),
                           is_leaf=lambda x: isinstance(x, optax_dp.ClippedGrads))
  assert len(leaves) == 4 and all(isinstance(c, optax_dp.ClippedGrads) for c in leaves)
  assert {(c.l2_norm_clip, c.batch_size) for c in leaves} == {(C, B)}
  # The per-example form: a State of the Params, each with a leading batch axis.
  assert all(g.shape[0] == B for g in jax.tree.leaves(nnx.as_pure(per_example)))
  assert not np.any(np.asarray(nnx.as_pure(per_example)["l1"]["kernel"][-1]))


@pytest.mark.parametrize("method", ["vmap", "auto"])
def test_lora_adapters_alone_are_trained(method):
  """Private fine-tuning of a frozen model: wrt=nnx.LoRAParam; "auto"
  book-keeps the adapters (the "lora" rule), none falls back."""
  model = nnx.Sequential(
      nnx.LoRALinear(4, 8, lora_rank=2, rngs=nnx.Rngs(0)), nnx.relu,
      nnx.LoRALinear(8, 3, lora_rank=2, rngs=nnx.Rngs(1)))
  # LoRA's B starts at zero (a zero gradient for A): give it a value first.
  for layer in (model.layers[0], model.layers[2]):
    layer.lora.lora_b[...] = 0.1 * jnp.ones_like(layer.lora.lora_b[...])
  base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))      # LoRAParam subclasses Param
  frozen = jax.tree.map(np.asarray, nnx.as_pure(nnx.state(model, base)))
  expected = _hand_update(model, _batch(), MASK, wrt=nnx.LoRAParam)
  optimizer = _optimizer(model, wrt=nnx.LoRAParam)
  grad_fn = optax_dp.clipped_grads(loss_fn, C, method=method, wrt=nnx.LoRAParam)
  if method == "auto":
    plan = optax_dp.clipping_plan(loss_fn, model, _batch(), wrt=nnx.LoRAParam)
    assert set(plan.values()) == {"lora"} and len(plan) == 4, plan

  @nnx.jit
  def train_step(model, optimizer, batch, mask):
    optimizer.update(model, grad_fn(model, batch, mask))

  train_step(model, optimizer, _batch(), MASK)
  assert _max_diff(nnx.as_pure(nnx.state(model, nnx.LoRAParam)), expected) < 1e-6
  assert _max_diff(nnx.as_pure(nnx.state(model, base)), frozen) == 0.0  # base untouched
  assert _max_diff(nnx.as_pure(nnx.state(model, nnx.LoRAParam)),
                   jax.tree.map(np.zeros_like, expected)) > 1e-3  # adapters moved


def test_each_example_draws_its_own_dropout_mask_and_each_step_new_ones():
  class Drop(nnx.Module):
    def __init__(self, rngs):
      self.w = nnx.Param(jnp.ones(64))
      self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
      return self.drop(x * self.w)

  model = Drop(nnx.Rngs(0, dropout=7))
  grad_fn = optax_dp.per_example_grads(lambda m, x: jnp.sum(m(x)))
  x = jnp.ones((4, 64))
  first = np.asarray(nnx.as_pure(grad_fn(model, x))["w"])
  second = np.asarray(nnx.as_pure(grad_fn(model, x))["w"])
  # The gradient of sum(dropout(x * w)) w.r.t. w is the mask / (1 - rate):
  # values in {0, 2}; identical examples, so only the masks can differ.
  assert set(np.unique(first)) <= {0.0, 2.0}
  # Four examples, 64 coordinates, independent masks: P(two rows equal) = 2^-64.
  assert len({row.tobytes() for row in first}) == 4
  assert not np.array_equal(first, second)                      # new masks each call
  assert model.drop.rngs.count[...] == 2                        # one draw per call


def test_batchnorm_in_training_mode_is_refused():
  class BN(nnx.Module):
    def __init__(self, rngs, use_running_average):
      self.l = nnx.Linear(4, 3, rngs=rngs)
      self.bn = nnx.BatchNorm(3, use_running_average=use_running_average, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.l(x))

  def loss(model, batch):
    return jnp.mean(model(batch) ** 2)

  x = jnp.ones((B, 4))
  for build in (optax_dp.per_example_grads(loss), optax_dp.clipped_grads(loss, C)):
    with pytest.raises(ValueError, match=r"nnx\.BatchNorm in training mode"):
      build(BN(nnx.Rngs(0), use_running_average=False), x)
  # Frozen statistics are per-example: accepted.
  grads = optax_dp.per_example_grads(loss)(BN(nnx.Rngs(0), use_running_average=True), x)
  assert jax.tree.leaves(nnx.as_pure(grads))[0].shape[0] == B


class ConvNet(nnx.Module):
  """Conv SAME, Conv stride 2 VALID dilated, Conv explicit padding, Linear: all book-kept."""

  def __init__(self, rngs):
    self.c1 = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.c2 = nnx.Conv(4, 6, (2, 2), strides=2, padding="VALID", kernel_dilation=2, rngs=rngs)
    self.c3 = nnx.Conv(6, 3, (2, 2), padding=((1, 0), (0, 1)), use_bias=False, rngs=rngs)
    self.l = nnx.Linear(3 * 3 * 3, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.c2(nnx.relu(self.c1(x))))
    x = self.c3(x)
    return self.l(x.reshape(x.shape[0], -1))


class TokenNet(nnx.Module):
  """Embed (token ids) then Linear over the sequence, mean-pooled."""

  def __init__(self, rngs):
    self.e = nnx.Embed(11, 4, rngs=rngs)
    self.l = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, ids):
    return self.l(self.e(ids)).mean(1)


class NormNet(nnx.Module):
  """Linear, LayerNorm, a Linear called twice (shared), an nnx.Param used directly."""

  def __init__(self, rngs):
    self.l = nnx.Linear(4, 4, rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)
    self.shared = nnx.Linear(4, 4, rngs=rngs)
    self.scale = nnx.Param(jnp.full((4,), 0.5))
    self.out = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    x = self.norm(nnx.relu(self.l(x)))
    x = self.shared(nnx.relu(self.shared(x))) * self.scale
    return self.out(x)


class TiedNet(nnx.Module):
  """Embed's table used twice: lookup and `attend` (weight tying)."""

  def __init__(self, rngs):
    self.e = nnx.Embed(11, 4, rngs=rngs)

  def __call__(self, ids):
    return self.e.attend(self.e(ids)).mean(1)


class AttentionNet(nnx.Module):
  """A pre-LN transformer block over token ids: Embed, MultiHeadAttention
  (LinearGeneral projections, query/key LayerNorms), RMSNorm, an MLP."""

  def __init__(self, rngs):
    self.e = nnx.Embed(11, 8, rngs=rngs)
    self.ln = nnx.LayerNorm(8, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8,
                                       normalize_qk=True, decode=False, rngs=rngs)
    self.rms = nnx.RMSNorm(8, rngs=rngs)
    self.up = nnx.Linear(8, 16, rngs=rngs)
    self.down = nnx.Linear(16, 8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, ids):
    x = self.e(ids)
    x = x + self.attn(self.ln(x), mask=nnx.make_causal_mask(ids))
    x = x + self.down(nnx.gelu(self.up(self.rms(x))))
    return self.head(x.mean(1))


class Scale(nnx.Module):
  """A custom layer using its nnx.Param directly in __call__."""

  def __init__(self, n):
    self.w = nnx.Param(jnp.linspace(0.5, 1.5, n))

  def __call__(self, x):
    return x * self.w[...]


class GeneralNet(nnx.Module):
  """Grouped Conv, circular strided Conv, GroupNorm, a custom layer,
  LinearGeneral over two axes, Einsum, Linear."""

  def __init__(self, rngs):
    self.grouped = nnx.Conv(2, 4, (3, 3), feature_group_count=2, rngs=rngs)
    self.circular = nnx.Conv(4, 4, (3, 3), strides=2, padding="CIRCULAR", rngs=rngs)
    self.gn = nnx.GroupNorm(4, num_groups=2, rngs=rngs)
    self.scale = Scale(4)
    self.lg = nnx.LinearGeneral((4, 4), (2, 3), axis=(-2, -1), rngs=rngs)
    self.einsum = nnx.Einsum("bhij,ijk->bhk", (2, 3, 5), (5,), rngs=rngs)
    self.out = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    x = self.scale(self.gn(self.circular(nnx.relu(self.grouped(x)))))
    return self.out(self.einsum(nnx.relu(self.lg(x))).mean(1))


class RecurrentNet(nnx.Module):
  """Linear, a GRU (reversed, outputs kept in order, carry returned) and an
  LSTM over its outputs, a Linear head: the "recurrent" rule through nnx.RNN."""

  def __init__(self, rngs):
    self.l = nnx.Linear(4, 4, rngs=rngs)
    self.gru = nnx.RNN(nnx.GRUCell(4, 5, rngs=rngs), reverse=True, keep_order=True,
                       return_carry=True)
    self.lstm = nnx.RNN(nnx.LSTMCell(5, 3, rngs=rngs))
    self.head = nnx.Linear(3, 3, rngs=rngs)

  def __call__(self, x):
    carry, h = self.gru(nnx.tanh(self.l(x)))
    return self.head(self.lstm(h + carry[:, None]).mean(1))


class LoRANet(nnx.Module):
  """nnx.LoRA over a Linear, then nnx.LoRALinear, on sequences: the "lora"
  rule (LoRALinear's own kernel and bias, beside its LoRA submodule, fall
  back). The adapters' B starts at zero (a zero gradient for A): set here."""

  def __init__(self, rngs):
    self.a = nnx.LoRA(4, 2, 8, base_module=nnx.Linear(4, 8, rngs=rngs), rngs=rngs)
    self.b = nnx.LoRALinear(8, 3, lora_rank=2, rngs=rngs)
    for lora in (self.a, self.b.lora):
      lora.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(7), lora.lora_b[...].shape)

  def __call__(self, x):
    return self.b(nnx.relu(self.a(x))).mean(1)


def _families():
  ids = jax.random.randint(jax.random.key(1), (B, 5), 0, 11)
  return {
      "linear": (Net(nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (B, 4))),
      "conv": (ConvNet(nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (B, 8, 8, 2))),
      "embed": (TokenNet(nnx.Rngs(0)), ids),
      "norm_shared_direct": (NormNet(nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (B, 4))),
      "tied_embed": (TiedNet(nnx.Rngs(0)), ids),
      "attention": (AttentionNet(nnx.Rngs(0)), ids),
      "general": (GeneralNet(nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (B, 8, 8, 2))),
      "recurrent": (RecurrentNet(nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (B, 7, 4))),
      "lora": (LoRANet(nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (B, 5, 4))),
  }


# Which parameters book-keeping covers in each family; the rest falls back.
COVERED = {"linear": 4, "conv": 7, "embed": 3, "norm_shared_direct": 6, "tied_embed": 0,
           "attention": 20, "general": 13, "recurrent": 19, "lora": 6}


def _sums(grads):
  is_clipped = lambda x: isinstance(x, optax_dp.ClippedGrads)
  return [np.asarray(c.clipped_sum, np.float64)
          for c in jax.tree.leaves(nnx.as_pure(grads), is_leaf=is_clipped)]


def jit_clipped_sums(model, batch, mask, **kwargs):
  """`_sums` of clipped_grads(loss_fn, C, **kwargs) on an nnx model, jitted
  (eager, the per-example paths dispatch op by op: seconds per family)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, b, m: optax_dp.clipped_grads(loss_fn, C, **kwargs)(
      nnx.merge(graphdef, s), b, m))
  return _sums(fn(state, batch, mask))


@functools.lru_cache(maxsize=None)
def _vmap_reference(family):
  """A family's per-example (vmap) clipped sum of its batch, computed once."""
  model, x = _families()[family]
  return jit_clipped_sums(model, (x, jnp.arange(B) % 3), MASK, method="vmap")


# Every family with one chunk and microbatched (chunks of 4 of 6 rows, the
# last one padded); the fast tier runs the microbatched ones.
@pytest.mark.parametrize("family,microbatch_size", [
    pytest.param(family, size, marks=pytest.mark.slow if size is None else ())
    for family in COVERED for size in (None, 4)])
def test_book_keeping_equals_vmap_for_each_layer_family(family, microbatch_size):
  model, x = _families()[family]
  batch = (x, jnp.arange(B) % 3)
  reference = _vmap_reference(family)
  graphdef, state = nnx.split(model)

  @jax.jit
  def auto(state, batch, mask):
    return optax_dp.clipped_grads(loss_fn, C, microbatch_size=microbatch_size)(
        nnx.merge(graphdef, state), batch, mask)

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = _sums(auto(state, batch, MASK))
  for r, g in zip(reference, got):
    # Relative to the largest entry: float32 sums of B = 6 rows, two orders
    # of summation (book-keeping contracts A^T G, vmap sums the rows).
    assert np.max(np.abs(r - g)) <= 1e-5 * np.max(np.abs(r))
  fallback = [w for w in caught if issubclass(w.category, optax_dp.PerExampleFallbackWarning)]
  total = len(reference)
  assert bool(fallback) == (COVERED[family] < total)
  if fallback:
    assert f"({total - COVERED[family]} of {total})" in str(fallback[0].message)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["linear", "conv", "embed", "attention", "general",
                                    "recurrent"])
def test_ghost_equals_vmap_where_every_parameter_is_covered(family):
  model, x = _families()[family]
  batch = (x, jnp.arange(B) % 3)
  ghost = jit_clipped_sums(model, batch, MASK, method="ghost")
  vmap = _vmap_reference(family)
  assert len(ghost) == len(vmap) == COVERED[family]
  assert all(np.max(np.abs(v - g)) <= 1e-5 * np.max(np.abs(v)) for v, g in zip(vmap, ghost))


def test_ghost_names_the_uncovered_parameters():
  model, x = _families()["norm_shared_direct"]
  with pytest.raises(ValueError, match=r"method='ghost'.*scale.*shared.*kernel"):
    optax_dp.clipped_grads(loss_fn, C, method="ghost")(model, (x, jnp.arange(B) % 3))


def test_budget_reads_the_nnx_optimizer_state():
  sampler = optax_dp.PoissonSampler(600, B)
  # RDP: the step limit at epsilon 10 costs PLD ~20 s to search; what is
  # tested is reading the ledger out of nnx.Optimizer's state.
  budget = optax_dp.privacy_budget(sampler=sampler, target_delta=1e-5, noise_multiplier=1.0,
                                   target_epsilon=10.0, accountant="rdp")
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(
      optax_dp.dp_aggregate(C, key=3, budget=budget), optax.sgd(LR)), wrt=nnx.Param)
  grad_fn = optax_dp.clipped_grads(loss_fn, C, method="vmap")
  for _ in range(2):
    optimizer.update(model, grad_fn(model, _batch(), MASK))
  assert budget.steps_taken(optimizer.opt_state) == 2
  assert budget.epsilon_spent(optimizer.opt_state) == optax_dp.compute_epsilon(
      1.0, 1e-5, sampler=sampler, steps=2, accountant="rdp")


def test_dp_accumulate_takes_nnx_clipped_sums():
  """Two physical halves, noise once: the same update as one batch."""
  model_a, model_b = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
  x, y = _batch()
  grad_fn = optax_dp.clipped_grads(loss_fn, C, method="vmap")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    one = nnx.Optimizer(model_a, optax.chain(
        optax_dp.dp_aggregate(C, 0.0, 0, expected_batch_size=B), optax.sgd(LR)), wrt=nnx.Param)
    acc = nnx.Optimizer(model_b, optax_dp.dp_accumulate(optax.chain(
        optax_dp.dp_aggregate(C, 0.0, 0, expected_batch_size=B), optax.sgd(LR)), 2),
        wrt=nnx.Param)
  one.update(model_a, grad_fn(model_a, (x, y)))
  acc.update(model_b, grad_fn(model_b, (x[:3], y[:3])))
  acc.update(model_b, grad_fn(model_b, (x[3:], y[3:])))
  assert _max_diff(_pure(model_a), _pure(model_b)) < 1e-6


@pytest.mark.slow
def test_dp_accumulate_takes_nnx_per_device_sums():
  """sharded_clipped_grads(reduce=False) of an NNX model (one-device mesh)
  through nnx.Optimizer and dp_accumulate(mesh=): the same update as the
  global sums through dp_accumulate; dp_aggregate alone refuses them."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  model_a, model_b, model_c = Net(nnx.Rngs(0)), Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
  x, y = _batch()
  global_fn = optax_dp.clipped_grads(loss_fn, C, method="vmap")
  device_fn = optax_dp.sharded_clipped_grads(loss_fn, C, mesh=mesh, method="vmap",
                                             reduce=False)
  inner = lambda: optax.chain(optax_dp.dp_aggregate(C, 0.0, 0, expected_batch_size=B),
                              optax.sgd(LR))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    one = nnx.Optimizer(model_a, optax_dp.dp_accumulate(inner(), 2), wrt=nnx.Param)
    acc = nnx.Optimizer(model_b, optax_dp.dp_accumulate(inner(), 2, mesh=mesh),
                        wrt=nnx.Param)
    plain = nnx.Optimizer(model_c, inner(), wrt=nnx.Param)
  for rows in (slice(0, 3), slice(3, None)):
    one.update(model_a, global_fn(model_a, (x[rows], y[rows])))
    acc.update(model_b, device_fn(model_b, (x[rows], y[rows])))
  assert _max_diff(_pure(model_a), _pure(model_b)) < 1e-6
  assert _max_diff(_pure(model_b), _pure(Net(nnx.Rngs(0)))) > 1e-3
  with pytest.raises(ValueError, match="not yet summed"):
    plain.update(model_c, device_fn(model_c, (x, y)))


def test_a_tree_mixing_clipped_sums_and_raw_gradients_is_refused():
  model = Net(nnx.Rngs(0))
  grads = nnx.as_pure(optax_dp.clipped_grads(loss_fn, C, method="vmap")(model, _batch()))
  grads["l2"]["bias"] = jnp.ones((B, 3))                # a raw per-example leaf
  tx = optax_dp.dp_aggregate(C, 1.0, 0, expected_batch_size=B)
  with pytest.raises(ValueError, match="mixing clipped sums"):
    tx.update(grads, tx.init(_pure(model)), _pure(model))


def test_wrt_on_a_plain_pytree_is_an_error():
  with pytest.raises(ValueError, match="NNX"):
    optax_dp.clipped_grads(lambda p, b: jnp.mean(b @ p), C, wrt=nnx.Param)(
        jnp.ones(2), jnp.ones((3, 2)))


_SHARDED_SCRIPT = r'''
import sys, warnings
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import optax_dp
sys.path.insert(0, sys.argv[1])
import test_nnx as T
assert jax.device_count() == 8, jax.devices()
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
# Not "recurrent": flax's own nnx.RNN scan fails under shard_map's varying-axes
# check (its initial carry is not device-varying), with every method (known
# limitation, docs/multi_device.md).
for family in [f for f in T.COVERED if f != "recurrent"]:
  model, x = T._families()[family]
  x = jnp.concatenate([x, x, x])[:16]
  batch, mask = (x, jnp.arange(16) % 3), jnp.arange(16) < 14
  reference = T.jit_clipped_sums(model, batch, mask, method="vmap")
  graphdef, state = nnx.split(model)
  sharded = jax.jit(lambda s, b, m: optax_dp.sharded_clipped_grads(T.loss_fn, T.C, mesh=mesh)(
      nnx.merge(graphdef, s), b, m))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optax_dp.PerExampleFallbackWarning)
    got = T._sums(sharded(state, batch, mask))
  print(family, max(float(np.max(np.abs(r - g)) / np.max(np.abs(r))) for r, g in zip(reference, got)))
'''


@pytest.mark.subprocess
def test_sharded_clipped_grads_over_eight_devices_equals_vmap(tmp_path):
  """An nnx.Module through sharded_clipped_grads on 8 simulated CPU devices
  (a subprocess: the device count is fixed at JAX start-up): every family,
  book-kept, partly fallback (shared, direct Param) or all fallback (tied
  embedding), equals the single-device vmap clipped sum."""
  import os
  import subprocess
  import sys
  script = tmp_path / "sharded_nnx.py"
  script.write_text(_SHARDED_SCRIPT)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  proc = subprocess.run([sys.executable, str(script), os.path.dirname(__file__)],
                        capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  errors = dict(line.split() for line in proc.stdout.strip().splitlines())
  assert set(errors) == set(COVERED) - {"recurrent"}   # see _SHARDED_SCRIPT
  assert all(float(e) <= 1e-5 for e in errors.values()), errors


def test_a_clip_mismatch_is_caught_through_nnx_optimizer():
  """The per-variable form keeps the clip norm: dp_aggregate(C) refuses sums
  clipped at another C after nnx.Optimizer stripped them to their values."""
  model = Net(nnx.Rngs(0))
  optimizer = _optimizer(model)                                 # dp_aggregate(C = 0.5)
  grads = optax_dp.clipped_grads(loss_fn, 2 * C, method="vmap")(model, _batch(), MASK)
  with pytest.raises(ValueError, match="l2_norm_clip"):
    optimizer.update(model, grads)


class _CustomGRU(nnx.GRUCell):
  """A subclass: its call may differ from GRUCell's, so it is not covered."""


class UncoveredRNNs(nnx.Module):
  """An RNN with sequence lengths and one over a custom cell: per-example."""

  def __init__(self, rngs):
    self.masked = nnx.RNN(nnx.GRUCell(4, 3, rngs=rngs))
    self.custom = nnx.RNN(_CustomGRU(4, 3, rngs=rngs))

  def __call__(self, x):
    lengths = jnp.full(x.shape[:1], x.shape[1] - 1)
    return (self.masked(x, seq_lengths=lengths) + self.custom(x)).mean(1)


def test_recurrent_calls_the_rule_does_not_cover_fall_back_exactly():
  model = UncoveredRNNs(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (B, 5, 4))
  batch = (x, jnp.arange(B) % 3)
  assert set(optax_dp.clipping_plan(loss_fn, model, batch).values()) == {"per-example"}
  auto = jit_clipped_sums(model, batch, MASK)
  vmap = jit_clipped_sums(model, batch, MASK, method="vmap")
  assert all(np.max(np.abs(v - a)) <= 1e-5 * np.max(np.abs(v)) for v, a in zip(vmap, auto))


# ---------------------------------------------------------------------------
# Flax's NNX MNIST tutorial, its idioms made private: random streams passed at
# call time (model(x, rngs), nnx.Dropout(rate) without rngs), nnx.Optimizer
# (..., wrt=nnx.Param), nnx.MultiMetric updated from the aux, nnx.jit.

TUTORIAL_N, TUTORIAL_STEPS = 64, 10


def _tutorial_loss(model, batch, rngs=None):
  logits = model(batch["image"], rngs)
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits=logits, labels=batch["label"]).mean()
  return loss, logits


def _tutorial_data():
  rng = np.random.default_rng(3)
  return {"image": rng.normal(size=(TUTORIAL_N, 8, 8, 1)).astype(np.float32),
          "label": rng.integers(0, 10, TUTORIAL_N).astype(np.int32)}


def _tutorial_run(padded: bool):
  """The tutorial's loop, private; `padded=False`: the reference, each step
  fed only its real rows as a bare batch (no padding, no mask)."""
  import models  # pylint: disable=import-outside-toplevel
  data = _tutorial_data()
  model = models.NNXTutorialCNN(rngs=nnx.Rngs(0))
  sampler = optax_dp.PoissonSampler(dataset_size=TUTORIAL_N, expected_batch_size=8)
  budget = optax_dp.privacy_budget(sampler=sampler, target_delta=1e-3,
                                   noise_multiplier=1.0, steps=TUTORIAL_STEPS)
  optimizer = nnx.Optimizer(
      model, optax.chain(optax_dp.dp_aggregate(C, key=jax.random.key(1), budget=budget),
                         optax.adamw(0.005, 0.9)), wrt=nnx.Param)
  metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(),
                            loss=nnx.metrics.Average("loss"))
  grad_fn = optax_dp.value_and_clipped_grads(_tutorial_loss, C, has_aux=True)

  @nnx.jit
  def train_step(model, optimizer, metrics, rngs, batch):
    (losses, logits), grads = grad_fn(model, batch, rngs=rngs)
    metrics.update(loss=losses, logits=logits, labels=batch.data["label"],
                   mask=batch.mask)
    optimizer.update(model, grads)

  @nnx.jit
  def reference_step(model, optimizer, metrics, rngs, batch):
    (losses, logits), grads = grad_fn(model, batch, rngs=rngs)
    metrics.update(loss=losses, logits=logits, labels=batch["label"])
    optimizer.update(model, grads)

  rngs = nnx.Rngs(0)
  for b in sampler.batches(0, steps=TUTORIAL_STEPS):
    assert b.size > 0   # the fixed seed draws no empty batch (the reference needs a row)
    if padded:
      train_step(model, optimizer, metrics, rngs, optax_dp.gather_batch(data, b))
    else:
      real = b.indices[b.mask]
      reference_step(model, optimizer, metrics, rngs, jax.tree.map(lambda x: x[real], data))
  return (metrics.compute(), nnx.state(model, nnx.Param), int(rngs.default.count[...]),
          budget.steps_taken(optimizer.opt_state))


@pytest.mark.slow
def test_flax_nnx_tutorial_idioms_train_privately():
  """10 private steps of the tutorial's loop on padded Poisson batches: the
  masked train metrics (from the aux logits, shaped (B, 10) as for a batch)
  and the parameters equal those of the same steps on the real rows alone."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optax_dp.PerExampleFallbackWarning)
    # The reference replays the same noise key on purpose (same noise draws).
    warnings.simplefilter("ignore", optax_dp.NoiseKeyReuseWarning)
    got_metrics, got_params, got_count, got_steps = _tutorial_run(padded=True)
    want_metrics, want_params, want_count, want_steps = _tutorial_run(padded=False)
  assert got_steps == want_steps == TUTORIAL_STEPS
  # The caller's Rngs advanced once per step, as a batched step draws a key.
  assert got_count == want_count == TUTORIAL_STEPS
  # Padding rows add exact zeros, so only float summation order differs.
  np.testing.assert_allclose(float(got_metrics["loss"]), float(want_metrics["loss"]),
                             rtol=1e-5)
  assert float(got_metrics["accuracy"]) == float(want_metrics["accuracy"])
  assert _max_diff(got_params, want_params) < 1e-5
  assert 0.0 < float(got_metrics["accuracy"]) <= 1.0


def test_call_time_rngs_give_each_example_its_own_dropout():
  import models  # pylint: disable=import-outside-toplevel
  model = models.NNXTutorialCNN(rngs=nnx.Rngs(0), rate=0.5)
  row = _tutorial_data()
  batch = {k: np.repeat(v[:1], 6, axis=0) for k, v in row.items()}   # 6 equal rows
  rngs = nnx.Rngs(5)
  grad_fn = optax_dp.value_and_per_example_grads(_tutorial_loss, has_aux=True)
  (losses, logits), _ = nnx.jit(lambda m, r, b: grad_fn(m, b, rngs=r))(model, rngs, batch)
  assert logits.shape == (6, 10)
  # Equal inputs, different dropout masks: the losses differ (all six equal
  # would need six equal masks over 64 + 16 units at rate 0.5).
  assert len({round(float(v), 6) for v in losses}) > 1
  assert int(rngs.default.count[...]) == 1


def test_closed_over_rngs_is_refused_with_the_fix():
  import models  # pylint: disable=import-outside-toplevel
  model = models.NNXTutorialCNN(rngs=nnx.Rngs(0))
  data = _tutorial_data()

  @nnx.jit
  def step(model, rngs, batch):
    return optax_dp.clipped_grads(lambda m, b: _tutorial_loss(m, b, rngs), C,
                                  has_aux=True)(model, batch)

  with pytest.raises(ValueError, match=r"grad_fn\(model, batch, rngs=rngs\)"):
    step(model, nnx.Rngs(0), jax.tree.map(lambda x: x[:4], data))


def test_rngs_with_plain_params_is_refused():
  fn = optax_dp.clipped_grads(lambda p, b: jnp.mean(b @ p), C)
  with pytest.raises(ValueError, match="plain pytree"):
    fn(jnp.ones(3), jnp.ones((2, 3)), rngs=nnx.Rngs(0))
