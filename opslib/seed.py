"""The guide's database initialization: production essentials (``init-prod``) and demo data (``seed-demo``).

What a project's essentials and demo data are is the project's own, kept beside its revisions (in
Alembic's ``script_location``):

- ``essentials.toml``: the admin user's table and columns, and the rows a production database starts
  with (settings, CMS pages, email templates…), each table with the columns that identify a row. A row
  is inserted only when no row with the same identity exists, so running it again changes nothing.
  The admin's password comes from an environment variable and is stored only as a salted Argon2id
  hash (argon2-cffi).
- ``demo_data.py``: ``tables(rows, seed)`` yields each table's name, columns and generated rows, and
  ``already_loaded(conn, seed)`` says whether this seed's data is there. opslib loads the rows with
  COPY (fast), and refuses production.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
import tomlkit
from sqlalchemy.engine import Connection
from tomlkit.exceptions import TOMLKitError

from opslib import db
from opslib.config import Settings
from opslib.errors import ConfigError, InvalidInput, PreconditionFailed
from opslib.migrate import script_directory
from opslib.record import DataChange

ESSENTIALS_FILE = "essentials.toml"
DEMO_FILE = "demo_data.py"
ADMIN_EMAIL_ENV = "OPSLIB_ADMIN_EMAIL"
ADMIN_PASSWORD_ENV = "OPSLIB_ADMIN_PASSWORD"
MIN_PASSWORD_LENGTH = 12
DEFAULT_DEMO_ROWS = 10_000
DEFAULT_DEMO_SEED = 42
COPY_CHUNK_ROWS = 50_000


def project_file(settings: Settings, name: str) -> Path:
    """A file kept beside the project's revisions (Alembic's ``script_location``)."""
    return Path(script_directory(settings).dir) / name


# --- essentials ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdminSpec:
    """Where the admin user goes: its table, the email and password-hash columns, and fixed values."""

    table: str
    email_column: str
    password_column: str
    values: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TableRows:
    """Rows a table starts with, and the columns that identify a row (present rows are never changed)."""

    table: str
    key: tuple[str, ...]
    rows: tuple[dict, ...]


@dataclass(frozen=True)
class Essentials:
    """A project's production essentials (``essentials.toml``)."""

    path: Path
    admin: AdminSpec
    tables: tuple[TableRows, ...]


def load_essentials(settings: Settings) -> Essentials:
    """Read the project's ``essentials.toml`` (a missing or malformed file is :class:`ConfigError`)."""
    path = project_file(settings, ESSENTIALS_FILE)
    if not path.is_file():
        raise ConfigError(
            f"init-prod needs {path}: the admin user's table and the rows a production database starts with"
        )
    try:
        data = tomlkit.parse(path.read_text(encoding="utf-8")).unwrap()
        admin = data["admin"]
        spec = AdminSpec(admin["table"], admin["email_column"], admin["password_column"], dict(admin.get("values", {})))
        tables = tuple(
            TableRows(name, tuple(t["key"]), tuple(dict(r) for r in t["rows"]))
            for name, t in data.get("tables", {}).items()
        )
    except (TOMLKitError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{path} is malformed: {type(err).__name__}: {err}") from None
    for t in tables:
        for row in t.rows:
            missing = [k for k in t.key if k not in row]
            if missing:
                raise ConfigError(f"{path}: a row of {t.table} lacks its key column(s) {', '.join(missing)}")
    return Essentials(path, spec, tables)


def admin_credentials(email_env: str = ADMIN_EMAIL_ENV, password_env: str = ADMIN_PASSWORD_ENV) -> tuple[str, str]:
    """The admin's email and password from the environment; a missing or weak one is :class:`InvalidInput`
    (the message names the variable, never its value)."""
    email = os.environ.get(email_env, "").strip()
    password = os.environ.get(password_env, "")
    if not email:
        raise InvalidInput(f"init-prod needs the admin's email in the environment variable {email_env}")
    if "@" not in email or any(c.isspace() for c in email):
        raise InvalidInput(f"the environment variable {email_env} does not hold an email address")
    if not password:
        raise InvalidInput(f"init-prod needs the admin's password in the environment variable {password_env}")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(
            f"the admin's password in {password_env} is shorter than {MIN_PASSWORD_LENGTH} characters"
        )
    return email, password


def hash_password(password: str) -> str:
    """A salted Argon2id hash of ``password`` (argon2-cffi's defaults, RFC 9106's second recommendation)."""
    from argon2 import PasswordHasher  # noqa: PLC0415 -- only init-prod needs it

    return PasswordHasher().hash(password)


def password_matches(stored: str, password: str) -> bool:
    """True when ``stored`` is an Argon2 hash of ``password``."""
    from argon2 import PasswordHasher  # noqa: PLC0415
    from argon2.exceptions import InvalidHashError, VerificationError  # noqa: PLC0415

    try:
        return PasswordHasher().verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def _insert_if_absent(conn: Connection, table: str, row: dict, key: tuple[str, ...]) -> bool:
    """Insert ``row`` unless a row with the same ``key`` values exists; True when it was inserted."""
    names = list(row)
    columns = ", ".join(db.quote_ident(conn, c) for c in names)
    values = ", ".join(f":v{i}" for i in range(len(names)))
    match = " AND ".join(f"{db.quote_ident(conn, k)} = :v{names.index(k)}" for k in key)
    inserted = conn.execute(
        sa.text(
            f"INSERT INTO {db.quote_qualified(conn, table)} ({columns}) SELECT {values} "
            f"WHERE NOT EXISTS (SELECT 1 FROM {db.quote_qualified(conn, table)} WHERE {match})"
        ),
        {f"v{i}": row[n] for i, n in enumerate(names)},
    )
    return inserted.rowcount == 1


def apply_essentials(conn: Connection, essentials: Essentials, email: str, password: str) -> list[DataChange]:
    """Insert what is missing of the essentials on ``conn``, in its transaction (the caller commits).

    The admin is inserted with a fresh hash only when no user has its email: an existing admin's
    password is never replaced. Returns, per item, the rows created and those there already, as the
    run's record keeps them."""
    admin = essentials.admin
    # Serialized with any other init-prod on this database (the run lock is held too; this covers callers
    # without it): NOT EXISTS alone could let two sessions insert the same row.
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('opslib init-prod'))"))
    exists = conn.execute(
        sa.text(f"SELECT 1 FROM {db.quote_qualified(conn, admin.table)} WHERE {db.quote_ident(conn, admin.email_column)} = :e"),
        {"e": email},
    ).first()
    outcomes = []
    if exists is None:
        row = {**admin.values, admin.email_column: email, admin.password_column: hash_password(password)}
        _insert_if_absent(conn, admin.table, row, (admin.email_column,))
        outcomes.append(DataChange("admin user", admin.table, 1, 0))
    else:
        outcomes.append(DataChange("admin user", admin.table, 0, 1))
    for t in essentials.tables:
        created = sum(_insert_if_absent(conn, t.table, row, t.key) for row in t.rows)
        outcomes.append(DataChange(t.table.replace("_", " "), t.table, created, len(t.rows) - created))
    return outcomes


def check_essentials(conn: Connection, essentials: Essentials, email: str) -> list[tuple[str, object]]:
    """Every essential row is present and the admin's password is stored as a hash, never as given:
    facts to show, or :class:`PreconditionFailed` naming what is missing."""
    admin = essentials.admin
    stored = conn.execute(
        sa.text(
            f"SELECT {db.quote_ident(conn, admin.password_column)} FROM {db.quote_qualified(conn, admin.table)} "
            f"WHERE {db.quote_ident(conn, admin.email_column)} = :e"
        ),
        {"e": email},
    ).scalar()
    if stored is None:
        raise PreconditionFailed(f"no admin user with the email of {ADMIN_EMAIL_ENV} in {admin.table}")
    if not str(stored).startswith("$argon2") and not str(stored).startswith("$2"):
        raise PreconditionFailed(f"the admin's {admin.password_column} is not a salted hash (Argon2 or bcrypt)")
    facts: list[tuple[str, object]] = [("admin user", f"present, password stored as {str(stored).split('$')[1]} hash")]
    for t in essentials.tables:
        missing = 0
        for row in t.rows:
            match = " AND ".join(f"{db.quote_ident(conn, k)} = :{k}" for k in t.key)
            found = conn.execute(
                sa.text(f"SELECT 1 FROM {db.quote_qualified(conn, t.table)} WHERE {match}"), {k: row[k] for k in t.key}
            ).first()
            missing += found is None
        if missing:
            raise PreconditionFailed(f"{missing} of the {len(t.rows)} essential rows of {t.table} are missing")
        facts.append((t.table, f"{len(t.rows)} essential rows present"))
    return facts


# --- demo data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoTable:
    """One table's generated demo rows: what a project's ``demo_data.tables()`` yields."""

    table: str
    columns: tuple[str, ...]
    rows: object  # an iterable of tuples, in the order of ``columns``


@dataclass(frozen=True)
class DemoResult:
    """What seed-demo loaded."""

    database: str
    seed: int
    loaded: bool  # False: this seed's data was there already, nothing changed
    rows: dict[str, int]
    seconds: float

    @property
    def rows_per_s(self) -> float:
        """Rows loaded per second."""
        total = sum(self.rows.values())
        return round(total / self.seconds, 1) if self.seconds > 0 and total else 0.0

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"database": self.database, "seed": self.seed, "loaded": self.loaded, "rows": self.rows,
                "seconds": self.seconds, "rows_per_s": self.rows_per_s}


def load_demo_module(settings: Settings) -> ModuleType:
    """Import the project's ``demo_data.py`` (a missing one is :class:`ConfigError`)."""
    path = project_file(settings, DEMO_FILE)
    if not path.is_file():
        raise ConfigError(f"seed-demo needs {path}: tables(rows, seed) and already_loaded(conn, seed)")
    spec = importlib.util.spec_from_file_location("opslib_project_demo_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("tables", "already_loaded"):
        if not callable(getattr(module, name, None)):
            raise ConfigError(f"{path} has no function {name}()")
    return module


class _CsvStream(io.TextIOBase):
    """Rows as CSV text, produced as COPY reads them: memory stays flat whatever the row count."""

    def __init__(self, rows):
        self._rows = iter(rows)
        self._buffer = ""
        self._out = io.StringIO()
        self._writer = csv.writer(self._out)
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> str:
        while size < 0 or len(self._buffer) < size:
            self._out.seek(0)
            self._out.truncate()
            for row in self._rows:
                self._writer.writerow(["\\N" if v is None else v for v in row])
                self.count += 1
                if self._out.tell() >= 1 << 16:
                    break
            chunk = self._out.getvalue()
            if not chunk:
                break
            self._buffer += chunk
        if size < 0:
            out, self._buffer = self._buffer, ""
        else:
            out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out


def copy_rows(conn: Connection, table: str, columns: tuple[str, ...], rows) -> int:
    """COPY ``rows`` into ``table`` on ``conn`` (psycopg2), in its transaction; returns the row count."""
    raw = conn.connection.driver_connection
    stream = _CsvStream(rows)
    names = ", ".join(db.quote_ident(conn, c) for c in columns)
    with raw.cursor() as cur:
        cur.copy_expert(f"COPY {db.quote_qualified(conn, table)} ({names}) FROM STDIN WITH (FORMAT csv, NULL '\\N')", stream)
    return stream.count


def seed_demo(settings: Settings, rows: int = DEFAULT_DEMO_ROWS, seed: int = DEFAULT_DEMO_SEED) -> DemoResult:
    """Load the project's demo data (``rows`` main rows, generated from ``seed``) with COPY, in one
    transaction under the run lock. Refused in production (exit 3); the same seed twice loads once."""
    if settings.env == "production":
        raise PreconditionFailed("seed-demo is refused in production: demo data never goes there")
    if rows < 1:
        raise InvalidInput(f"seed-demo: rows must be at least 1, not {rows}")
    module = load_demo_module(settings)
    url = db.target_url(settings)
    with db.connect(url) as conn:
        with db.advisory_lock(conn, settings.lock_timeout_s):
            started = time.perf_counter()
            counts = {}
            try:
                if module.already_loaded(conn, seed):
                    conn.rollback()
                    return DemoResult(url.database, seed, False, {}, 0.0)
                for t in module.tables(rows, seed):
                    counts[t.table] = copy_rows(conn, t.table, tuple(t.columns), t.rows)
                conn.commit()
            except sa.exc.DBAPIError as err:
                conn.rollback()
                raise PreconditionFailed(
                    f"seed-demo loaded nothing: {db.driver_message(err, url)} (is the database at head? "
                    "run `make init-prod` or `opslib upgrade head` first)"
                ) from None
            except Exception:
                conn.rollback()
                raise
            return DemoResult(url.database, seed, True, counts, round(time.perf_counter() - started, 3))
