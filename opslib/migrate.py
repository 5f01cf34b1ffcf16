"""Alembic verbs that return data instead of printing.

Modelled on ``alembic/command.py``: each verb is a thin function over Config -> ScriptDirectory ->
EnvironmentContext. The Alembic project is whatever ``Settings.alembic_ini`` points at, so any
Alembic project on PostgreSQL works. Verbs that change the database run on one connection that
holds the opslib advisory lock; that connection is handed to the project's ``env.py`` through
``config.attributes["connection"]`` (an env.py that opens its own connection from
``sqlalchemy.url`` gets the same URL, in memory only).

Errors from Alembic and the driver are turned into :mod:`opslib.errors` here, each saying where
the database now stands.
"""

from __future__ import annotations

import argparse
import io
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from alembic import command
from alembic.config import Config
from alembic.script import Script, ScriptDirectory
from alembic.script.revision import MultipleHeads, RevisionError
from alembic.util.exc import CommandError
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from opslib import db
from opslib.config import Settings
from opslib.errors import (
    ConfigError,
    InvalidInput,
    MigrationFailed,
    OpsError,
    PreconditionFailed,
    UnknownRevision,
)

# A dialect-only URL for offline SQL: no server is needed, and no password can leak into it.
OFFLINE_URL = "postgresql+psycopg2://"


@dataclass(frozen=True)
class RevisionInfo:
    """One revision of the chain, as the operator needs to see it."""

    revision: str
    down_revisions: tuple[str, ...]
    message: str
    is_head: bool
    is_merge: bool
    branch_labels: tuple[str, ...]
    path: str
    doc: str

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Status:
    """Where the database stands against the chain."""

    database: str
    current: tuple[str, ...]
    heads: tuple[str, ...]
    pending: tuple[RevisionInfo, ...]

    @property
    def at_head(self) -> bool:
        """True when the database is at every head of the chain (nothing pending)."""
        return set(self.current) == set(self.heads)

    def to_dict(self) -> dict:
        """A JSON-ready dict with ``current``, ``heads``, ``pending`` and ``at_head``."""
        return {
            "database": self.database,
            "current": list(self.current),
            "heads": list(self.heads),
            "pending": [{"revision": r.revision, "message": r.message} for r in self.pending],
            "at_head": self.at_head,
        }


@dataclass(frozen=True)
class MigrationResult:
    """What a verb that changes the database did."""

    action: str
    target: str
    database: str
    before: tuple[str, ...]
    after: tuple[str, ...]
    steps: tuple[RevisionInfo, ...] = field(default=())

    @property
    def changed(self) -> bool:
        """True when the database's revision moved."""
        return set(self.before) != set(self.after)

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {
            "action": self.action,
            "target": self.target,
            "database": self.database,
            "before": list(self.before),
            "after": list(self.after),
            "steps": [{"revision": r.revision, "message": r.message} for r in self.steps],
            "changed": self.changed,
        }


# --- the Alembic project ---------------------------------------------------------------------


def alembic_config(
    settings: Settings,
    *,
    url: URL | str | None = None,
    connection: Connection | None = None,
    x_args: Sequence[str] = (),
    output: io.StringIO | None = None,
) -> Config:
    """An Alembic Config for the project at ``settings.alembic_ini``, wired to opslib's target.

    The URL is set in memory only (never written to the ini file); ``%`` is doubled because the
    ini parser interpolates it.
    """
    ini = Path(settings.alembic_ini)
    if not ini.is_file():
        raise ConfigError(
            f"Alembic config not found at {ini}: set OPSLIB_ALEMBIC_INI to your project's alembic.ini"
        )
    for value in x_args:
        key, sep, _ = value.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"-x takes KEY=VALUE, not {value!r}")
    cfg = Config(str(ini), output_buffer=output, stdout=io.StringIO())
    cfg.cmd_opts = argparse.Namespace(x=list(x_args))
    cfg.attributes["configure_logger"] = False
    if connection is not None:
        cfg.attributes["connection"] = connection
    if url is not None:
        rendered = url if isinstance(url, str) else url.render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return cfg


def script_directory(settings: Settings) -> ScriptDirectory:
    """The project's revision scripts; a broken project is a :class:`ConfigError`."""
    cfg = alembic_config(settings)
    try:
        return ScriptDirectory.from_config(cfg)
    except (CommandError, RevisionError) as err:
        raise ConfigError(f"cannot load the Alembic project of {settings.alembic_ini}: {err}") from err


def _info(script: Script, heads: set[str]) -> RevisionInfo:
    down = script.down_revision
    downs = () if down is None else ((down,) if isinstance(down, str) else tuple(down))
    return RevisionInfo(
        revision=script.revision,
        down_revisions=downs,
        message=(script.doc or "").strip(),
        is_head=script.revision in heads,
        is_merge=script.is_merge_point,
        branch_labels=tuple(sorted(script.branch_labels)),
        path=script.path,
        doc=_details(script),
    )


def _details(script: Script) -> str:
    """The revision's docstring without its first line, which is already the message."""
    lines = (script.longdoc or "").strip().splitlines()
    return "\n".join(lines[1:]).strip()


def _check_revision_text(rev: object, what: str = "revision") -> str:
    if not isinstance(rev, str):
        raise InvalidInput(f"{what} must be a string, not {type(rev).__name__} {rev!r}")
    rev = rev.strip()
    if not rev:
        raise InvalidInput(f"{what} is empty: give a revision id, 'head' or 'base'")
    return rev


def resolve(script: ScriptDirectory, rev: str) -> tuple[Script, ...]:
    """The revisions ``rev`` names (an id, a unique prefix, head, heads, base, label@rev)."""
    rev = _check_revision_text(rev)
    if rev == "base":
        return ()
    try:
        # The revision map, not ScriptDirectory.get_revisions: the latter folds every error into
        # one CommandError, and the type tells an ambiguous prefix from several heads.
        found = script.revision_map.get_revisions(rev)
    except MultipleHeads:
        raise PreconditionFailed(
            f"{rev!r} is ambiguous: the chain has several heads; run `opslib merge -m MSG` or name a revision"
        ) from None
    except (RevisionError, CommandError) as err:
        text = str(err)
        if "Multiple revisions start with" in text:
            raise UnknownRevision(f"revision {rev!r} is ambiguous: {text}; give more characters") from None
        raise UnknownRevision(
            f"unknown revision {rev!r}: run `opslib history` to list the revisions"
        ) from None
    if not found or any(s is None for s in found):
        raise UnknownRevision(f"unknown revision {rev!r}: run `opslib history` to list the revisions")
    return tuple(found)


def history(settings: Settings) -> list[RevisionInfo]:
    """Every revision of the chain, newest first."""
    script = script_directory(settings)
    heads = set(script.get_heads())
    return [_info(s, heads) for s in script.walk_revisions()]


def heads(settings: Settings) -> list[RevisionInfo]:
    """The head revision(s) of the chain; more than one means a merge is needed."""
    script = script_directory(settings)
    head_ids = set(script.get_heads())
    return [_info(script.get_revision(h), head_ids) for h in script.get_heads()]


def show(settings: Settings, rev: str) -> RevisionInfo:
    """Details of one revision."""
    script = script_directory(settings)
    found = resolve(script, rev)
    if len(found) != 1:
        raise UnknownRevision(f"{rev!r} names {len(found) or 'no'} revisions; give one revision id")
    return _info(found[0], set(script.get_heads()))


def _between(script: ScriptDirectory, upper: Sequence[str] | str, lower: Sequence[str]) -> list[Script]:
    """Revisions above ``lower`` up to and including ``upper``, oldest first."""
    lower_arg = tuple(lower) if lower else "base"
    upper_arg = tuple(upper) if not isinstance(upper, str) else upper
    scripts = list(script.iterate_revisions(upper_arg, lower_arg))
    scripts.reverse()
    return [s for s in scripts if s.revision not in set(lower)]


# --- the database ----------------------------------------------------------------------------


def current_revisions(conn: Connection) -> tuple[str, ...]:
    """The revision(s) recorded in the database's version table; () when at base.

    The read's implicit transaction is committed: the connection may be handed to Alembic next,
    which must find it outside a transaction to run one transaction per revision.
    """
    revs = db.version_revisions(conn)
    if conn.in_transaction():
        conn.commit()
    return revs


def _pending(script: ScriptDirectory, current: tuple[str, ...], database: str) -> list[Script]:
    """Revisions not yet applied, oldest first; refuses a database at a revision the code lacks."""
    unknown = [r for r in current if _safe_get_revision(script, r) is None]
    if unknown:
        raise PreconditionFailed(
            f"{database} is at revision {', '.join(unknown)}, which the Alembic project does not "
            "contain: the code is older than the database, or the revision file was removed"
        )
    return _between(script, tuple(script.get_heads()), current)


def _safe_get_revision(script: ScriptDirectory, rev: str) -> Script | None:
    try:
        return script.get_revision(rev)
    except (RevisionError, CommandError):
        return None


def status(settings: Settings) -> Status:
    """Current revision(s), heads, and what is pending, read without changing anything."""
    script = script_directory(settings)
    url = db.target_url(settings)
    with db.connect(url) as conn:
        current = current_revisions(conn)
    head_ids = tuple(sorted(script.get_heads()))
    pending = _pending(script, current, db.redact_url(url))
    return Status(
        database=db.redact_url(url),
        current=current,
        heads=head_ids,
        pending=tuple(_info(s, set(head_ids)) for s in pending),
    )


@contextmanager
def _locked_connection(settings: Settings) -> Iterator[tuple[URL, Connection]]:
    url = db.target_url(settings)
    with db.connect(url) as conn:
        with db.advisory_lock(conn, settings.lock_timeout_s):
            yield url, conn


def _capture_alembic_output() -> redirect_stdout:
    # Some Alembic verbs print to stdout (e.g. "Generating ..."); opslib returns data instead.
    return redirect_stdout(io.StringIO())


def _run_change(
    settings: Settings,
    action: str,
    target: str,
    x_args: Sequence[str],
    plan,
    run,
) -> MigrationResult:
    """Run one changing verb under the lock and report before/after, or raise saying where it stands.

    ``plan(script, current)`` validates the request and returns the revisions it will pass through
    (raising before any change); ``run(cfg)`` performs it through Alembic.
    """
    script = script_directory(settings)
    with _locked_connection(settings) as (url, conn):
        database = db.redact_url(url)
        before = current_revisions(conn)
        _pending(script, before, database)  # refuses a database at a revision the code lacks
        steps = plan(script, before)
        cfg = alembic_config(settings, url=url, connection=conn, x_args=x_args)
        try:
            with _capture_alembic_output():
                run(cfg)
        except BaseException as err:  # noqa: BLE001 - any failure, Ctrl-C included, says where the database stands
            after = _revisions_after_failure(conn, url, database)
            raise _failure(action, target, database, script, before, after, steps, err, url) from err
        after = current_revisions(conn)
    head_ids = set(script.get_heads())
    return MigrationResult(
        action=action,
        target=target,
        database=database,
        before=before,
        after=after,
        steps=tuple(_info(s, head_ids) for s in steps),
    )


def _revisions_after_failure(conn: Connection, url: URL, database: str) -> tuple[str, ...]:
    """Where the database stands after a failure, read on the same connection or, if that died, a new one."""
    try:
        if conn.in_transaction():
            conn.rollback()
        return current_revisions(conn)
    except DBAPIError:
        pass
    try:
        with db.connect(url) as fresh:
            return current_revisions(fresh)
    except (DBAPIError, OpsError):
        raise MigrationFailed(
            f"the migration failed and {database} cannot be reached to read its revision: "
            "run `opslib status` once it is back",
            changed=True,
        ) from None


def _describe(revs: tuple[str, ...]) -> str:
    return ", ".join(revs) if revs else "base (no revision applied)"


def _failure(action, target, database, script, before, after, steps, err, url) -> OpsError:
    """The error for a failed change: which revision failed, why, and where the database stands."""
    if isinstance(err, (CommandError, RevisionError)) and set(before) == set(after):
        return InvalidInput(
            f"{action} {target}: {db.scrub(str(err), url)}; the database is unchanged at {_describe(after)}"
        )
    applied_now = {s.revision for s in _between(script, after, ())} if after else set()
    if action == "downgrade":  # steps newest first: the failing one is the first still applied
        failed = next((s for s in steps if s.revision in applied_now), None)
    else:  # steps oldest first: the failing one is the first not yet applied
        failed = next((s for s in steps if s.revision not in applied_now), None)
    where = f" at revision {failed.revision} ({failed.doc})" if failed else ""
    if isinstance(err, KeyboardInterrupt):
        cause = "interrupted"
    elif isinstance(err, SQLAlchemyError):
        cause = db.driver_message(err, url)
    else:
        lines = str(err).strip().splitlines()
        cause = db.scrub(f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__, url)
    return MigrationFailed(
        f"{action} to {target} failed{where}: {cause}. {database} is now at {_describe(after)}; "
        f"fix the cause and run `opslib {action}` again, or `opslib status` to see what is pending",
        changed=set(before) != set(after),
        revisions=after,
    )


def upgrade(settings: Settings, target: str = "head", *, x_args: Sequence[str] = ()) -> MigrationResult:
    """Apply pending revisions up to ``target`` (default ``head``; ``+N`` for N steps)."""
    target = _check_revision_text(target, "target revision")

    def plan(script: ScriptDirectory, current: tuple[str, ...]) -> list[Script]:
        if target.startswith("+"):
            pending = _between(script, tuple(script.get_heads()), current)
            n = _steps(target)
            if n > len(pending):
                raise PreconditionFailed(f"cannot upgrade {target}: only {len(pending)} revision(s) pending")
            return pending[:n]
        upper = resolve(script, target)
        try:
            return _between(script, tuple(s.revision for s in upper), current)
        except RevisionError:
            raise UnknownRevision(
                f"{target!r} is not ahead of the database's revision {_describe(current)}: "
                "use `opslib downgrade` to go back"
            ) from None

    return _run_change(settings, "upgrade", target, x_args, plan, lambda cfg: command.upgrade(cfg, target))


def _steps(rel: str) -> int:
    try:
        n = int(rel[1:])
    except ValueError:
        raise UnknownRevision(f"{rel!r} is not a relative revision: use {rel[0]}1, {rel[0]}2, …") from None
    if n < 1:
        raise UnknownRevision(f"{rel!r}: the number of steps must be at least 1")
    return n


def downgrade(settings: Settings, target: str, *, x_args: Sequence[str] = ()) -> MigrationResult:
    """Roll back to ``target``: ``-N`` steps, a revision id, or ``base``."""
    target = _check_revision_text(target, "target revision")

    def plan(script: ScriptDirectory, current: tuple[str, ...]) -> list[Script]:
        if not current:
            raise PreconditionFailed("nothing to roll back: the database is at base (no revision applied)")
        applied = list(reversed(_between(script, current, ())))  # newest first
        if target.startswith("-"):
            n = _steps(target)
            if len(current) > 1:
                raise PreconditionFailed(
                    f"the database is at several heads ({', '.join(current)}): downgrade to a revision id"
                )
            if n > len(applied):
                raise PreconditionFailed(
                    f"cannot downgrade {target}: only {len(applied)} revision(s) applied"
                )
            return applied[:n]
        if target == "base":
            return applied
        lower = resolve(script, target)
        lower_ids = {s.revision for s in lower}
        kept = {s.revision for s in _between(script, tuple(lower_ids), ())}
        if not lower_ids <= {s.revision for s in applied}:
            raise UnknownRevision(
                f"{target!r} is not behind the database's revision {_describe(current)}: "
                "use `opslib upgrade` to go forward"
            )
        return [s for s in applied if s.revision not in kept]

    return _run_change(
        settings, "downgrade", target, x_args, plan, lambda cfg: command.downgrade(cfg, target)
    )


def stamp(settings: Settings, target: str) -> MigrationResult:
    """Record ``target`` as the database's revision without running any migration."""
    target = _check_revision_text(target, "target revision")

    def plan(script: ScriptDirectory, current: tuple[str, ...]) -> list[Script]:
        resolve(script, target)
        return []

    return _run_change(settings, "stamp", target, (), plan, lambda cfg: command.stamp(cfg, target))


def _created(result: Script | list[Script] | None, settings: Settings) -> RevisionInfo:
    script = script_directory(settings)  # reloaded: the new file is part of the chain now
    made = result[0] if isinstance(result, list) else result
    if made is None:
        raise OpsError("Alembic created no revision file")
    return _info(made, set(script.get_heads()))


def _check_message(message: str) -> str:
    if not isinstance(message, str) or not message.strip():
        raise InvalidInput('a message is required, e.g. -m "add_user_profile_table"')
    return message.strip()


def merge(settings: Settings, message: str, revisions: Sequence[str] = ("heads",)) -> RevisionInfo:
    """Create a merge revision joining ``revisions`` (default: all current heads)."""
    message = _check_message(message)
    script = script_directory(settings)
    if list(revisions) == ["heads"] and len(script.get_heads()) < 2:
        raise PreconditionFailed("nothing to merge: the chain has a single head")
    for rev in revisions:
        resolve(script, rev)
    cfg = alembic_config(settings)
    try:
        with _capture_alembic_output():
            made = command.merge(cfg, list(revisions), message=message)
    except (CommandError, RevisionError) as err:
        raise InvalidInput(f"merge: {err}") from err
    return _created(made, settings)


def revision(settings: Settings, message: str, *, autogenerate: bool = False) -> RevisionInfo:
    """Create a new revision file: empty, or autogenerated by comparing the models with the database."""
    message = _check_message(message)
    script = script_directory(settings)
    if len(script.get_heads()) > 1:
        raise PreconditionFailed(
            f"the chain has several heads ({', '.join(script.get_heads())}): run `opslib merge -m MSG` first"
        )
    if not autogenerate:
        cfg = alembic_config(settings, url=OFFLINE_URL)
        with _capture_alembic_output():
            made = command.revision(cfg, message=message)
        return _created(made, settings)
    url = db.target_url(settings)
    with db.connect(url) as conn:
        current = current_revisions(conn)
        pending = _pending(script, current, db.redact_url(url))
        if pending:
            raise PreconditionFailed(
                f"the database is not at head ({len(pending)} revision(s) pending): run `opslib upgrade` "
                "first, autogenerate compares the models with a database at head"
            )
        cfg = alembic_config(settings, url=url, connection=conn)
        try:
            with _capture_alembic_output():
                made = command.revision(cfg, message=message, autogenerate=True)
        except (CommandError, RevisionError) as err:
            raise InvalidInput(f"revision --autogenerate: {db.scrub(str(err), url)}") from err
        except DBAPIError as err:
            raise OpsError(f"revision --autogenerate: {db.driver_message(err, url)}") from err
    return _created(made, settings)


def offline_sql(settings: Settings, revision_range: str, *, x_args: Sequence[str] = ()) -> str:
    """The SQL that would run for ``FROM:TO`` (an upgrade, or a downgrade when TO is older), without connecting."""
    revision_range = _check_revision_text(revision_range, "revision range")
    if revision_range.count(":") != 1:
        raise InvalidInput(f"give a revision range FROM:TO (e.g. 0003:head), not {revision_range!r}")
    start, end = (part.strip() for part in revision_range.split(":"))
    if not start or not end:
        raise InvalidInput(f"give both ends of the range FROM:TO, not {revision_range!r}")
    script = script_directory(settings)
    start_ids = tuple(s.revision for s in resolve(script, start))
    end_ids = tuple(s.revision for s in resolve(script, end))
    downgrade_ = _is_downgrade(script, start_ids, end_ids, revision_range)
    buf = io.StringIO()
    cfg = alembic_config(settings, url=OFFLINE_URL, x_args=x_args, output=buf)
    try:
        if downgrade_:
            command.downgrade(cfg, f"{start}:{end}", sql=True)
        else:
            command.upgrade(cfg, f"{start}:{end}", sql=True)
    except (CommandError, RevisionError) as err:
        raise InvalidInput(f"sql {revision_range}: {err}") from err
    return buf.getvalue()


def _is_downgrade(script: ScriptDirectory, start: tuple[str, ...], end: tuple[str, ...], text: str) -> bool:
    if start == end:
        raise InvalidInput(f"the range {text!r} is empty: FROM and TO are the same revision")
    if not start:
        return False
    if not end:
        return True
    below_end = {s.revision for s in _between(script, end, ())}
    if set(start) <= below_end:
        return False
    below_start = {s.revision for s in _between(script, start, ())}
    if set(end) <= below_start:
        return True
    raise InvalidInput(f"the range {text!r} does not follow one line of history")
