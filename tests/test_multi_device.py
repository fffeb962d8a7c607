"""Data-parallel DP-SGD on 8 (simulated CPU) devices equals the 1-device run.

The pytest process has one CPU device, and the device count of a process is
fixed when jax initialises its backend, so every multi-device check runs in a
fresh subprocess started with XLA_FLAGS=--xla_force_host_platform_device_count=8
(and JAX_PLATFORMS=cpu, so a GPU host still gets its 8 CPU devices). One
script (`_SCRIPT`, below) runs all the multi-device sections in one process
(each process pays the jax import and its compilations, ~45 s here) and writes
raw results (a JSON of scalars/strings, an .npz of arrays); the tests below
only compare numbers, so each check fails on its own. A section
that raises records its traceback and fails only the tests reading it.

The sections of the script (`_SECTIONS`), and the tests that read them (each
test is named after its section: test_<section>_...):
  train: 8-device TrainState steps == 1-device ones (vmap path, fast path,
     padding, accumulation with dp_accumulate), also on the jit-sharded path
     (the one-device builders, clipped_grads and per_example_grads, in a plain
     jax.jit step, fed a batch on NamedSharding(mesh, P("data")) or on an
     explicit-sharding mesh, route themselves to the per-device path); the
     compiled step has exactly one all-reduce, carrying every parameter.
  per_example: sharded per-example gradients == a single-example loop, also
     jit-sharded; trap 1 (XLA's partitioner) and trap 2 (vmap(grad) inside
     shard_map without pcast) are real in this jax; the guard refuses a
     partitioned batch it cannot route.
  nnx: the jit-sharded NNX clipped gradients equal 1 device.
  clip_norms: group-wise and adaptive clipping on 8 devices equal 1 device.
  noise: the noise of the 8-device update has variance (sigma*C/E)^2 (added
     once) and equals the 1-device noise bitwise (i.i.d., BandMF, and the
     per-device sums of dp_accumulate: once per logical batch).
  sampler: pad_batch_for_devices / gather_sharded_batch, and Poisson batches
     padded for 8 devices train exactly like the unpadded 1-device run.
  divisible: a batch not divisible by the device count is refused.
  normaliser, normaliser_jit: the sharded ClippedGrads reports the GLOBAL
     batch size, so dp_aggregate without expected_batch_size (which falls
     back on it) normalises as on one device.
  accumulate: gradient accumulation with per-device sums
     (sharded_clipped_grads(..., reduce=False) + dp_accumulate(..., mesh=mesh))
     equals the default path and 1 device, and its compiled step all-reduces
     once per logical batch (the default: once per physical batch); its noise
     is added once per logical batch (the noise section).
"""

import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import optax_dp

pytest.importorskip("flax")   # the model under test is a flax.linen CNN

_REPO = Path(__file__).resolve().parent.parent
_SECTIONS = ("train", "per_example", "noise", "sampler", "divisible", "normaliser",
             "normaliser_jit", "accumulate", "nnx", "clip_norms")


# The 8-device script (written to a temp dir and run by the `results` fixture).
_SCRIPT = r'''# Runs in a fresh process with 8 simulated CPU devices; writes results.json
# (scalars, strings, tracebacks) and arrays.npz, one section at a time, so that
# one failing section fails only the tests that read it.
import json, os, sys, time, traceback, warnings
assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
import numpy as np
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import optax_dp
import models   # tests/models.py (tests/ is on PYTHONPATH)

# Both sides of each comparison build dp_aggregate from the same key on
# purpose (the same noise), which NoiseKeyReuseWarning would flag.
warnings.filterwarnings("ignore", category=optax_dp.NoiseKeyReuseWarning)
OUT = sys.argv[1]
SECTIONS = sys.argv[2].split(",")
R, A = {}, {}
assert jax.device_count() == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("data",))
SHARD = NamedSharding(mesh, P("data"))
# JAX's explicit-sharding mode: the batch's type says it is split on "data".
SHARD_EXPLICIT = NamedSharding(
    jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,)), P("data"))


model = models.SmallCNN(4, 3)
params0 = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))["params"]


def loss_fn(params, batch):
  x, y = batch
  logits = model.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def single_loss(params, example):
  return loss_fn(params, jax.tree.map(lambda a: a[None], example))


rng = np.random.default_rng(1234)
N = 64
DATA = (rng.normal(size=(N, 6, 6, 1)).astype(np.float32),
        rng.integers(0, 3, N).astype(np.int32))
# C sits inside the per-example norms of this model and data (about 3 to 11
# at the initial params): some examples are clipped, some are not.
C, SIGMA, LR = 6.0, 1.0, 0.1


def save(name, tree):
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    A[name + jax.tree_util.keystr(path)] = np.asarray(leaf)


def leaf_names(tree):
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def make_step(grad_fn):
  @jax.jit
  def step(state, batch, mask):
    return state.apply_gradients(grads=grad_fn(state.params, batch, mask))
  return step


def all_reduce_lines(hlo):
  return [line.strip() for line in hlo.splitlines()
          if " all-reduce(" in line or "all-reduce-start(" in line]


def new_state(tx):
  return train_state.TrainState.create(apply_fn=model.apply, params=params0, tx=tx)


def physical_batches(count, size=16, pad=3, seed=5):
  """Batches of `size` rows of DATA with `pad` padding rows (mask False) at
  random positions; padding rows hold real, unrelated data, so only the mask
  keeps them out."""
  r = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    idx = r.choice(N, size, replace=False)
    mask = np.ones(size, bool)
    mask[r.choice(size, pad, replace=False)] = False
    out.append(((DATA[0][idx], DATA[1][idx]), mask))
  return out


def section_train():
  """8-device TrainState runs equal 1-device runs."""
  E = 13
  res = {}
  batches = physical_batches(6)
  # How many real examples of the first batch the clip actually bounds (the
  # test wants both clipped and unclipped ones).
  g = jax.jit(optax_dp.per_example_grads(loss_fn))(params0, batches[0][0])
  norms = np.sqrt(sum(np.sum(np.asarray(l).reshape(16, -1) ** 2, 1) for l in jax.tree.leaves(g)))
  norms = norms[batches[0][1]]
  res["clipped_count"] = int(np.sum(norms > C))
  res["unclipped_count"] = int(np.sum(norms < C))
  runs = [("vmap", 1), ("auto", 1), ("auto", 2)]
  for method, k in runs:
    name = f"{method}_k{k}"
    def tx():
      t = optax.chain(optax_dp.dp_aggregate(C, SIGMA, 7, expected_batch_size=E * k),
                      optax.sgd(LR, momentum=0.9))
      return optax_dp.dp_accumulate(t, k) if k > 1 else t
    step8 = make_step(optax_dp.sharded_clipped_grads(loss_fn, C, mesh=mesh, method=method))
    step1 = make_step(optax_dp.clipped_grads(loss_fn, C, method=method))
    # The jit-sharded path: the one-device builder, under jax.jit, fed the
    # batch on NamedSharding(mesh, P("data")) (Auto axes) and on a mesh in
    # explicit-sharding mode; it routes itself to the per-device path.
    s8, s1, sj, sx = (new_state(tx()) for _ in range(4))
    for batch, mask in batches[:3 * k]:
      b8 = jax.device_put(batch, SHARD)
      m8 = jax.device_put(mask, SHARD)
      s8 = step8(s8, b8, m8)
      s1 = step1(s1, batch, mask)
      sj = step1(sj, b8, m8)
      sx = step1(sx, *jax.device_put((batch, mask), SHARD_EXPLICIT))
    save(f"train/{name}/8", s8.params)
    save(f"train/{name}/1", s1.params)
    save(f"train/{name}/jit8", sj.params)
    save(f"train/{name}/explicit8", sx.params)
    res[name] = {
        "steps": [int(s8.step), int(s1.step), int(sj.step), int(sx.step)],
        "param_devices": len(jax.tree.leaves(s8.params)[0].sharding.device_set),
        "jit_param_devices": len(jax.tree.leaves(sj.params)[0].sharding.device_set),
        "moved": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(params0))),
    }
    if k == 1:
      # The compiled step of this run, as text (its all-reduces).
      batch, mask = batches[0]
      hlo = step8.lower(s8, jax.device_put(batch, SHARD), jax.device_put(mask, SHARD)
                        ).compile().as_text()
      res[name]["all_reduce_lines"] = all_reduce_lines(hlo)
      res[name]["jit_all_reduce_lines"] = all_reduce_lines(step1.lower(
          sj, jax.device_put(batch, SHARD), jax.device_put(mask, SHARD)).compile().as_text())
  # Per-example gradients, jit-sharded, into dp_aggregate (which clips them).
  def pe_step(state, batch, mask):
    return state.apply_gradients(grads=optax_dp.per_example_grads(loss_fn)(
        state.params, batch, mask))
  pe_step = jax.jit(pe_step)
  pe_tx = lambda: optax.chain(optax_dp.dp_aggregate(C, SIGMA, 7, expected_batch_size=E),
                              optax.sgd(LR, momentum=0.9))
  sj, s1 = new_state(pe_tx()), new_state(pe_tx())
  for batch, mask in batches[:3]:
    sj = pe_step(sj, *jax.device_put((batch, mask), SHARD))
    s1 = pe_step(s1, batch, mask)
  save("train/per_example_k1/jit8", sj.params)
  save("train/per_example_k1/1", s1.params)
  res["per_example_k1"] = {"steps": [int(sj.step), int(s1.step)],
                           "jit_param_devices": len(
                               jax.tree.leaves(sj.params)[0].sharding.device_set)}
  res["leaf_names"] = leaf_names(params0)
  res["param_shapes"] = [list(np.shape(l)) for l in jax.tree.leaves(params0)]
  return res


def section_per_example():
  """Sharded per-example grads equal a loop; the traps; the guard."""
  res = {"leaf_names": leaf_names(params0)}
  x, y = DATA[0][:16], DATA[1][:16]
  grad1 = jax.jit(jax.grad(single_loss))
  ref = [grad1(params0, (x[i], y[i])) for i in range(16)]
  save("pe/ref", jax.tree.map(lambda *a: np.stack(a), *ref))
  b8 = jax.device_put((x, y), SHARD)
  pe8 = jax.jit(optax_dp.sharded_per_example_grads(loss_fn, mesh=mesh))
  _, g8 = pe8(params0, b8)
  save("pe/sharded", g8)
  res["sharded_devices"] = len(jax.tree.leaves(g8)[0].sharding.device_set)
  # With padding rows (mask False) on two devices: those rows come back zero.
  mask = np.ones(16, bool)
  mask[[3, 12]] = False
  A["pe/mask"] = mask
  _, g8m = pe8(params0, b8, jax.device_put(mask, SHARD))
  save("pe/sharded_masked", g8m)
  # Trap 1: XLA's partitioner, plain vmap(grad) on a sharded batch.
  naive = jax.jit(jax.vmap(jax.grad(single_loss), in_axes=(None, 0)))
  save("pe/trap1", naive(params0, b8))
  save("pe/trap1_unsharded", naive(params0, (x, y)))
  # Trap 2: inside shard_map, vmap(grad) w.r.t. replicated params (no pcast)
  # versus optax_dp.per_example_grads in the same shard_map.
  def sm(f):
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P("data")),
                                 out_specs=P("data")))
  save("pe/trap2_naive", sm(lambda p, b: jax.vmap(jax.grad(single_loss), in_axes=(None, 0))(p, b))(params0, b8))
  save("pe/trap2_optax_dp", sm(lambda p, b: optax_dp.per_example_grads(loss_fn)(p, b))(params0, b8))
  # The one-device builders on the sharded batch route themselves to the
  # per-device path: under jit (Auto axes, and explicit sharding) and eagerly.
  pe = optax_dp.per_example_grads(loss_fn)
  save("pe/jit8", jax.jit(pe)(params0, b8))
  save("pe/eager8", pe(params0, b8))
  save("pe/explicit8", jax.jit(pe)(params0, jax.device_put((x, y), SHARD_EXPLICIT)))
  save("pe/jit8_masked", jax.jit(pe)(params0, b8, jax.device_put(mask, SHARD)))
  res["jit8_devices"] = len(jax.tree.leaves(jax.jit(pe)(params0, b8))[0].sharding.device_set)
  # The guard, where routing is impossible: under jit, a 4 x 2 mesh of two
  # Auto axes (the batch's type does not say which splits it; refused at
  # compile time from a callback, so the error arrives wrapped in a
  # JaxRuntimeError), and eagerly, inputs split along different axes.
  mesh42 = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  b42 = jax.device_put((x, y), NamedSharding(mesh42, P("data")))
  mixed = (jax.device_put(x, NamedSharding(mesh42, P("data"))),
           jax.device_put(y, NamedSharding(mesh42, P("model"))))
  res["guard"] = {}
  for name, fn in [("per_example_grads", optax_dp.per_example_grads(loss_fn)),
                   ("clipped_grads", optax_dp.clipped_grads(loss_fn, C))]:
    for mode, f, batch in [("jit", jax.jit(fn), b42), ("eager", fn, mixed)]:
      try:
        jax.block_until_ready(f(params0, batch))
        res["guard"][f"{name}/{mode}"] = {"raised": False}
      except Exception as e:
        res["guard"][f"{name}/{mode}"] = {
            "raised": True, "type": type(e).__name__, "message": str(e)}
  return res


def section_noise():
  """Zero-gradient examples, noise only: variance and 1-vs-8 equality."""
  E, sigma, steps = 12, 1.3, 8
  params = {"a": jnp.zeros((64, 64)), "b": jnp.zeros((1024,))}
  def const_loss(p, batch):  # constant in p: every per-example gradient is 0
    x, _ = batch
    return jnp.mean(x ** 2) + 0.0 * (jnp.sum(p["a"]) + jnp.sum(p["b"]))
  def run(grad_fn, shard, noise_strategy=None):
    tx = optax_dp.dp_aggregate(C, sigma, 11, expected_batch_size=E,
                               noise_strategy=noise_strategy)
    @jax.jit
    def step(state, batch, mask):
      return tx.update(grad_fn(params, batch, mask), state, params)
    state, outs = tx.init(params), []
    for batch, mask in physical_batches(steps, seed=9):
      if shard:
        batch, mask = jax.device_put((batch, mask), SHARD)
      out, state = step(state, batch, mask)
      outs.append(np.concatenate([np.ravel(np.asarray(l)) for l in jax.tree.leaves(out)]))
    return np.stack(outs), int(state.step)
  out8, n8 = run(optax_dp.sharded_clipped_grads(const_loss, C, mesh=mesh, method="vmap"), True)
  out1, n1 = run(jax.jit(optax_dp.clipped_grads(const_loss, C, method="vmap")), False)
  outj, nj = run(optax_dp.clipped_grads(const_loss, C, method="vmap"), True)  # jit-sharded
  A["noise/8"], A["noise/1"], A["noise/jit8"] = out8, out1, outj
  # DP-BandMF (3 bands): the correlated noise, too, is drawn once for the
  # global sum: the 8-device stream is the 1-device stream, bit for bit.
  strategy = optax_dp.bandmf_strategy(steps, 3)
  A["noise/bandmf8"], _ = run(optax_dp.clipped_grads(const_loss, C, method="vmap"), True,
                              strategy)
  A["noise/bandmf1"], _ = run(jax.jit(optax_dp.clipped_grads(const_loss, C, method="vmap")),
                              False, strategy)
  # Accumulation, k = 4: the per-device sums of reduce=False accumulated by
  # dp_accumulate(mesh=) on 8 devices, and clipped_grads + dp_accumulate on 1.
  k, logical = 4, 4
  def run_acc(grad_fn, shard, acc_mesh):
    tx = optax_dp.dp_accumulate(
        optax_dp.dp_aggregate(C, sigma, 11, expected_batch_size=E * k), k, mesh=acc_mesh)
    @jax.jit
    def step(state, batch, mask):
      return tx.update(grad_fn(params, batch, mask), state, params)
    state, outs = tx.init(params), []
    for batch, mask in physical_batches(k * logical, seed=19):
      if shard:
        batch, mask = jax.device_put((batch, mask), SHARD)
      out, state = step(state, batch, mask)
      outs.append(np.concatenate([np.ravel(np.asarray(l)) for l in jax.tree.leaves(out)]))
    return np.stack(outs), int(state.inner_state.step)
  acc8, m8 = run_acc(optax_dp.sharded_clipped_grads(const_loss, C, mesh=mesh, method="vmap",
                                                    reduce=False), True, mesh)
  acc1, m1 = run_acc(jax.jit(optax_dp.clipped_grads(const_loss, C, method="vmap")), False, None)
  accj, mj = run_acc(optax_dp.clipped_grads(const_loss, C, method="vmap"), True, None)
  A["noise/acc8"], A["noise/acc1"], A["noise/acc_jit8"] = acc8, acc1, accj
  return {"E": E, "sigma": sigma, "C": C, "steps": [n8, n1, nj], "acc_k": k,
          "acc_steps": [m8, m1, mj]}


def section_sampler():
  """gather_sharded_batch; Poisson batches padded for 8 devices."""
  E, steps = 12, 3
  sampler = optax_dp.PoissonSampler(dataset_size=N, expected_batch_size=E)
  tx = lambda: optax.chain(optax_dp.dp_aggregate(C, SIGMA, 3, expected_batch_size=E),
                           optax.sgd(LR, momentum=0.9))
  step8 = make_step(optax_dp.sharded_clipped_grads(loss_fn, C, mesh=mesh))
  step1 = make_step(optax_dp.clipped_grads(loss_fn, C))
  s8, s1 = new_state(tx()), new_state(tx())
  res = {"gather": []}
  for t, batch in enumerate(sampler.batches(21, steps=steps)):
    padded = optax_dp.pad_batch_for_devices(batch, 8)
    (xs, ys), mask = optax_dp.gather_sharded_batch(DATA, padded, SHARD)
    want_x, want_y = optax_dp.gather_batch(DATA, padded).data
    res["gather"].append({
        "x_equal": bool(np.array_equal(np.asarray(xs), want_x)),
        "y_equal": bool(np.array_equal(np.asarray(ys), want_y)),
        "mask_equal": bool(np.array_equal(np.asarray(mask), padded.mask)),
        "sharding_ok": all(a.sharding == SHARD for a in (xs, ys, mask)),
        "sharding": str(xs.sharding),
        "sizes": [len(batch.indices), len(padded.indices), int(batch.mask.sum())],
    })
    s8 = step8(s8, (xs, ys), mask)
    s1 = step1(s1, optax_dp.gather_batch(DATA, batch), batch.mask)
  save("sampler/8", s8.params)
  save("sampler/1", s1.params)
  res["steps"] = [int(s8.step), int(s1.step)]
  res["moved"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(params0)))
  res["leaf_names"] = leaf_names(params0)
  return res


def section_divisible():
  """A batch of 12 rows on 8 devices is refused."""
  res = {}
  batch = (DATA[0][:12], DATA[1][:12])
  fns = {"sharded_clipped_grads": optax_dp.sharded_clipped_grads(loss_fn, C, mesh=mesh),
         "sharded_per_example_grads": optax_dp.sharded_per_example_grads(loss_fn, mesh=mesh)}
  for name, fn in fns.items():
    for jit in (False, True):
      try:
        (jax.jit(fn) if jit else fn)(params0, batch)
        res[f"{name}/jit={jit}"] = {"raised": False}
      except Exception as e:
        res[f"{name}/jit={jit}"] = {"raised": True, "type": type(e).__name__, "message": str(e)}
  return res


def section_normaliser():
  """The static batch size of the sharded ClippedGrads, and the
  update of a dp_aggregate that falls back on it (no expected_batch_size)."""
  (batch, mask), = physical_batches(1, seed=13)
  c8 = jax.jit(optax_dp.sharded_clipped_grads(loss_fn, C, mesh=mesh))(
      params0, jax.device_put(batch, SHARD), jax.device_put(mask, SHARD))
  c1 = jax.jit(optax_dp.clipped_grads(loss_fn, C))(params0, batch, mask)
  tx = optax_dp.dp_aggregate(C, SIGMA, 17)   # normaliser: the static batch size
  update = jax.jit(tx.update)
  save("normaliser/sum8", c8.clipped_sum)
  save("normaliser/sum1", c1.clipped_sum)
  u8 = update(c8, tx.init(params0), params0)[0]
  u1 = update(c1, tx.init(params0), params0)[0]
  save("normaliser/8", u8)
  save("normaliser/1", u1)
  norm = lambda t: float(np.sqrt(sum(np.sum(np.asarray(l, np.float64) ** 2)
                                     for l in jax.tree.leaves(t))))
  return {"batch_size": [c8.batch_size, c1.batch_size], "rows": len(mask),
          "update_norm_ratio": norm(u8) / norm(u1), "leaf_names": leaf_names(params0)}


def section_normaliser_jit():
  """section_normaliser on the jit-sharded path: the one-device clipped_grads under
  jax.jit, fed the batch on NamedSharding(mesh, P("data")) (Auto axes) and on
  an explicit-sharding mesh (routed to the per-device path), reports the
  global batch size; a dp_aggregate without expected_batch_size (which falls
  back on it) then gives the 1-device update."""
  (batch, mask), = physical_batches(1, seed=13)
  grad_fn = jax.jit(optax_dp.clipped_grads(loss_fn, C))
  tx = optax_dp.dp_aggregate(C, SIGMA, 17)   # normaliser: the static batch size
  update = jax.jit(tx.update)
  res = {"rows": len(mask), "leaf_names": leaf_names(params0), "batch_size": {}}
  for path, sharding in (("1", None), ("jit8", SHARD), ("explicit8", SHARD_EXPLICIT)):
    args = (batch, mask) if sharding is None else jax.device_put((batch, mask), sharding)
    clipped = grad_fn(params0, *args)
    res["batch_size"][path] = clipped.batch_size
    save(f"normaliser_jit/{path}", update(clipped, tx.init(params0), params0)[0])
  return res


def section_accumulate():
  """Gradient accumulation (k = 4) on 8 devices: the per-device sums of
  sharded_clipped_grads(reduce=False) accumulated by dp_accumulate(mesh=)
  == the default (an all-reduce every physical batch) == 1 device; the
  compiled train steps (this CNN and the tutorial CNN) as HLO text."""
  K, E = 4, 13 * 4
  batches = physical_batches(2 * K, seed=21)
  # A real example with a NaN input in physical batch 1: its gradient is
  # dropped and counted (nonfinite_examples), on every path.
  (x, y), mask = batches[1]
  x = x.copy()
  x[np.flatnonzero(mask)[0]] = np.nan
  batches[1] = ((x, y), mask)
  def tx(acc_mesh):
    inner = optax.chain(optax_dp.dp_aggregate(C, SIGMA, 7, expected_batch_size=E),
                        optax.sgd(LR, momentum=0.9))
    return optax_dp.dp_accumulate(inner, K, mesh=acc_mesh)
  runs = {
      "per_device": (optax_dp.sharded_clipped_grads(loss_fn, C, mesh=mesh, reduce=False),
                     mesh, True),
      "per_batch": (optax_dp.sharded_clipped_grads(loss_fn, C, mesh=mesh), None, True),
      "one_device": (optax_dp.clipped_grads(loss_fn, C), None, False),
      # jit-sharded: the one-device builder fed the sharded batch (routed).
      "jit_sharded": (optax_dp.clipped_grads(loss_fn, C), None, True),
  }
  res, steps = {"leaf_names": leaf_names(params0), "k": K}, {}
  for name, (grad_fn, acc_mesh, shard) in runs.items():
    step, state = make_step(grad_fn), new_state(tx(acc_mesh))
    for batch, m in batches:
      if shard:
        batch, m = jax.device_put((batch, m), SHARD)
      state = step(state, batch, m)
    save(f"acc/{name}", state.params)
    acc = jax.tree.leaves(state.opt_state.clipped_sum)
    res[name] = {
        "dp_steps": int(state.opt_state.inner_state[0].step),
        "nonfinite": int(state.opt_state.inner_state[0].nonfinite_examples),
        "micro_step": int(state.opt_state.micro_step),
        "acc_shapes": [list(a.shape) for a in acc],
        "acc_shard_shapes": [sorted({tuple(s.data.shape) for s in a.addressable_shards})
                             for a in acc],
        "moved": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params0))),
    }
    steps[name] = (step, state)
  b8, m8 = jax.device_put(batches[0], SHARD)
  res["hlo"] = {name: steps[name][0].lower(steps[name][1], b8, m8).compile().as_text()
                for name in ("per_device", "per_batch")}
  res["num_params"] = sum(int(np.size(l)) for l in jax.tree.leaves(params0))
  # The tutorial CNN (824,458 parameters): compiled only, for the numbers in
  # docs/multi_device.md.
  cnn = models.TutorialCNN()
  cnn_params = jax.tree.map(   # zeros: only the shapes matter (no init to compile)
      lambda s: jnp.zeros(s.shape, s.dtype),
      jax.eval_shape(cnn.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"])
  def cnn_loss(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(
        cnn.apply({"params": params}, x), y).mean()
  cnn_batch = jax.device_put((jnp.zeros((16, 28, 28, 1)), jnp.zeros((16,), jnp.int32)), SHARD)
  cnn_mask = jax.device_put(jnp.ones((16,), bool), SHARD)
  res["tutorial_num_params"] = sum(int(np.size(l)) for l in jax.tree.leaves(cnn_params))
  for name, reduce in (("per_device", False), ("per_batch", True)):
    grad_fn = optax_dp.sharded_clipped_grads(cnn_loss, C, mesh=mesh, reduce=reduce)
    state = train_state.TrainState.create(
        apply_fn=cnn.apply, params=cnn_params, tx=tx(None if reduce else mesh))
    res["hlo"]["tutorial_" + name] = make_step(grad_fn).lower(
        state, cnn_batch, cnn_mask).compile().as_text()
  return res


def section_nnx():
  """A Flax NNX model with dropout, clipped_grads under nnx.jit, the batch on
  NamedSharding(mesh, P("data")) (Auto) and on an explicit-sharding mesh,
  vmap and fast paths: the grads (an nnx.State) of the 1-device call."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)
      self.lin = nnx.Linear(144, 3, rngs=rngs)

    def __call__(self, x):
      x = self.drop(jax.nn.relu(self.conv(x)))
      return self.lin(x.reshape(x.shape[0], -1))

  def nnx_loss(model, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  def grads(batch, mask, method):
    model = Net(nnx.Rngs(0))   # the same weights and dropout streams each call
    step = nnx.jit(lambda m, b, k: optax_dp.clipped_grads(nnx_loss, 1.0, method=method)(m, b, k))
    return step(model, batch, mask)

  (x, y), mask = physical_batches(1, seed=31)[0]
  names = None
  for method in ("vmap", "auto"):
    save(f"nnx/{method}/1", grads((x, y), mask, method))
    for path, sharding in (("jit8", SHARD), ("explicit8", SHARD_EXPLICIT)):
      got = grads(*jax.device_put(((x, y), mask), sharding), method)
      save(f"nnx/{method}/{path}", got)
      names = leaf_names(got)
  return {"leaf_names": names}


def section_clip_norms():
  """Group-wise and adaptive clipping on 8 devices: 3 TrainState steps with
  sharded_clipped_grads and with the jit-sharded one-device builder equal
  the 1-device steps (params, and the adaptive clip norm of the state)."""
  groups = {"Conv_0": 2.0, "Dense_0": {"kernel": 3.0, "bias": 0.5}}
  adaptive = optax_dp.AdaptiveClip(4.0, target_quantile=0.5, learning_rate=0.5)
  batches = physical_batches(3, seed=41)
  for name, clip in (("groups", groups), ("adaptive", adaptive)):
    builders = {"1": optax_dp.clipped_grads(loss_fn, clip),
                "sharded8": optax_dp.sharded_clipped_grads(loss_fn, clip, mesh=mesh),
                "jit8": optax_dp.clipped_grads(loss_fn, clip)}
    for path, grad_fn in builders.items():
      tx = optax.chain(optax_dp.dp_aggregate(clip, SIGMA, 17, expected_batch_size=16),
                       optax.sgd(LR))
      state = new_state(tx)

      @jax.jit
      def step(state, batch, mask, grad_fn=grad_fn):
        current = ({"l2_norm_clip": optax_dp.l2_norm_clip_of(state.opt_state)}
                   if name == "adaptive" else {})
        return state.apply_gradients(grads=grad_fn(state.params, batch, mask, **current))

      for batch, mask in batches:
        if path == "jit8":
          batch, mask = jax.device_put((batch, mask), SHARD)
        state = step(state, batch, mask)
      save(f"clip_norms/{name}/{path}", state.params)
      if name == "adaptive":
        A[f"clip_norms/{name}/{path}/clip"] = np.asarray(
            optax_dp.l2_norm_clip_of(state.opt_state))
  return {"leaf_names": leaf_names(params0)}


for name in SECTIONS:
  t0 = time.time()
  try:
    R[name] = globals()["section_" + name]()
  except Exception:
    R[name] = {"error": traceback.format_exc()}
  R[name]["seconds"] = time.time() - t0
  with open(os.path.join(OUT, "results.json"), "w") as f:
    json.dump(R, f)
  np.savez(os.path.join(OUT, "arrays.npz"), **A)
'''


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """Runs `_SCRIPT` once with 8 CPU devices; returns (json results, arrays)."""
  out = tmp_path_factory.mktemp("multi_device")
  script = out / "multi_device_script.py"
  script.write_text(_SCRIPT)
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=8"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(   # tests/ for the script's `import models`
      [str(_REPO), str(_REPO / "tests")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  proc = subprocess.run([sys.executable, str(script), str(out), ",".join(_SECTIONS)],
                        capture_output=True, text=True, timeout=900, cwd=out, env=env)
  if proc.returncode != 0 or not (out / "results.json").exists():
    pytest.fail(f"the 8-device subprocess failed (rc {proc.returncode}):\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
  data = json.loads((out / "results.json").read_text())
  with np.load(out / "arrays.npz") as npz:
    arrays = dict(npz)
  return data, arrays


def _section(results, name):
  data, arrays = results
  section = data.get(name)
  if section is None:
    pytest.fail(f"the 8-device script did not run section {name!r}")
  if "error" in section:
    pytest.fail(f"section {name!r} raised in the 8-device process:\n{section['error']}")
  return section, arrays


def _leaves(arrays, prefix, names):
  return [arrays[prefix + n] for n in names]


# Float tolerance of "8 devices == 1 device" (train, sampler). The two runs add
# bitwise the same noise (same key, same step; checked by the noise tests), so they
# differ only in float32 rounding: the clipped sum is added up in another
# order (8 local sums of 2 rows, then the psum, against one sum of 16 rows),
# and XLA vectorises the per-example conv/dense over 2 rows instead of 16.
# Both are relative errors of order B * eps_f32 ~ 16 * 6e-8 ~ 1e-6 of the
# clipped sum, which reach the parameters scaled by lr / E = 0.1 / 13 (times
# at most 1 + 0.9 + 0.81 for momentum over 3 steps): ~1e-8 absolute on
# parameters of size ~0.01 to 0.7 (measured: <= 3e-8). rtol 1e-5 / atol 1e-6
# leaves a margin of >= 30x, yet any mechanism error is far above it: one
# example dropped, duplicated, or a padding row let in moves the clipped sum
# by a whole per-example gradient (norm >= 2.9 here, so some coordinate
# >= 2.9 / sqrt(475 parameters) ~ 0.13), the parameters by >= 1e-3.
RTOL, ATOL = 1e-5, 1e-6


def _assert_same_params(got, want, names):
  for name, g, w in zip(names, got, want):
    np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=name)


# ---------------------------------------------------------------- train


@pytest.mark.subprocess
@pytest.mark.parametrize("run", ["vmap_k1", "auto_k1", "auto_k2"])
def test_train_8_device_trainstate_steps_equal_1_device(results, run):
  """3 (logical) TrainState steps of chain(dp_aggregate(sigma=1), sgd(momentum
  0.9)) on 16-row batches with 3 padding rows each: sharded_clipped_grads on 8
  devices == clipped_grads on 1 device. `auto_k2`: dp_accumulate with k=2,
  fed the 8-device clipped sums of 6 physical batches."""
  train, arrays = _section(results, "train")
  names = train["leaf_names"]
  # The clip is active and not everywhere: both kinds of example are present.
  assert train["clipped_count"] >= 1 and train["unclipped_count"] >= 1, train
  info = train[run]
  steps = 6 if run.endswith("k2") else 3
  assert info["steps"] == [steps] * 4
  assert info["param_devices"] == 8          # the 8-device run ran on 8 devices
  assert info["moved"] > 1e-2                # training moved the parameters
  _assert_same_params(_leaves(arrays, f"train/{run}/8", names),
                      _leaves(arrays, f"train/{run}/1", names), names)


@pytest.mark.subprocess
@pytest.mark.parametrize("run", ["vmap_k1", "auto_k1", "auto_k2"])
def test_train_jit_sharded_trainstate_steps_equal_1_device(results, run):
  """The same runs with the ONE-device builder, `clipped_grads(loss_fn, C,
  method=...)` in a plain jax.jit step, fed the batch and mask placed on
  NamedSharding(mesh, P("data")) (Auto axes: XLA's partitioner would split
  it) and on a mesh in JAX's explicit-sharding mode: both route themselves to
  the per-device path and equal the 1-device run (and its noise: same key).
  The routed step runs on all 8 devices."""
  train, arrays = _section(results, "train")
  names = train["leaf_names"]
  info = train[run]
  assert info["jit_param_devices"] == 8
  want = _leaves(arrays, f"train/{run}/1", names)
  for path in ("jit8", "explicit8"):
    _assert_same_params(_leaves(arrays, f"train/{run}/{path}", names), want, names)


@pytest.mark.subprocess
def test_train_jit_sharded_per_example_grads_into_dp_aggregate_equal_1_device(results):
  """per_example_grads (vmap, materialised) in a plain jax.jit step on the
  sharded batch and mask, clipped and noised by dp_aggregate: 3 steps equal
  the 1-device run."""
  train, arrays = _section(results, "train")
  names = train["leaf_names"]
  info = train["per_example_k1"]
  assert info["steps"] == [3, 3] and info["jit_param_devices"] == 8
  _assert_same_params(_leaves(arrays, "train/per_example_k1/jit8", names),
                      _leaves(arrays, "train/per_example_k1/1", names), names)


# ---------------------------------------------------------- per_example, nnx

# Per-example gradients: the sharded ones and the loop's differ by float32
# rounding of the same conv/dense arithmetic batched differently (measured
# ~2e-7 of the leaf's largest entry); 1e-5 of each leaf's largest entry is a
# 50x margin. The traps are wrong by O(1) of that scale (measured 0.76 and
# 1.5 to 3.4): "large" below means > 0.1.
PE_RTOL = 1e-5
LARGE = 0.1


def _rel_err(got, ref):
  return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


@pytest.mark.subprocess
def test_per_example_sharded_grads_equal_single_example_loop(results):
  pe, arrays = _section(results, "per_example")
  names = pe["leaf_names"]
  assert pe["sharded_devices"] == 8
  mask = arrays["pe/mask"]
  assert not mask.all()
  for name, got, masked, ref in zip(names, _leaves(arrays, "pe/sharded", names),
                                    _leaves(arrays, "pe/sharded_masked", names),
                                    _leaves(arrays, "pe/ref", names)):
    assert got.shape == ref.shape and ref.shape[0] == 16
    scale = np.max(np.abs(ref))
    np.testing.assert_allclose(got, ref, rtol=PE_RTOL, atol=PE_RTOL * scale, err_msg=name)
    np.testing.assert_array_equal(masked[~mask], 0.0, err_msg=name)
    np.testing.assert_allclose(masked[mask], ref[mask], rtol=PE_RTOL,
                               atol=PE_RTOL * scale, err_msg=name)


@pytest.mark.subprocess
def test_per_example_jit_sharded_grads_equal_single_example_loop(results):
  """per_example_grads(loss_fn), the one-device builder, on the batch placed
  with NamedSharding(mesh, P("data")): under jax.jit, eagerly, and on a mesh in
  explicit-sharding mode, it routes itself to the per-device path and equals
  the single-example loop (trap 1 would make the conv kernel's rows wrong by
  O(1)); with a mask, padding rows are zero. The result stays split on 8
  devices."""
  pe, arrays = _section(results, "per_example")
  names = pe["leaf_names"]
  assert pe["jit8_devices"] == 8
  mask = arrays["pe/mask"]
  for path in ("jit8", "eager8", "explicit8"):
    for name, got, ref in zip(names, _leaves(arrays, f"pe/{path}", names),
                              _leaves(arrays, "pe/ref", names)):
      np.testing.assert_allclose(got, ref, rtol=PE_RTOL, atol=PE_RTOL * np.max(np.abs(ref)),
                                 err_msg=f"{path} {name}")
  for name, got, ref in zip(names, _leaves(arrays, "pe/jit8_masked", names),
                            _leaves(arrays, "pe/ref", names)):
    np.testing.assert_array_equal(got[~mask], 0.0, err_msg=name)
    np.testing.assert_allclose(got[mask], ref[mask], rtol=PE_RTOL,
                               atol=PE_RTOL * np.max(np.abs(ref)), err_msg=name)


@pytest.mark.subprocess
def test_per_example_trap1_partitioned_vmap_grad_is_wrong_for_conv_kernels(results):
  """jit(vmap(grad(loss))) on a batch placed with NamedSharding(mesh, P("data"))
  gets the conv kernel's per-example gradients wrong; the same function on an
  unsharded batch, and every other leaf, are right. This is why optax_dp does
  per-example work inside shard_map and refuses partitioned batches."""
  pe, arrays = _section(results, "per_example")
  names = pe["leaf_names"]
  kernel = "['Conv_0']['kernel']"
  assert kernel in names
  ref = {n: arrays["pe/ref" + n] for n in names}
  for n in names:   # unsharded: the naive function itself is right
    np.testing.assert_allclose(arrays["pe/trap1_unsharded" + n], ref[n], rtol=PE_RTOL,
                               atol=PE_RTOL * np.max(np.abs(ref[n])), err_msg=n)
  err = _rel_err(arrays["pe/trap1" + kernel], ref[kernel])
  if err <= 1e-3:
    pytest.skip(
        f"trap 1 no longer reproduces in this jax (conv kernel per-example "
        f"gradient error {err:.2g} of its scale under XLA's partitioner, was "
        "0.76 in jax 0.10.2): XLA may have fixed it. The guard in "
        "optax_dp/_devices.py and docs/multi_device.md may then be relaxed.")
  assert err > LARGE, err


@pytest.mark.subprocess
def test_per_example_trap2_vmap_grad_in_shard_map_needs_pcast(results):
  """Inside shard_map, vmap(grad) w.r.t. replicated params (no pcast) sums the
  cotangents across devices: wrong per-example gradients. per_example_grads
  in the same shard_map casts the params to varying and is right."""
  pe, arrays = _section(results, "per_example")
  names = pe["leaf_names"]
  naive = [_rel_err(arrays["pe/trap2_naive" + n], arrays["pe/ref" + n]) for n in names]
  assert min(naive) > LARGE, dict(zip(names, naive))
  for n in names:
    ref = arrays["pe/ref" + n]
    np.testing.assert_allclose(arrays["pe/trap2_optax_dp" + n], ref, rtol=PE_RTOL,
                               atol=PE_RTOL * np.max(np.abs(ref)), err_msg=n)


@pytest.mark.subprocess
@pytest.mark.parametrize("mode", ["jit", "eager"])
@pytest.mark.parametrize("fn", ["per_example_grads", "clipped_grads"])
def test_per_example_guard_refuses_a_partitioned_batch_it_cannot_route(results, fn, mode):
  """optax_dp.<fn>(loss_fn) on a batch it cannot route raises: under jax.jit,
  a batch on a 4 x 2 mesh of two Auto axes, which the partitioner splits
  (refused at compile time from the inspect_array_sharding callback; JAX
  wraps it in a JaxRuntimeError, so only the text is matched); eagerly,
  inputs split along different mesh axes (a ValueError)."""
  pe, _ = _section(results, "per_example")
  guard = pe["guard"][f"{fn}/{mode}"]
  assert guard["raised"], f"{fn} ({mode}) ran on a batch partitioned by XLA"
  if mode == "eager":
    assert guard["type"] == "ValueError", guard["type"]
  assert "partitioner" in guard["message"], guard["message"][:2000]
  assert "sharded_clipped_grads" in guard["message"]       # it says what to use


@pytest.mark.subprocess
@pytest.mark.parametrize("method", ["vmap", "auto"])
def test_nnx_jit_sharded_clipped_grads_equal_1_device(results, method):
  """Flax NNX (a conv, dropout, a dense layer): clipped_grads under nnx.jit on
  the sharded batch and mask (Auto axes, and explicit sharding) equals the
  1-device call, dropout masks included: each example's random stream is
  numbered on the global batch, before the per-device split."""
  nnx_res, arrays = _section(results, "nnx")
  names = nnx_res["leaf_names"]
  want = _leaves(arrays, f"nnx/{method}/1", names)
  assert any(np.max(np.abs(w)) > 1e-3 for w in want)
  for path in ("jit8", "explicit8"):
    _assert_same_params(_leaves(arrays, f"nnx/{method}/{path}", names), want, names)


# ---------------------------------------------------------- clip_norms, noise


@pytest.mark.subprocess
@pytest.mark.parametrize("clip", ["groups", "adaptive"])
@pytest.mark.parametrize("path", ["sharded8", "jit8"])
def test_clip_norms_group_wise_and_adaptive_on_8_devices_equal_1_device(results, clip, path):
  """Issue 18: group-wise clipping (a Dense layer's kernel and bias in
  different groups) and adaptive clipping (the clip norm read from the state
  each step) through sharded_clipped_grads and the jit-sharded one-device
  builder: 3 steps give the 1-device parameters and clip norm."""
  section, arrays = _section(results, "clip_norms")
  names = section["leaf_names"]
  got = _leaves(arrays, f"clip_norms/{clip}/{path}", names)
  want = _leaves(arrays, f"clip_norms/{clip}/1", names)
  _assert_same_params(got, want, names)
  if clip == "adaptive":
    one = float(arrays[f"clip_norms/{clip}/1/clip"])
    assert one != 4.0   # it moved
    assert float(arrays[f"clip_norms/{clip}/{path}/clip"]) == pytest.approx(one, rel=1e-6)


@pytest.mark.subprocess
def test_noise_is_added_once_and_equals_1_device_noise(results):
  """Zero-gradient examples (a loss constant in the params), so the update of
  dp_aggregate is pure noise / E. With noise std sigma*C on the sum,
  z = update * E / (sigma * C) should be i.i.d. N(0, 1) over the n = 5120
  coordinates x 8 steps = 40960 values, so S = sum z^2 ~ chi2(n) (the exact
  distribution, not a normal approximation). Accept iff S lies between the
  5e-7 and 1 - 5e-7 quantiles: false alarm 1e-6 in total. Noise added on
  each of the 8 devices and summed would make S ~ 8 n (and the same noise
  summed 8 times 64 n), no noise S = 0: both far outside the band (its half
  width is ~5 sqrt(2 n) ~ 1.4e3, i.e. 3.5% of n)."""
  noise, arrays = _section(results, "noise")
  out1 = arrays["noise/1"]
  assert noise["steps"] == [8, 8, 8]
  # sharded_clipped_grads, and clipped_grads fed the sharded batch under jit.
  for out8 in (arrays["noise/8"], arrays["noise/jit8"]):
    assert out8.shape == (8, 5120)
    z = out8.astype(np.float64) * noise["E"] / (noise["sigma"] * noise["C"])
    n = z.size
    s = float(np.sum(z * z))
    lo, hi = stats.chi2.ppf(5e-7, n), stats.chi2.isf(5e-7, n)
    assert lo < s < hi, (s / n, lo / n, hi / n)
    assert lo > 0.5 * n and hi < 2 * n       # the band rejects 8x (and 0)
    # Steps draw fresh noise (not the same vector every step).
    assert not np.array_equal(out8[0], out8[1])
    # Same key, same step: the 8-device noise is the 1-device noise.
    _assert_same_noise(out8, out1)


@pytest.mark.subprocess
def test_noise_of_bandmf_is_drawn_once_and_equals_1_device(results):
  """DP-BandMF noise (3 bands) on the jit-sharded path: the 8-device updates
  equal the 1-device ones bit for bit (noise correlated once, on the global
  sum, from the same key), and differ from DP-SGD's i.i.d. noise of the same
  key from the second step on (the first row of the strategy is its first
  column's scale, so step 1 is DP-SGD's draw rescaled)."""
  _, arrays = _section(results, "noise")
  bandmf8, bandmf1 = arrays["noise/bandmf8"], arrays["noise/bandmf1"]
  assert bandmf8.shape == (8, 5120)
  np.testing.assert_array_equal(bandmf8, bandmf1)
  assert not np.allclose(bandmf8[1:], arrays["noise/1"][1:], atol=1e-3)


@pytest.mark.subprocess
def test_noise_of_accumulated_per_device_sums_is_added_once_per_logical_batch(results):
  """As above, with gradient accumulation: 16 physical batches of zero
  gradients, k = 4, the per-device sums (reduce=False) accumulated by
  dp_accumulate(mesh=) on 8 devices. The k - 1 held updates of each logical
  batch are exactly zero, and the 4 released ones are the noise of one
  dp_aggregate step each: z = update * kE / (sigma C) ~ N(0, 1), over
  4 x 5120 = 20480 values, S = sum z^2 ~ chi2(n), band 5e-7 / 1 - 5e-7 (half
  width ~5 sqrt(2 n) ~ 1e3, 5% of n): noise per physical batch summed (4 n),
  per device (8 n) or both (32 n) is far outside. Bitwise the 1-device
  dp_accumulate run's noise (same key, same logical step). The same for
  clipped_grads fed the sharded batch under jit (routed; summed across
  devices every physical batch) into dp_accumulate."""
  noise, arrays = _section(results, "noise")
  acc1 = arrays["noise/acc1"]
  k = noise["acc_k"]
  assert noise["acc_steps"] == [4, 4, 4]
  for acc8 in (arrays["noise/acc8"], arrays["noise/acc_jit8"]):
    _check_accumulated_noise(acc8, acc1, k, noise)


def _check_accumulated_noise(acc8, acc1, k, noise):
  assert acc8.shape == (4 * k, 5120)
  held = np.array([(i + 1) % k != 0 for i in range(len(acc8))])
  np.testing.assert_array_equal(acc8[held], 0.0)
  z = acc8[~held].astype(np.float64) * k * noise["E"] / (noise["sigma"] * noise["C"])
  n = z.size
  assert n == 4 * 5120
  s = float(np.sum(z * z))
  lo, hi = stats.chi2.ppf(5e-7, n), stats.chi2.isf(5e-7, n)
  assert lo < s < hi, (s / n, lo / n, hi / n)
  assert lo > 0.5 * n and hi < 2 * n
  assert not np.array_equal(acc8[k - 1], acc8[2 * k - 1])   # fresh noise per logical step
  _assert_same_noise(acc8, acc1)


# The suite's fast-compile settings (tests/conftest.py: JAX at -O0, XLA:CPU's
# classic emitters), which the 8-device process inherits.
_FAST_COMPILE = (os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS") == "1"
                 or "--xla_cpu_use_fusion_emitters=false" in os.environ.get("XLA_FLAGS", ""))


def _assert_same_noise(got, want):
  """The 8-device noise is the 1-device noise: bit for bit under XLA's
  default settings (`JAX_DISABLE_MOST_OPTIMIZATIONS=0
  XLA_FLAGS=--xla_cpu_use_fusion_emitters=true pytest -k noise` passes so;
  tests/test_model_parallel.py checks it optimised on every run). Under the
  suite's fast-compile settings, erf_inv computed on each device's leaves
  (`_noise._stream_normal`) rather than on one flat vector rounds some
  coordinates (measured: 3.6%) a few ulps apart, so there every coordinate
  must be within 4 ulps: noise reused, dropped or added twice is off by
  O(1), millions of ulps."""
  if _FAST_COMPILE:
    np.testing.assert_array_max_ulp(got, want, maxulp=4)
  else:
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- train: all-reduces

_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def _all_reduce_shapes(line):
  """The shapes an all-reduce carries: the result type, i.e. the text between
  '= ' and the op name ('(f32[4]{0}, f32[3,3,1,4]{3,2,1,0}, f32[])')."""
  result_type = re.split(r" all-reduce(?:-start)?\(", line.split(" = ", 1)[1])[0]
  return [(dtype, tuple(int(d) for d in dims.split(",") if d))
          for dtype, dims in _SHAPE.findall(result_type)]


def test_all_reduce_shape_parser():
  line = ("%all-reduce.1 = (f32[4]{0}, f32[3,3,1,4]{3,2,1,0}, f32[]) "
          "all-reduce(%a, %b, %c), channel_id=1, replica_groups={{0,1}}")
  assert _all_reduce_shapes(line) == [("f32", (4,)), ("f32", (3, 3, 1, 4)), ("f32", ())]


@pytest.mark.subprocess
@pytest.mark.parametrize("run", ["vmap_k1", "auto_k1"])
def test_train_compiled_step_has_one_all_reduce_of_all_parameters(results, run):
  """The compiled 8-device train step (sharded_clipped_grads + dp_aggregate +
  sgd with momentum, in TrainState.apply_gradients; and the same step with
  the one-device clipped_grads fed the sharded batch, routed) communicates
  once: one
  all-reduce, whose operands are every parameter leaf's clipped sum (plus
  the scalar count of non-finite examples), and nothing else."""
  train, _ = _section(results, "train")
  for lines in (train[run]["all_reduce_lines"], train[run]["jit_all_reduce_lines"]):
    _check_one_all_reduce_of_all_parameters(lines, train)


def _check_one_all_reduce_of_all_parameters(lines, train):
  assert len(lines) == 1, lines
  shapes = _all_reduce_shapes(lines[0])
  params = Counter(("f32", tuple(s)) for s in train["param_shapes"])
  carried = Counter(shapes)
  assert not params - carried, (lines[0], train["param_shapes"])   # all leaves
  assert all(dims == () for _, dims in (carried - params).elements()), lines[0]


# ---------------------------------------------------------------- sampler


def _padded_batches():
  """Sampled batches of several shapes, including accumulation chunks (whose
  later chunks may be all padding) and a batch needing no padding."""
  samplers = [
      (optax_dp.PoissonSampler(dataset_size=200, expected_batch_size=30), 1),
      (optax_dp.PoissonSampler(dataset_size=200, expected_batch_size=30,
                               pad_to_multiple_of=5), 1),
      (optax_dp.PoissonSampler(dataset_size=64, expected_batch_size=12), 3),
      (optax_dp.FixedBatchSampler(dataset_size=100, batch_size=24), 1),
  ]
  for sampler, k in samplers:
    yield from sampler.batches(4, steps=5, accumulation_steps=k)


@pytest.mark.parametrize("devices", [8, 3, 1])
def test_sampler_pad_batch_for_devices_keeps_examples_and_spreads_them(devices):
  """Same real indices (as a multiset), length the next multiple of the
  device count, padding rows are (-1, False), and each device's contiguous
  slice (what PartitionSpec("data") gives it) has the same number of real
  examples up to 1. numpy only: runs in the pytest process."""
  checked = 0
  for batch in _padded_batches():
    padded = optax_dp.pad_batch_for_devices(batch, devices)
    size = len(batch.indices)
    assert len(padded.indices) == len(padded.mask) == math.ceil(size / devices) * devices
    assert len(padded.indices) % devices == 0
    assert Counter(padded.indices[padded.mask].tolist()) == Counter(
        batch.indices[batch.mask].tolist())
    assert padded.mask.sum() == batch.mask.sum()
    assert np.all(padded.indices[~padded.mask] == -1)
    per_device = padded.mask.reshape(devices, -1).sum(axis=1)
    assert per_device.max() - per_device.min() <= 1, per_device
    checked += 1
  assert checked == 5 + 5 + 15 + 5


@pytest.mark.subprocess
def test_sampler_gather_sharded_batch_equals_gather_batch(results):
  """On 8 devices, for 3 Poisson batches padded with pad_batch_for_devices:
  gather_sharded_batch returns gather_batch's rows and the batch's mask,
  placed with the requested NamedSharding(mesh, P("data"))."""
  sampler, _ = _section(results, "sampler")
  assert len(sampler["gather"]) == 3
  for g in sampler["gather"]:
    assert g["x_equal"] and g["y_equal"] and g["mask_equal"], g
    assert g["sharding_ok"], g["sharding"]
    raw, padded, real = g["sizes"]
    assert padded % 8 == 0 and padded >= raw > real   # padding really happened


@pytest.mark.subprocess
def test_sampler_poisson_batches_padded_for_8_devices_train_like_1_device(results):
  """3 steps on 8 devices (Poisson batches padded to 40 rows, interleaved,
  loaded with gather_sharded_batch) == 3 steps on 1 device with the
  sampler's unpadded 38-row batches (same key): padding and row order do not
  change the mechanism. Tolerance: see RTOL above."""
  sampler, arrays = _section(results, "sampler")
  names = sampler["leaf_names"]
  assert sampler["steps"] == [3, 3]
  assert sampler["moved"] > 1e-2
  _assert_same_params(_leaves(arrays, "sampler/8", names),
                      _leaves(arrays, "sampler/1", names), names)


# ---------------------------------------------------------------- divisible


@pytest.mark.subprocess
@pytest.mark.parametrize("fn", ["sharded_clipped_grads", "sharded_per_example_grads"])
@pytest.mark.parametrize("jit", [False, True])
def test_divisible_batch_not_multiple_of_devices_is_refused(results, fn, jit):
  divisible, _ = _section(results, "divisible")
  outcome = divisible[f"{fn}/jit={jit}"]
  assert outcome["raised"], f"{fn} accepted a 12-row batch on 8 devices"
  assert outcome["type"] == "ValueError", outcome
  assert "pad_batch_for_devices" in outcome["message"], outcome["message"]


# ---------------------------------------------------------------- normaliser


@pytest.mark.subprocess
def test_normaliser_sharded_batch_size_is_global_and_default_matches_1_device(results):
  """sharded_clipped_grads on 8 devices reports batch_size = the global 16
  rows (padding included, like clipped_grads on one device), not the 2 rows
  of each device. dp_aggregate without expected_batch_size divides by it: the
  8-device update equals the 1-device one. Reporting the per-device size
  would make it 8x too large, which no test passing an explicit normaliser
  sees. Tolerance: the noise is bitwise the same (the noise tests); the clipped sums
  differ by float32 summation order, ~B eps_f32 ~ 1e-6 of their coordinates
  (<= 6 here), i.e. <= ~4e-7 on the update after / 16. |diff| <= 1e-6 + 1e-5
  |want| is >= 2.5x that; an 8x normaliser error moves the update by 7x its
  size (~0.4, the noise std sigma C / 16)."""
  norm, arrays = _section(results, "normaliser")
  names = norm["leaf_names"]
  assert norm["rows"] == 16
  assert norm["batch_size"] == [16, 16], (
      f"batch_size (8 devices, 1 device) = {norm['batch_size']}: the 8-device "
      f"update is {norm['update_norm_ratio']:.4g}x the 1-device one")
  _assert_same_params(_leaves(arrays, "normaliser/sum8", names),
                      _leaves(arrays, "normaliser/sum1", names), names)
  _assert_same_params(_leaves(arrays, "normaliser/8", names),
                      _leaves(arrays, "normaliser/1", names), names)


@pytest.mark.subprocess
def test_normaliser_jit_sharded_clipped_grads_batch_size_is_global(results):
  """The one-device clipped_grads under jax.jit on a batch split over the 8
  devices (Auto and explicit sharding) reports batch_size = the global 16
  rows, as on one device, and dp_aggregate without expected_batch_size then
  gives the 1-device update (tolerance as in the sharded_clipped_grads test
  above). The per-device size (2) would make the update 8x too large: the
  other jit-sharded tests pass expected_batch_size and cannot see it."""
  norm, arrays = _section(results, "normaliser_jit")
  names = norm["leaf_names"]
  assert norm["rows"] == 16
  assert norm["batch_size"] == {"1": 16, "jit8": 16, "explicit8": 16}, norm["batch_size"]
  for path in ("jit8", "explicit8"):
    _assert_same_params(_leaves(arrays, f"normaliser_jit/{path}", names),
                        _leaves(arrays, "normaliser_jit/1", names), names)


# ---------------------------------------------------------------- accumulate
# Gradient accumulation on 8 devices: per-device sums (sharded_clipped_grads
# with reduce=False) accumulated by dp_accumulate(mesh=), one all-reduce per
# logical batch.


@pytest.mark.subprocess
def test_accumulate_per_device_equals_per_batch_all_reduce_and_1_device(results):
  """2 logical steps of k = 4 physical 16-row batches (3 padding rows each,
  and a real example with a NaN input in physical batch 1) through
  TrainState + dp_accumulate(chain(dp_aggregate, sgd momentum)): the
  per-device accumulation on 8 devices == the default sharded path (psum
  every physical batch) == clipped_grads on 1 device, within RTOL/ATOL (same
  noise; float32 summation order only). The NaN example is dropped and
  counted once on every path. The accumulator stays split: each device holds
  one (1, *param.shape) slice of the (8, *param.shape) per-device sums."""
  acc, arrays = _section(results, "accumulate")
  names, k = acc["leaf_names"], acc["k"]
  for name in ("per_device", "per_batch", "one_device", "jit_sharded"):
    run = acc[name]
    assert run["dp_steps"] == 2 and run["micro_step"] == 0, (name, run)
    assert run["nonfinite"] == 1, (name, run)
    assert run["moved"] > 1e-2, (name, run)
  got = _leaves(arrays, "acc/per_device", names)
  for other in ("per_batch", "one_device", "jit_sharded"):
    _assert_same_params(got, _leaves(arrays, f"acc/{other}", names), names)
  for name in ("per_batch", "one_device", "jit_sharded"):   # the default layout: like params
    assert all(len(shape) == len(shards[0]) for shape, shards in zip(
        acc[name]["acc_shapes"], acc[name]["acc_shard_shapes"]))
  per_device = acc["per_device"]
  for shape, shards in zip(per_device["acc_shapes"], per_device["acc_shard_shapes"]):
    assert shape[0] == 8, per_device["acc_shapes"]
    assert shards == [[1] + shape[1:]], (shape, shards)
  assert k == 4


_CALLEE = re.compile(
    r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                "all-to-all")


def _computations(hlo):
  """`({computation name: [instruction lines]}, entry name)` of HLO text.

  A computation starts with an unindented line ending in '{' (`%name (params)
  -> type {`, `ENTRY %name ...`) and ends with '}'."""
  comps, entry, name = {}, None, None
  for line in hlo.splitlines():
    if line.endswith("{") and not line.startswith((" ", "HloModule")):
      head = line.split(" (", 1)[0]
      name = head.removeprefix("ENTRY ").lstrip("%")
      comps[name] = []
      if head.startswith("ENTRY "):
        entry = name
    elif line.startswith("}"):
      name = None
    elif name is not None:
      comps[name].append(line.strip())
  return comps, entry


def _is_all_reduce(line):
  return " all-reduce(" in line or " all-reduce-start(" in line


def _unconditional_all_reduces(comps, name):
  """The all-reduce lines one run of computation `name` executes whatever
  the predicates: its own and those of what it calls (fusions, reductions,
  loops), but not those inside the branches of a `conditional`. An
  all-reduce inside a loop body would run many times: refused."""
  lines = []
  for line in comps[name]:
    if _is_all_reduce(line):
      lines.append(line)
    if " conditional(" in line:
      continue
    for callee in _CALLEE.findall(line):
      inner = _unconditional_all_reduces(comps, callee)
      assert not (inner and "body=" in line), f"all-reduce in a loop: {line[:200]}"
      lines += inner
  return lines


def _all_reduces_anywhere(comps, name):
  """Every all-reduce line reachable from `name`, through any branch."""
  lines = [line for line in comps[name] if _is_all_reduce(line)]
  for line in comps[name]:
    callees = _CALLEE.findall(line)
    for group in _BRANCHES.findall(line):
      callees += [c.strip().lstrip("%") for c in group.split(",")]
    for callee in callees:
      lines += _all_reduces_anywhere(comps, callee)
  return lines


def _step_all_reduces(hlo):
  """`(every_step, branches)`: the all-reduces the compiled train step runs on
  every call, and, for each `conditional` of its entry computation whose
  branches hold any, the all-reduces of each branch (in branch order)."""
  comps, entry = _computations(hlo)
  every_step = _unconditional_all_reduces(comps, entry)
  branches = []
  for line in comps[entry]:
    if " conditional(" not in line:
      continue
    names = [c.strip().lstrip("%") for group in _BRANCHES.findall(line)
             for c in group.split(",")]
    names += re.findall(r"(?:true|false)_computation=%([\w.\-]+)", line)
    per_branch = [_all_reduces_anywhere(comps, n) for n in names]
    if any(per_branch):
      branches.append(per_branch)
  return every_step, branches


def _elements(line):
  return sum(math.prod(dims) for _, dims in _all_reduce_shapes(line))


def test_hlo_computation_parser():
  hlo = "\n".join([
      "HloModule jit_step, entry_computation_layout={(f32[])->f32[]}",
      "%add (a: f32[], b: f32[]) -> f32[] {",
      "  ROOT %s = f32[] add(%a, %b)",
      "}",
      "%release (p: f32[4]) -> f32[4] {",
      "  ROOT %all-reduce.1 = f32[4]{0} all-reduce(%p), to_apply=%add",
      "}",
      "%hold (p: f32[4]) -> f32[4] {",
      "  ROOT %p = f32[4]{0} parameter(0)",
      "}",
      "ENTRY %main (x: f32[4], i: s32[]) -> f32[4] {",
      "  %all-reduce.2 = f32[] all-reduce(%y), to_apply=%add",
      "  ROOT %c = f32[4]{0} conditional(%i, %x, %x), branch_computations={%hold, %release}",
      "}"])
  every_step, branches = _step_all_reduces(hlo)
  assert len(every_step) == 1 and _elements(every_step[0]) == 1
  assert [len(b) for b in branches[0]] == [0, 1]
  assert _elements(branches[0][1][0]) == 4


@pytest.mark.subprocess
@pytest.mark.parametrize("model", ["", "tutorial_"])
def test_accumulate_one_gradient_sized_all_reduce_per_logical_batch(results, model):
  """How the count is made: the train step (sharded_clipped_grads + TrainState
  .apply_gradients through dp_accumulate(chain(dp_aggregate, sgd)), k = 4) is
  ONE compiled function for all k physical batches; dp_accumulate's
  `lax.cond(micro_step == k - 1, release, hold)` is a `conditional` of its
  entry computation, whose branch 0 (hold) runs on k - 1 physical batches and
  branch 1 (release) on the k-th. So the all-reduces of a logical batch are
  k x (those outside any conditional) + (those of the release branch) + (k - 1)
  x (those of the hold branch); "gradient-sized" means carrying at least
  num_params elements.

  reduce=False + dp_accumulate(mesh=): none outside the conditional, none in
  hold, exactly one in release, carrying every parameter's sum (num_params
  elements, + 1 for the non-finite count): ONE per logical batch, and no
  other collective anywhere. The default path: one gradient-sized all-reduce
  outside the conditional, none in its branches: k = 4 per logical batch."""
  acc, _ = _section(results, "accumulate")
  num_params = acc[model + "num_params"]
  k = acc["k"]
  new, old = acc["hlo"][model + "per_device"], acc["hlo"][model + "per_batch"]

  every_step, branches = _step_all_reduces(new)
  assert every_step == [], every_step
  assert len(branches) == 1, branches
  hold, release = branches[0]
  assert hold == [], hold
  assert len(release) == 1, release
  assert _elements(release[0]) == num_params + 1, release[0][:300]
  for op in _COLLECTIVES[1:]:
    assert f" {op}(" not in new and f" {op}-start(" not in new, op
  per_logical_new = k * len(every_step) + len(release) + (k - 1) * len(hold)

  every_step, branches = _step_all_reduces(old)
  assert len(every_step) == 1 and _elements(every_step[0]) == num_params + 1, every_step
  assert branches == [], branches
  per_logical_old = k * len(every_step)
  assert (per_logical_new, per_logical_old) == (1, k)
  if model:
    assert num_params == 824_458   # docs/multi_device.md: 4 x 824,459 bytes per all-reduce
