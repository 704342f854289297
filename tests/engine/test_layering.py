"""``server.engine`` imports only torch, torchvision, numpy, scikit-learn and the standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import server.engine

ALLOWED = {"torch", "torchvision", "numpy", "sklearn", "server"}
ENGINE = Path(server.engine.__file__).parent


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_engine_imports_only_allowed_modules() -> None:
    violations = []
    for path in sorted(ENGINE.rglob("*.py")):
        for line, module in _imports(path):
            top = module.split(".")[0]
            inside_engine = module == "server.engine" or module.startswith("server.engine.")
            if top == "server" and not inside_engine:
                violations.append(f"{path.relative_to(ENGINE)}:{line} imports {module} (outside server.engine)")
            elif top not in ALLOWED and top not in sys.stdlib_module_names and top != "__future__":
                violations.append(f"{path.relative_to(ENGINE)}:{line} imports {module}")
    assert not violations, "\n".join(violations)
