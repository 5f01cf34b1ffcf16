"""Signatures in the records: the ledger entries signed by their operators' keys, and the approvals of the
runs' plans, checked against the project's allowed_signers (see :mod:`opslib.sshsig`).

A hostile editor of the records folder and of the database's ``opslib`` schema can recompute every
hash; they cannot make a signature without a private key. An entry whose signature no longer verifies
was edited after it was signed; an approval that does not verify was never made by a key the project
allows.
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from opslib import sshsig
from opslib.approval import Approval, Plan, judge, operators_of, plan_sha256
from opslib.config import Settings
from opslib.errors import ConfigError, InvalidInput
from opslib.outcome import CHANGED_NOTHING
from opslib.policy import ApprovalPolicy, load_approval_policy
from opslib.safeguards import changed_database


def ledger_signer(settings: Settings) -> tuple[sshsig.Signer | None, str]:
    """Who signs the ledger entries this process appends: the operator's key (``OPSLIB_SIGNING_KEY``) when the
    project's allowed_signers lists it, else nobody; with one line saying which, for a run's preflight. A
    policy that cannot be read signs nothing here (the run's own checks report it)."""
    try:
        signers = load_approval_policy(settings.alembic_ini).signers_file
    except ConfigError as err:
        return None, f"not signed: {err.message}"
    return sshsig.signer(settings.signing_key, signers)


def signed_bytes(entry: dict) -> bytes:
    """What a ledger entry's signature signs: its canonical JSON without its hash and its signature (so
    the signer, the entry before it and every fact are signed)."""
    body = {k: v for k, v in entry.items() if k not in ("hash", "signature", "signature_error")}
    return json.dumps(body, sort_keys=True, default=str).encode()


def sign_entry(entry: dict, signer: sshsig.Signer) -> None:
    """Sign ``entry`` in place (its place in the chain included). A key that cannot sign now leaves the entry
    unsigned, saying why: a run is never left unsealed for want of a signature."""
    entry["signer"] = signer.principal
    try:
        entry["signature"] = signer.sign(signed_bytes(entry))
    except (ConfigError, OSError, subprocess.SubprocessError) as err:
        del entry["signer"]
        entry["signature_error"] = getattr(err, "message", None) or str(err)


def approval_seals(approvals) -> list[list]:
    """What the ledger keeps of a run's approvals: [principal, source, counted] for each."""
    return [[a.principal, a.source, bool(a.counted)] for a in approvals]


def entries_problems(entries: list[dict], labels: list[str], signers: Path) -> list[list[str]]:
    """:func:`entry_problems` of each entry, checked a few at a time: each is one ``ssh-keygen`` process, which
    waits on nothing of the others (a ledger of thousands of entries is checked in a fraction of the time)."""
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda pair: entry_problems(pair[0], pair[1], signers), zip(entries, labels, strict=True)))


def entry_problems(entry: dict, label: str, signers: Path) -> list[str]:
    """What is wrong with a ledger entry's signature (none when it holds, or the entry is unsigned). The key is
    checked as allowed_signers says it was valid when the entry was written (a key retired since still vouches
    for what it signed before)."""
    signature, signer = entry.get("signature"), entry.get("signer")
    if signature is None and signer is None:
        return []
    if not isinstance(signature, str) or not isinstance(signer, str):
        return [f"{label}: its signature or signer was removed or edited"]
    if not Path(signers).is_file():
        return [f"{label}: signed by {signer}, but there is no allowed_signers file at {signers} to check it with"]
    at = entry.get("finished_at") or entry.get("started_at")
    when = at if isinstance(at, str) else None
    if not sshsig.verifies(signed_bytes(entry), signature, signer, signers, sshsig.LEDGER, when):
        if not sshsig.principals(signature, signers, when):  # the key is not (or no longer) in the file at all
            return [f"{label}: signed by {signer} with a key {signers.name} does not list (a key removed from it: "
                    "retire keys with valid-before= instead, so that what they signed still verifies)"]  # fmt: skip
        return [f"{label}: its signature by {signer} does not verify: the entry was edited after it was signed, "
                f"or not signed by a key {signers.name} gives {signer}"]  # fmt: skip
    return []


def approval_problems(sidecar: dict | None, entry: dict, label: str, needs: ApprovalPolicy) -> list[str]:
    """What is wrong with the approvals of a run's ending, judged by the auditor's policy ``needs`` (not the one
    the run read): a deploy that may have changed its database needs as many approvals as the stricter of the
    two asks; its record's plan must be the one the ending sealed, for the database and revisions the run
    went from and to; and each approval must still verify, and not be its operator's own while self-approval is
    off, against the auditor's allowed_signers."""
    outcome = entry.get("outcome")
    changed = entry.get("runbook") == "deploy" and outcome not in CHANGED_NOTHING and changed_database(entry)
    needed = max(_whole(entry.get("approvals_needed")), needs.needed(str(entry.get("env")))) if changed else 0
    if not needed and not entry.get("plan_sha256"):
        return []
    data = sidecar if isinstance(sidecar, dict) else {}
    plan = data.get("plan")
    if not entry.get("plan_sha256"):
        return [f"{label}: a {entry.get('env')} deploy that changed its database without a plan; the policy needs {needed} approval(s)"]
    if not isinstance(plan, dict) or plan_sha256(plan) != entry.get("plan_sha256"):
        return [f"{label}: the plan in its record is not the plan its ending sealed"]
    if not changed:  # refused, or stopped before any change: its plan was not run, whatever it says
        return []
    try:
        approved = Plan.from_dict(plan)
    except InvalidInput as err:
        return [f"{label}: its plan cannot be read: {err.message}"]
    found = [f"{label}: {why}" for why in _ran_otherwise(approved, entry)]
    judged = judge(approved, [a for a in (Approval.from_dict(v) for v in data.get("approvals") or []) if a is not None],
                   needs.signers_file, operators=operators_of(approved, entry.get("signer"), entry.get("operator")),
                   self_approval=needs.self_approval, at=entry.get("started_at"))  # fmt: skip
    holding = {a.principal for a in judged if a.counted}
    sealed = {a[0] for a in entry.get("approvals") or [] if isinstance(a, list) and len(a) == 3 and a[2] is True}
    found += [f"{label}: the approval by {p} it sealed does not count against {needs.signers_file.name}: "
              f"{next((a.why for a in judged if a.principal == p), 'no signature of it in the record')}"
              for p in sorted(sealed - holding)]  # fmt: skip
    if len(sealed & holding) < needed:
        found.append(f"{label}: {entry.get('env')} needed {needed} approval(s) of its plan; {len(sealed & holding)} hold")
    return found


def _ran_otherwise(plan: Plan, entry: dict) -> list[str]:
    """How the run its ending seals differs from its plan: another database, another start, another end."""
    found = []
    database = entry.get("database") if isinstance(entry.get("database"), dict) else {}
    if database.get("name") != plan.target.database:
        found.append(f"it ran on database {database.get('name')}, its plan is for {plan.target.database}")
    before = entry.get("revisions_before")
    if before is not None and tuple(before) != plan.target.revisions:
        found.append(f"it started at {', '.join(before) or 'base'}, its plan at {', '.join(plan.target.revisions) or 'base'}")
    after = entry.get("revisions_after")
    if entry.get("outcome") == "succeeded" and after is not None and plan.last and list(after) != [plan.last]:
        found.append(f"it ended at {', '.join(after) or 'base'}, its plan at {plan.last}")
    return found


def _whole(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def unsigned(entries: list[dict]) -> list[str]:
    """The entries `audit verify` names as unsigned, as "run ID (start|end)": those of production runs, and,
    once an entry is signed, every later one (an editor can relabel an entry's environment, not sign it)."""
    first = next((i for i, e in enumerate(entries) if e.get("signature")), len(entries))
    return [
        f"run {e.get('run_id')} ({'start' if e.get('kind') == 'started' else 'end'})"
        for i, e in enumerate(entries)
        if not e.get("signature") and (e.get("env") == "production" or i > first)
    ]


def signature_text(entries: list[dict], hold: bool) -> str:
    """A run's ledger signatures in one line, for its report page: who signed its start and its ending, and
    whether the signatures hold (``hold``: the ledger check found nothing wrong with them)."""
    if not any(e.get("signer") for e in entries):
        return "not signed (no operator key in allowed_signers)"
    parts = [f"{'start' if e.get('kind') == 'started' else 'end'}: {e.get('signer') or 'not signed'}" for e in entries]
    if not hold:
        return f"{'; '.join(parts)}: DO NOT VERIFY (see above)"
    return f"{'; '.join(parts)}: " + ("verified" if all(e.get("signer") for e in entries) else "verified where signed")
