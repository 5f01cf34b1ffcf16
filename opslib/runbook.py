"""What a runbook's notebook calls first: ``run = runbook.start("deploy", globals())``.

It validates the parameters (before any connection) and returns the run, an instance of the runbook's
workflow class (see :mod:`opslib.workflows`, one module per runbook), whose methods are the runbook's
steps. How steps are recorded, ordered and sealed is :mod:`opslib.steps`. Nothing here prints a
password: the URL comes from the environment variable the parameters name.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any, Literal, Mapping, overload

# The kernel loads everything its steps use now, before gc.freeze() in start(): the workflow modules name
# these as loaded at first use (opslib.lazy), for the processes that only read the registry.
from opslib import backup, checks, db, history, lint, migrate, rehearse, sealing, seed, workflows  # noqa: F401
from opslib.steps import Run, begin

if TYPE_CHECKING:  # for editors: each runbook's start cell is typed as its own workflow
    from opslib.workflows.deploy import Deploy
    from opslib.workflows.init_prod import InitProd
    from opslib.workflows.recovery import Recovery
    from opslib.workflows.rehearse import Rehearse
    from opslib.workflows.reset import Reset
    from opslib.workflows.rollback import Rollback


@overload
def start(runbook: Literal["deploy"], namespace: Mapping[str, Any]) -> Deploy: ...
@overload
def start(runbook: Literal["rollback"], namespace: Mapping[str, Any]) -> Rollback: ...
@overload
def start(runbook: Literal["recovery"], namespace: Mapping[str, Any]) -> Recovery: ...
@overload
def start(runbook: Literal["reset"], namespace: Mapping[str, Any]) -> Reset: ...
@overload
def start(runbook: Literal["init-prod"], namespace: Mapping[str, Any]) -> InitProd: ...
@overload
def start(runbook: Literal["rehearse"], namespace: Mapping[str, Any]) -> Rehearse: ...
@overload
def start(runbook: str, namespace: Mapping[str, Any]) -> Run: ...


def start(runbook: str, namespace: Mapping[str, Any]) -> Run:
    """Begin a run: validate the parameters found in the notebook's namespace, before any connection.

    Returns the runbook's workflow (a :class:`~opslib.workflows.deploy.Deploy` for "deploy", …).
    Invalid parameters end the run at once (refused, exit 2) with its record written; so does a
    runbook the environment forbids (reset in production, a deploy without backup in production).
    """
    # What the imports made lives as long as the run's process or kernel: moved out of the garbage
    # collector's way, it spares each run several full collections (0.1-0.3 s each).
    gc.freeze()
    workflow = workflows.find(runbook)
    if workflow is None:
        workflow = type("UnknownRunbook", (Run,), {"runbook": runbook, "unknown": workflows.unknown_message(runbook)})
    return begin(runbook, namespace, workflow)
