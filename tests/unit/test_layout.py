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


# ---------------------------------------------------------------------------------------------
# No import circle inside a package
# ---------------------------------------------------------------------------------------------


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports, from every import statement of its AST: at
    the top, inside functions, under `if TYPE_CHECKING`, relative or absolute. A function-local
    import defers a dependency, it does not remove it. `from p import name` counts as importing
    the module `p.name` when there is one, else `p`."""
    modules = {module_name(root, p): p for p in sorted((root / package).rglob("*.py"))}

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        found: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {owner(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1] + [node.module or ""]) if node.level else node.module
                base = base.rstrip(".")
                found |= {owner(f"{base}.{a.name}") if f"{base}.{a.name}" in modules else owner(base)
                          for a in node.names}
        graph[mod] = {m for m in found if m is not None and m != mod}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (the strongly
    connected components of more than one module, Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(mod: str) -> None:
        index[mod] = low[mod] = len(index)
        stack.append(mod)
        for dep in sorted(graph[mod]):
            if dep not in index:
                visit(dep)
                low[mod] = min(low[mod], low[dep])
            elif dep in stack:
                low[mod] = min(low[mod], index[dep])
        if low[mod] == index[mod]:
            group = []
            while not group or group[-1] != mod:
                group.append(stack.pop())
            if len(group) > 1:
                circles.append(sorted(group))

    for mod in sorted(graph):
        if mod not in index:
            visit(mod)
    return circles


@pytest.mark.parametrize("package", sorted(RULES))
def test_no_import_circle_inside_a_package(package):
    assert not import_circles(import_graph(REPO, package)), f"modules of {package} importing each other"


def test_a_circle_through_a_function_local_import_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .c import g\n")
    (pkg / "sub" / "c.py").write_text("def g():\n    from .. import a\n")
    (pkg / "leaf.py").write_text("import pkg.a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert import_circles(graph) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]
    (pkg / "sub" / "c.py").write_text("def g():\n    pass\n")
    assert import_circles(import_graph(tmp_path, "pkg")) == []


def test_the_cli_registers_every_subcommand_in_one_place():
    """Only `flows/cli.py` calls the `register` of a command module (no registration chained
    through another command module), and the terminal output the commands share is a leaf."""
    chained = {}
    for path in sorted((REPO / "flows").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and node.module == "flows" for a in node.names}
        calls = {node.func.value.id for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and isinstance(node.func, ast.Attribute) and node.func.attr == "register"
                 and isinstance(node.func.value, ast.Name) and node.func.value.id in modules}
        if calls and path.name != "cli.py":
            chained[path.name] = sorted(calls)
    assert not chained, f"subcommands registered outside flows/cli.py: {chained}"
    assert not imported_roots(REPO / "flows" / "terminal.py") & set(RULES)
