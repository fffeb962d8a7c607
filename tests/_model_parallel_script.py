"""Runs in a fresh process with 8 simulated CPU devices (tests/test_model_parallel.py
starts it): the language model of examples/lm_models.py trained privately under
plain `jax.jit` with its parameters sharded on 2-D meshes, against one device.

Writes OUT/results.json (argv[1]). Each section records an "error" entry if
it raised, so the tests can say which one failed.

Sections:
  train:  3 steps of the NNX (method "auto": book-keeping) and the Linen model
     ("auto" and "vmap"), on a ('data', 'fsdp') = (2, 4) mesh (every leaf split over
     'fsdp' along its largest dimension divisible by 4, the batch over both
     axes) and a ('data', 'model') = (4, 2) mesh (the last divisible dimension
     split over 'model', the batch over 'data'), with padding rows; the
     parameters after training and their shardings.
  noise:  `dp_aggregate`'s update of an all-masked batch (zero clipped sum: the
     update is the noise alone) on each mesh and on one device, bitwise.
  memory: XLA's memory analysis of the compiled private and non-private Linen
     steps on ('data', 'fsdp') meshes of 1, 2, 4 and 8 'fsdp' devices.
  planted: the clipped sum of one batch on the FSDP mesh against a float64
     reference that clips each example's gradient (plain jax.vmap(jax.grad)
     on one device), with optax_dp's per-example norms as they are and with
     a planted bug that reads each split leaf's first shard only (the norm a
     device would compute from its local shard, an under-estimate).
"""

import json
import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_dp
from optax_dp._clip import _clipping

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))
from lm_models import CharTransformer, LinenCharTransformer, LMConfig, next_char_loss  # noqa: E402

OUT = sys.argv[1]
CFG = LMConfig(vocab_size=32, length=16, features=32, heads=4, layers=2)
B, C, SIGMA, STEPS = 16, 0.05, 1.0, 3
MESHES = {"fsdp": ((2, 4), ("data", "fsdp")), "model": ((4, 2), ("data", "model"))}
_rng = np.random.default_rng(0)
WINDOWS = _rng.integers(0, CFG.vocab_size, (STEPS, B, CFG.length + 1)).astype(np.int32)
MASKS = np.ones((STEPS, B), bool)
MASKS[:, -3:] = False                                 # padding rows


def spec_for(kind, n):
  """The user's layout: FSDP splits a leaf's largest dimension divisible by
  n over 'fsdp'; tensor parallel its last divisible dimension over 'model'."""
  def spec(a):
    dims = (sorted(range(a.ndim), key=lambda i: -a.shape[i]) if kind == "fsdp"
            else range(a.ndim - 1, -1, -1))
    for i in dims:
      if a.shape[i] % n == 0:
        entries = [None] * a.ndim
        entries[i] = kind
        return P(*entries)
    return P()
  return spec


def make_mesh(shape, names):
  """A mesh of Auto axes: XLA's partitioner places what the user did not."""
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def place(mesh, kind, tree):
  if mesh is None:
    return tree
  spec = spec_for(kind, mesh.shape[kind])
  return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, spec(a))), tree)


def on_mesh(mesh, kind, x):
  if mesh is None:
    return jnp.asarray(x)
  rows = P(("data", "fsdp")) if kind == "fsdp" else P("data")
  return jax.device_put(x, NamedSharding(mesh, rows))


def make_tx():
  return optax.chain(optax_dp.dp_aggregate(C, SIGMA, key=7, expected_batch_size=B),
                     optax.sgd(1.0, momentum=0.9))


def linen_setup():
  model = LinenCharTransformer(CFG)
  params = model.init(jax.random.key(0), jnp.zeros((1, CFG.length), jnp.int32))["params"]

  def loss(p, w):
    return next_char_loss(model.apply({"params": p}, w[:, :-1]), w)
  return params, loss


def run_nnx(mesh, kind, method):
  model = CharTransformer(CFG, rngs=nnx.Rngs(0))
  nnx.update(model, place(mesh, kind, nnx.state(model)))
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
  grad_fn = optax_dp.clipped_grads(lambda m, w: next_char_loss(m(w[:, :-1]), w), C,
                                   method=method)

  @nnx.jit
  def step(model, optimizer, w, mask):
    optimizer.update(model, grad_fn(model, w, mask))

  for t in range(STEPS):
    step(model, optimizer, on_mesh(mesh, kind, WINDOWS[t]), on_mesh(mesh, kind, MASKS[t]))
  return nnx.state(model, nnx.Param)


def run_linen(mesh, kind, method):
  params, loss = linen_setup()
  params = place(mesh, kind, params)
  tx = make_tx()
  opt_state = tx.init(params)
  grad_fn = optax_dp.clipped_grads(loss, C, method=method)

  @jax.jit
  def step(params, opt_state, w, mask):
    updates, opt_state = tx.update(grad_fn(params, w, mask), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for t in range(STEPS):
    params, opt_state = step(params, opt_state, on_mesh(mesh, kind, WINDOWS[t]),
                             on_mesh(mesh, kind, MASKS[t]))
  return params


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def section(name, fn):
  try:
    RESULTS[name] = fn()
  except Exception:   # pylint: disable=broad-except
    RESULTS[name] = {"error": traceback.format_exc()[-4000:]}


def train():
  out = {}
  initial = {"nnx": leaves(nnx.state(CharTransformer(CFG, rngs=nnx.Rngs(0)), nnx.Param)),
             "linen": leaves(linen_setup()[0])}
  for family, run, methods in (("nnx", run_nnx, ("auto",)),
                               ("linen", run_linen, ("auto", "vmap"))):
    for method in methods:
      ref = leaves(run(None, None, method))
      for kind, (shape, names) in MESHES.items():
        got_tree = run(make_mesh(shape, names), kind, method)
        got = leaves(got_tree)
        out[f"{family}/{method}/{kind}"] = {
            "max_abs_diff": [float(np.max(np.abs(g - r))) for g, r in zip(got, ref)],
            "max_abs": [float(np.max(np.abs(r))) for r in ref],
            "moved": [float(np.max(np.abs(r - i))) for r, i in zip(ref, initial[family])],
            "replicated": [bool(x.sharding.is_fully_replicated)
                           for x in jax.tree.leaves(got_tree)]}
  return out


def noise():
  params, loss = linen_setup()
  agg = optax_dp.dp_aggregate(C, SIGMA, key=11, expected_batch_size=B)
  grad_fn = optax_dp.clipped_grads(loss, C)
  none = np.zeros((B,), bool)

  def update(mesh, kind):
    p = place(mesh, kind, params)

    @jax.jit
    def first_update(p, w, mask):
      updates, _ = agg.update(grad_fn(p, w, mask), agg.init(p), p)
      return updates
    return leaves(first_update(p, on_mesh(mesh, kind, WINDOWS[0]), on_mesh(mesh, kind, none)))

  ref = update(None, None)
  out = {"std": float(np.std(np.concatenate([r.ravel() for r in ref]))),
         "expected_std": SIGMA * C / B}
  for kind, (shape, names) in MESHES.items():
    got = update(make_mesh(shape, names), kind)
    out[kind] = {"bitwise_equal": all(np.array_equal(g, r) for g, r in zip(got, ref)),
                 "max_abs_diff": max(float(np.max(np.abs(g - r))) for g, r in zip(got, ref)),
                 "unequal": sum(int(np.sum(g != r)) for g, r in zip(got, ref)),
                 "nonzero": all(bool(np.any(r != 0)) for r in ref)}
  return out


def memory():
  params, loss = linen_setup()
  tx = optax.chain(optax_dp.dp_aggregate(C, SIGMA, key=7, expected_batch_size=B),
                   optax.adam(1e-3))
  plain_tx = optax.adam(1e-3)
  grad_fn = optax_dp.clipped_grads(loss, C)

  def private(params, opt_state, w, mask):
    updates, opt_state = tx.update(grad_fn(params, w, mask), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def non_private(params, opt_state, w, mask):
    grads = jax.grad(lambda p: loss(p, w))(params)
    updates, opt_state = plain_tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  out = {"param_bytes": sum(x.nbytes for x in jax.tree.leaves(params))}
  for n in (1, 2, 4, 8):
    mesh = make_mesh((8 // n, n), ("data", "fsdp"))
    p = place(mesh, "fsdp", params)
    w, m = on_mesh(mesh, "fsdp", WINDOWS[0]), on_mesh(mesh, "fsdp", MASKS[0])
    row = {}
    for name, fn, opt in (("private", private, tx), ("non_private", non_private, plain_tx)):
      state = jax.jit(opt.init)(p)
      analysis = jax.jit(fn).lower(p, state, w, m).compile().memory_analysis()
      row[name] = {"argument": analysis.argument_size_in_bytes,
                   "temp": analysis.temp_size_in_bytes,
                   "output": analysis.output_size_in_bytes}
    out[str(n)] = row
  return out


def planted():
  params, loss = linen_setup()
  w, mask = WINDOWS[0], MASKS[0]
  # The reference: every example's gradient, clipped, summed, in float64.
  grads = jax.vmap(jax.grad(lambda p, x: loss(p, x[None])), in_axes=(None, 0))(params, w)
  flat = [np.asarray(g, np.float64).reshape(B, -1) for g in jax.tree.leaves(grads)]
  norms = np.sqrt(sum(np.sum(f * f, axis=1) for f in flat))
  factors = np.minimum(1.0, C / norms) * mask
  ref = [np.tensordot(factors, f, axes=1) for f in flat]
  mesh = make_mesh(*MESHES["fsdp"])
  n = mesh.shape["fsdp"]
  spec = spec_for("fsdp", n)

  def clipped_sum():
    fn = jax.jit(optax_dp.clipped_grads(loss, C, method="vmap"))
    got = fn(place(mesh, "fsdp", params), on_mesh(mesh, "fsdp", w), on_mesh(mesh, "fsdp", mask))
    got = [np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(got.clipped_sum)]
    return max(float(np.max(np.abs(g - r))) for g, r in zip(got, ref)) / max(
        float(np.max(np.abs(r))) for r in ref)

  honest = clipped_sum()
  original = _clipping.per_leaf_sq_norms

  def local_shard_only(per_example_grads):   # the planted bug
    def first_shard(g):
      entries = tuple(spec(g[0]))
      if "fsdp" not in entries:
        return g
      axis = 1 + entries.index("fsdp")
      return jax.lax.slice_in_dim(g, 0, g.shape[axis] // n, axis=axis)
    return original(jax.tree.map(first_shard, per_example_grads))

  _clipping.per_leaf_sq_norms = local_shard_only
  try:
    bugged = clipped_sum()
  finally:
    _clipping.per_leaf_sq_norms = original
  return {"honest_rel_err": honest, "planted_rel_err": bugged,
          "clipped_fraction": float(np.mean(norms[mask] > C))}


RESULTS = {"devices": jax.device_count()}
for name in sys.argv[2].split(","):
  section(name, globals()[name])
with open(os.path.join(OUT, "results.json"), "w") as f:
  json.dump(RESULTS, f, indent=1)
