"""Correlated noise across steps: banded matrix factorisation (DP-BandMF).

DP-SGD adds fresh noise `z_t ~ N(0, sigma^2 C^2 I)` to the clipped sum at
every step. DP-BandMF adds `(C_mat^{-1} z)_t` instead, for a lower-triangular
banded strategy matrix `C_mat` (`bands` non-zero diagonals, every column of
norm 1): noise correlated across steps so that much of it cancels in the
trained model (the prefix sums of the updates). Here the strategy is the
banded Toeplitz one that jax_privacy's optimiser finds for the run's number of
steps and bands (`toeplitz.optimize_banded_toeplitz`, then column-normalised
by `banded.ColumnNormalizedBanded`), and the noise is produced in streaming
fashion as jax_privacy's `inverse_as_streaming_matrix` does (laid out to copy
no buffer per step; see `_next_leaf`): the state is, per
parameter leaf, a step index and `bands` buffers of the leaf's shape (the last
`bands` i.i.d. draws solved through `C_mat`), plain arrays an optax state can
hold and a checkpointer can save. The strategy is not derived anew.

With `bands = 1` the strategy is the identity and the noise is DP-SGD's, bit
for bit.

Privacy contract: the noise is that of the Gaussian mechanism applied to
`C_mat x` (x: the stream of clipped sums), post-processed by `C_mat^{-1}`.
Its accounting needs every example to take part only in steps `bands` apart
(the columns it touches then do not overlap, and `C_mat` has column norm 1):
that is cyclic Poisson sampling over `bands` groups
(`optax_dp.CyclicPoissonSampler`), accounted as `ceil(steps / bands)`
compositions of the Poisson-subsampled Gaussian mechanism
(`jax_privacy.experimental.accounting.amplified_bandmf_event`). The strategy
is built for a fixed number of steps: a step past it is refused.

jax-privacy is an optional dependency (`pip install 'jax-privacy>=2.0'`, or
`pip install -e '.[bandmf]'` from a clone),
imported only when a BandMF strategy is built.

References:
  Choquette-Choo, Ganesh, McKenna, McMahan, Rush, Thakurta & Xu 2023,
  "(Amplified) Banded Matrix Factorization: A unified approach to private
  training", https://arxiv.org/abs/2306.08153.
  McKenna 2024, "Scaling up the Banded Matrix Factorization Mechanism for
  Differentially Private ML", https://arxiv.org/abs/2405.15913 (banded
  Toeplitz strategies).
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp

from optax_dp._core import _checks


def _jax_privacy(what: str):
  try:
    from jax_privacy.matrix_factorization import banded  # pylint: disable=g-import-not-at-top
    from jax_privacy.matrix_factorization import toeplitz  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"{what} needs jax-privacy (its matrix-factorisation strategies): "
        "pip install 'jax-privacy>=2.0' (from a clone: pip install -e '.[bandmf]').") from e
  return banded, toeplitz


def bandmf_strategy(steps: int, bands: int) -> Any:
  """The DP-BandMF strategy matrix for a run of `steps` noisy steps with
  `bands` bands: jax_privacy's optimised banded Toeplitz coefficients
  (mean squared error of the prefix sums), as a column-normalised banded
  matrix (`jax_privacy.matrix_factorization.banded.ColumnNormalizedBanded`,
  `.n == steps`, `.bands == bands`). Cached: the optimisation takes seconds.

  `bands = 1` is the identity (DP-SGD). `bands` may not exceed `steps`.

  Privacy contract: every column has L2 norm 1, so with participations at
  least `bands` steps apart the sensitivity per participation is one clip
  norm (see the module docstring).

  References:
    Choquette-Choo et al. 2023, https://arxiv.org/abs/2306.08153.

  Examples:
    >>> import optax_dp
    >>> strategy = optax_dp.bandmf_strategy(steps=6, bands=2)
    >>> strategy.n, strategy.bands
    (6, 2)
  """
  steps = _checks.check_int("steps", steps, 1)
  bands = _checks.check_int("bands", bands, 1)
  if bands > steps:
    raise ValueError(f"bandmf_strategy: need 1 <= bands <= steps, got bands={bands}, "
                     f"steps={steps}.")
  return _optimised_strategy(steps, bands)


@functools.lru_cache(maxsize=8)
def _optimised_strategy(steps: int, bands: int) -> Any:
  banded, toeplitz = _jax_privacy("DP-BandMF")
  if bands == 1:
    coefs = jnp.ones((1,), jnp.float32)
  else:
    with jax.ensure_compile_time_eval():
      coefs = toeplitz.optimize_banded_toeplitz(steps, bands)
  with jax.ensure_compile_time_eval():
    return banded.ColumnNormalizedBanded.from_banded_toeplitz(steps, jnp.asarray(coefs))


def init_noise_state(strategy: Any, tree: chex.ArrayTree) -> Any:
  """The streaming state of `strategy`'s noise for noise shaped like `tree`:
  per leaf, `(index, buffers)` with `bands` buffers of the leaf's shape."""
  return strategy.inverse_as_streaming_matrix().init_multiply(tree)


def _next_leaf(strategy: Any, value: jax.Array, state: tuple) -> tuple[jax.Array, tuple]:
  """One leaf of `correlate`: jax_privacy's `inverse_as_streaming_matrix`
  step (Algorithm 9 of Choquette-Choo et al. 2023: solve row `index` of the
  banded `C` against the last `bands - 1` solutions), with the row's weights
  scattered onto the buffers' ring positions instead of the buffers gathered
  into the row's order. Same numbers up to float summation order (tested
  against jax_privacy's), but no copy of the `bands` buffers per step: the
  train step's XLA temporaries do not grow with the bands
  (`benchmarks/peak_memory.py`, rows `optax_dp_bandmf2` and `optax_dp_bandmf16`,
  `step_temp_bytes`: 142,701,952 for both)."""
  index, buffers = state
  bands = strategy.bands
  if bands == 1:   # the identity: DP-SGD's noise, untouched
    return value, (index + 1, buffers)
  slot = index % bands
  lags = jnp.arange(bands)
  row = strategy.params[index - lags, lags]            # row[r]: C[index, index - r]
  weights = jnp.zeros((bands,), buffers.dtype).at[(slot - lags[1:]) % bands].set(
      row[1:].astype(buffers.dtype))
  solved = (value - jnp.tensordot(weights, buffers, axes=((0,), (0,)))) / row[0]
  scale = jnp.linalg.norm(strategy.params[index])       # the column normalisation
  return solved * scale, (index + 1, buffers.at[slot].set(solved))


def correlate(strategy: Any, noise: chex.ArrayTree, noise_state: Any
              ) -> tuple[chex.ArrayTree, Any]:
  """`(C^{-1} z)_t` for this step's i.i.d. `noise` z_t, and the next state."""
  # Leaf by leaf, in flattening order: the state's containers may differ from
  # the noise's (an nnx.Optimizer wraps each leaf's (index, buffers) in its
  # own variable type), its leaves come in (index, buffers) pairs.
  leaves, treedef = jax.tree.flatten(noise)
  state_leaves, state_treedef = jax.tree.flatten(noise_state)
  if len(state_leaves) != 2 * len(leaves):
    raise ValueError(
        f"DP-BandMF noise state of {len(state_leaves)} arrays for noise of "
        f"{len(leaves)} leaves (expected an (index, buffers) pair per leaf): the "
        "optimizer state does not belong to these parameters.")
  pairs = [_next_leaf(strategy, leaf, (index, buffers)) for leaf, index, buffers in
           zip(leaves, state_leaves[0::2], state_leaves[1::2])]
  return (jax.tree.unflatten(treedef, [out for out, _ in pairs]),
          jax.tree.unflatten(state_treedef, [a for _, state in pairs for a in state]))


def noise_index(noise_state: Any) -> jax.Array:
  """The step the streaming state expects next (the index of any leaf; all
  advance together), or -1 for a state without leaves."""
  leaves = jax.tree.leaves(noise_state)
  return jnp.asarray(leaves[0], jnp.int32) if leaves else jnp.int32(-1)
