"""The ``opslib`` command: parses arguments, calls opslib, renders the result.

This is the only place where an :class:`~opslib.errors.OpsError` becomes an exit code
(0 done, 1 failed while changing, 2 invalid input, 3 refused by a precondition, 4 locked).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Sequence

from opslib import __version__
from opslib.config import load_settings, runbooks_dir
from opslib.errors import Interrupted, OpsError
from opslib.outcome import Outcome, outcome_of
from opslib.record import revisions_text
from opslib.redact import CleanStream, redact_urls_in

EXIT_OK = 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="opslib",
        description="Operate an Alembic-managed PostgreSQL database: status, migrations, the embedded server.",
        epilog="Target: DATABASE_URL, or the embedded server under .opslib/ when unset. "
        "Alembic project: OPSLIB_ALEMBIC_INI (default ./alembic.ini).",
    )
    p.add_argument("--version", action="version", version=f"opslib {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show what the migrations printed or logged")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("status", help="current revision, heads, pending revisions, at head or not")
    s.add_argument(
        "--json", action="store_true", help="print a JSON object (current, heads, pending, at_head)"
    )

    x_help = "pass KEY=VALUE to the migrations (Alembic -x), e.g. -x dev_data=true"
    s = sub.add_parser("upgrade", help="apply pending revisions (default: up to head)")
    s.add_argument("revision", nargs="?", default="head", help="head (default), a revision id, or +N")
    s.add_argument("-x", dest="x_args", action="append", default=[], metavar="KEY=VALUE", help=x_help)

    s = sub.add_parser("downgrade", help="roll back: -1 (last revision), a revision id, or base")
    s.add_argument("revision", help="-N, a revision id, or base")
    s.add_argument("-x", dest="x_args", action="append", default=[], metavar="KEY=VALUE", help=x_help)

    s = sub.add_parser("history", help="list the revisions, newest first")
    s.add_argument("--verbose", dest="details", action="store_true", help="show each revision's details")
    s.add_argument(
        "--runs", action="store_true", help="the runs and revision events recorded in the database"
    )

    s = sub.add_parser("show", help="details of one revision")
    s.add_argument("revision")

    sub.add_parser("heads", help="the head revision(s) of the chain")

    s = sub.add_parser("stamp", help="record a revision in the database without running migrations")
    s.add_argument("revision")

    s = sub.add_parser("merge", help="create a merge revision joining the heads")
    s.add_argument("-m", "--message", required=True)
    s.add_argument("revisions", nargs="*", default=["heads"], help="revisions to merge (default: all heads)")

    s = sub.add_parser("revision", help="create a revision file (empty, or --autogenerate from the models)")
    s.add_argument("-m", "--message", required=True)
    s.add_argument(
        "--autogenerate", action="store_true", help="compare the models with the database (at head)"
    )

    s = sub.add_parser(
        "sql",
        help="print the SQL for FROM:TO without connecting (Alembic offline mode); exit 3 if a revision cannot render",
    )
    s.add_argument("range", metavar="FROM:TO")
    s.add_argument(
        "--partial",
        action="store_true",
        help="print what renders even when a revision cannot (it needs the database); SQL comments say what is missing",
    )
    s.add_argument("-x", dest="x_args", action="append", default=[], metavar="KEY=VALUE", help=x_help)

    s = sub.add_parser("backup", help="pg_dump the target database into the backups folder, with a manifest")
    s.add_argument("--out", metavar="DIR", help="folder for this backup (default: OPSLIB_BACKUPS_DIR)")
    s.add_argument("--label", metavar="TEXT", help="a note kept in the manifest, e.g. 'before deploy 42'")

    s = sub.add_parser(
        "verify-backup", help="check a backup: manifest, checksum, archive, optionally a test restore"
    )
    s.add_argument("file", metavar="FILE")
    s.add_argument("--restore-test", action="store_true", help="restore into a scratch database and compare")

    s = sub.add_parser("restore", help="restore a backup into a new database (or over the target, confirmed)")
    s.add_argument("file", metavar="FILE", nargs="?", help="the backup (.dump); not with --cleanup")
    s.add_argument("--into", metavar="NAME", help="database to create (default: <database>_restored_<time>)")
    s.add_argument("--confirm", metavar="NAME", help="the target database's name: restore over it")
    s.add_argument(
        "--terminate-connections", action="store_true", help="end other sessions on the target first"
    )
    s.add_argument(
        "--allow-other-database",
        action="store_true",
        help="with --confirm: replace the target with a backup of another database",
    )
    s.add_argument(
        "--cleanup",
        action="store_true",
        help="only drop the staging databases killed restores over the target left (no FILE)",
    )

    s = sub.add_parser("clone", help="copy the target database on its server (CREATE DATABASE ... TEMPLATE)")
    s.add_argument("--into", metavar="NAME", required=True)

    s = sub.add_parser("backups", help="list the backups (time, database, revision, size, verified)")
    s.add_argument("--dir", metavar="DIR", help="folder to list (default: OPSLIB_BACKUPS_DIR)")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("prune-backups", help="delete old backups, never the newest verified one")
    s.add_argument(
        "--keep", type=int, required=True, metavar="N", help="how many of the newest to keep (>= 1)"
    )
    s.add_argument("--dir", metavar="DIR", help="folder to prune (default: OPSLIB_BACKUPS_DIR)")

    sub.add_parser(
        "verify-setup", help="connectivity, versions, client tools, Alembic config, backups folder"
    )

    s = sub.add_parser(
        "check", help="pre-deploy checks: heads, pending revisions, squawk lint, naming, drift, backup"
    )
    s.add_argument(
        "--target", default="head", metavar="REV", help="revision the deploy would go to (default head)"
    )
    s.add_argument("--expect-env", metavar="ENV", help="fail unless OPSLIB_ENV is this label")
    s.add_argument(
        "--max-backup-age",
        type=float,
        default=24.0,
        metavar="HOURS",
        help="production: a verified backup younger than this counts (default 24)",
    )
    s.add_argument(
        "--write-baseline",
        action="store_true",
        help="accept today's blocking lint findings in the project's opslib.toml (needs --reason)",
    )
    s.add_argument("--reason", metavar="TEXT", help="for --write-baseline: why these findings are accepted")
    s.add_argument(
        "--new",
        action="store_true",
        help="also judge the revisions added on this git branch: a vague message blocks there (naming rule)",
    )
    s.add_argument("--base", metavar="REF", help="for --new: the branch to compare with (default origin/HEAD, main…)")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("run", help="execute a runbook with papermill and keep its record", add_help=False)
    s.add_argument("runbook", nargs="?", help="deploy, rollback, recovery or reset")
    # `opslib run deploy --help` shows the deploy's own parameters, not only this usage.
    s.add_argument("-h", "--help", action="store_true", help="show this help, or RUNBOOK's parameters")
    s.set_defaults(usage=s.format_help)
    _runbook_parameters(s)

    s = sub.add_parser(
        "init-prod",
        help="the init-prod runbook: schema to head, then the admin user, settings, CMS pages, email templates",
        description="Same as `opslib run init-prod`. The admin's email and password come from OPSLIB_ADMIN_EMAIL and "
        "OPSLIB_ADMIN_PASSWORD (or the variables -p admin_email_env/admin_password_env name).",
    )
    _runbook_parameters(s)
    s.set_defaults(runbook="init-prod", help=False)

    s = sub.add_parser(
        "rehearse",
        help="the rehearse runbook: upgrade, downgrade and upgrade again a copy of the target, then drop it",
        description="Same as `opslib run rehearse`: the target is copied and never changed.",
    )
    _runbook_parameters(s)
    s.set_defaults(runbook="rehearse", help=False)

    s = sub.add_parser(
        "fleet",
        help="run a runbook on every database of a fleet file: a canary, then waves, with a halt rule",
        description="Run RUNBOOK on each target of the fleet file (fleet.toml beside alembic.ini, or "
        "[tool.opslib.fleet] in pyproject.toml): the canary first, then waves, at most --parallel at once; "
        "no target starts after --halt-after failures, nor after a failed canary. Each target gets its own run "
        "and record; the fleet's record goes to records/fleets/.",
    )
    s.add_argument("runbook", help="the runbook to run on each target (deploy, rollback, …)")
    s.add_argument("--targets", type=Path, metavar="FILE", help="the fleet file (default: the project's)")
    s.add_argument("--only", action="append", default=[], metavar="TAG=VALUE", help="only the targets with this tag")
    s.add_argument("--canary", type=int, default=1, metavar="N", help="targets run first, alone (default 1)")
    s.add_argument("--wave", type=int, default=5, metavar="W", help="targets per wave after the canary (default 5)")
    s.add_argument("--parallel", type=int, default=2, metavar="P", help="targets at once (default 2)")
    halt = s.add_mutually_exclusive_group()
    halt.add_argument("--halt-after", type=int, default=1, metavar="K", help="start no target after K failures (default 1)")
    halt.add_argument("--no-halt", action="store_true", help="run every target whatever fails")
    s.add_argument("--dry-run", action="store_true", help="print the plan and where each target stands; run nothing")
    s.add_argument("--plan-json", action="store_true", help="print the waves as JSON, reading no database (opslib.airflow)")
    s.add_argument(
        "--confirm-production", type=int, metavar="N",
        help="the number of production targets selected: confirms them (each run gets its database's name as confirm)",
    )  # fmt: skip
    s.add_argument(
        "-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
        help="a runbook parameter, the same for every target",
    )  # fmt: skip

    s = sub.add_parser(
        "seed-demo",
        help="load the project's demo data with COPY (refused in production)",
        description="Load the demo data of the project's demo_data.py (beside its revisions) with COPY; "
        "the same seed gives the same rows and loads once. Refused in production (exit 3).",
    )
    s.add_argument("--rows", type=int, default=10_000, help="how many main rows to generate (default 10000)")
    s.add_argument("--seed", type=int, default=42, help="the random seed (default 42)")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser(
        "open",
        help="make a run's own notebook from a runbook and open JupyterLab on it (the `lab` extra)",
        description="Make a run's own notebook in the records folder from the runbook, with the parameters "
        "injected, and open JupyterLab on it. Run its cells in order; saving after the summary seals the record. "
        "Arguments after -- go to JupyterLab (e.g. -- --no-browser --port 8890).",
    )
    s.add_argument("runbook", help="deploy, rollback, recovery or reset")
    _runbook_parameters(s)

    sub.add_parser("runbooks", help="list the runbooks with their parameters")

    s = sub.add_parser(
        "audit",
        help="the run records: list, show one, verify them against the ledger, write an HTML report, "
        "summarize them for an auditor, or seal an interactive run",
    )
    s.add_argument("action", choices=["list", "show", "verify", "report", "seal", "summary"])
    s.add_argument("run_id", nargs="?", metavar="RUN_ID", help="for show and seal: the run's id")
    s.add_argument("--json", action="store_true")
    s.add_argument(
        "--warnings", action="store_true", help="for list: only the runs that went without a safeguard"
    )
    s.add_argument(
        "--database",
        action="append",
        nargs="?",
        const="",
        metavar="URL",
        help="for verify: also cross-check the ledger with the database at URL (repeatable; the URL is best given "
        "as $VAR), and fail unless each is reached; alone, fail unless the configured database is reached. "
        "Every database reachable from the environment or the fleet file is cross-checked anyway",
    )
    s.add_argument(
        "--targets",
        type=Path,
        metavar="FILE",
        help="for verify and report: the fleet file whose targets' databases to cross-check with "
        "(default: the project's, when it has one)",
    )
    s.add_argument("--out", type=Path, help="for report: the folder to write (default: <records>/report)")
    s.add_argument(
        "--screenshot",
        action="store_true",
        help="for report: also save index.png, as headless Chromium shows it",
    )
    s.add_argument(
        "--full",
        action="store_true",
        help="for report: render every run page again (by default a page is kept while its run, its files, "
        "opslib and nbconvert are unchanged)",
    )

    s = sub.add_parser("db", help="the embedded PostgreSQL used when DATABASE_URL is unset")
    s.add_argument("action", choices=["start", "stop", "status", "url"])
    return p


def _runbook_parameters(s: argparse.ArgumentParser) -> None:
    """The options `opslib run` and `opslib open` share: a runbook's parameters and the environment label."""
    s.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a runbook parameter",
    )
    s.add_argument(
        "--env", choices=["development", "staging", "production"], help="environment label (OPSLIB_ENV)"
    )


_BACKUP_COMMANDS = {
    "backup",
    "verify-backup",
    "restore",
    "clone",
    "backups",
    "prune-backups",
    "verify-setup",
    "check",
}


def _run(args: argparse.Namespace) -> int:
    settings = load_settings()
    # Each family imports only what it needs: Alembic's import is a large part of a command's start-up.
    if args.command == "db":
        return _db(settings, args.action)
    if args.command in _BACKUP_COMMANDS:
        return _backups(settings, args)
    if args.command in ("run", "runbooks", "init-prod", "rehearse"):
        return _runbooks(settings, args)
    if args.command == "seed-demo":
        return _seed_demo(settings, args)
    if args.command == "fleet":
        return _fleet(settings, args)
    if args.command == "open":
        return _open(settings, args)
    if args.command == "audit":
        return _audit(settings, args)
    return _migrations(settings, args)


def _migrations(settings, args: argparse.Namespace) -> int:
    from opslib import display, migrate

    def shown(result):
        if args.verbose and result.output:  # what the migrations printed or logged, kept off stdout
            sys.stderr.write(result.output)
        return display.result_text(result)

    if args.command == "status":
        st = migrate.status(settings)
        print(json.dumps(st.to_dict(), indent=2) if args.json else display.status_text(st))
    elif args.command in ("upgrade", "downgrade", "stamp"):
        if args.command == "stamp":
            done = migrate.stamp(settings, args.revision)
        else:
            done = getattr(migrate, args.command)(settings, args.revision, x_args=args.x_args)
        _outcome_known()  # the change is made and read: a signal now must not turn its report into an error
        print(shown(done))
    elif args.command == "history" and args.runs:
        from opslib import db
        from opslib import history as run_history

        with db.connect(db.target_url(settings)) as conn:
            print(display.database_history_text(*run_history.read(conn)))
    elif args.command == "history":
        print(display.history_text(migrate.history(settings), verbose=args.details))
    elif args.command == "show":
        print(display.revision_text(migrate.show(settings, args.revision)))
    elif args.command == "heads":
        print(display.history_text(migrate.heads(settings)))
    elif args.command == "merge":
        made = migrate.merge(settings, args.message, args.revisions)
        print(f"created merge revision {made.revision}: {made.path}")
    elif args.command == "revision":
        made = migrate.revision(settings, args.message, autogenerate=args.autogenerate)
        print(f"created revision {made.revision}: {made.path}\nreview it before `opslib upgrade`")
    elif args.command == "sql":
        rendered = migrate.script_sql(settings, args.range, x_args=args.x_args, partial=args.partial)
        sys.stdout.write(rendered.sql)
        for revision, why in rendered.unrendered:
            print(f"opslib: warning: revision {revision} is only partly in this SQL: {why}", file=sys.stderr)
    return EXIT_OK


def _backups(settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from opslib import backup, display
    from opslib.errors import InvalidInput

    def given_folder(raw: str | None) -> Path | None:
        # A folder named by --dir must exist: a typo must not read as "no backups" or "nothing to delete".
        if raw is None:
            return None
        folder = Path(raw)
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise InvalidInput(
                f"--dir {folder} {what}: name the backups folder (default: OPSLIB_BACKUPS_DIR)"
            )
        return folder

    if args.command == "backup":
        made = backup.backup(settings, out_dir=Path(args.out) if args.out else None, label=args.label)
        print(display.backup_text(made))
    elif args.command == "verify-backup":
        report = backup.verify_backup(settings, args.file, restore_test=args.restore_test)
        print(display.checks_text(report))
        report.raise_for_failure()
    elif args.command == "restore" and args.cleanup:
        flags = (("FILE", args.file), ("--into", args.into), ("--confirm", args.confirm))
        given = [flag for flag, value in flags if value]
        if given:
            raise InvalidInput(f"restore --cleanup takes no {', '.join(given)}: run it on its own")
        print(display.cleanup_text(backup.cleanup_restores(settings)))
    elif args.command == "restore":
        if not args.file:
            raise InvalidInput(
                "restore needs a FILE (a .dump in the backups folder; `opslib backups` lists them), "
                "or --cleanup to drop what killed restores left"
            )
        done = backup.restore(
            settings,
            args.file,
            into=args.into,
            confirm=args.confirm,
            terminate_connections=args.terminate_connections,
            allow_other_database=args.allow_other_database,
        )
        print(display.restore_text(done))
    elif args.command == "clone":
        made = backup.clone(settings, args.into)
        print(f"cloned {made.source!r} into {made.database!r} in {made.duration_s:.2f} s")
    elif args.command == "backups":
        found = backup.list_backups(settings, given_folder(args.dir))
        print(
            json.dumps([b.to_dict() for b in found], indent=2) if args.json else display.backups_text(found)
        )
    elif args.command == "prune-backups":
        deleted = backup.prune_backups(settings, args.keep, given_folder(args.dir))
        print("\n".join(f"deleted {p}" for p in deleted) or "nothing to delete")
    elif args.command == "verify-setup":
        from opslib import checks  # only here and for `check`: it imports Alembic and the linter (0.1 s)

        report = checks.verify_setup(settings)
        print(display.checks_text(report))
        report.raise_for_failure()
    elif args.command == "check":
        if args.reason is not None and not args.write_baseline:
            raise InvalidInput("--reason goes with --write-baseline")
        baseline = (args.reason or "") if args.write_baseline else None
        if baseline is not None and not baseline.strip():
            raise InvalidInput('--write-baseline needs a reason: --reason "accepted when adopting opslib"')
        if args.base and not args.new:
            raise InvalidInput("--base goes with --new")
        from opslib import checks

        new = None
        if args.new:
            from opslib import branch

            _, new = branch.new_revisions(settings, args.base)
        report = checks.pre_deploy(
            settings,
            args.target,
            expect_env=args.expect_env,
            max_backup_age_h=args.max_backup_age,
            baseline_reason=baseline,
            new_revisions=new,
        )
        print(json.dumps(report.to_dict(), indent=2) if args.json else display.checks_text(report))
        report.raise_for_failure()
    return EXIT_OK


def _runbooks(settings, args: argparse.Namespace) -> int:
    from opslib import display, runner, workflows
    from opslib.errors import InvalidInput

    if args.command == "runbooks":
        print(display.runbooks_text(runbooks_dir(), workflows.registry()))
        return EXIT_OK
    if args.help or not args.runbook:
        if not args.runbook and args.help:
            print(args.usage())
            return EXIT_OK
        if not args.runbook:
            raise InvalidInput("run needs a RUNBOOK: `opslib runbooks` lists them")
        declared = display.runbooks_text(runbooks_dir(), {args.runbook: workflows.get(args.runbook)})  # refuses an unknown one
        print(f"usage: opslib run {args.runbook} [-p NAME VALUE]... [--env ENV]\n\n{declared}")
        return EXIT_OK
    _seal_abandoned(settings, "run")
    outcome = runner.run(settings, args.runbook, [tuple(p) for p in args.parameter], env=args.env)
    _outcome_known()  # sealed: a signal now cannot change what the record says, nor cut what follows
    print(display.record_text(outcome.record.to_dict()))
    print(f"record  : {outcome.sidecar}")
    if outcome.notebook.exists():
        print(f"notebook: {outcome.notebook}")
    # The outcome line is the command's last word: on stderr when the run did not succeed, as every error is.
    print(outcome.line(), file=sys.stdout if outcome.exit_code == 0 else sys.stderr)
    return outcome.exit_code


def _fleet(settings, args: argparse.Namespace) -> int:
    from opslib import display, fleet

    chosen = fleet.load_fleet(args.targets or fleet.fleet_file(settings.alembic_ini))
    if args.only:
        chosen = chosen.only(args.only)
    halt_after = None if args.no_halt else args.halt_after
    order = fleet.plan(chosen, canary=args.canary, wave=args.wave, parallel=args.parallel, halt_after=halt_after)
    if args.plan_json:
        print(json.dumps(fleet.plan_dict(order, canary=args.canary), indent=2))
        return EXIT_OK
    if args.dry_run:
        found = fleet.standings(settings, order.targets)
        waves = [[t.name for t in w] for w in order.waves]
        print(display.fleet_plan_text(waves, found, canary=args.canary > 0))
        print(f"{len(order.targets)} target(s) in {len(waves)} wave(s), {order.parallel} at once, "
              + ("no halt" if halt_after is None else f"halt after {halt_after} failure(s)") + "; nothing was run")
        return EXIT_OK
    fleet.require_production_confirmed(order.targets, args.confirm_production)
    _seal_abandoned(settings, "fleet")
    record, path = fleet.run_fleet(
        settings, args.runbook, chosen, order, [tuple(p) for p in args.parameter], canary=args.canary,
        wave=args.wave, progress=sys.stderr,
    )  # fmt: skip
    print(display.fleet_text(record.to_dict()))
    print(f"fleet record: {path}")
    line = f"fleet {args.runbook} {record.outcome} (exit {record.exit_code})"
    print(line, file=sys.stdout if record.exit_code == 0 else sys.stderr)
    return record.exit_code


def _seed_demo(settings, args: argparse.Namespace) -> int:
    from opslib import seed

    result = seed.seed_demo(settings, rows=args.rows, seed=args.seed)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif not result.loaded:
        print(f"seed-demo: the demo data of seed {result.seed} is in {result.database} already; nothing was changed")
    else:
        loaded = ", ".join(f"{n} {table}" for table, n in result.rows.items())
        print(f"seed-demo: loaded {loaded} into {result.database} (seed {result.seed}) in {result.seconds:.2f} s, "
              f"{result.rows_per_s:,.0f} rows/s")
    return EXIT_OK


def _seal_abandoned(settings, command: str) -> None:
    """Seal the records of runs killed before they could (SIGKILL), and say so on stderr."""
    from opslib import audit

    if not audit.has_abandoned(settings.records_dir):
        return  # nothing to seal: the database code of sealing is not even loaded (0.2 s)
    from opslib import sealing

    for record in sealing.seal_abandoned(settings, command):
        where = (
            "its revision could not be read"
            if record.revisions_after is None
            else f"the database is at {revisions_text(record.revisions_after)}"
        )
        how = "as abandoned" if record.outcome is Outcome.ABANDONED else f"as {record.outcome}, the outcome its process gave it"
        print(
            f"opslib: sealed run {record.run_id} ({record.runbook}, started {record.started_at}) {how}: "
            f"its processes ended without sealing it; {where}",
            file=sys.stderr,
        )


def _audit(settings, args: argparse.Namespace) -> int:
    from opslib import audit, display
    from opslib.errors import ChecksFailed, InvalidInput

    records = audit.require_records_dir(settings.records_dir)
    if args.action != "verify" and args.database is not None:
        raise InvalidInput(f"--database belongs to `opslib audit verify`, not `audit {args.action}`")
    if args.action not in ("verify", "report") and args.targets is not None:
        raise InvalidInput(f"--targets belongs to `opslib audit verify` and `audit report`, not `audit {args.action}`")
    if args.action != "list" and args.warnings:
        raise InvalidInput(f"--warnings belongs to `opslib audit list`, not `audit {args.action}`")
    if args.action != "report" and (args.out or args.screenshot or args.full):
        raise InvalidInput(
            f"--out, --screenshot and --full belong to `opslib audit report`, not `audit {args.action}`"
        )
    if args.action in ("report", "verify", "list", "summary") and args.run_id:
        raise InvalidInput(f"`opslib audit {args.action}` takes no RUN_ID (only `audit show` and `audit seal` do)")
    if args.action == "seal":
        return _audit_seal(settings, args.run_id)
    _seal_abandoned(settings, f"audit {args.action}")
    if args.action == "list":
        runs = [r for r in audit.list_runs(records) if r["warnings"] or not args.warnings]
        print(json.dumps(runs, indent=2, default=str) if args.json else display.runs_text(runs))
    elif args.action == "show":
        if not args.run_id:
            raise InvalidInput("audit show needs a RUN_ID: `opslib audit list` shows them")
        record = audit.find_run(records, args.run_id)
        print(json.dumps(record, indent=2, default=str) if args.json else display.run_text(record))
    elif args.action == "report":
        return _audit_report(settings, records, args)
    elif args.action == "summary":
        from dataclasses import replace

        from opslib import anchors, summary

        # Checked as verify checks it: a run cut from the ledger shows through its anchors, not the chain.
        check = audit.check_ledger(records, anchors.out_of_reach(settings))
        against = anchors.cross_check(settings, check.entries, *_databases_given(settings, args))[1]
        found = summary.audit_summary(records, replace(check, unvouched=check.unvouched + against))
        print(json.dumps(found, indent=2, default=str) if args.json else summary.summary_text(found))
        problems = found["verification"]["problems"]
        if problems:  # printed whole either way; automation still learns that the records were changed
            raise ChecksFailed(f"audit summary: {len(problems)} problem(s) in {records}; the first: {problems[0]}")
    else:
        from opslib import anchors

        check = audit.check_ledger(records, anchors.out_of_reach(settings))
        anchored, against_database = anchors.cross_check(
            settings, check.entries, *_databases_given(settings, args), require=args.database is not None
        )
        problems = check.problems + against_database
        if check.waiting:
            print("\n".join(check.waiting))
        if problems:
            print("\n".join(problems))
            raise ChecksFailed(f"audit verify: {len(problems)} problem(s) in {records}; the first: {problems[0]}")
        print(
            f"audit verify: {len(audit.ended_entries(check.entries))} run(s), every record matches the ledger and "
            "the chain is intact; "
            f"{anchored}"
        )
    return EXIT_OK


def _databases_given(settings, args: argparse.Namespace) -> tuple[list[str], list[tuple[str, str]]]:
    """The databases `audit verify`, `summary` and `report` cross-check the ledger with besides the
    environment's: each ``--database URL``, and (URL, where it came from) of each target of the fleet file
    (``--targets``, else the project's if it has one)."""
    from opslib import fleet
    from opslib.errors import ConfigError

    databases = [url for url in args.database or [] if url]
    path = args.targets or fleet.fleet_file(settings.alembic_ini)
    if args.targets is None and not path.is_file():
        return databases, []
    try:
        return databases, fleet.database_urls(path)
    except ConfigError:
        if args.targets is not None:
            raise
        return databases, []  # the project's pyproject.toml with no fleet in it, or a fleet file `opslib fleet` refuses itself


def _audit_seal(settings, run_id: str | None) -> int:
    from opslib import lab
    from opslib.errors import InvalidInput

    if not run_id:
        raise InvalidInput("audit seal needs a RUN_ID: `opslib audit list` shows them")
    record, now = lab.seal(settings, run_id)
    what = "sealed" if now else "already sealed"
    notebook = f", with its notebook {record.notebook}" if record.notebook else ""
    print(f"audit seal: run {record.run_id} ({record.runbook}) {what} as {record.outcome}{notebook}")
    return EXIT_OK


def _open(settings, args: argparse.Namespace) -> int:
    from opslib import audit, lab
    from opslib.outcome import process_exit_code

    record = lab.open_run(
        settings, args.runbook, [tuple(p) for p in args.parameter], env=args.env, lab_args=args.lab_args
    )
    sealed = f"{record.run_id}" in {
        e.get("run_id") for e in audit.read_ledger(settings.records_dir) if not audit.is_start(e)
    }
    code = process_exit_code(record.outcome, record.exit_code) if sealed else 1
    line = f"opslib open: run {record.run_id} ({record.runbook}) {record.outcome}"
    if not sealed:
        line += " but not sealed: a kernel still holds it; the next `opslib audit` seals it once that kernel is gone"
    elif record.error:
        line += f": {redact_urls_in(record.error)}"
    print(line, file=sys.stdout if code == 0 else sys.stderr)
    return code


def _audit_report(settings, records: Path, args: argparse.Namespace) -> int:
    from opslib import anchors, report
    from opslib.errors import ChecksFailed

    given = _databases_given(settings, args)
    written = report.build_report(
        records,
        args.out or records / "report",
        cross_check=lambda entries: anchors.cross_check(settings, entries, *given)[1],
        full=args.full,
        out_of_reach=anchors.out_of_reach(settings),
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


def _db(settings, action: str) -> int:
    from opslib import embedded

    if action == "start":
        st = embedded.start(settings)
        print(f"embedded PostgreSQL running (pid {st.pid}), data in {st.pgdata}\nurl: {st.url}")
    elif action == "stop":
        embedded.stop(settings)
        print(f"embedded PostgreSQL stopped, data kept in {embedded.pgdata_dir(settings)}")
    elif action == "status":
        st = embedded.status(settings)
        print(
            f"running (pid {st.pid}), data in {st.pgdata}\nurl: {st.url}"
            if st.running
            else f"stopped, data in {st.pgdata}"
        )
    elif action == "url":
        print(embedded.ensure_running(settings))
    return EXIT_OK


def _on_sigterm(signum, frame) -> None:
    # A cancelled job or a stopped container ends the command as Ctrl-C does: cleanly, saying where things stand.
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``opslib`` console script; returns the exit code."""
    argv_given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    # `opslib open RUNBOOK … -- ARGS`: what follows -- is JupyterLab's, whatever it looks like.
    lab_args: list[str] = []
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "open" and "--" in argv:
        argv, lab_args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = _parser().parse_args(argv)
    args.lab_args = lab_args
    # Everything the command prints passes through the one sink that removes passwords.
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = CleanStream(sys.stdout), CleanStream(sys.stderr)
    try:
        _CONSOLE[0] = argv_given is None
        return _main(args)
    finally:
        for wrapped in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                wrapped.flush()
        if isinstance(sys.stdout, CleanStream):
            sys.stdout = streams[0]
        sys.stderr = streams[1]


def _config_error_of(err: BaseException):
    """:func:`opslib.db.config_error_of`, for a driver error only (the CLI imports no driver for the rest)."""
    if getattr(getattr(err, "orig", None), "pgcode", None) is None:
        return None
    from opslib import db

    return db.config_error_of(err)


_CONSOLE = [False]  # run as the console script (not called in-process, by tests or another program)


def _outcome_known() -> None:
    """From the moment the command's outcome is decided, the console script ignores SIGINT and SIGTERM:
    one landing while the result is printed, or while Python exits, would kill the process with no line,
    or an exit code that contradicts what was done. (Not in-process callers: tests, a shell.)"""
    if _CONSOLE[0]:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def _main(args: argparse.Namespace) -> int:
    """The command of ``args`` run, its failure printed as one line: the exit code."""
    # The console script owns logging (its stderr is the cleaning stream); an in-process caller keeps its own.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=_CONSOLE[0])
    if args.verbose:
        logging.getLogger("alembic").setLevel(logging.INFO)
    signal.signal(signal.SIGTERM, _on_sigterm)
    from opslib import kernelfiles

    with contextlib.suppress(OSError):  # what a runner killed with SIGKILL left in the temporary folder
        kernelfiles.remove_orphans()
    try:
        code = _run(args)
        _outcome_known()
        return code
    except (OpsError, KeyboardInterrupt) as err:
        _outcome_known()
        if args.verbose and getattr(err, "output", ""):  # what the migrations printed or logged before
            sys.stderr.write(err.output)
        message = getattr(err, "message", "") or "interrupted (Ctrl-C)"
        print(f"opslib: {message}", file=sys.stderr)
        return outcome_of(err)[1]
    except BrokenPipeError:  # `opslib status | head`: the reader left, which is not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps Python's exit-time flush quiet
        return EXIT_OK
    except Exception as err:  # noqa: BLE001 - an error opslib did not foresee: one line, the traceback on -v
        _outcome_known()
        known = _config_error_of(err)
        if known is not None:  # a role lacking a privilege, a read-only role: configuration, exit 2
            print(f"opslib: {known.message}", file=sys.stderr)
            return outcome_of(known)[1]
        if args.verbose:
            traceback.print_exc()
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"opslib: unexpected error: {type(err).__name__}: {text} (run with -v for the traceback)", file=sys.stderr)
        return outcome_of(err)[1]
    finally:
        # The process ends next: freezing what it made spares the exit a last full collection (0.1 s).
        gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
