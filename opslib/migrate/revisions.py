"""Questions about the chain of revisions, answered from the loaded ScriptDirectory alone.

Which revisions a name means, which lie between two points, the walk Alembic takes to go up or
down, and how a revision is shown (:class:`RevisionInfo`). Nothing here reads the database.
"""

from __future__ import annotations

from typing import Sequence

from alembic.script import Script, ScriptDirectory
from alembic.script.revision import MultipleHeads, RevisionError
from alembic.util.exc import CommandError

from opslib.errors import InvalidInput, PreconditionFailed, UnknownRevision
from opslib.migrate.results import RevisionInfo


def _info(script: Script, heads: set[str]) -> RevisionInfo:
    """A revision as the operator sees it; ``heads`` are the chain's head ids (to mark ``is_head``)."""
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
    """``rev`` stripped, refused (:class:`InvalidInput`) when it is not a string or is empty."""
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



def _between(script: ScriptDirectory, upper: Sequence[str] | str, lower: Sequence[str]) -> list[Script]:
    """Revisions above ``lower`` up to and including ``upper``, oldest first."""
    lower_arg = tuple(lower) if lower else "base"
    upper_arg = tuple(upper) if not isinstance(upper, str) else upper
    scripts = list(script.iterate_revisions(upper_arg, lower_arg))
    scripts.reverse()
    return [s for s in scripts if s.revision not in set(lower)]


def _upgrade_path(script: ScriptDirectory, destination: str | Sequence[str], current: Sequence[str]) -> list[Script]:
    """The revisions Alembic's upgrade from ``current`` to ``destination`` runs, in its order (oldest
    first): the same walk as ``alembic upgrade`` (``ScriptDirectory._upgrade_revs``), so that what opslib
    calls pending is what Alembic will run, whatever the database's revisions (several included)."""
    dest = destination if isinstance(destination, str) else tuple(destination)
    return [step.revision for step in script._upgrade_revs(dest, tuple(current))]


def _downgrade_path(script: ScriptDirectory, destination: str, current: Sequence[str]) -> list[Script]:
    """The revisions Alembic's downgrade from ``current`` to ``destination`` (as the user wrote it)
    reverses, newest first (``ScriptDirectory._downgrade_revs``, the walk ``alembic downgrade`` takes)."""
    return [step.revision for step in script._downgrade_revs(destination, tuple(current))]


def _pending(script: ScriptDirectory, current: tuple[str, ...], database: str) -> list[Script]:
    """Revisions not yet applied, oldest first; refuses a database at a revision the code lacks."""
    unknown = [r for r in current if _safe_get_revision(script, r) is None]
    if unknown:
        raise PreconditionFailed(
            f"{database} is at revision {', '.join(unknown)}, which the Alembic project does not "
            "contain: the code is older than the database, or the revision file was removed"
        )
    return _upgrade_path(script, tuple(script.get_heads()), current)


def _safe_get_revision(script: ScriptDirectory, rev: str) -> Script | None:
    """The revision ``rev`` names, or None when the project does not contain it."""
    try:
        return script.get_revision(rev)
    except (RevisionError, CommandError):
        return None


def _applied_set(script: ScriptDirectory, revs: tuple[str, ...]) -> set[str]:
    """Every revision at or below ``revs``: what a database at ``revs`` has applied."""
    return {s.revision for s in _between(script, revs, ())} if revs else set()


def _describe(revs: tuple[str, ...]) -> str:
    """Revisions as a message names them, base when there is none."""
    return ", ".join(revs) if revs else "base (no revision applied)"
