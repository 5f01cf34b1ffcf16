"""The fleet on Apache Airflow 3 itself (not a mock): `airflow dags test` of a DAG made by opslib.airflow; the
approval gate answered through Airflow's own REST API (an `airflow api-server` on the same metadata database)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from opslib import migrate

from .conftest import OPSLIB, ROOT, database_name, query, settings_for

AIRFLOW_VENV = ROOT / ".venv-airflow"
AIRFLOW = AIRFLOW_VENV / "bin" / "airflow"

EXAMPLE = ROOT / "examples" / "airflow" / "fleet_deploy.py"
APPROVED_EXAMPLE = ROOT / "examples" / "airflow" / "fleet_deploy_approved.py"
APPROVED_DAG = "opslib_fleet_deploy_approved"

# The API server's users (simple auth manager) and their passwords: alice is the DAG's approver, mallory is
# an admin who is not.
USERS = {"alice": "alice-pw-7f3e", "mallory": "mallory-pw-2c9a"}


def _fleet(make_database, tmp_path: Path, failing: int | None = None) -> dict[str, str]:
    """Four databases at 0003 (target ``failing``'s row makes the deploy fail) and their fleet file; their
    URL variables."""
    variables, lines = {}, []
    for i in range(1, 5):
        url = make_database()
        migrate.upgrade(settings_for(url, tmp_path), "0003")
        query(url, "INSERT INTO products (marketplace, shop_name, title, price) VALUES ('m', 's', 't', :p)",
              p="N/A" if i == failing else "9.50")
        variables[f"AF_DB_{i}"] = url
        lines += ["[[targets]]", f'name = "t{i}"', f'url_env = "AF_DB_{i}"', ""]
    (tmp_path / "fleet.toml").write_text("\n".join(lines))
    return variables


def _airflow_home(tmp_path: Path, example: Path, variables: dict[str, str], opslib: str = OPSLIB, **extra) -> dict:
    """A throwaway Airflow (SQLite in ``tmp_path/airflow``) whose dags folder holds ``example`` as it is; its
    environment, after `airflow db migrate`."""
    assert AIRFLOW.exists(), "Apache Airflow is not installed for this test: run `make airflow-venv` (make test does)"
    dags, home, records = tmp_path / "dags", tmp_path / "airflow", tmp_path / "records"
    dags.mkdir()
    (dags / example.name).write_text(example.read_text())  # the README's example DAG file, as it is
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL", "AIRFLOW"))}
    env.update(variables, AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(dags),
               AIRFLOW__CORE__LOAD_EXAMPLES="False", OPSLIB_COMMAND=opslib, OPSLIB_FLEET_FILE=str(tmp_path / "fleet.toml"),
               OPSLIB_ALEMBIC_INI=str(ROOT / "alembic.ini"), OPSLIB_RECORDS_DIR=str(records), OPSLIB_FLEET_BACKUP="false",
               **extra)
    migrated = subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert migrated.returncode == 0, migrated.stdout[-2000:] + migrated.stderr[-2000:]
    return env


def _states(env: dict, dag_id: str) -> dict:
    """Each task instance's state in the metadata database, by (task, map index)."""
    with contextlib.closing(sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db")) as db:
        rows = db.execute("SELECT task_id, map_index, state FROM task_instance WHERE dag_id = ?", (dag_id,))
        return {(task, index): state for task, index, state in rows}


def test_airflow_runs_the_fleet_dag_with_its_canary_and_halt_rule(make_database, tmp_path):
    variables = _fleet(make_database, tmp_path, failing=3)
    env = _airflow_home(tmp_path, EXAMPLE, variables)
    done = subprocess.run([str(AIRFLOW), "dags", "test", "opslib_fleet_deploy"], env=env, capture_output=True, text=True,
                          timeout=600)
    log = done.stdout + done.stderr
    states = _states(env, "opslib_fleet_deploy")
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


def _recording_opslib(tmp_path: Path) -> tuple[str, Path]:
    """An ``opslib`` that notes each run's arguments and approval variables (one line each) before it runs the
    real one: what each target's command was given, whatever opslib makes of it."""
    calls, script = tmp_path / "opslib-calls.txt", tmp_path / "opslib"
    script.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = run ] && printf \'%s\\t%s\\t%s\\n\' "$*" "${{OPSLIB_APPROVED_BY-}}" "${{OPSLIB_APPROVAL_REF-}}" >> {calls}\n'
        f'exec {OPSLIB} "$@"\n'
    )
    script.chmod(0o755)
    return str(script), calls


def _runs_given(calls: Path) -> dict[str, tuple[str, str]]:
    """Each target run the recording opslib saw (by target: AF_DB_N is tN's URL variable): its approver and
    approval reference, empty when it was given none."""
    given = {}
    for line in calls.read_text().splitlines() if calls.exists() else []:
        args, approver, ref = line.split("\t")
        target = next(f"t{i}" for i in range(1, 5) if f"AF_DB_{i}" in args.split())
        given[target] = (approver, ref)
    return given


def _approval_home(make_database, tmp_path: Path) -> tuple[dict, Path]:
    """The approved example's Airflow over four good databases, its API server's users (simple auth manager,
    alice the DAG's only approver); its environment and the recording opslib's calls."""
    variables = _fleet(make_database, tmp_path)
    opslib, calls = _recording_opslib(tmp_path)
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps(USERS))  # the simple auth manager generates none for a user listed here
    env = _airflow_home(
        tmp_path, APPROVED_EXAMPLE, variables, opslib=opslib, OPSLIB_APPROVERS="alice",
        OPSLIB_APPROVED_BY="a-leftover",  # on the workers: never given to a run as its approver
        AIRFLOW__CORE__AUTH_MANAGER="airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=",".join(f"{name}:admin" for name in USERS),
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(passwords),
        # One secret for the tokens the API server signs and checks (else each process makes its own).
        AIRFLOW__API_AUTH__JWT_SECRET=os.urandom(16).hex(),
    )
    return env, calls


@contextlib.contextmanager
def _api_server(env: dict, folder: Path, timeout: float = 120):
    """`airflow api-server` (the REST API only) on a free port of 127.0.0.1, on the same metadata database;
    its base URL once it answers. Stopped (its process group) afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    with open(folder / "api-server.log", "w") as out:
        server = subprocess.Popen([str(AIRFLOW), "api-server", "--apps", "core", "--host", "127.0.0.1", "--port",
                                   str(port), "--workers", "1"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while _api(base, "GET", "/api/v2/monitor/health")[0] != 200:
            assert server.poll() is None, (folder / "api-server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the API server did not answer in time"
            time.sleep(0.5)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def _api(base: str, method: str, path: str, token: str | None = None, body: dict | None = None) -> tuple[int, object]:
    """One call of Airflow's REST API: its HTTP status and its JSON (None when it is not JSON, or no answer)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(base + path, method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            status, text = answer.status, answer.read()
    except urllib.error.HTTPError as refused:
        status, text = refused.code, refused.read()
    except OSError:  # not listening yet
        return 0, None
    try:
        return status, json.loads(text or b"null")
    except ValueError:
        return status, None


def _token(base: str, user: str) -> str:
    """A token of the API server for ``user`` (the simple auth manager's login)."""
    status, answer = _api(base, "POST", "/auth/token", body={"username": user, "password": USERS[user]})
    assert status == 201, (status, answer)
    return answer["access_token"]


def _awaited_approval(base: str, token: str, dags_test: subprocess.Popen, output: Path, timeout: float = 240) -> dict:
    """The ``approve`` task's request once `airflow dags test` waits for it (its HITL detail, from the API).

    Answered only then: `dags test` sets the task's state from its own run of it after the task parks, so an
    answer given between the park and that would be overwritten (a real scheduler has no such window)."""
    deadline = time.monotonic() + timeout
    while "Waiting for Human-in-the-loop input" not in output.read_text():
        assert dags_test.poll() is None, "airflow dags test ended before asking: " + output.read_text()[-3000:]
        assert time.monotonic() < deadline, "no approval asked in time: " + output.read_text()[-3000:]
        time.sleep(0.5)
    status, found = _api(base, "GET", f"/api/v2/dags/{APPROVED_DAG}/dagRuns/~/hitlDetails?response_received=false",
                         token)
    assert status == 200 and found["total_entries"] == 1, (status, found)
    return found["hitl_details"][0]


def _answer(base: str, token: str, request: dict, option: str) -> tuple[int, object]:
    """PATCH the request's HITL detail with ``option``: what the UI's Required Actions page does."""
    ti = request["task_instance"]
    path = (f"/api/v2/dags/{ti['dag_id']}/dagRuns/{urllib.parse.quote(ti['dag_run_id'], safe='')}"
            f"/taskInstances/{ti['task_id']}/{ti['map_index']}/hitlDetails")
    return _api(base, "PATCH", path, token, {"chosen_options": [option]})


def _fleet_with_an_answer(env: dict, tmp_path: Path, answer: str, timeout: float = 300) -> tuple[dict, str, str]:
    """`airflow dags test` of the approved example, its approval answered ``answer`` by alice through the REST
    API (after mallory, an admin not assigned, is refused); the request and `dags test`'s output and run id."""
    output = tmp_path / "dags-test.log"
    with _api_server(env, tmp_path) as base, open(output, "w") as out:
        dags_test = subprocess.Popen([str(AIRFLOW), "dags", "test", APPROVED_DAG], env=env, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            request = _awaited_approval(base, _token(base, "alice"), dags_test, output)
            refused = _answer(base, _token(base, "mallory"), request, "Approve")
            assert refused[0] == 403, refused  # not an assigned user: the request stays open
            status, answered = _answer(base, _token(base, "alice"), request, answer)
            assert status == 200 and answered["responded_by"] == {"id": "alice", "name": "alice"}, answered
            dags_test.wait(timeout=timeout)
        finally:
            if dags_test.poll() is None:
                os.killpg(dags_test.pid, signal.SIGKILL)
                dags_test.wait(timeout=30)
    return request, output.read_text(), request["task_instance"]["dag_run_id"]


def test_an_approval_after_the_canary_lets_the_waves_run_and_each_run_is_given_its_approver(make_database, tmp_path):
    env, calls = _approval_home(make_database, tmp_path)
    request, log, run_id = _fleet_with_an_answer(env, tmp_path, "Approve")
    # The approver was told what they approve: the canary's outcome, and the waves still to run.
    assert request["subject"] == f"{APPROVED_DAG}: approve deploy on 3 more target(s)?", request
    body = request["body"]
    assert "t1: deploy succeeded (exit 0)" in body and "- wave_1: t2, t3\n- wave_2: t4" in body, body
    assert str(tmp_path / "fleet.toml") in body and request["assigned_users"] == [{"id": "alice", "name": "alice"}]
    assert _states(env, APPROVED_DAG) == {
        ("canary", 0): "success", ("gate_1", -1): "success", ("approve", -1): "success",
        ("wave_1", 0): "success", ("wave_1", 1): "success", ("gate_2", -1): "success", ("wave_2", 0): "success",
    }, log[-3000:]
    for i in range(1, 5):
        assert query(env[f"AF_DB_{i}"], "SELECT version_num FROM alembic_version") == [("0007",)]
    # The canary ran before anyone approved; every later run was given who did, and where it is kept.
    ref = f"airflow {APPROVED_DAG}/{run_id}/approve"
    assert _runs_given(calls) == {"t1": ("", ""), "t2": ("alice", ref), "t3": ("alice", ref), "t4": ("alice", ref)}
    assert f"t4: approved by alice ({ref})" in log
    # And opslib recorded it: each later run's sidecar holds the approval, the canary's none.
    approvals = {}
    for sidecar in (tmp_path / "records").glob("*.json"):
        record = json.loads(sidecar.read_text())
        approvals[record["database"]["name"]] = record.get("approvals")
    names = {f"t{i}": database_name(env[f"AF_DB_{i}"]) for i in range(1, 5)}
    assert approvals[names["t1"]] is None, approvals
    for target in ("t2", "t3", "t4"):
        assert approvals[names[target]] == [{"principal": "alice", "source": "airflow", "ref": ref}], approvals
    verify = subprocess.run([OPSLIB, "audit", "verify"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert verify.returncode == 0 and "4 run(s)" in verify.stdout, verify.stdout + verify.stderr


def test_a_rejection_after_the_canary_stops_the_fleet_and_fails_the_dag_run(make_database, tmp_path):
    env, calls = _approval_home(make_database, tmp_path)
    _, log, run_id = _fleet_with_an_answer(env, tmp_path, "Reject")
    # The approval fails, so no later wave starts; the later gate says why.
    assert _states(env, APPROVED_DAG) == {
        ("canary", 0): "success", ("gate_1", -1): "success", ("approve", -1): "failed",
        ("wave_1", 0): "upstream_failed", ("wave_1", 1): "upstream_failed", ("gate_2", -1): "failed",
        ("wave_2", 0): "upstream_failed",
    }, log[-3000:]
    assert "halted: the waves were not approved (approve rejected, timed out or did not run); not started: t4" in log
    with contextlib.closing(sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db")) as db:
        assert db.execute("SELECT state FROM dag_run WHERE run_id = ?", (run_id,)).fetchall() == [("failed",)]
    for i, revision in ((1, "0007"), (2, "0003"), (3, "0003"), (4, "0003")):
        assert query(env[f"AF_DB_{i}"], "SELECT version_num FROM alembic_version") == [(revision,)]
    assert _runs_given(calls) == {"t1": ("", "")}  # only the canary's command ever ran


def test_a_bad_fleet_file_is_refused_when_the_dag_is_built(tmp_path):
    python = AIRFLOW_VENV / "bin" / "python"
    assert python.exists(), "run `make airflow-venv` (make test does)"
    (tmp_path / "fleet.toml").write_text('[[targets]]\nname = "a"\nurl_env = "AF_UNSET_VARIABLE_X"\n')
    code = ("from opslib.airflow import fleet_dag\n"
            f"fleet_dag('bad', 'deploy', {str(tmp_path / 'fleet.toml')!r}, opslib={OPSLIB!r})\n")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "AF_UNSET_VARIABLE_X is not set" in done.stderr


def test_the_approval_sits_after_the_canary_or_before_the_whole_fleet(tmp_path):
    python = AIRFLOW_VENV / "bin" / "python"
    assert python.exists(), "run `make airflow-venv` (make test does)"
    for name, count in (("four", 4), ("one", 1)):
        (tmp_path / f"{name}.toml").write_text("".join(f'[[targets]]\nname = "t{i}"\nurl_env = "AF_DB_{i}"\n'
                                                        for i in range(1, count + 1)))
    code = f"""
import json
from opslib.airflow import fleet_dag

def upstream(fleet, **options):
    dag = fleet_dag("d", "deploy", {str(tmp_path)!r} + "/" + fleet, opslib={OPSLIB!r}, wave=2, **options)
    return {{t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}}

found = {{
    "after the canary": upstream("four.toml", approval=True),
    "no canary": upstream("four.toml", canary=0, approval={{"subject": "Go?"}}),
    "a canary alone": upstream("one.toml", approval=True),
    "none": upstream("four.toml"),
}}
try:
    upstream("four.toml", approval={{"defaults": "Approve"}})
except ValueError as refused:
    found["refused"] = str(refused)
print(json.dumps(found))
"""
    env = {**os.environ, **{f"AF_DB_{i}": "postgresql://nowhere/x" for i in range(1, 5)}}
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])
    # canary -> gate_1 -> approve -> wave_1; each later wave depends on the approval too (its XCom is an
    # argument), not only through its gate.
    assert found["after the canary"] == {
        "canary": [], "gate_1": ["canary"], "approve": ["gate_1"], "wave_1": ["approve"],
        "gate_2": ["wave_1"], "wave_2": ["approve", "gate_2"],
    }
    assert found["no canary"] == {
        "approve": [], "wave_0": ["approve"], "gate_1": ["wave_0"], "wave_1": ["approve", "gate_1"],
    }
    assert found["a canary alone"] == {"approve": [], "canary": ["approve"]}
    assert found["none"] == {"canary": [], "gate_1": ["canary"], "wave_1": ["gate_1"], "gate_2": ["wave_1"],
                             "wave_2": ["gate_2"]}
    assert found["refused"] == "approval: 'Approve' cannot be the default; a timeout must not approve the waves"
