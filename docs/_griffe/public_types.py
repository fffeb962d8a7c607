"""A griffe extension for the API page (mkdocs.yml's mkdocstrings options).

The library annotates some parameters with private structural types, such as
`dp_aggregate(budget: Optional[_Budget])`, where `_Budget` is a Protocol of
what `dp_aggregate` reads of a budget (it cannot import `PrivacyBudget`,
whose module imports its own). A reader of the API page has no `_Budget`: in
the rendered signatures each such name is replaced by the public type that a
caller passes (`PrivacyBudget`, linked to its entry). The library's own
annotations, and what it accepts at run time, are unchanged.

Files under docs/ ending in .py are not pages of the site (mkdocs.yml's
exclude_docs); tests/test_docs.py checks that no private name of optax_dp is
left in a rendered signature.
"""

from __future__ import annotations

import dataclasses

import griffe

# Private annotation (its canonical path) -> the public name shown instead,
# looked up in the `optax_dp` package.
PUBLIC_NAMES = {
    "optax_dp._aggregation._aggregate._Budget": "PrivacyBudget",
    "optax_dp._aggregation._release.Budget": "PrivacyBudget",
}


class PublicTypes(griffe.Extension):
  """Shows the public type in place of a private one in signatures."""

  def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
    del kwargs
    if pkg.path == "optax_dp":
      self._package = pkg
      _walk(pkg, pkg)


def _walk(obj, package, seen=None):
  seen = set() if seen is None else seen
  if id(obj) in seen:
    return
  seen.add(id(obj))
  for member in list(obj.members.values()):
    if member.is_alias:
      continue
    if member.is_function:
      for parameter in member.parameters:
        parameter.annotation = _replace(parameter.annotation, package)
      member.returns = _replace(member.returns, package)
    elif member.is_attribute:
      member.annotation = _replace(member.annotation, package)
    if member.is_module or member.is_class:
      _walk(member, package, seen)


def _replace(expr, package):
  """`expr` with every private name of PUBLIC_NAMES replaced."""
  if isinstance(expr, griffe.ExprName):
    try:
      path = expr.canonical_path
    except Exception:  # pylint: disable=broad-except  (an unresolvable name: left as is)
      return expr
    if path in PUBLIC_NAMES:
      return griffe.ExprName(PUBLIC_NAMES[path], parent=package)
    return expr
  if isinstance(expr, griffe.Expr) and dataclasses.is_dataclass(expr):
    for field in dataclasses.fields(expr):
      value = getattr(expr, field.name)
      if isinstance(value, griffe.Expr):
        setattr(expr, field.name, _replace(value, package))
      elif isinstance(value, list):
        setattr(expr, field.name, [_replace(v, package) if isinstance(v, griffe.Expr) else v
                                   for v in value])
  return expr
