"""Names a package re-exports from its modules, each module imported on first use (PEP 562), so that
importing the package, or a torch-free module of it, imports nothing heavy."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, homes: dict[str, tuple[str, ...]]) -> tuple[list[str], Callable[[str], object]]:
    """(`__all__`, `__getattr__`) for `package` re-exporting each name of homes[module] from `.module`."""
    home = {name: module for module, names in homes.items() for name in names}

    def __getattr__(name: str):
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{home[name]}", package), name)

    return list(home), __getattr__
