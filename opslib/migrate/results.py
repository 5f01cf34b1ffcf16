"""What the migration verbs return, and the callbacks they report through: plain frozen records.

The lowest layer of :mod:`opslib.migrate`: it imports no other part of it, so every other part can
use these shapes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

from opslib import db

# (revision, seconds it took, when it started as a Unix time): called once it is known to have committed.
StepCallback = Callable[["RevisionInfo", float, float], None]
LocksCallback = Callable[[str, "list[db.RelationLock]"], None]
# (what was being done, attempt number, why it gave up): one call per attempt that hit the lock timeout.
AttemptCallback = Callable[[str, int, str], None]


@dataclass(frozen=True)
class RevisionInfo:
    """One revision of the chain, as the operator needs to see it."""

    revision: str
    down_revisions: tuple[str, ...]
    message: str
    is_head: bool
    is_merge: bool
    branch_labels: tuple[str, ...]
    path: str
    doc: str

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Status:
    """Where the database stands against the chain."""

    database: str
    current: tuple[str, ...]
    heads: tuple[str, ...]
    pending: tuple[RevisionInfo, ...]

    @property
    def at_head(self) -> bool:
        """True when the database is at every head of the chain (nothing pending)."""
        return set(self.current) == set(self.heads)

    def to_dict(self) -> dict:
        """A JSON-ready dict with ``current``, ``heads``, ``pending`` and ``at_head``."""
        return {
            "database": self.database,
            "current": list(self.current),
            "heads": list(self.heads),
            "pending": [{"revision": r.revision, "message": r.message} for r in self.pending],
            "at_head": self.at_head,
        }


@dataclass(frozen=True)
class MigrationResult:
    """What a verb that changes the database did."""

    action: str
    target: str
    database: str
    before: tuple[str, ...]
    after: tuple[str, ...]
    steps: tuple[RevisionInfo, ...] = field(default=())
    output: str = ""  # what the project's env.py and revisions printed or logged

    @property
    def changed(self) -> bool:
        """True when the database's revision moved."""
        return set(self.before) != set(self.after)

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {
            "action": self.action,
            "target": self.target,
            "database": self.database,
            "before": list(self.before),
            "after": list(self.after),
            "steps": [{"revision": r.revision, "message": r.message} for r in self.steps],
            "changed": self.changed,
        }


@dataclass(frozen=True)
class EnvProbe:
    """What the project's env.py does online, learned from a run of it that does no work."""

    version_table: tuple[str | None, str]
    url: str | None  # the URL of the connection env.py configured, redacted; None when it gave none
    reached: db.DatabaseIdentity | None  # the database that connection reaches


@dataclass(frozen=True)
class OfflineSQL:
    """A range rendered offline: the SQL, and the revisions that could not be rendered, with why."""

    sql: str
    unrendered: tuple[tuple[str, str], ...] = ()
    # Where the first unrendered revision starts: the revision(s) before it, fully rendered ("" at base).
    stopped_after: str | None = None
