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
  variants: group-wise and adaptive clipping and dp_accumulate on the FSDP
     mesh against one device.
  example: examples/train.py's LM recipes with --mesh against one device.
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

import optax_dp
from optax_dp._clip import _clipping

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))
import lm_models  # noqa: E402
from lm_models import CharTransformer, LinenCharTransformer, LMConfig, next_char_loss  # noqa: E402

CFG = LMConfig(vocab_size=32, length=16, features=32, heads=4, layers=2)
B, C, SIGMA, STEPS = 16, 0.05, 1.0, 3
MESHES = {"fsdp": ((2, 4), ("data", "fsdp")), "model": ((4, 2), ("data", "model"))}
_rng = np.random.default_rng(0)
WINDOWS = _rng.integers(0, CFG.vocab_size, (STEPS, B, CFG.length + 1)).astype(np.int32)
MASKS = np.ones((STEPS, B), bool)
MASKS[:, -3:] = False                                 # padding rows


def make_mesh(shape, names):
  """A mesh of Auto axes: XLA's partitioner places what the user did not."""
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def place(mesh, kind, tree):
  """The user's layout (examples/lm_models.py's `param_spec`): FSDP splits a
  leaf's largest divisible dimension over 'fsdp', tensor parallel its last
  divisible dimension over 'model'."""
  del kind   # the mesh's second axis
  return tree if mesh is None else lm_models.shard_params(tree, mesh)


def on_mesh(mesh, kind, x):
  del kind
  if mesh is None:
    return jnp.asarray(x)
  return jax.device_put(x, NamedSharding(mesh, lm_models.batch_spec(mesh)))


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
      entries = tuple(lm_models.param_spec(g[0], "fsdp", n))
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


def variants():
  """Group-wise clipping (one group per layer), adaptive clipping (the clip
  norm from the state) and dp_accumulate (2 physical batches per logical
  one) with the Linen LM's parameters split over 'fsdp' (the (2, 4) mesh),
  3 logical steps each, against 1 device: the parameters, and the adaptive
  clip norm."""
  params0, loss = linen_setup()
  out = {}
  for name in ("groups", "adaptive", "accumulate"):
    clip = {"groups": optax_dp.per_layer_clip_norms(params0, C),
            "adaptive": optax_dp.AdaptiveClip(C, target_quantile=0.5, learning_rate=0.5),
            "accumulate": C}[name]
    physical = 2 if name == "accumulate" else 1

    def run(mesh):
      tx = optax.chain(optax_dp.dp_aggregate(clip, SIGMA, key=5,
                                             expected_batch_size=B * physical),
                       optax.sgd(1.0, momentum=0.9))
      if physical > 1:
        tx = optax_dp.dp_accumulate(tx, physical)
      grad_fn = optax_dp.clipped_grads(loss, clip)
      params = place(mesh, "fsdp", params0)
      opt_state = tx.init(params)

      @jax.jit
      def step(params, opt_state, w, mask):
        current = ({"l2_norm_clip": optax_dp.l2_norm_clip_of(opt_state)}
                   if name == "adaptive" else {})
        updates, opt_state = tx.update(grad_fn(params, w, mask, **current), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

      for t in range(STEPS * physical):
        params, opt_state = step(params, opt_state,
                                 on_mesh(mesh, "fsdp", WINDOWS[t % STEPS][::-1] if t >= STEPS
                                         else WINDOWS[t]),
                                 on_mesh(mesh, "fsdp", MASKS[t % STEPS]))
      clip_now = (float(optax_dp.l2_norm_clip_of(opt_state)) if name == "adaptive" else None)
      return leaves(params), clip_now

    ref, ref_clip = run(None)
    got, got_clip = run(make_mesh(*MESHES["fsdp"]))
    out[name] = {"max_abs_diff": [float(np.max(np.abs(g - r))) for g, r in zip(got, ref)],
                 "max_abs": [float(np.max(np.abs(r))) for r in ref],
                 "moved": [float(np.max(np.abs(r - i))) for r, i in zip(ref, leaves(params0))],
                 "clip": [ref_clip, got_clip]}
  return out


def example():
  """examples/train.py's language-model recipes, 3 steps of a small model,
  on one device and with --mesh: the held-out loss and the epsilon."""
  import contextlib  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  import train  # pylint: disable=import-outside-toplevel
  quick = ["--steps", "3", "--batch-size", "32", "--eval-every", "3", "--accountant", "rdp",
           "--subset", "1024", "--eval-windows", "64", "--length", "16", "--features", "32",
           "--layers", "1", "--heads", "2", "--pretrain-steps", "2", "--pretrain-batch-size",
           "16", "--cache-dir", os.path.join(OUT, "cache"), "--quiet"]
  runs = {"nnx": (["--recipe", "shakespeare-eps8"], ("data=2,fsdp=4", "data=4,model=2")),
          "linen": (["--recipe", "shakespeare-eps8", "--model", "transformer_linen"],
                    ("data=2,fsdp=4",)),
          "lora": (["--recipe", "shakespeare-lora-eps1"], ("data=2,fsdp=4",))}
  out = {}
  for name, (recipe, meshes) in runs.items():
    for mesh in (None,) + meshes:
      path = os.path.join(OUT, f"{name}_{mesh}.json")
      with contextlib.redirect_stdout(io.StringIO()):
        train.main(recipe + quick + (["--mesh", mesh] if mesh else []) + ["--json-out", path])
      with open(path) as f:
        record = json.load(f)
      out[f"{name}/{mesh or '1'}"] = {"test_loss": record["test_loss"],
                                     "epsilon": record["epsilon"], "mesh": record["mesh"]}
  return out


if __name__ == "__main__":
  OUT = sys.argv[1]
  RESULTS = {"devices": jax.device_count()}
  for name in sys.argv[2].split(","):
    section(name, globals()[name])
  with open(os.path.join(OUT, "results.json"), "w") as f:
    json.dump(RESULTS, f, indent=1)
