"""A project that keeps its revision in its own table and schema (tests/fixtures/own_version_table)."""

from __future__ import annotations

import json

from opslib import backup, migrate

from .conftest import opslib_cli, query, settings_for


def test_the_revision_is_read_where_the_project_keeps_it(database_url, project, tmp_path):
    ini = project("own_version_table")
    settings = settings_for(database_url, tmp_path, ini)
    assert migrate.version_table(settings) == ("app", "app_schema_version")
    assert migrate.upgrade(settings, "v001").after == ("v001",)
    assert query(database_url, "SELECT version_num FROM app.app_schema_version")[0][0] == "v001"
    assert query(database_url, "SELECT to_regclass('public.alembic_version') IS NULL")[0][0]
    assert migrate.status(settings).current == ("v001",)

    deploy = opslib_cli(database_url, ini, tmp_path / "work", "run", "deploy")
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    status = opslib_cli(database_url, ini, tmp_path / "work", "status", "--json")
    assert json.loads(status.stdout)["current"] == ["v002"]
    rollback = opslib_cli(database_url, ini, tmp_path / "work", "run", "rollback")
    assert rollback.returncode == 0, rollback.stdout + rollback.stderr
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "work" / "records").glob("*.json"))]
    assert [(r["runbook"], r["revisions_before"], r["revisions_after"]) for r in records] == [
        ("deploy", ["v001"], ["v002"]),
        ("rollback", ["v002"], ["v001"]),
    ]
    backups = sorted((tmp_path / "work" / "backups").glob("*.dump"))
    manifests = [backup.read_manifest(p) for p in backups]
    assert [m["revisions"] for m in manifests] == [["v001"], ["v002"]]
    assert manifests[0]["version_table"] == {"schema": "app", "table": "app_schema_version"}
    assert backup.verify_backup(settings, backups[-1], restore_test=True).ok  # read from the same table
