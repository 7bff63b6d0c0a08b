"""Dependencies point one way: common <- ratelimit <- router, common <- worker. Checked on the source (every
import statement, at any depth), so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {  # package -> top-level packages it must not import
    "common": {"worker", "router", "ratelimit", "llamagrid", "torch", "transformers"},
    "ratelimit": {"worker", "router", "llamagrid", "torch", "transformers"},
    "router": {"worker", "llamagrid", "torch", "transformers"},
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package):
    wrong = {f"{path.relative_to(ROOT)}: {name}" for path in (ROOT / package).rglob("*.py")
             for name in imported_packages(path) & FORBIDDEN[package]}
    assert not wrong, sorted(wrong)
