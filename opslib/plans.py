"""A deploy's plan as the target and the project stand now (:class:`opslib.approval.Plan`), to approve or to
hold a run to.

:func:`plan_of` reads the target's identity (system identifier, database, revisions) and hashes what would
run: each pending revision's file, the SQL they render offline (with, for a revision that cannot render
offline, its source instead), env.py and the project's policy file. ``opslib plan`` writes it; a deploy
given an approved plan makes it again at preflight, from the plan its checks already made, and compares.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

from opslib import db
from opslib.approval import UNBOUND_PARAMETERS, Plan, PlannedRevision, PlanTarget, file_sha256
from opslib.migrate import DeployPlan, Target, deploy_plan
from opslib.policy import load_approval_policy, policy_file


def plan_of(target: Target, revision: str, parameters: Mapping[str, Any], *, env: str, author: str,
            created_at: str, author_principal: str | None = None, planned: DeployPlan | None = None) -> Plan:  # fmt: skip
    """The plan of a deploy of ``target`` to ``revision`` with ``parameters`` (a runbook's values), as things
    stand now. ``planned`` is the deploy plan a run's checks already made (its SQL rendered); without it,
    it is made here. Reads only."""
    if planned is None:
        planned = deploy_plan(target, revision, x_args=["dev_data=true"] if parameters.get("dev_data") else [])
    url = target.url
    with db.connect(url) as conn:
        system_id = db.system_identifier(conn)
    folder = Path(target.alembic_ini).resolve().parent
    pending = tuple(
        PlannedRevision(r.revision, _shown_path(r.path, folder), file_sha256(Path(r.path))) for r in planned.pending
    )
    sql_sha256, sql_source = _sql_digest(planned)
    policy_path, _ = policy_file(target.alembic_ini)
    return Plan(
        runbook="deploy",
        env=env,
        created_at=created_at,
        author=author,
        author_principal=author_principal,
        target=PlanTarget(system_id, url.database or "", url.host or url.query.get("host"), url.port, tuple(planned.current)),
        target_revision=revision,
        pending=pending,
        sql_sha256=sql_sha256,
        sql_source=sql_source,
        env_py_sha256=file_sha256(Path(target.script.dir) / "env.py"),
        policy_sha256=file_sha256(policy_path),
        signers_sha256=file_sha256(load_approval_policy(target.alembic_ini).signers_file),
        parameters={k: v for k, v in parameters.items() if k not in UNBOUND_PARAMETERS},
    )


def _sql_digest(planned: DeployPlan) -> tuple[str, str]:
    """The sha256 of the exact SQL a deploy runs: the offline render, and for each revision that cannot
    render offline (it reads the database, say) its source, since that is what will run."""
    digest = hashlib.sha256((planned.sql.sql or "").encode())
    unrendered = [revision for revision, _ in planned.sql.unrendered]
    paths = {r.revision: r.path for r in planned.pending}
    for revision in unrendered:
        digest.update(f"\n-- source of {revision}\n".encode())
        digest.update(Path(paths[revision]).read_bytes() if revision in paths else b"")
    if not planned.pending:
        return digest.hexdigest(), "nothing to apply"
    if unrendered:
        return digest.hexdigest(), f"offline SQL, and the sources of {len(unrendered)} revision(s) that cannot render offline"
    return digest.hexdigest(), "offline SQL"


def _shown_path(path: str, folder: Path) -> str:
    """A revision's file relative to the project's folder (the same on the approver's and the operator's machine)."""
    try:
        return str(Path(path).resolve().relative_to(folder))
    except ValueError:
        return str(path)
