"""The repository layout: three component folders at the top, one `loraplex` import namespace.

engine/loraplex/engine -> loraplex.engine, kernels/loraplex/kernels -> loraplex.kernels,
operator/loraplex/operator -> loraplex.operator, and the shared schema in loraplex/. These tests build real wheels and a real venv: they prove what an image
or a `pip install` gets, not what the source tree happens to allow.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPONENTS = {"loraplex": REPO / "loraplex", "loraplex.engine": REPO / "engine/loraplex/engine",
              "loraplex.kernels": REPO / "kernels/loraplex/kernels",
              "loraplex.operator": REPO / "operator/loraplex/operator"}


def build_wheel(src: Path, out: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("loraplex-*.whl")
    return wheel


def module_name(name: str, folder: Path, path: Path) -> str:
    """The dotted name a file under a component folder has once installed."""
    parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
    return ".".join([name, *parts])


def source_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.py") if "__pycache__" not in p.parts]


def source_modules(name: str, folder: Path) -> set[str]:
    return {module_name(name, folder, p) for p in source_files(folder)}


def wheel_modules(wheel: Path) -> set[str]:
    names = zipfile.ZipFile(wheel).namelist()
    return {n[:-3].replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py")}


@pytest.fixture(scope="module")
def full_wheel(tmp_path_factory) -> Path:
    return build_wheel(REPO, tmp_path_factory.mktemp("wheel"))


@pytest.mark.slow
def test_wheel_maps_every_component_under_one_namespace(full_wheel):
    got = wheel_modules(full_wheel)
    for name, folder in COMPONENTS.items():
        want = source_modules(name, folder)
        assert want, f"{folder} has no modules"
        assert want <= got, f"missing from the wheel: {sorted(want - got)[:10]}"
    top_level = {m.split(".")[0] for m in got}
    assert top_level == {"loraplex"}, f"the wheel installs other top-level packages: {top_level}"
    assert "operator" not in top_level, "a top-level `operator` would shadow the standard library"


def dockerfile_copies(dockerfile: Path) -> list[tuple[str, str]]:
    """(source, destination) of every COPY from the build context (not --from a stage)."""
    out = []
    for line in dockerfile.read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not any(p.startswith("--from") for p in parts):
            *sources, dest = [p for p in parts[1:] if not p.startswith("--")]
            out += [(src, dest) for src in sources]
    return out


def image_context(dockerfile: Path, ctx: Path) -> Path:
    """What the Dockerfile's COPY instructions put under its WORKDIR, and nothing else."""
    for src, dest in dockerfile_copies(dockerfile):
        target = ctx / dest if dest not in ("./", ".") else ctx
        if (REPO / src).is_dir():
            shutil.copytree(REPO / src, target if dest not in ("./", ".") else ctx / src,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / src, target / Path(src).name)
    return ctx


@pytest.fixture(scope="module")
def operator_image_wheel(tmp_path_factory) -> Path:
    """The wheel `pip install ".[operator]"` builds inside Dockerfile.operator, from exactly what it copies."""
    ctx = image_context(REPO / "Dockerfile.operator", tmp_path_factory.mktemp("ctx"))
    return build_wheel(ctx, tmp_path_factory.mktemp("out"))


@pytest.mark.slow
def test_operator_image_context_builds_without_engine_or_kernels(operator_image_wheel):
    """Dockerfile.operator copies only the schema and operator/: the build must work from that alone."""
    mods = wheel_modules(operator_image_wheel)
    assert source_modules("loraplex.operator", COMPONENTS["loraplex.operator"]) <= mods
    assert not [m for m in mods if m.startswith(("loraplex.engine", "loraplex.kernels"))]
    copied = {src for src, _ in dockerfile_copies(REPO / "Dockerfile.operator")}
    assert {"loraplex", "operator"} <= copied and not copied & {"engine", "kernels", "."}, copied


@pytest.mark.slow
def test_operator_image_python_path_holds_nothing_of_the_engine(operator_image_wheel, tmp_path):
    """Install what the operator image installs (requirements/operator.txt, then its wheel) into a fresh
    venv, import every operator module, then search every sys.path entry: no torch, Triton or
    transformers, and no loraplex.engine / loraplex.kernels file anywhere."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # As Dockerfile.operator does: the operator's lock (hashes, no resolution), then the wheel alone.
    for args in (["--require-hashes", "--no-deps", "-r", str(REPO / "requirements/operator.txt")],
                 ["--no-deps", str(operator_image_wheel)]):
        proc = subprocess.run([str(py), "-m", "pip", "install", "-q", *args], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    check = subprocess.run([str(py), "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    mods = sorted(source_modules("loraplex.operator", COMPONENTS["loraplex.operator"]))
    code = ("import importlib, importlib.util, os, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "bad = [m for m in ('torch', 'triton', 'transformers', 'loraplex.engine') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "for m in ('torch', 'triton', 'transformers', 'loraplex.engine', 'loraplex.kernels'):\n"
            "    assert importlib.util.find_spec(m) is None, m + ' is importable'\n"
            "found = []\n"
            "for entry in sys.path:\n"
            "    for root, dirs, files in os.walk(entry or '.'):\n"
            "        rel = os.path.relpath(root, entry or '.').replace(os.sep, '/')\n"
            "        if rel.split('/')[0] in ('torch', 'triton', 'transformers') or rel.startswith(('loraplex/engine', 'loraplex/kernels')):\n"
            "            found.append(os.path.join(entry, rel))\n"
            "            dirs[:] = []\n"
            "assert not found, found\n"
            "import operator; operator.itemgetter\n"
            "print('imported', len(" + repr(mods) + "))\n")
    # The fresh venv's own sys.path only: a PYTHONPATH of the caller's would add the source tree.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"imported {len(mods)}" in out.stdout


def test_stdlib_operator_is_found_from_the_repository_root():
    out = subprocess.run([sys.executable, "-c", "import operator; operator.itemgetter; print(operator.__file__)"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert not out.stdout.strip().startswith(str(REPO)), out.stdout


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {m for m in found if m.startswith("loraplex")}


# Each layer may import itself and the layers after it, never one before it.
LAYERS = ["loraplex.engine.api", "loraplex.engine.core", "loraplex.engine.model", "loraplex.kernels"]


def layer_of(module: str) -> int | None:
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return None


def test_imports_run_one_way():
    bad = []
    for name, folder in COMPONENTS.items():
        for path in source_files(folder):
            own = module_name(name, folder, path)
            for imp in imports_of(path):
                if name in ("loraplex.operator", "loraplex"):
                    # the operator (and the shared schema) import only the schema and themselves
                    if not (imp == "loraplex.manifest" or imp.startswith(name)):
                        bad.append(f"{own} imports {imp}")
                    continue
                mine, theirs = layer_of(own), layer_of(imp)
                if imp.startswith("loraplex.operator") or (mine is not None and theirs is not None and theirs < mine):
                    bad.append(f"{own} imports {imp}")
    assert not bad, "imports must run api -> core -> model -> kernels:\n" + "\n".join(bad)
