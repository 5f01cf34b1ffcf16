"""An Airflow 3 DAG file: the deploy runbook over a fleet, with a person's approval after the canary.

The same fleet as `fleet_deploy.py` (and the same variables: OPSLIB_COMMAND, OPSLIB_FLEET_FILE,
OPSLIB_ALEMBIC_INI, OPSLIB_RECORDS_DIR), with an `approve` task between the canary and the first wave: Airflow's
human-in-the-loop ApprovalOperator. It waits in the UI's "Required Actions" (or for a PATCH of its HITL detail
through the REST API) showing the canary's outcome and the targets still to run. Approve: the waves run, and
each of their runs records who approved (OPSLIB_APPROVED_BY, OPSLIB_APPROVAL_REF). Reject, or no answer within
OPSLIB_APPROVAL_HOURS: the approval fails, no later wave starts, and the DAG run fails.

- OPSLIB_APPROVERS: who may answer, as a comma-separated list of user ids as Airflow's auth manager knows them
  (the user name with the simple auth manager, the numeric id with FAB); unset, any user allowed to act on the
  DAG may answer.
"""

import os
from datetime import timedelta

from opslib.airflow import fleet_dag

approvers = [name.strip() for name in os.environ.get("OPSLIB_APPROVERS", "").split(",") if name.strip()]

dag = fleet_dag(
    "opslib_fleet_deploy_approved",
    "deploy",
    os.environ.get("OPSLIB_FLEET_FILE", "/srv/app/fleet.toml"),
    opslib=os.environ.get("OPSLIB_COMMAND", "/srv/app/.venv/bin/opslib"),
    alembic_ini=os.environ.get("OPSLIB_ALEMBIC_INI", "/srv/app/alembic.ini"),
    records_dir=os.environ.get("OPSLIB_RECORDS_DIR", "/shared/opslib-records"),
    parameters={"backup": os.environ.get("OPSLIB_FLEET_BACKUP", "true")},
    canary=1,  # one target first, alone; if it fails, no one is asked and nothing else starts
    wave=2,
    parallel=2,
    halt_after=1,
    approval={
        "assigned_users": [{"id": name, "name": name} for name in approvers] or None,
        # No answer in time is a rejection (a timeout never approves: opslib.airflow refuses 'Approve' as
        # the default); the scheduler enforces it.
        "response_timeout": timedelta(hours=float(os.environ.get("OPSLIB_APPROVAL_HOURS", "4"))),
    },
)
