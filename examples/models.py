"""Models shared by the examples and the benchmarks.

The one home of the tutorial's CNN: `examples/mnist_linen.py` trains it and
`benchmarks/step_time.py` (hence `peak_memory.py`) times it. Scripts next to
this file import it as `from models import CNN`; the benchmarks add this
directory to `sys.path` first. `NNXCNN` is the same network as a Flax NNX
module, for `examples/mnist_nnx.py`.
"""

from __future__ import annotations

from flax import nnx
import flax.linen as nn


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
