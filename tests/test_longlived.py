"""A long-lived project (tests/fixtures/longlived: 160 revisions, Alembic's generic one-transaction env.py
with fileConfig at INFO, printing and logging revisions, a revision that reads data, `pass` downgrades and
a downgrade that fails halfway), operated as a new user would: no file of it edited."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from opslib import migrate

from .conftest import opslib_cli, query, schema_snapshot, settings_for


@pytest.fixture
def longlived(project, database_url, tmp_path):
    """(settings, landmarks, revisions oldest first) for a copy of the long-lived project."""
    ini = project("longlived")
    settings = settings_for(database_url, tmp_path, ini)
    landmarks = json.loads((ini.parent / "landmarks.json").read_text())
    chain = [r.revision for r in reversed(migrate.history(settings))]
    assert len(chain) == landmarks["revisions"] >= 150
    return settings, landmarks, chain


def _files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def _opslib(settings, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return opslib_cli(settings.database_url, settings.alembic_ini, cwd, *args)


def _record(cwd: Path) -> dict:
    (path,) = sorted((cwd / "records").glob("*.json"))[-1:]
    return json.loads(path.read_text())


def test_the_chain_deploys_from_an_empty_database_without_edits(longlived, tmp_path):
    settings, landmarks, chain = longlived
    folder = settings.alembic_ini.parent
    before = _files(folder)
    done = _opslib(settings, tmp_path / "work", "run", "deploy")
    assert done.returncode == 0, done.stdout + done.stderr
    assert _files(folder) == before  # the project's files are untouched
    assert "INFO  [alembic" not in done.stdout + done.stderr  # env.py's logging stays out of the terminal
    record = _record(tmp_path / "work")
    assert record["outcome"] == "succeeded" and record["revisions_after"] == [landmarks["head"]]
    checks = {c["name"]: c for c in record["checks"]}
    assert checks["squawk lint"]["status"] == "pass" and "information: " in checks["squawk lint"]["detail"]
    # Upstream-style messages ("wip", "text", "empty message") are history: they warn, and nothing is accepted.
    assert not (folder / "opslib.toml").exists()
    assert checks["migration naming"]["status"] == "warn"
    assert set(checks["migration naming"]["revisions"]) == set(landmarks["vague_messages"])
    assert landmarks["reads_data"] in checks["SQL renders offline"]["detail"]
    # One step per revision, in chain order, each with its duration.
    per_revision = [s for s in record["steps"] if s["name"].startswith("upgrade ")]
    assert [s["name"].split()[1] for s in per_revision] == chain
    assert all(s["outcome"] == "succeeded" and s["duration_s"] >= 0 for s in per_revision)
    printed = record["migration_output"]["upgrade"]
    assert "Running upgrade" in printed and len(printed.splitlines()) > len(chain)
    # History rows commit with their revisions: one per revision, their commit times spread over the run.
    rows = query(
        settings.database_url,
        "SELECT revision, recorded_at FROM opslib.revision_events WHERE direction = 'upgrade' ORDER BY id",
    )
    assert [r.revision for r in rows] == chain
    times = [r.recorded_at for r in rows]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert (times[-1] - times[0]).total_seconds() > 0.2


def test_findings_over_rows_block_until_accepted_in_opslib_toml(longlived, tmp_path):
    settings, landmarks, chain = longlived
    migrate.upgrade(settings, landmarks["tables_created"]["users"])
    query(settings.database_url, "INSERT INTO users (email, password_hash) VALUES ('ada@example.com', 'x')")
    check = _opslib(settings, tmp_path / "a", "check", "--json")
    blocking = [f for f in json.loads(check.stdout)["findings"] if f["severity"] == "block"]
    assert blocking and {f["context"].split(":")[0] for f in blocking} == {"table users"}
    first = blocking[0]["revision"]

    refused = _opslib(settings, tmp_path / "a", "run", "deploy", "-p", "target_revision", first)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert f"{first}: {blocking[0]['rule']} on table users: 1 row, " in refused.stdout + refused.stderr
    baseline = _opslib(
        settings, tmp_path / "a", "check", "--target", first, "--write-baseline", "--reason", "users is tiny"
    )
    assert baseline.returncode == 0, baseline.stdout + baseline.stderr
    policy_file = settings.alembic_ini.parent / "opslib.toml"
    assert "users is tiny" in policy_file.read_text() and "1 finding(s) accepted in" in baseline.stdout

    accepted = _opslib(settings, tmp_path / "b", "run", "deploy", "-p", "target_revision", first)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    record = _record(tmp_path / "b")
    (finding,) = [f for f in record["findings"] if f["severity"] == "accepted"]
    assert finding["revision"] == first and finding["reason"] == "users is tiny (accepted in opslib.toml)"
    assert finding["context"].startswith("table users: 1 row, ")
    lint_check = next(c for c in record["checks"] if c["name"] == "squawk lint")
    assert lint_check["detail"].startswith("accepted: 1 finding(s)")
    assert finding["rule"] == blocking[0]["rule"] and (finding["rows"], finding["help"]) == ("1 row", blocking[0]["help"])


def test_a_not_null_column_over_rows_is_refused_naming_the_table_size(longlived, tmp_path):
    settings, landmarks, chain = longlived
    not_null = next(n for n in landmarks["not_null_without_default"] if n["table"] == "users")
    migrate.upgrade(settings, chain[chain.index(not_null["revision"]) - 1])
    query(settings.database_url, not_null["insert_row"])  # the table holds a row now
    snapshot = schema_snapshot(settings.database_url)
    done = _opslib(settings, tmp_path / "a", "run", "deploy")
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"{not_null['revision']}: adding-required-field on table users: 1 row, " in done.stdout + done.stderr
    assert schema_snapshot(settings.database_url) == snapshot
    assert _record(tmp_path / "a")["outcome"] == "refused"

    # Accepted in the project's policy, with its reason, it no longer blocks the check.
    (settings.alembic_ini.parent / "opslib.toml").write_text(
        f'[[lint.accept]]\nrevision = "{not_null["revision"]}"\nrule = "adding-required-field"\n'
        'reason = "phone is backfilled by the application first"\n'
    )
    check = _opslib(settings, tmp_path / "a", "check", "--json")
    got = {(f["revision"], f["rule"]): f for f in json.loads(check.stdout)["findings"]}
    assert got[(not_null["revision"], "adding-required-field")]["severity"] == "accepted"
    assert "phone is backfilled" in got[(not_null["revision"], "adding-required-field")]["reason"]


def test_a_downgrade_that_fails_halfway_stops_at_the_revision_that_raised(longlived, tmp_path):
    settings, landmarks, chain = longlived
    migrate.upgrade(settings)
    done = _opslib(settings, tmp_path / "work", "downgrade", "base")
    assert done.returncode == 1, done.stdout + done.stderr
    failing = landmarks["failing_downgrade"]
    assert f"failed at revision {failing} " in done.stderr and f"is now at {failing};" in done.stderr
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1  # one line, no log flood
    assert migrate.status(settings).current == (failing,)  # each revision above it committed on its own
    reversed_rows = query(
        settings.database_url, "SELECT revision FROM opslib.revision_events WHERE direction = 'downgrade'"
    )
    assert [r.revision for r in reversed_rows] == list(reversed(chain[chain.index(failing) + 1 :]))


def test_a_malformed_policy_is_exit_2_and_changes_nothing(longlived, tmp_path):
    settings, _, _ = longlived
    (settings.alembic_ini.parent / "opslib.toml").write_text('[lint.rules]\nban-drop-column = "sometimes"\n')
    done = _opslib(settings, tmp_path / "work", "check")
    assert done.returncode == 2 and "use one of block, warn, ignore" in done.stderr
    missing = _opslib(settings, tmp_path / "work", "check", "--write-baseline")
    assert missing.returncode == 2 and "needs a reason" in missing.stderr
    assert query(settings.database_url, "SELECT to_regclass('alembic_version') IS NULL")[0][0]


def _schema_state(url: str) -> list:
    return query(
        url,
        "SELECT pg_get_userbyid(n.nspowner), obj_description(n.oid, 'pg_namespace'), "
        "(SELECT array_agg(a::text ORDER BY a::text) FROM unnest(n.nspacl) a) FROM pg_namespace n "
        "WHERE n.nspname = 'public'",
    )


def test_reset_stops_at_a_failed_downgrade_or_recreates_the_schema_visibly(longlived, tmp_path):
    settings, landmarks, chain = longlived
    failing = landmarks["failing_downgrade"]
    migrate.upgrade(settings)
    query(settings.database_url, "COMMENT ON SCHEMA public IS 'the shop application'")
    before = _schema_state(settings.database_url)

    never = _opslib(settings, tmp_path / "a", "run", "reset", "-p", "recreate_schema", "never")
    assert never.returncode == 1, never.stdout + never.stderr
    assert f"failed at revision {failing} " in never.stderr.splitlines()[-1]
    assert migrate.status(settings).current == (failing,)

    done = _opslib(settings, tmp_path / "b", "run", "reset")
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.splitlines()[-1]
    assert "reset succeeded" in last and "schema public was recreated (a downgrade failed: " in last
    record = _record(tmp_path / "b")
    steps = {s["name"]: s for s in record["steps"]}
    assert (
        steps["downgrade base"]["outcome"] == "failed"
        and f"at revision {failing} " in steps["downgrade base"]["error"]
    )
    assert steps["recreate schema"]["outcome"] == "succeeded"
    recreated = record["schema_recreated"]
    assert recreated["reason"].startswith("a downgrade failed: ") and "table users" in recreated["dropped"]
    assert record["revisions_after"] == [landmarks["head"]]
    assert _schema_state(settings.database_url) == before  # owner, comment and grants as they were
    events = query(
        settings.database_url,
        "SELECT revision, direction FROM opslib.revision_events WHERE direction = 'recreate schema'",
    )
    assert [tuple(e) for e in events] == [("(schema public)", "recreate schema")]


def test_sql_that_exits_0_runs_whole_in_psql_and_a_revision_that_reads_data_stops_it(longlived, tmp_path):
    """`opslib sql base:head` stops (exit 3, nothing on stdout) at the revision that reads data, naming the
    last revision fully rendered; the script up to it runs whole under `psql -v ON_ERROR_STOP=1` on an
    empty database; `--partial` is the opt-in script that says, in SQL comments, what it leaves out."""
    from opslib import pgtools

    from .conftest import libpq

    settings, landmarks, chain = longlived
    refused = _opslib(settings, tmp_path / "w", "sql", "base:head")
    before = chain[chain.index(landmarks["reads_data"]) - 1]
    assert refused.returncode == 3 and refused.stdout == ""
    (line,) = refused.stderr.splitlines()
    assert f"revision {landmarks['reads_data']} (" in line and "cannot be rendered offline" in line
    assert f"the last revision fully rendered is {before}" in line and "--partial" in line

    done = _opslib(settings, tmp_path / "w", "sql", f"base:{before}")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and "opslib:" not in done.stdout
    assert not any(line.startswith(("INFO", "print")) for line in done.stdout.splitlines())
    psql = pgtools.find_all("psql")[0].path
    ran = subprocess.run(
        [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", libpq(settings.database_url)],
        input=done.stdout, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert query(settings.database_url, "SELECT version_num FROM alembic_version") == [(before,)]

    partial = _opslib(settings, tmp_path / "w", "sql", "base:head", "--partial")
    assert partial.returncode == 0, partial.stderr
    first = partial.stdout.splitlines()[0]
    assert first.startswith(f"-- opslib: PARTIAL SCRIPT: revision {landmarks['reads_data']} is incomplete")
    assert f"-- opslib: INCOMPLETE: revision {landmarks['reads_data']}" in partial.stdout
    assert f"revision {landmarks['reads_data']} is only partly in this SQL" in partial.stderr


def test_naming_blocks_only_new_revisions_and_the_policy_sets_every_check(longlived, tmp_path):
    """The naming rule: history warns; a revision new on the branch blocks (`check --new`); the policy's
    [checks] and per-revision acceptances change each check, by its stable name."""
    settings, landmarks, chain = longlived
    folder = settings.alembic_ini.parent
    git = lambda *a: subprocess.run(["git", "-C", str(folder), *a], capture_output=True, text=True, check=True)  # noqa: E731
    git("init", "-q", "-b", "main")
    git("-c", "user.email=ops@example.com", "-c", "user.name=ops", "add", "-A")
    git("-c", "user.email=ops@example.com", "-c", "user.name=ops", "commit", "-qm", "history")
    git("checkout", "-qb", "feature")
    new = folder / "versions" / "f00dfeed0001_wip.py"
    new.write_text(
        f'"""wip\n\nRevision ID: f00dfeed0001\nRevises: {landmarks["head"]}\n"""\nfrom alembic import op\n\n'
        f'revision = "f00dfeed0001"\ndown_revision = "{landmarks["head"]}"\nbranch_labels = None\ndepends_on = None\n\n\n'
        "def upgrade():\n    op.execute('SELECT 1')\n\n\ndef downgrade():\n    op.execute('SELECT 1')\n"
    )
    migrate.upgrade(settings, landmarks["head"])
    plain = _opslib(settings, tmp_path / "w", "check", "--json")
    assert plain.returncode == 0, plain.stdout + plain.stderr
    naming = {c["name"]: c for c in json.loads(plain.stdout)["checks"]}["migration naming"]
    assert naming["status"] == "warn" and naming["revisions"] == ["f00dfeed0001"]

    branch = _opslib(settings, tmp_path / "w", "check", "--new")  # compared with main, its base
    assert branch.returncode == 3, branch.stdout + branch.stderr
    assert "migration naming failed: 1 revision(s) new on this branch: f00dfeed0001: 'wip'" in branch.stderr
    history = [r for r in landmarks["vague_messages"]]
    assert not any(r in branch.stderr for r in history)  # the history's messages do not block
    outside = _opslib(settings, tmp_path / "w", "check", "--new", "--base", "nosuchbranch")
    assert outside.returncode == 2 and "--base" in outside.stderr

    # The project's policy: accepted for this revision, with a reason, it passes; [checks] sets the rest.
    (folder / "opslib.toml").write_text(
        '[checks]\ndowngrades = "block"\n\n'
        '[[lint.accept]]\nrevision = "f00dfeed0001"\nrule = "migration-naming"\nreason = "squashed before merge"\n'
    )
    accepted = _opslib(settings, tmp_path / "w", "check", "--new", "--json")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    naming = {c["name"]: c for c in json.loads(accepted.stdout)["checks"]}["migration naming"]
    assert naming["status"] == "pass" and "f00dfeed0001 (squashed before merge)" in naming["detail"]
    (folder / "opslib.toml").write_text('[checks]\nmigration-naming = "ignore"\n')
    ignored = _opslib(settings, tmp_path / "w", "check", "--new", "--json")
    assert ignored.returncode == 0
    naming = {c["name"]: c for c in json.loads(ignored.stdout)["checks"]}["migration naming"]
    assert naming["status"] == "skip" and naming["detail"].startswith("ignored (ignore in opslib.toml)")
    (folder / "opslib.toml").write_text('[[lint.accept]]\nrevision = "f00dfeed0001"\nrule = "migration-nameing"\nreason = "x"\n')
    typo = _opslib(settings, tmp_path / "w", "check")
    assert typo.returncode == 2 and "unknown rule 'migration-nameing'" in typo.stderr and "opslib.toml" in typo.stderr
