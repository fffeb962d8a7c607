"""The rules of docs/architecture.md, read from the code (docs/_structure.py).

Layers are optax_dp's private sub-packages, bottom up: _core, _sample, _clip,
_flax (the adapters), _grads, _aggregation, _lifecycle, then the package's own
modules on top. Imports point down or across a layer, never up, never in a
circle; no module is over 400 lines; nothing below the adapters names a
framework; dp_aggregate stays a short straight line; and the layer table of
docs/architecture.md is the one the code gives.
"""

import ast
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "docs"))
import _structure  # noqa: E402  pylint: disable=wrong-import-position


def test_no_import_circle():
  assert _structure.cycles() == []


def test_imports_point_down_the_layers():
  assert _structure.upward_imports() == []


def test_every_module_sits_in_a_layer():
  for module, path in _structure.modules().items():
    if not path.endswith("__init__.py"):
      assert _structure.layer_of(module) in _structure.LAYERS, module


def test_no_module_over_400_lines():
  over = {m: n for m, n in _structure.line_counts().items() if n > 400}
  assert not over, over


def test_nothing_below_the_adapters_names_a_framework():
  below = ("_core", "_sample", "_clip")
  named = []
  for module, path in _structure.modules().items():
    if _structure.layer_of(module) in below:
      for i, line in enumerate(open(path), 1):
        if re.search(r"nnx|linen|flax", line, re.IGNORECASE):
          named.append(f"{module}:{i}: {line.strip()}")
  assert not named, "\n".join(named)


def _code_lines(path, name):
  """Lines of code of a function, nested helpers included, docstrings,
  comments and blank lines excluded."""
  src = open(path).read()
  fn = next(n for n in ast.walk(ast.parse(src))
            if isinstance(n, ast.FunctionDef) and n.name == name)
  lines = set(range(fn.lineno, fn.end_lineno + 1))
  for n in ast.walk(fn):
    if (isinstance(n, ast.FunctionDef) and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
        and isinstance(n.body[0].value.value, str)):
      lines -= set(range(n.body[0].lineno, n.body[0].end_lineno + 1))
  text = src.splitlines()
  return sum(1 for i in lines
             if text[i - 1].strip() and not text[i - 1].strip().startswith("#"))


def test_dp_aggregate_is_at_most_60_lines_of_code():
  path = os.path.join(ROOT, "optax_dp", "_aggregation", "_aggregate.py")
  assert _code_lines(path, "dp_aggregate") <= 60


def test_the_architecture_page_has_the_layer_table_of_the_code():
  page = open(os.path.join(ROOT, "docs", "architecture.md")).read()
  assert _structure.table() in page, (
      "docs/architecture.md's layer table is stale: paste the output of "
      "`python docs/_structure.py` between its markers.")


@pytest.mark.parametrize("route", [
    # (caller, callee, depth, index of the call that brought the caller)
    [("a", "b", 0, -1), ("b", "c", 1, 0), ("a", "c", 0, -1)],  # c, left, again
    [("a", "b", 0, -1), ("a", "c", 0, -1), ("a", "b", 0, -1)],  # b again after c
])
def test_the_walk_counts_a_return_to_a_module_left(route):
  assert _structure.reentries_of_calls(route) == [2]


def test_the_walk_does_not_count_a_row_of_calls_into_one_module():
  # a calls b twice in a row; b calls c each time: one visit of b, one of c.
  route = [("a", "b", 0, -1), ("b", "c", 1, 0), ("a", "b", 0, -1), ("b", "c", 1, 2)]
  assert _structure.reentries_of_calls(route) == []


@pytest.mark.parametrize("start", [
    "optax_dp/_aggregation/_aggregate.py:dp_aggregate:l2_norm_clip",
    "optax_dp/_grads/_clipped.py:clipped_grads:l2_norm_clip",
])
def test_l2_norm_clip_goes_down_without_reentering_a_module(start):
  calls, again = _structure.walk_report(start)
  assert len({callee for _, callee in calls}) >= 4   # the walk does follow it
  assert [calls[i] for i in again] == []
