"""Dependency direction: pacs_node -> unit_model <- train; unit_model is torch + numpy only."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

RULES = {
    "unit_model": {"pydicom", "pynetdicom", "sqlalchemy", "pacs_node", "train"},
    "pacs_node": {"train"},
}


def violations(package_dir: Path, forbidden: set[str]) -> list[str]:
    """Every import under ``package_dir`` of a top-level module in ``forbidden``."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", ""))
                in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names = [str(node.args[0].value)]
            else:
                continue
            for name in names:
                if name.split(".")[0] in forbidden:
                    found.append(
                        f"{path.relative_to(package_dir.parent)}:{node.lineno} imports {name}"
                    )
    return found


def test_packages_respect_dependency_direction() -> None:
    for package, forbidden in RULES.items():
        assert violations(ROOT / package, forbidden) == []


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
