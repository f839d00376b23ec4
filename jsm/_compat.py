"""Old names that moved: each still works, with a DeprecationWarning that names its new home.

A module that lost names sets `__getattr__ = moved(__name__, {"old": "jsm.new_module.new"})`;
Python calls it only for names the module no longer defines. CHANGELOG.md lists every move.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

__all__ = ["moved"]


def moved(module: str, new_homes: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` resolving each old name to "package.module.name", with a warning."""

    def __getattr__(name: str):
        if name not in new_homes:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        home, _, attr = new_homes[name].rpartition(".")
        warnings.warn(f"{module}.{name} moved to {home}.{attr}; the old name will be removed", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(home), attr)

    return __getattr__
