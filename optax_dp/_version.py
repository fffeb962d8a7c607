"""The version of optax_dp: its one home.

pyproject.toml reads it (`[tool.setuptools.dynamic]`, without importing the
package), `optax_dp.__version__` re-exports it and `optax-dp --version`
prints it.
"""

__version__ = "0.1.0"
