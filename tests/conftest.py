"""Shared pytest fixtures."""

import contextlib
import importlib.util
import os

# The tests compile with XLA's cheaper settings. The suite is bound by
# compiling, not by running: `tests/test_nnx.py` alone makes ~1,200 compiles,
# and the 8-device script ~230. The tests check what the library computes,
# which must hold under any compiler settings. Two settings (issue 32):
#  - JAX's own switch `jax_disable_most_optimizations` (LLVM at -O0, no
#    expensive passes): the suite's worker-seconds 1,965 -> ~1,650;
#  - XLA:CPU's classic elemental code generation instead of its newer fusion
#    emitters (`--xla_cpu_use_fusion_emitters=false`): a small private step
#    compiles in 1.4-1.6 s instead of 3.0-3.6 s at -O0.
# Both are set here, before JAX starts, so that the example scripts and the
# 8-device and multi-process runs the tests start inherit them. A module that
# is bound by running says `pytestmark = pytest.mark.xla_optimized` (a test:
# `@pytest.mark.xla_optimized`; the fixtures below), which turns the first
# back on (the second is fixed when JAX starts): the audit and the
# non-private MNIST run. The golden test computes in a process of its own
# with XLA's defaults, as its recording was made.
# `JAX_DISABLE_MOST_OPTIMIZATIONS=0 XLA_FLAGS=--xla_cpu_use_fusion_emitters=true
# pytest ...` runs everything with the defaults.
if "--xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), "--xla_cpu_use_fusion_emitters=false"]).strip()
_FAST_COMPILE = os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import hypothesis  # noqa: E402  pylint: disable=wrong-import-position
import jax  # noqa: E402  pylint: disable=wrong-import-position
import pytest  # noqa: E402  pylint: disable=wrong-import-position

from optax_dp._core import _keys  # noqa: E402  pylint: disable=wrong-import-position

# JAX may have been imported before this file (a plugin, `-p`); the flag is
# read at each compile, so setting it here holds either way.
_FAST_COMPILE_ON = _FAST_COMPILE not in ("0", "", "false", "False")
jax.config.update("jax_disable_most_optimizations", _FAST_COMPILE_ON)

# tests/models.py (the shared test models) is imported as `models`. Imported
# here, before any test module, the name is that file's for the whole session:
# tests/test_example_mnist.py puts examples/ first on sys.path, and the
# tutorial CNN's examples/models.py would otherwise answer an `import models`
# made inside a test that runs later (seen with `-o addopts=""` on
# test_budget.py followed by test_example_mnist.py).
if importlib.util.find_spec("flax") is not None:   # models.py builds on flax
  import models  # noqa: F401  pylint: disable=unused-import,wrong-import-position


# Hypothesis profiles. "ci" (hypothesis' default of 100 examples) is the
# reference: tests/test_properties.py runs each property with the number of
# examples written at it, times max_examples / 100 of the loaded profile, so
# "ci" runs exactly the written counts and "dev" a quarter of them (at least
# 2). A plain `pytest` (the README's test command, CI) loads "ci"; the fast
# tier (`-m "not slow"`) loads "dev"; `--hypothesis-profile=NAME` picks one.
hypothesis.settings.register_profile("ci", max_examples=100)
hypothesis.settings.register_profile("dev", max_examples=25)


def pytest_configure(config):
  if not config.getoption("hypothesis_profile", None):
    fast_tier = "not slow" in (config.option.markexpr or "")
    hypothesis.settings.load_profile("dev" if fast_tier else "ci")


@contextlib.contextmanager
def _xla_optimizations_on():
  """XLA's optimisations on inside the block.

  The flag is not part of JAX's compilation-cache key, so the caches are
  cleared on the way in and out: nothing compiled at one level runs at the
  other. The environment variable follows, for the processes started inside.
  """
  environ_before = os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS")
  jax.clear_caches()
  jax.config.update("jax_disable_most_optimizations", False)
  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"
  try:
    yield
  finally:
    jax.clear_caches()
    jax.config.update("jax_disable_most_optimizations", _FAST_COMPILE_ON)
    if environ_before is None:
      os.environ.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    else:
      os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = environ_before


@pytest.fixture(scope="module", autouse=True)
def _xla_optimized_module(request):
  """A module marked `xla_optimized` (`pytestmark`) runs optimised, its
  module-scoped fixtures included."""
  if request.node.get_closest_marker("xla_optimized") is None:
    yield
    return
  with _xla_optimizations_on():
    yield


@pytest.fixture(autouse=True)
def _xla_optimized_test(request):
  """A test marked `xla_optimized` in an unmarked module runs optimised."""
  own = request.node.get_closest_marker("xla_optimized")
  if own is None or request.node.parent.get_closest_marker("xla_optimized") is not None:
    yield
    return
  with _xla_optimizations_on():
    yield


@pytest.fixture(autouse=True)
def _fresh_noise_key_registry():
  """Each test starts with an empty noise-key registry.

  `dp_aggregate` warns (`NoiseKeyReuseWarning`) when a second noisy transform
  is built from a key that an earlier one in the same process used: the two
  would add identical noise. The registry is process-wide, so without this
  reset a test's outcome would depend on which tests ran before it in the same
  pytest process (many reuse small int seeds such as 0 or 1, legitimately:
  they are separate runs whose outputs are never combined). Tests that build
  two transforms from one key *within* the test still warn, as a user would
  see it; tests/test_bad_inputs.py checks the warning itself.
  """
  _keys._reset_noise_key_registry()  # pylint: disable=protected-access
  yield
  _keys._reset_noise_key_registry()  # pylint: disable=protected-access


# Tests that build two noisy dp_aggregate transforms from one key ON PURPOSE,
# to show that the same key gives the same noise (determinism, resume, key
# forms, dpsgd == chain, accumulation == one logical batch, the audit's score
# sign), or that run many independent hypothesis examples inside one test (the
# registry is reset per test, not per example, and examples may repeat a
# seed): the reuse warning is expected there and would only be noise in the
# summary. Any other test that reuses a key still shows it.
_DELIBERATE_KEY_REUSE = {
    ("test_aggregate.py", "test_key_determinism_and_key_forms"),
    ("test_aggregate.py", "test_dpsgd_is_chain_of_aggregate_and_sgd"),
    ("test_aggregate.py", "test_rescale_to_unit_norm_divides_by_clip_including_noise"),
    ("test_budget.py", "test_restored_earlier_state_resumes_the_same_updates"),
    ("test_budget.py", "test_noise_depends_only_on_key_and_step"),
    ("test_accumulate.py", "test_k_physical_batches_equal_one_logical_batch"),
    ("test_accumulate.py", "test_fast_path_sampler_chunks_in_trainstate_equal_logical_batches"),
    ("test_clipped.py", "test_flax_trainstate_apply_gradients_with_clipped_grads"),
    ("test_audit.py", "test_the_score_sign_does_not_matter"),
    ("test_properties.py", "test_masked_rows_never_matter"),
    ("test_clip_norms.py", "test_groupwise_noise_is_the_flat_noise_at_the_total_sensitivity"),
    ("test_clip_norms.py", "test_adaptive_resumes_bitwise"),
}


# The longest test files, longest first (seconds of their tests in one
# `pytest --durations=60` run, 2026-12-03: 271, 243, 208, 204, 148, 144, 85,
# 77, 66). pytest-xdist (`--dist loadfile --no-loadscope-reorder`) hands the
# files to its workers in collection order, so these start first and the
# short files fill in behind them; by default it orders files by their number
# of tests, which left the few-test, minute-long example runs for last, on one
# worker while the other idled (an ~8-minute tail of a 20-minute run).
_LONGEST_FIRST = ("test_train_recipes.py", "test_example_ledger.py", "test_example_mnist.py",
                  "test_nnx.py",
                  # ~120 s under load (issue 31), its one venv test 207 s under
                  # heavy load (2026-12-05), the longest single test: builds the
                  # wheel, installs it into a fresh core-only venv and runs
                  # tests/core_only/ there; early, so that it never ends the run
                  "test_packaging.py",
                  "test_audit.py", "test_properties.py", "test_clipped.py",
                  "test_multi_process.py",   # ~115 s: two groups of subprocess runs
                  "test_multi_device.py", "test_clip_norms.py",   # ~120 s (issue 18)
                  "test_model_parallel.py",   # ~140 s: one 8-device process, optimised
                  "test_train_results.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
  for item in items:
    # A test that starts processes or a browser is slow: the one fast-tier
    # command, `pytest -m "not slow"`, leaves all of them out.
    if item.get_closest_marker("subprocess") or item.get_closest_marker("browser"):
      item.add_marker(pytest.mark.slow)
    if (item.path.name, getattr(item, "originalname", None)) in _DELIBERATE_KEY_REUSE:
      item.add_marker(pytest.mark.filterwarnings(
          "ignore::optax_dp._core._keys.NoiseKeyReuseWarning"))
