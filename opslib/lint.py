"""Lint the SQL a deploy will run with squawk, tie each finding to its revision and table, and
judge it against the target database.

squawk (the ``squawk-cli`` package) owns the rules; opslib decides what each finding means here:

- a statement on a table that the same deploy creates, or on a table absent or empty in the
  target, cannot hold up traffic: it is information and never blocks (a 150-revision history
  deployed to an empty database is all information);
- on a table holding rows, a blocking rule's finding blocks, showing the table's rows and size,
  unless the project accepted it: in its policy file (:mod:`opslib.policy`), or in a comment of
  the revision file itself::

    # opslib-accept: ban-drop-column -- step 3 of the email change; every address is in email_new

The SQL is Alembic's offline rendering of the pending range; its ``-- Running upgrade A -> B``
lines say which revision each statement belongs to.
"""

from __future__ import annotations

import bisect
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, NamedTuple

from opslib.db import TableFacts
from opslib.errors import PreconditionFailed
from opslib.migrate import RUNNING_MARKER
from opslib.policy import Policy

# Rules whose findings stop a deploy: they take locks that stall traffic, or lose data.
BLOCKING_RULES = frozenset(
    {
        "adding-field-with-default",
        "adding-foreign-key-constraint",
        "adding-not-nullable-field",
        "adding-required-field",
        "ban-alter-domain-with-add-constraint",
        "ban-char-field",
        "ban-concurrent-index-creation-in-transaction",
        "ban-drop-column",
        "ban-drop-database",
        "ban-drop-not-null",
        "ban-drop-table",
        "ban-truncate-cascade",
        "changing-column-type",
        "constraint-missing-not-valid",
        "disallowed-unique-constraint",
        "renaming-column",
        "renaming-table",
        "require-concurrent-index-creation",
        "require-concurrent-index-deletion",
    }
)
# opslib sets lock_timeout (and runs each revision on its own), so these are handled, not findings.
HANDLED_RULES = {
    "require-lock-timeout": "opslib sets lock_timeout on every migration connection",
    "require-statement-timeout": "opslib bounds waiting with lock_timeout; long data migrations are expected",
}

_ACCEPT = re.compile(r"#\s*opslib-accept:\s*([a-z0-9-]+)\s*(?:--|:)?\s*(.*)$", re.M)


class Severity(Enum):
    """What a finding means for the deploy."""

    BLOCK = "block"  # stops the deploy (exit 3) until fixed or accepted
    WARN = "warn"  # advice, shown
    INFO = "info"  # cannot hold up traffic here (a new, absent or empty table)
    ACCEPTED = "accepted"  # would block, but the project accepted it, with a reason


@dataclass(frozen=True)
class Finding:
    """One squawk finding, with its revision, the table it concerns, and what opslib makes of it."""

    revision: str
    rule: str
    message: str
    line: int  # 1-based line of the rendered SQL
    severity: Severity
    reason: str = ""  # why it was accepted, when it was
    table: str | None = None
    context: str = ""  # what the target says about the table: new, empty, or its rows and size
    help: str = ""  # squawk's advice on what to do instead (markdown: `code` in backticks)
    rows: str = ""  # the table's rows in the target, as read ("1,204 rows"), when it was read
    size: str = ""  # the table's size in the target, as read ("32.0 kB")

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {
            "revision": self.revision,
            "rule": self.rule,
            "message": self.message,
            "line": self.line,
            "severity": self.severity.value,
            "reason": self.reason,
            "table": self.table,
            "context": self.context,
            "help": self.help,
            "rows": self.rows,
            "size": self.size,
        }


@dataclass(frozen=True)
class Statement:
    """One statement of the rendered SQL: where it is, which revision it belongs to, what it touches."""

    first_line: int  # 0-based, as squawk counts
    last_line: int
    revision: str
    text: str


def squawk_path() -> str:
    """The squawk program: beside this Python (the venv's bin), else on PATH."""
    local = Path(sys.executable).parent / "squawk"
    if local.is_file():
        return str(local)
    found = shutil.which("squawk")
    if not found:
        raise PreconditionFailed(
            "squawk is not installed: `pip install squawk-cli` (it is one of opslib's dependencies)"
        )
    return found


def accepted_rules(revision_file: str | Path) -> dict[str, str]:
    """The ``# opslib-accept: RULE -- reason`` comments of a revision file."""
    try:
        text = Path(revision_file).read_text()
    except OSError:
        return {}
    return {rule: reason.strip() for rule, reason in _ACCEPT.findall(text)}


def run_squawk(sql: str, pg_version: str | None = None) -> list[dict]:
    """squawk's findings on ``sql``, one process for the whole script."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(sql)
        path = f.name
    try:
        cmd = [squawk_path(), path, "--reporter", "json"]
        if pg_version:
            cmd.append(f"--pg-version={pg_version}")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        Path(path).unlink(missing_ok=True)
    try:
        return json.loads(done.stdout or "[]")
    except ValueError:
        raise PreconditionFailed(
            f"squawk gave no report: {(done.stderr or done.stdout).strip()[:200]}"
        ) from None


def is_squawk_rule(name: str) -> bool:
    """Whether the installed squawk knows a rule called ``name``: its ``--exclude`` refuses any other
    name (exit 2), so a project's policy is checked against the squawk that will lint its SQL."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write("SELECT 1;\n")
        path = f.name
    try:
        done = subprocess.run([squawk_path(), f"--exclude={name}", path], capture_output=True, text=True, timeout=60)
    finally:
        Path(path).unlink(missing_ok=True)
    return done.returncode != 2


def statements(sql: str) -> list[Statement]:
    """Split rendered SQL into statements, each with its revision.

    Quotes (with ``E'...'`` backslash escapes), dollar quotes and both kinds of comment are
    respected. Alembic writes its ``-- Running upgrade A -> B`` markers only between statements,
    so a marker always ends the statement before it: a quote the splitter misread cannot carry one
    revision's statements into another's.
    """
    return _Splitter(sql).split()


class _Splitter:
    """One pass over rendered SQL, character by character: where it is (``i``, the 0-based ``line``), the
    revision of the latest marker, where the open statement began, the quote it is inside, and the
    statements found so far."""

    def __init__(self, sql: str):
        self.sql = sql
        self.found: list[Statement] = []
        self.revision = "(version table)"  # before the first marker, Alembic creates its version table
        self.start: tuple[int, int] | None = None  # (offset, line) where the open statement began
        self.line = 0
        self.i, self.n = 0, len(sql)
        self.quote: str | None = None
        self.escapes = False  # inside E'...', where a backslash escapes the next character

    def split(self) -> list[Statement]:
        """The statements of the whole text, in order."""
        while self.i < self.n:
            ch = self.sql[self.i]
            if (ch == "\n" or self.i == 0) and self._take_marker(ch):
                continue
            if self.quote is not None:
                self._step_in_quote(ch)
                continue
            if self._skip_comment_or_space(ch):
                continue
            self._step_in_statement(ch)
        self._close(self.n)
        return self.found

    def _close(self, end: int) -> None:
        """End the open statement at offset ``end``, keeping it unless it is blank."""
        sql, start = self.sql, self.start
        if start is not None and sql[start[0] : end].strip():
            self.found.append(Statement(start[1], self.line, self.revision, sql[start[0] : end].rstrip()))
        self.start = None

    def _take_marker(self, ch: str) -> bool:
        """At a line's start: pass a ``-- Running upgrade`` marker, if one is there, ending the open
        statement and any quote; the statements after it are its revision's. Whether there was one."""
        marker = RUNNING_MARKER.match(self.sql, self.i + 1 if ch == "\n" else self.i)
        if not marker:
            return False
        self._close(self.i)
        self.quote, self.escapes = None, False
        self.revision = marker.group(3).split(", ")[-1]
        self.line += 1 if ch == "\n" else 0
        self.i = marker.end()
        return True

    def _step_in_quote(self, ch: str) -> None:
        """Inside a quote: pass an escaped character, the closing quote, or one character."""
        if self.escapes and ch == "\\":
            self.i += 2
            return
        if self.sql.startswith(self.quote, self.i):
            self.i += len(self.quote)
            self.quote, self.escapes = None, False
            return
        if ch == "\n":
            self.line += 1
        self.i += 1

    def _skip_comment_or_space(self, ch: str) -> bool:
        """Outside quotes: pass a comment or one blank character, if one is there. Whether there was one."""
        sql, i = self.sql, self.i
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            self.i = self.n if end < 0 else end
            return True
        if sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = self.n if end < 0 else end + 2
            self.line += sql.count("\n", i, end)
            self.i = end
            return True
        if ch == "\n":
            self.line += 1
            self.i += 1
            return True
        if ch.isspace():
            self.i += 1
            return True
        return False

    def _step_in_statement(self, ch: str) -> None:
        """A character of a statement: it begins one when none is open, opens a quote, or ends it (``;``)."""
        sql, i = self.sql, self.i
        if self.start is None:
            self.start = (i, self.line)
        if ch in "'\"":
            self.quote = ch
            self.escapes = ch == "'" and i > 0 and sql[i - 1] in "eE" and (i < 2 or not sql[i - 2].isalnum())
        elif ch == "$":
            tag = re.match(r"\$[A-Za-z_0-9]*\$", sql[i:])
            if tag:
                self.quote = tag.group(0)
                self.i += len(self.quote)
                return
        elif ch == ";":
            self._close(i)
        self.i += 1


_NAME = r'((?:"[^"]+"|[A-Za-z_][\w$]*)(?:\.(?:"[^"]+"|[A-Za-z_][\w$]*))?)'
_TOUCHES = [
    re.compile(r"^ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?" + _NAME, re.I),
    re.compile(
        r"^CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:CONCURRENTLY\s+)?(?:IF\s+NOT\s+EXISTS\s+)?(?:\S+\s+)?ON\s+(?:ONLY\s+)?"
        + _NAME,
        re.I,
    ),
    re.compile(r"^CREATE\s+(?:UNLOGGED\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?" + _NAME, re.I),
    re.compile(r"^DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?" + _NAME, re.I),
    re.compile(r"^TRUNCATE\s+(?:TABLE\s+)?(?:ONLY\s+)?" + _NAME, re.I),
    re.compile(r"^(?:UPDATE|DELETE\s+FROM|INSERT\s+INTO)\s+(?:ONLY\s+)?" + _NAME, re.I),
]
_CREATE_TABLE = re.compile(r"^CREATE\s+(?:UNLOGGED\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?" + _NAME, re.I)
_RENAME_TABLE = re.compile(
    r"^ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?" + _NAME + r"\s+RENAME\s+TO\s+" + _NAME, re.I
)
_CREATE_INDEX = re.compile(
    r"^CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:CONCURRENTLY\s+)?(?:IF\s+NOT\s+EXISTS\s+)?(\S+)\s+ON\s+(?:ONLY\s+)?"
    + _NAME,
    re.I,
)
_DROP_INDEX = re.compile(r"^DROP\s+INDEX\s+(?:CONCURRENTLY\s+)?(?:IF\s+EXISTS\s+)?" + _NAME, re.I)


def _norm(name: str) -> str:
    """A table name as PostgreSQL resolves it: unquoted parts folded to lower case, ``public.`` when unqualified."""
    parts = [p[1:-1] if p.startswith('"') else p.lower() for p in re.findall(r'"[^"]+"|[^.]+', name)]
    return ".".join(parts if len(parts) > 1 else ["public", *parts])


def _quoted(name: str) -> str:
    """A normalised name as SQL text, each part quoted, for ``to_regclass``."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def _shown(name: str) -> str:
    return name.removeprefix("public.")


class _Walk:
    """The plan's statements in order: the table each concerns, and the tables the plan has created
    (or renamed from one it created) before it. Names are qualified (``public.orders``).

    A ``CREATE TABLE IF NOT EXISTS`` creates nothing when the table is already there: such tables
    are also listed in ``if_absent``, and count as created only when the target lacks them. A table
    the target already has and the plan renames keeps its facts under its new name (``renamed``).
    """

    def __init__(self, stmts: list[Statement]):
        self.created_at: dict[int, set[str]] = {}  # statement index -> tables the plan created by then
        self.table_of: dict[int, str | None] = {}
        self.if_absent: set[str] = set()
        self.renamed: dict[str, str] = {}  # new name -> the target's table it was renamed from
        created: set[str] = set()
        index_table: dict[str, str] = {}
        for k, st in enumerate(stmts):
            text = st.text.strip()
            rename = _RENAME_TABLE.match(text)
            drop_index = _DROP_INDEX.match(text)
            make_index = _CREATE_INDEX.match(text)
            if make_index:
                index_table[_norm(make_index.group(1)).rsplit(".", 1)[-1]] = _norm(make_index.group(2))
            if drop_index:
                idx = _norm(drop_index.group(1))
                table = index_table.get(idx.rsplit(".", 1)[-1], f"index:{idx}")
            else:
                table = next((_norm(m.group(1)) for m in (p.match(text) for p in _TOUCHES) if m), None)
            made = _CREATE_TABLE.match(text)
            if made:
                created.add(_norm(made.group(1)))
                if re.search(r"\bIF\s+NOT\s+EXISTS\b", text[: made.end()], re.I):
                    self.if_absent.add(_norm(made.group(1)))
            self.created_at[k] = set(created)
            self.table_of[k] = table
            if rename:
                old = _norm(rename.group(1))
                new = old.rsplit(".", 1)[0] + "." + _norm(rename.group(2)).rsplit(".", 1)[-1]
                if old in created:
                    created.add(new)
                else:
                    self.renamed[new] = self.renamed.get(old, old)

    def created_by_plan(self, k: int, facts: dict[str, TableFacts]) -> set[str]:
        """Tables the plan has created before statement ``k``, given what the target holds."""
        already = {name for name in self.if_absent if facts.get(name) and facts[name].exists}
        return self.created_at.get(k, set()) - already

    def target_table(self, table: str) -> str:
        """The target's table whose facts ``table`` stands for (itself, or what the plan renamed)."""
        return self.renamed.get(table, table)


def lint(
    sql: str,
    revision_files: dict[str, str],
    *,
    pg_version: str | None = None,
    policy: Policy | None = None,
    read_tables: Callable[[list[str]], dict[str, TableFacts]] | None = None,
) -> list[Finding]:
    """Run squawk on ``sql`` and return its findings, each tied to a revision and a table, and judged.

    ``read_tables(names)`` reads the target's tables (see :func:`opslib.db.table_facts`); without
    it every table is taken to hold rows, which is the cautious reading.
    """
    policy = policy or Policy()
    raw = run_squawk(sql, pg_version)
    stmts = statements(sql)
    walk = _Walk(stmts)
    located = _locate(raw, stmts)
    facts = _read(_tables_to_read(walk, located), read_tables)
    accepted_in_files = {rev: accepted_rules(path) for rev, path in revision_files.items()}
    findings = []
    for found in located:
        default = "block" if found.rule in BLOCKING_RULES else "warn"
        action = policy.action(found.rule, default)
        if action == "ignore":
            continue
        findings.append(_finding(found, action, walk, facts, policy, accepted_in_files))
    return findings


class _Located(NamedTuple):
    """One squawk finding, its rule and 0-based line, and the statement holding that line (and its index)."""

    item: dict
    rule: str
    line: int
    k: int | None
    statement: Statement | None


def _locate(raw: list[dict], stmts: list[Statement]) -> list[_Located]:
    """squawk's findings in its order, each with its statement, leaving out the rules opslib handles."""
    starts = [st.first_line for st in stmts]
    located = []
    for item in raw:
        rule = item.get("rule_name", "")
        if rule in HANDLED_RULES:
            continue
        line = int(item.get("line", 0))
        k = _statement_at(starts, line)
        located.append(_Located(item, rule, line, k, stmts[k] if k is not None else None))
    return located


def _tables_to_read(walk: _Walk, located: list[_Located]) -> set[str]:
    """The target's tables the findings concern, and those the plan creates only if absent."""
    wanted = {
        walk.target_table(walk.table_of[k]) for *_, k, _ in located if k is not None and walk.table_of[k]
    }
    wanted |= walk.if_absent
    return wanted


def _finding(
    found: _Located,
    action: str,
    walk: _Walk,
    facts: dict[str, TableFacts],
    policy: Policy,
    accepted_in_files: dict[str, dict[str, str]],
) -> Finding:
    """One finding judged against the target's table, under the policy's ``action`` for its rule."""
    item, rule, line, k, st = found
    revision = st.revision if st else "(version table)"
    table = walk.table_of.get(k) if k is not None else None
    created = walk.created_by_plan(k, facts) if k is not None else set()
    fact = facts.get(walk.target_table(table)) if table else None
    severity, context = _judge(table, created, fact, action)
    reason = ""
    if severity is not Severity.INFO and action == "block":
        severity, reason = _acceptance(severity, revision, rule, policy, accepted_in_files)
    shown = _shown(table.removeprefix("index:")) if table else None
    read = fact is not None and fact.exists and severity is not Severity.INFO
    return Finding(
        revision, rule, item.get("message", ""), line + 1, severity, reason, shown, context,
        help=item.get("help") or "",
        rows=fact.rows_text() if read else "",
        size=fact.size_text() if read else "",
    )


def _acceptance(
    severity: Severity, revision: str, rule: str, policy: Policy, accepted_in_files: dict[str, dict[str, str]]
) -> tuple[Severity, str]:
    """(ACCEPTED, why and where) when the policy or the revision file accepts ``rule`` in ``revision``;
    else ``severity`` unchanged and no reason."""
    in_policy = policy.acceptance(revision, rule)
    in_file = accepted_in_files.get(revision, {}).get(rule, "")
    if not (in_policy or in_file):
        return severity, ""
    where = policy.source.name if in_policy and policy.source else "the revision file"
    return Severity.ACCEPTED, f"{in_policy.reason if in_policy else in_file} (accepted in {where})"


def _read(names: set[str], read_tables) -> dict[str, TableFacts]:
    """The target's facts of each normalised name (``index:NAME`` for an index: its table's)."""
    if not read_tables or not names:
        return {}
    asked = {name: _quoted(name.removeprefix("index:")) for name in names}
    got = read_tables(sorted(set(asked.values())))
    return {name: got[q] for name, q in asked.items() if q in got}


def _statement_at(starts: list[int], line: int) -> int | None:
    """The index of the statement a 0-based line belongs to (the last one starting at or before it)."""
    k = bisect.bisect_right(starts, line) - 1
    return k if k >= 0 else None


def _judge(
    table: str | None, created: set[str], fact: TableFacts | None, action: str
) -> tuple[Severity, str]:
    """(severity, what the target says about the table) for one finding."""
    base = Severity.BLOCK if action == "block" else Severity.WARN
    if table is None:
        return base, ""
    if table.startswith("index:"):  # an index the plan did not build: judged by the table it is on
        index = _shown(table[6:])
        if fact is None:
            return base, f"index {index}: not read"
        if not fact.exists:
            return Severity.INFO, f"index {index} does not exist in the target"
        if fact.has_rows is False:
            return Severity.INFO, f"index {index} is on table {fact.name}, empty in the target"
        return base, f"index {index} on table {fact.describe()}"
    if table in created:
        return Severity.INFO, f"table {_shown(table)} is created by this deploy"
    if fact is None:
        return base, f"table {_shown(table)}: not read"
    if not fact.exists:
        return Severity.INFO, f"table {_shown(table)} does not exist in the target"
    if fact.has_rows is False:
        return Severity.INFO, f"table {_shown(table)} is empty in the target"
    return base, f"table {fact.describe()}"
