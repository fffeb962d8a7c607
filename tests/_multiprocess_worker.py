"""One run of tests/test_multi_process.py: a few DP-SGD steps of the tutorial CNN.

Run as a script, in a fresh process (the device count and the distributed
runtime are fixed when jax starts):

  python tests/_multiprocess_worker.py OUT [--coordinator HOST:PORT
      --num-processes N --process-id I]

With `--coordinator`, the process joins an N-process job
(`jax.distributed.initialize`) and the mesh spans every process's devices;
without it, the mesh is this process's devices (one device: the plain
`clipped_grads` path, the reference). Every process draws the same batches
from the same sampler and seed, loads only the rows of its own devices
(`gather_sharded_batch`) and builds `dp_aggregate` from the same key, so the
noise is drawn once for the global clipped sum.

Writes, per process, OUT/params_<process index>.npz (its copy of the final
parameters, flattened with their tree paths) and OUT/result_<process
index>.json (epsilon, step count, device counts, the rows it loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

# Data, model and mechanism: small enough for seconds of training per run.
DATASET_SIZE = 512
EXPECTED_BATCH_SIZE = 64
STEPS = 3
L2_NORM_CLIP = 1.0
NOISE_MULTIPLIER = 1.0
DELTA = 1e-5
SAMPLER_SEED = 7


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("out", help="the folder to write params_*.npz and result_*.json to")
  p.add_argument("--coordinator", default=None,
                 help="HOST:PORT of process 0 (joins a multi-process job)")
  p.add_argument("--num-processes", type=int, default=1)
  p.add_argument("--process-id", type=int, default=0)
  return p.parse_args(argv)


def synthetic_mnist():
  """MNIST-shaped random data (no download): images (N, 28, 28, 1), labels."""
  rng = np.random.default_rng(0)
  images = rng.normal(size=(DATASET_SIZE, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, DATASET_SIZE).astype(np.int32)
  return images, labels


class RowLog:
  """Wraps `_batches.gather_rows`, which `gather_sharded_batch` calls once per
  addressable device and data leaf, to record the dataset rows this process
  reads."""

  def __init__(self, module):
    self.rows, self.calls = set(), 0
    self._gather = module.gather_rows
    module.gather_rows = self

  def __call__(self, data, batch):
    self.rows |= set(np.asarray(batch.indices[batch.mask]).tolist())
    self.calls += 1
    return self._gather(data, batch)

  def take(self):
    """{"rows": the sorted rows read since the last take, "calls": how many reads}."""
    out = {"rows": sorted(self.rows), "calls": self.calls}
    self.rows, self.calls = set(), 0
    return out


def own_rows(batch, sharding):
  """The real rows of `batch` (padded) that this process's devices hold under
  `sharding`: what it should load, and nothing else."""
  index_map = sharding.addressable_devices_indices_map(batch.indices.shape)
  rows = set()
  for (index,) in index_map.values():
    rows |= set(batch.indices[index][batch.mask[index]].tolist())
  return sorted(rows)


def main(argv=None):
  args = parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel  (after the argument check)

  if args.coordinator:
    # gloo (jax's default CPU collectives) carries the cross-process all-reduce.
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=60)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax.training import train_state  # pylint: disable=import-outside-toplevel

  import models  # pylint: disable=import-outside-toplevel  (tests/models.py)
  import optax_dp  # pylint: disable=import-outside-toplevel
  from optax_dp._sample import _batches  # pylint: disable=import-outside-toplevel

  t0 = time.time()
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.array(devices), ("data",)) if len(devices) > 1 else None
  model = models.TutorialCNN()
  init_key, noise_key = jax.random.split(jax.random.key(0))
  params = model.init(init_key, jnp.zeros((1, 28, 28, 1)))["params"]

  def loss_fn(params, batch):
    images, labels = batch
    logits = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  # One static batch shape (the sampler's maximum): one compilation per run.
  sampler = optax_dp.PoissonSampler(DATASET_SIZE, EXPECTED_BATCH_SIZE, padding_buckets=None)
  budget = optax_dp.privacy_budget(sampler=sampler, target_delta=DELTA, steps=STEPS,
                                   noise_multiplier=NOISE_MULTIPLIER)
  tx = optax.chain(optax_dp.dp_aggregate(L2_NORM_CLIP, key=noise_key, budget=budget),
                   optax.sgd(0.1, momentum=0.9))
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  if mesh is None:
    grad_fn = optax_dp.clipped_grads(loss_fn, L2_NORM_CLIP)
  else:
    grad_fn = optax_dp.sharded_clipped_grads(loss_fn, L2_NORM_CLIP, mesh=mesh)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  @jax.jit
  def train_step(state, batch, mask):
    return state.apply_gradients(grads=grad_fn(state.params, batch, mask))

  data = synthetic_mnist()
  log = RowLog(_batches)
  rows = []   # per step: the batch's real rows, those of this process, those it read
  for batch in sampler.batches(SAMPLER_SEED, steps=STEPS):
    if mesh is None:
      state = train_step(state, optax_dp.gather_batch(data, batch), batch.mask)
      continue
    padded = optax_dp.pad_batch_for_devices(batch, mesh.size)
    inputs, mask = optax_dp.gather_sharded_batch(data, padded, sharding)
    rows.append({"real": sorted(batch.indices[batch.mask].tolist()),
                 "own": own_rows(padded, sharding), "loaded": log.take(),
                 "padded_size": len(padded.indices)})
    state = train_step(state, inputs, mask)

  index = jax.process_index()
  flat = {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  np.savez(os.path.join(args.out, f"params_{index}.npz"), **flat)
  result = {
      "epsilon": budget.epsilon_spent(state.opt_state),
      "steps": budget.steps_taken(state.opt_state),
      "process_index": index,
      "process_count": jax.process_count(),
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "param_devices": len(jax.tree.leaves(state.params)[0].sharding.device_set),
      "moved": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params))),
      "rows": rows,
      "seconds": time.time() - t0,
  }
  with open(os.path.join(args.out, f"result_{index}.json"), "w") as f:
    json.dump(result, f)
  if args.coordinator:
    jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
