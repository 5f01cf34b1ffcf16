"""Settings of an opslib run, read from the environment (the design's configuration contract)."""

from __future__ import annotations

import configparser
import getpass
import os
from dataclasses import dataclass, field
from pathlib import Path

from opslib import witness
from opslib.errors import ConfigError
from opslib.redact import redact_url, remember_secrets

ENVIRONMENTS = ("development", "staging", "production")


@dataclass(frozen=True)
class Settings:
    """Where the database, the Alembic project, records and backups are; secrets stay out of repr."""

    database_url: str | None = field(default=None, repr=False)
    env: str = "development"
    # Where database_url came from, for messages: "DATABASE_URL", "sqlalchemy.url in <ini>", or a
    # runbook's database_url_env variable; empty when the embedded server is the target.
    url_source: str = "DATABASE_URL"
    alembic_ini: Path = Path("alembic.ini")
    records_dir: Path = Path("records")
    backups_dir: Path = Path("backups")
    state_dir: Path = Path(".opslib")
    operator: str = ""
    lock_timeout_s: float = 10.0
    backup_compression: int = 1
    ddl_lock_timeout_s: float = 2.0
    ddl_retries: int = 3
    ledger_witness: str | None = None  # a second place keeping each ledger entry's hash: a folder or syslog (opslib.witness)
    # The operator's SSH key (a private key file, or a public key ssh-agent holds the private half of): with it
    # listed in the project's allowed_signers, each ledger entry the operator's runs append is signed.
    signing_key: Path | None = None
    # Who approved this run in a gate outside opslib (an Airflow approval task), and where that answer is kept.
    approved_by: str | None = None
    approval_ref: str | None = None

    @property
    def uses_embedded(self) -> bool:
        """True when no DATABASE_URL is set and the embedded server is the target."""
        return not self.database_url

    def __repr__(self) -> str:
        target = redact_url(self.database_url) if self.database_url else "embedded server"
        return (
            f"Settings(database={target}, env={self.env!r}, alembic_ini={str(self.alembic_ini)!r}, "
            f"records_dir={str(self.records_dir)!r}, backups_dir={str(self.backups_dir)!r}, "
            f"operator={self.operator!r})"
        )


def _float(environ: dict, name: str, default: float) -> float:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, not {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {raw!r}")
    return value


def load_settings(environ: dict | None = None) -> Settings:
    """Read :class:`Settings` from ``environ`` (default ``os.environ``), validating each value."""
    environ = dict(os.environ if environ is None else environ)
    env = environ.get("OPSLIB_ENV", "development") or "development"
    if env not in ENVIRONMENTS:
        raise ConfigError(f"OPSLIB_ENV must be one of {', '.join(ENVIRONMENTS)}, not {env!r}")
    try:
        operator = environ.get("OPSLIB_OPERATOR") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid, e.g. in some containers
        operator = "unknown"
    alembic_ini = Path(environ.get("OPSLIB_ALEMBIC_INI") or "alembic.ini")
    database_url, url_source = target_url_text(environ, alembic_ini)
    remember_secrets(database_url)  # whatever field a message lands in, this password never is written
    return Settings(
        database_url=database_url,
        url_source=url_source,
        env=env,
        alembic_ini=alembic_ini,
        records_dir=Path(environ.get("OPSLIB_RECORDS_DIR") or "records"),
        backups_dir=Path(environ.get("OPSLIB_BACKUPS_DIR") or "backups"),
        state_dir=Path(environ.get("OPSLIB_STATE_DIR") or ".opslib"),
        operator=operator,
        lock_timeout_s=_float(environ, "OPSLIB_LOCK_TIMEOUT", 10.0),
        backup_compression=_compression(environ),
        ddl_lock_timeout_s=_float(environ, "OPSLIB_DDL_LOCK_TIMEOUT", 2.0),
        ddl_retries=int(_float(environ, "OPSLIB_DDL_RETRIES", 3)),
        ledger_witness=witness.spec_from(environ),
        signing_key=Path(environ["OPSLIB_SIGNING_KEY"]).expanduser() if environ.get("OPSLIB_SIGNING_KEY") else None,
        approved_by=(environ.get("OPSLIB_APPROVED_BY") or "").strip() or None,
        approval_ref=(environ.get("OPSLIB_APPROVAL_REF") or "").strip() or None,
    )


# Alembic's templates (`alembic init`, every template) write this URL: a placeholder, not a database.
_PLACEHOLDER_SCHEME = "driver"


def target_url_text(environ: dict, alembic_ini: Path) -> tuple[str | None, str]:
    """The one rule for the target database: ``(URL or None, where it came from)``.

    ``DATABASE_URL`` when set and not empty; else the project's own ``sqlalchemy.url`` in its
    ``alembic.ini``, unless that is the template's placeholder (``driver://user:pass@localhost/dbname``);
    else None: the embedded server. A ``DATABASE_URL`` set but empty (what a missing CI secret
    leaves) is an error, never a silent fall back to another database.
    """
    if "DATABASE_URL" in environ:
        raw = environ["DATABASE_URL"] or ""
        if not raw.strip():
            raise ConfigError(
                "DATABASE_URL is set but empty (a missing secret?): set it to the target's URL, or unset it "
                "to use the project's alembic.ini sqlalchemy.url or the embedded server"
            )
        return raw, "DATABASE_URL"
    from_ini = ini_url(alembic_ini)
    if from_ini:
        return from_ini, f"sqlalchemy.url in {alembic_ini}"
    return None, ""


def ini_url(alembic_ini: Path) -> str | None:
    """The project's ``sqlalchemy.url`` (``[alembic]`` section, ``%(here)s`` expanded as Alembic does),
    or None when it is absent, empty, the template's placeholder, or the file cannot be read (the
    Alembic config's own loading reports that)."""
    parser = configparser.ConfigParser(defaults={"here": str(Path(alembic_ini).resolve().parent)})
    try:
        if not parser.read(alembic_ini, encoding="utf-8"):
            return None
        raw = parser.get("alembic", "sqlalchemy.url", fallback="") or ""
    except (configparser.Error, UnicodeDecodeError, OSError):
        return None
    raw = raw.strip()
    if not raw or raw.split("://", 1)[0] == _PLACEHOLDER_SCHEME:
        return None
    return raw


def _compression(environ: dict) -> int:
    raw = environ.get("OPSLIB_BACKUP_COMPRESSION") or "1"
    if not raw.isdigit() or not 0 <= int(raw) <= 9:
        raise ConfigError(f"OPSLIB_BACKUP_COMPRESSION must be a gzip level from 0 to 9, not {raw!r}")
    return int(raw)


def is_runbook_template(path: Path) -> bool:
    """True when ``path`` is a notebook in the runbooks folder: a template, which runs never run or change."""
    return Path(path).resolve().parent == runbooks_dir().resolve()


def runbooks_dir() -> Path:
    """The folder of the runbook notebooks: OPSLIB_RUNBOOKS_DIR, else the ones opslib ships: inside
    the installed package (a wheel: ``opslib/runbooks/``), or ``runbooks/`` of a source checkout."""
    configured = os.environ.get("OPSLIB_RUNBOOKS_DIR")
    if configured:
        return Path(configured)
    package = Path(__file__).resolve().parent
    shipped = package / "runbooks"
    return shipped if shipped.is_dir() else package.parent / "runbooks"
