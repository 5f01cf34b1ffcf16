"""Rendering of opslib results: text for the terminal, HTML tables for notebooks. No logic here."""

from __future__ import annotations

import html
import json
import re
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from opslib import approval
from opslib.naming import first_line
from opslib.record import Database, Rehearsal, RunRecord, revisions_text
from opslib.safeguards import skipped_safeguards

if TYPE_CHECKING:  # types only: rendering backups must not import Alembic
    from opslib.backup import BackupInfo, BackupResult, CleanupResult, RestoreResult
    from opslib.pgbackrest import StanzaInfo
    from opslib.record import SealedPoint
    from opslib.checkreport import CheckReport
    from opslib.lint import Finding
    from opslib.migrate import MigrationResult, RevisionInfo, Status


def _rev(revs: Sequence[str]) -> str:
    return ", ".join(revs) if revs else "base (empty: no revision applied)"


def _cell_lines(text: str, width: int | None) -> list[str]:
    lines = text.splitlines() or [""]
    if not width:
        return lines
    # break_on_hyphens off: revision ids, table names and file names keep their hyphens on one line.
    return [part for line in lines for part in (textwrap.wrap(line, width, break_on_hyphens=False) or [""])]


def text_table(headers: Sequence[str], rows: Iterable[Sequence[object]], wrap_last: int | None = None) -> str:
    """A plain aligned table. A cell of several lines goes on below, under its own column (a driver's
    message can have a DETAIL line); with ``wrap_last``, the last column is wrapped to that width."""
    last = len(headers) - 1
    cells = [
        [_cell_lines("" if v is None else str(v), wrap_last if i == last else None) for i, v in enumerate(row)]
        for row in rows
    ]
    widths = [max([len(h)] + [len(part) for r in cells for part in r[i]]) for i, h in enumerate(headers)]
    line = lambda parts: "  ".join(c.ljust(w) for c, w in zip(parts, widths, strict=False)).rstrip()  # noqa: E731
    out = [line(headers), line(["-" * w for w in widths])]
    for r in cells:
        out += [line([c[k] if k < len(c) else "" for c in r]) for k in range(max((len(c) for c in r), default=1))]
    return "\n".join(out)


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
        out.append(text_table(["pending", "message"], [(r.revision, first_line(r.message)) for r in status.pending]))
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
        out += [f"  {arrow:11} {r.revision}  {first_line(r.message)}" for r in result.steps]
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
        lines.append(f"{down} -> {r.revision}{marks}, {first_line(r.message)}")
        if verbose:
            lines.append(revision_text(r, indent="    "))
            lines.append("")
    return "\n".join(lines).rstrip()


def revision_text(r: RevisionInfo, indent: str = "") -> str:
    """One revision's details, as `opslib show` prints them: the message's first line, then the rest of
    the docstring (the message's other lines among it)."""
    rows = [
        ("Revision", r.revision + (" (head)" if r.is_head else "")),
        ("Revises", ", ".join(r.down_revisions) or "<base>"),
        ("Message", first_line(r.message)),
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
                "message": first_line(r.message),
                "head": r.is_head,
            }
            for r in revisions
        ]
    )


def size_text(size: int) -> str:
    """A byte count for people: 1.2 MB."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return str(size)


# A check's detail as tables show it: wrapped at DETAIL_WIDTH under its column in a terminal, at most
# DETAIL_ITEMS of its "; "-separated findings and about DETAIL_CHARS characters. "SQL renders offline" on a
# chain of data migrations is one finding per revision: 19,000 characters on one line, read by nobody.
DETAIL_WIDTH, DETAIL_ITEMS, DETAIL_CHARS = 100, 10, 2000


def shown_detail(detail: str) -> str:
    """A check's detail, shortened for a table: its first findings ("; "-separated), how many more, and
    its last one (where a check says what to do, or what was accepted), cut at about DETAIL_CHARS
    characters. The check itself keeps the whole detail: `--json` and the run's record have it."""
    items = detail.split("; ")
    if len(items) > DETAIL_ITEMS:
        items = items[: DETAIL_ITEMS - 1] + [f"… {len(items) - DETAIL_ITEMS} more …", items[-1]]
    shown = "; ".join(items)
    if len(shown) > DETAIL_CHARS:
        cut = shown[:DETAIL_CHARS]
        cut = cut.rsplit(" ", 1)[0] if " " in cut[-80:] else cut  # at a word's end, if there is one near
        shown = f"{cut} … ({len(shown) - len(cut)} more characters)"
    return shown


def checks_text(report: "CheckReport") -> str:
    """A pass/fail table of a check report, with its verdict; long details wrapped under their column
    and shortened (the report's JSON keeps them whole)."""
    details = [shown_detail(c.detail) for c in report.checks]
    table = text_table(
        ["check", "result", "detail"],
        [(c.name, c.status.upper(), shown) for c, shown in zip(report.checks, details, strict=True)],
        wrap_last=DETAIL_WIDTH,
    )
    if any(shown != c.detail for c, shown in zip(report.checks, details, strict=True)):
        table += "\n(details shortened here; whole in the report's JSON: `opslib check --json`, a run's record)"
    for found in findings_tables(report.findings):
        table += f"\n\n{found.text()}"
    return f"{table}\n{report.subject}: {'all checks passed' if report.ok else 'FAILED'}"


@dataclass(frozen=True)
class Table:
    """A titled table of a section, after its main one; a folded one shows its title, a count, until opened."""

    title: str
    rows: Sequence[dict]
    folded: bool = False

    def text(self) -> str:
        """The title, then the table (a terminal folds nothing)."""
        headers = list(self.rows[0])
        return f"{self.title}\n" + text_table(headers, [[r.get(h) for h in headers] for r in self.rows], wrap_last=60)

    def html(self) -> str:
        """The table under its title; folded, inside a <details> whose summary is the title."""
        if self.folded:
            return f"<details><summary>{html.escape(self.title)}</summary>{html_table(self.rows)}</details>"
        return f"<p style='margin:0.6em 0 0.2em'><b>{html.escape(self.title)}</b></p>{html_table(self.rows)}"


# What a blocking finding's "what to do" says after squawk's advice: the line that accepts it, in its revision.
ACCEPT_LINE = "`# opslib-accept: {rule} -- why it is safe here` in revision {revision}'s file"


def findings_tables(findings: Sequence["Finding"]) -> list[Table]:
    """The lint findings an operator acts on, one row each (revision, rule, table, rows, size, what squawk
    says, what to do): blocking ones and advice in an open table, accepted ones folded under their count.
    Information (tables new or empty in the target) is only counted, in the lint check's line."""
    shown: dict[str, dict[tuple, dict]] = {"block": {}, "warn": {}, "accepted": {}}
    for f in findings:
        kind = f.severity.value
        if kind not in shown:
            continue
        if kind == "block":
            todo = " ".join(filter(None, [_sentence(f.help), "Or accept it: " + ACCEPT_LINE.format(rule=f.rule, revision=f.revision)]))
        elif kind == "accepted":
            todo = f"accepted: {f.reason}"
        else:
            todo = _sentence(f.help) or "advice only: nothing blocks"
        row = {
            "verdict": {"block": "blocks", "warn": "advice", "accepted": "accepted"}[kind],
            "revision": f.revision, "rule": f.rule, "table": f.table or "", "rows": f.rows, "size": f.size,
            "finding": f.message, "what to do": todo,
        }  # fmt: skip
        shown[kind].setdefault((f.revision, f.rule, f.table, f.message), row)  # one row per statement's kind
    acting = [*shown["block"].values(), *shown["warn"].values()]
    tables = [Table(f"Findings: {len(shown['block'])} blocking, {len(shown['warn'])} advice", acting)] if acting else []
    if shown["accepted"]:
        count = len(shown["accepted"])
        tables.append(Table(f"{count} accepted finding(s), each with its reason (open to read)", list(shown["accepted"].values()), folded=True))
    return tables


def _sentence(text: str) -> str:
    text = (text or "").strip()
    return text if not text or text.endswith((".", "!", "?")) else f"{text}."


def backup_text(made: "BackupResult") -> str:
    """What `opslib backup` prints."""
    m = made.manifest
    rows = sum(m["row_counts"].values())
    return "\n".join(
        [
            f"backup written: {made.path}",
            f"  manifest : {made.path.with_suffix('.json').name}",
            f"  database : {m['database']['name']} at revision {', '.join(m['revisions']) or 'base'}",
            f"  contents : {len(m['row_counts'])} tables, {rows} rows",
            f"  size     : {size_text(m['size_bytes'])}, sha256 {m['sha256'][:16]}…",
            f"  pg_dump  : {m['pg_dump']['version']} for server {m['server_version']}, compression {m['compression']}",
            f"  took     : {m['duration_s']:.2f} s",
        ]
    )


def restore_text(done: "RestoreResult") -> str:
    """What `opslib restore` prints."""
    out = [
        f"restored {done.file.name} into database {done.database!r}",
        f"  revision : {', '.join(done.revisions) or 'base'}",
        f"  matches the manifest (row counts and revision): {'yes' if done.matches_manifest else 'NO'}",
    ]
    if done.replaced_database_kept_as:
        out.append(
            f"  the database it replaced is kept as {done.replaced_database_kept_as!r}; drop it when satisfied"
        )
    if done.removed_leftovers:
        out.append(f"  dropped first, left by killed restores: {', '.join(done.removed_leftovers)}")
    return "\n".join(out)


def cleanup_text(done: "CleanupResult") -> str:
    """What `opslib restore --cleanup` prints."""
    out = [f"dropped {name}" for name in done.dropped] + [f"left {what}" for what in done.left]
    return "\n".join(out) or f"no staging databases of {done.target!r} left by killed restores"


def physical_text(stanza: "StanzaInfo", points: Sequence["SealedPoint"]) -> str:
    """What `opslib backups` prints of pgBackRest: the stanza's backups, then the restore points runs made."""
    from datetime import datetime, timezone

    def when(epoch: float) -> str:
        return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    kept = {b.label for b in stanza.backups}
    backups = text_table(
        ["time", "type", "label", "size", "WAL"],
        [(when(b.stopped_at), b.type, b.label, size_text(b.size), f"{b.wal_start}..{b.wal_stop}") for b in stanza.backups],
    ) if stanza.backups else "no backups"
    points_table = text_table(
        ["made at", "restore point", "LSN", "database", "run", "state"],
        [
            (p.created_at, p.name, p.lsn, p.database, f"{p.runbook} {p.outcome}", _point_state(p, kept))
            for p in points
        ],
    ) if points else "no restore points in the records"
    archive = f"WAL archived {stanza.wal_min}..{stanza.wal_max}" if stanza.wal_min else "no WAL archived"
    return (
        f"pgBackRest stanza {stanza.name} ({stanza.status}; {archive})\n{backups}\n\n"
        f"restore points (recovery -p mode pitr -p restore_point NAME)\n{points_table}"
    )


def _point_state(p: "SealedPoint", kept: set[str]) -> str:
    if p.point is None:
        return "record CHANGED or missing"
    return "recoverable" if p.point.backup_label in kept else f"its backup {p.point.backup_label} expired"


def backups_text(found: Sequence["BackupInfo"]) -> str:
    """What `opslib backups` prints."""
    if not found:
        return "no backups"

    def verified(b: "BackupInfo") -> str:
        if b.verified is None:
            return "not verified"
        word = "verified" if b.verified else "FAILED verification"
        return f"{word}{' (restore-tested)' if b.restore_tested and b.verified else ''} {b.verified_at}"

    return text_table(
        ["time", "database", "revision", "size", "verification", "file"],
        [
            (
                b.started_at,
                b.database,
                "+".join(b.revisions) or "base",
                size_text(b.size_bytes),
                verified(b),
                b.path.name,
            )
            for b in found
        ],
    )


class Section:
    """What a runbook step shows: a title, its status, facts, an optional table and optional text.

    Renders as HTML in JupyterLab and as plain text elsewhere (papermill's text output, nbval).
    """

    def __init__(
        self,
        title: str,
        status: str,
        facts: Sequence[tuple[str, object]] = (),
        rows: Sequence[dict] = (),
        text: str = "",
        skipped: bool = False,
        tables: Sequence[Table] = (),
    ):
        self.title = title
        self.tables = list(tables)
        self.status = status
        self.skipped = skipped  # the step had nothing to do: recorded as skipped, not succeeded
        self.facts = list(facts)
        self.rows = list(rows)
        self.text = text

    def again(self, note: str) -> "Section":
        """This section shown a second time, its status followed by ``note`` (when and why)."""
        return Section(self.title, f"{self.status} ({note})", self.facts, self.rows, self.text, self.skipped, self.tables)

    @classmethod
    def skip(cls, title: str, why: str) -> "Section":
        """The section of a step that had nothing to do, and why."""
        return cls(title, f"skipped: {why}", skipped=True)

    def __repr__(self) -> str:
        out = [f"{self.title}: {self.status}"]
        out += [f"  {k}: {v}" for k, v in self.facts]
        if self.rows:
            headers = list(self.rows[0])
            out.append(text_table(headers, [[r.get(h) for h in headers] for r in self.rows]))
        out += [table.text() for table in self.tables]
        if self.text:
            out.append(tidy_sql(self.text))
        return "\n".join(out)

    def _repr_html_(self) -> str:
        parts = [f"<h4>{html.escape(self.title)}: {html.escape(self.status)}</h4>"]
        if self.facts:
            cells = "".join(
                f"<tr><th style='{_CELL}'>{html.escape(str(k))}</th><td style='{_CELL}'>{_html_value(v)}</td></tr>"
                for k, v in self.facts
            )
            parts.append(f"<table>{cells}</table>")
        if self.rows:
            parts.append(html_table(self.rows))
        parts += [table.html() for table in self.tables]
        if self.text:
            parts.append(f"<pre style='{_CODE}'>{html.escape(tidy_sql(self.text))}</pre>")
        return "\n".join(parts)


# Text left-aligned and wrapped (a squawk finding is a paragraph, not a 900-character line); code monospace.
_CELL = "text-align:left; vertical-align:top; white-space:pre-wrap; overflow-wrap:anywhere; max-width:80ch"
_CODE = "font-family:var(--jp-code-font-family, monospace); white-space:pre-wrap; line-height:1.3"
# Outcomes and check results in colour, the word kept (colour is never the only sign); each reads at 6:1 or
# better on the white and the greys (#f5f5f5, #eee) JupyterLab and nbconvert give table rows.
_GREEN, _AMBER, _RED, _GREY = "#116329", "#7d4e00", "#a40e26", "#424a53"
_COLOURS = {
    "pass": _GREEN, "succeeded": _GREEN, "passed": _GREEN,
    "warn": _AMBER, "lock timeout": _AMBER, "interrupted": _AMBER, "abandoned": _AMBER,
    "fail": _RED, "failed": _RED, "refused": _RED, "invalid": _RED, "locked": _RED,
    "skip": _GREY, "skipped": _GREY,
    "blocks": _RED, "advice": _AMBER, "accepted": _GREY,  # a lint finding's verdict
}  # fmt: skip


def show_now(section: Section) -> None:
    """Display a section now (before a step raises, or ahead of what follows it), in a notebook or a terminal."""
    try:
        from IPython.display import display  # noqa: PLC0415 -- IPython comes with ipykernel, not with the CLI
    except ImportError:  # a bare interpreter just prints
        print(repr(section))
    else:
        display(section)


def _cell_style(value: object) -> str:
    """A cell's style: a short value (a verdict, a revision, "1 row", "32.0 kB") is kept on one line, so that
    the long ones beside it (a finding, what to do) take the width, not it."""
    return _CELL + ("; white-space:nowrap" if len("" if value is None else str(value)) <= SHORT_CELL else "")


SHORT_CELL = 24  # characters: a squawk rule's name, a revision id, a size


def _html_value(value: object) -> str:
    """A cell's value as HTML: an outcome or check result in its colour, anything else as text."""
    if value is None:
        return ""
    colour = _COLOURS.get(str(value).strip().lower())
    if colour:
        return f"<span style='color:{colour}; font-weight:600'>{html.escape(str(value))}</span>"
    return inline_markdown(str(value))


def inline_markdown(text: str) -> str:
    """Text as HTML with its `code spans` (squawk's messages, opslib's hints) shown as code, not backticks."""
    parts = re.split(r"`([^`\n]+)`", text)
    return "".join(html.escape(p) if i % 2 == 0 else f"<code>{html.escape(p)}</code>" for i, p in enumerate(parts))


def tidy_sql(text: str) -> str:
    """SQL (or any block of text) as shown: at most one blank line between statements, no trailing space."""
    lines = [line.rstrip() for line in text.rstrip().splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def html_table(rows: Sequence[dict]) -> str:
    """Rows as an HTML table, written directly: a step's table costs no pandas import in the kernel."""
    headers = list(rows[0])
    head = "".join(f"<th style='{_cell_style(h)}'>{html.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td style='{_cell_style(r.get(h))}'>{_html_value(r.get(h))}</td>" for h in headers) + "</tr>"
        for r in rows
    )
    return f"<table class='dataframe'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def runbooks_text(folder, workflows: Mapping[str, Any]) -> str:
    """What `opslib runbooks` prints: each runbook's purpose and parameters, from its workflow's declaration
    (``workflows``: name -> workflow class, see :mod:`opslib.workflows`) and its notebook's first line."""
    import json
    from pathlib import Path

    out = []
    for name, workflow in workflows.items():
        path = Path(folder) / f"{name}.ipynb"
        purpose = workflow.about
        if path.is_file():
            first = json.loads(path.read_text())["cells"][0]["source"]
            first = "".join(first) if isinstance(first, list) else first
            purpose = first.splitlines()[0].lstrip("# ").strip()
        out.append(f"{name}: {purpose}   ({path})")
        out += [f"    {p.cell_line()}" for p in workflow.parameters]
        out.append("")
    return "\n".join(out).rstrip()


def record_text(record: RunRecord) -> str:
    """A run record's steps as a table, as `opslib run` prints them, then what its runbook added to it
    (init-prod's data changes, a rehearsal's findings)."""
    rows = [(s.name, s.outcome, s.duration_s) for s in record.steps]
    text = text_table(["step", "outcome", "seconds"], rows) if rows else "no step ran"
    changes = record.data_changes
    if changes:  # init-prod: what it inserted, and what was there already
        made = [(c.item, c.table, c.created, c.present) for c in changes]
        text += "\n\n" + text_table(["item", "table", "created", "already there"], made)
        if not any(c.created for c in changes):
            text += "\nnothing to do: every essential is there already (nothing was changed)"
    if record.rehearsal is not None:
        text += "\n\n" + rehearsal_text(record.rehearsal)
    return text


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"  # None only in a record edited by hand


def rehearsal_text(found: Rehearsal) -> str:
    """A rehearsal's findings: the copy, each revision's time and locks per pass, and the differences."""
    copy = found.copy
    lines = [f"copy: {(copy.database if copy else None) or 'none'}"
             + (f", by {copy.method} in {_seconds(copy.seconds)} s" if copy and copy.method else "")
             + ("" if found.copy_dropped in (True, None) else f" ({found.copy_dropped})")]
    if found.stale_copies_dropped:
        lines.append("dropped first, left by killed rehearsals: " + ", ".join(found.stale_copies_dropped))
    rows = [
        (r.passage, r.revision, _seconds(r.seconds),
         "; ".join(f"{lk.table}: {lk.mode}" for lk in r.locks) or "none in its transaction",
         ", ".join(r.access_exclusive_on_rows))
        for r in found.revisions
    ]  # fmt: skip
    if rows:
        lines.append(text_table(["pass", "revision", "seconds", "locks", "blocks reads of (rows)"], rows))
    elif not (copy and copy.database):
        lines = ["nothing to rehearse: the database is at the target already (no copy was made)"]
    for name, diff in found.differences.named():
        lines.append(f"{name.replace('_', ' ')}: " + ("; ".join(diff.lines()) or "no difference"))
    return "\n".join(lines)


def runs_text(runs: Sequence[dict]) -> str:
    """What `opslib audit list` prints."""
    if not runs:
        return "no runs recorded"
    columns = [
        ("started", "started_at"), ("run id", "run_id"), ("runbook", "runbook"), ("env", "env"),
        ("operator", "operator"), ("database", "database"), ("revisions", "revisions"),
        ("outcome", "outcome"), ("seconds", "duration_s"), ("warnings", "warnings"),
    ]  # fmt: skip
    headers, keys = [h for h, _ in columns], [k for _, k in columns]
    shown = [
        {
            **r,
            "warnings": ", ".join(r.get("warnings") or []),
            "duration_s": "" if r.get("duration_s") is None else f"{r['duration_s']:.3f}",  # one precision throughout
        }
        for r in runs
    ]
    return text_table(headers, [[r.get(k) for k in keys] for r in shown])


def _where(database: Database | None) -> str:
    if not database:
        return "not reached"
    host = database.host or ""
    place = f"socket in {host}" if host.startswith("/") else f"{host}:{database.port or 5432}"
    return f"{database.name} on {place}"


def _outcome_text(record: RunRecord) -> str:
    """The outcome and its exit code; an abandoned run has none (no process was left to exit)."""
    code = record.exit_code
    return f"{record.outcome} (exit {code})" if code is not None else f"{record.outcome} (no exit code)"


def _revs(revisions: Sequence[str] | None) -> str:
    return revisions_text(revisions, "+")


def sealed_facts(has_start: bool, has_warnings: bool) -> frozenset[str]:
    """The facts of a run's page that its ledger entries keep (see audit.as_sealed): on a page whose
    sidecar was edited, every other fact is marked as the edited file's. The parameters, the mode and the
    template come from a start entry, and the skipped safeguards from an ending that sealed them."""
    found = {"run", "outcome", "when", "environment", "database", "revisions", "sealed by"}
    if has_start:
        found |= {"parameters", "driven", "template sha256"}
    if has_warnings:
        found.add("safeguards skipped")
    return frozenset(found)


def run_facts(record: RunRecord, warnings: list[str] | None = None) -> list[tuple[str, str]]:
    """A run's facts, as `opslib audit show` and the audit report list them (no password: the
    sidecar holds the database as host, port and name). ``warnings`` are the skipped safeguards its ledger
    entry sealed; without them they are read from ``record``. A record read from a file that may have been
    edited comes through :meth:`RunRecord.tolerant`."""
    backup = record.backup
    skipped = skipped_safeguards(record.to_dict()) if warnings is None else warnings
    return [
        ("run", f"{record.run_id} ({record.runbook})"),
        ("outcome", _outcome_text(record)),
        ("error", record.error or ""),
        ("when", f"{record.started_at} -> {record.finished_at}"),
        ("who", f"{record.operator} on {record.host}"),
        ("environment", record.env),
        ("database", _where(record.database)),
        ("fingerprint", record.fingerprint or ""),
        ("revisions", f"{_revs(record.revisions_before)} -> {_revs(record.revisions_after)}"),
        ("backup", (backup.path if backup else None) or "none"),
        ("backup sha256", (backup.sha256 if backup else None) or ""),
        ("parameters", json.dumps(record.parameters, sort_keys=True)),
        ("notebook", record.notebook or "not kept (run outside `opslib run` and `opslib open`)"),
        ("driven", _MODES.get(record.mode or "", record.mode or "")),
        ("sealed by", record.sealed_by or ""),
        ("safeguards skipped", ", ".join(skipped)),
        ("plan", _plan_text(record.plan)),
        ("approvals", approval.approvals_text(record.approvals or [], record.approvals_needed or 0)
         if record.approvals or record.approvals_needed else ""),
        ("template sha256", record.runbook_sha256 or ""),
        ("opslib / git", _version_text(record)),
    ]


def _plan_text(plan: dict | None) -> str:
    """The plan a run was held to, in one line (empty: none)."""
    if not isinstance(plan, dict):
        return ""
    target = plan.get("target") if isinstance(plan.get("target"), dict) else {}
    pending = plan.get("pending") if isinstance(plan.get("pending"), list) else []
    return (f"sha256 {approval.plan_sha256(plan)}, made by {plan.get('author')} at {plan.get('created_at')}: "
            f"{len(pending)} revision(s) on {target.get('database')} (server {target.get('system_identifier')}), "
            f"SQL sha256 {plan.get('sql_sha256')} ({plan.get('sql_source')})")  # fmt: skip


_MODES = {
    "headless": "headless (`opslib run`)",
    "interactive": "interactive (`opslib open`, JupyterLab)",
    "direct": "directly (papermill or a notebook, without `opslib run` or `opslib open`)",
}


def _version_text(record: RunRecord) -> str:
    commit = record.git_commit or "no git commit"
    dirty = {True: " (uncommitted changes)", False: " (clean)"}.get(record.git_dirty, "")
    return f"{record.opslib_version} / {commit}{dirty}"


def run_text(record: RunRecord, changed_after_sealing: Sequence[str] = ()) -> str:
    """What `opslib audit show` prints: the facts first, then each step; first of all, when the sidecar
    was changed after the run was sealed, each fact the ledger keeps that the file no longer says."""
    facts = [(k, v) for k, v in run_facts(record) if v]
    width = max(len(k) for k, _ in facts)
    out = [f"{k:{width}}: {v}" for k, v in facts]
    if changed_after_sealing:
        out[:0] = [
            "CHANGED AFTER THE RUN: its sidecar no longer matches its ledger entry; the facts and step outcomes",
            "below are the ledger's where it keeps them, and `opslib audit verify` fails on it:",
            *(f"  {change}" for change in changed_after_sealing),
            "",
        ]
    out.append("")
    out.append(record_text(record))
    return "\n".join(out)


def database_history_text(runs: Sequence[dict], events: Sequence[dict]) -> str:
    """What `opslib history --runs` prints: runs, then every revision applied, reversed or stamped."""
    if not runs and not events:
        return "no opslib history in this database yet"
    out = ["runs"]
    out.append(
        text_table(
            ["run id", "runbook", "outcome", "operator", "env", "before", "after", "finished"],
            [
                (
                    r["run_id"],
                    r["runbook"],
                    r["outcome"],
                    r["operator"],
                    r["env"],
                    revisions_text(r["revisions_before"], "+"),
                    revisions_text(r["revisions_after"], "+"),
                    r["finished_at"],
                )
                for r in runs
            ],
        )
    )
    out += ["", "revision events"]
    out.append(
        text_table(
            ["#", "recorded", "run id", "direction", "revision", "database moved", "message"],
            [
                (
                    e["id"],
                    e["recorded_at"],
                    e["run_id"] or "-",
                    e["direction"],
                    e["revision"],
                    f"{_revs(e['from_revisions'])} -> {_revs(e.get('to_revisions'))}",
                    first_line(e["message"]),
                )
                for e in events
            ],
        )
    )
    return "\n".join(out)


def fleet_text(record: dict) -> str:
    """A fleet run's summary: one row per target (wave, outcome, revisions, seconds, backup, run id), then
    the targets it did not start and why."""
    rows = [
        (
            r["target"], "canary" if r["wave"] == 0 and record.get("canary") else str(r["wave"]), r["state"],
            "not read" if r["revisions_before"] is None else revisions_text(r["revisions_before"]),
            "not read" if r["revisions_after"] is None else revisions_text(r["revisions_after"]),
            "" if r["duration_s"] is None else f"{r['duration_s']:.3f}", r["backup"] or "", r["run_id"] or "",
        )
        for r in record["targets"]
    ]
    text = text_table(["target", "wave", "outcome", "before", "after", "seconds", "backup", "run id"], rows)
    skipped = [r["target"] for r in record["targets"] if r["state"] == "not started"]
    if record.get("halted"):
        text += f"\nhalted: {record['halted']}; not started: {', '.join(skipped) or 'none'}"
    return text


def fleet_plan_text(waves: Sequence[Sequence[str]], standings: Sequence, canary: bool) -> str:
    """A fleet's dry run: each wave's targets with their current and pending revisions."""
    where = {s.target: s for s in standings}
    rows = []
    for i, names in enumerate(waves):
        for name in names:
            s = where[name]
            rows.append(("canary" if i == 0 and canary else str(i), name, s.current, s.error or s.pending))
    return text_table(["wave", "target", "current", "pending"], rows)

