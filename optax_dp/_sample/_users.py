"""User-level sampling: the person, not the example, as the unit of privacy.

`UserPoissonSampler` Poisson-samples *users* (each user independently with
probability `q = expected_users / num_users` at every step) and takes at
most `max_examples_per_user` of each sampled user's examples. Its batches
are `(users, max_examples_per_user)` matrices of example indices with a mask
of the same shape; `clipped_grads` recognises the 2-D mask and clips each
user's combined gradient as one vector, so that adding or removing a user
(all of that user's examples) moves the clipped sum by at most C: the
Poisson-subsampled Gaussian mechanism over users, which is what `dp_event`
accounts for.

Privacy contract: as every sampler's (`optax_dp._sample._sampling`), with
the user as the unit: the epsilon is right only if each noisy step used
exactly the batch yielded for it, every user's examples were clipped
together (the 2-D mask passed whole to `clipped_grads`), and `user_ids`
gives every example of one person the same id (two ids for one person
halve nothing: that person is then two users, and protected as two).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterator, Optional

import dp_accounting
import numpy as np

from optax_dp._core import _checks
from optax_dp._sample import _batches
from optax_dp._sample._batches import Batch
from optax_dp._sample._poisson import DEFAULT_PADDING_BUCKETS
from optax_dp._sample._poisson import CyclicPoissonSampler
from optax_dp._sample._poisson import PoissonSampler

ADD_OR_REMOVE_ONE_USER = "add or remove one user (all of that user's examples)"


def user_examples(user_ids: Any) -> tuple[np.ndarray, list[np.ndarray]]:
  """`(user of each example (N,) int, [example indices of user u])`: users
  numbered 0..U-1 in sorted order of their ids (in order of first appearance
  when the ids cannot be sorted), each user's examples in increasing order.

  >>> owner, examples = user_examples(["b", "a", "b", "c"])
  >>> owner.tolist(), [e.tolist() for e in examples]
  ([1, 0, 1, 2], [[1], [0, 2], [3]])
  """
  ids = np.asarray(user_ids)
  if ids.ndim != 1 or ids.shape[0] == 0:
    raise ValueError(
        "user_ids must be a non-empty 1-D sequence with one user id per example "
        f"(in the order of the dataset's rows), got shape {ids.shape}.")
  try:
    _, owner = np.unique(ids, return_inverse=True)
  except TypeError:   # ids that cannot be sorted (mixed types): first appearance
    first: dict = {}
    owner = np.array([first.setdefault(u, len(first)) for u in ids.tolist()])
  owner = owner.reshape(-1).astype(np.int64)
  order = np.argsort(owner, kind="stable")
  bounds = np.cumsum(np.bincount(owner))[:-1]
  return owner, np.split(order, bounds)


@dataclasses.dataclass(frozen=True, eq=False)
class UserPoissonSampler:
  """Poisson sampling of users, at most `max_examples_per_user` examples each.

  At every step each of the `num_users` distinct users in `user_ids` is
  included independently with probability `q = expected_users / num_users`;
  for each included user, `min(max_examples_per_user, n_u)` of its `n_u`
  examples are chosen uniformly at random without replacement (from the
  seed and the step, never from the data). A batch is a `Batch` whose
  `indices` and `mask` have shape `(users, max_examples_per_user)`: row i
  holds one sampled user's examples, padded with -1 / False; padding rows
  (users) are all False. Pass its `mask` whole to `clipped_grads`, which then
  clips each user's combined gradient (the mean of its examples' gradients)
  to C.

  Accounting (`dp_event`): `steps` compositions of the Poisson-subsampled
  Gaussian mechanism at rate `q` over users, under add/remove-one-*user*
  adjacency: removing a user removes one clipped contribution of norm at most
  C, whatever the number of its examples. The cap `max_examples_per_user`
  bounds compute (and how much of a prolific user each step sees), not the
  privacy: the guarantee covers all of a user's examples.

  The accounting attributes follow `PoissonSampler` over the users:
  `dataset_size` is the number of users, `expected_batch_size` the expected
  number of users per batch (the public normaliser of `dp_aggregate`), and
  `max_batch_size` the static number of user rows.

  Privacy contract: each step's batch is this sampler's, its 2-D mask is
  passed whole to the gradient function (flattening it would clip examples,
  not users: `dp_aggregate` refuses such a sum with this sampler's budget),
  and `user_ids` maps every example of a person to one id.

  Attributes:
    user_ids: one id per example (integers or any sortable hashables), in the
      dataset's row order. Held as given; `num_users` distinct values.
    expected_users: the expected number of users per batch, `q * num_users`.
    max_examples_per_user: k, the static number of example slots per user.
    max_users: the static maximum number of users per batch (default: as
      `PoissonSampler.max_batch_size`, overflow probability <= 1e-12 over the
      run); a batch above it raises.
    padding_buckets: as `PoissonSampler`'s, over users.
    pad_to_multiple_of: as `PoissonSampler`'s, over users.
    bands: None (default), or DP-BandMF's cyclic sampling over users
      (`CyclicPoissonSampler`'s, its groups made of users): a budget of this
      sampler then makes `dp_aggregate` add BandMF noise with `bands` bands,
      accounted over users.

  References:
    Charles, Ganesh, McKenna, McMahan, Mitchell, Pillutla & Rush 2024,
    "Fine-Tuning Large Language Models with User-Level Differential Privacy",
    https://arxiv.org/abs/2407.07737 (user-level sampling, ULS).
    McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private
    Recurrent Language Models", https://arxiv.org/abs/1710.06963.

  Examples:
    >>> import optax_dp
    >>> ids = [0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4]
    >>> sampler = optax_dp.UserPoissonSampler(ids, expected_users=2,
    ...                                       max_examples_per_user=2)
    >>> sampler.num_users, sampler.dataset_size, sampler.sampling_probability
    (5, 5, 0.4)
    >>> batch = next(sampler.batches(seed=0, steps=1))
    >>> batch.indices.shape == batch.mask.shape == (batch.indices.shape[0], 2)
    True
    >>> round(optax_dp.compute_epsilon(2.0, 1e-5, steps=10, sampler=sampler), 2)
    3.2
  """
  user_ids: Any = dataclasses.field(repr=False)
  expected_users: int
  max_examples_per_user: int
  max_users: Optional[int] = None
  padding_buckets: Optional[int] = DEFAULT_PADDING_BUCKETS
  pad_to_multiple_of: Optional[int] = None
  bands: Optional[int] = None
  # Derived in __post_init__: the user of each example, each user's examples,
  # and the Poisson (or cyclic) sampler over users that does the accounting.
  _owner: np.ndarray = dataclasses.field(init=False, repr=False)
  _examples: list = dataclasses.field(init=False, repr=False)
  _users: Any = dataclasses.field(init=False, repr=False)

  name: ClassVar[str] = "user_poisson"
  privacy_unit: ClassVar[str] = "user"
  neighboring_relation: ClassVar[str] = ADD_OR_REMOVE_ONE_USER
  accountants: ClassVar[tuple[str, ...]] = ("pld", "rdp")

  def __post_init__(self):
    owner, examples = user_examples(self.user_ids)
    object.__setattr__(self, "_owner", owner)
    object.__setattr__(self, "_examples", examples)
    object.__setattr__(self, "max_examples_per_user", _checks.check_int(
        "max_examples_per_user", self.max_examples_per_user, 1))
    # The accounting and the batch shapes over users: a PoissonSampler whose
    # "examples" are the users (it validates expected_users <= num_users).
    try:
      if self.bands is None:
        users = PoissonSampler(len(examples), self.expected_users, self.max_users,
                               pad_to_multiple_of=self.pad_to_multiple_of,
                               padding_buckets=self.padding_buckets)
      else:
        users = CyclicPoissonSampler(len(examples), self.expected_users, self.max_users,
                                     pad_to_multiple_of=self.pad_to_multiple_of,
                                     padding_buckets=self.padding_buckets, bands=self.bands)
        object.__setattr__(self, "bands", users.bands)
    except ValueError as e:
      raise ValueError(f"UserPoissonSampler: {e} (over users: dataset_size is the "
                       f"number of distinct user ids, {len(examples)}, and "
                       "expected_batch_size is expected_users).") from None
    object.__setattr__(self, "_users", users)
    object.__setattr__(self, "expected_users", users.expected_batch_size)

  @property
  def num_users(self) -> int:
    """U, the number of distinct user ids."""
    return len(self._examples)

  @property
  def num_examples(self) -> int:
    """N, the number of examples (rows of the dataset)."""
    return len(self._owner)

  @property
  def dataset_size(self) -> int:
    """The population the batches are drawn from: the users (U)."""
    return self.num_users

  @property
  def expected_batch_size(self) -> int:
    """The expected number of users per batch: `dp_aggregate`'s normaliser."""
    return self.expected_users

  @property
  def sampling_probability(self) -> float:
    return self._users.sampling_probability

  @property
  def max_batch_size(self) -> Optional[int]:
    return self.max_users

  def examples_per_user(self) -> np.ndarray:
    """`n_u`, the number of examples of each user (U,), in user order."""
    return np.array([len(e) for e in self._examples], dtype=np.int64)

  def user_of_examples(self) -> np.ndarray:
    """The user (0..U-1) of each example, (N,)."""
    return self._owner.copy()

  def unsupported_accountant_reason(self, accountant: str) -> str:
    return f"UserPoissonSampler has no accountant {accountant!r}; use 'pld' or 'rdp'."

  def logical_batch_size(self, steps: int) -> int:
    """The static number of user rows of a logical batch in a run of `steps`."""
    return self._users.logical_batch_size(steps)

  def padding_sizes(self, steps: int) -> Optional[tuple[int, ...]]:
    """The static numbers of user rows of a run's batches (None: unbucketed)."""
    return self._users.padding_sizes(steps)

  def dp_event(self, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    """`steps` compositions of the Poisson-subsampled Gaussian over users."""
    return self._users.dp_event(noise_multiplier, steps)

  def describe(self) -> str:
    """The sampler in plain words, for privacy statements."""
    cyclic = ("" if self.bands is None else
              f" (cyclic over {self.bands} groups of users: step t samples group t mod "
              f"{self.bands} only, each of its users with probability "
              f"{self.sampling_probability:.6g})")
    return (f"user-level Poisson sampling{cyclic}: at every step each of the "
            f"{self.num_users} users (holding {self.num_examples} examples) is included "
            f"{'independently ' if self.bands is None else ''}with probability {self.expected_users}/{self.num_users} = "
            f"{self.expected_users / self.num_users:.6g} (expected {self.expected_users} "
            f"users per batch), with at most {self.max_examples_per_user} of each "
            "included user's examples, chosen at random, clipped together")

  def batches(self, seed: int, *, steps: int, start_step: int = 0,
              accumulation_steps: int = 1) -> Iterator[Batch]:
    """Yields the run's batches from step `start_step` to `steps` (exclusive).

    As `PoissonSampler.batches`, over users: batch t depends only on
    `(seed, t)`; with `accumulation_steps=k`, each logical batch of users is
    yielded as k physical batches of `ceil(users / k)` user rows each.
    `indices` and `mask` have shape `(user rows, max_examples_per_user)`.

    Raises:
      ValueError: for bad arguments, when called.
      RuntimeError: (when iterated) a batch drew more than `max_users` users.
    """
    seed, run, k = _batches.check_run(seed, steps, start_step, accumulation_steps)
    users = self._users
    max_size = users.logical_batch_size(run.stop)
    buckets = users.padding_sizes(run.stop)
    return self._draws(seed, run, k, max_size, buckets)

  def _draws(self, seed, run, k, max_size, buckets):
    cap = self.max_examples_per_user
    groups = None if self.bands is None else self._users.groups(seed)
    for step in run:
      rng = _batches.step_rng(seed, step)
      chosen, physical = _batches.poisson_step(
          rng, step, k, dataset_size=self.num_users,
          sampling_probability=self.sampling_probability, max_size=max_size,
          truncate=False, pad_to_multiple_of=self.pad_to_multiple_of, buckets=buckets,
          eligible=None if groups in (None, [None]) else groups[step % len(groups)])
      chosen = np.sort(chosen)
      rows = np.full((len(chosen), cap), -1, dtype=np.int64)
      for i, u in enumerate(chosen):   # each user's examples, after the users
        own = self._examples[u]
        take = own if len(own) <= cap else np.sort(rng.choice(own, cap, replace=False))
        rows[i, :len(take)] = take
      for part in _batches.split_logical(chosen, physical, k):
        users_part = part.indices
        out = np.full((len(users_part), cap), -1, dtype=np.int64)
        real = part.mask
        # part.indices are the sorted chosen users, in order: their rows.
        start = int(np.searchsorted(chosen, users_part[real][0])) if real.any() else 0
        out[real] = rows[start:start + int(real.sum())]
        yield Batch(indices=out, mask=out >= 0)
