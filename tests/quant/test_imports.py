"""The quant package depends only on graph/, runtime/, metrics, errors and itself; rules.py on
numpy alone."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "lrt_deploy"
ALLOWED = ("lrt_deploy.quant", "lrt_deploy.graph", "lrt_deploy.runtime", "lrt_deploy.errors",
           "lrt_deploy.metrics", "lrt_deploy._logs")


def _imports_of(source: str, package: str) -> set[str]:
    """Every module ``source`` (in ``package``) imports, at any depth, relative ones resolved."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            else:
                found.add(node.module or "")
    return found


def _imports(path: Path) -> set[str]:
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    return _imports_of(path.read_text(), package)


def test_quant_imports_no_later_stage() -> None:
    files = sorted((PACKAGE / "quant").rglob("*.py"))
    assert files
    wrong = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in files for name in _imports(path)
        if name.split(".")[0] == "lrt_deploy" and not name.startswith(ALLOWED)
        and name != "lrt_deploy"
    }
    assert not wrong, f"quant/ must not import compress, export or later stages: {wrong}"


def test_graph_helpers_import_nothing_else_of_the_package() -> None:
    for path in sorted((PACKAGE / "graph").rglob("*.py")):
        for name in _imports(path):
            assert name.split(".")[0] != "lrt_deploy" or name.startswith(
                ("lrt_deploy.graph", "lrt_deploy.errors")), f"{path.name} imports {name}"


def test_rules_import_numpy_only() -> None:
    names = {name.split(".")[0] for name in _imports(PACKAGE / "quant" / "rules.py")}
    assert names <= {"__future__", "numpy"}, names


def test_the_check_sees_relative_and_nested_imports() -> None:
    source = ("from ..compress import x\nfrom . import rules\n"
              "def f():\n    import lrt_deploy.export\n")
    assert _imports_of(source, "lrt_deploy.quant.passes") == {
        "lrt_deploy.quant.compress", "lrt_deploy.quant.passes", "lrt_deploy.export"}
    assert _imports_of("from ...compress import x", "lrt_deploy.quant.passes") == {
        "lrt_deploy.compress"}
