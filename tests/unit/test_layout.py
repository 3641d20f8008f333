"""The import direction of ARCHITECTURE §2, checked by walking every module's AST.

flows → engine → connectors; config may be imported by all and imports none of them.
`engine` and `connectors` never import prefect; `flows` never imports a cloud SDK. The lab's data
(`lab`) may use config, connectors and engine, never prefect, the flows or an SDK directly; nothing
but the flows uses it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SDKS = {"boto3", "botocore", "azure", "paramiko", "s3transfer"}
RULES = {
    "config": {"prefect", "connectors", "engine", "flows", "lab"} | SDKS,
    "connectors": {"prefect", "engine", "flows", "lab"},
    "engine": {"prefect", "flows", "lab"} | SDKS,
    "flows": SDKS | {"connectors"},
    "lab": {"prefect", "flows"} | SDKS,
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
