"""Four eyes on production, end to end: `opslib plan`, `opslib approve`, a production deploy held to its approved
plan, signed ledger entries, and what `audit verify`, the summary and the report make of them. Real PostgreSQL,
real papermill, real ssh-keygen; the keys are made here and never committed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from opslib import approval, audit, signatures, sshsig

from .conftest import ROOT, database_name, opslib_cli, query
from .test_sshsig import allowed_signers, make_key


class FourEyes:
    """A copy of the sample project whose policy asks one approval in production, four keys (op, alice and bob
    listed in allowed_signers; mallory not), and a database at 0003."""

    def __init__(self, tmp_path: Path, url: str):
        self.work, self.url = tmp_path / "work", url
        self.project = tmp_path / "project"
        self.project.mkdir()
        shutil.copy(ROOT / "alembic.ini", self.project)
        shutil.copytree(ROOT / "migrations", self.project / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
        (self.project / "opslib.toml").write_text("[approvals]\nproduction = 1\n")
        keys = tmp_path / "keys"
        keys.mkdir()
        self.keys = {name: make_key(keys, name) for name in ("op", "alice", "bob", "mallory")}
        allowed_signers(self.project, **{"op@example.com": self.keys["op"], "alice@example.com": self.keys["alice"],
                                         "bob@example.com": self.keys["bob"]})  # fmt: skip
        self.plan = self.work / "PLAN.json"
        assert self.cli("upgrade", "0003").returncode == 0

    @property
    def alembic_ini(self) -> Path:
        return self.project / "alembic.ini"

    def cli(self, *args: str, key: str | None = "op", url: str | None = None, operator: str = "op"):
        env = {"OPSLIB_OPERATOR": operator}
        if key:
            env["OPSLIB_SIGNING_KEY"] = str(self.keys[key])
        return opslib_cli(url or self.url, self.alembic_ini, self.work, *args, env=env)

    def deploy(self, *extra: str, url: str | None = None, key: str | None = "op"):
        name = database_name(url or self.url)
        return self.cli("run", "deploy", "--env", "production", "-p", "confirm", name, *extra, url=url, key=key)

    def revision(self, url: str | None = None) -> str:
        return query(url or self.url, "SELECT version_num FROM alembic_version")[0][0]

    def endings(self) -> list[dict]:
        return audit.read_endings(self.work / "records")


@pytest.fixture
def four_eyes(tmp_path, database_url):
    return FourEyes(tmp_path, database_url)


def test_a_production_deploy_runs_only_an_approved_plan_and_its_records_name_the_approvers(four_eyes):
    f = four_eyes
    refused = f.deploy()
    assert refused.returncode == 3 and "production needs 1 approval(s) of a plan" in refused.stderr, refused.stderr
    planned = f.cli("plan", "--env", "production", "--out", str(f.plan))
    assert planned.returncode == 0 and "4 revision(s), 0003 -> 0007" in planned.stdout, planned.stdout + planned.stderr
    written = approval.read_plan(f.plan)
    assert written.author_principal == "op@example.com" and [p.revision for p in written.pending] == ["0004", "0005", "0006", "0007"]
    # The operator's own approval is kept, shown, and does not count.
    assert f.cli("approve", str(f.plan)).returncode == 0
    own = f.deploy("-p", "plan", str(f.plan))
    assert own.returncode == 3 and "approved only by its operator (self-approval is off)" in own.stderr, own.stderr
    assert f.cli("approvals", str(f.plan)).returncode == 3
    by_alice = f.cli("approve", str(f.plan), "--key", str(f.keys["alice"]), key=None, operator="alice")
    assert by_alice.returncode == 0 and "alice@example.com approved" in by_alice.stdout, by_alice.stderr
    assert f.revision() == "0003"  # every refusal above changed nothing
    done = f.deploy("-p", "plan", str(f.plan))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f.revision() == "0007"
    # Each refusal is recorded, and the run that went ahead seals who approved it and the plan it ran.
    endings = f.endings()
    assert [e["outcome"] for e in endings] == ["refused", "refused", "succeeded"]
    last = endings[-1]
    assert last["plan_sha256"] == written.sha256 and last["approvals_needed"] == 1
    assert last["approvals"] == [["op@example.com", "ssh", False], ["alice@example.com", "ssh", True]]
    assert last["signer"] == "op@example.com" and all(e.get("signer") == "op@example.com" for e in audit.read_ledger(f.work / "records"))
    verified = f.cli("audit", "verify")
    assert verified.returncode == 0 and "signatures: 6 signed entr(ies) verified" in verified.stdout, verified.stdout + verified.stderr
    summary = f.cli("audit", "summary")
    assert "0003 -> 0007" in summary.stdout and "approved by alice@example.com; signed by op@example.com" in summary.stdout
    shown = f.cli("audit", "show", last["run_id"])
    assert "alice@example.com (counted)" in shown.stdout and f"sha256 {written.sha256}" in shown.stdout
    assert f.cli("audit", "report").returncode == 0
    index = (f.work / "records" / "report" / "index.html").read_text()
    assert "alice@example.com" in index and "op@example.com" in index
    page = next((f.work / "records" / "report" / "runs").glob(f"*{last['run_id']}*.html")).read_text()
    assert "start: op@example.com; end: op@example.com: verified" in page and "alice@example.com (counted)" in page


def _rewrite_chain(ledger: Path, edit) -> None:
    """What a hostile editor of the records does: edit an entry, then recompute every hash after it."""
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    edit(entries)
    previous = audit.GENESIS
    for entry in entries:
        entry["prev_hash"] = previous
        entry["hash"] = previous = audit.entry_hash(entry)
    ledger.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))


def test_a_signed_entry_edited_and_rechained_is_caught_by_its_signature(four_eyes, tmp_path):
    f = four_eyes
    assert f.cli("plan", "--env", "production", "--out", str(f.plan)).returncode == 0
    assert f.cli("approve", str(f.plan), "--key", str(f.keys["bob"]), key=None, operator="bob").returncode == 0
    assert f.deploy("-p", "plan", str(f.plan)).returncode == 0
    ledger = f.work / "records" / audit.LEDGER
    sealed = ledger.read_text()

    def claim_a_failure(entries):
        entries[-1]["outcome"], entries[-1]["exit_code"] = "failed", 1

    _rewrite_chain(ledger, claim_a_failure)
    assert audit.verify_ledger(f.work / "records") == []  # the chain alone is whole again: only keys (and anchors) tell
    caught = f.cli("audit", "verify", "--database")
    assert caught.returncode == 3
    assert "its signature by op@example.com does not verify: the entry was edited after it was signed" in caught.stdout, caught.stdout
    # Stripping the signature instead leaves a production entry unsigned: named, and the anchors still disagree.
    ledger.write_text(sealed)

    def strip(entries):
        for name in ("signature", "signer"):
            entries[-1].pop(name)

    _rewrite_chain(ledger, strip)
    stripped = f.cli("audit", "verify")
    assert stripped.returncode == 3 and "unsigned entries (1, production or after the first signed one): run" in stripped.stdout, stripped.stdout
    assert "does not verify" not in stripped.stdout  # nothing forged: an entry without a signature is only unsigned
    # An approval added by hand to the record (and the ledger rewritten to match) does not verify.
    ledger.write_text(sealed)
    sidecar = f.work / "records" / f.endings()[-1]["sidecar"]
    record = json.loads(sidecar.read_text())
    forged = sshsig.sign(approval.Plan.from_dict(record["plan"]).canonical(), f.keys["mallory"], sshsig.PLAN)
    record["approvals"].append({"principal": "alice@example.com", "source": "ssh", "signature": forged, "counted": True})
    sidecar.write_text(json.dumps(record, indent=2))

    def vouch(entries):
        entries[-1]["sidecar_sha256"] = audit.file_sha256(sidecar)
        entries[-1]["approvals"].append(["alice@example.com", "ssh", True])
        entries[-1].pop("signature"), entries[-1].pop("signer")

    _rewrite_chain(ledger, vouch)
    found = f.cli("audit", "verify")
    assert found.returncode == 3 and "the approval by alice@example.com it sealed does not count against allowed_signers: made by a key" in found.stdout, found.stdout


@pytest.mark.parametrize("change", ["revision edited", "new revision", "another database", "another parameter"])
def test_an_approved_plan_that_no_longer_matches_is_refused_naming_the_difference(four_eyes, make_database, change):
    f = four_eyes
    assert f.cli("plan", "--env", "production", "--out", str(f.plan)).returncode == 0
    assert f.cli("approve", str(f.plan), "--key", str(f.keys["alice"]), key=None, operator="alice").returncode == 0
    versions = f.project / "migrations" / "versions"
    url, extra = f.url, ()
    if change == "revision edited":
        edited = next(versions.glob("0005_*.py"))
        edited.write_text(edited.read_text() + "\n# changed after the approval\n")
        named = f"revision 0005: its file migrations/versions/{edited.name} was edited since the plan was made"
    elif change == "new revision":
        (versions / "0008_more.py").write_text(
            'revision = "0008"\ndown_revision = "0007"\nbranch_labels = None\ndepends_on = None\n\n\n'
            "def upgrade():\n    pass\n\n\ndef downgrade():\n    pass\n"
        )
        named = "revision 0008 is pending but not in the plan (new since it was made)"
    elif change == "another database":
        url = make_database()
        assert f.cli("upgrade", "0003", url=url).returncode == 0
        named = f"target: the plan is for database {database_name(f.url)} on server"
    else:
        extra = ("-p", "restore_test", "true")
        named = "parameter restore_test: the plan says False, this run True"
    refused = f.deploy("-p", "plan", str(f.plan), *extra, url=url)
    assert refused.returncode == 3 and "the plan PLAN.json does not match: " in refused.stderr, refused.stderr
    assert named in refused.stderr, refused.stderr
    assert f.revision(url) == "0003"
    assert f.endings()[-1]["outcome"] == "refused"
    verified = f.cli("audit", "verify", url=url)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_forged_approval_and_an_unknown_key_are_refused(four_eyes):
    f = four_eyes
    assert f.cli("plan", "--env", "production", "--out", str(f.plan)).returncode == 0
    stranger = f.cli("approve", str(f.plan), "--key", str(f.keys["mallory"]), key=None, operator="mallory")
    assert stranger.returncode == 2 and "is not in" in stranger.stderr and "allowed_signers" in stranger.stderr
    assert not approval.approvals_path(f.plan).exists()
    # Written by hand: mallory's signature under alice's name, and alice's signature of another plan.
    plan = approval.read_plan(f.plan)
    other = approval.Plan.from_dict({**plan.to_dict(), "target_revision": "0004"})
    approval.add_approval(f.plan, approval.Approval("alice@example.com", "ssh", sshsig.sign(plan.canonical(), f.keys["mallory"], sshsig.PLAN)))
    approval.add_approval(f.plan, approval.Approval("bob@example.com", "ssh", sshsig.sign(other.canonical(), f.keys["bob"], sshsig.PLAN)))
    refused = f.deploy("-p", "plan", str(f.plan))
    assert refused.returncode == 3 and "0 valid approval(s), production needs 1" in refused.stderr, refused.stderr
    assert "made by a key allowed_signers does not list" in refused.stderr
    assert "the signature does not verify: it was made for another plan, or forged" in refused.stderr
    assert f.revision() == "0003"
    record = json.loads((f.work / "records" / f.endings()[-1]["sidecar"]).read_text())
    assert [(a["principal"], a["verified"], a["counted"]) for a in record["approvals"]] == [
        ("alice@example.com", False, False), ("bob@example.com", False, False)]


def test_opslib_open_shows_the_plan_and_its_approvers_in_the_preflight(four_eyes):
    """`opslib open deploy -p plan PLAN.json`: JupyterLab's run shows the plan and who approved it in its
    preflight section, before anything changes, and the run then goes on as headless runs do."""
    pytest.importorskip("jupyterlab", reason="the `lab` extra (JupyterLab) is not installed")
    from .labdriver import LabSession  # noqa: PLC0415 -- JupyterLab's client, only where the extra is installed

    f = four_eyes
    assert f.cli("plan", "--env", "production", "--out", str(f.plan)).returncode == 0
    assert f.cli("approve", str(f.plan), "--key", str(f.keys["alice"]), key=None, operator="alice").returncode == 0
    env = {"DATABASE_URL": f.url, "OPSLIB_ALEMBIC_INI": str(f.alembic_ini), "OPSLIB_OPERATOR": "op",
           "OPSLIB_SIGNING_KEY": str(f.keys["op"])}  # fmt: skip
    lab = LabSession(f.work, env, "deploy", "-p", "plan", str(f.plan), "-p", "confirm", database_name(f.url),
                     "--env", "production")  # fmt: skip
    try:
        lab.start_kernel()
        nb = lab.read()
        lab.run_cells(nb, until="run.preflight()")
        (cell,) = [c for c in nb.cells if "run.preflight()" in c.source]
        html = "".join(o.get("data", {}).get("text/html", "") for o in cell.outputs)
        assert "Preflight: checks passed, 4 revision(s) to apply" in html, html[:2000]
        plan = approval.read_plan(f.plan)
        assert f"PLAN.json: sha256 {plan.sha256[:16]}…, made by op" in html
        assert "alice@example.com (counted) (1 needed)" in html and "signed by op@example.com" in html
        assert f.revision() == "0003"
        # A revision file edited while the operator reads the preflight: the upgrade refuses it, nothing applied.
        edited = next((f.project / "migrations" / "versions").glob("0005_*.py"))
        edited.write_text(edited.read_text() + "\n# edited after the preflight\n")
        lab.run_cells(nb, after="run.preflight()")
        (upgrade,) = [c for c in nb.cells if "run.upgrade()" in c.source]
        (error,) = [o for o in upgrade.outputs if o.output_type == "error"]
        assert "the file(s) of revision(s) 0005 were edited: nothing was applied" in error.evalue, error.evalue
        assert f.revision() == "0003"
    finally:
        lab.stop()


def test_where_approvals_are_needed_the_operator_signs_and_bare_verbs_are_refused(four_eyes):
    """Who the operator is must be proven by their key: "bob" without one, deploying a plan op approved, is
    refused (else op could approve their own change under another name); bare Alembic verbs are refused."""
    f = four_eyes
    assert f.cli("plan", "--env", "production", "--out", str(f.plan), key=None, operator="bob").returncode == 0
    assert f.cli("approve", str(f.plan), "--key", str(f.keys["op"]), key=None, operator="op").returncode == 0
    unsigned = f.deploy("-p", "plan", str(f.plan), key=None)
    assert unsigned.returncode == 3 and "and the operator's own key to sign the run" in unsigned.stderr, unsigned.stderr
    assert "not signed: no OPSLIB_SIGNING_KEY" in unsigned.stderr
    stranger = f.deploy("-p", "plan", str(f.plan), key="mallory")
    assert stranger.returncode == 3 and f"the key {f.keys['mallory']} is not in" in stranger.stderr, stranger.stderr
    for verb in (("upgrade", "head"), ("downgrade", "-1"), ("stamp", "0007")):
        bare = opslib_cli(f.url, f.alembic_ini, f.work, *verb, env={"OPSLIB_ENV": "production"})
        assert bare.returncode == 3 and f"{verb[0]} is refused in production" in bare.stderr, bare.stderr
    assert f.revision() == "0003"
    assert [e["outcome"] for e in f.endings()] == ["refused", "refused"]


def test_the_auditor_judges_by_their_own_policy_and_the_plan_must_be_what_ran(four_eyes):
    f = four_eyes
    # A checkout whose policy asks no approval deploys production without a plan; the auditor's asks one.
    (f.project / "opslib.toml").write_text("[approvals]\nproduction = 0\n")
    assert f.deploy().returncode == 0 and f.revision() == "0007"
    (f.project / "opslib.toml").write_text("[approvals]\nproduction = 1\n")
    found = f.cli("audit", "verify")
    assert found.returncode == 3, found.stdout
    assert "a production deploy that changed its database without a plan; the policy needs 1 approval(s)" in found.stdout


def test_a_sealed_plan_must_be_the_change_that_ran_even_when_the_entry_is_signed_again(four_eyes):
    """An editor with the operator's key (or the operator) who moves an approved plan onto another run: each
    signature holds, and the plan still names another database than the one the run changed."""
    f = four_eyes
    assert f.cli("plan", "--env", "production", "--out", str(f.plan)).returncode == 0
    assert f.cli("approve", str(f.plan), "--key", str(f.keys["alice"]), key=None, operator="alice").returncode == 0
    assert f.deploy("-p", "plan", str(f.plan)).returncode == 0
    assert f.cli("audit", "verify").returncode == 0

    def elsewhere(entries):
        entries[-1]["database"]["name"], entries[-1]["revisions_after"] = "elsewhere", ["0005"]
        entries[-1]["signature"] = sshsig.sign(signatures.signed_bytes(entries[-1]), f.keys["op"], sshsig.LEDGER)

    _rewrite_chain(f.work / "records" / audit.LEDGER, elsewhere)
    found = f.cli("audit", "verify")
    assert found.returncode == 3 and "does not verify" not in found.stdout, found.stdout
    assert f"it ran on database elsewhere, its plan is for {database_name(f.url)}" in found.stdout
    assert "it ended at 0005, its plan at 0007" in found.stdout


def test_a_plan_is_approved_for_one_deploy(four_eyes):
    f = four_eyes
    assert f.cli("plan", "--env", "production", "--out", str(f.plan)).returncode == 0
    assert f.cli("approve", str(f.plan), "--key", str(f.keys["bob"]), key=None, operator="bob").returncode == 0
    assert f.cli("approvals", str(f.plan), key=None, operator="carol").returncode == 0  # enough: exit 0
    first = f.deploy("-p", "plan", str(f.plan))
    assert first.returncode == 0, first.stderr
    name = database_name(f.url)
    back = f.cli("run", "rollback", "--env", "production", "-p", "target_revision", "0003", "-p", "confirm", name)
    assert back.returncode == 0 and f.revision() == "0003", back.stderr
    again = f.deploy("-p", "plan", str(f.plan))
    assert again.returncode == 3 and f"the plan was used already, by run {f.endings()[0]['run_id']}" in again.stderr, again.stderr
    assert f.revision() == "0003"
    # A refusal changed nothing: its plan is not taken for the change that ran, and the records verify.
    verified = f.cli("audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
