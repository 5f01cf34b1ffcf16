"""The runbook registry: one module per runbook, each holding its workflow class.

A workflow class (a :class:`~opslib.workflows.workflow.Workflow`) declares all there is to know of its
runbook, in one place: its name and one-line purpose (``runbook``, ``about``), its parameters
(``parameters``) and the rules across them (``check_values``), whether it changes the target database
(``changes_database``), whether its production runs are expected to take a verified backup and end with a
verify step (``backup_gated``: the safeguards flag a run that went without; the ``backup`` parameter's
production rule enforces the backup itself), whether production allows it at all (``allowed_in_production``), and its step
methods in order (``steps``). The help of `opslib run` and `opslib open`, `opslib runbooks`, the
runner, the fleet and the records read it from here.

Adding a runbook is one module here (or, for a project's own runbooks, a module named in the
environment variable ``OPSLIB_RUNBOOK_MODULES``, comma-separated) and its notebook in the runbooks
folder (``OPSLIB_RUNBOOKS_DIR``).
"""

from __future__ import annotations

import importlib
import os
import pkgutil

from opslib.errors import ConfigError, InvalidInput
from opslib.workflows.workflow import Workflow

MODULES_ENV = "OPSLIB_RUNBOOK_MODULES"

_FOUND: dict[str, type[Workflow]] | None = None


def _modules() -> list[tuple[str, str]]:
    """(module, where it was named) of the modules that hold runbooks: this package's own, then the project's."""
    own = [(f"{__name__}.{m.name}", "opslib") for m in pkgutil.iter_modules(__path__) if m.name != "workflow"]
    given = os.environ.get(MODULES_ENV, "").split(",")
    return own + [(m.strip(), MODULES_ENV) for m in given if m.strip()]


def _workflows_in(module_name: str, where: str) -> list[type[Workflow]]:
    """The workflow classes ``module_name`` declares itself (a class it imports, or inherits a name from, is not
    one of its runbooks)."""
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 -- any error importing a runbook module is configuration
        raise ConfigError(f"{where}: the runbook module {module_name} cannot be imported: {err}") from err
    return [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, Workflow)
        and value.__module__ == module_name
        and "runbook" in vars(value)
    ]


def registry() -> dict[str, type[Workflow]]:
    """Every runbook by name: opslib's own in the guide's order (``listed``), then the project's by name. Found
    once per process; two modules declaring one name is a :class:`ConfigError` (a project's module never
    replaces one of opslib's runbooks in silence)."""
    global _FOUND  # noqa: PLW0603 -- the modules are imported once; the registry is what they declare
    if _FOUND is None:
        found: dict[str, type[Workflow]] = {}
        for module_name, where in _modules():
            for workflow in _workflows_in(module_name, where):
                if workflow.runbook in found:
                    raise ConfigError(
                        f"{where}: runbook {workflow.runbook!r} is declared by both {found[workflow.runbook].__module__} "
                        f"and {module_name}: give the project's runbook a name of its own"
                    )
                found[workflow.runbook] = workflow
        _FOUND = dict(sorted(found.items(), key=lambda item: (item[1].listed, item[0])))
    return _FOUND


def names() -> list[str]:
    """The runbooks' names, in the registry's order."""
    return list(registry())


def find(name: str) -> type[Workflow] | None:
    """The workflow of the runbook called ``name``, or None."""
    return registry().get(name)


def get(name: str) -> type[Workflow]:
    """The workflow of the runbook called ``name``; an unknown name is refused (exit 2), naming the runbooks."""
    found = find(name)
    if found is None:
        raise InvalidInput(unknown_message(name))
    return found


def unknown_message(name: str) -> str:
    """The one line that refuses a runbook name no module declares."""
    return f"no runbook {name!r}: the runbooks are {', '.join(names())}"
