"""One process of the sharded-parameter run of tests/test_multi_process.py.

Usage: python _multiprocess_lm_worker.py OUT KIND [--coordinator HOST:PORT
--num-processes N --process-id I]

3 private steps of the Linen language model of examples/lm_models.py (a test
size) with padding rows, then 3 of its NNX twin (`nnx.Optimizer`, `nnx.jit`). With several devices: a mesh of Auto axes over all of
them, ('data', KIND) = (2, 4) for KIND fsdp, (4, 2) for model; the parameters
split by `lm_models.shard_params`' rule (`param_spec`), the batch by
`batch_spec`, every global array built from the host copy each process holds
(`jax.make_array_from_callback`: a process fills only its own devices'
shards). With one device: the same steps unsharded. Process 0 writes
OUT/params.npz and OUT/nnx_params.npz (the final parameters, gathered); every
process writes OUT/result_<index>.json (its device counts).
"""

import argparse
import json
import os
import sys

import numpy as np


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("kind", choices=("fsdp", "model"))
  parser.add_argument("--coordinator")
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  args = parser.parse_args()
  import jax  # pylint: disable=import-outside-toplevel
  if args.coordinator:
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

  # jax starts after jax.distributed.initialize, in this order:
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from jax.sharding import AxisType, NamedSharding  # pylint: disable=import-outside-toplevel

  import optax_dp  # pylint: disable=import-outside-toplevel

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "examples"))
  import lm_models  # pylint: disable=import-outside-toplevel

  CFG = lm_models.LMConfig(vocab_size=32, length=16, features=32, heads=4, layers=2)
  B, C, SIGMA, STEPS = 16, 0.05, 1.0, 3
  _rng = np.random.default_rng(0)
  WINDOWS = _rng.integers(0, CFG.vocab_size, (STEPS, B, CFG.length + 1)).astype(np.int32)
  MASKS = np.ones((STEPS, B), bool)
  MASKS[:, -3:] = False

  model = lm_models.LinenCharTransformer(CFG)
  params = model.init(jax.random.key(0), jnp.zeros((1, CFG.length), jnp.int32))["params"]


  def loss(p, w):
    return lm_models.next_char_loss(model.apply({"params": p}, w[:, :-1]), w)


  tx = optax.chain(optax_dp.dp_aggregate(C, SIGMA, key=7, expected_batch_size=B),
                   optax.sgd(1.0, momentum=0.9))
  grad_fn = optax_dp.clipped_grads(loss, C)


  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


  mesh = None
  if jax.device_count() > 1:
    shape = (2, 4) if args.kind == "fsdp" else (4, 2)
    mesh = jax.make_mesh(shape, ("data", args.kind), axis_types=(AxisType.Auto,) * 2)
    params = jax.tree.map(lambda x: put(x, NamedSharding(mesh, lm_models.param_spec(
        x, args.kind, mesh.shape[args.kind]))), params)
  opt_state = tx.init(params)


  @jax.jit
  def step(params, opt_state, w, mask):
    updates, opt_state = tx.update(grad_fn(params, w, mask), opt_state, params)
    return optax.apply_updates(params, updates), opt_state


  def batch(t):
    if mesh is None:
      return WINDOWS[t], MASKS[t]
    rows = NamedSharding(mesh, lm_models.batch_spec(mesh))
    return put(WINDOWS[t], rows), put(MASKS[t], rows)

  for t in range(STEPS):
    params, opt_state = step(params, opt_state, *batch(t))

  # The NNX model: its state placed by the same rule, nnx.Optimizer, nnx.jit.
  from flax import nnx  # pylint: disable=import-outside-toplevel
  nnx_model = lm_models.CharTransformer(CFG, rngs=nnx.Rngs(0))
  if mesh is not None:
    nnx.update(nnx_model, jax.tree.map(lambda x: put(x, NamedSharding(mesh, lm_models.param_spec(
        x, args.kind, mesh.shape[args.kind]))), nnx.state(nnx_model)))
  optimizer = nnx.Optimizer(nnx_model, optax.chain(
      optax_dp.dp_aggregate(C, SIGMA, key=8, expected_batch_size=B),
      optax.sgd(1.0, momentum=0.9)), wrt=nnx.Param)
  nnx_grad_fn = optax_dp.clipped_grads(
      lambda m, w: lm_models.next_char_loss(m(w[:, :-1]), w), C)

  @nnx.jit
  def nnx_step(model, optimizer, w, mask):
    optimizer.update(model, nnx_grad_fn(model, w, mask))

  for t in range(STEPS):
    nnx_step(nnx_model, optimizer, *batch(t))
  nnx_params = nnx.state(nnx_model, nnx.Param)

  split = [not x.sharding.is_fully_replicated
           for x in jax.tree.leaves((params, nnx_params))]
  if mesh is not None:
    params, nnx_params = multihost_utils.process_allgather((params, nnx_params), tiled=True)
  index = jax.process_index()
  with open(os.path.join(args.out, f"result_{index}.json"), "w") as f:
    json.dump({"process_index": index, "devices": jax.device_count(),
               "local_devices": jax.local_device_count(), "split_leaves": sum(split)}, f)
  if index == 0:
    np.savez(os.path.join(args.out, "params.npz"), *[np.asarray(x) for x in jax.tree.leaves(params)])
    np.savez(os.path.join(args.out, "nnx_params.npz"),
             *[np.asarray(x) for x in jax.tree.leaves(nnx_params)])


if __name__ == "__main__":
  main()
