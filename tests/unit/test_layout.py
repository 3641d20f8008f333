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


# The state database has one owner: `engine/state` defines every table and runs every query;
# `engine/project` opens the store and holds the PostgreSQL advisory lock on its own connection.
STATE_OWNERS = {"engine/state", "engine/project.py"}


def _owned_by_state(path: Path) -> bool:
    rel = path.relative_to(REPO).as_posix()
    return any(rel == owner or rel.startswith(owner + "/") for owner in STATE_OWNERS)


def test_only_the_state_package_queries_the_state_database():
    offenders = {}
    for package in ("config", "connectors", "engine", "flows"):
        for path in sorted((REPO / package).rglob("*.py")):
            if _owned_by_state(path):
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            found = set()
            if "sqlalchemy" in imported_roots(path):
                found.add("imports sqlalchemy")
            if any(isinstance(node, ast.Attribute) and node.attr == "engine" for node in ast.walk(tree)):
                found.add("reads a store's `.engine`")
            if found:
                offenders[str(path.relative_to(REPO))] = sorted(found)
    assert not offenders, f"state queries outside engine/state: {offenders}"


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
