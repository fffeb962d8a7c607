"""Running the example scripts as fresh processes, for the example tests.

The runs compile the same train and eval steps again and again. The runs of
a test module share one JAX persistent compilation cache (a directory of
that module's, empty at its start), so a later run loads the executable an
earlier one compiled: the same program, the same numbers, seconds less each.
Entries are keyed by the program, the flags and the device count, so an
8-device run compiles its own.
"""

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import dp_accounting
from dp_accounting import rdp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
_COMPILATION_CACHE = {}


def compilation_cache_fixture():
  """An autouse, module-scoped fixture: the module's runs share one cache."""

  @pytest.fixture(scope="module", autouse=True)
  def _shared_compilation_cache(tmp_path_factory):
    _COMPILATION_CACHE["dir"] = str(tmp_path_factory.mktemp("jax_compilation_cache"))
    yield
    _COMPILATION_CACHE.clear()

  return _shared_compilation_cache


def run_raw(tmp_path, *args, name="result", env=None, script="mnist_linen.py"):
  """(the finished process, the path of its --json-out record)."""
  out = tmp_path / f"{name}.json"
  cmd = [sys.executable, os.path.join(EXAMPLES, script), *args, "--json-out", str(out)]
  cache = {}
  if "dir" in _COMPILATION_CACHE:
    cache = {"JAX_COMPILATION_CACHE_DIR": _COMPILATION_CACHE["dir"],
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                        env={**os.environ, **cache, **(env or {})})
  return proc, out


def run(tmp_path, *args, name="result", env=None, script="mnist_linen.py"):
  """(the run's JSON record, its stdout); the run must succeed."""
  proc, out = run_raw(tmp_path, *args, name=name, env=env, script=script)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return json.loads(out.read_text()), proc.stdout


def run_in_process(tmp_path, *args, name="result", script="train.py"):
  """(the run's JSON record, its stdout) like `run`, but by the script's
  `main(argv)` in this process: the same parsing, training, ledger, record
  and printed lines (the scripts end in `main()` or `sys.exit(main())`: a
  main that returns 0 or None exits with status 0, a refusal raises
  SystemExit; here it must return 0 or None), without a fresh
  Python importing JAX, Flax and the library again (5-10 s a run on a loaded
  2-core machine). For tests of what a run computes; the scripts' command
  lines (`if __name__ == "__main__"`, the exit status of a process) are run
  as processes by the tests that use `run` and `run_raw` on the same script
  (train.py: tests/test_train_results.py)."""
  module = import_example(os.path.splitext(script)[0])
  out = tmp_path / f"{name}.json"
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    status = module.main([*args, "--json-out", str(out)])
  assert status in (0, None), stdout.getvalue()   # sys.exit(None): status 0
  return json.loads(out.read_text()), stdout.getvalue()


def refusal_in_process(capsys, *args, script="train.py"):
  """(the exit status, stderr) of the script's argument parsing refusing
  `args`: its `parse_args` raises SystemExit with the status a process of
  the script would exit with (argparse's `error` and `_cli_common.fail`
  both raise SystemExit(2) after writing the message to stderr, and
  `main` starts with `parse_args`). For refusals made while parsing, before
  any data is loaded; later refusals need `run_raw`."""
  module = import_example(os.path.splitext(script)[0])
  capsys.readouterr()
  try:
    module.parse_args(list(args))
  except SystemExit as e:
    return e.code, capsys.readouterr().err
  raise AssertionError(f"{script} {' '.join(args)}: parsed without refusing")


def run_refusal_in_process(capsys, tmp_path, *args, script="train.py"):
  """(the exit status, stderr) of the script's `main(argv)` refusing `args`
  after it started (a refusal made past the flags, e.g. on reading a
  checkpoint): `_cli_common.fail` raises SystemExit(2) after writing the
  message to stderr, the status a process of the script exits with. Its
  --json-out is tmp_path / "refused.json" (a refused run writes none)."""
  module = import_example(os.path.splitext(script)[0])
  capsys.readouterr()
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      module.main([*args, "--json-out", str(tmp_path / "refused.json")])
  except SystemExit as e:
    return e.code, capsys.readouterr().err
  raise AssertionError(f"{script} {' '.join(args)}: ran without refusing")


def rdp_epsilon(record):
  """Epsilon of a run's JSON record, recomputed with dp_accounting's RDP
  accountant from its Poisson rate, noise multiplier and steps."""
  accountant = rdp.RdpAccountant()
  accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      record["batch_size"] / record["dataset_size"],
      dp_accounting.GaussianDpEvent(record["noise_multiplier"])), record["steps"]))
  return accountant.get_epsilon(record["delta"])


def pld_epsilon(record):
  """Epsilon of a run's JSON record, recomputed with dp_accounting's PLD
  accountant (the examples' default) from its Poisson rate, noise multiplier
  and steps."""
  from dp_accounting.pld import pld_privacy_accountant  # pylint: disable=import-outside-toplevel
  accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
  accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      record["batch_size"] / record["dataset_size"],
      dp_accounting.GaussianDpEvent(record["noise_multiplier"])), record["steps"]))
  return accountant.get_epsilon(record["delta"])


def _load(module_name, stem):
  """examples/<stem>.py as the module `module_name` (loaded once)."""
  if module_name not in sys.modules:
    spec = importlib.util.spec_from_file_location(module_name,
                                                  os.path.join(EXAMPLES, f"{stem}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module   # dataclasses (Linen fields) look their module up
    spec.loader.exec_module(module)
  return sys.modules[module_name]


def import_example(name):
  """The example script examples/<name>.py as a module, in this process
  (for its parser, or a function of it), under the name `example_<name>`.

  Its `import models` must find examples/models.py, while tests/conftest.py
  makes `models` tests/models.py for the whole session: the name is lent to
  examples/models.py (as `example_models`, tests/models.py's name for it)
  while the script loads, then given back.
  """
  saved = sys.modules.get("models")
  sys.modules["models"] = _load("example_models", "models")
  try:
    return _load(f"example_{name}", name)
  finally:
    if saved is None:
      del sys.modules["models"]
    else:
      sys.modules["models"] = saved
