"""An Airflow 3 DAG file: the deploy runbook over a fleet of databases, with opslib.airflow.

Put it in your Airflow `dags` folder, in an environment with Airflow and opslib (`make airflow-venv` makes one:
Airflow, and opslib without its dependencies). The paths below come from the workers' environment, with the
defaults of a typical layout:

- OPSLIB_COMMAND: the `opslib` of the project's own environment (with its dependencies), which plans the fleet
  and runs each target;
- OPSLIB_FLEET_FILE: the fleet file (`fleet.toml`): each target's name, the environment variable that holds its
  URL (set it on the workers, e.g. from a secrets backend or an Airflow Variable exported as an environment
  variable; never a URL with a password in the file), its environment label and tags;
- OPSLIB_ALEMBIC_INI: the project's alembic.ini;
- OPSLIB_RECORDS_DIR: a records folder every worker shares (the runs' notebooks, sidecars and ledger), which
  `opslib audit verify` and `opslib audit report` read afterwards.
"""

import os

from opslib.airflow import fleet_dag

dag = fleet_dag(
    "opslib_fleet_deploy",
    "deploy",
    os.environ.get("OPSLIB_FLEET_FILE", "/srv/app/fleet.toml"),
    opslib=os.environ.get("OPSLIB_COMMAND", "/srv/app/.venv/bin/opslib"),
    alembic_ini=os.environ.get("OPSLIB_ALEMBIC_INI", "/srv/app/alembic.ini"),
    records_dir=os.environ.get("OPSLIB_RECORDS_DIR", "/shared/opslib-records"),
    parameters={"backup": os.environ.get("OPSLIB_FLEET_BACKUP", "true")},
    canary=1,  # one target first, alone; if it fails, nothing else starts
    wave=2,  # then waves of two targets
    parallel=2,  # at most two at once (max_active_tis_per_dag)
    halt_after=1,  # no wave starts after one failure (None: run every target)
)
