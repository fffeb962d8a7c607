"""optax_dp: differentially-private training (DP-SGD) as an ordinary optax optimizer.

Swap `tx` to make a JAX/Flax training loop private::

    sampler = optax_dp.PoissonSampler(dataset_size=60000, expected_batch_size=256)
    budget = optax_dp.privacy_budget(sampler=sampler, target_epsilon=1.0,
                                     target_delta=1e-5, steps=5000)
    tx = optax.chain(
        optax_dp.dp_aggregate(l2_norm_clip=0.1, key=jax.random.key(42),
                              budget=budget),
        optax.sgd(0.1, momentum=0.9))
    grad_fn = optax_dp.clipped_grads(loss_fn, l2_norm_clip=0.1)
    for batch in sampler.batches(seed, steps=budget.max_steps):
      x = optax_dp.gather_batch(data, batch)
      state = state.apply_gradients(grads=grad_fn(state.params, x, batch.mask))
    print(budget.epsilon_spent(state.opt_state))
"""

from optax_dp import audit
from optax_dp._lifecycle._accumulate import DPAccumulateState
from optax_dp._clip._clipping import clip_and_sum
from optax_dp._lifecycle._accumulate import dp_accumulate
from optax_dp._lifecycle._augmentation import augmentation_multiplicity
from optax_dp._lifecycle._averaging import AveragedParamsState
from optax_dp._lifecycle._averaging import averaged_params
from optax_dp._lifecycle._averaging import ema_params
from optax_dp._lifecycle._averaging import polyak_params
from optax_dp._sample._accounting import ACCOUNTANTS
from optax_dp._sample._accounting import SamplingArgs
from optax_dp._sample._calibration import calibrate_noise_multiplier
from optax_dp._sample._accounting import compute_epsilon
from optax_dp._sample._accounting import dpsgd_event
from optax_dp._sample._group_privacy import GroupPrivacy
from optax_dp._sample._group_privacy import group_privacy
from optax_dp._core._checks import AdaptiveClipMismatchError
from optax_dp._aggregation._aggregate import DPAggregateState
from optax_dp._aggregation._aggregate import l2_norm_clip_of
from optax_dp._clip._clip_norms import AdaptiveClip
from optax_dp._clip._clip_norms import ClipGroups
from optax_dp._clip._clip_norms import clip_groups
from optax_dp._clip._clip_norms import per_layer_clip_norms
from optax_dp._core._checks import NoiseReplayError
from optax_dp._lifecycle._budget import PrivacyBudget
from optax_dp._core._checks import PrivacyBudgetExceededError
from optax_dp._lifecycle._budget import privacy_budget
from optax_dp._lifecycle._budget import privacy_statement
from optax_dp._lifecycle._tuning import PrivateScore
from optax_dp._lifecycle._tuning import TrialCount
from optax_dp._lifecycle._tuning import TuningResult
from optax_dp._lifecycle._tuning import calibrate_trial_noise
from optax_dp._lifecycle._tuning import private_score
from optax_dp._lifecycle._tuning import rdp_dominated
from optax_dp._lifecycle._tuning import trial_event_of
from optax_dp._lifecycle._tuning import trial_noise_for
from optax_dp._lifecycle._tuning import tune
from optax_dp._lifecycle._tuning import tuning_epsilon
from optax_dp._lifecycle._tuning import tuning_event
from optax_dp._core._checks import LargeDeltaWarning
from optax_dp._core._checks import reraise_refusals
from optax_dp._clip._clipping import ClippedGrads
from optax_dp._core._keys import NoiseKeyReuseWarning
from optax_dp._grads._clipped import ClipOptions
from optax_dp._grads._bookkeeping import PerExampleFallbackWarning
from optax_dp._grads._clipped import clipped_grads
from optax_dp._grads._bookkeeping import clipping_plan
from optax_dp._grads._clipped import value_and_clipped_grads
from optax_dp._aggregation._aggregate import dp_aggregate
from optax_dp._aggregation._aggregate import dpsgd
from optax_dp._aggregation._correlated import bandmf_strategy
from optax_dp._grads._per_example import per_example_grads
from optax_dp._grads._per_example import value_and_per_example_grads
from optax_dp._sharding import gather_sharded_batch
from optax_dp._sharding import pad_batch_for_devices
from optax_dp._sharding import sharded_clipped_grads
from optax_dp._sharding import sharded_per_example_grads
from optax_dp._sharding import sharded_value_and_clipped_grads
from optax_dp._sample._batches import Batch
from optax_dp._sample._poisson import CyclicPoissonSampler
from optax_dp._sample._sampling import FixedBatchSampler
from optax_dp._sample._batches import PoissonBatch
from optax_dp._sample._poisson import PoissonSampler
from optax_dp._sample._sampling import ShuffleSampler
from optax_dp._sample._users import UserPoissonSampler
from optax_dp._sample._sampling import make_sampler
from optax_dp._sample._batches import MaskedBatch
from optax_dp._sample._batches import gather_batch
from optax_dp._sample._poisson import poisson_batches
from optax_dp._sample._batches import poisson_max_batch_size
from optax_dp._sample._batches import poisson_padding_buckets

from optax_dp._version import __version__

__all__ = (
    "ACCOUNTANTS",
    "AdaptiveClip",
    "AdaptiveClipMismatchError",
    "ClipGroups",
    "clip_groups",
    "l2_norm_clip_of",
    "per_layer_clip_norms",
    "AveragedParamsState",
    "augmentation_multiplicity",
    "averaged_params",
    "ema_params",
    "polyak_params",
    "audit",
    "Batch",
    "ClipOptions",
    "ClippedGrads",
    "CyclicPoissonSampler",
    "SamplingArgs",
    "DPAccumulateState",
    "DPAggregateState",
    "FixedBatchSampler",
    "NoiseKeyReuseWarning",
    "PerExampleFallbackWarning",
    "NoiseReplayError",
    "PoissonBatch",
    "PoissonSampler",
    "PrivacyBudget",
    "PrivacyBudgetExceededError",
    "ShuffleSampler",
    "PrivateScore",
    "TrialCount",
    "TuningResult",
    "calibrate_trial_noise",
    "private_score",
    "rdp_dominated",
    "trial_event_of",
    "trial_noise_for",
    "tune",
    "tuning_epsilon",
    "tuning_event",
    "UserPoissonSampler",
    "bandmf_strategy",
    "calibrate_noise_multiplier",
    "clip_and_sum",
    "clipped_grads",
    "clipping_plan",
    "compute_epsilon",
    "dp_accumulate",
    "dp_aggregate",
    "dpsgd",
    "dpsgd_event",
    "gather_batch",
    "GroupPrivacy",
    "group_privacy",
    "MaskedBatch",
    "gather_sharded_batch",
    "make_sampler",
    "pad_batch_for_devices",
    "per_example_grads",
    "poisson_batches",
    "poisson_max_batch_size",
    "poisson_padding_buckets",
    "privacy_budget",
    "privacy_statement",
    "LargeDeltaWarning",
    "reraise_refusals",
    "sharded_clipped_grads",
    "sharded_per_example_grads",
    "sharded_value_and_clipped_grads",
    "value_and_clipped_grads",
    "value_and_per_example_grads",
)
