"""The small Flax models the tests share: each defined once, here.

Test files import this module as `models` (pytest puts this folder on
sys.path, as for planted_bugs.py; tests/conftest.py imports it first, so the
name stays this file's even where examples/, whose models.py is the tutorial
CNN's, comes first on sys.path). The subprocess scripts of
test_checkpoint.py and test_multi_device.py get this folder on PYTHONPATH.

  MLP(features, activation)  Dense layers with `activation` between them.
      (4, 2) relu:  test_composition.py, test_budget.py
      (8, 3) relu:  test_bad_inputs.py, test_aggregate.py
      (7, 3) tanh:  test_clipped.py
      (8, 3) tanh:  test_checkpoint.py (its run script)
      (3, 2) tanh:  test_properties.py
  SmallCNN(features, classes)  Conv(features, 3x3) - relu - flatten - Dense(classes).
      (3, 3):  test_accumulate.py
      (4, 3):  test_multi_device.py (its 8-device script)
  NNXSmallCNN(rngs)  Flax NNX: Conv(1 -> 4, 3x3) - relu - flatten - Linear(3),
      for (B, 6, 6, 1) inputs: test_augmentation.py, test_clip_norms.py.
  NNXTutorialCNN(rngs)  Flax NNX, the structure of Flax's own NNX MNIST
      tutorial: Conv - Dropout(rate) without rngs (streams passed at call
      time, model(x, rngs)) - avg pool - Linear - Dropout - Linear, for
      (B, 8, 8, 1) inputs: test_nnx.py (the tutorial-idiom port).
  TutorialCNN  examples/models.py's CNN (the tutorial's), not a copy of it:
      loaded from that file under the module name `example_models`, so that
      the two files called models.py never meet in sys.modules.

Models that one test file alone needs (dtype-specific ones in
test_linen.py, complex ones in test_clipping.py, the layer-kind zoo of
test_clipped.py) stay in that file.

>>> import jax, jax.numpy as jnp
>>> shapes = jax.eval_shape(TutorialCNN().init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
>>> sum(leaf.size for leaf in jax.tree.leaves(shapes))
824458
>>> jax.tree.map(jnp.shape, MLP((8, 3)).init(jax.random.key(0), jnp.zeros((1, 5))))
{'params': {'Dense_0': {'bias': (3,), 'kernel': (8, 3)}, 'Dense_1': {'bias': (8,), 'kernel': (5, 8)}}}
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable, Sequence

import flax.linen as nn
from flax import nnx

_EXAMPLE_MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "examples", "models.py")


def _load_example_models():
  if "example_models" not in sys.modules:
    spec = importlib.util.spec_from_file_location("example_models", _EXAMPLE_MODELS)
    module = importlib.util.module_from_spec(spec)
    sys.modules["example_models"] = module
    spec.loader.exec_module(module)
  return sys.modules["example_models"]


TutorialCNN = _load_example_models().CNN


class MLP(nn.Module):
  """Dense(features[0]) - activation - ... - Dense(features[-1]).

  The layers are created output first, as the nested form these tests used,
  `nn.Dense(3)(nn.relu(nn.Dense(8)(x)))`, creates them: Flax names a layer
  when it is created, so Dense_0 is the OUTPUT layer and Dense_{n-1} the
  first, and the parameter names (hence the values `init` draws for them)
  are those of that form.
  """
  features: Sequence[int]
  activation: Callable = nn.relu

  @nn.compact
  def __call__(self, x):
    layers = [nn.Dense(f) for f in reversed(self.features)][::-1]
    for i, layer in enumerate(layers):
      x = layer(x if i == 0 else self.activation(x))
    return x


class SmallCNN(nn.Module):
  """Conv(features, 3x3, "SAME") - relu - flatten - Dense(classes); NHWC input."""
  features: int
  classes: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.features, (3, 3))(x))
    return nn.Dense(self.classes)(x.reshape((x.shape[0], -1)))


class NNXSmallCNN(nnx.Module):
  """Flax NNX: Conv(1 -> 4, 3x3, "SAME") - relu - flatten - Linear(6*6*4 -> 3)."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.out = nnx.Linear(6 * 6 * 4, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.conv(x)).reshape(x.shape[0], -1))


class NNXTutorialCNN(nnx.Module):
  """Flax's NNX MNIST tutorial's CNN, scaled down (8x8 inputs, 10 classes):
  its dropout layers own no random streams; the caller passes them at call
  time, `model(x, rngs)`, as the tutorial does."""

  def __init__(self, *, rngs: nnx.Rngs, rate: float = 0.1):
    self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
    self.dropout1 = nnx.Dropout(rate=rate)
    self.linear1 = nnx.Linear(4 * 4 * 4, 16, rngs=rngs)
    self.dropout2 = nnx.Dropout(rate=rate)
    self.linear2 = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x, rngs: nnx.Rngs | None = None):
    x = nnx.avg_pool(nnx.relu(self.dropout1(self.conv1(x), rngs=rngs)),
                     window_shape=(2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.dropout2(self.linear1(x), rngs=rngs))
    return self.linear2(x)
