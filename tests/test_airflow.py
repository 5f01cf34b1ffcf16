"""The fleet on Apache Airflow 3 itself (not a mock): `airflow dags test` of a DAG made by opslib.airflow."""

from __future__ import annotations

import os
import sqlite3
import subprocess

from opslib import migrate

from .conftest import OPSLIB, ROOT, query, settings_for

AIRFLOW_VENV = ROOT / ".venv-airflow"

EXAMPLE = ROOT / "examples" / "airflow" / "fleet_deploy.py"


def test_airflow_runs_the_fleet_dag_with_its_canary_and_halt_rule(make_database, tmp_path):
    airflow = AIRFLOW_VENV / "bin" / "airflow"
    assert airflow.exists(), "Apache Airflow is not installed for this test: run `make airflow-venv` (make test does)"
    variables, lines = {}, []
    for i in range(1, 5):
        url = make_database()
        migrate.upgrade(settings_for(url, tmp_path), "0003")
        query(url, "INSERT INTO products (marketplace, shop_name, title, price) VALUES ('m', 's', 't', :p)",
              p="N/A" if i == 3 else "9.50")
        variables[f"AF_DB_{i}"] = url
        lines += ["[[targets]]", f'name = "t{i}"', f'url_env = "AF_DB_{i}"', ""]
    (tmp_path / "fleet.toml").write_text("\n".join(lines))
    dags, home, records = tmp_path / "dags", tmp_path / "airflow", tmp_path / "records"
    dags.mkdir()
    (dags / "fleet_deploy.py").write_text(EXAMPLE.read_text())  # the README's example DAG file, as it is
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL", "AIRFLOW"))}
    env.update(variables, AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(dags),
               AIRFLOW__CORE__LOAD_EXAMPLES="False", OPSLIB_COMMAND=OPSLIB, OPSLIB_FLEET_FILE=str(tmp_path / "fleet.toml"),
               OPSLIB_ALEMBIC_INI=str(ROOT / "alembic.ini"), OPSLIB_RECORDS_DIR=str(records), OPSLIB_FLEET_BACKUP="false")
    migrated = subprocess.run([str(airflow), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert migrated.returncode == 0, migrated.stdout[-2000:] + migrated.stderr[-2000:]
    done = subprocess.run([str(airflow), "dags", "test", "opslib_fleet_deploy"], env=env, capture_output=True, text=True,
                          timeout=600)
    log = done.stdout + done.stderr
    states = dict(
        ((task, index), state)
        for task, index, state in sqlite3.connect(home / "airflow.db").execute(
            "SELECT task_id, map_index, state FROM task_instance WHERE dag_id = 'opslib_fleet_deploy'"
        )
    )
    # The canary, then t2 and t3 together: t3 fails, the gate halts, and t4 never starts.
    assert states == {
        ("canary", 0): "success", ("gate_1", -1): "success", ("wave_1", 0): "success", ("wave_1", 1): "failed",
        ("gate_2", -1): "failed", ("wave_2", 0): "upstream_failed",
    }, log[-3000:]
    assert "t1: deploy succeeded (exit 0)" in log and "t3: deploy failed (exit 1)" in log
    assert "halted: 1 target(s) failed (halt after 1); not started: t4" in log
    for i, revision in ((1, "0007"), (2, "0007"), (3, "0003"), (4, "0003")):
        assert query(variables[f"AF_DB_{i}"], "SELECT version_num FROM alembic_version") == [(revision,)]
    verify = subprocess.run([OPSLIB, "audit", "verify"], env=env,
                            capture_output=True, text=True, cwd=tmp_path)
    assert verify.returncode == 0 and "3 run(s)" in verify.stdout, verify.stdout + verify.stderr


def test_a_bad_fleet_file_is_refused_when_the_dag_is_built(tmp_path):
    python = AIRFLOW_VENV / "bin" / "python"
    assert python.exists(), "run `make airflow-venv` (make test does)"
    (tmp_path / "fleet.toml").write_text('[[targets]]\nname = "a"\nurl_env = "AF_UNSET_VARIABLE_X"\n')
    code = ("from opslib.airflow import fleet_dag\n"
            f"fleet_dag('bad', 'deploy', {str(tmp_path / 'fleet.toml')!r}, opslib={OPSLIB!r})\n")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "AF_UNSET_VARIABLE_X is not set" in done.stderr
