"""Packaging: every package folder is listed in pyproject, and maps to its import name."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"tools": "hessc", "ir": "hessc.ir", "passes": "hessc.passes", "runtime": "hessc.runtime"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed() -> None:
    setuptools = _pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == {name: folder for folder, name in FOLDERS.items()}
    found = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *relative)))
    assert found == set(setuptools["packages"]), "add new package folders to [tool.setuptools] packages"


def test_no_bare_imports_of_the_folders() -> None:
    """Code imports ``hessc.ir``, never a bare ``ir`` / ``passes`` / ``runtime`` / ``tools``."""
    offenders = []
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                stripped = line.strip()
                for bare in FOLDERS:
                    if stripped.startswith((f"import {bare}", f"from {bare} ", f"from {bare}.")):
                        offenders.append(f"{path.relative_to(ROOT)}:{number}: {stripped}")
    assert not offenders, offenders


def test_dependencies_have_lower_bounds() -> None:
    deps = _pyproject()["project"]["dependencies"]
    for name in ("torch", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "numpy", "networkx"):
        spec = next((d for d in deps if d.split(">")[0].split("=")[0].strip() == name), None)
        assert spec is not None and ">=" in spec, f"{name} needs a lower bound in pyproject"
