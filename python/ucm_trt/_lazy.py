"""Lazy package exports (PEP 562), shared by the packages whose public names live in heavy modules.

A package lists ``name -> defining module`` and gets a module ``__getattr__`` that imports the
module on first use, plus a ``__dir__`` that shows the lazy names. Imports only ``importlib``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for package ``package`` whose globals are ``namespace``.

    ``exports`` maps each public name to the module that defines it. A resolved name is stored
    in ``namespace``, so later look-ups do not reach ``__getattr__`` again.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
