"""Where the project keeps its revision, and what is recorded there.

The version table is what the project's env.py passes to ``context.configure`` online; opslib
learns it by running env.py with no work (:func:`probe_env`), and keeps the answer on the
:class:`~opslib.migrate.project.Project`.
"""

from __future__ import annotations

import io

from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL, Connection

from opslib import db
from opslib.config import Settings
from opslib.errors import ConfigError
from opslib.migrate.project import OFFLINE_URL, alembic_config, project_for
from opslib.migrate.results import EnvProbe
from opslib.migrate.runtime import _Canceller, _capture_alembic_output, _run_env, _watching, check_same_database


def current_revisions(
    conn: Connection, where: tuple[str | None, str] = db.DEFAULT_VERSION_TABLE
) -> tuple[str, ...]:
    """The revision(s) recorded in the project's version table (see :func:`version_table`); () when at base.

    The read's implicit transaction is committed: the connection may be handed to Alembic next,
    which must find it outside a transaction to run one transaction per revision.
    """
    revs = db.version_revisions(conn, where)
    if conn.in_transaction():
        conn.commit()
    return revs


def probe_env(settings: Settings, url: URL, conn: Connection, *, refuse_other: bool = False) -> EnvProbe:
    """Run the project's env.py online with no work (as ``alembic current`` does, changing nothing:
    no version table is created), and learn what it configures: its version table and the database
    its connection reaches. ``conn`` is opslib's own connection to ``url``, offered to env.py. With
    ``refuse_other``, a connection to another database is :class:`TargetMismatch` (exit 2)."""
    project = project_for(settings)
    script = project.script
    cfg = alembic_config(settings, url=url, connection=conn, output=io.StringIO())
    seen: dict = {}
    key = project.env_key()
    project.version_tables.pop(key, None)  # learned again, from this run

    def note(connection: Connection) -> None:
        seen["url"] = db.redact_url(connection.engine.url)
        seen["reached"] = db.identity(connection)
        if refuse_other and connection is not conn:
            check_same_database(db.identity(conn), url, connection)

    try:
        with _capture_alembic_output():
            _run_env(cfg, project, lambda rev, context: [], canceller=_watching(url, conn), on_connection=note, dont_mutate=True)
    except (ImportError, SyntaxError, NameError) as err:
        raise _unimportable(script, err) from err
    if conn.in_transaction():
        conn.commit()
    found = project.version_tables.setdefault(key, db.DEFAULT_VERSION_TABLE)
    project.remember_version_table(settings, key, found)
    return EnvProbe(found, seen.get("url"), seen.get("reached"))


def _unimportable(script: ScriptDirectory, err: BaseException) -> ConfigError:
    """The error for an env.py that cannot be imported, naming it."""
    lines = str(err).strip().splitlines()
    return ConfigError(
        f"the project's env.py ({script.env_py_location}) cannot be imported: {type(err).__name__}: "
        f"{lines[0] if lines else ''}; fix it (or OPSLIB_ALEMBIC_INI) first"
    )


def version_table(settings: Settings, conn: Connection | None = None, *, url: URL | None = None) -> tuple[str | None, str]:
    """(schema, table) of the project's version table: what its env.py passes to ``context.configure``
    online (``version_table_schema``, ``version_table``), else Alembic's ``alembic_version`` on the search_path.

    Known from any online run of env.py in this process, else from the state folder (kept there per
    project and env.py content), else learned now: env.py is run online with no work on ``conn`` (or a
    connection to the target, at ``url`` when it was resolved already). Only when env.py cannot run online
    is its offline branch asked.
    """
    project = project_for(settings)
    script = project.script
    known = project.known_version_table(settings)
    if known is not None:
        return known
    try:
        url = url or db.target_url(settings)
        if conn is not None:
            return probe_env(settings, url, conn).version_table
        with db.connect(url) as own:
            return probe_env(settings, url, own).version_table
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - env.py cannot run online here (the server is out of reach, say)
        pass
    cfg = alembic_config(settings, url=OFFLINE_URL, output=io.StringIO())
    try:
        with _capture_alembic_output():
            # No session to cancel offline; an env.py that connects anyway is cancelled as an upgrade is.
            _run_env(cfg, project, lambda rev, context: [], as_sql=True, canceller=_Canceller(None))
    except (ImportError, SyntaxError, NameError) as err:
        # env.py cannot even be imported: nothing will run, so say so now, before any backup or change.
        raise _unimportable(script, err) from err
    except Exception:  # noqa: BLE001 - an env.py that cannot run offline: Alembic's default is the answer
        pass
    # Not kept: the offline branch may leave out what the online one configures.
    return db.DEFAULT_VERSION_TABLE
