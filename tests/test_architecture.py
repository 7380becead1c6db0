"""The floors (docs/architecture.md): shared/ imports neither side, ingress/ and workers/ never import each other,
no production package imports cli/ or tests; and every file the architecture page names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "shared": {"ingress", "workers", "cli", "tests"},
    "ingress": {"workers", "cli", "tests"},
    "workers": {"ingress", "cli", "tests"},
}


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports, anywhere in it (imports inside functions count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("floor", sorted(FORBIDDEN))
def test_floors_import_only_what_is_below_them(floor):
    crossings = {
        str(path.relative_to(REPO)): sorted(imported_packages(path) & FORBIDDEN[floor])
        for path in sorted((REPO / floor).rglob("*.py"))
    }
    assert {module: wrong for module, wrong in crossings.items() if wrong} == {}


def test_imports_are_found_inside_functions_too(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from workers.store import Store\n    import ingress.app\n")
    assert imported_packages(module) == {"os", "workers", "ingress"}


def test_every_file_the_architecture_page_names_exists():
    page = (REPO / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:shared|workers|ingress|cli)/[\w/<>.-]*)`", page))
    assert len(named) > 30
    missing = sorted(p for p in named if "<" not in p and not (REPO / p).exists())
    assert missing == []
