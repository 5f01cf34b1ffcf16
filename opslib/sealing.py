"""Ending the records of runs that could not end them themselves.

A run seals its own record on every ending it lives through (success, failure, refusal, SIGINT,
SIGTERM). Two endings it does not live through are sealed here: a record the runner finishes for a
kernel that died or was stopped between cells (:func:`settle`), and a run whose processes are gone
without any sealing, killed with SIGKILL (:func:`seal_abandoned`, called by the next `opslib audit`
or `opslib run`). Either way the run's leftover sessions are ended, where the database stands is read
afresh, and the run's row is written in the database's own history.

An interactive run (`opslib open`) is ended by its kernel but sealed when the operator saves its
notebook, or on `opslib audit seal` (:func:`seal_finished`): the ledger entry then vouches for the
notebook as it was saved.

Every ending, whoever writes it (the runner of a headless or fleet run, a run's own process, a JupyterLab
save, the command that finds a run abandoned), goes through :func:`seal`: the notebook scrubbed, the
sidecar written, the ending appended to the ledger, and its hash anchored, always in this order and from
the same source of secrets.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from opslib import anchors, audit, db, liveness, signatures
from opslib import history as run_history
from opslib.config import Settings
from opslib.errors import OpsError
from opslib.outcome import Outcome
from opslib.record import RunRecord

SESSIONS_GONE_S = 10.0  # how long to wait for a dead run's sessions to end once told to


def _end_sessions(conn, record: RunRecord) -> None:
    """End the sessions the run left (its lock, a statement still running) and wait until they are gone."""
    name = audit.application_name(record.runbook, record.run_id)
    query = "SELECT pid FROM pg_stat_activity WHERE application_name = :name AND pid <> pg_backend_pid()"
    for pid in conn.execute(sa.text(query), {"name": name}).scalars():
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    deadline = time.monotonic() + SESSIONS_GONE_S
    while conn.execute(sa.text(query), {"name": name}).first() and time.monotonic() < deadline:
        time.sleep(0.1)


def settle(settings: Settings, record: RunRecord) -> None:
    """For a run that ended without reading where its database stands: end the sessions it left, read
    the revision afresh into ``revisions_after`` (None, "not read", when the database is out of reach or
    cannot be known), and write the run's row in the database's history.

    The revision is read from the version table the run recorded (its own Alembic project's, which need
    not be the project of the command doing this); a run that never recorded one leaves it not read.
    """
    record.revisions_after = None
    from opslib import migrate  # Alembic's import is paid only when there is a record to settle

    url = anchors.target_of(settings, record)
    if url is None:
        record.database_history = "not written: the database could not be identified from here"
        return
    table = tuple(record.version_table) if record.version_table else None
    try:
        with db.connect(url) as conn:
            _end_sessions(conn, record)
            if table is not None:
                record.revisions_after = list(migrate.current_revisions(conn, table))
            run_history.record_run(conn, record)
    except (OpsError, sa.exc.DBAPIError) as err:
        message = err.message if isinstance(err, OpsError) else db.driver_message(err, url)
        record.database_history = f"not written: {message}"


def _written_outcome(settings: Settings, record: RunRecord) -> str | None:
    """The outcome the run's database holds for it (None: no row, or the database cannot be asked)."""
    url = anchors.target_of(settings, record)
    if url is None or record.database is None:
        return None
    try:
        with db.connect(url) as conn:
            return run_history.run_outcome(conn, record.run_id)
    except (OpsError, sa.exc.DBAPIError):
        return None


def seal_abandoned(settings: Settings, command: str, out_of_reach: str | None = None) -> list[RunRecord]:
    """Seal, as ``abandoned``, every run in the records folder that ended without sealing its record
    (nobody holds its live mark); ``command`` names the command doing it, for the record. Returns them.

    A run whose database this command cannot reach is left for one that can: its ending is anchored in
    that database, and only there can it be told whether the run was sealed once already. The run
    ``out_of_reach`` names (`opslib audit seal RUN_ID`) is sealed all the same, its ending anchored in the
    witness alone. A folder this user cannot write is only read: its runs are left for a command that can.
    """
    records = settings.records_dir
    if not audit.has_abandoned(records):
        return []
    sealed = []
    with liveness.sealing_lock(records):
        for stem in audit.abandoned_stems(records):  # again, under the lock: another command may have sealed
            try:
                record = _seal_one(settings, records, stem, command, out_of_reach)
            except OSError as err:  # one record that cannot be written does not stop the command
                print(f"opslib: could not seal the record {stem}: {err.strerror or err}", file=sys.stderr)
                continue
            if record is not None:
                sealed.append(record)
    return sealed


def _seal_one(settings: Settings, records, stem: str, command: str, out_of_reach: str | None) -> RunRecord | None:
    record = audit.load_record(records, stem)
    if record is None:
        return None
    with liveness.ended_run(records, stem, {"host": record.host, "pids": record.pids}) as ended:
        # Held exclusively now; the run may have sealed itself between the scan and the hold.
        if not ended or stem in audit.vouched_stems(records):
            return None
        record = audit.load_record(records, stem)  # as it is now, the run's last write included
        if record is None:
            return None
        if record.database is not None:
            anchored = anchors.is_anchored(settings, record)
            if anchored:  # sealed once: its ledger line was removed
                return None
            if anchored is None and record.run_id != out_of_reach:
                return None  # its database is out of reach from here: left for a command that reaches it
        now = audit.iso(audit.now())
        ended = isinstance(record.outcome, Outcome) and record.outcome.sealed
        if ended and (record.closed_at or _written_outcome(settings, record) == str(record.outcome)):
            # Its process ended it and wrote it in the database; only its seal is missing (a JupyterLab run
            # whose notebook was not saved after its last cell, or a process killed between its row in the
            # database and its seal): sealed with its own outcome, so the ledger, its sidecar and the
            # database's history say the same.
            record.sealed_by = (
                f"`opslib {command}` on {socket.gethostname()} at {now}, after its process had ended it "
                "without sealing it (its notebook as last saved)"
            )
            return record if seal(settings, records, stem, record, rewrite_sidecar=False) is not None else None
        record.last_outcome = str(record.outcome)
        for entry in record.steps:
            if entry.outcome is Outcome.RUNNING:
                entry.outcome = Outcome.ABANDONED
        if record.mode == "interactive":
            why = "its JupyterLab session ended (or its kernel died) before the notebook was saved after the summary"
        else:
            why = f"the run's processes ({', '.join(map(str, record.pids))}) ended without sealing its record " \
                "(killed with SIGKILL, or its kernel died)"
        record.end(
            Outcome.ABANDONED,
            None,
            f"{why}, last seen {record.last_outcome}" + (f": {record.error}" if record.error else ""),
            now,
        )
        record.sealed_by = f"`opslib {command}` on {socket.gethostname()} at {now}"
        settle(settings, record)
        # Its ending is appended to the ledger; its sidecar stays as its processes left it.
        if seal(settings, records, stem, record, rewrite_sidecar=False) is None:
            return None
    return record


def seal_finished(settings: Settings, stem: str, by: str) -> RunRecord | None:
    """Seal a run its kernel has ended (an interactive run whose summary ran) with its notebook as saved
    now, hashed into its ledger entry; ``by`` says what sealed it. The notebook is then made read-only.

    Returns the record, or None when there is nothing to seal: already sealed, or not ended yet.
    """
    records = Path(settings.records_dir)
    with liveness.sealing_lock(records):
        if stem in audit.vouched_stems(records):
            return None
        record = audit.load_record(records, stem)
        # Only an interactive run, and only once its kernel has written its record for the last time.
        if record is None or record.mode != "interactive" or not record.closed_at:
            return None
        record.sealed_by = f"{by} on {socket.gethostname()} at {audit.iso(audit.now())}"
        if seal(settings, records, stem, record) is None:
            return None
    return record


def seal(settings: Settings, records: Path, stem: str, record: RunRecord, rewrite_sidecar: bool = True) -> audit.Appended | None:
    """Seal the ended run ``record``, the one way every ending is sealed: scrub its notebook (and drop
    JupyterLab's unscrubbed checkpoint copy of it), write its sidecar (unless ``rewrite_sidecar`` is false:
    an abandoned run's stays as its processes left it), append its ending to the ledger vouching for both,
    drop its live mark, and anchor the entry in its database and the witness.

    Returns the appended entry, or None when another command sealed the run first. Raises OSError when the
    records folder cannot be written.
    """
    notebook = audit.sidecar_path(records, stem).with_suffix(".ipynb")
    if notebook.is_file():
        audit.scrub_notebook(notebook, anchors.url_text_of(settings, record))  # secrets out, whatever else
        record.notebook = notebook.name
    (records / ".ipynb_checkpoints" / f"{stem}-checkpoint.ipynb").unlink(missing_ok=True)
    if rewrite_sidecar:
        audit.write_sidecar(records, stem, record)
    appended = audit.append_ledger(records, stem, record, signatures.ledger_signer(settings)[0])
    if appended is None:
        return None
    liveness.live_mark_path(records, stem).unlink(missing_ok=True)
    anchors.anchor(settings, record, appended)
    return appended

