"""Runs in a fresh process with 8 simulated CPU devices (tests/test_model_parallel.py
starts it): the language model of examples/lm_models.py trained privately under
plain `jax.jit` with its parameters sharded on 2-D meshes, against one device.

Writes OUT/results.json (argv[1]). Each section records an "error" entry if
it raised, so the tests can say which one failed.

Sections:
  train:  3 steps of the NNX (method "auto": book-keeping) and the Linen model
     ("auto" and "vmap"; "auto" alone on the meshes of Explicit axes, the
     "-explicit" kinds), on a ('data', 'fsdp') = (2, 4) mesh (every leaf split over
     'fsdp' along its largest dimension divisible by 4, the batch over both
     axes) and a ('data', 'model') = (4, 2) mesh (the last divisible dimension
     split over 'model', the batch over 'data'), with padding rows; the
     parameters after training and their shardings.
  noise:  `dp_aggregate`'s update of an all-masked batch (zero clipped sum: the
     update is the noise alone) on each mesh and on one device, bitwise.
  memory: XLA's memory analysis of the compiled private and non-private Linen
     steps on ('data', 'fsdp') meshes of 1, 2, 4 and 8 'fsdp' devices.
  variants: group-wise and adaptive clipping, dp_accumulate and DP-BandMF on
     the FSDP mesh against one device (adaptive clipping on Explicit axes too).
  flax_idiom: a model sharded the way Flax NNX's guide shards one
     (`nnx.with_partitioning`, Param `sharding` annotations, eager sharding in
     `jax.set_mesh`, `nnx.vmap`-stacked layers under `lax.scan`), trained through
     `nnx.Optimizer` on (2, 4) meshes of Auto and of Explicit axes.
  lstm: the NNX character LSTM on the FSDP mesh against one device.
  resume: an orbax checkpoint of a sharded run, restored with its shardings.
  per_example: per_example_grads with the parameters split over an explicit axis.
  conv_explicit: a convolutional loss, its kernel split over an explicit axis.
  example: examples/train.py's LM recipes with --mesh against one device.
  planted: the clipped sum of one batch on the FSDP mesh against a float64
     reference that clips each example's gradient (plain jax.vmap(jax.grad)
     on one device), with optax_dp's per-example norms as they are and with
     a planted bug that reads each split leaf's first shard only (the norm a
     device would compute from its local shard, an under-estimate).
"""

import json
import os
import shutil
import sys
import time
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
import lm_models  # noqa: E402
from lm_models import CharTransformer, LinenCharTransformer, LMConfig, next_char_loss  # noqa: E402

CFG = LMConfig(vocab_size=32, length=16, features=32, heads=4, layers=2)
B, C, SIGMA, STEPS = 16, 0.05, 1.0, 3
MESHES = {"fsdp": ((2, 4), ("data", "fsdp")), "model": ((4, 2), ("data", "model")),
          # jax.make_mesh's default axes (explicit sharding, sharding-in-types)
          "fsdp-explicit": ((2, 4), ("data", "fsdp")),
          "model-explicit": ((4, 2), ("data", "model"))}
_rng = np.random.default_rng(0)
WINDOWS = _rng.integers(0, CFG.vocab_size, (STEPS, B, CFG.length + 1)).astype(np.int32)
MASKS = np.ones((STEPS, B), bool)
MASKS[:, -3:] = False                                 # padding rows


def make_mesh(shape, names, kind=""):
  """A mesh of Auto axes (XLA's partitioner places what the user did not), or
  of Explicit axes for the "-explicit" kinds (every array's type says its
  sharding: jax.make_mesh's default)."""
  axis_type = AxisType.Explicit if kind.endswith("-explicit") else AxisType.Auto
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))


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
  start = time.perf_counter()
  try:
    RESULTS[name] = fn()
  except Exception:   # pylint: disable=broad-except
    RESULTS[name] = {"error": traceback.format_exc()[-4000:]}
  RESULTS.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)


def train():
  out = {}
  initial = {"nnx": leaves(nnx.state(CharTransformer(CFG, rngs=nnx.Rngs(0)), nnx.Param)),
             "linen": leaves(linen_setup()[0])}
  for family, run, methods in (("nnx", run_nnx, ("auto",)),
                               ("linen", run_linen, ("auto", "vmap"))):
    for method in methods:
      ref = leaves(run(None, None, method))
      for kind, (shape, names) in MESHES.items():
        if kind.endswith("-explicit") and method == "vmap":
          continue   # (the explicit meshes: the book-keeping runs)
        got_tree = run(make_mesh(shape, names, kind), kind, method)
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
    got = update(make_mesh(shape, names, kind), kind)
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
  norm from the state; on the FSDP mesh of Auto axes and of Explicit ones),
  dp_accumulate (2 physical batches per logical one) and DP-BandMF's
  correlated noise, with the Linen LM's parameters split over 'fsdp' (the
  (2, 4) mesh), 3 logical steps each, against 1 device: the parameters, and
  the adaptive clip norm."""
  params0, loss = linen_setup()
  out, refs = {}, {}
  for name, kind in (("groups", "fsdp"), ("adaptive", "fsdp"), ("accumulate", "fsdp"),
                     ("bandmf", "fsdp"), ("adaptive", "fsdp-explicit")):
    clip = {"groups": optax_dp.per_layer_clip_norms(params0, C),
            "adaptive": optax_dp.AdaptiveClip(C, target_quantile=0.5, learning_rate=0.5),
            "accumulate": C, "bandmf": C}[name]
    physical = 2 if name == "accumulate" else 1
    # DP-BandMF: noise correlated over the 3 steps (2 bands), its state split
    # like the parameters.
    strategy = optax_dp.bandmf_strategy(STEPS, 2) if name == "bandmf" else None

    def run(mesh):
      tx = optax.chain(optax_dp.dp_aggregate(clip, SIGMA, key=5,
                                             expected_batch_size=B * physical,
                                             noise_strategy=strategy),
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
      if mesh is not None:
        assert not all(x.sharding.is_fully_replicated for x in jax.tree.leaves(params)), (
            "the parameters were gathered")
      return leaves(params), clip_now

    if name not in refs:
      refs[name] = run(None)
    ref, ref_clip = refs[name]
    got, got_clip = run(make_mesh(*MESHES[kind], kind))
    out[name if kind == "fsdp" else f"{name}/{kind}"] = {"max_abs_diff": [float(np.max(np.abs(g - r))) for g, r in zip(got, ref)],
                 "max_abs": [float(np.max(np.abs(r))) for r in ref],
                 "moved": [float(np.max(np.abs(r - i))) for r, i in zip(ref, leaves(params0))],
                 "clip": [ref_clip, got_clip]}
  return out


class _SplitBlock(nnx.Module):
  """A block written as Flax's NNX guide to multiple devices shards one: a
  Linear whose kernel initializer carries its partitioning
  (`nnx.with_partitioning`), a Param created with a `sharding` annotation,
  and an activation constrained to ('data', 'model') inside the model."""

  def __init__(self, width, rngs):
    init = nnx.initializers.lecun_normal()
    self.up = nnx.Linear(width, width, use_bias=False, rngs=rngs,
                         kernel_init=nnx.with_partitioning(init, (None, "model")))
    self.down = nnx.Param(init(rngs.params(), (width, width)), sharding=("model", None))

  def __call__(self, x):
    h = jax.lax.with_sharding_constraint(jax.nn.gelu(self.up(x)), P("data", "model"))
    return x + h @ self.down[...]


class _StackedBlocks(nnx.Module):
  """Two `_SplitBlock`s made by `nnx.vmap` (a leading layer axis, replicated)
  and applied by `jax.lax.scan`, as the guide stacks its layers."""

  def __init__(self, width, layers, rngs):
    @nnx.vmap(transform_metadata={nnx.PARTITION_NAME: None})
    def make(r):
      return _SplitBlock(width, r)
    self.blocks = make(rngs.fork(split=layers))

  def __call__(self, x):
    def apply(h, block):
      return block(h), None
    return jax.lax.scan(apply, x, self.blocks)[0]


def flax_idiom():
  """The Flax NNX idiom for parameters sharded at creation: eager sharding
  (`nnx.use_eager_sharding`), the model built inside `jax.set_mesh`, its
  annotations placing each Param, batches placed with a bare PartitionSpec,
  and `nnx.Optimizer(model, tx, wrt=nnx.Param)` updated with `clipped_grads`
  (book-keeping, then vmap), 3 private steps on a (data, model) = (2, 4)
  mesh of Auto axes and of Explicit ones (jax.make_mesh's default), each
  against the same model on a 1 x 1 mesh of one device."""
  width, rows = 32, 8
  rng = np.random.default_rng(3)
  xs = rng.normal(size=(STEPS, rows, width)).astype(np.float32)
  ys = rng.normal(size=(STEPS, rows, width)).astype(np.float32)
  masks = np.ones((STEPS, rows), bool)
  masks[:, -1] = False

  def run(mesh, method):
    with nnx.use_eager_sharding(True), jax.set_mesh(mesh):
      model = _StackedBlocks(width, 2, nnx.Rngs(0))
      tx = optax.chain(optax_dp.dp_aggregate(1.0, SIGMA, key=9, expected_batch_size=rows),
                       optax.sgd(0.1, momentum=0.9))
      optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      grad_fn = optax_dp.clipped_grads(
          lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2), 1.0, method=method)

      @jax.jit
      def step(model, optimizer, batch, mask):
        optimizer.update(model, grad_fn(model, batch, mask))
        return model

      for t in range(STEPS):
        batch = (jax.device_put(xs[t], P("data")), jax.device_put(ys[t], P("data")))
        model = step(model, optimizer, batch, jax.device_put(masks[t], P("data")))
      state = nnx.state(model, nnx.Param)
      return leaves(state), [str(x.sharding.spec) for x in jax.tree.leaves(state)]

  out = {}
  with nnx.use_eager_sharding(True), jax.set_mesh(jax.make_mesh(
      (1, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:1])):
    initial = leaves(nnx.state(_StackedBlocks(width, 2, nnx.Rngs(0)), nnx.Param))
  for axis_type in ("auto", "explicit"):
    kind = AxisType.Auto if axis_type == "auto" else AxisType.Explicit
    for method in ("auto", "vmap"):
      ref, _ = run(jax.make_mesh((1, 1), ("data", "model"), axis_types=(kind, kind),
                                 devices=jax.devices()[:1]), method)
      got, specs = run(jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind)),
                       method)
      out[f"{axis_type}/{method}"] = {
          "max_abs_diff": [float(np.max(np.abs(g - r))) for g, r in zip(got, ref)],
          "max_abs": [float(np.max(np.abs(r))) for r in ref],
          "moved": [float(np.max(np.abs(r - i))) for r, i in zip(ref, initial)],
          "specs": specs}
  return out


def lstm():
  """The NNX character LSTM (`lm_models.CharLSTM`: Embed, nnx.RNN over an
  LSTMCell, Linear) with its parameters split over 'fsdp' (the (2, 4) mesh),
  3 private steps (book-keeping) against 1 device."""
  from lm_models import CharLSTM  # noqa: E402  pylint: disable=import-outside-toplevel

  def run(mesh):
    model = CharLSTM(CFG.vocab_size, features=32, rngs=nnx.Rngs(0))
    nnx.update(model, place(mesh, "fsdp", nnx.state(model)))
    optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
    grad_fn = optax_dp.clipped_grads(lambda m, w: next_char_loss(m(w[:, :-1]), w), C)

    @nnx.jit
    def step(model, optimizer, w, mask):
      optimizer.update(model, grad_fn(model, w, mask))

    for t in range(STEPS):
      step(model, optimizer, on_mesh(mesh, "fsdp", WINDOWS[t]), on_mesh(mesh, "fsdp", MASKS[t]))
    return nnx.state(model, nnx.Param)

  initial = leaves(nnx.state(CharLSTM(CFG.vocab_size, features=32, rngs=nnx.Rngs(0)),
                             nnx.Param))
  ref = leaves(run(None))
  got_tree = run(make_mesh(*MESHES["fsdp"]))
  got = leaves(got_tree)
  return {"max_abs_diff": [float(np.max(np.abs(g - r))) for g, r in zip(got, ref)],
          "max_abs": [float(np.max(np.abs(r))) for r in ref],
          "moved": [float(np.max(np.abs(r - i))) for r, i in zip(ref, initial)],
          "replicated": [bool(x.sharding.is_fully_replicated)
                         for x in jax.tree.leaves(got_tree)]}


def resume():
  """A sharded run saved with orbax after step 2 (parameters, momentum and
  dp_aggregate's state: key, step counter), restored into a target built
  from the live state's shapes and shardings, then step 3: the restored
  leaves carry the saved shardings, and the resumed run equals the
  uninterrupted one bit for bit (on the FSDP mesh)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  params0, loss = linen_setup()
  mesh = make_mesh(*MESHES["fsdp"])
  tx = make_tx()
  grad_fn = optax_dp.clipped_grads(loss, C)

  @jax.jit
  def step(state, w, mask):
    params, opt_state = state
    updates, opt_state = tx.update(grad_fn(params, w, mask), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def batch(t):
    return on_mesh(mesh, "fsdp", WINDOWS[t]), on_mesh(mesh, "fsdp", MASKS[t])

  params = place(mesh, "fsdp", params0)
  state = (params, tx.init(params))
  for t in range(2):
    state = step(state, *batch(t))
  path = os.path.join(OUT, "resume_ckpt")
  if os.path.exists(path):
    shutil.rmtree(path)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, state)
  checkpointer.wait_until_finished()
  straight = leaves(step(state, *batch(2)))

  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = checkpointer.restore(path, target)
  same_sharding = [a.sharding == b.sharding
                   for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state))]
  resumed = leaves(step(restored, *batch(2)))
  return {"same_sharding": same_sharding,
          "split": sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(restored)),
          "bitwise_equal": all(np.array_equal(a, b) for a, b in zip(resumed, straight)),
          "leaves": len(straight)}


def per_example():
  """`per_example_grads` of the Linen LM with its parameters split over the
  explicit 'fsdp' axis: each example's gradient equals the 1-device one, and
  comes back split like its parameter (nothing gathered whole)."""
  params, loss = linen_setup()
  fn = jax.jit(optax_dp.per_example_grads(loss))
  ref = leaves(fn(params, WINDOWS[0], MASKS[0]))
  mesh = make_mesh(*MESHES["fsdp-explicit"], "fsdp-explicit")
  got_tree = fn(place(mesh, "fsdp", params), on_mesh(mesh, "fsdp", WINDOWS[0]),
                on_mesh(mesh, "fsdp", MASKS[0]))
  got = leaves(got_tree)
  return {"max_abs_diff": [float(np.max(np.abs(g - r))) for g, r in zip(got, ref)],
          "max_abs": [float(np.max(np.abs(r))) for r in ref],
          "split": [not x.sharding.is_fully_replicated for x in jax.tree.leaves(got_tree)],
          "params_split": [not x.sharding.is_fully_replicated
                           for x in jax.tree.leaves(place(mesh, "fsdp", params))]}


def conv_explicit():
  """A loss with a convolution, its kernel split over an explicit axis: XLA's
  partitioner is not trusted with it (`partitioner_safe`), so optax_dp keeps
  the per-device route (the parameters gathered for it, as before): the
  clipped sum equals 1 device."""
  rng = np.random.default_rng(5)
  images = rng.normal(size=(16, 6, 6, 2)).astype(np.float32)
  params = {"k": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
            "w": rng.normal(size=(4, 8)).astype(np.float32)}

  def loss(p, x):
    y = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.mean(jnp.tanh(y) @ p["w"])

  fn = jax.jit(lambda p, x: optax_dp.clipped_grads(loss, 0.5)(p, x).clipped_sum)
  ref = leaves(fn(params, images))
  mesh = make_mesh((2, 4), ("data", "model"), "model-explicit")
  split = {"k": jax.device_put(params["k"], NamedSharding(mesh, P(None, None, None, "model"))),
           "w": jax.device_put(params["w"], NamedSharding(mesh, P("model", None)))}
  got = leaves(fn(split, jax.device_put(images, NamedSharding(mesh, P("data")))))
  return {"max_abs_diff": [float(np.max(np.abs(g - r))) for g, r in zip(got, ref)],
          "max_abs": [float(np.max(np.abs(r))) for r in ref]}


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
