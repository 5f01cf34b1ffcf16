"""Runs as commands: run (and init-prod, rehearse), open, runbooks, fleet, seed-demo."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from opslib.cli.commands import OneOf, arg, command
from opslib.cli.common import EXIT_OK, outcome_known, seal_abandoned

# The options `opslib run` and `opslib open` share: a runbook's parameters and the environment label.
PARAMETER = arg(
    "-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"), help="a runbook parameter"
)
ENV = arg("--env", choices=["development", "staging", "production"], help="environment label (OPSLIB_ENV)")
JSON_RESULT = arg("--json", action="store_true", help="print the run's result as one JSON object, and nothing else")


@command(
    "run",
    arg("runbook", nargs="?", help="the runbook: `opslib runbooks` lists them"),
    # `opslib run deploy --help` shows the deploy's own parameters, not only this usage.
    arg("-h", "--help", action="store_true", help="show this help, or RUNBOOK's parameters"),
    JSON_RESULT,
    PARAMETER,
    ENV,
    add_help=False,
)
def run(settings, args) -> int:
    """execute a runbook with papermill and keep its record"""
    from opslib import display, runner, workflows
    from opslib.config import runbooks_dir
    from opslib.errors import InvalidInput

    if args.help or not args.runbook:
        if not args.runbook and args.help:
            print(args.usage())
            return EXIT_OK
        if not args.runbook:
            raise InvalidInput("run needs a RUNBOOK: `opslib runbooks` lists them")
        declared = display.runbooks_text(runbooks_dir(), {args.runbook: workflows.get(args.runbook)})  # refuses an unknown one
        print(f"usage: opslib run {args.runbook} [-p NAME VALUE]... [--env ENV] [--json]\n\n{declared}")
        return EXIT_OK
    seal_abandoned(settings, "run")
    _say_when_not_signed(settings)
    outcome = runner.run(settings, args.runbook, [tuple(p) for p in args.parameter], env=args.env)
    outcome_known()  # sealed: a signal now cannot change what the record says, nor cut what follows
    if args.json:  # the result alone on stdout, one JSON object (what the fleet reads); the outcome line on stderr
        print(json.dumps(outcome.result()))
        print(outcome.line(), file=sys.stderr)
        return outcome.exit_code
    print(display.record_text(outcome.record))
    print(f"record  : {outcome.sidecar}")
    if outcome.notebook.exists():
        print(f"notebook: {outcome.notebook}")
    # The outcome line is the command's last word: on stderr when the run did not succeed, as every error is.
    print(outcome.line(), file=sys.stdout if outcome.exit_code == EXIT_OK else sys.stderr)
    return outcome.exit_code


@command("init-prod", JSON_RESULT, PARAMETER, ENV, runbook="init-prod", help=False)
def init_prod(settings, args) -> int:
    """the init-prod runbook: schema to head, then the admin user, settings, CMS pages, email templates

    Same as `opslib run init-prod`. The admin's email and password come from OPSLIB_ADMIN_EMAIL and
    OPSLIB_ADMIN_PASSWORD (or the variables -p admin_email_env/admin_password_env name)."""
    return run(settings, args)


@command("rehearse", JSON_RESULT, PARAMETER, ENV, runbook="rehearse", help=False)
def rehearse(settings, args) -> int:
    """the rehearse runbook: upgrade, downgrade and upgrade again a copy of the target, then drop it

    Same as `opslib run rehearse`: the target is copied and never changed."""
    return run(settings, args)


@command(
    "fleet",
    arg("runbook", help="the runbook to run on each target: `opslib runbooks` lists them"),
    arg("--targets", type=Path, metavar="FILE", help="the fleet file (default: the project's)"),
    arg("--only", action="append", default=[], metavar="TAG=VALUE", help="only the targets with this tag"),
    arg("--canary", type=int, default=1, metavar="N", help="targets run first, alone (default 1)"),
    arg("--wave", type=int, default=5, metavar="W", help="targets per wave after the canary (default 5)"),
    arg("--parallel", type=int, default=2, metavar="P", help="targets at once (default 2)"),
    OneOf((
        arg("--halt-after", type=int, default=1, metavar="K", help="start no target after K failures (default 1)"),
        arg("--no-halt", action="store_true", help="run every target whatever fails"),
    )),
    arg("--dry-run", action="store_true", help="print the plan and where each target stands; run nothing"),
    arg(
        "--plan-json", action="store_true",
        help="print the whole plan as JSON (waves, each target's command, the halt rule), reading no database "
        "(opslib.airflow executes it)",
    ),
    arg(
        "--confirm-production", type=int, metavar="N",
        help="the number of production targets selected: confirms them (each run gets its database's name as confirm)",
    ),
    arg(
        "-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
        help="a runbook parameter, the same for every target",
    ),
)  # fmt: skip
def fleet(settings, args) -> int:
    """run a runbook on every database of a fleet file: a canary, then waves, with a halt rule

    Run RUNBOOK on each target of the fleet file (fleet.toml beside alembic.ini, or [tool.opslib.fleet] in
    pyproject.toml): the canary first, then waves, at most --parallel at once; no target starts after
    --halt-after failures, nor after a failed canary. Each target gets its own run and record; the fleet's
    record goes to records/fleets/."""
    from opslib import display, workflows
    from opslib import fleet as fleets

    workflows.get(args.runbook)  # an unknown runbook is refused once, before any target (exit 2)
    chosen = fleets.load_fleet(args.targets or fleets.fleet_file(settings.alembic_ini))
    if args.only:
        chosen = chosen.only(args.only)
    halt_after = None if args.no_halt else args.halt_after
    order = fleets.plan(chosen, canary=args.canary, wave=args.wave, parallel=args.parallel, halt_after=halt_after)
    pairs = [tuple(p) for p in args.parameter]
    if args.plan_json:
        fleets.require_production_confirmed(order.targets, args.confirm_production)
        print(json.dumps(fleets.plan_dict(order, args.runbook, pairs, canary=args.canary), indent=2))
        return EXIT_OK
    if args.dry_run:
        found = fleets.standings(settings, order.targets)
        waves = [[t.name for t in w] for w in order.waves]
        print(display.fleet_plan_text(waves, found, canary=args.canary > 0))
        print(f"{len(order.targets)} target(s) in {len(waves)} wave(s), {order.parallel} at once, "
              + ("no halt" if halt_after is None else f"halt after {halt_after} failure(s)") + "; nothing was run")
        return EXIT_OK
    fleets.require_production_confirmed(order.targets, args.confirm_production)
    seal_abandoned(settings, "fleet")
    record, path = fleets.run_fleet(
        settings, args.runbook, chosen, order, pairs, canary=args.canary, wave=args.wave, progress=sys.stderr,
    )  # fmt: skip
    print(display.fleet_text(record.to_dict()))
    print(f"fleet record: {path}")
    line = f"fleet {args.runbook} {record.outcome} (exit {record.exit_code})"
    print(line, file=sys.stdout if record.exit_code == EXIT_OK else sys.stderr)
    return record.exit_code


def _say_when_not_signed(settings) -> None:
    """A key set to sign with that cannot sign is said on the terminal (the run goes on, its entries unsigned;
    where approvals are needed its preflight refuses it)."""
    if settings.signing_key is None:
        return
    from opslib import signatures

    signer, why = signatures.ledger_signer(settings)
    if signer is None:
        print(f"opslib: this run's ledger entries will not be signed: {why}", file=sys.stderr)


@command(
    "seed-demo",
    arg("--rows", type=int, default=10_000, help="how many main rows to generate (default 10000)"),
    arg("--seed", type=int, default=42, help="the random seed (default 42)"),
    arg("--json", action="store_true"),
)
def seed_demo(settings, args) -> int:
    """load the project's demo data with COPY (refused in production)

    Load the demo data of the project's demo_data.py (beside its revisions) with COPY; the same seed gives
    the same rows and loads once. Refused in production (exit 3)."""
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


@command("open", arg("runbook", help="the runbook: `opslib runbooks` lists them"), PARAMETER, ENV)
def open_run(settings, args) -> int:
    """make a run's own notebook from a runbook and open JupyterLab on it (the `lab` extra)

    Make a run's own notebook in the records folder from the runbook, with the parameters injected, and open
    JupyterLab on it. Run its cells in order; saving after the summary seals the record. Arguments after --
    go to JupyterLab (e.g. -- --no-browser --port 8890)."""
    from opslib import audit, lab
    from opslib.outcome import Outcome, process_exit_code
    from opslib.redact import redact_urls_in

    record = lab.open_run(
        settings, args.runbook, [tuple(p) for p in args.parameter], env=args.env, lab_args=args.lab_args
    )
    sealed = f"{record.run_id}" in {
        e.get("run_id") for e in audit.read_ledger(settings.records_dir) if not audit.is_start(e)
    }
    # Not sealed: a run still held by a kernel has no outcome yet, and says so as a failure would (exit 1).
    code = process_exit_code(record.outcome, record.exit_code) if sealed else process_exit_code(Outcome.FAILED, None)
    line = f"opslib open: run {record.run_id} ({record.runbook}) {record.outcome}"
    if not sealed:
        line += " but not sealed: a kernel still holds it; the next `opslib audit` seals it once that kernel is gone"
    elif record.error:
        line += f": {redact_urls_in(record.error)}"
    print(line, file=sys.stdout if code == EXIT_OK else sys.stderr)
    return code


@command("runbooks")
def runbooks(settings, args) -> int:
    """list the runbooks with their parameters"""
    from opslib import display, workflows
    from opslib.config import runbooks_dir

    print(display.runbooks_text(runbooks_dir(), workflows.registry()))
    return EXIT_OK
