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

With ``approval=`` (``True``, or a dict of options of the standard provider's ``ApprovalOperator``), a person
approves the waves after the canary: an ``approve`` task (Airflow's human-in-the-loop, answered in the UI's
Required Actions or through the REST API) sits after ``gate_1``, so no one is asked about a canary the halt
rule has already stopped; its body names the runbook, the fleet file, the canary's outcome lines and the
targets still to run. Without a canary, or with no wave after it, it sits before the first wave: the approver
approves the whole plan. A rejection (or no answer before ``response_timeout``) fails it, so the later waves
end ``upstream_failed`` and never start, the later gates fail too, and the DAG run fails. Each target run after
it is given its approver as opslib records them: ``OPSLIB_APPROVED_BY`` (the responder's name as Airflow
recorded it, else the id) and ``OPSLIB_APPROVAL_REF`` (``airflow DAG_ID/RUN_ID/approve``).
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

APPROVAL_TASK = "approve"
APPROVE = "Approve"  # ApprovalOperator.APPROVE: the option a person chose to approve
APPROVAL_VARIABLES = ("OPSLIB_APPROVED_BY", "OPSLIB_APPROVAL_REF")  # what opslib records as an outside approval


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
              env: Mapping[str, str] | None = None, confirm_production: int | None = None,
              approval: bool | Mapping | None = None, **dag_kwargs):
    """An Airflow DAG running ``runbook`` over the fleet of ``fleet_file``: the canary, then the waves, with
    the halt rule between them (see the module's documentation). Production targets run only when
    ``confirm_production`` is their number, as ``opslib fleet --confirm-production N``. With ``approval``
    (``True``, or ``ApprovalOperator`` options: ``subject``, ``body`` put before the plan's, ``assigned_users``,
    ``response_timeout``, ``notifiers``, …), a person approves the waves after the canary."""
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
        # multiple_outputs=False: Airflow infers True from "-> dict" and then pushes each key of the result as
        # an XCom of its own, so the key "outcome" would become the outcome's word ("succeeded") instead of
        # the dict pushed under it, which the gates and the approval read.
        @task(max_active_tis_per_dag=parallel, multiple_outputs=False)
        def run_target(target: dict, ti=None) -> dict:
            return _run_target(opslib, target, extra, ti, AirflowFailException)

        @task(max_active_tis_per_dag=parallel, multiple_outputs=False)
        def run_approved_target(target: dict, response: dict, ti=None) -> dict:
            approved = _approval_env(response, ti, AirflowFailException)
            log.info("%s: approved by %s (%s)", target["name"], *approved.values())
            return _run_target(opslib, target, extra, ti, AirflowFailException, approved)

        @task(trigger_rule="all_done")
        def gate(before: list, wave_index: int, not_yet: list, approval_task: str | None = None, ti=None) -> None:
            # all_done: a gate runs whatever became of the wave before it, so every gate sees every failure
            # so far, and one after the approval sees whether it was given (its XCom is there only then).
            failures = [Failure(o["target"], o["outcome"], o["wave"]) for o in _outcomes(ti, before) if o.get("exit_code")]
            why = halt_reason(failures, planned["halt_after"], bool(planned["canary"]))
            if why is None and approval_task and _approver(ti.xcom_pull(task_ids=approval_task)) is None:
                why = f"the waves were not approved ({approval_task} rejected, timed out or did not run)"
            if why is not None:
                raise AirflowFailException(f"halted: {why}; not started: {', '.join(not_yet)}")
            log.info("gate %d: %d failure(s) so far: %s", wave_index, len(failures),
                     ", ".join(f.target for f in failures) or "none")

        _wire_waves(planned, run_target, run_approved_target, gate,
                    approval=approval, dag_id=dag_id, runbook=runbook, fleet_file=fleet_file)

    return build()


def _wire_waves(planned: dict, run_target, run_approved_target, gate, *, approval, dag_id: str, runbook: str,
                fleet_file: str) -> None:
    """Lay out the plan's waves in the DAG being built: each wave a mapped task of ``run_target``, a ``gate`` before
    each wave after the first, and, with ``approval``, the ``approve`` task before the wave it guards, every wave
    after it a mapped task of ``run_approved_target`` that takes the approval's answer."""
    waves = planned["waves"]
    ids = [_wave_task_id(planned, i) for i in range(len(waves))]
    at = _approval_wave(planned) if approval not in (None, False) else None
    done_ids: list[str] = []
    previous = approve = None
    for i, targets in enumerate(waves):
        task_id = ids[i]
        later = [t["name"] for w in waves[i:] for t in w]
        check = None
        if previous is not None:
            check = gate.override(task_id=f"gate_{i}")(
                before=list(done_ids), wave_index=i, not_yet=later,
                approval_task=APPROVAL_TASK if approve is not None else None)
            previous >> check
        if i == at:
            plan = [(ids[k], [t["name"] for t in waves[k]]) for k in range(i, len(waves))]
            approve = _approval_task(approval, dag_id, runbook, fleet_file, done_ids, plan)
            if check is not None:
                check >> approve
            check = approve
        mapped = [{**t, "wave": i} for t in targets]
        if approve is None:
            node = run_target.override(task_id=task_id).expand(target=mapped)
        else:
            # The approval's XCom as an argument: Airflow makes every later wave depend on the approval
            # itself too, so that a failed approval stops each of them, whatever its gate does.
            node = run_approved_target.override(task_id=task_id).partial(response=approve.output).expand(
                target=mapped)
        if check is not None:
            check >> node
        done_ids.append(task_id)
        previous = node


def _wave_task_id(planned: dict, index: int) -> str:
    """The task of wave ``index``: ``canary`` for the canary's, else ``wave_N``."""
    return "canary" if index == 0 and planned["canary"] else f"wave_{index}"


def _approval_wave(planned: dict) -> int | None:
    """The wave the approval comes before: the first after the canary, or the first of all when there is no
    canary or nothing after it (then the plan is approved as a whole); None for a plan with no wave."""
    waves = planned["waves"]
    if not waves:
        return None
    return 1 if planned["canary"] and len(waves) > 1 else 0


def _approval_task(approval: bool | Mapping, dag_id: str, runbook: str, fleet_file: str, before: Sequence[str],
                   plan: Sequence[tuple[str, list[str]]]):
    """The ``approve`` task: Airflow's ``ApprovalOperator``, asking about the waves of ``plan`` (each task and
    its targets) with what the approver needs to know (its body is rendered when it runs, with the outcome
    lines of the tasks ``before``)."""
    from airflow.providers.standard.operators.hitl import ApprovalOperator  # noqa: PLC0415 -- as in fleet_dag

    options = dict(approval) if isinstance(approval, Mapping) else {}
    for fixed in ("task_id", "fail_on_reject", "options", "multiple"):
        if fixed in options:
            raise ValueError(f"approval: {fixed} is set by opslib.airflow")
    if APPROVE in (options.get("defaults") or ()):
        # The timeout's default would pass the waves with no one's approval (Airflow records no responder).
        raise ValueError("approval: 'Approve' cannot be the default; a timeout must not approve the waves")
    names = [name for _, targets in plan for name in targets]
    subject = options.pop("subject", None) or _literal(
        f"{dag_id}: approve {runbook} on {len(names)} more target(s)?" if before
        else f"{dag_id}: approve {runbook} on {len(names)} target(s)?")
    body = "\n\n".join(filter(None, [options.pop("body", None),
                                       _approval_body(runbook, fleet_file, before, plan)]))
    # fail_on_reject: a rejected deploy is a failed run, like a halted one (the provider's default, a
    # success that skips only the next task, would leave the gates after it to start later waves);
    # retries=0: a retry would put the question again, to no one who asked for it.
    return ApprovalOperator(task_id=APPROVAL_TASK, subject=subject, body=body, fail_on_reject=True,
                            **{"retries": 0, **options})


def _approval_body(runbook: str, fleet_file: str, before: Sequence[str],
                   plan: Sequence[tuple[str, list[str]]]) -> str:
    """What is approved, in Markdown, as a Jinja template: the plan literally, the outcome lines of the tasks
    ``before`` (the canary) pulled from their XCom when the ``approve`` task runs."""
    head = _literal(f"Runbook **{runbook}** over the fleet of `{fleet_file}`.")
    if before:
        # A list, task_ids being one (were Airflow to give a lone value as itself, it is taken as one item).
        outcomes = ("**The canary:**\n{% set found = ti.xcom_pull(task_ids=" + json.dumps(list(before))
                    + ", key='outcome') %}{% for o in ([found] if found is mapping else found or []) if o %}"
                    "\n- {{ o.target }}: {{ o.line }}{% endfor %}")
    else:
        outcomes = "No canary runs before this approval: approving starts the whole fleet."
    waves = "\n".join(f"- {task_id}: {', '.join(names)}" for task_id, names in plan)
    then = _literal(f"**Approving starts:**\n\n{waves}\n\nRejecting (or no answer before the approval's timeout, "
                    "if it has one) stops the fleet here: none of them runs.")
    return "\n\n".join([head, outcomes, then])


def _literal(text: str) -> str:
    """``text`` as a Jinja template that renders it unchanged (a file name or target name may hold ``{{``)."""
    return "{% raw %}" + text + "{% endraw %}"


def _approver(response) -> str | None:
    """Who approved, as Airflow recorded the ``approve`` task's response (its XCom: the user's name, else the
    id); None when it is not an approval a person gave."""
    if not isinstance(response, Mapping) or list(response.get("chosen_options") or ()) != [APPROVE]:
        return None
    user = response.get("responded_by_user") or {}
    return user.get("name") or user.get("id") or None


def _approval_env(response, ti, fail) -> dict[str, str]:
    """The variables that carry the approval into a target's run, for opslib to record it."""
    approver = _approver(response)
    if approver is None:  # a wave after the approval runs only approved (its task depends on it): never here
        raise fail(f"no approver recorded by {APPROVAL_TASK}: {response!r}")
    where = f"airflow {ti.dag_id}/{ti.run_id}/{APPROVAL_TASK}"  # the task instance whose HITL detail holds it
    return {"OPSLIB_APPROVED_BY": approver, "OPSLIB_APPROVAL_REF": where}


def _run_target(opslib: str, target: dict, extra: Mapping[str, str], ti, fail,
                approved: Mapping[str, str] | None = None) -> dict:
    """One target's run: its command from the plan, its result read from ``--json``, pushed for the gates;
    ``approved``, the approval's variables, when it runs after one."""
    # An approval reaches a run only from this DAG run's approve task: never from the worker's environment
    # or env=, where a leftover would be recorded as someone's approval of a run no one approved.
    env = {k: v for k, v in {**os.environ, **extra}.items() if k not in APPROVAL_VARIABLES}
    done = subprocess.run([opslib, *target["command"]], capture_output=True, text=True,
                          env={**env, **(approved or {}), "OPSLIB_ENV": target["env"]})
    reply = run_reply(done.stdout, done.stderr, done.returncode)
    log.info("%s: %s", target["name"], reply.line)  # opslib's one-line outcome, in the task's log
    ok = done.returncode == Outcome.SUCCEEDED.exit_code
    outcome = {"target": target["name"], "wave": target["wave"], "exit_code": done.returncode, "line": reply.line,
               "outcome": reply.outcome, "run_id": (reply.result or {}).get("run_id")}
    ti.xcom_push(key="outcome", value=outcome)
    if not ok:
        raise fail(f"{target['name']}: {reply.line}")
    return outcome
