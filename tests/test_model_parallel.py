"""Parameters sharded over a model axis (FSDP, tensor parallel) under plain
`jax.jit` on 8 simulated CPU devices (`_devices.partitioner_safe`: a model
without convolutions runs with the user's shardings, nothing gathered).

Two fresh processes (`tests/_model_parallel_script.py`, started with
XLA_FLAGS=--xla_force_host_platform_device_count=8) run the sections; the
tests read their results.json. The language model is examples/lm_models.py's
(Embed, causal attention, LayerNorm, MLP), NNX and Linen, at a test size.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flax")

# Two processes of 8 devices: the noise section, compared bit for bit, with
# JAX's optimisations on (as users run it; at -O0, erf_inv computed on each
# device's shard rounds some coordinates a few ulps apart from the 1-device
# draw); every other section, compared to rtol 1e-5, with the suite's
# fast-compile settings (tests/conftest.py), which halve its compile time.
# The whole fixture takes about 6 minutes alone, twice that beside CI's
# other worker: the timeout leaves room.
_OPTIMIZED_SECTIONS = ("noise",)
pytestmark = pytest.mark.timeout(1800)

_REPO = Path(__file__).resolve().parent.parent
_SECTIONS = ("train", "noise", "memory", "variants", "flax_idiom", "lstm", "resume",
             "per_example", "conv_explicit", "example", "planted")
_TRAIN_RUNS = ("nnx/auto", "linen/auto", "linen/vmap")
# "-explicit": the same layouts on meshes of Explicit axes (jax.make_mesh's
# default): the parameters' split is in their types, and optax_dp runs the
# per-example work with those axes turned Auto (jax.sharding.auto_axes).
_MESHES = ("fsdp", "model", "fsdp-explicit", "model-explicit")
_TRAIN_CASES = [(run, mesh) for run in _TRAIN_RUNS for mesh in _MESHES
                if not (run == "linen/vmap" and mesh.endswith("-explicit"))]

# "8 devices == 1 device" in float32: the clipped sum is added in another
# order (XLA's partial sums per device, then the all-reduce), a relative
# error of order B * eps_f32 ~ 16 * 6e-8 ~ 1e-6 of the clipped sum; it reaches
# the parameters through SGD (lr 1, momentum 0.9: at most 1 + 1.9 + 2.71 times
# an update of norm <= (C + noise) over 3 steps). The noise is the same bitwise
# (the noise test). Measured: <= 1.2e-7 absolute. A mechanism error is far
# larger: one example dropped or counted twice moves the clipped sum by C =
# 0.05 in norm, the parameters by ~0.05 / sqrt(parameters per leaf) >> 1e-5.
RTOL, ATOL = 1e-5, 1e-6
C_START = 0.05   # the script's clip norm (C), where adaptive clipping starts


def _run_script(out, sections, optimized):
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=8"])
  env["JAX_PLATFORMS"] = "cpu"
  if optimized:
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(_REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  proc = subprocess.run(
      [sys.executable, str(_REPO / "tests" / "_model_parallel_script.py"), str(out),
       ",".join(sections)], capture_output=True, text=True, timeout=1500, cwd=out, env=env)
  if proc.returncode != 0 or not (out / "results.json").exists():
    pytest.fail(f"the 8-device subprocess failed (rc {proc.returncode}):\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
  data = json.loads((out / "results.json").read_text())
  assert data["devices"] == 8
  return data


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  fast = _run_script(tmp_path_factory.mktemp("model_parallel"),
                     [s for s in _SECTIONS if s not in _OPTIMIZED_SECTIONS], optimized=False)
  optimized = _run_script(tmp_path_factory.mktemp("model_parallel_optimized"),
                          _OPTIMIZED_SECTIONS, optimized=True)
  fast.update({name: optimized[name] for name in _OPTIMIZED_SECTIONS})
  return fast


def _section(results, name):
  section = results.get(name)
  if section is None:
    pytest.fail(f"the 8-device script did not run section {name!r}")
  if "error" in section:
    pytest.fail(f"section {name!r} raised in the 8-device process:\n{section['error']}")
  return section


@pytest.mark.subprocess
@pytest.mark.parametrize("run,mesh", _TRAIN_CASES)
def test_three_private_steps_with_sharded_params_equal_1_device(results, run, mesh):
  """3 steps of clipped_grads + dp_aggregate + SGD, the parameters split over
  'fsdp' (a (2, 4) mesh, batch over both axes) or 'model' (a (4, 2) mesh,
  batch over 'data'), on Auto or Explicit axes, 3 padding rows per batch,
  equal the 1-device run."""
  row = _section(results, "train")[f"{run}/{mesh}"]
  for i, (diff, scale, moved) in enumerate(zip(row["max_abs_diff"], row["max_abs"],
                                               row["moved"])):
    assert diff <= ATOL + RTOL * scale, (i, diff, scale)
    assert moved > 100 * (ATOL + RTOL * scale), (i, moved)   # training moved each leaf
  # The parameters were split over the mesh, and training kept some split:
  # nothing was gathered into one replicated copy for good.
  assert not all(row["replicated"]), row["replicated"]


@pytest.mark.subprocess
@pytest.mark.parametrize("mesh", _MESHES)
def test_noise_with_sharded_params_equals_1_device_noise_bitwise(results, mesh):
  """dp_aggregate's update of an all-masked batch is its noise alone: on each
  2-D mesh it equals the 1-device noise bit for bit (so no coordinate is
  noised twice or left out), and it is noise: its standard deviation is
  sigma * C / B within 5% (112,256 coordinates: the sample std's relative
  standard error is 1 / sqrt(2 * 112256) = 0.2%, so 5% is 25 of them)."""
  noise = _section(results, "noise")
  assert noise[mesh]["bitwise_equal"]
  assert noise[mesh]["nonzero"]
  assert abs(noise["std"] / noise["expected_std"] - 1) < 0.05, noise


@pytest.mark.subprocess
def test_per_device_state_bytes_fall_as_one_over_fsdp_devices(results):
  """XLA's memory analysis of the compiled private step on ('data', 'fsdp')
  meshes of n = 1, 2, 4, 8 'fsdp' devices: its arguments (parameters, Adam's
  two moments, the step's batch) and its outputs (the new parameters and
  moments) per device fall as 1/n (within 2%: the batch of 16 x 17 int32 is
  split over all 8 devices at every n), as the non-private step's do."""
  memory = _section(results, "memory")
  for step in ("private", "non_private"):
    one = memory["1"][step]
    for n in (2, 4, 8):
      row = memory[str(n)][step]
      for kind in ("argument", "output"):
        assert row[kind] <= 1.02 * one[kind] / n, (step, n, kind, row[kind], one[kind])
  for n in ("1", "2", "4", "8"):   # the private step holds the same state
    assert memory[n]["private"]["argument"] - memory[n]["non_private"]["argument"] < 100


@pytest.mark.subprocess
@pytest.mark.parametrize("variant", ["groups", "adaptive", "accumulate", "bandmf",
                                     "adaptive/fsdp-explicit"])
def test_group_wise_adaptive_and_accumulated_steps_with_sharded_params_equal_1_device(
    results, variant):
  """On the FSDP mesh: one clip group per layer, adaptive clipping (the clip
  norm read from the optimizer state each step; on Auto and on Explicit
  axes), dp_accumulate over 2 physical batches and DP-BandMF's correlated
  noise (its state split like the parameters), 3 logical steps each, equal
  1 device (the same tolerance as above; the adaptive clip norm to rel
  1e-6), and the parameters stay split."""
  row = _section(results, "variants")[variant]
  for i, (diff, scale, moved) in enumerate(zip(row["max_abs_diff"], row["max_abs"],
                                               row["moved"])):
    assert diff <= ATOL + RTOL * scale, (i, diff, scale)
    assert moved > 100 * (ATOL + RTOL * scale), (i, moved)
  want, got = row["clip"]
  if variant.startswith("adaptive"):
    assert want != C_START and abs(got - want) <= 1e-6 * want, row["clip"]


@pytest.mark.subprocess
@pytest.mark.parametrize("run", ["nnx/data=2,fsdp=4", "nnx/data=4,model=2",
                                 "linen/data=2,fsdp=4", "lora/data=2,fsdp=4"])
def test_the_lm_example_on_a_mesh_equals_1_device(results, run):
  """`examples/train.py --recipe shakespeare-eps8 | shakespeare-lora-eps1
  --mesh ...` (3 steps, a small model; NNX, Linen, LoRA) reports the
  1-device run's held-out loss (rel 1e-5: float32 summation order, as above)
  and exactly its epsilon (the same sampler, steps and noise)."""
  example = _section(results, "example")
  name = run.split("/")[0]
  got, want = example[run], example[f"{name}/1"]
  assert got["epsilon"] == want["epsilon"]
  layout = run.split("/")[1]   # the record says where it ran
  assert got["mesh"] == {a: int(n) for a, n in (p.split("=") for p in layout.split(","))}
  assert want["mesh"] is None
  assert abs(got["test_loss"] - want["test_loss"]) <= RTOL * want["test_loss"], (got, want)


@pytest.mark.subprocess
def test_planted_local_shard_norm_fails_the_reference(results):
  """On the FSDP mesh, the clipped sum equals a float64 reference that clips
  each example's own gradient (rel 1e-5 of its largest entry); a planted
  per-example norm that reads only each split leaf's first shard (a device's
  local view, missing the reduction over 'fsdp': an under-estimate, so the
  clip no longer bounds an example) is far from it. Every example of the
  batch is clipped (the bug cannot hide behind unclipped examples)."""
  planted = _section(results, "planted")
  assert planted["clipped_fraction"] == 1.0
  assert planted["honest_rel_err"] < 1e-5, planted
  assert planted["planted_rel_err"] > 0.1, planted


def _assert_trained_alike(row):
  for i, (diff, scale, moved) in enumerate(zip(row["max_abs_diff"], row["max_abs"],
                                               row["moved"])):
    assert diff <= ATOL + RTOL * scale, (i, diff, scale)
    assert moved > 100 * (ATOL + RTOL * scale), (i, moved)


@pytest.mark.subprocess
@pytest.mark.parametrize("case", ["auto/auto", "auto/vmap", "explicit/auto", "explicit/vmap"])
def test_flax_nnx_sharding_annotations_train_privately_as_on_1_device(results, case):
  """Flax NNX's own way to shard a model (its guide to multiple devices):
  `nnx.with_partitioning` on a kernel initializer, a Param's `sharding`
  annotation, eager sharding inside `jax.set_mesh`, a sharding constraint on
  an activation inside the model, layers stacked by `nnx.vmap` and applied by
  `jax.lax.scan`. 3 private steps through `nnx.Optimizer` on a (2, 4) mesh
  of Auto axes and of Explicit ones (`jax.make_mesh`'s default), book-keeping
  and vmap, equal the same model on one device, and every Param keeps the
  'model' split its annotation gave it."""
  row = _section(results, "flax_idiom")[case]
  _assert_trained_alike(row)
  assert row["specs"] and all("'model'" in spec for spec in row["specs"]), row["specs"]


@pytest.mark.subprocess
def test_lstm_with_sharded_params_equals_1_device(results):
  """The NNX character LSTM (nnx.RNN over an LSTMCell: a scan under the
  partitioner) with its parameters split over 'fsdp': 3 private steps equal
  1 device, and the parameters stay split."""
  row = _section(results, "lstm")
  _assert_trained_alike(row)
  assert not all(row["replicated"]), row["replicated"]


@pytest.mark.subprocess
def test_a_sharded_run_resumes_from_orbax_with_its_shardings_bitwise(results):
  """Saved with orbax after 2 private steps on the FSDP mesh and restored
  into a target of the live state's shapes and shardings: every leaf
  (parameters, momentum, dp_aggregate's key and step) comes back with its
  saved sharding, most of them split, and step 3 from the restored state
  equals step 3 of the uninterrupted run bit for bit (the same noise: the
  key and step counter were restored)."""
  row = _section(results, "resume")
  assert all(row["same_sharding"]) and len(row["same_sharding"]) == row["leaves"]
  assert row["split"] > row["leaves"] // 2, row
  assert row["bitwise_equal"], row


@pytest.mark.subprocess
def test_per_example_grads_with_params_split_over_an_explicit_axis_stay_split(results):
  """`per_example_grads` with the Linen LM's parameters split over the
  explicit 'fsdp' axis: every example's gradient equals the 1-device one
  (rel 1e-5) and is split where its parameter is."""
  row = _section(results, "per_example")
  for i, (diff, scale) in enumerate(zip(row["max_abs_diff"], row["max_abs"])):
    assert diff <= ATOL + RTOL * scale, (i, diff, scale)
  assert row["split"] == row["params_split"] and any(row["split"]), row


@pytest.mark.subprocess
def test_a_convolution_with_its_kernel_split_over_an_explicit_axis_equals_1_device(results):
  """A convolutional loss with its kernel split over an explicit axis is not
  handed to XLA's partitioner (trap 1): it keeps the per-device route, and
  its clipped sum equals 1 device (rel 1e-5)."""
  row = _section(results, "conv_explicit")
  for i, (diff, scale) in enumerate(zip(row["max_abs_diff"], row["max_abs"])):
    assert diff <= ATOL + RTOL * scale, (i, diff, scale)
