"""The project's SQL rendered offline (Alembic's ``--sql`` mode), without a database.

What ``opslib sql`` prints and the deploy checks read: a revision that cannot be rendered offline
(it reads data, say) is named, with the last revision fully rendered, or left out of a partial
script that says so in SQL comments.
"""

from __future__ import annotations

import io
import re
from dataclasses import replace
from typing import Sequence

from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError

from opslib import db
from opslib.config import Settings
from opslib.errors import InvalidInput, OpsError, PreconditionFailed
from opslib.migrate.project import OFFLINE_URL, Project, alembic_config, project_for
from opslib.migrate.results import OfflineSQL
from opslib.migrate.revisions import _between, _check_revision_text, _safe_get_revision, resolve
from opslib.migrate.runtime import _Canceller, _capture_alembic_output, _run_env
from opslib.migrate.versiontable import version_table


# Alembic's offline output marks where each revision's SQL begins: "-- Running upgrade A -> B", where a
# merge names several revisions ("b1, c1 -> m").
RUNNING_MARKER = re.compile(r"^-- Running (upgrade|downgrade) (.*?) -> (.+?)[ \t]*$", re.M)


def _parse_range(settings: Settings, revision_range: str):
    """(project, FROM, TO, is a downgrade) of a ``FROM:TO`` range, refused when malformed or unknown."""
    revision_range = _check_revision_text(revision_range, "revision range")
    if revision_range.count(":") != 1:
        raise InvalidInput(f"give a revision range FROM:TO (e.g. 0003:head), not {revision_range!r}")
    start, end = (part.strip() for part in revision_range.split(":"))
    if not start or not end:
        raise InvalidInput(f"give both ends of the range FROM:TO, not {revision_range!r}")
    project = project_for(settings)
    script = project.script
    start_ids = tuple(s.revision for s in resolve(script, start))
    end_ids = tuple(s.revision for s in resolve(script, end))
    downgrade_ = _is_downgrade(script, start_ids, end_ids, revision_range)
    return project, start, end, downgrade_


def offline_sql(settings: Settings, revision_range: str, *, x_args: Sequence[str] = ()) -> str:
    """The SQL that would run for ``FROM:TO`` (an upgrade, or a downgrade when TO is older), without
    connecting: whole, or refused (:class:`PreconditionFailed`, exit 3) at the first revision that
    cannot be rendered offline, naming it, what it did, and the last revision fully rendered."""
    project, start, end, downgrade_ = _parse_range(settings, revision_range)
    rendered = _render(settings, project, start, end, downgrade_, x_args, resume=False)
    if rendered.unrendered:
        rev, why = rendered.unrendered[0]
        info = _safe_get_revision(project.script, rev)
        named = f"{rev} ({_first_line(info.doc)})" if info is not None and info.doc else rev
        last = rendered.stopped_after
        if last:
            upto = f"the last revision fully rendered is {last}: `opslib sql {start}:{last.split(', ')[-1]}` prints a whole script up to it"
        else:
            upto = "no revision of the range was fully rendered before it"
        raise PreconditionFailed(
            f"sql {revision_range}: revision {named} cannot be rendered offline: {why}; {upto}. "
            f"Run it online (`opslib {'downgrade' if downgrade_ else 'upgrade'}`), or add --partial for a "
            "script that says, in SQL comments, what it leaves out"
        )
    return rendered.sql


def script_sql(
    settings: Settings, revision_range: str, *, x_args: Sequence[str] = (), partial: bool = False
) -> OfflineSQL:
    """What ``opslib sql`` prints: a script ``psql -v ON_ERROR_STOP=1`` runs whole on a database at
    FROM, or a refusal (exit 3) naming the revision that cannot be rendered offline (see :func:`offline_sql`).

    With ``partial`` (an upgrade only), such a revision keeps its statements up to where it stopped,
    SQL comments (at the top and where it stopped) say that the rest of it is missing, and the version
    table is moved on past it so that the later revisions apply; ``unrendered`` names it for the caller
    to warn about. Such a script is not promised to run whole.
    """
    project, start, end, downgrade_ = _parse_range(settings, revision_range)
    if downgrade_ or not partial:
        return OfflineSQL(offline_sql(settings, revision_range, x_args=x_args))
    rendered = _render(settings, project, start, end, False, x_args, resume=True, bump=version_table(settings))
    if not rendered.unrendered:
        return rendered
    header = "".join(
        f"-- opslib: PARTIAL SCRIPT: revision {rev} is incomplete here: {why}\n" for rev, why in rendered.unrendered
    )
    header += (
        "-- opslib: what those revisions run past that point is NOT in this script; it may fail under\n"
        "-- psql -v ON_ERROR_STOP=1. Run them online (opslib upgrade) instead.\n\n"
    )
    return replace(rendered, sql=header + rendered.sql)


def _first_line(text: str) -> str:
    """The first line of ``text``, stripped; empty when there is none."""
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def render_pending(
    settings: Settings, current: Sequence[str], last: str, *, x_args: Sequence[str] = ()
) -> OfflineSQL:
    """The SQL of every revision from ``current`` up to ``last``, rendered in one Alembic run.

    A revision that cannot be rendered offline (it reads data, say) is left out and named; the
    rendering resumes after it, so one such revision costs one more run, not one run per revision.
    """
    project = project_for(settings)
    if len(current) > 1:
        # Several heads applied: rendered from all of them at once. Resuming after a revision that cannot
        # render would render a sibling branch again, so such a revision ends the rendering here.
        return _render(settings, project, tuple(current), last, False, x_args, resume=False)
    return _render(settings, project, current[0] if current else "base", last, False, x_args, resume=True)


def _render(
    settings: Settings,
    project: Project,
    start: str | tuple[str, ...],
    end: str,
    downgrade_: bool,
    x_args: Sequence[str],
    *,
    resume: bool,
    bump: tuple[str | None, str] | None = None,
) -> OfflineSQL:
    """The SQL from ``start`` to ``end``, rendered offline; a revision that cannot be rendered ends it, or
    with ``resume`` is left out (named in ``unrendered``) and the rendering goes on after it. With ``bump``
    (the version table), what such a revision rendered is kept and the version is moved on past it."""
    script = project.script
    parts: list[str] = []
    unrendered: list[tuple[str, str]] = []
    stopped_after: str | None = None
    reached: set[str] = set() if start == "base" else ({start} if isinstance(start, str) else set(start))
    while True:
        shown = start if isinstance(start, str) else ",".join(start)
        buf = io.StringIO()
        cfg = alembic_config(settings, url=OFFLINE_URL, x_args=x_args, output=buf)
        try:
            _render_once(cfg, project, start, end, downgrade_)
        except (CommandError, RevisionError) as err:
            raise InvalidInput(f"sql {shown}:{end}: {err}") from err
        except Exception as err:  # noqa: BLE001 - a revision's own code failed without a database to read
            text = buf.getvalue()
            markers = list(RUNNING_MARKER.finditer(text))
            failed, why = _unrendered_revision(err, markers, f"{shown}:{end}")
            unrendered.append((failed, why))
            if stopped_after is None:
                stopped_after = markers[-1].group(2).strip()
            parts.append(_rendered_before(text, markers[-1], failed, why, bump))
            if not resume or failed == end or _resolves_to(script, end, failed):
                return OfflineSQL("".join(parts), tuple(unrendered), stopped_after)
            # Resume from every head reached so far (the failed revision counted as passed), so that a
            # sibling branch already rendered is not rendered again.
            reached |= {mk.group(3).split(", ")[-1] for mk in markers}
            start = _heads_of(script, reached)
            continue
        parts.append(buf.getvalue())
        return OfflineSQL("".join(parts), tuple(unrendered), stopped_after)


def _render_once(
    cfg: Config, project: Project, start: str | tuple[str, ...], end: str, downgrade_: bool
) -> None:
    """One offline run of env.py from ``start`` to ``end``, its SQL written to ``cfg``'s output buffer."""
    script = project.script
    if downgrade_:
        work = lambda rev, context, end=end: script._downgrade_revs(end, rev)  # noqa: E731
    else:
        work = lambda rev, context, end=end: script._upgrade_revs(end, rev)  # noqa: E731
    with _capture_alembic_output():  # a revision's print() must not mix with the SQL
        _run_env(
            cfg,
            project,
            work,
            as_sql=True,
            starting_rev=None if start == "base" else start,
            destination_rev=end,
            canceller=_Canceller(None),  # Ctrl-C stops a long chain's rendering at the next revision
        )


def _unrendered_revision(err: Exception, markers: list[re.Match], shown: str) -> tuple[str, str]:
    """The revision whose rendering ``err`` stopped (the last one Alembic's output began), and why;
    :class:`PreconditionFailed` when none had begun (``shown`` is the range, for the message)."""
    lines = str(err).strip().splitlines()
    # A revision's own message may quote a URL from the environment: never its password.
    why = db.redact_urls_in(f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__)
    if not markers:  # before any revision: the project's env.py itself failed
        raise PreconditionFailed(
            f"sql {shown}: the project's env.py failed offline: {why}"
        ) from err
    failed = markers[-1].group(3)
    if isinstance(err, AttributeError) and "NoneType" in str(err):
        why += " (it reads data, which offline mode does not have)"
    return failed, why


def _rendered_before(
    text: str, marker: re.Match, failed: str, why: str, bump: tuple[str | None, str] | None
) -> str:
    """What to keep of a run that stopped at revision ``failed`` (whose SQL begins at ``marker``)."""
    part = text[: marker.start()]
    if bump is not None:  # keep what it rendered, and move the version on past it
        part = text + _past_unrendered(failed, marker.group(2), why, bump)
    # env.py's one transaction was left open at the failure: close it, as the rest is rendered apart.
    if len(re.findall(r"^BEGIN;$", part, re.M)) > len(re.findall(r"^COMMIT;$", part, re.M)):
        part += "COMMIT;\n\n"
    return part


def _past_unrendered(revision: str, previous: str, why: str, where: tuple[str | None, str]) -> str:
    """SQL comments saying where a revision stopped rendering, then its version table update."""
    schema, table = where
    name = f"{schema}.{table}" if schema else table
    if previous and "," in previous:  # a merge: the version rows are Alembic's to rewrite
        move = f"-- (the version table is left to Alembic: {revision} merges {previous})\n"
    elif previous:
        move = f"UPDATE {name} SET version_num='{revision}' WHERE {name}.version_num = '{previous}';\n"
    else:
        move = f"INSERT INTO {name} (version_num) VALUES ('{revision}');\n"
    return (
        f"\n-- opslib: INCOMPLETE: revision {revision} could not be rendered offline past this point: {why}.\n"
        "-- Whatever it runs after this point (tables, columns, data) is NOT in this script; run it online\n"
        f"-- (opslib upgrade {revision}). The version table is moved on past it so the later revisions apply.\n{move}\n"
    )


def _heads_of(script: ScriptDirectory, revisions: set[str]) -> str | tuple[str, ...]:
    """The heads of the history made of ``revisions`` and all their ancestors."""
    passed: set[str] = set()
    for r in revisions:
        if r not in passed:  # an ancestor of one already walked: its own ancestors are in ``passed`` too
            passed |= {s.revision for s in _between(script, r, ())}
    heads = tuple(sorted(r for r in passed if not (script.get_revision(r).nextrev & passed)))
    return heads[0] if len(heads) == 1 else heads


def _resolves_to(script: ScriptDirectory, name: str, revision: str) -> bool:
    """Whether ``name`` names exactly ``revision`` (False when it names nothing known)."""
    try:
        return {s.revision for s in resolve(script, name)} == {revision}
    except OpsError:
        return False


def _is_downgrade(script: ScriptDirectory, start: tuple[str, ...], end: tuple[str, ...], text: str) -> bool:
    """Whether the range ``text`` (from ``start`` to ``end``) goes down; refused when it is empty or
    does not follow one line of history."""
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
