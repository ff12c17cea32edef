"""Optional dependencies: one import helper, one install hint.

The core install is lean; extras add what a feature needs (``onnx``, ``explain``,
or ``all``). Every optional import goes through :func:`require`, so a missing
package always ends in the same clear message::

    Heat maps need the 'pytorch_grad_cam' package: pip install 'leukotree[explain]'.
"""

from __future__ import annotations

import importlib
from importlib.util import find_spec
from types import ModuleType

from leukotree.errors import MissingDependencyError


def install_hint(extra: str) -> str:
    """The pip command that installs ``extra``."""
    return f"pip install 'leukotree[{extra}]'"


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra to install.

    ``purpose`` starts the message ("ONNX export", "Heat maps"...).
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise MissingDependencyError(
            f"{purpose} needs the '{top}' package: {install_hint(extra)}.") from None


def available(*modules: str) -> bool:
    """True when every module can be imported (without importing it)."""
    return all(find_spec(m) is not None for m in modules)
