"""The code on the docs site's guide pages runs as written, and what they quote is real.

Which fenced blocks run (the one convention for every page listed in PAGES):

* A block opened with a bare ```python fence (nothing after "python") is
  RUNNABLE: this test executes it. The runnable blocks of one page run in page
  order in one fresh namespace, as a reader pasting them into one Python
  session would, so a later block may use what an earlier one defined. They
  run in a temporary working directory, which holds a link to the clone's
  examples/ (the MNIST tutorial reads the bundled data as a reader in the
  clone's root would), and any warning raised by optax_dp
  (`NoiseKeyReuseWarning`, `PerExampleFallbackWarning`, the "NOT
  differentially private" warning) fails the page: a guide shows clean usage.
* A ```python block with a title (```python title="..."```, rendered by
  mkdocs-material as a caption) is SHOWN, NEVER RUN:
  - if the title is the path of a file in this repository (e.g.
    title="examples/mnist_linen.py"), the block is a quotation and must be
    one: its lines appear in that file, in order and contiguous, except where
    a line holding only "..." (or "# ...") marks an elision;
  - any other title names code of another library (title="Opacus",
    title="jax_privacy 1.0 (removed)", title="optax.contrib"): it needs
    packages this project does not install and is not run.
* Blocks in other languages (```bash, ```text, ```json) are never run.

Fences may be indented (inside material's `=== "tab"` content tabs); the
indentation is removed before running. Each page has a minimum number of
runnable blocks (PAGES), so a page whose code was all marked "shown" by
mistake fails instead of passing vacuously. Also checked: relative links to
other pages (`../privacy_contract.md`) resolve under docs/, and every
`--flag` a page names is a flag of the example scripts or of the
`python -m optax_dp` command line.

Run alone with `python -m pytest -q -n 0 tests/test_docs_examples.py`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")

# Page (relative to docs/) -> the least number of runnable blocks it must have.
PAGES = {
    "getting_started/linen.md": 4,
    "getting_started/nnx.md": 4,
    "tutorials/mnist.md": 8,            # the example's library calls, on MNIST
    "tutorials/recipes.md": 0,          # commands and results
    "tutorials/accumulation.md": 2,
    "bandmf.md": 1,
    "privacy_units.md": 3,
    "tuning.md": 2,
    "clipping.md": 2,
    "tutorials/checkpoint_resume.md": 3,
    "tutorials/large_data.md": 5,
    "tutorials/language_model.md": 4,   # a toy model on the Shakespeare corpus
    "migration/jax_privacy.md": 1,
    "migration/optax_contrib.md": 2,
    "migration/opacus.md": 1,
}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<info>[^`]*)$")
_ELISION = {"...", "# ..."}


@dataclasses.dataclass
class Block:
  page: str
  line: int          # 1-based line of the opening fence
  language: str
  title: str | None
  code: str

  @property
  def runnable(self) -> bool:
    return self.language == "python" and self.title is None


def _title(info: str) -> str | None:
  match = re.search(r'title="([^"]*)"', info)
  return match.group(1) if match else None


def extract_blocks(page: str) -> list[Block]:
  """The fenced code blocks of a page, dedented, with their fence info."""
  with open(os.path.join(DOCS, page), encoding="utf-8") as f:
    lines = f.read().splitlines()
  blocks, i = [], 0
  while i < len(lines):
    opening = _FENCE.match(lines[i])
    if not opening:
      i += 1
      continue
    indent, ticks = opening["indent"], opening["ticks"]
    info = opening["info"].strip()
    language = info.split()[0] if info else ""
    body, j = [], i + 1
    while j < len(lines) and lines[j].strip() != ticks:
      line = lines[j]
      if line.strip() and not line.startswith(indent):
        raise AssertionError(f"{page}:{j + 1}: a line of the block at line {i + 1} is "
                             "indented less than its fence")
      body.append(line[len(indent):])
      j += 1
    if j == len(lines):
      raise AssertionError(f"{page}:{i + 1}: unclosed code fence")
    blocks.append(Block(page, i + 1, language, _title(info), "\n".join(body) + "\n"))
    i = j + 1
  return blocks


def _is_optax_dp_warning(w: warnings.WarningMessage) -> bool:
  return (type(w.message).__module__.startswith("optax_dp")
          or os.path.join(ROOT, "optax_dp") in os.path.abspath(w.filename)
          or "differentially private" in str(w.message))


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_runnable_block_runs(page, tmp_path, monkeypatch):
  blocks = [b for b in extract_blocks(page) if b.runnable]
  assert len(blocks) >= PAGES[page], (
      f"{page}: {len(blocks)} runnable ```python blocks, expected at least {PAGES[page]} "
      "(a titled block is shown, not run: see this file's docstring)")
  monkeypatch.chdir(tmp_path)
  (tmp_path / "examples").symlink_to(os.path.join(ROOT, "examples"), target_is_directory=True)
  namespace = {"__name__": "__docs__"}
  for block in blocks:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      code = compile(block.code, f"docs/{page}, block at line {block.line}", "exec")
      exec(code, namespace)  # pylint: disable=exec-used
    ours = [f"{w.category.__name__}: {w.message}" for w in caught if _is_optax_dp_warning(w)]
    assert not ours, f"docs/{page}, block at line {block.line} warns: {ours}"


def _quotations():
  for page in sorted(PAGES):
    for block in extract_blocks(page):
      if block.language == "python" and block.title and os.path.isfile(
          os.path.join(ROOT, block.title)):
        yield pytest.param(block, id=f"{page}:{block.line}")


def _chunks(code: str) -> list[list[str]]:
  """Non-blank stripped lines, split at elision lines."""
  chunks = [[]]
  for line in code.splitlines():
    if line.strip() in _ELISION:
      chunks.append([])
    elif line.strip():
      chunks[-1].append(line.strip())
  return [c for c in chunks if c]


@pytest.mark.parametrize("block", list(_quotations()))
def test_quotations_are_verbatim(block):
  with open(os.path.join(ROOT, block.title), encoding="utf-8") as f:
    source = [line.strip() for line in f.read().splitlines() if line.strip()]
  start = 0
  for chunk in _chunks(block.code):
    for k in range(start, len(source) - len(chunk) + 1):
      if source[k:k + len(chunk)] == chunk:
        start = k + len(chunk)
        break
    else:
      pytest.fail(f"docs/{block.page}:{block.line}: not in {block.title} (in this order):\n"
                  + "\n".join(chunk))


def test_every_page_quotes_or_runs_only_what_the_convention_allows():
  """Titled python blocks are quotations of a repo file or peer code; a title
  that looks like a path but names no file is a stale quotation."""
  for page in PAGES:
    for block in extract_blocks(page):
      if block.language == "python" and block.title and "/" in block.title and (
          block.title.endswith(".py")):
        assert os.path.isfile(os.path.join(ROOT, block.title)), (
            f"docs/{page}:{block.line}: quotes {block.title}, which does not exist")


_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", sorted(PAGES))
def test_relative_links_resolve(page):
  with open(os.path.join(DOCS, page), encoding="utf-8") as f:
    text = f.read()
  for target in _LINK.findall(text):
    if re.match(r"[a-z]+:", target) or target.startswith("#"):
      continue
    path = target.split("#")[0]
    if path.endswith(".md"):
      resolved = os.path.normpath(os.path.join(DOCS, os.path.dirname(page), path))
      assert resolved.startswith(DOCS + os.sep), f"docs/{page}: {target} leaves docs/"
      assert os.path.isfile(resolved), f"docs/{page}: broken link {target}"


def _known_flags() -> set[str]:
  flags = set()
  sources = [os.path.join(ROOT, "examples", name) for name in os.listdir(
      os.path.join(ROOT, "examples")) if name.endswith(".py")]
  sources.append(os.path.join(ROOT, "optax_dp", "_cli.py"))
  for path in sources:
    with open(path, encoding="utf-8") as f:
      flags.update(re.findall(r"""["'](--[a-z][a-z0-9-]*)["']""", f.read()))
  return flags


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_flag_named_exists(page):
  with open(os.path.join(DOCS, page), encoding="utf-8") as f:
    text = f.read()
  known = _known_flags() | {"--help"}    # argparse's own
  known |= {"--no-" + flag[2:] for flag in known}   # BooleanOptionalAction's --no-X forms
  named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))
  unknown = sorted(named - known)
  assert not unknown, f"docs/{page} names flags no script defines: {unknown}"


def _table(text: str, header_start: str) -> list[dict[str, str]]:
  """The rows of the markdown table whose header line starts with `header_start`."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
  names = [c.strip() for c in lines[start].strip("|").split("|")]
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append(dict(zip(names, (c.strip() for c in line.strip("|").split("|")))))
  return rows


def test_recipes_page_matches_recipes_py_and_the_readme():
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(
      "recipes_for_docs", os.path.join(ROOT, "examples", "recipes.py"))
  recipes = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipes)
  with open(os.path.join(DOCS, "tutorials", "recipes.md"), encoding="utf-8") as f:
    page = f.read()
  rows = _table(page, "| recipe | dataset | model | features |")
  assert [r["recipe"].strip("`") for r in rows] == list(recipes.RECIPES), (
      "the recipes table must list examples/recipes.py's recipes, in its order")
  for row in rows:
    recipe = recipes.RECIPES[row["recipe"].strip("`")]
    for column, key in (("dataset", "dataset"), ("model", "model"), ("features", "features")):
      assert row[column] == recipe[key], (row["recipe"], column)
    for column, key in (("batch", "batch_size"), ("epochs", "epochs"),
                        ("learning rate", "learning_rate"), ("epsilon", "epsilon"),
                        ("augmentation multiplicity", "augmentation_multiplicity")):
      assert float(row[column]) == pytest.approx(recipe[key], abs=0.005), (row["recipe"], column)
    ema = None if row["EMA"] == "none" else float(row["EMA"])
    assert ema == recipe["ema_decay"], (row["recipe"], "EMA")
  # The results: the README's table, row for row.
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  header = "| recipe | dataset | model | epsilon spent |"
  assert _table(page, header) == _table(readme, header)
