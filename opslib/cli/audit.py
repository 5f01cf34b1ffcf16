"""The records as a group of commands: `opslib audit list|show|verify|report|summary|seal`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from opslib.cli.commands import arg, command, group
from opslib.cli.common import EXIT_OK, databases_given, seal_abandoned

group(
    "audit",
    "the run records: list, show one, verify them against the ledger, write an HTML report, summarize them "
    "for an auditor, or seal an interactive run",
)

JSON = arg("--json", action="store_true")
TARGETS = arg(
    "--targets", type=Path, metavar="FILE",
    help="the fleet file whose targets' databases to cross-check with (default: the project's, when it has one)",
)  # fmt: skip


def _records(settings, action: str) -> Path:
    """The records folder (it must exist), after sealing what killed runs left."""
    from opslib import audit

    records = audit.require_records_dir(settings.records_dir)
    seal_abandoned(settings, f"audit {action}")
    return records


@command("list", JSON, arg("--warnings", action="store_true", help="only the runs that went without a safeguard"), group="audit")
def list_runs(settings, args) -> int:
    """the runs in the ledger, newest last, with their outcome and the safeguards they went without"""
    from opslib import display, runlist

    runs = [r for r in runlist.list_runs(_records(settings, "list")) if r["warnings"] or not args.warnings]
    print(json.dumps(runs, indent=2, default=str) if args.json else display.runs_text(runs))
    return EXIT_OK


@command("show", arg("run_id", nargs="?", metavar="RUN_ID", help="the run's id"), JSON, group="audit")
def show(settings, args) -> int:
    """one run as the ledger sealed it, and what changed in its files since"""
    from opslib import audit, display
    from opslib.errors import InvalidInput
    from opslib.record import RunRecord

    records = _records(settings, "show")
    if not args.run_id:
        raise InvalidInput("audit show needs a RUN_ID: `opslib audit list` shows them")
    record = audit.find_run(records, args.run_id)
    if args.json:  # the record as the ledger and the file say it, odd values and all
        print(json.dumps(record, indent=2, default=str))
    else:  # a sidecar may have been edited into any shape: read through the one tolerant reader
        print(display.run_text(RunRecord.tolerant(record), record.get("changed_after_sealing") or ()))
    return EXIT_OK


@command(
    "verify",
    arg(
        "--database", action="append", nargs="?", const="", metavar="URL",
        help="also cross-check the ledger with the database at URL (repeatable; the URL is best given as $VAR), "
        "and fail unless each is reached; alone, fail unless the configured database is reached. Every database "
        "reachable from the environment or the fleet file is cross-checked anyway",
    ),
    TARGETS,
    group="audit",
)  # fmt: skip
def verify(settings, args) -> int:
    """check the chain, every record against the ledger, and the ledger against its anchors (exit 3 on a problem)"""
    from opslib import anchors, audit
    from opslib.errors import ChecksFailed

    records = _records(settings, "verify")
    check = audit.check_ledger(records, anchors.out_of_reach(settings), _approvals(settings))
    anchored, against_database = anchors.cross_check(
        settings, check.entries, *databases_given(settings, args), require=args.database is not None
    )
    problems = check.problems + against_database
    if check.waiting:
        print("\n".join(check.waiting))
    if check.unsigned:  # said, not a problem: a production run without an operator's key is unsigned, not forged
        print(f"unsigned entries ({len(check.unsigned)}, production or after the first signed one): {', '.join(check.unsigned)}")
    if problems:
        print("\n".join(problems))
        raise ChecksFailed(f"audit verify: {len(problems)} problem(s) in {records}; the first: {problems[0]}")
    print(
        f"audit verify: {len(audit.ended_entries(check.entries))} run(s), every record matches the ledger and "
        f"the chain is intact; {anchored}"
    )
    if check.signed:
        print(f"signatures: {check.signed} signed entr(ies) verified against {_approvals(settings).signers_file}")
    return EXIT_OK


def _approvals(settings):
    """The project's ``[approvals]``: how many a production deploy needs, and the allowed_signers file every
    signature in the records is checked against (the auditor's, not what each run read)."""
    from opslib.policy import load_approval_policy

    return load_approval_policy(settings.alembic_ini)


@command(
    "report",
    arg("--out", type=Path, help="the folder to write (default: <records>/report)"),
    arg("--screenshot", action="store_true", help="also save index.png, as headless Chromium shows it"),
    arg(
        "--full", action="store_true",
        help="render every run page again (by default a page is kept while its run, its files, opslib and "
        "nbconvert are unchanged)",
    ),
    TARGETS,
    group="audit",
)  # fmt: skip
def report(settings, args) -> int:
    """the records as a static HTML site, checked against the ledger (exit 3 on a problem)"""
    from opslib import anchors, report
    from opslib.errors import ChecksFailed

    records = _records(settings, "report")
    given = databases_given(settings, args)
    written = report.build_report(
        records,
        args.out or records / "report",
        cross_check=lambda entries: anchors.cross_check(settings, entries, *given)[1],
        full=args.full,
        out_of_reach=anchors.out_of_reach(settings),
        approvals=_approvals(settings),
    )
    if args.screenshot:
        written.screenshot = report.screenshot(written.index, written.out / report.SCREENSHOT)
        print(f"screenshot: {written.screenshot}")
    print(written.line())
    if written.problems:
        # The report is written either way; automation still learns that the records were changed.
        raise ChecksFailed(
            f"audit report: {len(written.problems)} problem(s) in {records}; the first: {written.problems[0]}"
        )
    return EXIT_OK


@command("summary", JSON, group="audit")
def summary(settings, args) -> int:
    """runs per environment and outcome, and the production changes with their backups, for an auditor"""
    from opslib import anchors, audit
    from opslib import summary as summaries
    from opslib.errors import ChecksFailed

    records = _records(settings, "summary")
    # Checked as verify checks it: a run cut from the ledger shows through its anchors, not the chain.
    check = audit.check_ledger(records, anchors.out_of_reach(settings), _approvals(settings))
    against = anchors.cross_check(settings, check.entries, *databases_given(settings, args))[1]
    found = summaries.audit_summary(records, replace(check, unvouched=check.unvouched + against))
    print(json.dumps(found, indent=2, default=str) if args.json else summaries.summary_text(found))
    problems = found["verification"]["problems"]
    if problems:  # printed whole either way; automation still learns that the records were changed
        raise ChecksFailed(f"audit summary: {len(problems)} problem(s) in {records}; the first: {problems[0]}")
    return EXIT_OK


@command("seal", arg("run_id", nargs="?", metavar="RUN_ID", help="the run's id"), group="audit")
def seal(settings, args) -> int:
    """seal a run its process left unsealed (an interactive run whose notebook was not saved)"""
    from opslib import audit, lab
    from opslib.errors import InvalidInput

    audit.require_records_dir(settings.records_dir)
    if not args.run_id:
        raise InvalidInput("audit seal needs a RUN_ID: `opslib audit list` shows them")
    record, now = lab.seal(settings, args.run_id)
    what = "sealed" if now else "already sealed"
    notebook = f", with its notebook {record.notebook}" if record.notebook else ""
    print(f"audit seal: run {record.run_id} ({record.runbook}) {what} as {record.outcome}{notebook}")
    return EXIT_OK
