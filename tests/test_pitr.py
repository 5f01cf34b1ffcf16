"""Physical backups and point-in-time recovery with pgBackRest, end to end on an embedded server of the test's own
that archives its WAL: a deploy whose revision deletes rows, its gate's restore point, the recovery to it (in
place, and as a new database) with every table's rows compared, a recovery killed part-way, and the refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg2
import pytest

from .conftest import FIXTURES, OPSLIB, ROOT

SAMPLE_INI = ROOT / "alembic.ini"


class Server:
    """An embedded server of the test's own (its state folder, records and backups), driven by the real
    ``opslib`` command, with the Alembic project ``ini``."""

    def __init__(self, home: Path, ini: Path):
        self.home, self.ini = home, ini

    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
        env.update(
            OPSLIB_STATE_DIR=str(self.home / "state"),
            OPSLIB_RECORDS_DIR=str(self.home / "records"),
            OPSLIB_BACKUPS_DIR=str(self.home / "backups"),
            OPSLIB_ALEMBIC_INI=str(self.ini),
            **extra,
        )
        return env

    def opslib(self, *args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [OPSLIB, *args], cwd=ROOT, env=self.env(**extra), capture_output=True, text=True, timeout=600
        )

    def sql(self, statement: str, database: str = "opslib") -> str:
        url = self.opslib("db", "url").stdout.strip()
        socket_dir = url.split("host=", 1)[1]
        done = subprocess.run(
            ["psql", "-XAtq", "-h", socket_dir, "-U", "postgres", "-d", database, "-c", statement],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    def last_record(self, runbook: str) -> dict:
        found = sorted((self.home / "records").glob(f"*_{runbook}_*.json"))
        return json.loads(found[-1].read_text())


def _project(tmp_path: Path) -> Path:
    """The destructive scenario (its policy: pgbackrest, with table checksums), copied with its shared env.py."""
    dest = tmp_path / "fixtures"
    shutil.copytree(FIXTURES / "destructive", dest / "destructive")
    shutil.copytree(FIXTURES / "_shared", dest / "_shared")
    return dest / "destructive" / "alembic.ini"


@pytest.fixture
def archiving(tmp_path):
    """An embedded server archiving to pgBackRest (its project's policy asks), at 0001 with 3,000 orders."""
    home = Path(tempfile.mkdtemp(prefix="opslib-pitr-"))  # short: the server's socket lives below it
    server = Server(home, _project(tmp_path))
    try:
        started = server.opslib("db", "start")
        assert started.returncode == 0, started.stderr
        assert "WAL archived with pgBackRest" in started.stdout
        assert server.opslib("upgrade", "0001").returncode == 0
        yield server
    finally:
        _stop_all(server)


def _stop_all(server: Server) -> None:
    from opslib.backup import pitr

    server.opslib("db", "stop")
    pitr.cleanup_staging(server.home / "state")  # a killed recovery's staging server, if one is left
    shutil.rmtree(server.home, ignore_errors=True)


def _deploy(server: Server, *args: str, **env: str) -> dict:
    done = server.opslib("run", "deploy", "--json", *args, **env)
    assert done.returncode == 0, done.stdout + done.stderr
    record = server.last_record("deploy")
    assert record["revisions_after"] == ["0002"]
    return record


def test_a_deploy_gated_by_a_restore_point_is_recovered_to_it_with_every_row_back(archiving):
    server = archiving
    server.sql("CREATE UNLOGGED TABLE sessions_cache AS SELECT g FROM generate_series(1, 10) g")  # not in the WAL
    deployed = _deploy(server, "--env", "production", "-p", "confirm", "opslib")
    point = deployed["backup"]["restore_point"]
    assert point["name"] == f"opslib-{deployed['run_id']}"
    assert deployed["backup"]["path"] == f"pgbackrest:embedded/{point['backup_label']}"
    assert point["revisions"] == ["0001"] and point["row_counts"]["public.orders"] == 3000
    assert set(point["checksums"]) == set(point["row_counts"]) and "public.sessions_cache" not in point["row_counts"]
    ending = [json.loads(line) for line in (server.home / "records" / "ledger.jsonl").read_text().splitlines()][-1]
    assert ending["restore_point"] == {k: point[k] for k in ("name", "lsn", "created_at", "stanza")}
    assert ending["warnings"] == []  # a production deploy gated by a restore point went without no safeguard
    backup_check = next(c for c in deployed["checks"] if c["name"] == "backup")
    assert backup_check["status"] == "pass" and "pgBackRest restore point" in backup_check["detail"]
    notebook = (server.home / "records" / deployed["notebook"]).read_text()
    assert "pgbackrest: a physical backup and a named restore point" in notebook  # the section names the method
    assert server.sql("SELECT count(*) FROM orders") == "2000"  # the revision deleted the cancelled thousand
    server.sql("INSERT INTO orders (status, total) VALUES ('paid', 1)")  # a write after the gate: not kept

    recovered = server.opslib("run", "recovery", "-p", "mode", "pitr", "-p", "confirm", "opslib", "--json")
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert json.loads(recovered.stdout)["revisions_after"] == ["0001"]
    assert server.sql("SELECT count(*), count(*) FILTER (WHERE status = 'cancelled') FROM orders") == "3000|1000"
    assert server.sql("SELECT max(id) FROM orders") == "3000"
    record = server.last_record("recovery")
    assert record["backup"]["restore_point"]["name"] == point["name"]
    assert [s["name"] for s in record["steps"] if s["name"] not in ("replay", "stamp")][:8] == [
        "parameters", "preflight", "restore", f"recover to restore point {point['name']}", "compare with the gate",
        "put in place", "verify", "summary",
    ]  # fmt: skip
    text = (server.home / "records" / record["notebook"]).read_text()
    assert "equal: revision, schema, every table's rows and their checksums" in text
    kept = server.home / "state" / f"pgdata.replaced-{record['run_id']}"
    assert (kept / "PG_VERSION").is_file()  # the replaced data folder is kept
    # The recovered server archives again, on its new timeline: the next deploy's gate works, also with DATABASE_URL
    # naming the embedded server (the URL `opslib db url` prints), as plain papermill needs it.
    again = _deploy(server, DATABASE_URL=_socket_url(server))
    assert again["backup"]["restore_point"]["revisions"] == ["0001"]
    listed = server.opslib("backups", "--pgbackrest", "--json")
    assert point["name"] in [p["name"] for p in json.loads(listed.stdout)["restore_points"]]
    verified = server.opslib("verify-backup", "--pgbackrest", "--restore-point", point["name"])
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "restore test  PASS" in verified.stdout


def _socket_url(server: Server) -> str:
    return server.opslib("db", "url").stdout.strip()


class Writer(threading.Thread):
    """An application that keeps writing while the deploy runs: one order a transaction, its ids kept in order."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.ids, self.stop = url, [], threading.Event()

    def run(self) -> None:
        conn = psycopg2.connect(self.url)
        conn.autocommit = True
        with conn.cursor() as cur:
            while not self.stop.is_set():
                cur.execute("INSERT INTO orders (status, total) VALUES ('paid', 2) RETURNING id")
                self.ids.append(cur.fetchone()[0])
        conn.close()


def test_a_recovery_as_a_new_database_gives_the_rows_at_the_gate_while_writes_went_on(archiving):
    server = archiving
    writer = Writer(_socket_url(server))
    writer.start()
    while len(writer.ids) < 50:  # writing before the gate, through it, and on during the upgrade
        time.sleep(0.01)
    point = _deploy(server)["backup"]["restore_point"]
    writer.stop.set()
    writer.join()
    server.sql("CREATE DATABASE reports")  # another database: in place would take it back too
    in_place = server.opslib("run", "recovery", "-p", "mode", "pitr", "-p", "confirm", "opslib")
    assert in_place.returncode == 3, in_place.stdout + in_place.stderr
    assert "takes the whole server back, and it holds other databases too (reports)" in in_place.stderr
    done = server.opslib(
        "run", "recovery", "-p", "mode", "pitr", "-p", "restore_point", point["name"], "-p", "apply", "new_database",
        "-p", "new_database", "orders_before_purge", "-p", "confirm", "opslib",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert server.sql("SELECT version_num FROM alembic_version") == "0002"  # the target is as the deploy left it
    assert int(server.sql("SELECT count(*) FROM orders WHERE status = 'cancelled'")) == 0
    copy = "orders_before_purge"
    assert server.sql("SELECT version_num FROM alembic_version", database=copy) == "0001"
    # Exactly the rows at the gate: the recovery compared each table's count and checksum with the gate's (else
    # exit 3), and the writer's orders there are a prefix of what it wrote, with the purged thousand back.
    assert int(server.sql("SELECT count(*) FROM orders", database=copy)) == point["row_counts"]["public.orders"]
    assert server.sql("SELECT count(*) FROM orders WHERE status = 'cancelled'", database=copy) == "1000"
    written = [int(i) for i in server.sql("SELECT id FROM orders WHERE id > 3000 ORDER BY id", database=copy).split()]
    assert 50 <= len(written) < len(writer.ids) and written == writer.ids[: len(written)]
    record = server.last_record("recovery")
    assert [s["name"] for s in record["steps"]][3:5] == [f"recover to restore point {point['name']}", "compare with the gate"]


def test_bad_recovery_targets_are_refused_before_anything_is_restored(archiving):
    server = archiving
    _deploy(server)
    pitr = ("run", "recovery", "-p", "mode", "pitr", "-p", "confirm", "opslib")
    for args, code, said in (
        (("-p", "target_lsn", "0/zz"), 2, "target_lsn '0/zz' is not an LSN"),
        (("-p", "target_time", "yesterday"), 2, "target_time 'yesterday' is not a time"),
        (("-p", "target_time", "2026-13-45 10:00"), 2, "target_time '2026-13-45 10:00' is not a time"),
        (("-p", "restore_point", "opslib-nope"), 2, "no restore point 'opslib-nope' of database 'opslib'"),
        (("-p", "target_time", "2026-12-07 10:00:00+00", "-p", "target_lsn", "0/1"), 2, "takes one of"),
        (("-p", "apply", "new_database", "-p", "new_database", "opslib"), 3, "a database named 'opslib' exists already"),
    ):
        done = server.opslib(*pitr, *args)
        assert done.returncode == code, (args, done.stdout + done.stderr)
        assert said in done.stderr, (args, done.stderr)
    assert not any((server.home / "state" / "recovery").glob("*"))  # nothing was restored for any of them
    # A target the WAL never reaches: restored and replayed in the staging folder, then refused, nothing changed.
    beyond = server.opslib(*pitr, "-p", "target_lsn", "FFFF/FFFFFFFF")
    assert beyond.returncode == 3, beyond.stdout + beyond.stderr
    assert "the recovered server stopped before reaching LSN FFFF/FFFFFFFF" in beyond.stderr
    assert "the database was not touched" in beyond.stderr
    assert not any((server.home / "state" / "recovery").glob("*"))
    assert server.sql("SELECT version_num FROM alembic_version") == "0002"
    # A repository pgBackRest cannot read: said with its cause by the listing, and failed by the verification.
    repo = server.home / "state" / "pgbackrest" / "repo"
    repo.chmod(0o000)
    try:
        listed = server.opslib("backups", "--pgbackrest")
        assert listed.returncode == 1 and "Permission denied" in listed.stderr, listed.stdout + listed.stderr
        verified = server.opslib("verify-backup", "--pgbackrest")
        assert verified.returncode == 3, verified.stdout + verified.stderr
        assert "repository    FAIL    pgbackrest verify found errors" in verified.stdout
    finally:
        repo.chmod(0o750)


def test_a_killed_recovery_leaves_the_original_running_and_the_next_one_cleans_up(archiving):
    server = archiving
    _deploy(server)
    proc = subprocess.Popen(
        [OPSLIB, "run", "recovery", "-p", "mode", "pitr", "-p", "confirm", "opslib"],
        cwd=ROOT,
        env=server.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    staging = server.home / "state" / "recovery"
    deadline = time.monotonic() + 120
    while not any(staging.glob("*/pgdata")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the recovery ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the runner, its kernel and pgBackRest
    proc.wait()
    left = list(staging.glob("*"))
    assert left  # what it was doing is left behind...
    assert "running" in server.opslib("db", "status").stdout  # ...and the original runs, untouched
    assert server.sql("SELECT version_num FROM alembic_version") == "0002"
    assert server.sql("SELECT count(*) FROM orders") == "2000"
    again = server.opslib("run", "recovery", "-p", "mode", "pitr", "-p", "confirm", "opslib")
    assert again.returncode == 0, again.stdout + again.stderr
    assert not any(p.exists() for p in left)  # the next recovery stopped and removed the killed one's folder
    assert server.sql("SELECT count(*) FROM orders") == "3000"


def test_a_server_that_does_not_archive_is_refused_with_the_setting_to_change(tmp_path):
    home = Path(tempfile.mkdtemp(prefix="opslib-pitr-"))
    server = Server(home, SAMPLE_INI)  # the sample project has no policy: the server starts without archiving
    try:
        assert server.opslib("db", "start").returncode == 0
        assert server.opslib("upgrade", "0003").returncode == 0
        refused = server.opslib("run", "deploy", "-p", "backup_method", "pgbackrest")
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert "does not archive its WAL (archive_mode = off): opslib db start --archive" in refused.stderr
        assert server.sql("SELECT version_num FROM alembic_version") == "0003"  # nothing changed
        # A policy that falls back to a dump takes one, and the section says why.
        assert server.opslib("downgrade", "base").returncode == 0
        ini = _project(tmp_path)
        (ini.parent / "opslib.toml").write_text('[backup]\nmethod = "pgbackrest"\nfallback = "dump"\n')
        server.ini = ini
        assert server.opslib("upgrade", "0001").returncode == 0
        done = server.opslib("run", "deploy")
        assert done.returncode == 0, done.stdout + done.stderr
        record = server.last_record("deploy")
        assert record["backup"]["path"].endswith(".dump") and "restore_point" not in record["backup"]
        notebook = (home / "records" / record["notebook"]).read_text()
        assert "pgbackrest cannot work here (the server does not archive its WAL" in notebook
        assert "the policy falls back to a dump" in notebook
    finally:
        _stop_all(server)


def test_a_role_that_may_not_make_a_restore_point_is_refused_with_the_grant(archiving):
    server = archiving
    server.sql("CREATE ROLE deployer LOGIN")
    server.sql("CREATE DATABASE shop OWNER deployer")
    url = server.opslib("db", "url").stdout.strip().replace("postgres:@/opslib", "deployer@/shop")
    policy = server.ini.parent / "opslib.toml"  # the team's stanza, named: here the embedded server's own
    conf = server.home / "state" / "pgbackrest" / "pgbackrest.conf"
    policy.write_text(f'[backup]\nmethod = "pgbackrest"\nstanza = "embedded"\nconfig = "{conf}"\n')
    assert server.opslib("upgrade", "0001", DATABASE_URL=url).returncode == 0
    refused = server.opslib("run", "deploy", DATABASE_URL=url)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert (
        "role deployer may not make a restore point: GRANT EXECUTE ON FUNCTION pg_create_restore_point(text), "
        "pg_switch_wal() TO deployer"
    ) in refused.stderr
    assert server.sql("SELECT version_num FROM alembic_version", database="shop") == "0001"
