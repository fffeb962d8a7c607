"""ScatterNet features: a fixed wavelet scattering transform of each image.

Tramer & Boneh 2021 train private linear models and small CNNs on the
scattering coefficients of Oyallon & Mallat (J = 2 scales, L = 8 angles: 81
channels on a 7x7 grid for a 28x28 grey image) and beat end-to-end CNNs at
the same epsilon. The transform has no trained parameters and is computed
from each image alone, so precomputing it for the whole dataset before
training is data-independent preprocessing: it costs no privacy (the private
training then sees, per example, a fixed function of that example only;
tests/test_train_results.py checks that one image's features do not depend
on the others in its batch).

The transform is kymatio's (BSD-3-Clause, https://www.kymatio.io), its JAX
frontend. kymatio 0.3's `kymatio.jax` module also imports its 3D transform,
which needs `scipy.special.sph_harm` (removed in SciPy 1.15), so the 2D
frontend is imported from its own module.

References:
  Tramer & Boneh 2021, "Differentially Private Learning Needs Better Features
  (or Much More Data)", ICLR 2021, https://arxiv.org/abs/2011.11660.
  Oyallon & Mallat 2015, "Deep Roto-Translation Scattering for Object
  Classification", https://arxiv.org/abs/1412.8659.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def _transform(height: int, width: int, scales: int, angles: int):
  try:
    from kymatio.scattering2d.frontend.jax_frontend import ScatteringJax2D  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit("ScatterNet recipes need kymatio: pip install -e '.[examples]' "
                     "(or pip install kymatio).") from e
  return jax.jit(ScatteringJax2D(J=scales, shape=(height, width), L=angles).scattering)


def scattering_features(images: np.ndarray, *, scales: int = 2, angles: int = 8,
                        chunk: int = 1000) -> np.ndarray:
  """Scattering coefficients of each image, channels last.

  images: (N, H, W, 1) float in [0, 1]. Returns float32 (N, H / 2^scales,
  W / 2^scales, K) with K = 1 + L J + L^2 J (J - 1) / 2 (81 for J=2, L=8),
  computed `chunk` images at a time; each image's row depends on that image
  only.
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] != 1 or not len(images):
    raise ValueError(f"scattering_features: expected (N >= 1, H, W, 1) images, got "
                     f"{images.shape}")
  transform = _transform(images.shape[1], images.shape[2], scales, angles)
  out = []
  for start in range(0, len(images), chunk):
    coefficients = transform(jnp.asarray(images[start:start + chunk, ..., 0]))  # (n, K, h, w)
    out.append(np.asarray(jnp.moveaxis(coefficients, 1, -1)))
  return np.concatenate(out)
