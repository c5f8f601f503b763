"""RLAIF-V best-of-N reward service and trainer: one import name.

    rlaifv.reward    the core: model pairs, log-probs, the implicit and claims rewards
    rlaifv.service   the FastAPI service (scheduler, engines, routes); imports reward only
    rlaifv.trainer   feedback, preference pairs, DPO, bundles; the shapes-world demo in .shapes
    rlaifv.cli       the `rlaifv` command: the one place that wires service and trainer together
    rlaifv.bench     benchmarks; rlaifv.testing: a test server (nothing in the product imports either)

In a source checkout `rlaifv/reward`, `rlaifv/service` and `rlaifv/trainer` are links to the top-level
folders the project is known by, so Python, setuptools, mypy and import-linter all see one package
without import hooks.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rlaifv")
except PackageNotFoundError:  # a checkout on sys.path without an install
    __version__ = "0+unknown"
