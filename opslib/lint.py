"""Lint the SQL a deploy will run with squawk, and tie each finding to its revision.

squawk (the ``squawk-cli`` package) owns the rules; opslib only decides which of them stop a deploy
and which are advice, and lets a revision accept a finding with a reason, in a comment of its own
file::

    # opslib-accept: ban-drop-column -- step 3 of the email change; every address is in email_new

The SQL is Alembic's offline rendering of the pending range; its ``-- Running upgrade A -> B``
lines say which revision each statement belongs to.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from opslib.errors import PreconditionFailed

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

_MARKER = re.compile(r"^-- Running (?:upgrade|downgrade) (\S*) -> (\S+)", re.M)
_ACCEPT = re.compile(r"#\s*opslib-accept:\s*([a-z0-9-]+)\s*(?:--|:)?\s*(.*)$", re.M)


@dataclass(frozen=True)
class Finding:
    """One squawk finding, with its revision and what opslib makes of it."""

    revision: str
    rule: str
    message: str
    line: int
    severity: str  # "fail", "warn" or "accepted"
    reason: str = ""

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


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


def _revision_at(sql: str) -> list[tuple[int, str]]:
    """(first line, revision) of each revision's part of an offline SQL script."""
    spans = []
    for match in _MARKER.finditer(sql):
        spans.append((sql.count("\n", 0, match.start()) + 1, match.group(2)))
    return spans


def lint(sql: str, revision_files: dict[str, str], pg_version: str | None = None) -> list[Finding]:
    """Run squawk on ``sql`` and return its findings, each tied to a revision and judged."""
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
        raw = json.loads(done.stdout or "[]")
    except ValueError:
        raise PreconditionFailed(
            f"squawk gave no report: {(done.stderr or done.stdout).strip()[:200]}"
        ) from None
    spans = _revision_at(sql)
    accepted = {rev: accepted_rules(path) for rev, path in revision_files.items()}
    findings = []
    for item in raw:
        rule = item.get("rule_name", "")
        if rule in HANDLED_RULES:
            continue
        line = int(item.get("line", 0))
        # Before the first revision marker Alembic creates its version table.
        revision = next((rev for start, rev in reversed(spans) if start <= line), "(version table)")
        severity = "fail" if rule in BLOCKING_RULES else "warn"
        reason = accepted.get(revision, {}).get(rule, "")
        if reason:
            severity = "accepted"
        findings.append(Finding(revision, rule, item.get("message", ""), line, severity, reason))
    return findings
