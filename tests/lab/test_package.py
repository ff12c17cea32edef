"""The lab layer is importable without torch (the CLI's --help imports nothing heavy)."""

import importlib


def test_lab_package_docstring_names_its_modules() -> None:
    lab = importlib.import_module("leukotree.lab")
    assert "audit" in lab.__doc__
