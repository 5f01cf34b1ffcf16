"""The Alembic verbs as commands: status, upgrade, downgrade, history, show, heads, stamp, merge, revision, sql."""

from __future__ import annotations

import json
import sys

from opslib.cli.commands import arg, command
from opslib.cli.common import EXIT_OK, outcome_known

X_ARGS = arg(
    "-x", dest="x_args", action="append", default=[], metavar="KEY=VALUE",
    help="pass KEY=VALUE to the migrations (Alembic -x), e.g. -x dev_data=true",
)  # fmt: skip


def _changed(args, done) -> int:
    """Print a change's result; what the migrations printed or logged goes to stderr with -v."""
    outcome_known()  # the change is made and read: a signal now must not turn its report into an error
    from opslib import display
    if args.verbose and done.output:  # what the migrations printed or logged, kept off stdout
        sys.stderr.write(done.output)
    print(display.result_text(done))
    return EXIT_OK


def _no_change_without_approval(settings, verb: str) -> None:
    """Where the project's policy needs approvals of this environment's changes, a bare verb that changes the
    database is refused (exit 3): such a change goes through `opslib run deploy -p plan`, held to its plan."""
    from opslib.errors import PreconditionFailed
    from opslib.policy import load_approval_policy

    needed = load_approval_policy(settings.alembic_ini).needed(settings.env)
    if needed:
        raise PreconditionFailed(
            f"{verb} is refused in {settings.env}: the project's policy needs {needed} approval(s) of each change "
            "there; deploy an approved plan with `opslib run deploy -p plan PLAN.json` (see `opslib plan`)"
        )


@command("status", arg("--json", action="store_true", help="print a JSON object (current, heads, pending, at_head)"))
def status(settings, args) -> int:
    """current revision, heads, pending revisions, at head or not"""
    from opslib import display, migrate

    st = migrate.status(migrate.Target(settings))
    print(json.dumps(st.to_dict(), indent=2) if args.json else display.status_text(st))
    return EXIT_OK


@command("upgrade", arg("revision", nargs="?", default="head", help="head (default), a revision id, or +N"), X_ARGS)
def upgrade(settings, args) -> int:
    """apply pending revisions (default: up to head)"""
    from opslib import migrate

    _no_change_without_approval(settings, "upgrade")
    return _changed(args, migrate.upgrade(migrate.Target(settings), args.revision, x_args=args.x_args))


@command("downgrade", arg("revision", help="-N, a revision id, or base"), X_ARGS)
def downgrade(settings, args) -> int:
    """roll back: -1 (last revision), a revision id, or base"""
    from opslib import migrate

    _no_change_without_approval(settings, "downgrade")
    return _changed(args, migrate.downgrade(migrate.Target(settings), args.revision, x_args=args.x_args))


@command(
    "history",
    arg("--verbose", dest="details", action="store_true", help="show each revision's details"),
    arg("--runs", action="store_true", help="the runs and revision events recorded in the database"),
)
def history(settings, args) -> int:
    """list the revisions, newest first"""
    from opslib import display, migrate

    if args.runs:
        from opslib import db
        from opslib import history as run_history

        with db.connect(migrate.Target(settings).url) as conn:
            print(display.database_history_text(*run_history.read(conn)))
    else:
        print(display.history_text(migrate.history(migrate.Target(settings)), verbose=args.details))
    return EXIT_OK


@command("show", arg("revision"))
def show(settings, args) -> int:
    """details of one revision"""
    from opslib import display, migrate

    print(display.revision_text(migrate.show(migrate.Target(settings), args.revision)))
    return EXIT_OK


@command("heads")
def heads(settings, args) -> int:
    """the head revision(s) of the chain"""
    from opslib import display, migrate

    print(display.history_text(migrate.heads(migrate.Target(settings))))
    return EXIT_OK


@command("stamp", arg("revision"))
def stamp(settings, args) -> int:
    """record a revision in the database without running migrations"""
    from opslib import migrate

    _no_change_without_approval(settings, "stamp")
    return _changed(args, migrate.stamp(migrate.Target(settings), args.revision))


@command(
    "merge",
    arg("-m", "--message", required=True),
    arg("revisions", nargs="*", default=["heads"], help="revisions to merge (default: all heads)"),
)
def merge(settings, args) -> int:
    """create a merge revision joining the heads"""
    from opslib import migrate

    made = migrate.merge(migrate.Target(settings), args.message, args.revisions)
    print(f"created merge revision {made.revision}: {made.path}")
    return EXIT_OK


@command(
    "revision",
    arg("-m", "--message", required=True),
    arg("--autogenerate", action="store_true", help="compare the models with the database (at head)"),
)
def revision(settings, args) -> int:
    """create a revision file (empty, or --autogenerate from the models)"""
    from opslib import migrate

    made = migrate.revision(migrate.Target(settings), args.message, autogenerate=args.autogenerate)
    print(f"created revision {made.revision}: {made.path}\nreview it before `opslib upgrade`")
    return EXIT_OK


@command(
    "sql",
    arg("range", metavar="FROM:TO"),
    arg(
        "--partial", action="store_true",
        help="print what renders even when a revision cannot (it needs the database); SQL comments say what is missing",
    ),
    X_ARGS,
)  # fmt: skip
def sql(settings, args) -> int:
    """print the SQL for FROM:TO without connecting (Alembic offline mode); exit 3 if a revision cannot render"""
    from opslib import migrate

    rendered = migrate.script_sql(settings, args.range, x_args=args.x_args, partial=args.partial)
    sys.stdout.write(rendered.sql)
    for rev, why in rendered.unrendered:
        print(f"opslib: warning: revision {rev} is only partly in this SQL: {why}", file=sys.stderr)
    return EXIT_OK
