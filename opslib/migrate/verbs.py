"""The Alembic verbs, returning data instead of printing.

Modelled on ``alembic/command.py``: each verb is a thin function over Config -> ScriptDirectory ->
EnvironmentContext: it reads the chain (:mod:`~opslib.migrate.revisions`), plans
(:mod:`~opslib.migrate.planning`), and leaves a change to the database to
:mod:`~opslib.migrate.change`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

from alembic import command
from alembic.autogenerate import RevisionContext
from alembic.config import Config
from alembic.script import Script, ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy.exc import DBAPIError

from opslib import db
from opslib.config import Settings
from opslib.errors import ConfigError, InvalidInput, OpsError, PreconditionFailed, UnknownRevision
from opslib.migrate.change import _run_change
from opslib.migrate.planning import _plan_downgrade, _plan_upgrade
from opslib.migrate.project import OFFLINE_URL, Project, alembic_config, script_directory
from opslib.migrate.results import (
    AttemptCallback,
    LocksCallback,
    MigrationResult,
    RevisionInfo,
    Status,
    StepCallback,
)
from opslib.migrate.revisions import _between, _check_revision_text, _info, _pending, resolve
from opslib.migrate.target import Target
from opslib.migrate.runtime import _Canceller, _capture_alembic_output, _outside_event_loop, _run_env, _watching
from opslib.migrate.versiontable import current_revisions
from opslib.naming import vague_message


def history(target: Settings | Target) -> list[RevisionInfo]:
    """Every revision of the chain, newest first."""
    script = Target.of(target).script
    heads = set(script.get_heads())
    return [_info(s, heads) for s in script.walk_revisions()]


def heads(target: Settings | Target) -> list[RevisionInfo]:
    """The head revision(s) of the chain; more than one means a merge is needed."""
    script = Target.of(target).script
    head_ids = set(script.get_heads())
    return [_info(script.get_revision(h), head_ids) for h in script.get_heads()]


def show(target: Settings | Target, rev: str) -> RevisionInfo:
    """Details of one revision."""
    script = Target.of(target).script
    found = resolve(script, rev)
    if len(found) != 1:
        raise UnknownRevision(f"{rev!r} names {len(found) or 'no'} revisions; give one revision id")
    return _info(found[0], set(script.get_heads()))


def revisions_now(target: Settings | Target, where: Sequence[str | None] | None = None) -> list[str] | None:
    """The target's revisions read now from the version table ``where`` (else the project's), on a
    connection of its own; None, "not read", when they cannot be read: out of reach, lost mid-query (a
    restart), or not an Alembic database yet. What a run records as where it ended."""
    try:
        target = Target.of(target)
        with db.connect(target.url) as conn:
            table = tuple(where) if where else target.version_table(conn)
            return list(current_revisions(conn, table))
    except Exception:  # noqa: BLE001 - unreachable, lost, or an env.py that fails when asked its table: not read
        return None



def status(target: Settings | Target) -> Status:
    """Current revision(s), heads, and what is pending, read without changing anything."""
    target = Target.of(target)
    script, url = target.script, target.url
    with db.connect(url) as conn:
        current = current_revisions(conn, target.version_table(conn))
    head_ids = tuple(sorted(script.get_heads()))
    pending = _pending(script, current, db.redact_url(url))
    return Status(
        database=db.redact_url(url),
        current=current,
        heads=head_ids,
        pending=tuple(_info(s, set(head_ids)) for s in pending),
    )



def upgrade(
    target: Settings | Target,
    revision: str = "head",
    *,
    x_args: Sequence[str] = (),
    on_step: StepCallback | None = None,
    on_attempt: AttemptCallback | None = None,
    on_locks: LocksCallback | None = None,
) -> MigrationResult:
    """Apply pending revisions up to ``revision`` (default ``head``; ``+N`` for N steps) on ``target``.

    One Alembic command, each revision committing on its own whatever the project's env.py says;
    ``on_step(revision, seconds, started)`` is called as each revision commits, and ``on_locks(revision,
    locks)`` with the table locks its transaction holds just before it commits.
    """
    revision = _check_revision_text(revision, "target revision")
    return _run_change(
        Target.of(target),
        "upgrade",
        revision,
        x_args,
        lambda script, current: _plan_upgrade(script, current, revision),
        lambda script, current, steps: _absolute_upgrade(script, current, steps, revision),
        on_step,
        on_attempt,
        on_locks,
    )


def _absolute_upgrade(
    script: ScriptDirectory, current: tuple[str, ...], steps: list[Script], target: str
) -> str:
    """``+N`` made absolute, so that a retry does not go N further; only where the absolute target
    applies exactly the planned revisions (not across branches)."""
    if not target.startswith("+") or not steps:
        return target
    if {s.revision for s in _between(script, steps[-1].revision, current)} != {s.revision for s in steps}:
        return target
    return steps[-1].revision

def downgrade(
    target: Settings | Target,
    revision: str,
    *,
    x_args: Sequence[str] = (),
    on_step: StepCallback | None = None,
    on_attempt: AttemptCallback | None = None,
    on_locks: LocksCallback | None = None,
) -> MigrationResult:
    """Roll back ``target`` to ``revision``: ``-N`` steps, a revision id, or ``base``; each revision commits on
    its own (``on_step`` and ``on_locks`` as for :func:`upgrade`)."""
    revision = _check_revision_text(revision, "target revision")

    def destination(script: ScriptDirectory, current: tuple[str, ...], steps: list[Script]) -> str:
        if not revision.startswith("-") or not steps:
            return revision
        # A relative target is made absolute, so that a retry does not go N further back; only where
        # the absolute one reverses exactly the planned revisions (across a merge it would reverse
        # the other branch too, and Alembic itself refuses the relative walk as ambiguous).
        downs = _info(steps[-1], set()).down_revisions
        if len(downs) > 1:
            return revision
        lower = tuple(downs)
        if {s.revision for s in _between(script, current, lower)} != {s.revision for s in steps}:
            return revision
        return downs[0] if downs else "base"

    return _run_change(
        Target.of(target),
        "downgrade",
        revision,
        x_args,
        lambda script, current: _plan_downgrade(script, current, revision),
        destination,
        on_step,
        on_attempt,
        on_locks,
    )


def stamp(target: Settings | Target, revision: str) -> MigrationResult:
    """Record ``revision`` as the database's revision without running any migration."""
    revision = _check_revision_text(revision, "target revision")

    def plan(script: ScriptDirectory, current: tuple[str, ...]) -> list[Script]:
        resolve(script, revision)
        return []

    return _run_change(Target.of(target), "stamp", revision, (), plan, lambda script, current, steps: (revision,))


def _revision_files(settings: Settings) -> set[Path]:
    """The ``.py`` files in the project's version folders now."""
    script = ScriptDirectory.from_config(alembic_config(settings))
    return {
        path.resolve()
        for location in script._version_locations
        if Path(location).is_dir()
        for path in (Path(location).rglob("*.py") if script.recursive_version_locations else Path(location).glob("*.py"))
    }


def _from_template(
    settings: Settings, make: Callable[[], Script | list[Script] | None]
) -> Script | list[Script] | None:
    """Call Alembic's ``command.revision``/``merge``, which writes the file from the project's template and
    imports it: a new revision file that is not valid Python (the message closed the template's docstring)
    is removed and refused, so that the chain never holds a file that cannot be imported. A syntax error
    anywhere else (env.py, a models module it imports) is the project's to fix: named, never removed."""
    before = _revision_files(settings)
    try:
        return make()
    except SyntaxError as err:
        broken = Path(err.filename).resolve() if err.filename else None
        if broken is not None and broken.is_file() and broken in _revision_files(settings) - before:
            broken.unlink()
            raise InvalidInput(
                f"the revision file the project's template made from this message is not valid Python "
                f"({err.msg}); it was removed: use a plainer message"
            ) from None
        raise ConfigError(f"{err.filename}, line {err.lineno}, is not valid Python: {err.msg}; fix it first") from None


def _created(result: Script | list[Script] | None, settings: Settings) -> RevisionInfo:
    """The revision Alembic has just written, as the chain now holds it."""
    made = result[0] if isinstance(result, list) else result
    if made is None:
        raise OpsError("Alembic created no revision file")
    script = script_directory(settings)  # reloaded: the new file is part of the chain now
    return _info(made, set(script.get_heads()))


# What a message must not hold: it is written into a Python docstring by the project's template, where
# triple quotes end the docstring (and what follows runs on import), a backslash starts an escape (one
# at the end swallows the closing quote), and control characters (not newlines or tabs: a message may
# have several lines) break the file or the terminal.
_UNSAFE_IN_MESSAGE = re.compile(r'"""|\'\'\'|\\|[\x00-\x08\x0b-\x1f\x7f]')  # newlines and tabs are text


def _check_message(message: str) -> str:
    """``message`` stripped, refused (:class:`InvalidInput`) when empty or unsafe in a docstring."""
    if not isinstance(message, str) or not message.strip():
        raise InvalidInput('a message is required, e.g. -m "add_user_profile_table"')
    bad = _UNSAFE_IN_MESSAGE.search(message.strip())
    if bad is not None:
        what = {"\\": "a backslash"}.get(bad.group(), "triple quotes" if len(bad.group()) == 3 else "a control character")
        raise InvalidInput(
            f"revision message refused: it holds {what}, which would break out of the revision file's "
            "docstring; use plain words, e.g. -m \"add_user_profile_table\""
        )
    return message.strip()


def merge(target: Settings | Target, message: str, revisions: Sequence[str] = ("heads",)) -> RevisionInfo:
    """Create a merge revision joining ``revisions`` (default: all current heads)."""
    target = Target.of(target)
    settings = target.settings
    message = _check_message(message)
    script = target.script
    if list(revisions) == ["heads"] and len(script.get_heads()) < 2:
        raise PreconditionFailed("nothing to merge: the chain has a single head")
    for rev in revisions:
        resolve(script, rev)
    cfg = alembic_config(settings)
    try:
        with _capture_alembic_output():
            made = _from_template(settings, lambda: command.merge(cfg, list(revisions), message=message))
    except (CommandError, RevisionError) as err:
        raise InvalidInput(f"merge: {err}") from err
    return _created(made, settings)


def revision(target: Settings | Target, message: str, *, autogenerate: bool = False) -> RevisionInfo:
    """Create a new revision file: empty, or autogenerated by comparing the models with the database.

    A vague message (the guide's ``update_database``, ``fix_stuff``) is refused before anything is written.
    """
    target = Target.of(target)
    settings = target.settings
    message = _check_message(message)
    vague = vague_message(message)
    if vague:
        raise InvalidInput(f"revision message refused: {vague}")
    script = target.script
    if len(script.get_heads()) > 1:
        raise PreconditionFailed(
            f"the chain has several heads ({', '.join(script.get_heads())}): run `opslib merge -m MSG` first"
        )
    if not autogenerate:
        cfg = alembic_config(settings, url=OFFLINE_URL)
        with _capture_alembic_output():
            made = _from_template(settings, lambda: command.revision(cfg, message=message))
        return _created(made, settings)
    url = target.url
    with db.connect(url) as conn:
        current = current_revisions(conn, target.version_table(conn))
        pending = _pending(script, current, db.redact_url(url))
        if pending:
            raise PreconditionFailed(
                f"the database is not at head ({len(pending)} revision(s) pending): run `opslib upgrade` "
                "first, autogenerate compares the models with a database at head"
            )
        cfg = alembic_config(settings, url=url, connection=conn, driver=target.driver)
        try:
            with _capture_alembic_output():
                made = _outside_event_loop(
                    lambda: _from_template(settings, lambda: command.revision(cfg, message=message, autogenerate=True)),
                    _watching(url, conn),
                )
        except (CommandError, RevisionError) as err:
            raise InvalidInput(f"revision --autogenerate: {db.scrub(str(err), url)}") from err
        except DBAPIError as err:
            raise OpsError(f"revision --autogenerate: {db.driver_message(err, url)}") from err
    return _created(made, settings)



def compare_models(target: Settings | Target) -> tuple[str, str]:
    """Whether the database matches the project's models: ``(pass|fail|skip, detail)``.

    Runs Alembic's ``check`` (autogenerate's comparison) through the project's env.py; a project
    whose env.py gives no ``target_metadata`` has no models to compare, which is a skip.
    """
    target = Target.of(target)
    settings = target.settings
    url = target.url
    with db.connect(url) as conn:
        cfg = alembic_config(settings, url=url, connection=conn, driver=target.driver)
        try:
            with _capture_alembic_output():
                diffs = _model_differences(cfg, target.project, _watching(url, conn))
        except CommandError as err:
            if "MetaData" in str(err):
                return "skip", "the project's env.py has no target_metadata to compare"
            return "fail", db.scrub(str(err), url)
    if diffs:
        return "fail", db.scrub(f"New upgrade operations detected: {diffs}".splitlines()[0], url)
    return "pass", "no differences between the models and the database"


def _model_differences(cfg: Config, project: Project, canceller: _Canceller) -> list:
    """What autogenerate finds between the models and the database: Alembic's ``check`` command
    (``alembic.command.check``), run on the script directory already loaded (the command loads every
    revision file again, a tenth of a second on a long chain)."""
    options = dict(
        message=None,
        autogenerate=True,
        sql=False,
        head="head",
        splice=False,
        branch_label=None,
        version_path=None,
        rev_id=None,
        depends_on=None,
    )
    revision_context = RevisionContext(cfg, project.script, options)

    def retrieve_migrations(rev, context):
        revision_context.run_autogenerate(rev, context)
        return []

    _run_env(
        cfg,
        project,
        retrieve_migrations,
        canceller=canceller,
        template_args=revision_context.template_args,
        revision_context=revision_context,
    )
    return [diff for ops in revision_context.generated_revisions[-1].upgrade_ops_list for diff in ops.as_diffs()]
