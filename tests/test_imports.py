"""Dependency direction.

Packages: pacs_node -> unit_model <- train; unit_model is torch + numpy only. Inside pacs_node,
lower rooms never import higher ones: the base modules (config, errors, log, metrics, status,
storage, pynetdicom_compat) import no room; jobs and route (pure) import only the base; receive
uses route and jobs, deliver only the base; work may also use deliver; the shell (cli, node,
http, status_page, demo) sits on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

SHELL = {
    "pacs_node.cli",
    "pacs_node.node",
    "pacs_node.http",
    "pacs_node.status_page",
    "pacs_node.demo",
}
ROOMS = {
    "pacs_node.jobs",
    "pacs_node.route",
    "pacs_node.receive",
    "pacs_node.deliver",
    "pacs_node.work",
}
BASE = ("config", "errors", "log", "metrics", "status", "storage", "pynetdicom_compat")


def _base(name: str) -> str:
    """A base module's place: its file, or its folder where it is a package (config)."""
    return (
        f"pacs_node/{name}.py" if (ROOT / f"pacs_node/{name}.py").exists() else f"pacs_node/{name}"
    )


RULES: dict[str, set[str]] = {
    "unit_model": {"pydicom", "pynetdicom", "sqlalchemy", "pacs_node", "train"},
    "pacs_node": {"train"},
    "pacs_node/jobs": SHELL | ROOMS - {"pacs_node.jobs"},
    "pacs_node/route": SHELL | ROOMS - {"pacs_node.route"},
    "pacs_node/receive": SHELL | {"pacs_node.work", "pacs_node.deliver"},
    "pacs_node/deliver": SHELL | {"pacs_node.work", "pacs_node.receive"},
    "pacs_node/work": SHELL | {"pacs_node.receive"},
    **{_base(name): SHELL | ROOMS for name in BASE},
}


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        # "from pacs_node import http" imports pacs_node.http
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    if (
        isinstance(node, ast.Call)
        and getattr(node.func, "attr", getattr(node.func, "id", ""))
        in ("import_module", "__import__")
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ):
        return [str(node.args[0].value)]
    return []


def violations(where: Path, forbidden: set[str]) -> list[str]:
    """Every import in ``where`` (a package folder or one module) of a module in
    ``forbidden`` or below one."""
    found = []
    files = [where] if where.is_file() else sorted(where.rglob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            for name in _imported(node):
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    rel = path.relative_to(where.parent if where.is_dir() else where.parents[1])
                    found.append(f"{rel}:{node.lineno} imports {name}")
                    break  # one line per import statement
    return found


def test_packages_respect_dependency_direction() -> None:
    for place, forbidden in RULES.items():
        assert (ROOT / place).exists(), place
        assert violations(ROOT / place, forbidden) == []


def test_every_pacs_node_module_is_placed() -> None:
    """A new module must join a room, the base or the shell, so the rules above cover it."""
    placed = {_base(b) for b in BASE} | {f"pacs_node/{s.split('.')[1]}.py" for s in SHELL}
    placed |= {f"pacs_node/{r.split('.')[1]}" for r in ROOMS}
    for path in sorted((ROOT / "pacs_node").iterdir()):
        rel = str(path.relative_to(ROOT))
        if path.suffix == ".py" or (path / "__init__.py").exists():
            assert rel in placed or path.name == "__init__.py", f"{rel} is in no room"


def test_checker_catches_each_form_of_import(tmp_path: Path) -> None:
    pkg = tmp_path / "unit_model"
    pkg.mkdir()
    (pkg / "ok.py").write_text("import torch\nimport numpy as np\nfrom . import ok\n")
    assert violations(pkg, RULES["unit_model"]) == []
    (pkg / "bad.py").write_text(
        "import pydicom\nfrom pynetdicom.sop_class import Verification\n"
        "def f():\n    import sqlalchemy.orm\n    importlib.import_module('train.data')\n"
    )
    found = violations(pkg, RULES["unit_model"])
    assert found == [
        "unit_model/bad.py:1 imports pydicom",
        "unit_model/bad.py:2 imports pynetdicom.sop_class",
        "unit_model/bad.py:4 imports sqlalchemy.orm",
        "unit_model/bad.py:5 imports train.data",
    ]
    jobs = tmp_path / "pacs_node" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "a.py").write_text("from pacs_node import http\nfrom pacs_node.jobs import schema\n")
    (jobs / "b.py").write_text("from pacs_node.work.quality import judge\n")
    assert violations(jobs, RULES["pacs_node/jobs"]) == [
        "jobs/a.py:1 imports pacs_node.http",  # "from pacs_node import http"
        "jobs/b.py:1 imports pacs_node.work.quality",
    ]
