"""No folder of the repository shadows an installed package when Python starts from the repository root.

`python -m pytest`, `python -m scripts.demo_assets` and `python -m bench.run` put the repository root
first on sys.path. A regular package there (a folder with `__init__.py`) wins over every installed
package of the same name: a root `kernels/__init__.py` broke transformers 5.25, which imports PyPI's
`kernels`, and a root `operator/__init__.py` would break the standard library. The component folders
are therefore source roots without `__init__.py` (setup.py says how they map onto `loraplex.*`).
"""
from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def resolve_from_root(*modules: str) -> dict[str, str]:
    """Import each module in a fresh interpreter started in the repository root, as `python -m` would
    (the root first on sys.path), and return where each one came from."""
    code = ("import importlib, json, sys\n"
            "sys.path.insert(0, '')\n"
            f"mods = {list(modules)!r}\n"
            "out = {}\n"
            "for m in mods:\n"
            "    mod = importlib.import_module(m)\n"
            "    out[m] = getattr(mod, '__file__', None) or repr(list(getattr(mod, '__path__', [])))\n"
            "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def inside_repo(origin: str) -> bool:
    return str(REPO) in origin and "site-packages" not in origin


def test_installed_packages_win_over_the_repository_root():
    """PyPI's `kernels` (imported by transformers), the standard library's `operator`, and transformers'
    Llama model all resolve outside the repository, from its root."""
    found = resolve_from_root("kernels", "operator", "transformers.models.llama.modeling_llama")
    wrong = {m: origin for m, origin in found.items() if inside_repo(origin)}
    assert not wrong, f"resolved into the repository instead of the installed package: {wrong}"


def test_no_top_level_folder_is_a_regular_package():
    """A folder at the root with `__init__.py` is importable under its own name and shadows any
    installed distribution that ships that name, today or after tomorrow's upgrade."""
    regular = sorted(p.parent.name for p in REPO.glob("*/__init__.py"))
    assert not regular, f"top-level regular packages (remove their __init__.py): {regular}"


def test_no_installed_distribution_ships_a_name_of_ours():
    """The reverse trap: the root's namespace folders (tests, bench, scripts, engine, kernels, operator)
    lose to an installed regular package of the same name, so a dependency that ships one would break
    `python -m bench.run` silently. Fail loudly instead. (`kernels` and `operator` are expected
    to be installed: the repository never imports those names.)"""
    ours = {p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")}
    ours -= {"kernels", "operator", "engine", "loraplex", "docs", "charts", "crds", "manifests"}
    shipped = metadata.packages_distributions()
    clash = {name: shipped[name] for name in ours if name in shipped}
    assert not clash, f"installed distributions ship top-level names the repository uses: {clash}"


def test_the_import_path_is_the_folder_path():
    """`loraplex.engine.core.scheduler` is engine/loraplex/engine/core/scheduler.py: each component
    folder is a source root, so the path under it is the import path (what pyright and mypy follow,
    with the roots listed in pyproject.toml)."""
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    roots = pyproject["tool"]["pyright"]["extraPaths"]
    assert sorted(roots) == ["engine", "kernels", "operator"], roots
    assert sorted(pyproject["tool"]["mypy"]["mypy_path"].split(":")) == sorted(roots)
    samples = {"loraplex.engine.core.scheduler": "engine", "loraplex.kernels.ops": "kernels",
               "loraplex.operator.render": "operator", "loraplex.manifest": "."}
    found = resolve_from_root(*samples)
    for module, root in samples.items():
        want = (REPO / root).joinpath(*module.split(".")).with_suffix(".py")
        assert Path(found[module]) == want, (module, found[module], want)
