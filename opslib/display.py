"""Rendering of opslib results: text for the terminal, pandas tables for notebooks. No logic here."""

from __future__ import annotations

from typing import Iterable, Sequence

from opslib.migrate import MigrationResult, RevisionInfo, Status


def _rev(revs: Sequence[str]) -> str:
    return ", ".join(revs) if revs else "base (empty: no revision applied)"


def text_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain aligned table."""
    rows = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def status_text(status: Status) -> str:
    """What `opslib status` prints."""
    out = [
        f"database : {status.database}",
        f"current  : {_rev(status.current)}",
        f"head(s)  : {_rev(status.heads)}",
    ]
    if status.at_head:
        out.append("state    : at head, nothing pending")
    else:
        out.append(f"state    : {len(status.pending)} revision(s) pending; `opslib upgrade` applies them")
        out.append("")
        out.append(text_table(["pending", "message"], [(r.revision, r.message) for r in status.pending]))
    if len(status.heads) > 1:
        out.append("warning  : the chain has several heads; `opslib merge -m MSG` joins them")
    return "\n".join(out)


def result_text(result: MigrationResult) -> str:
    """What a changing verb prints: before, after, and each step taken."""
    if not result.changed and not result.steps:
        return f"{result.action} {result.target}: nothing to do, {result.database} is at {_rev(result.after)}"
    out = [f"{result.action} {result.target} on {result.database}"]
    if result.steps:
        arrow = "applied" if result.action == "upgrade" else "rolled back"
        out += [f"  {arrow:11} {r.revision}  {r.message}" for r in result.steps]
    out.append(f"  before: {_rev(result.before)}")
    out.append(f"  after : {_rev(result.after)}")
    return "\n".join(out)


def history_text(revisions: Sequence[RevisionInfo], verbose: bool = False) -> str:
    """The chain, newest first, as `alembic history` shows it (with details when verbose)."""
    lines = []
    for r in revisions:
        down = ", ".join(r.down_revisions) or "<base>"
        marks = " (head)" if r.is_head else ""
        marks += " (merge)" if r.is_merge else ""
        lines.append(f"{down} -> {r.revision}{marks}, {r.message}")
        if verbose:
            lines.append(revision_text(r, indent="    "))
            lines.append("")
    return "\n".join(lines).rstrip()


def revision_text(r: RevisionInfo, indent: str = "") -> str:
    """One revision's details, as `opslib show` prints them."""
    rows = [
        ("Revision", r.revision + (" (head)" if r.is_head else "")),
        ("Revises", ", ".join(r.down_revisions) or "<base>"),
        ("Message", r.message),
        ("Path", r.path),
    ]
    if r.branch_labels:
        rows.append(("Branches", ", ".join(r.branch_labels)))
    out = [f"{indent}{k}: {v}" for k, v in rows]
    if r.doc:
        out.append("")
        out += [f"{indent}    {line}" for line in r.doc.splitlines()]
    return "\n".join(out)


def revisions_frame(revisions: Sequence[RevisionInfo]):
    """A pandas DataFrame of revisions, for notebooks."""
    import pandas as pd  # late import: the CLI never pays for pandas

    return pd.DataFrame(
        [
            {
                "revision": r.revision,
                "revises": ", ".join(r.down_revisions),
                "message": r.message,
                "head": r.is_head,
            }
            for r in revisions
        ]
    )
