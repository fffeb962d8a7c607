"""Models shared by the examples and the benchmarks.

The one home of the tutorial's CNN: `examples/mnist_linen.py` trains it and
`benchmarks/step_time.py` (hence `peak_memory.py`) times it. Scripts next to
this file import it as `from models import CNN`; the benchmarks add this
directory to `sys.path` first.
"""

from __future__ import annotations

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
