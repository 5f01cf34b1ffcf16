"""The restore points the records hold: each pgBackRest gate a sealed run made, with what the database held
there, read from the run's sidecar only when the ledger still vouches for it (its sha256 matches)."""

from __future__ import annotations

from pathlib import Path

from opslib import audit
from opslib.errors import InvalidInput, PreconditionFailed
from opslib.record import RestorePoint


def restore_points(records_dir: Path, database: str | None = None) -> list[tuple[dict, RestorePoint | None]]:
    """Every sealed run's restore point (of ``database``, when given), newest first: (its ledger entry, the
    point as its sidecar holds it, or None when the sidecar is gone or no longer what the ledger sealed)."""
    found = []
    for entry in reversed(audit.read_endings(records_dir)):
        point = entry.get("restore_point")
        if not isinstance(point, dict) or point.get("name") != f"opslib-{entry.get('run_id')}":
            continue  # a recovery's record names the point it went back to; only the run that made it lists it
        if database is not None and (entry.get("database") or {}).get("name") != database:
            continue
        found.append((entry, _vouched_point(records_dir, entry)))
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
        points = [(e, p) for e, p in points if wanted in (e["restore_point"].get("name"), e.get("run_id"))]
        if not points:
            raise InvalidInput(f"no restore point {wanted!r} of database {database!r} in {records_dir}'s ledger")
    elif not points:
        raise PreconditionFailed(
            f"no restore point of database {database!r} in {records_dir}'s ledger: a run with backup_method "
            "pgbackrest makes one; or recover to target_time or target_lsn"
        )
    entry, point = points[0]
    if point is None:
        raise PreconditionFailed(
            f"the record of {entry['restore_point'].get('name')} ({entry.get('sidecar')}) is missing or was changed "
            "since it was sealed: its values cannot be trusted (opslib audit verify)"
        )
    return point
