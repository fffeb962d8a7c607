"""optax_dp is a typed library: type checkers accept the code its README and docs show.

Two checks (issue 31, point 5):

* mypy finds the package typed: `import optax_dp` from a user's file, with
  optax_dp on the import path as an installed package (not as the user's own
  source), reports no `import-untyped` ("missing library stubs or py.typed
  marker"), and optax_dp's public functions have their annotated types, not
  `Any`.

* pyright (basic mode, Python 3.11, this interpreter's environment) reports
  ZERO errors on the README's and the docs' Python code. What is checked:

  - every ```python block without a title, page by page: README.md and every
    docs/**/*.md. A page's blocks are concatenated in page order into one file
    (a later block may use what an earlier one defined, as in
    tests/test_docs_examples.py, whose block extraction this reuses);
  - the pages that tests/test_docs_examples.py RUNS (its PAGES) are complete
    programs and are checked exactly as written;
  - the other pages show fragments of a user's program (`loss_fn`,
    `train_step`, `state`, the data...). Each such page has a PRELUDE below
    that supplies those names, the way the reader's program would have them:
    with their real types (a loss function with annotated parameters, a flax
    `TrainState`, an `nnx.Module`, numpy arrays), never as a blanket `Any`
    for an optax_dp value. A page with untitled python blocks that is neither
    run nor given a prelude fails the test, so no page is skipped silently;
  - a titled block quoting a file of this repository (title="examples/...py")
    is checked in that whole file, where the quoted lines live; the errors
    that count are those on the quoted lines (the rest of an example script
    is not docs code);
  - a titled block that names another library's code (title="Opacus",
    "jax_privacy 1.0", "optax.contrib") is not optax_dp usage and is not
    checked (it needs packages this project does not install);
  - USER_CODE below: an annotated user program (a Linen loss over
    `dict[str, Any]` params, an NNX loss over its `nnx.Module` subclass,
    has_aux, group-wise and adaptive clip norms, every gradient builder), the
    case the issue reported (`LossFn` rejected every annotated loss function).

  The rule for "errors attributable to optax_dp": EVERY pyright error counts
  (severity error; reportRedeclaration is off, see `_pyright`), except the
  entries of THIRD_PARTY: errors whose message shows they come from another
  library's annotations on code that is right and runs (flax's
  `Module.apply` return type, jax's `wrap_key_data` parameter), each listed
  with its reason, matched by rule and message, never by file or line; no
  entry may name an optax_dp type. Errors due to a fragment's missing
  definitions are fixed in its prelude (or by completing the page's code),
  never filtered.

Needs the test extra's `pyright` (its wheel bundles pyright's node package;
node itself is taken from PATH, else the wrapper's nodeenv downloads it) and
`mypy`.
Run alone with `python -m pytest -q -n 0 tests/test_types.py`.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from test_docs_examples import PAGES as RUN_PAGES  # pylint: disable=wrong-import-order
from test_docs_examples import _chunks  # pylint: disable=wrong-import-order
from test_docs_examples import extract_blocks  # pylint: disable=wrong-import-order

# pyright and mypy run as subprocesses (tens of seconds): the full suite only.
pytestmark = pytest.mark.subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")

# Names a fragment page's code assumes from the reader's program. `given()`
# stands for "a value the program has here": its declared type is what is
# checked. Shared by the pages that show the same program.
_COMMON = '''
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state

import optax_dp


def given() -> Any:
  """A value the reader's program already has; its annotation is its type."""
  raise NotImplementedError
'''

_LINEN_PROGRAM = '''
def loss_fn(params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
  """The reader's loss: Linen params (a dict) or, on the NNX lines, the model."""
  raise NotImplementedError


def train_step(state: train_state.TrainState, *batch: Any) -> train_state.TrainState:
  """The reader's jitted step (the page's comment says what it holds); a page
  may define its own after it (the NNX one)."""
  raise NotImplementedError


train_images: np.ndarray = given()
train_labels: np.ndarray = given()
state: train_state.TrainState = given()
model: nnx.Module = given()
key = jax.random.key(0)
'''

PRELUDES = {
    "../README.md": _COMMON + _LINEN_PROGRAM + '''
import orbax.checkpoint as ocp

path = "/tmp/checkpoint"
abstract_state: train_state.TrainState = given()
seed = 0
''',
    "index.md": _COMMON + _LINEN_PROGRAM,
    "audit.md": _COMMON + '''
key = jax.random.key(0)
params_like = {"w": jnp.zeros((784, 10)), "b": jnp.zeros(10)}
''',
    "fast_clipping.md": _COMMON + _LINEN_PROGRAM + '''
sigma = 1.1
batch: tuple[jax.Array, jax.Array] = given()
mask: jax.Array = given()
''',
    "multi_device.md": _COMMON + _LINEN_PROGRAM + '''
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sampler = optax_dp.PoissonSampler(dataset_size=60000, expected_batch_size=256)
budget = optax_dp.privacy_budget(sampler=sampler, target_epsilon=1.0, target_delta=1e-5,
                                 steps=100)
seed = 0
train_data: tuple[np.ndarray, np.ndarray] = given()
k = 4                        # accumulation steps; the conv section's `k` is its kernel
x: jax.Array = given()
process_id = 0
''',
}

# An annotated user program: what a type-checked project writes.
USER_CODE = '''
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

import optax_dp

Batch = tuple[jax.Array, jax.Array]


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(4)(nn.relu(nn.Dense(8)(x)))


model = MLP()


def loss_fn(params: dict[str, Any], batch: Batch) -> jax.Array:
  x, y = batch
  logits = model.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def loss_with_aux(params: dict[str, Any], batch: Batch) -> tuple[jax.Array, jax.Array]:
  x, y = batch
  logits = model.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


class NNXModel(nnx.Module):
  def __init__(self, rngs: nnx.Rngs) -> None:
    self.linear = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear(x)


def nnx_loss(model: NNXModel, batch: Batch) -> jax.Array:
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


params = model.init(jax.random.key(0), jnp.zeros((1, 16)))["params"]
batch: Batch = (jnp.zeros((8, 16)), jnp.zeros(8, jnp.int32))
mask = jnp.ones(8, bool)
sampler = optax_dp.PoissonSampler(dataset_size=1000, expected_batch_size=8)
budget: optax_dp.PrivacyBudget = optax_dp.privacy_budget(
    sampler=sampler, target_epsilon=1.0, target_delta=1e-5, steps=10)

tx: optax.GradientTransformation = optax.chain(
    optax_dp.dp_aggregate(1.0, key=jax.random.key(1), budget=budget), optax.sgd(0.1))
opt_state = tx.init(params)
grads = optax_dp.clipped_grads(loss_fn, 1.0)(params, batch, mask)
updates, opt_state = tx.update(grads, opt_state, params)
(losses, logits), grads = optax_dp.value_and_clipped_grads(loss_with_aux, 1.0, has_aux=True)(
    params, batch, mask)
per_example = optax_dp.per_example_grads(loss_fn)(params, batch, mask)
losses, per_example = optax_dp.value_and_per_example_grads(loss_fn)(params, batch)
print(budget.epsilon_spent(opt_state), budget.steps_taken(opt_state))
plan = optax_dp.clipping_plan(loss_fn, params, batch)

groups = optax_dp.per_layer_clip_norms(params, 1.0)
optax_dp.dp_aggregate(groups, noise_multiplier=1.0, key=jax.random.key(2), expected_batch_size=8)
optax_dp.clipped_grads(loss_fn, groups)(params, batch, mask)
clip = optax_dp.AdaptiveClip(1.0, target_quantile=0.5)
optax_dp.dp_aggregate(clip, key=jax.random.key(3), budget=budget)
adaptive = optax_dp.clipped_grads(loss_fn, clip)
adaptive(params, batch, mask, l2_norm_clip=optax_dp.l2_norm_clip_of(opt_state))

nnx_model = NNXModel(nnx.Rngs(0))
optimizer = nnx.Optimizer(nnx_model, optax.chain(
    optax_dp.dp_aggregate(1.0, key=jax.random.key(4), budget=budget), optax.sgd(0.1)),
    wrt=nnx.Param)
nnx_grad_fn = optax_dp.clipped_grads(nnx_loss, 1.0, wrt=nnx.Param)
optimizer.update(nnx_model, nnx_grad_fn(nnx_model, batch, mask))

mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
optax_dp.sharded_clipped_grads(loss_fn, l2_norm_clip=1.0, mesh=mesh)(params, batch, mask)
'''

# Errors that come from another library's annotations, not optax_dp's, on
# code that is right (it runs in tests/test_docs_examples.py):
# (pyright rule, a substring of its message) -> the reason.
THIRD_PARTY: dict[tuple[str, str], str] = {
    ("reportArgumentType", "FrozenVariableDict"):
        "flax.linen.Module.apply is annotated to return `Any | tuple[Any, "
        "FrozenVariableDict | dict]` (the tuple only with mutable=...), so the "
        "logits of `model.apply(variables, x)` are not ArrayLike for optax and numpy",
    ("reportReturnType", "FrozenVariableDict"): "the same, as a loss's return value",
    ("reportArgumentType", 'parameter "key_bits_array"'):
        "jax.random.wrap_key_data is annotated to take a jax.Array, and takes any "
        "array (docs/getting_started/linen.md wraps numpy's bytes)",
}


def _python_blocks(page: str):
  return [b for b in extract_blocks(page) if b.language == "python"]


def _pages() -> list[str]:
  pages = ["../README.md"]
  for path in sorted(glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True)):
    pages.append(os.path.relpath(path, DOCS))
  return pages


def _write_sources(directory: str) -> dict[str, str]:
  """The files to check, {file name: what it is}, written into `directory`."""
  sources = {}
  quoted = set()

  def write(name, code, what):
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
      f.write(code)
    sources[name] = what

  for page in _pages():
    blocks = _python_blocks(page)
    untitled = [b for b in blocks if b.title is None]
    for block in blocks:
      if block.title and os.path.isfile(os.path.join(ROOT, block.title)):
        quoted.add(block.title)
    if not untitled:
      continue
    if page in RUN_PAGES:
      prelude = ""
    elif page in PRELUDES:
      prelude = PRELUDES[page]
    else:
      raise AssertionError(
          f"docs/{page} has untitled ```python blocks but is neither run by "
          "tests/test_docs_examples.py nor given a PRELUDE in tests/test_types.py")
    name = "page_" + page.replace("../", "").replace("/", "_").replace(".md", ".py")
    parts = [prelude]
    for block in untitled:
      parts.append(f"# --- {page}, block at line {block.line}\n{block.code}")
    write(name, "\n".join(parts), f"{page} (its ```python blocks, with its prelude)")
  for path in sorted(quoted):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
      write("quoted_" + os.path.basename(path), f.read(), f"{path} (quoted by the docs)")
  # A quoted example imports its sibling modules (examples/_cli_common.py, ...).
  for path in glob.glob(os.path.join(ROOT, "examples", "*.py")):
    if not os.path.exists(os.path.join(directory, os.path.basename(path))):
      shutil.copy(path, directory)
  write("user_code.py", textwrap.dedent(USER_CODE), "an annotated user program")
  return sources


def _package_env(site: str) -> dict[str, str]:
  """optax_dp seen as an installed package: its directory on sys.path (the
  editable install's import hook is invisible to type checkers)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = site
  return env


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  """A site directory holding optax_dp (a link to this checkout's package)."""
  site = tmp_path_factory.mktemp("site")
  os.symlink(os.path.join(ROOT, "optax_dp"), site / "optax_dp")
  return str(site)


def _pyright(directory: str, site: str, files: list[str]) -> list[dict]:
  with open(os.path.join(directory, "pyrightconfig.json"), "w", encoding="utf-8") as f:
    # reportRedeclaration off: a page's blocks that show alternatives (two
    # `train_step`s, one per way of doing it) redefine a name once
    # concatenated; a reader never has both. It is not a type error.
    json.dump({"typeCheckingMode": "basic", "pythonVersion": "3.11",
               "include": files, "reportRedeclaration": "none"}, f)
  result = subprocess.run(
      [sys.executable, "-m", "pyright", "--outputjson", "--pythonpath", sys.executable,
       "-p", os.path.join(directory, "pyrightconfig.json")],
      cwd=directory, env=_package_env(site), capture_output=True, text=True, timeout=600,
      check=False)
  try:
    report = json.loads(result.stdout)
  except json.JSONDecodeError as error:
    raise AssertionError(f"pyright did not run:\n{result.stdout}\n{result.stderr}") from error
  return report["generalDiagnostics"]


def _describe(d: dict, lines: dict[str, list[str]]) -> str:
  name = os.path.basename(d["file"])
  row = d["range"]["start"]["line"]
  text = lines[name][row].strip() if row < len(lines[name]) else ""
  return f"{name}:{row + 1}: [{d.get('rule', '')}] {d['message']}\n    {text}"


def _third_party(d: dict) -> bool:
  return any(d.get("rule", "") == rule and part in d["message"]
             for (rule, part) in THIRD_PARTY)


def _quoted_lines() -> dict[str, set[int]]:
  """{"quoted_<file>": the 0-based lines of that file the docs quote}: the
  lines of each quotation, matched as tests/test_docs_examples.py matches
  them (in order, contiguous between elisions)."""
  quoted: dict[str, set[int]] = {}
  for page in _pages():
    for block in _python_blocks(page):
      if not (block.title and os.path.isfile(os.path.join(ROOT, block.title))):
        continue
      with open(os.path.join(ROOT, block.title), encoding="utf-8") as f:
        numbered = [(i, line.strip()) for i, line in enumerate(f.read().splitlines())
                    if line.strip()]
      source = [line for _, line in numbered]
      lines = quoted.setdefault("quoted_" + os.path.basename(block.title), set())
      start = 0
      for chunk in _chunks(block.code):
        for k in range(start, len(source) - len(chunk) + 1):
          if source[k:k + len(chunk)] == chunk:
            lines.update(range(numbered[k][0], numbered[k + len(chunk) - 1][0] + 1))
            start = k + len(chunk)
            break
        else:   # not (or no longer) a quotation: tests/test_docs_examples.py fails it
          break
  return quoted


def _position(d: dict) -> tuple[str, int, int]:
  start = d["range"]["start"]
  return d["file"], start["line"], start["character"]


def _counted(diagnostics: list[dict], quoted: dict[str, set[int]]) -> list[dict]:
  """The errors that count: not another library's (THIRD_PARTY; with the
  "No overloads for ..." error pyright reports at the same call for the same
  argument), and not in a quoted file outside the lines the docs quote."""
  errors = [d for d in diagnostics if d["severity"] == "error"]
  theirs = {_position(d) for d in errors if _third_party(d)}

  def counts(d):
    name = os.path.basename(d["file"])
    if name in quoted and d["range"]["start"]["line"] not in quoted[name]:
      return False
    if _third_party(d):
      return False
    if d.get("rule") == "reportCallIssue" and d["message"].startswith("No overloads for"):
      start, end = d["range"]["start"], d["range"]["end"]
      inside = lambda p: (p[0] == d["file"] and (start["line"], start["character"])  # noqa: E731
                          <= p[1:] <= (end["line"], end["character"]))
      return not any(inside(p) for p in theirs)
    return True

  return [d for d in errors if counts(d)]


def test_readme_and_docs_code_type_checks_with_pyright(tmp_path, site):
  sources = _write_sources(str(tmp_path))
  diagnostics = _pyright(str(tmp_path), site, sorted(sources))
  lines = {}
  for name in os.listdir(tmp_path):
    if name.endswith(".py"):
      with open(tmp_path / name, encoding="utf-8") as f:
        lines[name] = f.read().splitlines()
  errors = _counted(diagnostics, _quoted_lines())
  if errors:
    pytest.fail(f"pyright (basic) reports {len(errors)} errors on the README's and docs' "
                f"code ({tmp_path}):\n" + "\n".join(_describe(d, lines) for d in errors),
                pytrace=False)


def test_mypy_finds_the_package_typed(tmp_path, site):
  assert os.path.isfile(os.path.join(ROOT, "optax_dp", "py.typed")), (
      "optax_dp/py.typed is missing: type checkers treat the package as untyped")
  (tmp_path / "user.py").write_text(textwrap.dedent('''
      import optax_dp

      reveal_type(optax_dp.clipped_grads)
      reveal_type(optax_dp.dp_aggregate)
      '''))
  result = subprocess.run(
      [sys.executable, "-m", "mypy", "--no-incremental", "--python-version", "3.11",
       "--python-executable", sys.executable, "user.py"],
      cwd=tmp_path, env=_package_env(site), capture_output=True, text=True, timeout=600,
      check=False)
  out = result.stdout + result.stderr
  assert "import-untyped" not in out and "py.typed" not in out, out
  assert "import-not-found" not in out, out
  assert 'Revealed type is "def (loss_fn:' in out, out   # typed, not Any
  assert 'Revealed type is "def (l2_norm_clip:' in out, out
