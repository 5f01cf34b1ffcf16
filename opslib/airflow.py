"""The fleet on Apache Airflow: a DAG factory (the ``airflow`` extra; Airflow 3).

A DAG file in the team's Airflow ``dags`` folder::

    from opslib.airflow import fleet_dag

    dag = fleet_dag(
        "deploy_tenants", "deploy", "/srv/app/fleet.toml",
        opslib="/srv/app/.venv/bin/opslib",            # the opslib the project is operated with
        alembic_ini="/srv/app/alembic.ini", records_dir="/shared/opslib-records",
        canary=1, wave=5, parallel=2, halt_after=1,
    )

The whole plan (canary, waves, each target's ``opslib`` command line, the halt rule's limit) comes from
``opslib fleet RUNBOOK --plan-json``, so the fleet file is read and checked, production targets confirmed and
command lines made by opslib itself; this module only executes the plan, with the halt rule of
:mod:`opslib.halt`, and needs only Airflow. The DAG has a mapped
task per wave (``canary``, ``wave_1``, …; dynamic task mapping, at most ``parallel`` at once through
``max_active_tis_per_dag``) and, before each wave after the first, a ``gate_N`` task that fails once the halt
rule is met (``halt_after`` failures, or a failed canary), so that the waves after it never start. Each target
task runs its command (``opslib run RUNBOOK --json -p database_url_env VAR --env LABEL …``): its log carries
opslib's one-line outcome,
its record goes to ``records_dir``, and the task fails when the run fails. The workers need each target's URL
variable in their environment (or ``env=``, a dict merged into it, e.g. from an Airflow Variable).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Mapping, Sequence

from opslib.halt import Failure, halt_reason
from opslib.outcome import Outcome, run_reply  # no dependency either: the exit codes of `opslib`

log = logging.getLogger(__name__)


def fleet_plan(opslib: str, runbook: str, fleet_file: str, *, canary: int, wave: int, parallel: int,
               halt_after: int | None, only: Sequence[str] = (), env: Mapping[str, str] | None = None,
               parameters: Mapping[str, str] | None = None, confirm_production: int | None = None) -> dict:
    """The fleet's whole plan as opslib makes it (``opslib fleet … --plan-json``); its refusal is a ValueError."""
    args = [opslib, "fleet", runbook, "--targets", fleet_file, "--canary", str(canary), "--wave", str(wave),
            "--parallel", str(parallel), "--plan-json"]
    args += ["--no-halt"] if halt_after is None else ["--halt-after", str(halt_after)]
    for selection in only:
        args += ["--only", selection]
    for name, value in (parameters or {}).items():
        args += ["-p", name, str(value)]
    if confirm_production is not None:
        args += ["--confirm-production", str(confirm_production)]
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != Outcome.SUCCEEDED.exit_code:
        raise ValueError(f"opslib refused the fleet {fleet_file}: {done.stderr.strip()}")
    return json.loads(done.stdout)


def _outcomes(ti, task_ids: Sequence[str]) -> list[dict]:
    """What the target tasks of ``task_ids`` pushed (a mapped task gives one per target that ran)."""
    found: list[dict] = []
    for task_id in task_ids:
        pulled = ti.xcom_pull(task_ids=task_id, key="outcome")
        if isinstance(pulled, dict):
            found.append(pulled)
        elif pulled is not None:
            found += [o for o in pulled if isinstance(o, dict)]
    return found


def fleet_dag(dag_id: str, runbook: str, fleet_file: str, *, opslib: str = "opslib", alembic_ini: str | None = None,
              records_dir: str | None = None, parameters: Mapping[str, str] | None = None, canary: int = 1,
              wave: int = 5, parallel: int = 2, halt_after: int | None = 1, only: Sequence[str] = (),
              env: Mapping[str, str] | None = None, confirm_production: int | None = None, **dag_kwargs):
    """An Airflow DAG running ``runbook`` over the fleet of ``fleet_file``: the canary, then the waves, with
    the halt rule between them (see the module's documentation). Production targets run only when
    ``confirm_production`` is their number, as ``opslib fleet --confirm-production N``."""
    from airflow.sdk import dag, task  # noqa: PLC0415 -- the optional extra: imported only to build a DAG
    from airflow.sdk.exceptions import AirflowFailException  # noqa: PLC0415

    extra = dict(env or {})
    if alembic_ini:
        extra["OPSLIB_ALEMBIC_INI"] = alembic_ini
    if records_dir:
        extra["OPSLIB_RECORDS_DIR"] = records_dir
    planned = fleet_plan(opslib, runbook, fleet_file, canary=canary, wave=wave, parallel=parallel,
                         halt_after=halt_after, only=only, env=extra, parameters=parameters,
                         confirm_production=confirm_production)

    @dag(dag_id=dag_id, schedule=None, catchup=False, max_active_tasks=parallel, **dag_kwargs)
    def build():
        @task(max_active_tis_per_dag=parallel)
        def run_target(target: dict, ti=None) -> dict:
            return _run_target(opslib, target, extra, ti, AirflowFailException)

        @task(trigger_rule="all_done")
        def gate(before: list, wave_index: int, not_yet: list, ti=None) -> None:
            failures = [Failure(o["target"], o["outcome"], o["wave"]) for o in _outcomes(ti, before) if o.get("exit_code")]
            why = halt_reason(failures, planned["halt_after"], bool(planned["canary"]))
            if why is not None:
                raise AirflowFailException(f"halted: {why}; not started: {', '.join(not_yet)}")
            log.info("gate %d: %d failure(s) so far: %s", wave_index, len(failures),
                     ", ".join(f.target for f in failures) or "none")

        done_ids: list[str] = []
        previous = None
        waves = planned["waves"]
        for i, targets in enumerate(waves):
            task_id = "canary" if i == 0 and planned["canary"] else f"wave_{i}"
            node = run_target.override(task_id=task_id).expand(target=[{**t, "wave": i} for t in targets])
            if previous is not None:
                later = [t["name"] for w in waves[i:] for t in w]
                check = gate.override(task_id=f"gate_{i}")(before=list(done_ids), wave_index=i, not_yet=later)
                previous >> check >> node
            done_ids.append(task_id)
            previous = node

    return build()


def _run_target(opslib: str, target: dict, extra: Mapping[str, str], ti, fail) -> dict:
    """One target's run: its command from the plan, its result read from ``--json``, pushed for the gates."""
    done = subprocess.run([opslib, *target["command"]], capture_output=True, text=True,
                          env={**os.environ, **extra, "OPSLIB_ENV": target["env"]})
    reply = run_reply(done.stdout, done.stderr, done.returncode)
    log.info("%s: %s", target["name"], reply.line)  # opslib's one-line outcome, in the task's log
    ok = done.returncode == Outcome.SUCCEEDED.exit_code
    outcome = {"target": target["name"], "wave": target["wave"], "exit_code": done.returncode, "line": reply.line,
               "outcome": reply.outcome, "run_id": (reply.result or {}).get("run_id")}
    ti.xcom_push(key="outcome", value=outcome)
    if not ok:
        raise fail(f"{target['name']}: {reply.line}")
    return outcome
