"""Loading the notebook libraries (papermill, nbformat) without a cost they do not need here.

jsonschema, which nbformat loads to validate notebooks, imports ``rfc3987_syntax`` when it is installed
(JupyterLab's ``lab`` extra brings it) and builds a grammar at import: about 0.6 s on every `opslib run`
and report. The notebook schema has no IRI format for it to check, so it is left out of this process.
"""

from __future__ import annotations

import sys
from types import ModuleType


def _without_iri_grammar() -> None:
    sys.modules.setdefault("rfc3987_syntax", None)  # None in sys.modules: its import fails, jsonschema skips it


def papermill() -> ModuleType:
    """papermill, imported late (it costs about half a second, paid only by the commands that run notebooks)."""
    _without_iri_grammar()
    import papermill as module

    return module


def nbformat() -> ModuleType:
    """nbformat, imported late."""
    _without_iri_grammar()
    import nbformat as module

    return module
