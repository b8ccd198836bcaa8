"""The engine's shape, as issue 21 set it: every file of engine/ under 400 lines; the HTTP layer
talks to the engine only through AsyncEngine's public interface (never `AsyncEngine.engine`,
the LLMEngine behind it); every inference route goes through the one lifecycle."""
from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "engine" / "loraplex" / "engine"
API = ENGINE / "api"
ROUTES = ("openai_routes.py", "lorax_routes.py", "responses_routes.py")


def test_no_engine_file_over_400_lines():
    long = {str(p.relative_to(ENGINE)): n for p in ENGINE.rglob("*.py")
            if (n := p.read_text().count("\n")) > 400}
    assert not long, f"over 400 lines: {long}"


def _engine_attribute_reads(source: str) -> list[int]:
    """Lines that read `.engine` on something that is itself an engine (x.engine.engine,
    require_engine().engine, async_engine.engine, state.engine.engine)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Attribute) and node.attr == "engine"):
            continue
        inner = node.value
        if isinstance(inner, ast.Attribute) and inner.attr in ("engine", "async_engine"):
            lines.append(node.lineno)
        elif isinstance(inner, ast.Name) and inner.id in ("engine", "async_engine"):
            lines.append(node.lineno)
        elif isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute) and inner.func.attr == "require_engine":
            lines.append(node.lineno)
    return lines


def test_api_never_reaches_through_the_async_engine():
    found = {p.name: lines for p in API.glob("*.py") if (lines := _engine_attribute_reads(p.read_text()))}
    assert not found, f"api/ reads AsyncEngine.engine (use AsyncEngine's public interface): {found}"


def test_the_reach_through_check_can_fail():
    assert _engine_attribute_reads("x = state.require_engine().engine\ny = state.engine.engine.adapters\n") == [1, 2]


def test_routes_are_translations_onto_the_one_lifecycle():
    for name in ROUTES:
        source = (API / name).read_text()
        assert "InferenceCall(" in source, name
        for forbidden in ("until_disconnect", "merge_streams", "RequestTimer", ".submit(", ".stream(", "off_loop"):
            assert forbidden not in source, f"{name} handles {forbidden} itself; that is the lifecycle's job"
