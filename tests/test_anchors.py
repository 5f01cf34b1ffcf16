"""The ledger anchored in the database: `audit verify` cross-checks the records' ledger both ways against
the entry hashes each run wrote into its database, so a cut-off tail, a dropped entry or a ledger replaced
by an older copy is named, which the hash chain alone cannot see."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from opslib import audit, db

from .conftest import OPSLIB, ROOT, _opslib_run, query, with_database


def _verify(work: Path, url: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    return subprocess.run(
        [OPSLIB, "audit", "verify"], cwd=work, env={**env, "DATABASE_URL": url}, capture_output=True, text=True
    )


@pytest.fixture
def three_runs(database_url, tmp_path) -> tuple[Path, str, list[dict]]:
    """deploy, rollback, deploy in work/, with the ledger as it stood after the second kept aside."""
    work = tmp_path / "work"
    work.mkdir()
    for i, runbook in enumerate(("deploy", "rollback", "deploy")):
        assert _opslib_run(database_url, work, runbook) == 0
        if i == 1:
            shutil.copy(work / "records" / audit.LEDGER, tmp_path / "ledger-after-two.jsonl")
    return work, database_url, audit.read_endings(work / "records")


def test_every_run_is_anchored_and_verify_says_so(three_runs):
    work, url, entries = three_runs
    anchored = query(url, "SELECT run_id, entry_hash FROM opslib.ledger_entries ORDER BY seq")
    assert anchored == [(e["run_id"], e["hash"]) for e in entries]
    done = _verify(work, url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 entr(ies) of this ledger anchored there" in done.stdout
    with pytest.raises(Exception, match="append-only"):
        query(url, "DELETE FROM opslib.ledger_entries")


def _drop_entry(work: Path, index: int) -> dict:
    """Remove run ``index`` (among the sealed runs) from the ledger, its start and its ending, and its files."""
    records = work / "records"
    lines = (records / audit.LEDGER).read_text().splitlines()
    entry = audit.read_endings(records)[index]
    lines = [line for line in lines if json.loads(line).get("sidecar") != entry["sidecar"]]
    (records / audit.LEDGER).write_text("".join(line + "\n" for line in lines))
    for name in (entry["sidecar"], entry.get("notebook")):
        if name:
            (records / name).unlink(missing_ok=True)
    return entry


def test_a_cut_off_tail_is_named(three_runs):
    work, url, _ = three_runs
    newest = _drop_entry(work, -1)
    assert audit.verify_ledger(work / "records") == []  # the chain alone sees nothing wrong
    done = _verify(work, url)
    assert done.returncode == 3
    assert f"run {newest['run_id']} (deploy, succeeded" in done.stdout and "record missing" in done.stdout


def test_a_dropped_middle_entry_is_named(three_runs):
    work, url, _ = three_runs
    middle = _drop_entry(work, 1)
    done = _verify(work, url)
    assert done.returncode == 3
    assert f"run {middle['run_id']} (rollback, succeeded" in done.stdout and "record missing" in done.stdout


def test_a_ledger_replaced_by_an_older_copy_is_named(three_runs, tmp_path):
    work, url, entries = three_runs
    shutil.copy(tmp_path / "ledger-after-two.jsonl", work / "records" / audit.LEDGER)
    done = _verify(work, url)
    assert done.returncode == 3
    assert f"run {entries[2]['run_id']} (deploy, succeeded" in done.stdout and "record missing" in done.stdout


def test_another_records_folder_on_the_same_database_is_not_taken_for_tampering(three_runs, tmp_path):
    work, url, _ = three_runs
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert _opslib_run(url, elsewhere, "rollback") == 0
    for folder, ours, others in ((work, 3, 1), (elsewhere, 1, 3)):
        done = _verify(folder, url)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{ours} entr(ies) of this ledger anchored there, {others} of other records folders" in done.stdout


def test_a_witness_folder_names_a_cut_off_tail_when_the_database_is_gone(database_url, tmp_path):
    """OPSLIB_LEDGER_WITNESS keeps each entry's hash in a second folder too: with no database to ask
    (dropped, or out of reach), the witness still names the run cut from the ledger."""
    work, witness = tmp_path / "work", tmp_path / "witness"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(OPSLIB_LEDGER_WITNESS=str(witness), OPSLIB_ALEMBIC_INI=str(ROOT / "alembic.ini"))
    for runbook in ("deploy", "rollback"):
        done = subprocess.run([OPSLIB, "run", runbook], cwd=work, env={**env, "DATABASE_URL": database_url},
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
    entries = audit.read_ledger(work / "records")  # the witness keeps each run's start and its ending
    assert [json.loads(line)["entry_hash"] for line in (witness / "ledger-witness.jsonl").read_text().splitlines()] == [
        e["hash"] for e in entries
    ]
    verified = subprocess.run([OPSLIB, "audit", "verify"], cwd=work, env=env, capture_output=True, text=True)
    assert verified.returncode == 0 and "cross-checked with the witness: 4 entr(ies)" in verified.stdout
    newest = _drop_entry(work, -1)
    verified = subprocess.run([OPSLIB, "audit", "verify"], cwd=work, env=env, capture_output=True, text=True)
    assert verified.returncode == 3
    assert f"run {newest['run_id']} (rollback, succeeded" in verified.stdout and "the witness" in verified.stdout


def test_the_report_names_a_cut_off_tail_in_its_banner(three_runs, tmp_path):
    from .test_report import _rendered, _status

    work, url, _ = three_runs
    newest = _drop_entry(work, -1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    made = subprocess.run([OPSLIB, "audit", "report", "--out", str(tmp_path / "site")], cwd=work,
                          env={**env, "DATABASE_URL": url}, capture_output=True, text=True)  # fmt: skip
    assert made.returncode == 3, made.stdout + made.stderr
    index = _rendered(tmp_path / "site" / "index.html", tmp_path)
    assert _status(index, "verify") == "failed"
    assert f"run {newest['run_id']} (deploy, succeeded" in index and "record missing" in index


@pytest.mark.connections
def test_verify_database_fails_when_no_database_answers(three_runs):
    work, url, _ = three_runs
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    asked = subprocess.run([OPSLIB, "audit", "verify", "--database"], cwd=work, env=env, capture_output=True, text=True)
    assert asked.returncode == 3 and "not cross-checked with a database (none configured)" in asked.stdout
    unreachable = with_database(url, "no_such_database_here")
    asked = subprocess.run([OPSLIB, "audit", "verify", "--database"], cwd=work,
                           env={**env, "DATABASE_URL": unreachable}, capture_output=True, text=True)  # fmt: skip
    assert asked.returncode == 3 and "not cross-checked with" in asked.stdout
    assert _verify(work, url).returncode == 0


def test_a_run_that_reached_no_database_is_still_caught_when_cut_through_the_default_witness(tmp_path):
    """Invalid runs never reach a database: with no database to anchor in, the witness (on by default, in
    the user's state folder) is the only anchor, and it names the run cut from the ledger."""
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(OPSLIB_ALEMBIC_INI=str(ROOT / "alembic.ini"), XDG_STATE_HOME=str(tmp_path / "state"))
    for value in ("1", "2"):
        done = subprocess.run([OPSLIB, "run", "deploy", "-p", "stepz", value], cwd=work, env=env,
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 2, done.stdout + done.stderr
    assert (tmp_path / "state" / "opslib" / "witness" / "ledger-witness.jsonl").is_file()
    verified = subprocess.run([OPSLIB, "audit", "verify"], cwd=work, env=env, capture_output=True, text=True)
    assert verified.returncode == 0 and "cross-checked with the witness: 4 entr(ies)" in verified.stdout
    newest = _drop_entry(work, -1)
    verified = subprocess.run([OPSLIB, "audit", "verify"], cwd=work, env=env, capture_output=True, text=True)
    assert verified.returncode == 3, verified.stdout + verified.stderr
    assert f"run {newest['run_id']} (deploy," in verified.stdout and "missing from the ledger" in verified.stdout


def test_two_databases_in_one_records_folder_are_each_cross_checked(make_database, tmp_path):
    """Runs on two databases write one ledger: verify cross-checks each database it can reach (the configured
    one, the variable the runs were given, each --database, each fleet target), so a run cut from the ledger
    is named whichever database it ran on. The witness is left out here: the databases alone catch it."""
    a, b = make_database(), make_database()
    work = tmp_path / "work"
    work.mkdir()
    assert _opslib_run(a, work, "deploy") == 0
    for runbook in ("deploy", "rollback"):  # on b, through the variable its parameters name
        assert _opslib_run(a, work, runbook, "-p", "database_url_env", "B_URL", B_URL=b) == 0
    names = {e["database"]["name"] for e in audit.read_endings(work / "records")}
    a_name, b_name = db.parse_url(a).database, db.parse_url(b).database  # a socket URL ends in ?host=…
    assert names == {a_name, b_name}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(OPSLIB_LEDGER_WITNESS="off", DATABASE_URL=a, OPSLIB_ALEMBIC_INI=str(ROOT / "alembic.ini"))

    def verify(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([OPSLIB, "audit", "verify", *args], cwd=work, env={**env, **extra},
                              capture_output=True, text=True)  # fmt: skip

    done = verify(B_URL=b)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"cross-checked with database {a_name}: 1 entr(ies)" in done.stdout
    assert f"cross-checked with database {b_name}: 2 entr(ies)" in done.stdout
    alone = verify()  # b's URL is not here: said, not guessed
    assert alone.returncode == 0 and f"not cross-checked with {b_name} (no URL for it here" in alone.stdout
    # A fleet target out of reach is said, not failed on, even with --database (which asks for the configured
    # database); a --database URL that does not parse is bad input.
    gone = with_database(a, "no_such_database_here")
    for args in ((), ("--database",)):
        done = verify(*args, "--targets", str(_fleet_file(tmp_path)), B_URL=b, C_URL_UNSET=gone)
        assert done.returncode == 0 and "no_such_database_here" in done.stdout, done.stdout + done.stderr
    bad = verify("--database", "not a url")
    assert bad.returncode == 2 and "--database is not a valid URL" in bad.stderr, bad.stdout + bad.stderr

    cut = _drop_entry(work, -1)  # the rollback on b
    for how, extra, args in (
        ("the variable the runs name", {"B_URL": b}, ()),
        ("--database", {}, ("--database", b, "--database", a)),
        ("the fleet file", {"B_URL": b}, ("--targets", str(_fleet_file(tmp_path)))),
    ):
        if how == "the fleet file":  # the runs left on b no longer name B_URL: only the fleet file does
            _drop_entry(work, -1)
        caught = verify(*args, **extra)
        assert caught.returncode == 3, (how, caught.stdout + caught.stderr)
        assert f"run {cut['run_id']} (rollback, succeeded" in caught.stdout, how
        assert f"database {b_name} but missing from the ledger" in caught.stdout, how
    unreachable = verify("--database", with_database(a, "no_such_database_here"))
    assert unreachable.returncode == 3 and "--database: not cross-checked with" in unreachable.stdout


def _fleet_file(folder: Path) -> Path:
    path = folder / "fleet.toml"
    path.write_text('[[targets]]\nname = "b"\nurl_env = "B_URL"\n[[targets]]\nname = "c"\nurl_env = "C_URL_UNSET"\n')
    return path


def _folder_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): audit.file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}  # fmt: skip


TAMPERS = ["older ledger copy", "cut tail (a database)", "cut tail (no database)", "run outside the ledger",
           "edited step outcome"]  # fmt: skip


@pytest.mark.parametrize("tamper", TAMPERS)
def test_every_tamper_is_caught_and_no_audit_command_changes_a_file(three_runs, tmp_path, tamper):
    """Each tamper the auditor tried: `audit verify` exits 3 naming it, and list, show, summary, verify and
    report leave every file of the records folder as it was (the ledger included)."""
    work, url, entries = three_runs
    records = work / "records"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(DATABASE_URL=url, OPSLIB_ALEMBIC_INI=str(ROOT / "alembic.ini"))
    invalid = subprocess.run([OPSLIB, "run", "deploy", "-p", "stepz", "1"], cwd=work, env=env,
                             capture_output=True, text=True)  # fmt: skip  (bad input: it reaches no database)
    assert invalid.returncode == 2
    if tamper == "older ledger copy":
        shutil.copy(tmp_path / "ledger-after-two.jsonl", records / audit.LEDGER)
        says = f"run {entries[2]['run_id']} (deploy, succeeded"
    elif tamper == "cut tail (a database)":
        _drop_entry(work, -2)  # the third deploy; the invalid run after it stays
        says = f"run {entries[2]['run_id']} (deploy, succeeded"
    elif tamper == "cut tail (no database)":
        cut = _drop_entry(work, -1)  # the invalid run: only the witness holds it
        says = f"run {cut['run_id']} (deploy, invalid"
    elif tamper == "run outside the ledger":
        first = entries[0]
        stem = first["sidecar"].removesuffix(".json").rsplit("_", 1)[0] + "_0badc0de"
        sidecar = json.loads((records / first["sidecar"]).read_text())
        (records / f"{stem}.json").write_text(json.dumps({**sidecar, "run_id": "0badc0de"}))
        says = f"{stem}.json is outside the ledger"
    else:
        failed_looking = entries[1]
        record = json.loads((records / failed_looking["sidecar"]).read_text())
        record["steps"][-1]["outcome"] = "failed"
        (records / failed_looking["sidecar"]).write_text(json.dumps(record))
        step = record["steps"][-1]["name"]
        says = f"ledger says {step}: succeeded, file says {step}: failed"
    before = _folder_hashes(records)
    shown = entries[1] if tamper == "edited step outcome" else entries[0]
    for command in (["list"], ["show", shown["run_id"]], ["summary"], ["verify"],
                    ["report", "--out", str(tmp_path / "site")], ["verify", "--database"]):  # fmt: skip
        done = subprocess.run([OPSLIB, "audit", *command], cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == (3 if command[0] in ("verify", "report", "summary") else 0), (command, done.stdout + done.stderr)
        if command[0] == "verify":
            assert says in done.stdout, (command, done.stdout)
        if command[0] == "show" and tamper == "edited step outcome":  # the ledger's outcome, and the edit named
            assert done.stdout.startswith("CHANGED AFTER THE RUN") and says in done.stdout, done.stdout
            assert f"{step}" in done.stdout and " failed" not in done.stdout.split("CHANGED")[1].split("\n\n", 1)[1]
    assert _folder_hashes(records) == before


MALFORMED = {
    "steps that are not a list": {"steps": "garbage"},
    "steps of odd shapes": {"steps": [[{"a": 1}, [1]], 7, ["upgrade 0002", "failed"], ["verify", None, None, "x"]]},
    "parameters and database that are not objects": {"parameters": ["x"], "database": "db1"},
    "warnings that are not text": {"warnings": [1, {"x": 2}], "revisions_after": {"head": 1}},
}


@pytest.mark.parametrize("edit", MALFORMED)
def test_a_ledger_rewritten_with_odd_values_is_reported_not_crashed_on(three_runs, tmp_path, edit):
    """An editor who rewrites the ledger's values into other shapes (and hashes the chain again): every audit
    command says what it finds in its own words, with its exit code, and none ends in a traceback."""
    work, url, entries = three_runs
    records = work / "records"
    lines = [json.loads(line) for line in (records / audit.LEDGER).read_text().splitlines()]
    previous = audit.GENESIS
    for entry in lines:
        if entry.get("run_id") == entries[1]["run_id"]:
            entry.update(MALFORMED[edit])
        entry["prev_hash"] = previous
        entry["hash"] = previous = audit.entry_hash(entry)
    (records / audit.LEDGER).write_text("".join(json.dumps(e) + "\n" for e in lines))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(DATABASE_URL=url, OPSLIB_ALEMBIC_INI=str(ROOT / "alembic.ini"))
    for command, code in ((["list"], 0), (["show", entries[1]["run_id"]], 0), (["summary"], 3), (["verify"], 3),
                          (["report", "--out", str(tmp_path / "site")], 3)):  # fmt: skip
        done = subprocess.run([OPSLIB, "audit", *command], cwd=work, env=env, capture_output=True, text=True)
        assert "Traceback" not in done.stderr, (command, done.stderr)
        assert done.returncode == code, (command, done.stdout + done.stderr)
    assert len(list((tmp_path / "site" / "runs").glob("*.html"))) == 3


def test_the_witness_can_be_syslog(tmp_path):
    """OPSLIB_LEDGER_WITNESS=syslog:/path sends each entry's hash, the start's and the ending's, to that syslog
    socket (a datagram socket bound here stands for the daemon); verify says it cannot read syslog back."""
    import socket
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="opslib-syslog-", dir="/tmp"))  # a short path: a socket's is limited
    address = folder / "log"
    daemon = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    daemon.bind(str(address))
    daemon.settimeout(5)
    try:
        work = tmp_path / "work"
        work.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
        env.update(OPSLIB_ALEMBIC_INI=str(ROOT / "alembic.ini"), OPSLIB_LEDGER_WITNESS=f"syslog:{address}")
        done = subprocess.run([OPSLIB, "run", "deploy", "-p", "stepz", "1"], cwd=work, env=env,
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 2, done.stdout + done.stderr
        messages = [daemon.recv(65536).decode() for _ in audit.read_ledger(work / "records")]
        verified = subprocess.run([OPSLIB, "audit", "verify"], cwd=work, env=env, capture_output=True, text=True)
    finally:
        daemon.close()
        shutil.rmtree(folder, ignore_errors=True)
    assert all(m.startswith("<14>opslib-ledger: ") for m in messages), messages
    sent = [json.loads(m.split("opslib-ledger: ", 1)[1].rstrip("\x00"))["entry_hash"] for m in messages]
    assert sent == [e["hash"] for e in audit.read_ledger(work / "records")]
    assert verified.returncode == 0 and f"the witness is syslog ({address})" in verified.stdout, verified.stdout
