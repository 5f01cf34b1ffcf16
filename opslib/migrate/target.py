"""The database and the Alembic project one command or run operates on: :class:`Target`, resolved once.

As Alembic makes one ``Config`` per command and hands it to each verb, opslib makes one Target per command
(the CLI) or run (a runbook's preflight) and hands it to the verbs. It holds what every verb asks first:
the URL (``DATABASE_URL``, else the project's alembic.ini ``sqlalchemy.url``, else the embedded server,
started at most once), the driver the project's env.py is given, the project's script directory, its
version table, and its policy. The URL and the driver are resolved when first asked and kept, so a verb
that needs no database (``opslib heads``) never reaches one; the project's facts are kept per project
(:func:`~opslib.migrate.project.project_for`), and asked again each time so that a revision file written
meanwhile is seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from opslib import db, policy
from opslib.migrate.project import Project, alembic_config, env_driver, project_for
from opslib.migrate.versiontable import version_table


class Target(db.TargetDatabase):
    """One database and the Alembic project that manages it, for one command or run."""

    _driver: str | None = None

    @property
    def alembic_ini(self) -> Path:
        """The project's alembic.ini."""
        return Path(self.settings.alembic_ini)

    @property
    def project(self) -> Project:
        """The project's facts: its script directory and the version tables learned."""
        return project_for(self.settings)

    @property
    def script(self) -> ScriptDirectory:
        """The project's revisions."""
        return self.project.script

    @property
    def driver(self) -> str:
        """The driver the project's env.py is handed (:func:`~opslib.migrate.project.env_driver`), decided once."""
        if self._driver is None:
            self._driver = env_driver(self.settings, alembic_config(self.settings), self.url.drivername)
        return self._driver

    def version_table(self, conn: Connection | None = None) -> tuple[str | None, str]:
        """(schema, table) of the project's version table (see :func:`~opslib.migrate.versiontable.version_table`):
        learned once per project and env.py, and learned again when env.py changes, so it is asked each time."""
        return version_table(self.settings, conn, url=self.url)

    def policy(self, is_lint_rule: Callable[[str], bool] | None = None) -> policy.Policy:
        """The project's policy (its opslib.toml, or ``[tool.opslib]`` in its pyproject.toml)."""
        return policy.load_policy(self.alembic_ini, is_lint_rule)
