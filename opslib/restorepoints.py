"""The restore points the records hold: each pgBackRest gate a sealed run made, with what the database held
there, read from the run's sidecar only when the ledger still vouches for it (its sha256 matches)."""

from __future__ import annotations

from pathlib import Path

from opslib import audit
from opslib.errors import InvalidInput, PreconditionFailed
from opslib.record import RestorePoint, SealedPoint


def restore_points(records_dir: Path, database: str | None = None) -> list[SealedPoint]:
    """Every sealed run's restore point (of ``database``, when given), newest first."""
    found = []
    for entry in reversed(audit.read_endings(records_dir)):
        sealed = entry.get("restore_point")
        if not isinstance(sealed, dict) or sealed.get("name") != f"opslib-{entry.get('run_id')}":
            continue  # a recovery's record names the point it went back to; only the run that made it lists it
        name = (entry.get("database") or {}).get("name")
        if database is not None and name != database:
            continue
        found.append(
            SealedPoint(
                run_id=str(entry.get("run_id")),
                runbook=str(entry.get("runbook")),
                outcome=str(entry.get("outcome")),
                database=name,
                **{k: str(sealed.get(k)) for k in ("name", "lsn", "created_at", "stanza")},
                point=_vouched_point(records_dir, entry),
            )
        )
    return found


def _vouched_point(records_dir: Path, entry: dict) -> RestorePoint | None:
    sidecar = entry.get("sidecar") or ""
    if audit.file_sha256(Path(records_dir) / sidecar) != entry.get("sidecar_sha256"):
        return None
    record = audit.load_record(records_dir, sidecar.removesuffix(".json"))
    return record.backup.restore_point if record and record.backup else None


def find_restore_point(records_dir: Path, database: str, wanted: str) -> RestorePoint:
    """The restore point ``wanted`` names (``opslib-<run id>``, or the run id), or the newest one of
    ``database`` when ``wanted`` is empty. One whose record was edited since it was sealed is refused."""
    points = restore_points(records_dir, database)
    if wanted:
        points = [p for p in points if wanted in (p.name, p.run_id)]
        if not points:
            raise InvalidInput(f"no restore point {wanted!r} of database {database!r} in {records_dir}'s ledger")
    elif not points:
        raise PreconditionFailed(
            f"no restore point of database {database!r} in {records_dir}'s ledger: a run with backup_method "
            "pgbackrest makes one; or recover to target_time or target_lsn"
        )
    if points[0].point is None:
        raise PreconditionFailed(
            f"the record of {points[0].name} (run {points[0].run_id}) is missing or was changed since it was sealed: "
            "its values cannot be trusted (opslib audit verify)"
        )
    return points[0].point


def point_to_test(records_dir: Path, database: str, wanted: str) -> RestorePoint | None:
    """The restore point a test recovery goes to: the one named, else the newest of ``database``, else None (the
    end of the newest backup)."""
    if wanted or restore_points(records_dir, database):
        return find_restore_point(records_dir, database, wanted)
    return None
