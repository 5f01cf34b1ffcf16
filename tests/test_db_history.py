"""The history of runs and revisions kept inside the database (`opslib history --runs`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from opslib import db, history

from .conftest import OPSLIB, ROOT, query


def _run(url: str, work: Path, *args: str, alembic_ini: Path = ROOT / "alembic.ini") -> int:
    work.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(DATABASE_URL=url, OPSLIB_ALEMBIC_INI=str(alembic_ini))
    return subprocess.run(
        [OPSLIB, "run", *args], cwd=work, env=env, capture_output=True, text=True
    ).returncode


def _events(url: str) -> list[tuple]:
    return query(url, "SELECT run_id, direction, revision FROM opslib.revision_events ORDER BY id")


def test_deploy_writes_a_row_per_revision_and_reset_keeps_them(database_url, tmp_path, run_cli):
    assert _run(database_url, tmp_path / "w", "deploy") == 0
    events = _events(database_url)
    assert [(d, r) for _, d, r in events] == [("upgrade", f"000{i}") for i in range(1, 8)]
    (deploy_id,) = {run_id for run_id, _, _ in events}
    assert query(database_url, "SELECT runbook, outcome FROM opslib.runs") == [("deploy", "succeeded")]
    assert _run(database_url, tmp_path / "w", "reset") == 0
    after = _events(database_url)
    assert after[:7] == events  # the reset kept the history
    assert [d for _, d, _ in after[7:14]] == ["downgrade"] * 7 and [d for _, d, _ in after[14:]] == [
        "upgrade"
    ] * 7
    moves = query(database_url, "SELECT from_revisions, to_revisions FROM opslib.revision_events ORDER BY id")
    assert moves[0] == ([], ["0001"]) and moves[6] == (["0006"], ["0007"])
    assert moves[7] == (["0007"], ["0006"]) and moves[13] == (["0001"], [])  # the reset's reversals
    shown = run_cli("history", "--runs")
    assert shown.returncode == 0 and deploy_id in shown.stdout and "reset" in shown.stdout
    assert "0007 -> 0006" in shown.stdout and "0001 -> base" in shown.stdout


@pytest.mark.parametrize("scenario", ["broken_revision", "broken_generic"])
def test_no_row_for_the_revision_that_failed(database_url, tmp_path, project, scenario):
    """Rows come from on_version_apply inside each revision's transaction, also for a one-transaction env.py."""
    assert _run(database_url, tmp_path / "w", "deploy", alembic_ini=project(scenario)) == 1
    assert [r for _, _, r in _events(database_url)] == ["b001", "b002"]
    moves = query(database_url, "SELECT from_revisions, to_revisions FROM opslib.revision_events ORDER BY id")
    assert moves == [([], ["b001"]), (["b001"], ["b002"])]  # the same whatever the env.py
    assert query(database_url, "SELECT outcome, revisions_after FROM opslib.runs") == [("failed", ["b002"])]


def test_the_history_is_append_only(database_url, tmp_path):
    assert _run(database_url, tmp_path / "w", "deploy", "-p", "target_revision", "0001") == 0
    engine = sa.create_engine(db.parse_url(database_url), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        for statement in (
            "DELETE FROM opslib.revision_events",
            "UPDATE opslib.runs SET outcome = 'succeeded'",
        ):
            with pytest.raises(sa.exc.DBAPIError, match="append-only"):
                conn.execute(sa.text(statement))
            conn.rollback()
        runs, events = history.read(conn)
    engine.dispose()
    assert len(runs) == 1 and len(events) == 1


def test_a_history_written_before_to_revisions_existed_gains_the_column(database_url, tmp_path):
    """A database whose opslib schema predates the column keeps its rows and gets the column on the next run."""
    assert _run(database_url, tmp_path / "w", "deploy", "-p", "target_revision", "0001") == 0
    engine = sa.create_engine(db.parse_url(database_url), poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE opslib.revision_events DROP COLUMN to_revisions"))
    engine.dispose()
    assert _run(database_url, tmp_path / "w", "deploy") == 0
    moves = query(database_url, "SELECT revision, to_revisions FROM opslib.revision_events ORDER BY id")
    assert moves[0] == ("0001", None) and moves[1:] == [(f"000{i}", [f"000{i}"]) for i in range(2, 8)]


def test_the_history_schema_is_created_once_when_runs_race_to_create_it(database_url):
    """Two runs ending together on a database without the schema (a deploy starting its upgrade while
    the run it locked out writes its row) both create it: neither may fail on the other's objects."""
    import threading

    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    racers = 8
    ready = threading.Barrier(racers, timeout=30)
    failures: list[BaseException] = []

    def create() -> None:
        try:
            with engine.connect() as conn:
                ready.wait()
                history.ensure_schema(conn)
        except BaseException as err:  # noqa: BLE001 - collected for the assertion below
            failures.append(err)

    for _ in range(3):  # a fresh database each round: the race is only at the first creation
        query(database_url, "DROP SCHEMA IF EXISTS opslib CASCADE")
        ready.reset()
        threads = [threading.Thread(target=create) for _ in range(racers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures[0]
        assert query(database_url, "SELECT to_regclass('opslib.runs') IS NOT NULL")[0][0]
    engine.dispose()
