"""The guide's database initialization: make init-prod, seed-demo and db-setup, on real databases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from opslib import seed

from .conftest import ROOT, database_name, opslib_cli, query, schema_snapshot

PASSWORD = "Adm1n-Pw-never-in-records-7f3a"
ADMIN = {"OPSLIB_ADMIN_EMAIL": "admin@shop.example", "OPSLIB_ADMIN_PASSWORD": PASSWORD}


def make(work: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    """make, as a user runs it from the repository, with the records kept in ``work``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL", "MAKE"))}
    full.update(OPSLIB_RECORDS_DIR=str(work / "records"), OPSLIB_BACKUPS_DIR=str(work / "backups"), **env)
    return subprocess.run(["make", "-s", "-C", str(ROOT), *args], env=full, capture_output=True, text=True,
                          timeout=300)


def _every_file_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_db_setup_twice_on_an_empty_database_changes_nothing_the_second_time(database_url, tmp_path):
    env = {"DATABASE_URL": database_url, **ADMIN}
    first = make(tmp_path, "db-setup", "rows=2000", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "init-prod succeeded (exit 0)" in first.stdout
    assert "seed-demo: loaded 400 users, 2000 products" in first.stdout and "rows/s" in first.stdout
    snapshot = schema_snapshot(database_url)
    counts = query(
        database_url,
        "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM products), (SELECT count(*) FROM settings), "
        "(SELECT count(*) FROM cms_pages), (SELECT count(*) FROM email_templates), "
        "(SELECT string_agg(md5(t::text), '' ORDER BY id) FROM users t)",
    )
    assert counts[0][:5] == (401, 2000, 5, 4, 3)

    second = make(tmp_path, "db-setup", "rows=2000", env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "nothing to do: every essential is there already (nothing was changed)" in second.stdout
    assert "seed-demo: the demo data of seed 42 is in" in second.stdout and "nothing was changed" in second.stdout
    assert schema_snapshot(database_url) == snapshot
    assert query(database_url, "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM products), "
                 "(SELECT count(*) FROM settings), (SELECT count(*) FROM cms_pages), "
                 "(SELECT count(*) FROM email_templates), "
                 "(SELECT string_agg(md5(t::text), '' ORDER BY id) FROM users t)") == counts

    # The password is in no record, notebook or ledger; the database holds only its salted hash.
    records = _every_file_under(tmp_path / "records")
    assert len([p for p in records if p.suffix == ".ipynb"]) == 2
    for path in records:
        assert PASSWORD not in path.read_text(errors="replace"), path
    (stored,) = query(database_url, "SELECT hashed_password FROM users WHERE email = 'admin@shop.example'")[0]
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert seed.password_matches(stored, PASSWORD)
    assert not query(database_url, "SELECT 1 FROM users WHERE hashed_password LIKE :p", p=f"%{PASSWORD}%")
    sidecars = sorted(p for p in records if p.suffix == ".json" and "init-prod" in p.name)
    changes = [json.loads(p.read_text())["data_changes"] for p in sidecars]
    assert [c["created"] for c in changes[0]] == [1, 5, 4, 3]
    assert [c["created"] for c in changes[1]] == [0, 0, 0, 0] and [c["present"] for c in changes[1]] == [1, 5, 4, 3]


def test_the_same_seed_gives_the_same_rows_and_another_seed_adds_its_own(make_database, tmp_path):
    urls = [make_database(), make_database()]
    for url in urls:
        assert opslib_cli(url, ROOT / "alembic.ini", tmp_path, "upgrade", "head").returncode == 0
        done = opslib_cli(url, ROOT / "alembic.ini", tmp_path, "seed-demo", "--rows", "500", "--seed", "7")
        assert done.returncode == 0, done.stderr
    same = "SELECT string_agg(concat_ws('|', marketplace, shop_name, title, price, normalized_price), ',' ORDER BY id) FROM products"
    assert query(urls[0], same) == query(urls[1], same)
    other = opslib_cli(urls[0], ROOT / "alembic.ini", tmp_path, "seed-demo", "--rows", "500", "--seed", "8", "--json")
    assert json.loads(other.stdout)["rows"] == {"users": 100, "products": 500}
    assert query(urls[0], "SELECT count(*) FROM products")[0][0] == 1000
    prices = query(urls[0], "SELECT count(*) FROM products WHERE price !~ '^[0-9]+(\\.[0-9]+)?$'")[0][0]
    assert prices == 0  # the guide's text form, which its normalized_price migration converts


def test_seed_demo_is_refused_in_production_and_bad_input_changes_nothing(database_url, tmp_path):
    assert opslib_cli(database_url, ROOT / "alembic.ini", tmp_path, "upgrade", "head").returncode == 0
    before = query(database_url, "SELECT count(*) FROM users")
    refused = opslib_cli(database_url, ROOT / "alembic.ini", tmp_path, "seed-demo",
                         env={"OPSLIB_ENV": "production"})
    assert refused.returncode == 3
    assert refused.stderr.strip() == "opslib: seed-demo is refused in production: demo data never goes there"
    for bad in (["--rows", "0"], ["--rows", "many"]):
        done = opslib_cli(database_url, ROOT / "alembic.ini", tmp_path, "seed-demo", *bad)
        assert done.returncode == 2, (bad, done.stderr)
        assert len(done.stderr.strip().splitlines()) <= 2
    assert query(database_url, "SELECT count(*) FROM users") == before


def test_seed_demo_before_the_schema_loads_nothing_and_says_what_to_do(database_url, tmp_path):
    done = opslib_cli(database_url, ROOT / "alembic.ini", tmp_path, "seed-demo")
    assert done.returncode == 3
    assert "loaded nothing" in done.stderr and "init-prod" in done.stderr


@pytest.mark.parametrize("missing", ["OPSLIB_ADMIN_EMAIL", "OPSLIB_ADMIN_PASSWORD"])
def test_init_prod_without_an_admin_variable_is_exit_2_and_touches_nothing(database_url, tmp_path, missing):
    env = {k: v for k, v in ADMIN.items() if k != missing}
    done = opslib_cli(database_url, ROOT / "alembic.ini", tmp_path, "init-prod", env=env)
    assert done.returncode == 2
    assert f"in the environment variable {missing}" in done.stderr
    assert query(database_url, "SELECT to_regclass('public.alembic_version')")[0][0] is None
    (sidecar,) = (tmp_path / "records").glob("*.json")
    assert json.loads(sidecar.read_text())["outcome"] == "invalid"


def test_a_short_admin_password_is_refused_without_showing_it(database_url, tmp_path):
    done = opslib_cli(database_url, ROOT / "alembic.ini", tmp_path, "init-prod",
                      env={**ADMIN, "OPSLIB_ADMIN_PASSWORD": "hunter2"})
    assert done.returncode == 2 and "shorter than 12 characters" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout
    assert not [p for p in _every_file_under(tmp_path / "records") if "hunter2" in p.read_text(errors="replace")]


def test_init_prod_refuses_a_database_with_pending_revisions_and_keeps_an_existing_admin(database_url, tmp_path):
    assert opslib_cli(database_url, ROOT / "alembic.ini", tmp_path, "upgrade", "0005").returncode == 0
    refused = opslib_cli(database_url, ROOT / "alembic.ini", tmp_path, "init-prod", env=ADMIN)
    assert refused.returncode == 3 and "deploy them first" in refused.stderr
    assert query(database_url, "SELECT version_num FROM alembic_version") == [("0005",)]
    assert opslib_cli(database_url, ROOT / "alembic.ini", tmp_path, "upgrade", "head").returncode == 0
    query(database_url, "INSERT INTO users (email, username, hashed_password, is_admin) "
                        "VALUES ('admin@shop.example', 'root', '$argon2id$kept', true)")
    query(database_url, "INSERT INTO settings (key, value) VALUES ('site_name', 'Edited by hand')")
    done = opslib_cli(database_url, ROOT / "alembic.ini", tmp_path, "init-prod", env=ADMIN)
    assert done.returncode == 0, done.stderr
    assert query(database_url, "SELECT hashed_password FROM users") == [("$argon2id$kept",)]
    assert query(database_url, "SELECT value FROM settings WHERE key = 'site_name'") == [("Edited by hand",)]
    assert query(database_url, "SELECT count(*) FROM settings")[0][0] == 5


def test_init_prod_on_a_project_without_essentials_is_a_configuration_error(database_url, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(ROOT / "migrations", project / "migrations", ignore=shutil.ignore_patterns("__pycache__",
                                                                                                 "essentials.toml"))
    shutil.copy(ROOT / "alembic.ini", project / "alembic.ini")
    done = opslib_cli(database_url, project / "alembic.ini", project, "init-prod", env=ADMIN)
    assert done.returncode == 2 and "init-prod needs" in done.stderr and "essentials.toml" in done.stderr
    assert query(database_url, "SELECT to_regclass('public.alembic_version')")[0][0] is None


def test_dev_data_reaches_the_deploy_and_is_refused_in_production(database_url, tmp_path):
    done = opslib_cli(database_url, ROOT / "alembic.ini", tmp_path, "run", "deploy", "-p", "dev_data", "true",
                      "-p", "backup", "false")
    assert done.returncode == 0, done.stderr
    assert query(database_url, "SELECT count(*) FROM users")[0][0] == 2  # the sample rows of -x dev_data=true
    other = opslib_cli(database_url, ROOT / "alembic.ini", tmp_path, "run", "deploy", "--env", "production",
                       "-p", "dev_data", "true", "-p", "confirm", database_name(database_url))
    assert other.returncode == 3 and "dev_data=True is refused in production" in other.stderr
