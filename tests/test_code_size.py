"""Rooms that do one job (#25): no library or CLI module over 600 lines, no function body over 80 lines (its
docstring left out), read from the source."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _sources() -> list[Path]:
    return sorted(
        p
        for base in ("reflowpairs", "cli")
        for p in (ROOT / base).rglob("*.py")
        if "__pycache__" not in p.parts
    )


def function_lengths(source: str) -> dict[str, int]:
    """``{name: body lines}`` of every function in ``source``, the docstring not counted."""
    lengths = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]
            lengths[f"{node.name}:{node.lineno}"] = node.end_lineno - body[0].lineno + 1
    return lengths


def test_the_measure_counts_a_body_without_its_docstring():
    source = 'def f():\n    """doc\n    more"""\n    a = 1\n    return a\n'
    assert function_lengths(source) == {"f:1": 2}


def test_no_module_is_over_600_lines():
    assert len(_sources()) > 30
    long = {
        str(p.relative_to(ROOT)): n
        for p in _sources()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_body_is_over_80_lines():
    long = {
        f"{p.relative_to(ROOT)}:{name}": n
        for p in _sources()
        for name, n in function_lengths(p.read_text()).items()
        if n > MAX_FUNCTION_LINES
    }
    assert not long, f"function bodies over {MAX_FUNCTION_LINES} lines: {long}"
