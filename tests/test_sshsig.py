"""SSH signatures and approvals without a database: OpenSSH's ssh-keygen itself, keys made here, never committed."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from opslib import approval, policy, sshsig
from opslib.approval import Approval, Plan, PlannedRevision, PlanTarget
from opslib.errors import ConfigError, InvalidInput, PreconditionFailed


def make_key(folder: Path, name: str) -> Path:
    """A new ed25519 key pair without a passphrase, as `ssh-keygen -t ed25519` makes one."""
    key = folder / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
    return key


def allowed_signers(folder: Path, **principals: Path) -> Path:
    """An allowed_signers file listing each key under its principal (``alice="alice@example.com"`` style)."""
    path = folder / "allowed_signers"
    lines = [f"{principal} {Path(str(key) + '.pub').read_text().strip()}" for principal, key in principals.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def keys(tmp_path):
    made = {name: make_key(tmp_path, name) for name in ("op", "alice", "bob", "mallory")}
    signers = allowed_signers(tmp_path, **{"op@example.com": made["op"], "alice@example.com": made["alice"],
                                           "bob@example.com": made["bob"]})  # fmt: skip
    return made, signers


def a_plan(**changes) -> Plan:
    made = Plan(
        runbook="deploy", env="production", created_at="2026-12-07T00:00:00.000Z", author="op",
        target=PlanTarget("7716430100169369760", "shop", "db.internal", 5432, ("0003",)),
        target_revision="head",
        pending=(PlannedRevision("0004", "migrations/versions/0004_a.py", "a" * 64),
                 PlannedRevision("0005", "migrations/versions/0005_b.py", "b" * 64)),
        sql_sha256="c" * 64, sql_source="offline SQL", env_py_sha256="d" * 64, policy_sha256="e" * 64,
        parameters={"target_revision": "head", "backup": True}, author_principal="op@example.com",
    )  # fmt: skip
    return replace(made, **changes)


def test_a_signature_holds_only_for_its_data_its_namespace_and_a_listed_key(keys):
    made, signers = keys
    signature = sshsig.sign(b"the plan", made["alice"], sshsig.PLAN)
    assert sshsig.signer_of(b"the plan", signature, signers, sshsig.PLAN) == "alice@example.com"
    assert sshsig.signer_of(b"the plan, edited", signature, signers, sshsig.PLAN) is None
    # An approval can never stand for a ledger entry's signature: the namespace is signed too.
    assert sshsig.signer_of(b"the plan", signature, signers, sshsig.LEDGER) is None
    assert not sshsig.verifies(b"the plan", signature, "bob@example.com", signers, sshsig.PLAN)
    stranger = sshsig.sign(b"the plan", made["mallory"], sshsig.PLAN)
    assert sshsig.principals(stranger, signers) == [] and sshsig.signer_of(b"the plan", stranger, signers, sshsig.PLAN) is None
    assert sshsig.signer_of(b"the plan", "not a signature", signers, sshsig.PLAN) is None
    with pytest.raises(ConfigError, match="does not exist"):
        sshsig.sign(b"x", made["op"].with_name("missing"), sshsig.PLAN)


def test_a_signer_is_the_principal_allowed_signers_gives_its_key(keys, tmp_path):
    made, signers = keys
    signer, said = sshsig.signer(made["op"], signers)
    assert signer is not None and signer.principal == "op@example.com" and said == "signed by op@example.com"
    assert sshsig.signer(made["mallory"], signers) == (None, f"not signed: the key {made['mallory']} is not in {signers}")
    assert sshsig.signer(None, signers)[0] is None
    assert "no allowed_signers file" in sshsig.signer(made["op"], tmp_path / "nowhere")[1]


def test_approvals_count_once_per_principal_and_never_the_operators_own(keys):
    made, signers = keys
    plan = a_plan()
    by = {name: approval.approve(plan, made[name], signers, "2026-12-07T01:00:00Z") for name in ("op", "alice", "bob")}
    judged = approval.judge(plan, [by["op"], by["alice"], by["alice"], by["bob"]], signers,
                            operators={"op", "op@example.com"}, self_approval=False)  # fmt: skip
    assert [(a.principal, a.verified, a.counted) for a in judged] == [
        ("op@example.com", True, False), ("alice@example.com", True, True), ("alice@example.com", True, False),
        ("bob@example.com", True, True),
    ]
    assert "self-approval is off" in judged[0].why and judged[2].why == "approved twice"
    # The operator known only by their user name is the same person as their principal.
    assert not approval.judge(plan, [by["alice"]], signers, operators={"alice"}, self_approval=False)[0].counted
    assert approval.judge(plan, [by["op"]], signers, operators={"op"}, self_approval=True)[0].counted
    # The name written beside a signature says nothing: the key that made it does.
    claimed = replace(by["bob"], principal="alice@example.com")
    assert approval.judge(plan, [claimed], signers, operators=set(), self_approval=False)[0].principal == "bob@example.com"


def test_a_forged_or_foreign_approval_never_counts(keys):
    made, signers = keys
    plan = a_plan()
    other = approval.approve(a_plan(target_revision="0004"), made["alice"], signers, "t")  # alice signed another plan
    forged = Approval("alice@example.com", "ssh", sshsig.sign(plan.canonical(), made["mallory"], sshsig.PLAN))
    garbage = Approval("alice@example.com", "ssh", "-----BEGIN SSH SIGNATURE-----\nAAAA\n-----END SSH SIGNATURE-----\n")
    outside = Approval("carol", "airflow", ref="airflow dag/run/approve")
    judged = approval.judge(plan, [other, forged, garbage, outside], signers, operators=set(), self_approval=False)
    assert [a.counted for a in judged] == [False, False, False, False]
    assert "made for another plan, or forged" in judged[0].why
    assert judged[1].why == "made by a key allowed_signers does not list"
    assert judged[3].verified is None and judged[3].why == "not a signature of the plan"
    with pytest.raises(InvalidInput, match="is not in"):
        approval.approve(plan, made["mallory"], signers, "t")


def test_a_plan_file_round_trips_and_its_approvals_are_kept_beside_it(keys, tmp_path):
    made, signers = keys
    path = approval.write_plan(tmp_path / "PLAN.json", a_plan())
    plan = approval.read_plan(path)
    assert plan == a_plan() and plan.sha256 == a_plan().sha256
    approval.add_approval(path, approval.approve(plan, made["alice"], signers, "t1"))
    kept = approval.add_approval(path, approval.approve(plan, made["alice"], signers, "t2"))  # again: replaced
    assert [(a.principal, a.approved_at) for a in kept] == [("alice@example.com", "t2")]
    approval.write_plan(path, a_plan(target_revision="0004"))  # a new plan: the old approvals go with the old plan
    assert approval.read_approvals(path) == []
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(InvalidInput, match="not an opslib plan"):
        approval.read_plan(tmp_path / "bad.json")
    with pytest.raises(InvalidInput, match="no plan at"):
        approval.read_plan(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"target": PlanTarget("1", "shop", "db.internal", 5432, ("0003",))}, "the plan is for database shop on server 7716430100169369760"),
        ({"target": PlanTarget("7716430100169369760", "shop", "db.internal", 5432, ("0004",))}, "the database stands at 0004"),
        ({"env": "staging"}, "environment: the plan is for production, this run is in staging"),
        ({"pending": a_plan().pending + (PlannedRevision("0006", "v/0006.py", "f" * 64),)}, "revision 0006 is pending but not in the plan"),
        ({"pending": (PlannedRevision("0004", "migrations/versions/0004_a.py", "0" * 64), a_plan().pending[1])},
         "revision 0004: its file migrations/versions/0004_a.py was edited"),
        ({"sql_sha256": "0" * 64}, "the SQL that would run differs"),
        ({"env_py_sha256": "0" * 64}, "env.py was edited"),
        ({"policy_sha256": None}, "policy file was edited"),
        ({"parameters": {"target_revision": "head", "backup": False}}, "parameter backup: the plan says True, this run False"),
    ],
)  # fmt: skip
def test_each_difference_from_the_approved_plan_is_named(changes, named):
    assert any(named in line for line in approval.differences(a_plan(), a_plan(**changes))), approval.differences(a_plan(), a_plan(**changes))


def test_what_an_approval_does_not_bind_never_differs():
    # The time it was made, the plan's own path and the confirmation typed at the run are not what was approved.
    same = a_plan(created_at="later", parameters={**a_plan().parameters, "confirm": "shop", "plan": "elsewhere.json"})
    assert approval.differences(a_plan(), same) == []
    # Two servers whose system identifiers could not be read are told apart by where they are reached.
    unknown = PlanTarget(None, "shop", "db.internal", 5432, ("0003",))
    assert approval.differences(a_plan(target=unknown), a_plan(target=replace(unknown, host="other"))) != []
    assert approval.differences(a_plan(target=unknown), a_plan(target=unknown)) == []


def test_what_moved_after_the_preflight_is_refused(tmp_path):
    (tmp_path / "0004.py").write_text("approved")
    plan = a_plan(pending=(PlannedRevision("0004", "0004.py", approval.file_sha256(tmp_path / "0004.py")),))
    approval.require_unchanged(plan, tmp_path, ("0003",), plan.env_py_sha256)
    with pytest.raises(PreconditionFailed, match=r"the database moved to 0004 \(the plan starts at 0003\)"):
        approval.require_unchanged(plan, tmp_path, ("0004",), plan.env_py_sha256)
    with pytest.raises(PreconditionFailed, match="env.py was edited"):
        approval.require_unchanged(plan, tmp_path, ("0003",), "0" * 64)
    (tmp_path / "0004.py").write_text("edited")
    with pytest.raises(PreconditionFailed, match=r"the file\(s\) of revision\(s\) 0004 were edited: nothing was applied"):
        approval.require_unchanged(plan, tmp_path, ("0003",), plan.env_py_sha256)


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ("production = -1", "production = -1: it must be from 0 to 10"),
        ('production = "one"', "production = 'one': expected int"),
        ("self_approval = 1", "expected bool"),
        ('allowed_signers = ""', "allowed_signers is empty"),
        ("prod = 1", "unknown key(s) in [approvals]: prod"),
    ],
)
def test_a_wrong_approvals_table_is_a_configuration_error(tmp_path, table, error):
    (tmp_path / "alembic.ini").write_text("[alembic]\n")
    (tmp_path / "opslib.toml").write_text(f"[approvals]\n{table}\n")
    with pytest.raises(ConfigError, match=error.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        policy.load_approval_policy(tmp_path / "alembic.ini")


def test_the_approvals_table_reads_its_signers_beside_the_policy(tmp_path):
    (tmp_path / "alembic.ini").write_text("[alembic]\n")
    assert policy.load_approval_policy(tmp_path / "alembic.ini").needed("production") == 0
    (tmp_path / "opslib.toml").write_text('[approvals]\nproduction = 2\nstaging = 1\nallowed_signers = "keys/signers"\n')
    read = policy.load_approval_policy(tmp_path / "alembic.ini")
    assert (read.needed("production"), read.needed("staging"), read.needed("development"), read.self_approval) == (2, 1, 0, False)
    assert read.signers_file == tmp_path.resolve() / "keys" / "signers"
    assert policy.load_policy(tmp_path / "alembic.ini").approvals == read


def test_a_retired_key_still_vouches_for_what_it_signed_while_it_was_valid(keys, tmp_path):
    made, _ = keys
    signature = sshsig.sign(b"an entry", made["alice"], sshsig.LEDGER)
    retired = tmp_path / "retired_signers"
    retired.write_text(f'alice@example.com valid-before="20261201" {Path(str(made["alice"]) + ".pub").read_text()}')
    assert not sshsig.verifies(b"an entry", signature, "alice@example.com", retired, sshsig.LEDGER)  # now: retired
    assert sshsig.verifies(b"an entry", signature, "alice@example.com", retired, sshsig.LEDGER, "2026-11-30T10:00:00.000Z")
    assert sshsig.signer_of(b"an entry", signature, retired, sshsig.LEDGER, "2026-11-30T10:00:00.000Z") == "alice@example.com"


def test_ssh_keygen_missing_slow_or_asking_a_passphrase_is_one_line(keys, tmp_path, monkeypatch):
    made, signers = keys
    locked = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "a passphrase", "-f", str(locked)], check=True)
    with pytest.raises(ConfigError, match=r"needs its passphrase, which a run cannot ask for: add it to ssh-agent"):
        sshsig.sign(b"x", locked, sshsig.PLAN)
    slow = tmp_path / "bin"
    slow.mkdir()
    (slow / "ssh-keygen").write_text("#!/bin/sh\nexec /bin/sleep 30\n")
    (slow / "ssh-keygen").chmod(0o755)
    monkeypatch.setenv("PATH", str(slow))
    monkeypatch.setattr(sshsig, "_TIMEOUT_S", 0.5)
    with pytest.raises(ConfigError, match=r"ssh-keygen sign gave no answer within 0.5 s"):
        sshsig.sign(b"x", made["op"], sshsig.PLAN)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="ssh-keygen is not installed"):
        sshsig.sign(b"x", made["op"], sshsig.PLAN)
    copy = tmp_path / "op-copy"  # a key this process has not asked about: the answer is not cached
    copy.write_bytes(made["op"].read_bytes())
    found, said = sshsig.signer(copy, signers)
    assert found is None and said == "not signed: ssh-keygen is not installed: install OpenSSH's client (Debian: openssh-client)"


def test_a_plan_or_approvals_file_of_another_shape_is_bad_input(keys, tmp_path):
    made, signers = keys
    path = approval.write_plan(tmp_path / "PLAN.json", a_plan())
    good = json.loads(path.read_text())
    for field, value in (("author_principal", ["op@example.com"]), ("parameters", []), ("target", None),
                         ("pending", "0004"), ("policy_sha256", 1), ("extra", 1)):  # fmt: skip
        path.write_text(json.dumps({**good, field: value}))
        with pytest.raises(InvalidInput, match="plan"):
            approval.read_plan(path)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InvalidInput, match="cannot be read"):
        approval.read_plan(path)
    approval.write_plan(path, a_plan())
    one = approval.approve(a_plan(), made["alice"], signers, "t").to_dict()
    approval.approvals_path(path).write_text(json.dumps([one] * 3))
    assert len(approval.read_approvals(path)) == 1  # copies say nothing more
    approval.approvals_path(path).write_text(json.dumps([one] * (approval.MAX_APPROVALS + 1)))
    with pytest.raises(InvalidInput, match="more than 50"):
        approval.read_approvals(path)


def test_self_approval_is_the_same_principal_or_a_bare_user_name_never_a_namesake(keys, tmp_path):
    made, _ = keys
    signers = allowed_signers(tmp_path, **{"op@other.org": made["bob"], "op@example.com": made["op"], "anyone*": made["alice"]})
    plan = a_plan()
    by = {name: approval.approve(plan, made[name], signers, "t") for name in ("bob", "op")}
    judged = approval.judge(plan, [by["bob"], by["op"]], signers, operators={"op@example.com"}, self_approval=False)
    assert [(a.principal, a.counted) for a in judged] == [("op@other.org", True), ("op@example.com", False)]
    assert not approval.judge(plan, [by["bob"]], signers, operators={"op"}, self_approval=False)[0].counted  # "op": a user name
    # A wildcard in allowed_signers names no one person: a signature by its key approves nothing.
    wild = Approval("anyone", "ssh", sshsig.sign(plan.canonical(), made["alice"], sshsig.PLAN))
    assert approval.judge(plan, [wild], signers, operators=set(), self_approval=False)[0].counted is False


def test_a_long_difference_is_one_short_line():
    many = tuple(PlannedRevision(f"r{i:03d}", f"v/r{i:03d}.py", "a" * 64) for i in range(160))
    found = approval.differences(a_plan(pending=many), a_plan(pending=()))
    assert found == ["revisions r000, r001, r002 and 157 more are in the plan but would not run"]
