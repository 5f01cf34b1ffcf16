"""What is done with a recovered server once it compared equal to its restore point: put its data folder in
place of the embedded server's, or copy its database into a new one on the target's server.

Putting it in place recovers the whole server, every database on it, so it is refused while the server
holds another database than the target (:func:`other_databases`). The swap (stop, two renames, start) runs
with SIGINT and SIGTERM noted, not raised: a signal waits until the server runs again, on one folder or the
other, and the caller says which. If the recovered folder does not start, the original is put back and
started, and the recovered one is kept beside it for inspection.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from opslib import db, embedded, pgtools
from opslib.backup.pitr import StagingServer
from opslib.config import Settings
from opslib.errors import BackupFailed, PreconditionFailed
from opslib.signals import signals_noted

# Databases every server has: recovering the server in place takes them back too, which is harmless.
_EVERY_SERVERS = ("postgres", "template0", "template1")


def other_databases(target: db.TargetDatabase) -> list[str]:
    """The databases of the target's server besides the target and the server's own: a recovery in place
    would take them back to the point too."""
    with db.connect(target.url) as conn:
        names = conn.execute(sa.text("SELECT datname FROM pg_database ORDER BY 1")).scalars().all()
    return [n for n in names if n not in (*_EVERY_SERVERS, target.url.database)]


@dataclass(frozen=True)
class Swapped:
    """A recovered data folder put in place: where the replaced one is kept, and the signal that arrived
    during the swap (raised by the caller once it has recorded the swap), if any."""

    kept: Path
    signal: int | None = None


def put_in_place(settings: Settings, staging: StagingServer, run_id: str) -> Swapped:
    """Put the recovered data folder in place of the embedded server's: stop both, swap the folders, start
    the server on it. The replaced folder is kept (``pgdata.replaced-<run id>``); if the recovered one does
    not start, or anything stops the swap, the original is put back and started (:class:`BackupFailed`)."""
    if not embedded.is_target(settings):
        raise PreconditionFailed(
            "in place: opslib stops and swaps only the embedded server's data folder; use apply=new_database"
        )
    pgdata = embedded.pgdata_dir(settings)
    kept = pgdata.with_name(f"pgdata.replaced-{run_id}")
    with signals_noted() as caught:
        staging.stop("fast")  # a clean shutdown: the server starts without crash recovery
        embedded.stop(settings)
        pgdata.rename(kept)
        try:
            staging.pgdata.rename(pgdata)
            embedded.start(settings, archive=False)
        except BaseException as err:  # noqa: BLE001 - whatever stopped the swap, the original goes back
            _put_back(settings, pgdata, kept, run_id, err)
    return Swapped(kept, caught[0] if caught else None)


def _put_back(settings: Settings, pgdata: Path, kept: Path, run_id: str, err: BaseException) -> None:
    failed = pgdata.with_name(f"pgdata.failed-{run_id}")
    if pgdata.exists():
        pgdata.rename(failed)
    kept.rename(pgdata)
    why = getattr(err, "message", None) or f"{type(err).__name__}: {err}"
    try:
        embedded.start(settings, archive=False)
    except Exception as again:  # noqa: BLE001 - said, with where each folder is
        raise BackupFailed(
            f"the recovered data folder was not put in place ({why}); the original is back in {pgdata} but did "
            f"not start: {getattr(again, 'message', again)}; the recovered one is kept as {failed}"
        ) from err
    raise BackupFailed(
        f"the recovered data folder did not start in place ({why}); the original was put back and runs; "
        f"the recovered one is kept as {failed}"
    ) from err


def check_new_database(target: db.TargetDatabase, name: str) -> str:
    """A name for the recovered copy that is valid and free on the target's server, else refused."""
    db.check_database_name(name)
    with db.connect_autocommit(db.maintenance_url(target.url)) as admin:
        if db.database_exists(admin, name):
            raise PreconditionFailed(f"a database named {name!r} exists already: choose another new_database")
    return name


def copy_as_new_database(target: db.TargetDatabase, staging: StagingServer, name: str, major: int) -> str:
    """Copy the recovered database into a new database ``name`` on the target's server (pg_dump of the
    recovered server, pg_restore into it); the target itself is not touched."""
    source = staging.url(target.url)
    dump = staging.root / "recovered.dump"
    dumped = subprocess.run(
        [pgtools.pg_dump_for(major).path, "-Fc", "-f", str(dump)],
        env=pgtools.libpq_env(source),
        capture_output=True,
        text=True,
        **pgtools.child_options(),
    )
    if dumped.returncode != 0:
        raise BackupFailed(f"pg_dump of the recovered database failed: {_last(dumped.stderr)}")
    check_new_database(target, name)
    with db.connect_autocommit(db.maintenance_url(target.url)) as admin:
        admin.execute(sa.text(f"CREATE DATABASE {db.quote_ident(admin, name)}"))
    restored = subprocess.run(
        [pgtools.pg_restore_for(major).path, "--exit-on-error", "-d", name, str(dump)],
        env=pgtools.libpq_env(target.url.set(database=name)),
        capture_output=True,
        text=True,
        **pgtools.child_options(),
    )
    dump.unlink(missing_ok=True)
    if restored.returncode != 0:
        raise BackupFailed(f"pg_restore into {name} failed: {_last(restored.stderr)}; {name} is left for inspection")
    return name


def _last(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no message"
