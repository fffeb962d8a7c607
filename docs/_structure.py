"""The structure of optax_dp, read from its code (nothing of it is run).

    python docs/_structure.py            # the layer table of docs/architecture.md
    python docs/_structure.py --write    # ... written into that page
    python docs/_structure.py walk optax_dp/_grads/_clipped.py:clipped_grads:l2_norm_clip

`layers()` lists each layer (a private sub-package, bottom up) with its
modules, their lines and what each imports; `walk` follows one parameter from
a function through the calls that pass it on (by name, statically: a call
whose argument mentions the parameter or a name assigned from it), and counts
the *re-entries*: a call into a module the walk had already visited and
left (`reentries_of_calls` says exactly what counts).
tests/test_structure.py checks the rules of docs/architecture.md with it.
"""

from __future__ import annotations

import ast
import collections
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "optax_dp")
# Bottom up; "" is the top (the package's own modules).
LAYERS = ("_core", "_sample", "_clip", "_flax", "_grads", "_aggregation",
          "_lifecycle", "")


def modules() -> dict[str, str]:
  """{dotted module name: path} of every module of optax_dp."""
  out = {}
  for dirpath, _, files in os.walk(PACKAGE):
    for f in sorted(files):
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


def layer_of(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 2 else ""


def imports(path: str) -> dict[str, str]:
  """{local name: dotted module} of the optax_dp modules `path` imports."""
  out = {}
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optax_dp"):
      for alias in node.names:
        target = f"{node.module}.{alias.name}"
        out[alias.asname or alias.name] = target if target in modules() else node.module
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("optax_dp."):
          out[alias.asname or alias.name] = alias.name
  return out


def graph() -> dict[str, set[str]]:
  """{module: the optax_dp modules it imports}, package __init__s left out
  (they re-export)."""
  mods = modules()
  return {m: {t for t in imports(p).values() if t != m and t in mods
              and not t.endswith("__init__") and t != "optax_dp"}
          for m, p in mods.items()}


def cycles() -> list[list[str]]:
  """Import circles between modules (strongly connected components > 1)."""
  g, index, low, stack, on, out = graph(), {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in g.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in g:
    if v not in index:
      visit(v)
  return out


def upward_imports() -> list[tuple[str, str]]:
  """(importer, imported) pairs where a lower layer imports a higher one."""
  rank = {layer: i for i, layer in enumerate(LAYERS)}
  return [(m, t) for m, ts in graph().items() for t in sorted(ts)
          if rank[layer_of(t)] > rank[layer_of(m)]]


def line_counts() -> dict[str, int]:
  return {m: sum(1 for _ in open(p)) for m, p in modules().items()}


def table() -> str:
  """The layer table of docs/architecture.md (Markdown)."""
  counts, g = line_counts(), graph()
  rows = ["| layer | module | lines | imports |", "|---|---|---|---|"]
  for layer in reversed(LAYERS):
    for m in sorted(modules()):
      if layer_of(m) != layer or modules()[m].endswith("__init__.py"):
        continue
      short = lambda t: t.split(".")[-1]
      rows.append(f"| `{layer or 'top'}` | `{short(m)}` | {counts[m]} | "
                  + ", ".join(f"`{short(t)}`" for t in sorted(g[m])) + " |")
  return "\n".join(rows)


# --- walking one parameter ---------------------------------------------------

def _functions(path: str) -> dict[str, ast.FunctionDef]:
  tree = ast.parse(open(path).read())
  out = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.FunctionDef):
      out.setdefault(node.name, node)
  return out


def _names(expr) -> set[str]:
  return {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)}


def _callee(call, module, imported):
  """(module, function name) a call goes to, or None outside optax_dp."""
  f = call.func
  if isinstance(f, ast.Name):
    if f.id in imported and imported[f.id] not in modules():
      return imported[f.id], f.id            # from optax_dp.x._y import name
    return module, f.id
  if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
    target = imported.get(f.value.id)
    if target in modules():
      return target, f.attr
  return None


def walk_report(spec: str) -> tuple[list[tuple[str, str]], list[int]]:
  """`(calls, indices of the calls that re-enter a module)` of one walk."""
  path, function, param = spec.split(":")
  module = os.path.relpath(os.path.join(ROOT, path), ROOT)[:-3].replace(os.sep, ".")
  events = _call_route(module, function, param)
  return [(c, m) for c, m, _, _ in events], reentries_of_calls(events)


def _call_route(module, function, param):
  """The calls from one module into another that pass the parameter on,
  depth first in the order of the code: `(caller module, callee module,
  depth, the caller's stay)`, a stay being one visit of a module."""
  route = []
  mods = modules()
  seen = set()

  def go(module, function, param, depth, stay, closure=frozenset(), walked=None):
    # `walked`: the call sites of this function read so far, shared with the
    # nested functions it calls (whose calls its own reading also lists), so
    # that each is followed once: where the nested function is called.
    if (module, function, param) in seen:
      return
    seen.add((module, function, param))
    walked = set() if walked is None else walked
    fn = _functions(mods[module]).get(function)
    if fn is None:
      return
    imported = imports(mods[module])
    carried = {param} | closure   # a nested function sees its maker's names
    for node in ast.walk(fn):
      if isinstance(node, ast.Assign) and _names(node.value) & carried:
        for t in node.targets:
          carried |= _names(t)
    for call in sorted((n for n in ast.walk(fn) if isinstance(n, ast.Call)),
                       key=lambda n: (n.lineno, n.col_offset)):
      if (call.lineno, call.col_offset) in walked:
        continue
      walked.add((call.lineno, call.col_offset))
      target = _callee(call, module, imported)
      if target is None or target[0] not in mods:
        continue
      callee = _functions(mods[target[0]]).get(target[1])
      if callee is None:
        continue
      params = [a.arg for a in callee.args.posonlyargs + callee.args.args]
      passed = [params[i] for i, a in enumerate(call.args)
                if i < len(params) and _names(a) & carried]
      passed += [k.arg for k in call.keywords
                 if k.arg and _names(k.value) & carried]
      for p in passed:
        if target[0] == module:
          nested = any(isinstance(n, ast.FunctionDef) and n.lineno == callee.lineno
                       for n in ast.walk(fn))
          go(module, target[1], p, depth, stay,
             frozenset(carried) if nested else frozenset(),
             walked if nested else None)
        else:
          route.append((module, target[0], depth, stay))
          go(target[0], target[1], p, depth + 1, len(route) - 1)

  go(module, function, param, 0, -1)
  return route


def reentries_of_calls(events) -> list[int]:
  """The indices of the calls that re-enter a module: one the walk had
  visited before and had left (returned from, to a caller that then called
  elsewhere). Calls from one visit of a caller into one callee, one after
  the other, are one visit of the callee, even where the callee called
  further down in between (reading a helper and coming back is not leaving).

  `events`: `(caller, callee, depth, caller's visit)` as `_call_route`
  makes them, or `(caller, callee)` pairs of one depth and one visit."""
  events = [e if len(e) == 4 else (e[0], e[1], 0, -1) for e in events]
  visited, out = set(), []
  open_at = {}        # depth -> (caller's visit, callee, this visit)
  visit_of = {-1: -1}  # call index -> the visit it opened or continued
  for i, (_, callee, depth, caller_call) in enumerate(events):
    caller_visit = visit_of[caller_call]
    here = open_at.get(depth)
    if here is not None and here[:2] == (caller_visit, callee):
      visit_of[i] = here[2]   # the same visit goes on, and so do its own
      continue
    for d in [d for d in open_at if d > depth]:
      del open_at[d]
    open_at[depth] = (caller_visit, callee, i)
    visit_of[i] = i
    if callee in visited:
      out.append(i)
    visited.add(callee)
  return out


if __name__ == "__main__":
  if len(sys.argv) > 2 and sys.argv[1] == "walk":
    calls, again = walk_report(sys.argv[2])
    for i, (caller, callee) in enumerate(calls):
      print(f"{caller} -> {callee}" + ("   (re-entry)" if i in again else ""))
    print(f"{len(set(c for _, c in calls))} modules entered, {len(again)} re-entries")
  elif sys.argv[1:] == ["--write"]:   # refresh docs/architecture.md's table
    page = os.path.join(ROOT, "docs", "architecture.md")
    text = open(page).read()
    begin, end = "<!-- structure:begin -->\n", "<!-- structure:end -->"
    head, rest = text.split(begin)
    open(page, "w").write(head + begin + table() + "\n" + end + rest.split(end)[1])
  else:
    print(table())
