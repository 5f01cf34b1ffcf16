"""Four eyes: a deploy's plan, written before it runs, and the approvals of it, signed with SSH keys.

``opslib plan`` writes a :class:`Plan`: the target's identity, the revisions that will run (each file's
sha256), the sha256 of the SQL they render, the policy's sha256, the parameters. ``opslib approve`` signs
the plan's canonical JSON with the approver's key (``ssh-keygen -Y sign``, namespace ``opslib-plan``) and
keeps the signature beside the plan (``PLAN.json.approvals``). A deploy given the plan compares it with
what it finds at preflight (:func:`differences`) and counts the approvals that verify against the
project's ``allowed_signers`` (:func:`judge`): the signatures, not the names written beside them, say who
approved.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any, Iterable

from opslib import sshsig
from opslib.errors import InvalidInput, PreconditionFailed

PLAN_FORMAT = "opslib-plan/1"
MAX_APPROVALS = 50  # more approvals of one plan than any team asks: a file made by hand
# The parameters a plan does not bind: the plan itself, and the confirmation typed at the run.
UNBOUND_PARAMETERS = frozenset({"plan", "confirm"})


@dataclass(frozen=True)
class PlannedRevision:
    """One revision the plan applies: its id, its file (relative to the project's folder) and the file's sha256."""

    revision: str
    path: str
    sha256: str


@dataclass(frozen=True)
class PlanTarget:
    """The database a plan was made for: the server's system identifier, its name and where it stood."""

    system_identifier: str | None
    database: str
    host: str | None
    port: int | None
    revisions: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """A deploy worked out before it runs, for approvers to sign and for the run to hold itself to."""

    runbook: str
    env: str
    created_at: str
    author: str
    target: PlanTarget
    target_revision: str
    pending: tuple[PlannedRevision, ...]
    sql_sha256: str
    sql_source: str  # "offline SQL", or "offline SQL and the sources of N revision(s) that cannot render offline"
    env_py_sha256: str | None
    policy_sha256: str | None  # None: the project has no policy file
    parameters: dict[str, Any] = field(default_factory=dict)
    author_principal: str | None = None  # the author's principal, when they had a key allowed_signers lists
    signers_sha256: str | None = None  # the allowed_signers file the plan was made under (None: there was none)
    format: str = PLAN_FORMAT

    def to_dict(self) -> dict:
        """The plan file's JSON object."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        """A plan from its JSON, each field of the type opslib writes; anything else is an :class:`InvalidInput`
        (exit 2) naming the field."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise InvalidInput(f"not an opslib plan (its format is not {PLAN_FORMAT}): make one with `opslib plan`")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise InvalidInput(f"the plan holds what opslib never writes there: {', '.join(unknown)} (edited by hand?)")
        target, pending = data.get("target"), data.get("pending")
        _expect(isinstance(target, dict) and _texts(target.get("revisions")), "target")
        _expect(isinstance(pending, (list, tuple)) and all(isinstance(p, dict) for p in pending), "pending")
        try:
            made = cls(**{**data, "target": PlanTarget(**{**target, "revisions": tuple(target["revisions"])}),
                          "pending": tuple(PlannedRevision(**p) for p in pending)})  # fmt: skip
        except TypeError:
            raise InvalidInput("the plan's fields, its target's or its revisions' are not those opslib writes (edited by hand?)") from None
        for name in ("runbook", "env", "created_at", "author", "target_revision", "sql_sha256", "sql_source"):
            _expect(isinstance(getattr(made, name), str), name)
        _expect(isinstance(made.parameters, dict), "parameters")
        for name in ("author_principal", "signers_sha256", "env_py_sha256", "policy_sha256"):
            _expect(getattr(made, name) is None or isinstance(getattr(made, name), str), name)
        t = made.target
        _expect(isinstance(t.database, str) and all(v is None or isinstance(v, str) for v in (t.system_identifier, t.host))
                and (t.port is None or (isinstance(t.port, int) and not isinstance(t.port, bool))), "target")  # fmt: skip
        _expect(all(isinstance(v, str) for p in made.pending for v in (p.revision, p.path, p.sha256)), "pending")
        return made

    def canonical(self) -> bytes:
        """The bytes an approval signs: the plan's JSON with sorted keys and no spaces, whatever the file's layout."""
        return canonical_json(self.to_dict())

    @property
    def sha256(self) -> str:
        """The sha256 of :meth:`canonical`: the plan's identity in records and the ledger."""
        return plan_sha256(self.to_dict())

    @property
    def last(self) -> str | None:
        """The revision the plan ends at (None: nothing to apply)."""
        return self.pending[-1].revision if self.pending else None


class Verdict(str, Enum):
    """What became of one approval when it was judged: the one reason, kept in records as its value."""

    COUNTED = "counted"
    OWN = "the operator's own approval (self-approval is off)"
    TWICE = "approved twice"
    UNKNOWN_KEY = "made by a key allowed_signers does not list"
    BAD_SIGNATURE = "the signature does not verify: it was made for another plan, or forged"
    OUTSIDE = "not a signature of the plan"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Approval:
    """One approval of a run: an SSH signature of its plan, or an answer in a gate outside opslib (Airflow).

    ``verified`` says whether the signature held when it was judged (None: nothing to verify, as for an
    answer in Airflow), ``counted`` whether it counts towards the approvals needed, ``why`` why not."""

    principal: str
    source: str = "ssh"  # "ssh": a signature of the plan; "airflow": an approval task's answer
    signature: str | None = None
    approved_at: str | None = None
    ref: str | None = None  # where an outside gate keeps the answer
    verified: bool | None = None
    counted: bool | None = None
    why: str | None = None

    def to_dict(self) -> dict:
        """The JSON object kept in the approvals file and in a run's record."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Any) -> "Approval | None":
        """An approval from its JSON; None when it is not one (edited into another shape)."""
        if not isinstance(data, dict) or not isinstance(data.get("principal"), str):
            return None
        known = {k: data.get(k) for k in ("principal", "source", "signature", "approved_at", "ref", "verified", "counted", "why")}
        if not all(v is None or isinstance(v, str) for k, v in known.items() if k not in ("verified", "counted")):
            return None
        return cls(**{k: v for k, v in known.items() if v is not None})


def _expect(ok: bool, name: str) -> None:
    if not ok:
        raise InvalidInput(f"the plan's {name} is not what opslib writes there (edited by hand?)")


def _texts(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def outside_approvals(approved_by: str | None, ref: str | None) -> list[Approval] | None:
    """The approval a gate outside opslib gave a run (``OPSLIB_APPROVED_BY``, ``OPSLIB_APPROVAL_REF``: an
    Airflow approval task's answer), as the run's record keeps it; None when there was none. It is recorded,
    sealed in the run's first ledger entry, and shown; it is never a signature of a plan."""
    if not approved_by:
        return None
    source = (ref or "").split(None, 1)[0] if ref else "gate"
    return [Approval(approved_by, source or "gate", ref=ref)]


def canonical_json(data: Any) -> bytes:
    """JSON with sorted keys, no spaces and ASCII only: the same bytes for the same facts, whatever the layout."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def plan_sha256(data: Any) -> str:
    """The sha256 of a plan's canonical JSON (a plan's JSON as a record keeps it)."""
    return hashlib.sha256(canonical_json(data)).hexdigest()


def read_plan(path: Path) -> Plan:
    """The plan in ``path``; a missing or malformed file is an :class:`InvalidInput` (exit 2) naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInput(f"no plan at {path}: make one with `opslib plan --out {path}`") from None
    except IsADirectoryError:
        raise InvalidInput(f"the plan {path} is a folder: name the plan file `opslib plan --out` wrote") from None
    except (OSError, ValueError, RecursionError) as err:
        raise InvalidInput(f"the plan {path} cannot be read: {str(err)[:200]}") from None
    try:
        return Plan.from_dict(data)
    except InvalidInput as err:
        raise InvalidInput(f"{path}: {err.message}") from None


def write_plan(path: Path, plan: Plan, sql: str = "", unrendered: Iterable[tuple[str, str]] = ()) -> Path:
    """Write ``plan`` to ``path`` (readable JSON), and beside it the SQL it runs for approvers to read
    (``PLAN.json.sql``: the offline render, each revision that cannot render offline named); approvals of an
    earlier plan there are removed with it."""
    path = Path(path)
    notes = "".join(f"-- {revision} cannot render offline ({why}): its source is what runs, hashed in the plan\n"
                    for revision, why in unrendered)  # fmt: skip
    for where, text in ((sql_path(path), notes + sql), (path, json.dumps(plan.to_dict(), indent=2, sort_keys=True) + "\n")):
        tmp = where.with_name(f".{where.name}.{os.getpid()}.partial")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, where)
    approvals_path(path).unlink(missing_ok=True)  # they signed another plan
    return path


def sql_path(plan_path: Path) -> Path:
    """Where the SQL of the plan in ``plan_path`` is written for approvers to read: ``PLAN.json.sql``."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + ".sql")


def plan_text(plan: Plan) -> str:
    """A plan in one line: what it applies, where, for which environment, made by whom, and its sha256."""
    return (f"{len(plan.pending)} revision(s), {_revs(plan.target.revisions)} -> {plan.last or 'nothing to apply'}, "
            f"on database {plan.target.database} (server {plan.target.system_identifier or 'not read'}), "
            f"{plan.env}, made by {plan.author} at {plan.created_at}; sha256 {plan.sha256[:16]}…")  # fmt: skip


def approvals_path(plan_path: Path) -> Path:
    """Where the approvals of the plan in ``plan_path`` are kept: beside it, ``PLAN.json.approvals``."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + ".approvals")


def read_approvals(plan_path: Path) -> list[Approval]:
    """The approvals kept beside a plan (none yet: an empty list); a malformed file is an :class:`InvalidInput`."""
    path = approvals_path(plan_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError, RecursionError) as err:
        raise InvalidInput(f"the approvals {path} cannot be read: {str(err)[:200]}") from None
    if not isinstance(data, list):
        raise InvalidInput(f"the approvals {path} are not a list of signatures")
    if len(data) > MAX_APPROVALS:  # each is one ssh-keygen process, at every deploy and every audit
        raise InvalidInput(f"the approvals {path} hold {len(data)} items, more than {MAX_APPROVALS}: not opslib's")
    found = [a for a in (Approval.from_dict(item) for item in data) if a is not None]
    return list({(a.source, a.signature, a.principal): a for a in found}.values())  # a copy says nothing more


def add_approval(plan_path: Path, approval: Approval) -> list[Approval]:
    """Keep ``approval`` beside the plan, replacing an earlier one by the same principal; returns them all.
    A lock makes two approvers signing at once both kept."""
    path = approvals_path(plan_path)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kept = [a for a in read_approvals(plan_path) if a.principal != approval.principal] + [approval]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps([a.to_dict() for a in kept], indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return kept


def approve(plan: Plan, key: Path, allowed_signers: Path, approved_at: str) -> Approval:
    """``key``'s approval of ``plan``: its signature, and the principal allowed_signers gives the key. A key
    the file does not list cannot approve: an :class:`InvalidInput` naming the file."""
    signature = sshsig.sign(plan.canonical(), key, sshsig.PLAN)
    principal = sshsig.signer_of(plan.canonical(), signature, allowed_signers, sshsig.PLAN)
    if principal is None:
        raise InvalidInput(
            f"the key {key} is not in {allowed_signers} (or not for namespace {sshsig.PLAN}): an approval by it "
            "would not count; add its public key there, as `PRINCIPAL ssh-ed25519 AAAA…`"
        )
    return Approval(principal, "ssh", signature, approved_at)


def judge(plan: Plan, approvals: Iterable[Approval], allowed_signers: Path, *, operators: Iterable[str | None],
          self_approval: bool, at: str | None = None) -> list[Approval]:  # fmt: skip
    """Each approval of ``plan`` as it stands: a signature verified against ``allowed_signers`` (the principal
    the file gives the signing key, never the name written beside it; with ``at``, the keys valid then), then
    counted unless it is the operator's own (``operators``: see :func:`operators_of`) while ``self_approval``
    is off, or a second one by the same principal. Each judged approval's ``why`` is its :class:`Verdict`."""
    mine = {name for name in operators if name}
    judged, counted = [], set()
    for approval in approvals:
        if approval.source != "ssh":  # an outside gate's answer: recorded, never counted as a signature
            judged.append(_judged(approval, None, Verdict.OUTSIDE))
            continue
        signer = _signer(plan, approval, allowed_signers, at)
        if signer is None:
            known = sshsig.principals(approval.signature or "", allowed_signers, at) if Path(allowed_signers).is_file() else []
            judged.append(_judged(approval, False, Verdict.BAD_SIGNATURE if known else Verdict.UNKNOWN_KEY))
        elif not self_approval and _is_own(signer, mine):
            judged.append(_judged(replace(approval, principal=signer), True, Verdict.OWN))
        elif signer in counted:
            judged.append(_judged(replace(approval, principal=signer), True, Verdict.TWICE))
        else:
            counted.add(signer)
            judged.append(_judged(replace(approval, principal=signer), True, Verdict.COUNTED))
    return judged


def _judged(approval: Approval, verified: bool | None, verdict: Verdict) -> Approval:
    counts = verdict is Verdict.COUNTED
    return replace(approval, verified=verified, counted=counts, why=None if counts else verdict.value)


def verdict_of(approval: Approval) -> Verdict | None:
    """The :class:`Verdict` a judged approval holds (None: not judged, or judged by another opslib)."""
    if approval.counted:
        return Verdict.COUNTED
    try:
        return Verdict(approval.why)
    except ValueError:
        return None


def counted(approvals: Iterable[Approval]) -> int:
    """How many of the judged ``approvals`` count."""
    return sum(1 for a in approvals if a.counted)


def operators_of(plan: Plan, operator_principal: str | None, operator: str | None = None) -> set[str]:
    """Who an approval of ``plan`` must not come from while self-approval is off: the plan's author (their
    principal, and their name) and the operator of the run (their key's principal; their name, when given)."""
    return {name for name in (plan.author, plan.author_principal, operator_principal, operator) if name}


def _signer(plan: Plan, approval: Approval, allowed_signers: Path, at: str | None) -> str | None:
    if not approval.signature or not Path(allowed_signers).is_file():
        return None
    return sshsig.signer_of(plan.canonical(), approval.signature, allowed_signers, sshsig.PLAN, at)


def _is_own(principal: str, operators: set[str]) -> bool:
    """Whether ``principal`` is one of ``operators``: the same principal, or, for an operator known only by a
    user name (``alice``, no ``@``), a principal of that name (``alice@example.com``)."""
    return principal in operators or principal.split("@", 1)[0] in {o for o in operators if "@" not in o}


def differences(approved: Plan, now: Plan) -> list[str]:
    """What differs between the plan approved and the plan as the target and the project stand now, each
    as one line naming the fact (empty: the run is the plan)."""
    found = []
    a, b = approved.target, now.target
    if _server_of(a) != _server_of(b) or a.database != b.database:
        found.append(f"target: the plan is for database {a.database} on server {a.system_identifier}, "
                     f"this run's is {b.database} on server {b.system_identifier}")  # fmt: skip
    if a.revisions != b.revisions:
        found.append(f"the database stands at {_revs(b.revisions)}, the plan was made at {_revs(a.revisions)}")
    if approved.env != now.env:
        found.append(f"environment: the plan is for {approved.env}, this run is in {now.env}")
    found += _revision_differences(approved.pending, now.pending)
    if approved.sql_sha256 != now.sql_sha256 and not found:
        found.append(f"the SQL that would run differs from the plan's ({approved.sql_source}): env.py or what the revisions import changed")
    if approved.env_py_sha256 != now.env_py_sha256:
        found.append("env.py was edited since the plan was made")
    if approved.policy_sha256 != now.policy_sha256:
        found.append("the project's policy file was edited since the plan was made")
    if approved.signers_sha256 != now.signers_sha256:
        found.append("allowed_signers was edited since the plan was made: who may approve is not what it was")
    for name in sorted(set(approved.parameters) | set(now.parameters)):
        if name in UNBOUND_PARAMETERS or approved.parameters.get(name) == now.parameters.get(name):
            continue
        found.append(f"parameter {name}: the plan says {approved.parameters.get(name)!r}, this run {now.parameters.get(name)!r}")
    return found


def approvals_text(approvals: Iterable[Approval], needed: int) -> str:
    """The approvals as one line: each approver, whether the signature holds and counts, and what is needed."""
    parts = []
    for a in approvals:
        if a.verified is None:
            state = f"{a.source}, not a signature"
        else:
            state = "counted" if a.counted else f"{'not counted' if a.verified else 'not verified'}: {a.why}"
        parts.append(f"{a.principal} ({state})")
    return f"{'; '.join(parts) or 'none'} ({needed} needed)"


def require_unchanged(plan: Plan, folder: Path, revisions: tuple[str, ...], env_py_sha256: str | None) -> None:
    """Refuse (:class:`PreconditionFailed`) when, since the preflight held the run to ``plan``, a revision file
    of it or env.py (in the project's ``folder``) was edited, or the database moved from where the plan starts."""
    moved = []
    edited = [p.revision for p in plan.pending if file_sha256(folder / p.path) != p.sha256]
    if edited:
        moved.append(f"the file(s) of revision(s) {', '.join(edited)} were edited")
    if env_py_sha256 != plan.env_py_sha256:
        moved.append("env.py was edited")
    if tuple(revisions) != plan.target.revisions:
        moved.append(f"the database moved to {_revs(tuple(revisions))} (the plan starts at {_revs(plan.target.revisions)})")
    if moved:
        raise PreconditionFailed(
            f"since the preflight compared the run with its plan, {'; '.join(moved)}: nothing was applied; "
            "make and approve a new plan"
        )


def file_sha256(path: Path) -> str | None:
    """The sha256 of a file's bytes, None when it cannot be read (a plan's revision files, env.py, the policy)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _revision_differences(approved: tuple[PlannedRevision, ...], now: tuple[PlannedRevision, ...]) -> list[str]:
    planned, pending = {p.revision: p for p in approved}, {p.revision: p for p in now}
    new = [r for r in pending if r not in planned]
    gone = [r for r in planned if r not in pending]
    edited = [r for r in planned if r in pending and planned[r].sha256 != pending[r].sha256]
    found = []
    if new:
        found.append(f"{_some(new)} pending but not in the plan (new since it was made)")
    if gone:
        found.append(f"{_some(gone)} in the plan but would not run")
    if len(edited) == 1:
        found.append(f"revision {edited[0]}: its file {pending[edited[0]].path} was edited since the plan was made")
    elif edited:
        found.append(f"the files of {_some(edited).rsplit(' ', 1)[0]} were edited since the plan was made")
    if not found and [p.revision for p in approved] != [p.revision for p in now]:
        found.append("the revisions would run in another order than the plan's")
    return found


def _some(revisions: list[str], shown: int = 3) -> str:
    """Revisions named in a line: "revision A is", or "revisions A, B, C and 157 more are"."""
    if len(revisions) == 1:
        return f"revision {revisions[0]} is"
    more = f" and {len(revisions) - shown} more" if len(revisions) > shown else ""
    return f"revisions {', '.join(revisions[:shown])}{more} are"


def _server_of(target: PlanTarget) -> tuple:
    """The server a target is on: its system identifier, or where it is reached when that could not be read
    (two servers whose identifiers are both unknown are never taken for one)."""
    return (target.system_identifier,) if target.system_identifier else (None, target.host, target.port)


def _revs(revisions: tuple[str, ...]) -> str:
    return ", ".join(revisions) or "base"
