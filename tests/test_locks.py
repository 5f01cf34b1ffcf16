"""Lock safety: one deploy at a time, and migrations that never queue behind a long transaction."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import psycopg2

from opslib import migrate

from .conftest import OPSLIB, ROOT, check_row, libpq, query, settings_for


def _start(url: str, workdir: Path, *args: str, alembic_ini: Path, env=None) -> subprocess.Popen:
    workdir.mkdir(exist_ok=True)
    full = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    full.update({"DATABASE_URL": url, "OPSLIB_ALEMBIC_INI": str(alembic_ini)}, **(env or {}))
    return subprocess.Popen(
        [OPSLIB, "run", *args],
        cwd=workdir,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _records(workdir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((workdir / "records").glob("*.json"))]


def test_two_deploys_started_together_one_applies_the_other_exits_4(database_url, project, tmp_path):
    ini = project("slow_revision")
    work = tmp_path / "work"
    runs = [_start(database_url, work, "deploy", alembic_ini=ini) for _ in range(2)]
    outs = [r.communicate(timeout=300) for r in runs]
    codes = sorted(r.returncode for r in runs)
    assert codes == [0, 4], "\n".join(f"exit {r.returncode}:\n{o}\n{e}" for r, (o, e) in zip(runs, outs, strict=True))
    loser = "".join(next(out for r, out in zip(runs, outs, strict=True) if r.returncode == 4))
    assert (
        "another opslib run holds the lock" in loser
        and "backend pid" in loser
        and "opslib deploy run" in loser
    )
    records = _records(work)
    assert sorted(r["outcome"] for r in records) == ["locked", "succeeded"]
    locked = next(r for r in records if r["outcome"] == "locked")
    # Read without the lock (where the winner had got to by then), never left unread or invented.
    assert locked["revisions_before"] in ([], ["s001"]) and locked["revisions_after"] in ([], ["s001"], ["s002"])
    winner = next(r for r in records if r["outcome"] == "succeeded")
    assert winner["revisions_after"] == ["s002"]
    # Each revision's start is when it started (s002 takes 3 s), not when its commit was confirmed.
    started = {s["name"]: s["started_at"] for s in winner["steps"]}
    assert started["upgrade"] <= started["upgrade s001"] < started["upgrade s002"] < started["verify"]
    assert migrate.status(settings_for(database_url, tmp_path, ini)).current == ("s002",)


def test_a_run_the_lock_turns_away_records_the_revision_it_read_without_it(database_url, tmp_path):
    from opslib.db import LOCK_KEY

    assert _start(database_url, tmp_path / "up", "deploy", alembic_ini=ROOT / "alembic.ini").wait(300) == 0
    holder = psycopg2.connect(libpq(database_url))
    holder.autocommit = True
    holder.cursor().execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
    try:
        work = tmp_path / "work"
        turned_away = _start(database_url, work, "deploy", alembic_ini=ROOT / "alembic.ini")
        assert turned_away.wait(300) == 4, turned_away.communicate()
    finally:
        holder.close()
    (record,) = _records(work)
    assert record["outcome"] == "locked"
    assert record["revisions_before"] == record["revisions_after"] == ["0007"]
    listed = subprocess.run([OPSLIB, "audit", "list"], cwd=work, capture_output=True, text=True)
    assert "0007 -> 0007" in listed.stdout and "base ->" not in listed.stdout, listed.stdout


def _hold_users_lock(url: str) -> psycopg2.extensions.connection:
    blocker = psycopg2.connect(libpq(url))
    blocker.cursor().execute("BEGIN; LOCK TABLE users IN ACCESS SHARE MODE")
    return blocker


def _wait_for_attempt(work: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in _records(work) if (work / "records").is_dir() else []:
            if any("attempt" in s["name"] for s in record["steps"]):
                return
        time.sleep(0.1)
    raise AssertionError("no attempt hit the lock timeout")


def _deploy_0002(url: str, work: Path, lock_timeout: str, retries: str) -> subprocess.Popen:
    env = {"OPSLIB_DDL_LOCK_TIMEOUT": lock_timeout, "OPSLIB_DDL_RETRIES": retries}
    return _start(
        url, work, "deploy", "-p", "target_revision", "0002", alembic_ini=ROOT / "alembic.ini", env=env
    )


def test_blocked_ddl_is_retried_and_succeeds_once_the_blocker_ends(database_url, tmp_path):
    migrate.upgrade(settings_for(database_url, tmp_path), "0001")
    blocker = _hold_users_lock(database_url)
    work = tmp_path / "work"
    run = _deploy_0002(database_url, work, "0.5", "4")
    try:
        _wait_for_attempt(work)
    finally:
        blocker.rollback()  # the long transaction ends
        blocker.close()
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, out + err
    (record,) = _records(work)
    attempts = [s for s in record["steps"] if "attempt" in s["name"]]
    assert attempts and all(s["outcome"] == "lock timeout" for s in attempts)
    assert attempts[0]["name"] == "upgrade 0002 attempt 1" and "lock timeout" in attempts[0]["error"]
    assert record["revisions_after"] == ["0002"]


def test_blocked_ddl_past_all_retries_fails_at_the_previous_revision(database_url, tmp_path):
    migrate.upgrade(settings_for(database_url, tmp_path), "0001")
    blocker = _hold_users_lock(database_url)
    work = tmp_path / "work"
    try:
        run = _deploy_0002(database_url, work, "0.3", "2")
        out, err = run.communicate(timeout=300)
    finally:
        blocker.rollback()
        blocker.close()
    assert run.returncode == 1, out + err
    (record,) = _records(work)
    attempts = [s["name"] for s in record["steps"] if "attempt" in s["name"]]
    assert attempts == ["upgrade 0002 attempt 1", "upgrade 0002 attempt 2", "upgrade 0002 attempt 3"]
    assert "could not get its locks within lock_timeout 0.3 s in 3 attempts" in record["error"]
    assert record["revisions_after"] == ["0001"]
    assert migrate.status(settings_for(database_url, tmp_path)).current == ("0001",)


def test_the_check_names_a_long_transaction_holding_a_table_lock(database_url, run_cli, tmp_path):
    migrate.upgrade(settings_for(database_url, tmp_path), "0001")
    blocker = _hold_users_lock(database_url)
    try:
        time.sleep(1.5)  # older than the lock timeout below: a migration would wait for it
        done = run_cli("check", env={"OPSLIB_DDL_LOCK_TIMEOUT": "1"})
    finally:
        blocker.rollback()
        blocker.close()
    line = check_row(done.stdout, "sessions that would block DDL")
    assert "WARN" in line and "idle in transaction" in line and "users" in line
    assert done.returncode == 0  # a warning, not a failure


def test_a_retry_resumes_at_the_revision_that_timed_out(database_url, project, tmp_path):
    """One Alembic run commits each revision: the ones before the blocked table stay, the retry resumes at it."""
    ini = project("longlived")
    settings = settings_for(database_url, tmp_path, ini)
    chain = [r.revision for r in reversed(migrate.history(settings))]
    migrate.upgrade(settings, chain[0])  # creates users (and customers)
    # The first later revision that touches users, read from the chain itself.
    touching = next(rev for rev in chain[1:] if "users" in migrate.show(settings, rev).message)
    blocker = _hold_users_lock(database_url)
    work = tmp_path / "work"
    run = _start(
        database_url, work, "deploy", "-p", "target_revision", touching, alembic_ini=ini,
        env={"OPSLIB_DDL_LOCK_TIMEOUT": "0.5", "OPSLIB_DDL_RETRIES": "4"},
    )  # fmt: skip
    try:
        _wait_for_attempt(work)
    finally:
        blocker.rollback()
        blocker.close()
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, out + err
    (record,) = _records(work)
    names = [s["name"] for s in record["steps"] if s["name"].startswith("upgrade ")]
    expected = chain[1 : chain.index(touching) + 1]
    # In the order it happened: the revisions before it committed, then the attempt that waited, then it.
    assert names == [f"upgrade {r}" for r in expected[:-1]] + [
        f"upgrade {touching} attempt 1",
        f"upgrade {touching}",
    ]
    assert record["revisions_after"] == [touching]
    events = query(database_url, "SELECT revision FROM opslib.revision_events WHERE direction = 'upgrade'")
    assert [e.revision for e in events][1:] == expected
