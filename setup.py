"""Collects the component folders into one import namespace; all other metadata is in pyproject.toml.

Each component folder is a source root that holds its part of the `loraplex` namespace package, so
the folder path under the root *is* the import path (a reader, pyright or mypy goes straight from
an import to its file; pyproject.toml's [tool.pyright] and [tool.mypy] list the roots):

    loraplex/manifest.py           -> loraplex.manifest   (the shared adapter-manifest schema; pydantic only)
    engine/loraplex/engine/        -> loraplex.engine     (everything that runs in an engine pod)
    kernels/loraplex/kernels/      -> loraplex.kernels    (Triton kernels and their torch references)
    operator/loraplex/operator/    -> loraplex.operator   (the kopf operator; no torch)

No top-level folder of the repository is a regular package, so none can shadow an installed one
from the repository root (PyPI's `kernels`, which transformers imports; the standard library's
`operator`): tests/packaging/test_shadowing.py proves it. `loraplex` is a namespace package (PEP 420)
spread over the roots. A component folder that is absent is skipped, so Dockerfile.operator can
build from loraplex/ and operator/ alone.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
COMPONENTS = {"loraplex": "loraplex", "loraplex.engine": "engine/loraplex/engine",
              "loraplex.kernels": "kernels/loraplex/kernels", "loraplex.operator": "operator/loraplex/operator"}

package_dir, packages = {}, []
for name, folder in COMPONENTS.items():
    if not (HERE / folder).is_dir():
        continue
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(str(HERE / folder))]

setup(package_dir=package_dir, packages=packages)
