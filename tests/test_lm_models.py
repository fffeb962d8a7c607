"""The language models of the Shakespeare recipes (examples/lm_models.py):
book-kept with no per-example fallback, the fast path equal to per-example
gradients with padding rows, LoRA fine-tuning leaving the base bit-identical."""

import warnings

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_dp
import example_runs

lm = example_runs.import_example("lm_models")

C = 0.05          # below every per-example norm here: every row is clipped
B, T, VOCAB = 6, 8, 80
CONFIG = lm.LMConfig(vocab_size=VOCAB, length=T, features=16, heads=2, layers=2)
# Two padding rows (real tokens: only the mask keeps them out).
MASK = np.array([True, True, False, True, True, False])


def _windows(seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (B, T + 1)), jnp.uint8)


def _nnx_loss(model, window):
  return lm.nnx_loss(model, window)[0]


def _linen():
  model = lm.LinenCharTransformer(CONFIG)
  params = model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"]

  def loss(params, window):
    return lm.next_char_loss(model.apply({"params": params}, window[:, :-1].astype(jnp.int32)),
                             window)
  return loss, params


def _clipped_sums(loss, params, wrt=None, **kwargs):
  """Leaves of the clipped sum of `_windows()` under MASK, jitted."""
  options = {} if wrt is None else {"wrt": wrt}
  fn = optax_dp.clipped_grads(loss, C, **options, **kwargs)
  if isinstance(params, nnx.Module):
    graphdef, state = nnx.split(params)
    out = jax.jit(lambda s, w, m: fn(nnx.merge(graphdef, s), w, m))(state, _windows(), MASK)
    out = nnx.as_pure(out)
  else:
    out = jax.jit(fn)(params, _windows(), MASK)
  is_clipped = lambda x: isinstance(x, optax_dp.ClippedGrads)
  # NNX: one ClippedGrads per variable; Linen: one holding the params' tree.
  return [np.asarray(leaf, np.float64) for c in jax.tree.leaves(out, is_leaf=is_clipped)
          for leaf in jax.tree.leaves(c.clipped_sum)]


def _models():
  return {
      "nnx_transformer": lambda: (_nnx_loss, lm.CharTransformer(CONFIG, rngs=nnx.Rngs(0))),
      "linen_transformer": _linen,
      "nnx_lstm": lambda: (_nnx_loss, lm.CharLSTM(VOCAB, features=12, rngs=nnx.Rngs(0))),
  }


@pytest.mark.parametrize("name", ["nnx_transformer", "linen_transformer", "nnx_lstm"])
def test_fast_path_equals_per_example_gradients_with_padding(name):
  loss, params = _models()[name]()
  plan = optax_dp.clipping_plan(loss, params, _windows())
  assert "per-example" not in plan.values(), plan
  with warnings.catch_warnings():
    warnings.simplefilter("error", optax_dp.PerExampleFallbackWarning)
    fast = _clipped_sums(loss, params, method="ghost")
  reference = _clipped_sums(loss, params, method="vmap")
  assert len(fast) == len(reference) == len(plan)
  # float32 sums of 4 rows of T positions in two orders (book-keeping
  # contracts A^T G over positions, vmap sums per-example gradients): each
  # entry within 1e-5 of its leaf's largest entry. The attention key bias has
  # an exactly zero gradient (softmax ignores a shift shared by all keys), so
  # its float32 value is rounding alone: the floor is the rounding of a sum of
  # B*T terms on the scale of the largest entry of the whole clipped sum.
  scale = max(np.max(np.abs(r)) for r in reference)
  floor = B * T * np.finfo(np.float32).eps * scale
  for f, r in zip(fast, reference):
    assert np.max(np.abs(f - r)) <= max(1e-5 * np.max(np.abs(r)), floor)


def test_padding_rows_do_not_count():
  """The mask, not the rows' content, decides: other tokens in the padding
  rows leave the clipped sum unchanged."""
  loss, model = _models()["nnx_transformer"]()
  fn = optax_dp.clipped_grads(loss, C)
  other = _windows().at[~MASK].set(_windows(seed=1)[~MASK])
  a = jax.tree.leaves(nnx.as_pure(fn(model, _windows(), MASK)))
  b = jax.tree.leaves(nnx.as_pure(fn(model, other, MASK)))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))


def _lora_model():
  model = lm.add_lora(lm.CharTransformer(CONFIG, rngs=nnx.Rngs(0)), 4, rngs=nnx.Rngs(1))
  # B starts at zero (a zero gradient for A): as after some training.
  for i, (_, v) in enumerate(nnx.iter_graph(model)):
    if isinstance(v, nnx.LoRA):
      v.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(i), v.lora_b[...].shape)
  return model


def test_lora_adapters_are_book_kept_and_equal_per_example_gradients():
  model = _lora_model()
  plan = optax_dp.clipping_plan(_nnx_loss, model, _windows(), wrt=nnx.LoRAParam)
  # 2 blocks x (up, down) + the head: 5 adapters, A and B each.
  assert list(plan.values()) == ["lora"] * 10, plan
  fast = _clipped_sums(_nnx_loss, model, wrt=nnx.LoRAParam, method="ghost")
  reference = _clipped_sums(_nnx_loss, model, wrt=nnx.LoRAParam, method="vmap")
  for f, r in zip(fast, reference):
    assert np.max(np.abs(f - r)) <= 1e-5 * np.max(np.abs(r))


def test_lora_fine_tune_leaves_the_base_bit_identical():
  model = _lora_model()
  base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))   # LoRAParam subclasses Param
  before = jax.tree.map(np.array, nnx.as_pure(nnx.state(model, base)))
  adapters = jax.tree.map(np.array, nnx.as_pure(nnx.state(model, nnx.LoRAParam)))
  tx = optax.chain(optax_dp.dp_aggregate(C, 1.0, jax.random.key(0), expected_batch_size=4),
                   optax.adam(1e-2))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
  grad_fn = optax_dp.clipped_grads(_nnx_loss, C, wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, optimizer, window, mask):
    optimizer.update(model, grad_fn(model, window, mask))

  for seed in range(3):
    step(model, optimizer, _windows(seed), MASK)
  after = jax.tree.map(np.array, nnx.as_pure(nnx.state(model, base)))
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before),
                                                  jax.tree.leaves(after)))
  moved = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), adapters,
                       nnx.as_pure(nnx.state(model, nnx.LoRAParam)))
  assert min(jax.tree.leaves(moved)) > 0   # every adapter trained
