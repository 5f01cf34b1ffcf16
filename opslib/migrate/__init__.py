"""Alembic verbs that return data instead of printing.

Modelled on ``alembic/command.py``: each verb is a thin function over Config -> ScriptDirectory ->
EnvironmentContext. The Alembic project is whatever ``Settings.alembic_ini`` points at, so any
Alembic project on PostgreSQL works. Verbs that change the database run on one connection that
holds the opslib advisory lock; that connection is handed to the project's ``env.py`` through
``config.attributes["connection"]`` (an env.py that opens its own connection from
``sqlalchemy.url`` gets the same URL, in memory only).

Errors from Alembic and the driver are turned into :mod:`opslib.errors` here, each saying where the
database now stands.

The package is split as Alembic splits command, runtime and script; each module imports only those
listed before it (and lower opslib modules), never this one:

- :mod:`~opslib.migrate.results`: the records the verbs return (RevisionInfo, Status, MigrationResult, ...);
- :mod:`~opslib.migrate.project`: the Alembic project and what this process knows of it (:class:`Project`);
- :mod:`~opslib.migrate.revisions`: questions about the chain, answered from the loaded scripts;
- :mod:`~opslib.migrate.guards`: the invalid-index guard, the lock timeout and its retries;
- :mod:`~opslib.migrate.runtime`: running env.py in a worker thread, cancellation, session terms, progress;
- :mod:`~opslib.migrate.versiontable`: where the project keeps its revision, and what is recorded there;
- :mod:`~opslib.migrate.change`: one change to the database, under the lock, and its failure told;
- :mod:`~opslib.migrate.offline`: the SQL rendered offline;
- :mod:`~opslib.migrate.planning`: what a change would do (plan, deploy_plan, DeployPlan);
- :mod:`~opslib.migrate.verbs`: the verbs themselves.

Every name is re-exported here, so ``from opslib import migrate; migrate.upgrade(...)`` works. A
test that patches a module-level setting must patch the module that reads it (``RECONNECT_S`` is
read in :mod:`~opslib.migrate.change`).
"""

from __future__ import annotations

from opslib.migrate.results import (
    AttemptCallback,
    EnvProbe,
    LocksCallback,
    MigrationResult,
    OfflineSQL,
    RevisionInfo,
    Status,
    StepCallback,
)
from opslib.migrate.project import (
    OFFLINE_URL,
    Project,
    alembic_config,
    project_for,
    script_directory,
    table_name,
)
from opslib.migrate.revisions import _info as _info  # used by opslib.branch
from opslib.migrate.revisions import resolve
from opslib.migrate.runtime import check_same_database
from opslib.migrate.versiontable import current_revisions, probe_env, version_table
from opslib.migrate.target import Target
from opslib.migrate.change import RECONNECT_S
from opslib.migrate.offline import RUNNING_MARKER, offline_sql, render_pending, script_sql
from opslib.migrate.planning import DeployPlan, deploy_plan, has_real_downgrade, plan
from opslib.migrate.verbs import (
    compare_models,
    downgrade,
    heads,
    history,
    merge,
    revision,
    revisions_now,
    show,
    stamp,
    status,
    upgrade,
)

__all__ = [
    "OFFLINE_URL",
    "RECONNECT_S",
    "RUNNING_MARKER",
    "AttemptCallback",
    "DeployPlan",
    "EnvProbe",
    "LocksCallback",
    "MigrationResult",
    "OfflineSQL",
    "Project",
    "RevisionInfo",
    "Status",
    "StepCallback",
    "Target",
    "alembic_config",
    "check_same_database",
    "compare_models",
    "current_revisions",
    "deploy_plan",
    "downgrade",
    "has_real_downgrade",
    "heads",
    "history",
    "merge",
    "offline_sql",
    "plan",
    "probe_env",
    "project_for",
    "render_pending",
    "resolve",
    "revision",
    "revisions_now",
    "script_directory",
    "script_sql",
    "show",
    "stamp",
    "status",
    "table_name",
    "upgrade",
    "version_table",
]
