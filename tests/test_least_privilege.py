"""A least-privilege deploy role: one that OWNS the database (and so has CREATE on it) and nothing else.

Not superuser, no CREATEDB, no CREATEROLE, no pg_monitor, no pg_read_all_settings. Everything but the
embedded server's management must work for it: check, the deploy and rollback runbooks (preflight,
backup and its verification, the migrations, verify, the history and the ledger anchors), backup and
status, all through the real ``opslib`` command, and its password never appears anywhere.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import errors as pg_errors
from sqlalchemy.engine import URL

from opslib import db

from .conftest import ROOT, _admin, opslib_cli, query

PASSWORD = "S3cret%2F@:!x"
HEAD = "0007"


def _drop_role(admin, server_url: URL, role: str, database: str) -> None:
    """Drop the test database and the role, whatever state the test left them in."""
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        try:
            cur.execute(f'DROP ROLE IF EXISTS "{role}"')
            return
        except pg_errors.DependentObjectsStillExist:
            pass
        # The role owns something, or holds a grant, elsewhere: DROP OWNED works per database, so in each.
        cur.execute("SELECT datname FROM pg_database WHERE datallowconn")
        names = [r[0] for r in cur.fetchall()]
    for name in names:
        try:
            conn = _admin(server_url.set(database=name))
        except psycopg2.OperationalError:
            continue
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP OWNED BY "{role}" CASCADE')
        finally:
            conn.close()
    with admin.cursor() as cur:
        cur.execute(f'DROP ROLE IF EXISTS "{role}"')


@pytest.fixture
def deployer(server_url: URL, make_database) -> str:
    """The URL (with its password) of a new database owned by a new role that has no other privilege."""
    admin = _admin(server_url)
    role = f"deployer_{uuid.uuid4().hex[:10]}"
    try:
        with admin.cursor() as cur:
            try:
                cur.execute(
                    f'CREATE ROLE "{role}" LOGIN PASSWORD %s NOSUPERUSER NOCREATEDB NOCREATEROLE',
                    (PASSWORD,),
                )
            except pg_errors.InsufficientPrivilege as err:
                admin.close()
                pytest.skip(f"the test server's admin role cannot create roles: {str(err).strip()}")
        database = db.parse_url(make_database()).database
        try:
            with admin.cursor() as cur:
                cur.execute(f'ALTER DATABASE "{database}" OWNER TO "{role}"')
                cur.execute(
                    "SELECT r.rolsuper, r.rolcreatedb, r.rolcreaterole, "
                    "pg_has_role(r.oid, 'pg_read_all_settings', 'USAGE'), "
                    "pg_has_role(r.oid, 'pg_monitor', 'USAGE') "
                    "FROM pg_roles r WHERE r.rolname = %s",
                    (role,),
                )
                assert cur.fetchone() == (False, False, False, False, False)
            yield server_url.set(database=database, username=role, password=PASSWORD).render_as_string(
                hide_password=False
            )
        finally:
            _drop_role(admin, server_url, role, database)
    finally:
        admin.close()


def _leaks(done, folder: Path) -> list[str]:
    """Where the role's password (any recognisable part of it) shows: outputs, records, backup manifests."""
    found = [f"output of opslib {' '.join(done.args[1:])}"] if "S3cret" in done.stdout + done.stderr else []
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".ipynb", ".jsonl", ".txt", ".log", ".html"):
            if "S3cret" in path.read_text(errors="replace"):
                found.append(str(path.relative_to(folder)))
    return found


def _revision(url: str) -> list[str]:
    return [r[0] for r in query(url, "SELECT version_num FROM alembic_version")]


def test_a_role_that_only_owns_the_database_can_check_deploy_roll_back_and_back_up(deployer, tmp_path):
    work = tmp_path / "work"

    def opslib(*args: str):
        done = opslib_cli(deployer, ROOT / "alembic.ini", work, *args)
        said = f"{done.stdout}\n{done.stderr}"
        assert done.returncode == 0, f"opslib {' '.join(args)} exited {done.returncode}\n{said}"
        assert not _leaks(done, work), _leaks(done, work)
        return done

    # The role really cannot read what only pg_read_all_settings grants.
    with pytest.raises(Exception, match="pg_read_all_settings"):
        query(deployer, "SELECT current_setting('unix_socket_directories')")

    checked = opslib("check")
    assert re.search(r"database reachable +PASS +database opslib_test_\w+ on ", checked.stdout), checked.stdout
    deployed = opslib("run", "deploy")
    assert _revision(deployer) == [HEAD], deployed.stdout
    rolled_back = opslib("run", "rollback")
    assert _revision(deployer) == ["0006"], rolled_back.stdout
    backed_up = opslib("backup")
    status = opslib("status")
    assert "0006" in status.stdout

    records = sorted((work / "records").glob("*.json"))
    outcomes = [json.loads(p.read_text()).get("outcome") for p in records if not p.name.startswith("ledger")]
    assert outcomes.count("succeeded") == 2, outcomes
    assert list((work / "records").glob("*.ipynb")), "opslib run keeps the executed notebook"
    manifests = [p for p in (work / "backups").rglob("*.json") if not p.name.endswith(".verify.json")]
    assert len(manifests) >= 3, "the deploy's, the rollback's and opslib backup's"  # noqa: PLR2004
    assert backed_up.stdout.strip()
    # The history and the ledger anchors were written by the role, into the schema CREATE allowed it to make.
    owner = query(deployer, "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'opslib'")
    assert owner == [(db.parse_url(deployer).username,)]
    assert query(deployer, "SELECT count(*) FROM opslib.ledger_entries")[0][0] == 2  # noqa: PLR2004


def test_a_restore_test_the_role_cannot_run_refuses_the_deploy(deployer, tmp_path):
    """A deploy asked for a restore test needs a scratch database, which this role cannot create: the
    safeguard asked for cannot be given, so the deploy is refused (exit 3) before any change, saying why."""
    work = tmp_path / "work"
    done = opslib_cli(deployer, ROOT / "alembic.ini", work, "run", "deploy", "-p", "restore_test", "true")
    assert done.returncode == 3, done.stdout + done.stderr
    assert not _leaks(done, work), _leaks(done, work)
    assert "cannot create a scratch database" in done.stderr and "permission denied to create database" in done.stderr
    assert query(deployer, "SELECT to_regclass('alembic_version')") == [(None,)]  # nothing was migrated
    (record,) = [json.loads(p.read_text()) for p in (work / "records").glob("*.json")]
    assert record["outcome"] == "refused" and record["revisions_after"] == []


def test_the_fingerprint_reads_only_what_any_role_may_read(deployer, server_url):
    """Over TCP: host and port; over a Unix socket: its directory when the role may read it, else "a Unix
    socket" (never an error). The socket is tried when the server's socket directory is on this machine."""
    url = db.parse_url(deployer)
    with db.connect(url) as conn:
        shown = db.fingerprint(conn)
        assert not conn.in_transaction()
    if url.host:  # TCP (the embedded server is reached over its socket: the URL names no host)
        where = f"{url.host}:{url.port or 5432}"
        assert shown.startswith(f"database {url.database} on {where}, system identifier")
    else:
        assert shown.startswith(f"database {url.database} on a Unix socket (port ")
    admin = server_url.render_as_string(hide_password=False)
    ((setting, port),) = query(
        admin, "SELECT current_setting('unix_socket_directories'), current_setting('port')"
    )
    local = [d.strip() for d in setting.split(",") if d.strip().startswith("/") and Path(d.strip()).is_dir()]
    for directory in local[:1]:
        over_socket = {"host": None, "port": None, "query": {"host": directory, "port": port}}
        with db.connect(url.set(**over_socket)) as conn:
            seen = db.fingerprint(conn)
        assert seen == f"database {url.database} on a Unix socket (port {port}), {shown.split(', ', 1)[1]}"
        with db.connect(server_url.set(database=url.database, **over_socket)) as conn:
            assert f"on socket in {setting} (port {port})" in db.fingerprint(conn)  # a superuser sees where
