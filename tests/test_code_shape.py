"""The library stays readable in one sitting: small modules, short functions.

A module over 300 lines or a function over 60 is a sign that two ideas share one place. Only
declarative tables (the CLI's parser) may be longer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "navit_clip"
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 60
TABLES = {("cli.py", "build_parser")}  # declarative: one add_argument per option

MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_module_is_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines (at most {MAX_MODULE_LINES})"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_functions_are_short(path: Path) -> None:
    long = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES and (path.name, node.name) not in TABLES:
                long.append(f"{node.name} ({length} lines)")
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"
