"""Models shared by the examples and the benchmarks.

The one home of the tutorial's CNN: `examples/mnist_linen.py` trains it and
`benchmarks/step_time.py` (hence `peak_memory.py`) times it. Scripts next to
this file import it as `from models import CNN`; the benchmarks add this
directory to `sys.path` first. `NNXCNN` is the same network as a Flax NNX
module, for `examples/mnist_nnx.py`. `TanhCNN`, `GroupNormCNN`, `ScatterLinear` and
`ScatterCNN` are the models of the recipes (`examples/train.py`).
"""

from __future__ import annotations

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp


class CNN(nn.Module):
  """The tutorial CNN: the Flax MNIST tutorial's, trained by jax_privacy's Linen DP-SGD tutorial.

  NHWC input (B, 28, 28, 1), 10 logits: Conv32 3x3 - relu - avgpool 2 -
  Conv64 3x3 - relu - avgpool 2 - Dense256 - relu - Dense10 ("SAME" padding,
  nn.Conv's default); 824,458 parameters on 28x28x1 inputs.
  `benchmarks/opacus_step.py` has its PyTorch copy (NCHW) for the Opacus rows.
  """

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=32, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=64, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(features=256)(x)
    x = nn.relu(x)
    x = nn.Dense(features=10)(x)
    return x


class NNXCNN(nnx.Module):
  """The tutorial CNN as a Flax NNX module (Flax's NNX MNIST tutorial's CNN).

  The layers, shapes and parameter count of `CNN` above: NHWC input
  (B, 28, 28, 1), Conv 1->32 3x3 - relu - avgpool 2 - Conv 32->64 3x3 - relu -
  avgpool 2 - Linear 3136->256 - relu - Linear 256->10 ("SAME" padding, as
  nnx.Conv's default); 824,458 parameters (tests/test_example_mnist.py checks
  them against `CNN`'s). Drawn from `rngs`, its initial values differ from
  `CNN`'s for the same seed (NNX draws them in its own order);
  `nnx_cnn_from_linen` gives it `CNN`'s.
  """

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
    self.linear1 = nnx.Linear(3136, 256, rngs=rngs)
    self.linear2 = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.avg_pool(nnx.relu(self.conv1(x)), window_shape=(2, 2), strides=(2, 2))
    x = nnx.avg_pool(nnx.relu(self.conv2(x)), window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nnx.relu(self.linear1(x))
    return self.linear2(x)


# NNXCNN's layers and the Linen CNN's auto-named ones, in call order.
_LINEN_NAMES = (("conv1", "Conv_0"), ("conv2", "Conv_1"), ("linear1", "Dense_0"),
                ("linear2", "Dense_1"))


def nnx_cnn_from_linen(params) -> NNXCNN:
  """An `NNXCNN` holding the values of a Linen `CNN`'s `params`.

  The two are the same network (kernels in the same layouts: HWIO for the
  convolutions, (in, out) for the dense layers), so from the same initial
  values, batches and noise they train the same model; `mnist_nnx.py` starts
  from `CNN().init(key, ...)` for that reason (tests/test_example_mnist.py
  checks that the two examples agree).
  """
  model = NNXCNN(rngs=nnx.Rngs(0))
  for nnx_name, linen_name in _LINEN_NAMES:
    layer = getattr(model, nnx_name)
    for name in ("kernel", "bias"):
      getattr(layer, name)[...] = params[linen_name][name]
  return model


class TanhCNN(nn.Module):
  """Papernot et al. 2021's tanh "SampleConvNet" for MNIST (also Opacus's MNIST
  example): Conv16 8x8 stride 2 pad 3 - tanh - maxpool 2 stride 1 - Conv32
  4x4 stride 2 - tanh - maxpool 2 stride 1 - Dense32 - tanh - Dense10;
  26,010 parameters on 28x28x1 inputs. Reference: "Tempered Sigmoid
  Activations for Deep Learning with Differential Privacy", AAAI 2021,
  https://arxiv.org/abs/2007.14191.
  """

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Conv(16, (8, 8), strides=2, padding=3)(x))
    x = nn.max_pool(x, (2, 2), strides=(1, 1))
    x = nn.tanh(nn.Conv(32, (4, 4), strides=2, padding="VALID")(x))
    x = nn.max_pool(x, (2, 2), strides=(1, 1))
    x = nn.tanh(nn.Dense(32)(x.reshape((x.shape[0], -1))))
    return nn.Dense(10)(x)


class WSConv(nn.Module):
  """A 3x3 "SAME" convolution with weight standardisation: each output
  channel's kernel is standardised (zero mean, unit variance over its fan-in)
  before use (Qiao et al. 2019, arXiv 1903.10520), as in the normaliser-free
  and GroupNorm DP-SGD CNNs of De et al. 2022. A custom layer: its kernel is
  used directly in `__call__`, book-kept by optax_dp's generic rule."""
  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    mean = kernel.mean(axis=(0, 1, 2), keepdims=True)
    std = jnp.sqrt(kernel.var(axis=(0, 1, 2), keepdims=True) + 1e-5)
    return jax.lax.conv_general_dilated(
        x, (kernel - mean) / std, (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias


class GroupNormCNN(nn.Module):
  """WSConv16 - GroupNorm(4) - relu - avgpool 2 - WSConv32 - GroupNorm(8) -
  relu - avgpool 2 - Dense10 (20,586 parameters on 28x28x1 inputs):
  batch-independent normalisation, which per-example clipping allows
  (BatchNorm it does not). Sized for a 2-core CPU: about a fifth of the
  tutorial CNN's multiply-adds per image, so that its recipe (20 epochs at
  batch 512) trains in under 15 minutes here."""
  features: tuple = (16, 32)
  groups: tuple = (4, 8)

  @nn.compact
  def __call__(self, x):
    for features, groups in zip(self.features, self.groups):
      x = nn.relu(nn.GroupNorm(num_groups=groups)(WSConv(features)(x)))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class ScatterLinear(nn.Module):
  """Tramer & Boneh 2021's "ScatterNet + linear": GroupNorm without
  parameters over the scattering channels (per example, so no privacy cost
  and no cross-example dependence), then Dense10. Input: the
  (B, 7, 7, 81) features of `scattering.scattering_features`. Reference:
  https://arxiv.org/abs/2011.11660."""
  num_groups: int = 27

  @nn.compact
  def __call__(self, x):
    x = nn.GroupNorm(num_groups=self.num_groups, use_bias=False, use_scale=False)(x)
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class ScatterCNN(nn.Module):
  """Tramer & Boneh 2021's "ScatterNet + CNN" for MNIST-sized inputs: the
  parameter-free GroupNorm of `ScatterLinear`, Conv16 3x3 stride 2 pad 1 -
  tanh - Conv32 3x3 pad 1 - tanh - Dense32 - tanh - Dense10 on the (B, 7, 7,
  81) scattering features."""
  num_groups: int = 27

  @nn.compact
  def __call__(self, x):
    x = nn.GroupNorm(num_groups=self.num_groups, use_bias=False, use_scale=False)(x)
    x = nn.tanh(nn.Conv(16, (3, 3), strides=2, padding=1)(x))
    x = nn.tanh(nn.Conv(32, (3, 3), padding=1)(x))
    x = nn.tanh(nn.Dense(32)(x.reshape((x.shape[0], -1))))
    return nn.Dense(10)(x)
