"""Checkpoint and resume: a DP-SGD run stopped, saved, restored (in a fresh
process) and continued is bitwise the uninterrupted run, with the same epsilon;
a state from another run, or spliced from two points of one, is refused."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")

import optax_dp  # pylint: disable=wrong-import-position

_TESTS = os.path.dirname(os.path.abspath(__file__))   # tests/, where models.py is

# The training run, as a script: the test imports it to run the straight and
# first-half runs, and runs it as __main__ in a fresh Python process to resume
# from the checkpoint, so both sides execute the same code.
RUN_SCRIPT = textwrap.dedent('''
    import functools
    import itertools
    import json
    import os
    import sys

    from flax.training import train_state
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import optax_dp

    import models  # tests/models.py (the fresh process gets tests/ on PYTHONPATH)

    DATASET_SIZE, BATCH, STEPS, SEED, CLIP, KEY = 64, 8, 8, 3, 0.5, 42
    SAMPLER = optax_dp.PoissonSampler(DATASET_SIZE, BATCH)
    if os.environ.get("CHECKPOINT_TEST_UNIT") == "user":
      # 16 users of 4 examples each, 4 users per batch, at most 3 examples each.
      SAMPLER = optax_dp.UserPoissonSampler(np.arange(DATASET_SIZE) // 4,
                                            expected_users=4, max_examples_per_user=3)
    BUDGET = optax_dp.privacy_budget(sampler=SAMPLER, target_delta=1e-5,
                                     noise_multiplier=1.0, steps=STEPS)


    MODEL = models.MLP((8, 3), jnp.tanh)
    _rng = np.random.default_rng(0)
    X = _rng.normal(size=(DATASET_SIZE, 4)).astype(np.float32)
    Y = ((X[:, 0] > 0).astype(np.int32) + (X[:, 1] > 0)).astype(np.int32)


    def loss_fn(params, batch):
      x, y = batch
      logits = MODEL.apply({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


    GRAD = optax_dp.clipped_grads(loss_fn, CLIP)


    @functools.lru_cache(maxsize=None)
    def make_tx(key):
      return optax.chain(optax_dp.dp_aggregate(CLIP, key=key, budget=BUDGET),
                         optax.sgd(0.1, momentum=0.9))


    def make_state(key=KEY):
      params = MODEL.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
      return train_state.TrainState.create(apply_fn=MODEL.apply, params=params,
                                           tx=make_tx(key))


    @jax.jit
    def train_step(state, batch, mask):
      return state.apply_gradients(grads=GRAD(state.params, batch, mask))


    def train(state, start, stop):
      batches = SAMPLER.batches(SEED, steps=STEPS, start_step=start)
      for b in itertools.islice(batches, stop - start):
        state = train_step(state, optax_dp.gather_batch((X, Y), b), b.mask)
      return state


    def saved(state):
      return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


    def save(state, directory):
      import orbax.checkpoint as ocp
      with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory, saved(state))


    def restore(directory, key=KEY):
      import orbax.checkpoint as ocp
      fresh = make_state(key)
      with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(directory, target=jax.eval_shape(lambda: saved(fresh)))
      return fresh.replace(**restored)


    def flat(state):
      return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
              jax.tree_util.tree_flatten_with_path(saved(state))[0]}


    if __name__ == "__main__":
      directory, out, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
      state = train(restore(directory), start, STEPS)
      np.savez(out + ".npz", **flat(state))
      with open(out + ".json", "w") as f:
        json.dump({"epsilon": BUDGET.epsilon_spent(state),
                   "dp_steps": BUDGET.steps_taken(state)}, f)
''')


@pytest.fixture(scope="module", params=["example", "user"])
def run(request, tmp_path_factory):
  """The script's module, the straight run, and a checkpoint at STEPS // 2;
  with examples or users (a UserPoissonSampler) as the privacy unit."""
  os.environ["CHECKPOINT_TEST_UNIT"] = request.param   # read by the script, also the
  root = tmp_path_factory.mktemp("dp_run")             # fresh process's
  script = root / "dp_run.py"
  script.write_text(RUN_SCRIPT)
  spec = importlib.util.spec_from_file_location("dp_run_for_checkpoint_test", script)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  half = module.STEPS // 2
  straight = module.train(module.make_state(), 0, module.STEPS)
  first_half = module.train(module.make_state(), 0, half)
  directory = root / "ckpt"
  module.save(first_half, directory)
  return module, script, straight, first_half, directory, half


def _assert_same_state(module, got_flat, straight):
  want = module.flat(straight)
  assert sorted(got_flat) == sorted(want)
  for name, leaf in want.items():
    assert got_flat[name].dtype == leaf.dtype, name
    assert np.array_equal(got_flat[name], leaf), name


@pytest.mark.subprocess
def test_orbax_resume_in_a_fresh_process_is_bitwise_the_straight_run(run, tmp_path):
  module, script, straight, first_half, directory, half = run
  # The two halves are different points of the run (the test is not vacuous).
  assert not np.array_equal(first_half.params["Dense_0"]["kernel"],
                            straight.params["Dense_0"]["kernel"])
  out = tmp_path / "resumed"
  # tests/ on the fresh process's path, for the script's `import models`.
  pythonpath = os.pathsep.join(filter(None, [_TESTS, os.environ.get("PYTHONPATH")]))
  proc = subprocess.run([sys.executable, str(script), str(directory), str(out), str(half)],
                        capture_output=True, text=True, timeout=300, cwd=tmp_path,
                        env={**os.environ, "PYTHONPATH": pythonpath})
  assert proc.returncode == 0, proc.stderr[-4000:]
  with np.load(str(out) + ".npz") as resumed:
    _assert_same_state(module, dict(resumed), straight)
  report = json.loads((tmp_path / "resumed.json").read_text())
  budget = module.BUDGET
  assert report["dp_steps"] == budget.steps_taken(straight) == module.STEPS
  assert report["epsilon"] == budget.epsilon_spent(straight) == budget.epsilon()


def test_flax_serialization_round_trip_resumes_bitwise(run):
  from flax import serialization

  module, _, straight, first_half, _, half = run
  blob = serialization.to_bytes(first_half)
  restored = serialization.from_bytes(module.make_state(), blob)
  assert int(restored.step) == half
  resumed = module.train(restored, half, module.STEPS)
  _assert_same_state(module, module.flat(resumed), straight)
  assert module.BUDGET.epsilon_spent(resumed) == module.BUDGET.epsilon_spent(straight)


def test_orbax_restore_in_process_matches_the_saved_state(run):
  module, _, _, first_half, directory, _ = run
  restored = module.restore(directory)
  _assert_same_state(module, module.flat(restored), first_half)
  assert isinstance(restored.opt_state[0], optax_dp.DPAggregateState)


def _step_raises_replay(module, state):
  b = next(module.SAMPLER.batches(module.SEED, steps=module.STEPS, start_step=int(state.step)))
  with pytest.raises(Exception) as info:
    new = module.train_step(state, optax_dp.gather_batch((module.X, module.Y), b), b.mask)
    jax.block_until_ready(new)
  assert "NoiseReplayError" in str(info.value)


def test_checkpoint_restored_under_another_key_is_refused(run):
  module, _, _, _, directory, _ = run
  _step_raises_replay(module, module.restore(directory, key=module.KEY + 1))


def test_spliced_noise_key_and_step_counter_are_refused(run):
  module, _, _, _, directory, half = run
  restored = module.restore(directory)
  later = module.train(restored, half, half + 2)          # consistent: accepted
  assert module.BUDGET.steps_taken(later) == half + 2
  # An old noise key with a newer step counter ...
  dp_later = later.opt_state[0]
  old_key = dp_later._replace(noise_key=restored.opt_state[0].noise_key)
  _step_raises_replay(module, later.replace(opt_state=(old_key,) + later.opt_state[1:]))
  # ... or a newer key with an old counter.
  new_key = restored.opt_state[0]._replace(noise_key=dp_later.noise_key)
  _step_raises_replay(module, restored.replace(opt_state=(new_key,) + restored.opt_state[1:]))
