"""Four eyes as commands: plan (write a deploy's plan), approve (sign it), approvals (who signed it)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from opslib.cli.commands import arg, command
from opslib.cli.common import EXIT_OK
from opslib.cli.runs import ENV, PARAMETER

PLAN_FILE = arg("plan_file", metavar="PLAN.json", help="the plan file (`opslib plan --out PLAN.json` writes one)")


@command(
    "plan",
    arg("--target", metavar="REV", help="the revision to deploy to (the deploy's target_revision; default head)"),
    PARAMETER,
    ENV,
    arg("--out", metavar="PLAN.json", required=True, help="where to write the plan"),
    arg("--json", action="store_true", help="print the plan as JSON too"),
)
def plan(settings, args) -> int:
    """write the plan of a deploy, for approvers to sign and for the deploy to be held to

    Write what a deploy of the target would do now: the database's identity (server's system identifier,
    name, revisions), each pending revision with its file's sha256, the sha256 of the SQL they run, the
    policy's sha256 and the deploy's parameters. Reads only. `opslib approve PLAN.json` signs it; `opslib run
    deploy -p plan PLAN.json` refuses (exit 3) when anything in it differs at preflight."""
    from opslib import approval, audit, migrate, params, plans, runner, signatures, workflows
    from opslib.errors import InvalidInput

    out = _plan_file(args.out)
    deploy = workflows.get("deploy")
    given = runner.coerce("deploy", [tuple(p) for p in args.parameter])
    if args.target is not None:
        if given.get("target_revision", args.target) != args.target:
            raise InvalidInput("plan: --target and -p target_revision say different revisions: give one")
        given["target_revision"] = args.target
    values = params.validate("deploy", deploy.parameters, given)
    deploy.check_values(values)
    env = args.env or settings.env
    params.check_environment("deploy", values, env)
    signer, signing = signatures.ledger_signer(settings)
    if settings.signing_key and signer is None:  # said, not refused: the plan is still a plan, its author unproven
        print(f"opslib: the plan's author is not proven by a key: {signing}", file=sys.stderr)
    target = migrate.Target(_settings_for(settings, values["database_url_env"]))
    planned = migrate.deploy_plan(target, values["target_revision"], x_args=["dev_data=true"] if values["dev_data"] else [])
    made = plans.plan_of(target, values["target_revision"], values, env=env, author=settings.operator,
                         created_at=audit.iso(audit.now()), author_principal=signer.principal if signer else None,
                         planned=planned)  # fmt: skip
    try:
        approval.write_plan(out, made, planned.sql.sql, planned.sql.unrendered)
    except OSError as err:
        raise InvalidInput(f"plan: cannot write {out}: {err.strerror or err}") from None
    if args.json:
        print(json.dumps(made.to_dict(), indent=2, sort_keys=True))
    print(f"plan: {approval.plan_text(made)}; written to {out}, its SQL to {approval.sql_path(out)}; approve it with "
          f"`opslib approve {out}`")  # fmt: skip
    return EXIT_OK


def _plan_file(raw: str) -> Path:
    """Where ``--out`` says to write the plan: a file name in a folder that exists (bad input otherwise, exit 2)."""
    from opslib.errors import InvalidInput

    out = Path(raw)
    if not raw.strip() or out.is_dir():
        raise InvalidInput(f"plan: --out {raw!r} is not a file name: name the plan file, e.g. --out PLAN.json")
    if not out.resolve().parent.is_dir():
        raise InvalidInput(f"plan: --out {raw}: the folder {out.resolve().parent} does not exist")
    return out


def _settings_for(settings, url_env: str):
    """The settings with the URL the deploy would read (its database_url_env), as the run resolves it."""
    from opslib import db
    from opslib.errors import InvalidInput

    if url_env == "DATABASE_URL":
        return settings
    url = os.environ.get(url_env, "").strip()
    if not url:
        raise InvalidInput(f"plan: the environment variable {url_env} (database_url_env) is not set")
    db.parse_url(url, source=url_env)
    return replace(settings, database_url=url, url_source=url_env)


@command(
    "approve",
    PLAN_FILE,
    arg("--key", metavar="FILE", help="your SSH key (default: OPSLIB_SIGNING_KEY, else ~/.ssh/id_ed25519)"),
)
def approve(settings, args) -> int:
    """sign a deploy's plan with your SSH key, as one of its approvals

    Sign the plan's canonical JSON with ssh-keygen -Y sign (namespace opslib-plan) and keep the signature
    beside it (PLAN.json.approvals). Only a key the project's allowed_signers lists can approve."""
    from opslib import approval, audit
    from opslib.policy import load_approval_policy

    plan_path = Path(args.plan_file)
    made = approval.read_plan(plan_path)
    key = Path(args.key).expanduser() if args.key else (settings.signing_key or Path("~/.ssh/id_ed25519").expanduser())
    needs = load_approval_policy(settings.alembic_ini)
    print(f"approving: {approval.plan_text(made)}; its SQL is in {approval.sql_path(plan_path)}")
    signed = approval.approve(made, key, needs.signers_file, audit.iso(audit.now()))
    kept = approval.add_approval(plan_path, signed)
    own = approval.judge(made, [signed], needs.signers_file, operators=approval.operators_of(made, None),
                         self_approval=needs.self_approval)[0]  # fmt: skip
    note = f" (it does not count: {own.why})" if not own.counted else ""
    print(f"approve: {signed.principal} approved {plan_path}{note}; "
          f"{len(kept)} approval(s) kept in {approval.approvals_path(plan_path)}")  # fmt: skip
    return EXIT_OK


@command("approvals", PLAN_FILE, arg("--json", action="store_true", help="print them as JSON"))
def approvals(settings, args) -> int:
    """who approved a plan, each signature verified against the project's allowed_signers

    Exit 0 when the plan has as many approvals as its environment needs, 3 when it has fewer. The
    plan's author's own approval is shown as not counted (self-approval is off unless the policy says otherwise);
    the deploy also leaves out its operator's."""
    from opslib import approval
    from opslib.errors import PreconditionFailed
    from opslib.policy import load_approval_policy

    plan_path = Path(args.plan_file)
    made = approval.read_plan(plan_path)
    needs = load_approval_policy(settings.alembic_ini)
    judged = approval.judge(made, approval.read_approvals(plan_path), needs.signers_file,
                            operators=approval.operators_of(made, None), self_approval=needs.self_approval)  # fmt: skip
    needed = needs.needed(made.env)
    if args.json:
        print(json.dumps({"plan_sha256": made.sha256, "env": made.env, "needed": needed,
                          "approvals": [a.to_dict() for a in judged]}, indent=2))  # fmt: skip
    else:
        print(f"{plan_path} ({made.env}, sha256 {made.sha256[:16]}…): {approval.approvals_text(judged, needed)}")
    counted = approval.counted(judged)
    if counted < needed:
        raise PreconditionFailed(f"approvals: {counted} valid approval(s) of {plan_path}, {made.env} needs {needed}")
    forged = [a.principal for a in judged if a.verified is False]
    if forged:  # the plan was edited since they signed it, or they never did: nothing to go on, whatever is needed
        raise PreconditionFailed(f"approvals: the signature(s) of {', '.join(forged)} do not verify for {plan_path}")
    return EXIT_OK
