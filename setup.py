"""Maps the component folders onto one import namespace; all other metadata is in pyproject.toml.

    loraplex/  -> loraplex           (the shared adapter-manifest schema; pydantic only)
    engine/    -> loraplex.engine    (everything that runs in an engine pod)
    kernels/   -> loraplex.kernels   (Triton kernels and their torch references)
    operator/  -> loraplex.operator  (the kopf operator; no torch)

Never a top-level `operator` package: that name is the standard library's. A component folder
that is absent is skipped, so Dockerfile.operator can build from loraplex/ and operator/ alone.
operator/ has no __init__.py (operator/README.md says why), so it is a namespace package, and so is
loraplex/ above it: setuptools' editable finder resolves a namespace package only under another one.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
COMPONENTS = {"loraplex": "loraplex", "loraplex.engine": "engine",
              "loraplex.kernels": "kernels", "loraplex.operator": "operator"}

package_dir, packages = {}, []
for name, folder in COMPONENTS.items():
    if not (HERE / folder).is_dir():
        continue
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(str(HERE / folder))]

setup(package_dir=package_dir, packages=packages)
