"""Modules loaded when first used: ``migrate = lazy.module("opslib.migrate")`` at the top of a module names the
dependency as an import does, and loads it at its first attribute.

The runbook registry (:mod:`opslib.workflows`) is read by processes that need only what the runbooks declare:
`opslib run` before it starts the kernel, `opslib runbooks`, the fleet. Its workflow classes use SQLAlchemy and
Alembic in their steps, whose import (0.4-0.5 s) those processes should not pay. A notebook's kernel loads them
all at once, when it starts a run (:func:`opslib.runbook.start`). tests/test_layers.py reads these calls as
imports, so the layering holds for them too.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, cast


class _LazyModule:
    """A stand-in for a module, which imports it (once: Python keeps it in sys.modules) at its first attribute."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<module {self._name!r}, loaded when first used>"


def module(name: str) -> ModuleType:
    """The module ``name``, imported when one of its attributes is first asked for."""
    return cast(ModuleType, _LazyModule(name))
