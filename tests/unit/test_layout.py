"""The import direction of ARCHITECTURE §2, checked by walking every module's AST.

flows → engine → connectors; config may be imported by all and imports none of them.
`engine` and `connectors` never import prefect; `flows` never imports a cloud SDK.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SDKS = {"boto3", "botocore", "azure", "paramiko", "s3transfer"}
RULES = {
    "config": {"prefect", "connectors", "engine", "flows"} | SDKS,
    "connectors": {"prefect", "engine", "flows"},
    "engine": {"prefect", "flows"} | SDKS,
    "flows": SDKS | {"connectors"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(RULES))
def test_import_direction(package):
    offenders = {}
    for path in sorted((REPO / package).rglob("*.py")):
        bad = imported_roots(path) & RULES[package]
        if bad:
            offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert not offenders, f"forbidden imports: {offenders}"


def test_no_engine_module_imports_the_run_inside_a_function():
    """A module that needs the run imports it at its top, where a dependency (and a circle) shows."""
    offenders = []
    for path in sorted((REPO / "engine").rglob("*.py")):
        for func in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom) and (
                        (node.level and node.module == "run")
                        or node.module == "engine.run"
                        or (node.module in ("engine", None) and any(a.name == "run" for a in node.names))):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
                elif isinstance(node, ast.Import) and any(a.name == "engine.run" for a in node.names):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"function-local imports of engine.run: {offenders}"
