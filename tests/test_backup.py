"""Backups against real PostgreSQL with the real pg_dump and pg_restore: round trips, corruption, restore, clone."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import psycopg2
import pytest

from opslib import backup, db, migrate, pgtools
from opslib.backup import cloning
from opslib.errors import ChecksFailed, InvalidInput, PreconditionFailed

from .conftest import (
    OPSLIB,
    REFUSED,
    ROOT,
    databases_named,
    libpq,
    query,
    schema_snapshot,
    settings_for,
    unanswered,
)

PASSWORD = "Backup-S3cret-pw"


def _seed(settings) -> None:
    migrate.upgrade(settings, "head", x_args=["dev_data=true"])
    query(
        settings.database_url,
        "INSERT INTO users (email, username, hashed_password) "
        "SELECT 'u' || g || '@example.com', 'u' || g, '!' FROM generate_series(1, 500) g",
    )


def _data(url: str) -> list:
    tables = [
        r[0] for r in query(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")
    ]
    return [(t, query(url, f'SELECT count(*) FROM "{t}"')[0][0]) for t in tables]


@pytest.fixture
def seeded(settings):
    _seed(settings)
    return settings


def test_round_trip_restores_the_same_tables_rows_revision_and_schema(seeded, make_database):
    made = backup.backup(seeded, label="round trip")
    m = made.manifest
    assert made.path.name.startswith(db.parse_url(seeded.database_url).database + "_")
    assert made.path.name.endswith("_0007.dump") and backup.manifest_path(made.path).is_file()
    assert m["revisions"] == ["0007"] and m["row_counts"]["public.users"] == 502
    assert m["label"] == "round trip" and m["env"] == "development" and m["compression"] == 1
    assert m["pg_dump"]["major"] == m["server_major"]
    assert m["sha256"] == backup.sha256_of(made.path) and m["size_bytes"] == made.path.stat().st_size
    restored = backup.restore(seeded, made.path, into=make_database.prefix + "_copy")
    assert restored.matches_manifest and restored.revisions == ("0007",)
    copy_url = (
        db.parse_url(seeded.database_url)
        .set(database=restored.database)
        .render_as_string(hide_password=False)
    )
    assert _data(copy_url) == _data(seeded.database_url)
    assert schema_snapshot(copy_url) == schema_snapshot(seeded.database_url)


def test_counts_come_from_the_dumped_snapshot(seeded):
    """Rows committed while pg_dump runs are in neither the dump nor the manifest's counts."""
    made = backup.backup(seeded)
    assert made.manifest["row_counts"]["public.users"] == 502
    report = backup.verify_backup(seeded, made.path, restore_test=True)
    assert report.ok, report.to_dict()
    assert [c.status for c in report.checks] == ["pass"] * 5


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "truncated:"),
        ("flip", "checksum mismatch"),
        ("no manifest", "missing manifest"),
        ("other manifest", "manifest of another file"),
        ("counts", "count mismatch: public.users: 502 rows, expected 999"),
    ],
)
def test_each_corruption_is_caught_with_its_own_message_and_exit_3(
    seeded, run_cli, damage, message, tmp_path
):
    first = backup.backup(seeded).path
    if damage == "truncate":
        first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(first.read_bytes())
        data[len(data) // 2] ^= 0x01
        first.write_bytes(bytes(data))
    elif damage == "no manifest":
        backup.manifest_path(first).unlink()
    elif damage == "other manifest":
        second = backup.backup(seeded).path
        backup.manifest_path(first).write_text(backup.manifest_path(second).read_text())
    elif damage == "counts":
        manifest = json.loads(backup.manifest_path(first).read_text())
        manifest["row_counts"]["public.users"] = 999
        backup.manifest_path(first).write_text(json.dumps(manifest))
    done = run_cli("verify-backup", str(first), "--restore-test")
    assert done.returncode == 3, done.stdout + done.stderr
    assert message in done.stdout and message in done.stderr
    assert "FAILED" in done.stdout
    listed = backup.list_backups(seeded)
    if damage != "no manifest":
        assert any(b.path == first and b.verified is False for b in listed)


def test_an_unreadable_archive_of_the_right_size_and_checksum(seeded):
    made = backup.backup(seeded)
    junk = b"not a pg_dump archive".ljust(made.manifest["size_bytes"], b"\0")
    made.path.write_bytes(junk)
    manifest = dict(made.manifest, sha256=backup.sha256_of(made.path))
    backup.manifest_path(made.path).write_text(json.dumps(manifest))
    report = backup.verify_backup(seeded, made.path)
    assert not report.ok and report.first_failure().name == "archive readable"
    assert "unreadable archive" in report.first_failure().detail
    with pytest.raises(ChecksFailed):
        report.raise_for_failure()


def test_restore_over_the_target_needs_the_right_confirm_and_changes_nothing_otherwise(
    seeded, run_cli, server_url, make_database
):
    made = backup.backup(seeded).path
    query(seeded.database_url, "DELETE FROM users WHERE id > 2")  # the target now differs from the backup
    before, databases = (
        (_data(seeded.database_url), schema_snapshot(seeded.database_url)),
        databases_named(server_url, make_database.prefix),
    )
    target = db.parse_url(seeded.database_url).database
    for extra in (["--into", target], ["--confirm", "not-" + target], ["--into", target, "--confirm", "x"]):
        done = run_cli("restore", str(made), *extra)
        assert done.returncode == 3, done.stderr
        assert f"refusing to restore over database '{target}'" in done.stderr
        assert (_data(seeded.database_url), schema_snapshot(seeded.database_url)) == before
        assert databases_named(server_url, make_database.prefix) == databases
    # The default (no flags) restores into a new database and leaves the target alone.
    done = run_cli("restore", str(made))
    assert done.returncode == 0 and "_restored_" in done.stdout
    assert _data(seeded.database_url) == before[0]


def test_restore_over_the_target_when_confirmed_keeps_the_old_database(seeded, server_url):
    made = backup.backup(seeded).path
    query(seeded.database_url, "DELETE FROM users WHERE id > 2")
    target = db.parse_url(seeded.database_url).database
    other = psycopg2.connect(libpq(seeded.database_url))
    try:
        with pytest.raises(PreconditionFailed, match="other session"):
            backup.restore(seeded, made, confirm=target)
        assert query(seeded.database_url, "SELECT count(*) FROM users")[0][0] == 2
        done = backup.restore(seeded, made, confirm=target, terminate_connections=True)
    finally:
        other.close()
    assert done.database == target and done.matches_manifest
    assert query(seeded.database_url, "SELECT count(*) FROM users")[0][0] == 502
    kept = server_url.set(database=done.replaced_database_kept_as).render_as_string(hide_password=False)
    assert query(kept, "SELECT count(*) FROM users")[0][0] == 2  # nothing lost: the replaced data is kept


def test_clone_copies_and_refuses_while_others_are_connected(seeded, make_database, run_cli):
    into = make_database.prefix + "_clone"
    other = psycopg2.connect(libpq(seeded.database_url))
    try:
        done = run_cli("clone", "--into", into)
        assert done.returncode == 3 and "while other sessions are connected" in done.stderr
    finally:
        other.close()
    done = run_cli("clone", "--into", into)
    assert done.returncode == 0, done.stderr
    clone_url = db.parse_url(seeded.database_url).set(database=into).render_as_string(hide_password=False)
    assert _data(clone_url) == _data(seeded.database_url)
    again = run_cli("clone", "--into", into)
    assert again.returncode == 3 and "already exists" in again.stderr
    assert run_cli("clone", "--into", "no spaces").returncode == 2


def test_backup_killed_part_way_leaves_no_file_under_a_final_name(seeded, tmp_path):
    """kill -9 of pg_dump: pg_dump is held on a table lock, killed, and opslib cleans up."""
    out = tmp_path / "out"
    holder = psycopg2.connect(libpq(seeded.database_url))
    holder.cursor().execute("BEGIN; LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
    env = {**os.environ, "DATABASE_URL": seeded.database_url, "OPSLIB_LOCK_TIMEOUT": "60"}
    proc = subprocess.Popen(
        [OPSLIB, "backup", "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_lock_wait(seeded.database_url)
        dump = _wait_for_child(proc.pid, "pg_dump")
        assert list(out.glob(".*.dump.partial"))  # pg_dump is writing, under a temporary name
        os.kill(dump.pid, signal.SIGKILL)
    finally:
        holder.rollback()
        holder.close()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3  # BackupNotTaken: the database was only read
    assert "pg_dump was killed by signal 9" in stderr and "no backup was written" in stderr
    assert [p.name for p in out.iterdir()] == []


def _wait_for_child(pid: int, name: str) -> psutil.Process:
    """The child ``name`` doing the work: not one of the short ``--version`` probes that pick the client."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                if child.name() == name and "--version" not in child.cmdline():
                    return child
            except psutil.NoSuchProcess:
                continue  # a probe that ended while we looked
        time.sleep(0.05)
    raise AssertionError(f"{name} never started")


def _wait_for_lock_wait(url: str) -> None:
    """Until pg_dump and opslib's row count both wait behind the held table lock."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        waiting = query(
            url,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        if waiting[0][0] >= 2:
            return
        time.sleep(0.05)
    raise AssertionError("pg_dump never queued behind the lock")


def test_backups_list_and_prune_keep_the_newest_verified(seeded):
    oldest = backup.backup(seeded).path
    assert backup.verify_backup(seeded, oldest).ok
    middle = backup.backup(seeded).path
    newest = backup.backup(seeded).path
    listed = backup.list_backups(seeded)
    assert [b.path for b in listed] == [newest, middle, oldest]
    assert [b.verified for b in listed] == [None, None, True]
    deleted = backup.prune_backups(seeded, keep=1)
    assert deleted == [middle]
    assert not middle.exists() and not backup.manifest_path(middle).exists()
    assert newest.exists() and oldest.exists() and backup.verification_path(oldest).exists()
    with pytest.raises(InvalidInput):
        backup.prune_backups(seeded, keep=0)


def test_backups_and_prune_commands(seeded, run_cli, tmp_path):
    env = {"OPSLIB_BACKUPS_DIR": str(seeded.backups_dir)}
    assert run_cli("backup", "--label", "cli", env=env).returncode == 0
    listed = run_cli("backups", env=env)
    assert "not verified" in listed.stdout and "0007" in listed.stdout
    assert json.loads(run_cli("backups", "--json", env=env).stdout)[0]["label"] == "cli"
    assert run_cli("prune-backups", "--keep", "0", env=env).returncode == 2
    assert run_cli("prune-backups", "--keep", "1", env=env).stdout.strip() == "nothing to delete"
    assert run_cli("verify-backup", str(tmp_path / "nope.dump")).returncode == 2


def test_the_password_stays_out_of_manifests_and_outputs(seeded, run_cli):
    url = db.parse_url(seeded.database_url).set(password=PASSWORD).render_as_string(hide_password=False)
    done = run_cli("backup", env={"DATABASE_URL": url, "OPSLIB_BACKUPS_DIR": str(seeded.backups_dir)})
    assert done.returncode == 0
    verify = run_cli(
        "verify-backup",
        str(next(seeded.backups_dir.glob("*.dump"))),
        "--restore-test",
        env={"DATABASE_URL": url},
    )
    assert verify.returncode == 0
    for text in [done.stdout, done.stderr, verify.stdout, verify.stderr] + [
        p.read_text() for p in seeded.backups_dir.glob("*.json")
    ]:
        assert PASSWORD not in text


def test_embedded_server_round_trip_with_its_own_client_tools(embedded_server_url, make_database, tmp_path):
    """PostgreSQL 18 (the embedded wheel) is dumped and restored with the 18 tools."""
    url = make_database(on=embedded_server_url)
    settings = settings_for(url, tmp_path / "e18")
    _seed(settings)
    made = backup.backup(settings)
    assert made.manifest["server_major"] == 18 and made.manifest["pg_dump"]["major"] == 18
    assert backup.verify_backup(settings, made.path, restore_test=True).ok
    restored = backup.restore(settings, made.path, into=make_database.prefix + "_e18")
    assert restored.matches_manifest


def test_local_server_uses_its_own_major(server_url, settings):
    """The server the suite runs on (PostgreSQL 15 on 5432 here) gets pg_dump of its own major."""
    _seed(settings)
    made = backup.backup(settings)
    assert made.manifest["pg_dump"]["major"] == made.manifest["server_major"]
    assert backup.verify_backup(settings, made.path, restore_test=True).ok


def test_no_fitting_client_names_the_server_version_and_what_to_install():
    with pytest.raises(PreconditionFailed, match=r"PostgreSQL 99 server.*postgresql-client-99"):
        pgtools.pg_dump_for(99)
    newest = max(t.major for t in pgtools.find_all("pg_restore"))
    assert pgtools.pg_restore_for(newest).major == newest
    for tool in pgtools.find_all("pg_dump"):
        assert Path(tool.path).resolve().name == "pg_dump"  # Debian's pg_wrapper is skipped


def test_verify_setup_reports_a_table_and_exits_3_on_failure(run_cli, tmp_path):
    ok = run_cli("verify-setup", env={"OPSLIB_BACKUPS_DIR": str(tmp_path / "b")})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for name in (
        "connectivity",
        "server version",
        "pg_dump matching the server",
        "pg_restore matching the server",
        "Alembic config loads",
        "single head",
        "backups folder writable",
    ):
        assert name in ok.stdout
    blocked = tmp_path / "file"
    blocked.write_text("")
    bad = run_cli("verify-setup", env={"OPSLIB_BACKUPS_DIR": str(blocked / "sub")})
    assert bad.returncode == 3
    assert re.search(r"backups folder writable +FAIL .*Not a directory", bad.stdout)


def test_make_backup_db_and_verify_setup(database_url, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "MAKE"))}
    env.update({"DATABASE_URL": database_url, "OPSLIB_BACKUPS_DIR": str(tmp_path / "b")})
    done = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "backup-db", "label=from make"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    manifest = json.loads(next((tmp_path / "b").glob("*.json")).read_text())
    assert manifest["label"] == "from make"
    setup = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "verify-setup"], env=env, capture_output=True, text=True
    )
    assert setup.returncode == 0 and "all checks passed" in setup.stdout


def test_backup_behind_a_held_lock_gives_up_after_the_lock_timeout(seeded, run_cli, tmp_path):
    holder = psycopg2.connect(libpq(seeded.database_url))
    holder.cursor().execute("BEGIN; LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
    try:
        done = run_cli("backup", "--out", str(tmp_path / "out"), env={"OPSLIB_LOCK_TIMEOUT": "0.5"})
    finally:
        holder.rollback()
        holder.close()
    assert done.returncode == 3 and "no backup was written" in done.stderr  # BackupNotTaken
    assert "lock" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert list((tmp_path / "out").iterdir()) == []


def test_restore_over_the_target_keeps_its_owner_and_settings(seeded, server_url):
    """The restored database is made by the connecting role; it takes the replaced one's owner and settings."""
    target = db.parse_url(seeded.database_url).database
    role = f"{target}_owner"[:63]
    admin = psycopg2.connect(libpq(server_url.render_as_string(hide_password=False)))
    admin.autocommit = True
    cur = admin.cursor()
    cur.execute(f'CREATE ROLE "{role}"')
    try:
        cur.execute(f'ALTER DATABASE "{target}" OWNER TO "{role}"')
        cur.execute(f"ALTER DATABASE \"{target}\" SET work_mem = '8MB'")
        cur.execute(f'ALTER DATABASE "{target}" SET search_path = "$user", public, app')
        cur.execute(f'ALTER ROLE "{role}" IN DATABASE "{target}" SET statement_timeout = \'5min\'')
        settings_sql = (
            "SELECT pg_get_userbyid(d.datdba), (SELECT array_agg(c ORDER BY c) FROM pg_db_role_setting s, "
            "unnest(s.setconfig) c WHERE s.setdatabase = d.oid) FROM pg_database d WHERE d.datname = %s"
        )
        cur.execute(settings_sql, (target,))
        before = cur.fetchone()
        made = backup.backup(seeded).path
        done = backup.restore(seeded, made, confirm=target, terminate_connections=True)
        assert done.matches_manifest
        cur.execute(settings_sql, (target,))
        assert (
            cur.fetchone()
            == before
            == (role, ['search_path="$user", public, app', "statement_timeout=5min", "work_mem=8MB"])
        )
    finally:
        cur.execute(
            "SELECT datname FROM pg_database WHERE datdba = (SELECT oid FROM pg_roles WHERE rolname = %s)",
            (role,),
        )
        for (name,) in cur.fetchall():
            cur.execute(f'ALTER DATABASE "{name}" OWNER TO CURRENT_USER')
        cur.execute(f'DROP ROLE "{role}"')
        admin.close()


# --- clone strategy, naming, concurrency of the checks ----------------------------------------------


def _requested_checkpoints(server_url) -> int:
    """Checkpoints the server has made on request (PostgreSQL 17 moved the count to pg_stat_checkpointer)."""
    url = server_url.render_as_string(hide_password=False)
    if int(query(url, "SHOW server_version_num")[0][0]) >= 170000:
        return query(url, "SELECT num_requested FROM pg_stat_checkpointer")[0][0]
    return query(url, "SELECT checkpoints_req FROM pg_stat_bgwriter")[0][0]


def test_clone_strategy_by_server_version_and_source_size():
    limit = backup.FILE_COPY_FROM_BYTES
    assert backup.clone_strategy(14, 10 * limit) is None  # no STRATEGY clause before PostgreSQL 15
    assert backup.clone_strategy(15, limit - 1) == "WAL_LOG"
    assert backup.clone_strategy(15, limit) == "FILE_COPY"
    assert backup.clone_strategy(18, 10 * limit) == "FILE_COPY"


def test_a_large_source_is_cloned_file_by_file_and_still_refused_while_in_use(
    seeded, make_database, server_url, monkeypatch
):
    """Above FILE_COPY_FROM_BYTES the server copies the files (two checkpoints); below it, through the WAL."""
    small = backup.clone(seeded, make_database.prefix + "_wal")
    assert small.strategy == "WAL_LOG" and small.to_dict()["strategy"] == "WAL_LOG"

    # Patched where clone_strategy reads it (the package only re-exports it).
    monkeypatch.setattr(cloning, "FILE_COPY_FROM_BYTES", 1)  # this small source now counts as large
    other = psycopg2.connect(libpq(seeded.database_url))
    try:
        with pytest.raises(PreconditionFailed, match="while other sessions are connected"):
            backup.clone(seeded, make_database.prefix + "_busy")
    finally:
        other.close()
    before = _requested_checkpoints(server_url)
    large = backup.clone(seeded, make_database.prefix + "_files")
    assert large.strategy == "FILE_COPY"
    # FILE_COPY makes the server checkpoint before and after copying (WAL_LOG never does): the server's
    # own count says the strategy was used, not only opslib's record. The checkpointer reports its
    # count just after waking the waiter, hence the short wait.
    deadline = time.monotonic() + 10
    while _requested_checkpoints(server_url) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _requested_checkpoints(server_url) >= before + 2
    for made in (small, large):
        url = db.parse_url(seeded.database_url).set(database=made.database).render_as_string(hide_password=False)
        assert _data(url) == _data(seeded.database_url)
        assert schema_snapshot(url) == schema_snapshot(seeded.database_url)


def test_backups_of_one_second_get_their_own_names_and_a_finished_ones_second_is_never_reused(
    seeded, tmp_path
):
    """The partial file names no revision (pg_dump starts before it is read): a second holding a finished
    backup of the database, of any revision, is skipped."""
    out = tmp_path / "out"
    out.mkdir()
    name = db.parse_url(seeded.database_url).database
    now = datetime.now(timezone.utc)
    planted = [out / f"{name}_{(now + timedelta(seconds=s)).strftime(backup.STAMP)}_0001.dump" for s in range(4)]
    for path in planted:
        path.write_text("an older backup at another revision")
    env = {**os.environ, "DATABASE_URL": seeded.database_url}
    env = {k: v for k, v in env.items() if not k.startswith("OPSLIB_")}
    procs = [
        subprocess.Popen(
            [OPSLIB, "backup", "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
    made = sorted(p for p in out.glob("*_0007.dump"))
    assert len(made) == 2  # two backups, two names
    for path in made:
        assert path.name > max(p.name for p in planted)  # after every second already taken
        assert backup.verify_backup(seeded, path).ok
    assert all(p.read_text() == "an older backup at another revision" for p in planted)
    assert not list(out.glob(".*.partial"))


def test_the_revision_is_read_in_the_dumps_snapshot_after_pg_dump_started(seeded, tmp_path):
    """A revision committed after the backup began (while pg_dump waits on a lock) is in neither the dump
    nor the manifest: the name, the manifest and a test restore all say the revision of the snapshot."""
    out = tmp_path / "out"
    holder = psycopg2.connect(libpq(seeded.database_url))
    holder.cursor().execute("BEGIN; LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSLIB_")}
    env.update(DATABASE_URL=seeded.database_url, OPSLIB_LOCK_TIMEOUT="60")
    proc = subprocess.Popen(
        [OPSLIB, "backup", "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _wait_for_lock_wait(seeded.database_url)  # pg_dump and the revision read, both behind the lock
        holder.cursor().execute("UPDATE alembic_version SET version_num = '0006'")
    finally:
        holder.commit()
        holder.close()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert query(seeded.database_url, "SELECT version_num FROM alembic_version") == [("0006",)]
    (made,) = out.glob("*.dump")
    assert made.name.endswith("_0007.dump")
    assert backup.read_manifest(made)["revisions"] == ["0007"]
    report = backup.verify_backup(seeded, made, restore_test=True)
    assert report.ok, report.to_dict()


def test_a_signal_noted_or_the_programs_end_ends_the_wait_for_it():
    quick = subprocess.Popen(["sleep", "0.2"])
    backup._wait_for_exit(quick, [])
    assert quick.returncode == 0  # ended and reaped
    slow = subprocess.Popen(["sleep", "30"])
    try:
        backup._wait_for_exit(slow, [signal.SIGINT])  # as signals_noted notes one
        assert slow.returncode is None  # still running: the caller stops it
    finally:
        slow.kill()
        slow.wait()


def test_checks_run_at_once_are_still_reported_in_order(seeded):
    """The checksum, the listing and the scratch database start together; each failure stays at its place."""
    made = backup.backup(seeded)
    manifest = json.loads(backup.manifest_path(made.path).read_text())
    manifest["pg_dump"]["major"] = 99  # no pg_restore fits it: the listing cannot start
    backup.manifest_path(made.path).write_text(json.dumps(manifest))
    report = backup.verify_backup(seeded, made.path, restore_test=True, record=False)
    assert [(c.name, c.status) for c in report.checks] == [
        ("manifest", "pass"),
        ("size", "pass"),
        ("sha256", "pass"),
        ("archive readable", "fail"),
        ("restore test", "skip"),
    ]
    assert "no pg_restore fits a PostgreSQL 99 server" in report.first_failure().detail

    manifest["sha256"] = "0" * 64  # and a checksum that does not match: that failure comes first
    backup.manifest_path(made.path).write_text(json.dumps(manifest))
    report = backup.verify_backup(seeded, made.path, restore_test=True, record=False)
    assert [c.status for c in report.checks] == ["pass", "pass", "fail", "skip", "skip"]
    assert "checksum mismatch" in report.first_failure().detail


def test_a_restore_test_without_the_right_to_create_a_database_fails_as_a_check(seeded, server_url):
    """The scratch database is made while the archive is checked; a refusal is the restore test's failure."""
    made = backup.backup(seeded)
    role = f"{db.parse_url(seeded.database_url).database}_nocreate"[:63]
    admin = psycopg2.connect(libpq(server_url.render_as_string(hide_password=False)))
    admin.autocommit = True
    admin.cursor().execute(f'CREATE ROLE "{role}" LOGIN NOCREATEDB')
    try:
        url = db.parse_url(seeded.database_url).set(username=role).render_as_string(hide_password=False)
        report = backup.verify_backup(settings_for(url, seeded.backups_dir.parent), made.path, restore_test=True)
    finally:
        admin.cursor().execute(f'DROP ROLE "{role}"')
        admin.close()
    assert [c.status for c in report.checks] == ["pass", "pass", "pass", "pass", "fail"]
    failure = report.first_failure()
    assert failure.name == "restore test"
    assert "cannot create a scratch database" in failure.detail and "permission denied" in failure.detail


@pytest.mark.connections
def test_a_backup_that_cannot_connect_says_why(database_url, run_cli, tmp_path):
    """Nothing runs beside the connection that could swallow its error (learning the version table
    redirects stdout, stderr and logging for the whole process while env.py runs)."""
    unreachable = unanswered(database_url)
    done = run_cli("backup", "--out", str(tmp_path / "out"), env={"DATABASE_URL": unreachable})
    assert done.returncode != 0
    assert "cannot connect" in done.stderr and any(said in done.stderr for said in REFUSED), done.stderr
