"""The package as a downstream project gets it: the built wheel and sdist.

`python -m build` builds both from this checkout once per module (into a
temporary directory; build isolation fetches the setuptools that
`[build-system]` asks for). Then: `twine check --strict` on both, the license
(PEP 639: `License-Expression` and the file in the wheel's
`.dist-info/licenses/`), `py.typed` (PEP 561), the classifiers and project
URLs, the core dependencies (no Flax among them), the README as rendered off
the repository (absolute image links, install lines that work from a
clone), the changelog, and `optax-dp --version`.

`test_wheel_in_a_core_only_venv` is issue 31's second environment: a fresh
virtual environment (no system site-packages) gets the wheel and pytest, and
nothing else, so pip installs only the core dependencies from the wheel's
metadata. There `import flax` must fail, `optax-dp --version` must print the
version, and `tests/core_only/test_no_flax.py` (a plain-JAX MLP through
`clipped_grads`, `dp_aggregate`, `privacy_budget`, the CLI) must pass with
nothing skipped. It needs pip to reach the package index (or its cache);
with a warm cache it takes well under two minutes.
"""

import email.parser
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import optax_dp
from optax_dp import _cli

REPO = pathlib.Path(__file__).resolve().parents[1]
CORE_ONLY_TESTS = REPO / "tests" / "core_only" / "test_no_flax.py"
RAW_BASE = "https://raw.githubusercontent.com/optax-dp/optax_dp/main/"
# The core dependencies: what `pip install` of the wheel alone brings.
CORE = {"jax", "optax", "chex", "dp-accounting", "numpy", "scipy"}
URLS = {
    "Homepage": "https://github.com/optax-dp/optax_dp",
    "Documentation": "https://optax-dp.github.io/optax_dp/",
    "Source": "https://github.com/optax-dp/optax_dp",
    "Changelog": "https://github.com/optax-dp/optax_dp/blob/main/CHANGELOG.md",
    "Issues": "https://github.com/optax-dp/optax_dp/issues",
}
CLASSIFIERS = {
    "Programming Language :: Python :: 3.11",
    "Programming Language :: Python :: 3.12",
    "Programming Language :: Python :: 3.13",
    "Topic :: Scientific/Engineering :: Artificial Intelligence",
    "Typing :: Typed",
}


def _env():
  """The environment for the subprocesses: without this checkout on the path."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
  env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONNOUSERSITE="1")
  return env


def _run(command, timeout, cwd=None):
  result = subprocess.run([str(c) for c in command], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=_env(), check=False)
  assert result.returncode == 0, (
      f"{' '.join(map(str, command))} exited {result.returncode}\n"
      f"stdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-6000:]}")
  return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
  """The wheel and sdist built from this checkout, once per module."""
  out = tmp_path_factory.mktemp("dist")
  _run([sys.executable, "-m", "build", "--outdir", out, REPO], timeout=600)
  wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
  assert len(wheels) == 1 and len(sdists) == 1, sorted(out.iterdir())
  return wheels[0], sdists[0]


def _metadata(text):
  return email.parser.Parser().parsestr(text)


def _wheel_metadata(wheel):
  with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    return _metadata(z.read(name).decode())


@pytest.mark.subprocess
def test_version_flag():
  with pytest.raises(SystemExit) as exit_info:
    _cli.build_parser().parse_args(["--version"])
  assert exit_info.value.code == 0
  result = _run([sys.executable, "-m", "optax_dp", "--version"], timeout=300, cwd=REPO)
  assert result.stdout.strip() == f"optax-dp {optax_dp.__version__}"


@pytest.mark.subprocess
def test_twine_check_strict(dist):
  result = _run([sys.executable, "-m", "twine", "check", "--strict", *dist], timeout=300)
  assert result.stdout.count("PASSED") == 2, result.stdout


@pytest.mark.subprocess
def test_wheel_license_types_metadata(dist):
  wheel, _ = dist
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert f"{dist_info}/licenses/LICENSE" in names, sorted(names)
    assert z.read(f"{dist_info}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
    assert "optax_dp/py.typed" in names
    assert "optax_dp/_version.py" in names
    entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
  assert "optax-dp = optax_dp._cli:main" in entry_points
  meta = _wheel_metadata(wheel)
  assert meta["Name"] == "optax_dp" and meta["Version"] == optax_dp.__version__
  assert tuple(map(int, meta["Metadata-Version"].split("."))) >= (2, 4)
  assert meta["License-Expression"] == "Apache-2.0"
  assert meta.get_all("License-File") == ["LICENSE"]
  assert meta["License"] is None   # the old free-text field, superseded by the expression
  classifiers = set(meta.get_all("Classifier"))
  assert CLASSIFIERS <= classifiers, classifiers
  assert not any(c.startswith("License ::") for c in classifiers)   # PEP 639: the expression only
  urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
  assert urls == URLS
  assert meta["Description-Content-Type"] == "text/markdown"
  # The core dependencies, and only those, come without an extra (no Flax).
  required = {re.split(r"[<>=!~; \[]", r, maxsplit=1)[0].lower()
              for r in meta.get_all("Requires-Dist") if "extra ==" not in r}
  assert required == CORE


@pytest.mark.subprocess
def test_sdist_has_license_typing_marker_and_metadata(dist):
  _, sdist = dist
  with tarfile.open(sdist) as t:
    names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    top = t.getnames()[0].split("/")[0]
    pkg_info = _metadata(t.extractfile(f"{top}/PKG-INFO").read().decode())
  assert {"LICENSE", "README.md", "pyproject.toml", "optax_dp/py.typed",
          "optax_dp/_version.py"} <= names
  assert pkg_info["License-Expression"] == "Apache-2.0"
  assert pkg_info["Version"] == optax_dp.__version__


def test_readme_renders_off_the_repository():
  """PyPI and other renderers show the README without the repository's files."""
  readme = (REPO / "README.md").read_text()
  images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", readme) + re.findall(
      r"<img[^>]*\ssrc=[\"']([^\"']+)", readme)
  assert images, "the README shows figures"
  for url in images:
    assert url.startswith(RAW_BASE), f"image not by absolute URL: {url}"
    assert (REPO / url[len(RAW_BASE):]).is_file(), f"no such file in the repository: {url}"


def test_install_lines_work_from_a_clone():
  """No install line names a distribution that is not published (optax-dp[...] on PyPI)."""
  pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
  unpublished = re.compile(r"pip install\s+(-\S+\s+)*[\"']?optax[-_]dp\b")
  bad = [f"{p.relative_to(REPO)}:{i}: {line.strip()}"
         for p in pages for i, line in enumerate(p.read_text().splitlines(), 1)
         if unpublished.search(line)]
  assert not bad, bad


def test_changelog_and_versioning_policy():
  changelog = (REPO / "CHANGELOG.md").read_text()
  headings = re.findall(r"^## \[([^\]]+)\]", changelog, flags=re.M)
  assert headings[0] == "Unreleased"
  assert optax_dp.__version__ in headings or f"[{optax_dp.__version__}]" in changelog
  policy = (REPO / "docs" / "versioning.md").read_text()
  assert "DeprecationWarning" in policy and "Privacy" in policy
  assert "versioning.md" in (REPO / "mkdocs.yml").read_text()


@pytest.mark.subprocess
@pytest.mark.timeout(600)
def test_wheel_in_a_core_only_venv(dist, tmp_path):
  """Issue 31: the wheel in an empty venv with the core dependencies only."""
  wheel, _ = dist
  venv = tmp_path / "core-venv"
  _run([sys.executable, "-m", "venv", venv], timeout=300)
  python = venv / "bin" / "python"
  _run([python, "-m", "pip", "install", "-q", wheel, "pytest"], timeout=420)
  installed = _run([python, "-m", "pip", "list", "--format=freeze"], timeout=120).stdout.lower()
  for extra in ("flax", "orbax", "jax-privacy", "jax_privacy", "tensorflow", "kymatio"):
    assert extra not in installed, installed

  no_flax = subprocess.run([python, "-c", "import flax"], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path, env=_env(), check=False)
  assert no_flax.returncode != 0 and "ModuleNotFoundError" in no_flax.stderr, no_flax.stderr
  where = _run([python, "-c", "import optax_dp; print(optax_dp.__file__)"], timeout=120,
               cwd=tmp_path).stdout.strip()
  assert pathlib.Path(where).is_relative_to(venv), where   # the wheel, not this checkout
  version = _run([venv / "bin" / "optax-dp", "--version"], timeout=120, cwd=tmp_path)
  assert version.stdout.strip() == f"optax-dp {optax_dp.__version__}"

  # The plain-JAX tests, copied out of the checkout (so nothing of it is on the
  # path), with none of the repository's pytest configuration (its addopts
  # ask for xdist and doctests, its conftest for the test models).
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  shutil.copy(CORE_ONLY_TESTS, run_dir)
  result = subprocess.run(
      [python, "-m", "pytest", "-p", "no:cacheprovider", "-c", os.devnull, "--rootdir", run_dir,
       "-o", "addopts=", "-q", "-rfEs", CORE_ONLY_TESTS.name],
      capture_output=True, text=True, timeout=480, cwd=run_dir, env=_env(), check=False)
  output = result.stdout + result.stderr
  summary = output.strip().splitlines()[-1]
  assert result.returncode == 0, output[-12000:]
  passed = re.search(r"\b(\d+) passed\b", summary)
  assert passed and int(passed.group(1)) >= CORE_ONLY_TESTS.read_text().count("\ndef test_"), summary
  assert not re.search(r"skipped|failed|error|deselected|xfail", summary), summary
