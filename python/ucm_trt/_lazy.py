"""Lazy package exports (PEP 562), shared by the packages whose public names live in heavy modules.

A package lists, per defining module, the public names it re-exports, and gets a module
``__getattr__`` that imports the module on first use plus a ``__dir__`` that shows the lazy names.
Imports only ``importlib``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, modules: Mapping[str, Sequence[str]], namespace: dict[str, Any]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``(names, __getattr__, __dir__)`` for package ``package`` whose globals are ``namespace``.

    ``modules`` maps each defining module to the public names taken from it; ``names`` lists them
    in that order. A resolved name is stored in ``namespace``, so later look-ups do not reach
    ``__getattr__`` again.
    """
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in where:
            value = getattr(importlib.import_module(where[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return list(where), __getattr__, __dir__
