"""The rehearse runbook: a scratch copy of the target upgraded, downgraded and upgraded again, then compared."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg2

from .conftest import ROOT, database_name, databases_named, libpq, opslib_cli, query, schema_snapshot

FIRST = '''"""items"""
from alembic import op

revision = "r001"
down_revision = None


def upgrade():
    op.execute("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)")
    op.execute("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 500) g")


def downgrade():
    op.execute("DROP TABLE items")
'''

# A revision as they are found in long-lived projects: its downgrade forgets the enum type its upgrade
# created, and puts the renamed column back empty (the data went with the column it dropped).
CARELESS = '''"""mood and title"""
from alembic import op

revision = "r002"
down_revision = "r001"


def upgrade():
    print("adding mood and title")
    op.execute("CREATE TYPE mood AS ENUM ('happy', 'sad')")
    op.execute("ALTER TABLE items ADD COLUMN mood mood")
    op.execute("ALTER TABLE items ADD COLUMN title text")
    op.execute("UPDATE items SET title = name")
    op.execute("ALTER TABLE items DROP COLUMN name")


def downgrade():
    op.execute("ALTER TABLE items ADD COLUMN name text NOT NULL DEFAULT ''")
    op.execute("ALTER TABLE items ALTER COLUMN name DROP DEFAULT")
    op.execute("ALTER TABLE items DROP COLUMN title")
    op.execute("ALTER TABLE items DROP COLUMN mood")
'''


def _careless_project(folder: Path) -> Path:
    """``alembic init`` (the generic env.py: one transaction for the whole run) with the two revisions above."""
    alembic = str(Path(sys.executable).parent / "alembic")
    subprocess.run([alembic, "init", "migrations"], cwd=folder, check=True, capture_output=True)
    (folder / "migrations" / "versions" / "r001_items.py").write_text(FIRST)
    (folder / "migrations" / "versions" / "r002_mood.py").write_text(CARELESS)
    return folder / "alembic.ini"


def _rehearsal(work: Path) -> dict:
    (sidecar,) = [p for p in (work / "records").glob("*_rehearse_*.json")]
    return json.loads(sidecar.read_text())


def _copies(server_url, database_url: str) -> set[str]:
    return databases_named(server_url, database_name(database_url) + "_rehearse_")


def test_the_sample_with_demo_data_rehearses_with_timings_and_no_difference(database_url, server_url, tmp_path):
    ini = ROOT / "alembic.ini"
    assert opslib_cli(database_url, ini, tmp_path, "upgrade", "head").returncode == 0
    assert opslib_cli(database_url, ini, tmp_path, "seed-demo", "--rows", "3000").returncode == 0
    before = schema_snapshot(database_url)
    data = query(database_url, "SELECT count(*), sum(hashtext(email)) FROM users")
    done = opslib_cli(database_url, ini, tmp_path, "rehearse", "-p", "from_revision", "0003",
                      env={"OPSLIB_ENV": "production"})  # allowed: the target is only read
    assert done.returncode == 0, done.stdout + done.stderr
    found = _rehearsal(tmp_path)["rehearsal"]
    assert found["copy"]["method"] == "template clone" and found["copy_dropped"] is True
    passes = [(r["pass"], r["revision"]) for r in found["revisions"]]
    assert passes == [("upgrade", r) for r in ("0004", "0005", "0006", "0007")] + [
        ("downgrade", r) for r in ("0007", "0006", "0005", "0004")
    ] + [("upgrade again", r) for r in ("0004", "0005", "0006", "0007")]
    assert all(r["seconds"] > 0 for r in found["revisions"])
    (first,) = [r for r in found["revisions"] if r["pass"] == "upgrade" and r["revision"] == "0004"]
    assert {"table": "public.products", "mode": "ACCESS EXCLUSIVE", "has_rows": True} in first["locks"]
    assert first["access_exclusive_on_rows"] == ["public.products"]
    assert all(not d for diff in found["differences"].values() for d in diff.values())
    # The terminal (and `opslib audit show`) shows the same findings as the notebook.
    assert "downgrade vs before: no difference" in done.stdout
    assert "upgrade again vs upgrade: no difference" in done.stdout
    assert "public.products: ACCESS EXCLUSIVE" in done.stdout and "by template clone" in done.stdout
    # The target was never touched, and the copy is gone.
    assert schema_snapshot(database_url) == before
    assert query(database_url, "SELECT count(*), sum(hashtext(email)) FROM users") == data
    assert _copies(server_url, database_url) == set()
    notebook = next((tmp_path / "records").glob("*_rehearse_*.ipynb")).read_text()
    assert "no difference between the passes" in notebook and "ACCESS EXCLUSIVE" in notebook


def test_a_downgrade_that_leaves_a_type_and_loses_a_column_s_data_is_named(database_url, server_url, tmp_path):
    ini = _careless_project(tmp_path)
    assert opslib_cli(database_url, ini, tmp_path, "upgrade", "r001").returncode == 0
    done = opslib_cli(database_url, ini, tmp_path, "rehearse")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "left behind: type public.mood" in done.stderr
    assert "column public.items.name: its values differ from before" in done.stderr
    diff = _rehearsal(tmp_path)["rehearsal"]["differences"]["downgrade_vs_before"]
    assert diff["left_behind"] == ["type public.mood"]
    assert "column public.items.name: its values differ from before" in diff["data"]
    assert _rehearsal(tmp_path)["outcome"] == "refused"
    # The upgrade cannot run again either (the type it creates is still there), and the message says so.
    assert "the upgrade cannot run again after its downgrade" in done.stderr and 'type "mood" already exists' in done.stderr
    assert _copies(server_url, database_url) == set()
    assert query(database_url, "SELECT version_num FROM alembic_version") == [("r001",)]
    assert query(database_url, "SELECT count(*) FROM items WHERE name LIKE 'item %'") == [(500,)]


def test_a_busy_target_is_copied_from_its_newest_verified_backup_or_refused_without_one(
    database_url, server_url, tmp_path
):
    ini = ROOT / "alembic.ini"
    assert opslib_cli(database_url, ini, tmp_path, "upgrade", "0003").returncode == 0
    other = psycopg2.connect(libpq(database_url))  # an application session: no template clone possible
    try:
        refused = opslib_cli(database_url, ini, tmp_path / "a", "rehearse")
        assert refused.returncode == 3
        assert "no verified backup to restore instead" in refused.stderr
        made = opslib_cli(database_url, ini, tmp_path / "b", "backup")
        assert made.returncode == 0, made.stderr
        dump = next((tmp_path / "b" / "backups").glob("*.dump"))
        assert opslib_cli(database_url, ini, tmp_path / "b", "verify-backup", str(dump)).returncode == 0
        done = opslib_cli(database_url, ini, tmp_path / "b", "rehearse")
        assert done.returncode == 0, done.stderr
        copy = _rehearsal(tmp_path / "b")["rehearsal"]["copy"]
        assert copy["method"].startswith(f"restore of {dump.name}")
    finally:
        other.close()
    assert _copies(server_url, database_url) == set()


def test_nothing_pending_rehearses_nothing_and_bad_parameters_are_exit_2(database_url, server_url, tmp_path):
    ini = ROOT / "alembic.ini"
    assert opslib_cli(database_url, ini, tmp_path, "upgrade", "head").returncode == 0
    done = opslib_cli(database_url, ini, tmp_path, "rehearse")
    assert done.returncode == 0 and "nothing to rehearse" in (tmp_path / "records").joinpath(
        next((tmp_path / "records").glob("*.ipynb")).name).read_text()
    assert "nothing to rehearse: the database is at the target already" in done.stdout
    same = opslib_cli(database_url, ini, tmp_path / "same", "rehearse", "-p", "from_revision", "0007")
    assert same.returncode == 0 and "nothing to rehearse" in same.stdout
    # From base: the whole chain, on a copy taken back to an empty schema.
    whole = opslib_cli(database_url, ini, tmp_path / "whole", "rehearse", "-p", "from_revision", "base")
    assert whole.returncode == 0, whole.stderr
    assert len(_rehearsal(tmp_path / "whole")["rehearsal"]["revisions"]) == 21
    for bad in (["-p", "from_revision", "zzz9"], ["-p", "target_revision", "a b"], ["-p", "bogus", "1"]):
        refused = opslib_cli(database_url, ini, tmp_path / "bad", "rehearse", *bad)
        assert refused.returncode == 2, (bad, refused.stderr)
    assert _copies(server_url, database_url) == set()


def _rehearsal_under_way(database_url: str, server_url, tmp_path: Path, into_s: float) -> subprocess.Popen:
    """`opslib rehearse` of the sample at 0003 with 300,000 products, ``into_s`` seconds after its copy exists."""
    ini = ROOT / "alembic.ini"
    assert opslib_cli(database_url, ini, tmp_path, "upgrade", "0003").returncode == 0
    query(database_url, "INSERT INTO products (marketplace, shop_name, title, price) SELECT 'm', 's', 't', "
                        "(g % 100)::text FROM generate_series(1, 300000) g")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(DATABASE_URL=database_url, OPSLIB_ALEMBIC_INI=str(ini))
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "opslib"), "rehearse"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _copies(server_url, database_url):
        time.sleep(0.05)
    time.sleep(into_s)
    return proc


def test_a_rehearsal_stopped_during_a_pass_drops_its_copy(database_url, server_url, tmp_path):
    proc = _rehearsal_under_way(database_url, server_url, tmp_path, 0.5)  # into the upgrade of the copy
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, out + err
    assert _copies(server_url, database_url) == set()
    assert query(database_url, "SELECT version_num FROM alembic_version") == [("0003",)]


def test_a_copy_left_by_a_killed_rehearsal_is_dropped_by_the_next_one(database_url, server_url, tmp_path):
    ini = ROOT / "alembic.ini"
    proc = _rehearsal_under_way(database_url, server_url, tmp_path, 0.3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    (left,) = _copies(server_url, database_url)
    done = opslib_cli(database_url, ini, tmp_path, "rehearse")
    assert done.returncode == 0, done.stderr
    assert "abandoned" in done.stderr  # the killed run was sealed first, as every run does
    assert _copies(server_url, database_url) == set()
    notebook = sorted((tmp_path / "records").glob("*_rehearse_*.ipynb"))[-1].read_text()
    assert left in notebook and "left by rehearsals that were killed" in notebook
    assert f"dropped first, left by killed rehearsals: {left}" in done.stdout  # and in the record


def test_a_long_lived_chain_rehearses_and_a_failing_downgrade_is_the_finding(database_url, server_url, project, tmp_path):
    ini = project("longlived")
    landmarks = json.loads((ini.parent / "landmarks.json").read_text())
    lines = opslib_cli(database_url, ini, tmp_path, "history").stdout.splitlines()
    chain = [line.split(" -> ")[1].split(",")[0].split(" ")[0] for line in lines if " -> " in line]  # newest first
    assert opslib_cli(database_url, ini, tmp_path, "upgrade", "head").returncode == 0
    # The newest ten revisions, printing and logging ones among them, rehearse cleanly.
    done = opslib_cli(database_url, ini, tmp_path / "a", "rehearse", "-p", "from_revision", chain[10])
    assert done.returncode == 0, done.stderr
    assert len(_rehearsal(tmp_path / "a")["rehearsal"]["revisions"]) == 30
    # Across the revision whose downgrade fails, the rehearsal says so, and the target is untouched.
    failing = landmarks["failing_downgrade"]
    below = chain[chain.index(failing) + 1]
    refused = opslib_cli(database_url, ini, tmp_path / "b", "rehearse", "-p", "from_revision", below)
    assert refused.returncode == 3
    assert f"failed at revision {failing}" in refused.stderr and "the target is untouched" in refused.stderr
    assert query(database_url, "SELECT version_num FROM alembic_version") == [(landmarks["head"],)]
    assert _copies(server_url, database_url) == set()


def test_what_the_downgrade_to_from_revision_left_behind_is_named_not_the_upgrade_that_trips_on_it(
    database_url, make_database, server_url, project, tmp_path
):
    # f002's downgrade drops its index and forgets its table: taking the copy back from f003 to f001
    # leaves audit_log there, and the upgrade of f002 then finds it.
    ini = project("forgetful_downgrade")
    assert opslib_cli(database_url, ini, tmp_path, "upgrade", "head").returncode == 0
    refused = opslib_cli(database_url, ini, tmp_path / "a", "rehearse", "-p", "from_revision", "f001")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert (
        "the preparatory downgrade to f001 left table public.audit_log behind (the downgrade of f002, whose "
        "upgrade creates it, did not remove it), so the upgrade failed on the copy: upgrade to f003 failed at "
        'revision f002 (create audit_log table): DuplicateTable: relation "audit_log" already exists'
    ) in refused.stderr
    found = _rehearsal(tmp_path / "a")["rehearsal"]
    assert found["differences"]["preparatory_downgrade"]["left_behind"] == ["table public.audit_log"]
    assert "preparatory downgrade: left behind: table public.audit_log" in refused.stdout
    assert query(database_url, "SELECT version_num FROM alembic_version") == [("f003",)]
    # Alembic's generic env.py (one transaction for the run), the careless revision the first one to run
    # again: its downgrade left the enum type.
    (tmp_path / "careless").mkdir()
    careless, other = _careless_project(tmp_path / "careless"), make_database()
    assert opslib_cli(other, careless, tmp_path / "careless", "upgrade", "r002").returncode == 0
    refused = opslib_cli(other, careless, tmp_path / "b", "rehearse", "-p", "from_revision", "r001")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "the preparatory downgrade to r001 left type public.mood behind (the downgrade of r002" in refused.stderr
    assert 'type "mood" already exists' in refused.stderr
    assert _copies(server_url, database_url) == set() and _copies(server_url, other) == set()
