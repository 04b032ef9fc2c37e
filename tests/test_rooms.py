"""Small rooms: no class in archived/ grows past what one can read in one sitting. (That
the README's layout names every module is checked with the layers, in test_imports.)"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "archived"
README = PACKAGE.parent / "README.md"
MAX_CLASS_LINES = 300


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_class_is_over_300_lines() -> None:
    big = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                name = f"{path.relative_to(PACKAGE)}: {node.name}"
                if lines > MAX_CLASS_LINES:
                    big.append(f"{name}, {lines} lines")
    assert big == [], f"classes over {MAX_CLASS_LINES} lines: split them"
