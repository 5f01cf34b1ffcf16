"""The backup contract's files: names, time stamps, the manifest, checksums and the row counts recorded.

A backup is ``<database>_<UTC yyyymmddTHHMMSSZ>_<revision>.dump`` (pg_dump custom format) with a
``.json`` manifest beside it; a verification's outcome is kept in ``<stem>.verify.json`` (the
manifest itself is never rewritten). JSON is written under a temporary name and renamed, so a reader
never sees half a file. The lowest layer of :mod:`opslib.backup`: it imports none of its siblings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from opslib import db
from opslib.errors import InvalidInput, PreconditionFailed
from opslib.redact import clean_json

MANIFEST_FORMAT = "opslib-backup/1"
STAMP = "%Y%m%dT%H%M%SZ"
_CHUNK = 1 << 20


# --- files ---------------------------------------------------------------------------------------


def manifest_path(dump: Path) -> Path:
    """The manifest beside a backup file."""
    return dump.with_suffix(".json")


def verification_path(dump: Path) -> Path:
    """Where the outcome of the last verification of a backup is kept."""
    return dump.with_suffix(".verify.json")


def sha256_of(path: Path, stop: threading.Event | None = None) -> str:
    """The hex sha256 of a file, read in chunks; given up (an empty string) once ``stop`` is set."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            if stop is not None and stop.is_set():
                return ""
            digest.update(chunk)
    return digest.hexdigest()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-._" else "-" for ch in text)


def _write_json(path: Path, data: dict) -> None:
    """Write JSON under a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_text(json.dumps(clean_json(data, frozenset({"label", "error"})), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # a full disk must not also leave half a file behind
        raise


def read_manifest(dump: Path) -> dict:
    """The manifest of a backup; a missing or unreadable one is :class:`PreconditionFailed`."""
    path = manifest_path(dump)
    if not path.is_file():
        raise PreconditionFailed(f"missing manifest: {path.name} is not beside {dump.name}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PreconditionFailed(f"unreadable manifest {path.name}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise PreconditionFailed(f"{path.name} is not an opslib backup manifest ({MANIFEST_FORMAT})")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise PreconditionFailed(f"manifest {path.name} lacks {', '.join(missing)}")
    return manifest


_REQUIRED = ("file", "sha256", "size_bytes", "database", "pg_dump", "revisions", "row_counts", "started_at")


def _backup_file(file: Path | str) -> Path:
    path = Path(file)
    if not path.is_file():
        raise InvalidInput(f"no backup file at {path}")
    return path


# --- what the manifest records of a database -------------------------------------------------------


def _tables(conn: Connection, logged_only: bool = False) -> list[tuple[str, str]]:
    # An unlogged table's rows are not in the WAL: a recovery to a point in time brings it back empty.
    unlogged = " AND c.relpersistence <> 'u'" if logged_only else ""
    return conn.execute(
        sa.text(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            f"AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'{unlogged} ORDER BY 1, 2"
        )
    ).all()


def row_counts(conn: Connection, logged_only: bool = False) -> dict[str, int]:
    """Exact row counts of every ordinary table outside the system schemas, keyed ``schema.table``
    (``logged_only``: not the unlogged tables, which a recovery to a point in time brings back empty)."""
    counts = {}
    for schema, table in _tables(conn, logged_only):
        qualified = f"{db.quote_ident(conn, schema)}.{db.quote_ident(conn, table)}"
        counts[f"{schema}.{table}"] = int(conn.execute(sa.text(f"SELECT count(*) FROM {qualified}")).scalar())
    return counts


# A row's text depends on these settings of the session reading it (PGTZ, PGDATESTYLE, PGOPTIONS, the role's
# own settings): the gate and a recovery's comparison read in different sessions, so both read with these.
_ROW_TEXT_SETTINGS = (
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
    ("lc_monetary", "C"),
)


def table_checksums(conn: Connection, logged_only: bool = False) -> dict[str, str]:
    """A checksum of every ordinary table's rows outside the system schemas, keyed ``schema.table``: the sum of
    a 64-bit hash of each row's text, independent of the rows' order (equal multisets of rows, equal sums).

    The rows' text is read with the same output settings whatever the session's (for the rest of the
    transaction ``conn`` is in: SET LOCAL)."""
    conn.execute(
        sa.text("SELECT " + ", ".join(f"set_config(:n{i}, :v{i}, true)" for i in range(len(_ROW_TEXT_SETTINGS)))),
        {k: v for i, (n, val) in enumerate(_ROW_TEXT_SETTINGS) for k, v in ((f"n{i}", n), (f"v{i}", val))},
    )
    checksums = {}
    for schema, table in _tables(conn, logged_only):
        qualified = f"{db.quote_ident(conn, schema)}.{db.quote_ident(conn, table)}"
        checksums[f"{schema}.{table}"] = str(
            conn.execute(sa.text(f"SELECT coalesce(sum(hashtextextended(t::text, 0)::numeric), 0) FROM {qualified} t")).scalar()
        )
    return checksums


def count_differences(expected: dict[str, int], actual: dict[str, int]) -> str:
    diffs = [
        f"{table}: {actual.get(table, 'missing')} rows, expected {expected.get(table, 'none')}"
        for table in sorted(set(expected) | set(actual))
        if expected.get(table) != actual.get(table)
    ]
    return "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")


def _manifest_version_table(manifest: dict) -> tuple[str | None, str]:
    """The version table a backup was read from (manifests before it was recorded: Alembic's default)."""
    where = manifest.get("version_table") or {}
    return (where.get("schema"), where.get("table") or db.DEFAULT_VERSION_TABLE[1])

