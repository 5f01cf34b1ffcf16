"""What several commands share: sealing abandoned runs before a command, the databases an audit
cross-checks, and the moment a command's outcome is known."""

from __future__ import annotations

import argparse
import signal
import sys

from opslib.outcome import Outcome
from opslib.record import revisions_text

EXIT_OK = Outcome.SUCCEEDED.exit_code

_CONSOLE = [False]  # run as the console script (not called in-process, by tests or another program)


def outcome_known() -> None:
    """From the moment the command's outcome is decided, the console script ignores SIGINT and SIGTERM:
    one landing while the result is printed, or while Python exits, would kill the process with no line,
    or an exit code that contradicts what was done. (Not in-process callers: tests, a shell.)"""
    if _CONSOLE[0]:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def seal_abandoned(settings, command: str) -> None:
    """Seal the records of runs killed before they could (SIGKILL), and say so on stderr."""
    from opslib import audit

    if not audit.has_abandoned(settings.records_dir):
        return  # nothing to seal: the database code of sealing is not even loaded (0.2 s)
    from opslib import sealing

    for record in sealing.seal_abandoned(settings, command):
        where = (
            "its revision could not be read"
            if record.revisions_after is None
            else f"the database is at {revisions_text(record.revisions_after)}"
        )
        how = "as abandoned" if record.outcome is Outcome.ABANDONED else f"as {record.outcome}, the outcome its process gave it"
        print(
            f"opslib: sealed run {record.run_id} ({record.runbook}, started {record.started_at}) {how}: "
            f"its processes ended without sealing it; {where}",
            file=sys.stderr,
        )


def databases_given(settings, args: argparse.Namespace) -> tuple[list[str], list[tuple[str, str]]]:
    """The databases `audit verify`, `summary` and `report` cross-check the ledger with besides the
    environment's: each ``--database URL``, and (URL, where it came from) of each target of the fleet file
    (``--targets``, else the project's if it has one)."""
    from opslib import fleet
    from opslib.errors import ConfigError

    databases = [url for url in getattr(args, "database", None) or [] if url]
    targets = getattr(args, "targets", None)
    path = targets or fleet.fleet_file(settings.alembic_ini)
    if targets is None and not path.is_file():
        return databases, []
    try:
        return databases, fleet.database_urls(path)
    except ConfigError:
        if targets is not None:
            raise
        return databases, []  # the project's pyproject.toml with no fleet in it, or a fleet file `opslib fleet` refuses itself
