"""What an upgrade or downgrade would do, worked out before anything changes.

:func:`plan` and :func:`deploy_plan` read where the database stands and list the revisions a change
would pass through, raising as the change itself would; the changing verbs plan with the same
functions (:func:`_plan_upgrade`, :func:`_plan_downgrade`) before they begin.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from alembic.script import Script, ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError

from opslib import db
from opslib.config import Settings
from opslib.errors import PreconditionFailed, UnknownRevision
from opslib.migrate.offline import render_pending
from opslib.migrate.results import OfflineSQL, RevisionInfo
from opslib.migrate.revisions import (
    _applied_set,
    _between,
    _check_revision_text,
    _describe,
    _downgrade_path,
    _info,
    _pending,
    _upgrade_path,
    resolve,
)
from opslib.migrate.target import Target
from opslib.migrate.versiontable import current_revisions


def _steps(rel: str) -> int:
    """The N of a relative target (``+N``, ``-N``), refused unless it is a whole number of at least 1."""
    try:
        n = int(rel[1:])
    except ValueError:
        raise UnknownRevision(f"{rel!r} is not a relative revision: use {rel[0]}1, {rel[0]}2, …") from None
    if n < 1:
        raise UnknownRevision(f"{rel!r}: the number of steps must be at least 1")
    return n


def _plan_upgrade(script: ScriptDirectory, current: tuple[str, ...], target: str) -> list[Script]:
    """The revisions an upgrade to ``target`` applies, oldest first; raises before any change when it cannot."""
    if target.startswith("+"):
        pending = _upgrade_path(script, tuple(script.get_heads()), current)
        n = _steps(target)
        if n > len(pending):
            raise PreconditionFailed(f"cannot upgrade {target}: only {len(pending)} revision(s) pending")
        return pending[:n]
    upper = tuple(s.revision for s in resolve(script, target))
    try:
        steps = _upgrade_path(script, upper, current)
    except (RevisionError, CommandError):
        steps = None
    # Alembic's walk to a revision already passed is empty, as it is to the current one: only the
    # latter is "nothing to do".
    below = _applied_set(script, current) - set(current)
    if steps is None or (not steps and set(upper) <= below):
        raise UnknownRevision(
            f"{target!r} is not ahead of the database's revision {_describe(current)}: "
            "use `opslib downgrade` to go back"
        )
    return steps


def _plan_downgrade(script: ScriptDirectory, current: tuple[str, ...], target: str) -> list[Script]:
    """The revisions a downgrade to ``target`` reverses, newest first; raises before any change when it cannot."""
    if not current:
        raise PreconditionFailed("nothing to roll back: the database is at base (no revision applied)")
    applied = list(reversed(_between(script, current, ())))  # newest first
    if target.startswith("-"):
        n = _steps(target)
        if len(current) > 1:
            raise PreconditionFailed(
                f"the database is at several heads ({', '.join(current)}): downgrade to a revision id"
            )
        if n > len(applied):
            raise PreconditionFailed(f"cannot downgrade {target}: only {len(applied)} revision(s) applied")
        try:
            return _downgrade_path(script, target, current)
        except (RevisionError, CommandError) as err:
            raise UnknownRevision(
                f"downgrade {target}: {err} (Alembic's walk); the database is unchanged at {_describe(current)}: "
                "downgrade to a revision id"
            ) from None
    if target == "base":
        return _downgrade_path(script, "base", current)
    lower = resolve(script, target)
    lower_ids = {s.revision for s in lower}
    if not lower_ids <= {s.revision for s in applied}:
        raise UnknownRevision(
            f"{target!r} is not behind the database's revision {_describe(current)}: "
            "use `opslib upgrade` to go forward"
        )
    try:
        return _downgrade_path(script, target, current)
    except (RevisionError, CommandError) as err:
        raise UnknownRevision(f"cannot downgrade to {target!r} from {_describe(current)}: {err}") from None


def plan(target: Settings | Target, action: str, revision: str) -> tuple[tuple[str, ...], list[RevisionInfo]]:
    """What ``upgrade`` or ``downgrade`` of ``target`` to ``revision`` would do now: the current revisions and
    the steps.

    Reads only; raises as the verb itself would (unknown revision, nothing to roll back, ...).
    """
    revision = _check_revision_text(revision, "target revision")
    target = Target.of(target)
    script, url = target.script, target.url
    with db.connect(url) as conn:
        current = current_revisions(conn, target.version_table(conn))
    _pending(script, current, db.redact_url(url))
    steps = (_plan_upgrade if action == "upgrade" else _plan_downgrade)(script, current, revision)
    head_ids = set(script.get_heads())
    return current, [_info(s, head_ids) for s in steps]


@dataclass(frozen=True)
class DeployPlan:
    """What a deploy to ``target`` does, worked out once: its checks judge it and its steps reuse it."""

    database: str
    target: str
    current: tuple[str, ...]
    heads: tuple[str, ...]
    pending: tuple[RevisionInfo, ...]
    sql: OfflineSQL = field(default_factory=lambda: OfflineSQL(""))

    @property
    def last(self) -> str | None:
        """The revision the deploy ends at, or None when nothing is pending."""
        return self.pending[-1].revision if self.pending else None


def deploy_plan(target: Settings | Target, revision: str = "head", *, x_args: Sequence[str] = ()) -> DeployPlan:
    """Read where ``target`` stands and plan an upgrade to ``revision``, with its SQL rendered offline.

    Reads only; raises as :func:`upgrade` would (unknown revision, a database ahead of the code).
    """
    revision = _check_revision_text(revision, "target revision")
    target = Target.of(target)
    script, url = target.script, target.url
    with db.connect(url) as conn:
        current = current_revisions(conn, target.version_table(conn))
    database = db.redact_url(url)
    _pending(script, current, database)
    head_ids = set(script.get_heads())
    pending = tuple(_info(s, head_ids) for s in _plan_upgrade(script, current, revision))
    plan_ = DeployPlan(database, revision, current, tuple(sorted(head_ids)), pending)
    if not pending:
        return plan_
    return replace(plan_, sql=render_pending(target.settings, current, pending[-1].revision, x_args=x_args))


def has_real_downgrade(info: RevisionInfo) -> bool:
    """False when a revision's downgrade() does nothing (only ``pass``, ``...`` or a docstring) or just raises."""
    try:
        tree = ast.parse(Path(info.path).read_text())
    except (OSError, SyntaxError):
        return True  # cannot tell: let Alembic try, and report what happens
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "downgrade":
            body = [
                stmt
                for stmt in node.body
                if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))
                and not isinstance(stmt, ast.Pass)
            ]
            return bool(body) and not all(isinstance(stmt, ast.Raise) for stmt in body)
    return False
