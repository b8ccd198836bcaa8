"""bench/ depends on the product (and its own modules), never on tests/, and its modules import
one another without a circle. Every import counts, also those inside functions."""
from __future__ import annotations

import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def module_of(path: Path) -> str:
    parts = path.relative_to(BENCH.parent).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def imports_of(path: Path) -> set[str]:
    """Absolute module names `path` imports (`from bench import x` counts as bench.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:
            package = module_of(path).split(".")[:None if path.name == "__init__.py" else -1]
            mod = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return found


def bench_graph() -> dict[str, set[str]]:
    files = [p for p in BENCH.rglob("*.py") if "__pycache__" not in p.parts]
    mods = {module_of(p): p for p in files}
    return {m: {i for i in imports_of(p) if i in mods and i != m} for m, p in mods.items()}


def test_bench_never_imports_the_tests():
    files = [p for p in BENCH.rglob("*.py") if "__pycache__" not in p.parts]
    bad = sorted(f"{module_of(p)} imports {i}" for p in files for i in imports_of(p)
                 if i == "tests" or i.startswith("tests."))
    assert not bad, bad


def test_bench_modules_import_each_other_without_a_circle():
    graph = bench_graph()
    assert "bench.run" in graph and "bench.stepbench" in graph
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        for n in sorted(graph[m]):
            # a package's own __init__ importing its submodules is not a circle
            if not n.startswith(m + "."):
                visit(n, path + [m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])
