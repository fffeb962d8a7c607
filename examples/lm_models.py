"""Character-level language models for the Shakespeare recipes: a causal
transformer in Flax NNX and its Linen twin, and a character LSTM (NNX).

Each maps tokens (B, T) int to next-character logits (B, T, vocab): position
t sees tokens 0..t only. Every parameter is in a layer optax_dp book-keeps
(`optax_dp.clipping_plan` names the rule of each; tests/test_lm_models.py
checks that none falls back to per-example gradients): token and position
embeddings (`embed`), the attention's and the MLP's projections and the head
(`dense`), LayerNorm (`norm`: position sums of g and of g times the normalised input), the
LSTM's cell through its scan (`recurrent`). No weight tying: a parameter used
by two layers would send the model to the per-example path.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """The size of a character transformer (defaults: the recipes' model)."""
  vocab_size: int
  length: int = 64           # context: the longest sequence it reads
  features: int = 128
  heads: int = 4
  layers: int = 3
  mlp_ratio: int = 4


class _NNXBlock(nnx.Module):
  """Pre-LayerNorm block: causal self-attention, then an MLP, each residual."""

  def __init__(self, config: LMConfig, rngs: nnx.Rngs):
    d = config.features
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(num_heads=config.heads, in_features=d,
                                            qkv_features=d, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, config.mlp_ratio * d, rngs=rngs)
    self.down = nnx.Linear(config.mlp_ratio * d, d, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attention(self.ln1(x), mask=mask)
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class CharTransformer(nnx.Module):
  """A causal character transformer (GPT-style, pre-LayerNorm), Flax NNX.

  >>> from flax import nnx
  >>> import jax.numpy as jnp
  >>> model = CharTransformer(LMConfig(vocab_size=80, length=16, features=32,
  ...                                  heads=2, layers=1), rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((2, 16), jnp.int32)).shape
  (2, 16, 80)
  """

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.features, rngs=rngs)
    self.position = nnx.Embed(config.length, config.features, rngs=rngs)
    self.blocks = nnx.List([_NNXBlock(config, rngs) for _ in range(config.layers)])
    self.ln = nnx.LayerNorm(config.features, rngs=rngs)
    self.head = nnx.Linear(config.features, config.vocab_size, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.position(jnp.arange(tokens.shape[1]))[None]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.ln(x))


class _LinenBlock(nn.Module):
  config: LMConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    d = self.config.features
    h = nn.MultiHeadDotProductAttention(num_heads=self.config.heads, qkv_features=d)(
        nn.LayerNorm()(x), mask=mask)
    x = x + h
    h = nn.Dense(d)(nn.gelu(nn.Dense(self.config.mlp_ratio * d)(nn.LayerNorm()(x))))
    return x + h


class LinenCharTransformer(nn.Module):
  """The same transformer in Flax Linen (the same layers and sizes)."""
  config: LMConfig

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    c = self.config
    x = nn.Embed(c.vocab_size, c.features)(tokens)
    x = x + nn.Embed(c.length, c.features, name="position")(jnp.arange(tokens.shape[1]))[None]
    mask = nn.make_causal_mask(tokens)
    for _ in range(c.layers):
      x = _LinenBlock(c)(x, mask)
    return nn.Dense(c.vocab_size)(nn.LayerNorm()(x))


class CharLSTM(nnx.Module):
  """A character LSTM, Flax NNX: Embed, one `nnx.RNN` over an LSTM cell,
  a Linear head.

  >>> from flax import nnx
  >>> import jax.numpy as jnp
  >>> CharLSTM(80, features=32, rngs=nnx.Rngs(0))(jnp.zeros((2, 5), jnp.int32)).shape
  (2, 5, 80)
  """

  def __init__(self, vocab_size: int, *, features: int = 256, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab_size, features, rngs=rngs)
    self.rnn = nnx.RNN(nnx.LSTMCell(features, features, rngs=rngs))
    self.head = nnx.Linear(features, vocab_size, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.head(self.rnn(self.embed(tokens)))


def next_char_loss(logits: jax.Array, window: jax.Array) -> jax.Array:
  """Mean next-character cross-entropy (nats) of a batch of windows: `logits`
  of `window[:, :-1]` against `window[:, 1:]`."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, window[:, 1:].astype(jnp.int32)).mean()


def nnx_loss(model: nnx.Module, window: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(loss, logits) of an NNX model on a batch of windows (B, T + 1)."""
  logits = model(window[:, :-1].astype(jnp.int32))
  return next_char_loss(logits, window), logits


def add_lora(model: CharTransformer, rank: int, *, rngs: nnx.Rngs) -> CharTransformer:
  """Wraps every Linear of the model's blocks (the MLP's) and the head in
  `nnx.LoRA` adapters of `rank`, in place: the base kernels stay `nnx.Param`,
  the adapters are `nnx.LoRAParam` (train them alone with `wrt=nnx.LoRAParam`).
  The adapters start at zero (B = 0): the wrapped model computes what the base
  did until it is trained."""
  def wrap(linear: nnx.Linear) -> nnx.LoRA:
    return nnx.LoRA(linear.in_features, rank, linear.out_features, base_module=linear,
                    rngs=rngs)
  for block in model.blocks:
    block.up = wrap(block.up)
    block.down = wrap(block.down)
  model.head = wrap(model.head)
  return model


def make_mesh(spec: str) -> jax.sharding.Mesh:
  """A mesh of Auto axes over all devices from `"data=2,fsdp=4"` or
  `"data=4,model=2"`: a data axis and one parameter axis, 'fsdp' or 'model'."""
  sizes = {}
  for part in spec.split(","):
    name, _, size = part.partition("=")
    if name.strip() not in ("data", "fsdp", "model") or not size.strip().isdigit():
      raise ValueError(f"--mesh {spec!r}: give data=N and one of fsdp=M or model=M, "
                       "e.g. data=2,fsdp=4")
    sizes[name.strip()] = int(size)
  kinds = [k for k in sizes if k != "data"]
  if "data" not in sizes or len(kinds) != 1:
    raise ValueError(f"--mesh {spec!r}: give data=N and one of fsdp=M or model=M")
  shape = (sizes["data"], sizes[kinds[0]])
  if shape[0] * shape[1] != jax.device_count():
    raise ValueError(f"--mesh {spec!r} has {shape[0] * shape[1]} devices; JAX sees "
                     f"{jax.device_count()} (on a CPU: XLA_FLAGS="
                     "--xla_force_host_platform_device_count=N)")
  return jax.make_mesh(shape, ("data", kinds[0]),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def param_spec(array, axis: str, size: int) -> jax.sharding.PartitionSpec:
  """Where a parameter goes on a mesh axis of `size` devices: FSDP ('fsdp')
  splits its largest dimension divisible by `size`, tensor parallel
  ('model') its last divisible dimension; a leaf with none stays whole."""
  shape = jnp.shape(array)
  dims = (sorted(range(len(shape)), key=lambda i: -shape[i]) if axis == "fsdp"
          else range(len(shape) - 1, -1, -1))
  for i in dims:
    if size > 1 and shape[i] % size == 0:
      entries = [None] * len(shape)
      entries[i] = axis
      return jax.sharding.PartitionSpec(*entries)
  return jax.sharding.PartitionSpec()


def shard_params(tree, mesh: jax.sharding.Mesh):
  """`tree` (a params dict or an `nnx.State`) placed on `mesh`, each leaf
  split over its parameter axis by `param_spec`."""
  axis = mesh.axis_names[1]
  return jax.tree.map(lambda a: jax.device_put(a, jax.sharding.NamedSharding(
      mesh, param_spec(a, axis, mesh.shape[axis]))), tree)


def batch_spec(mesh: jax.sharding.Mesh) -> jax.sharding.PartitionSpec:
  """The batch's rows: over both axes of an FSDP mesh, over 'data' of a
  tensor-parallel one."""
  if mesh.axis_names[1] == "fsdp":
    return jax.sharding.PartitionSpec(("data", "fsdp"))
  return jax.sharding.PartitionSpec("data")
