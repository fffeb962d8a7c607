"""optax_dp: differentially-private training (DP-SGD) as an ordinary optax optimizer.

Swap `tx` to make a JAX/Flax training loop private::

    sigma = optax_dp.calibrate_noise_multiplier(
        1.0, 1e-5, dataset_size=60000, batch_size=256, steps=5000)
    tx = optax.chain(
        optax_dp.dp_aggregate(l2_norm_clip=0.1, noise_multiplier=sigma,
                              key=jax.random.key(42), expected_batch_size=256),
        optax.sgd(0.1, momentum=0.9))
    grad_fn = optax_dp.per_example_grads(loss_fn)
    state = state.apply_gradients(grads=grad_fn(state.params, batch, mask))
"""

from optax_dp._accounting import calibrate_noise_multiplier
from optax_dp._accounting import compute_epsilon
from optax_dp._accounting import dpsgd_event
from optax_dp._aggregate import DPAggregateState
from optax_dp._clipped import ClippedGrads
from optax_dp._clipped import clipped_grads
from optax_dp._clipped import value_and_clipped_grads
from optax_dp._aggregate import dp_aggregate
from optax_dp._aggregate import dpsgd
from optax_dp._per_example import per_example_grads
from optax_dp._per_example import value_and_per_example_grads
from optax_dp._sampling import PoissonBatch
from optax_dp._sampling import gather_batch
from optax_dp._sampling import poisson_batches
from optax_dp._sampling import poisson_max_batch_size

__version__ = "0.1.0"

__all__ = (
    "ClippedGrads",
    "DPAggregateState",
    "PoissonBatch",
    "calibrate_noise_multiplier",
    "clipped_grads",
    "compute_epsilon",
    "dp_aggregate",
    "dpsgd",
    "dpsgd_event",
    "gather_batch",
    "per_example_grads",
    "poisson_batches",
    "poisson_max_batch_size",
    "value_and_clipped_grads",
    "value_and_per_example_grads",
)
