"""Signatures in the records: the ledger entries signed by their operators' keys, and the approvals of the
runs' plans, checked against the project's allowed_signers (see :mod:`opslib.sshsig`).

A hostile editor of the records folder and of the database's ``opslib`` schema can recompute every
hash; they cannot make a signature without a private key. An entry whose signature no longer verifies
was edited after it was signed; an approval that does not verify was never made by a key the project
allows.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from opslib import sshsig
from opslib.approval import Approval, Plan, judge, plan_sha256
from opslib.config import Settings
from opslib.errors import ConfigError, InvalidInput
from opslib.outcome import CHANGED_NOTHING
from opslib.policy import load_approval_policy



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


def entry_problems(entry: dict, label: str, signers: Path) -> list[str]:
    """What is wrong with a ledger entry's signature (none when it holds, or the entry is unsigned)."""
    signature, signer = entry.get("signature"), entry.get("signer")
    if signature is None and signer is None:
        return []
    if not isinstance(signature, str) or not isinstance(signer, str):
        return [f"{label}: its signature or signer was removed or edited"]
    if not Path(signers).is_file():
        return [f"{label}: signed by {signer}, but there is no allowed_signers file at {signers} to check it with"]
    if not sshsig.verifies(signed_bytes(entry), signature, signer, signers, sshsig.LEDGER):
        return [f"{label}: its signature by {signer} does not verify: the entry was edited after it was signed, "
                f"or not signed by a key {signers.name} gives {signer}"]  # fmt: skip
    return []


def approval_problems(sidecar: dict | None, entry: dict, label: str, signers: Path) -> list[str]:
    """What is wrong with the approvals a run's ending seals: its sidecar's plan must be the one sealed, every
    approval sealed as counted must still verify against ``signers``, and a run that may have changed its
    database must have had the approvals its policy asked for."""
    needed = entry.get("approvals_needed") or 0
    sealed = {a[0] for a in entry.get("approvals") or [] if isinstance(a, list) and len(a) == 3 and a[2] is True}
    if not needed and not sealed:
        return []
    data = sidecar if isinstance(sidecar, dict) else {}
    plan = data.get("plan")
    if entry.get("plan_sha256") and (not isinstance(plan, dict) or plan_sha256(plan) != entry.get("plan_sha256")):
        return [f"{label}: the plan in its record is not the plan its ending sealed"]
    try:
        approved = Plan.from_dict(plan) if isinstance(plan, dict) else None
    except InvalidInput:
        approved = None
    judged = [] if approved is None else judge(
        approved, [a for a in (Approval.from_dict(v) for v in data.get("approvals") or []) if a is not None],
        signers, operators={entry.get("operator"), entry.get("signer"), approved.author, approved.author_principal},
        self_approval=True,  # who counted is what the run judged (sealed); here each signature must still hold
    )  # fmt: skip
    holding = {a.principal for a in judged if a.verified}
    found = [f"{label}: the approval by {p} it sealed does not verify against {Path(signers).name}" for p in sorted(sealed - holding)]
    if entry.get("outcome") not in CHANGED_NOTHING and len(sealed & holding) < needed:
        found.append(f"{label}: {entry.get('env')} needed {needed} approval(s) of its plan; {len(sealed & holding)} hold")
    return found


def unsigned_production(entries: list[dict]) -> list[str]:
    """The production runs with a ledger entry that is not signed, as "run ID (start|end)", named by `audit verify`."""
    return [
        f"run {e.get('run_id')} ({'start' if e.get('kind') == 'started' else 'end'})"
        for e in entries
        if e.get("env") == "production" and not e.get("signature")
    ]


def signature_text(entries: list[dict], problems: list[str]) -> str:
    """A run's ledger signatures in one line, for its report page: who signed its start and its ending, and
    whether the signatures hold (``problems``: what the ledger check found on the run's entries)."""
    signers = [e.get("signer") for e in entries]
    if not any(signers):
        return "not signed (no operator key in allowed_signers)"
    broken = [p for p in problems if "signature" in p]
    parts = [f"{'start' if e.get('kind') == 'started' else 'end'}: {e.get('signer') or 'not signed'}" for e in entries]
    return f"{'; '.join(parts)}: " + ("DO NOT VERIFY (see above)" if broken else "verified")
