"""opslib.batch: key-range batches committed one by one, resumed after an interruption, never redone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from opslib import batch, db
from opslib.errors import InvalidInput

from .conftest import OPSLIB, query


def _table(url: str, rows: int, *, gap: int = 1) -> None:
    query(url, "CREATE TABLE items (id bigint PRIMARY KEY, price text, amount numeric)")
    query(url, "INSERT INTO items SELECT g * :gap, (g % 97)::text || '.50', NULL FROM generate_series(1, :n) g",
          gap=gap, n=rows)
    query(url, "ANALYZE items")


def _engine(url: str):
    return sa.create_engine(db.parse_url(url), poolclass=sa.pool.NullPool)


def test_every_row_is_updated_range_by_range_and_the_progress_is_kept(database_url):
    _table(database_url, 10_000)
    engine = _engine(database_url)
    with engine.connect() as conn:
        result = batch.update_in_batches(
            "items", "amount = CAST(price AS numeric)", connection=conn, batch_rows=1_000, progress=False
        )
        kept = batch.progress_of(conn, result.name)
        # The connection is handed back in its own isolation level, not left committing statement by statement.
        assert conn.get_isolation_level() == conn.default_isolation_level != "AUTOCOMMIT"
    engine.dispose()
    assert result.rows == 10_000 and result.batches == 10 and result.resumed_after is None
    assert result.longest_batch_s > 0 and result.rows_per_s > 0
    assert kept["rows_done"] == 10_000 and kept["batches_done"] == 10 and kept["finished_at"] is not None
    assert query(database_url, "SELECT count(*) FROM items WHERE amount = CAST(price AS numeric)")[0][0] == 10_000


def test_sparse_keys_are_walked_at_the_table_density_not_one_key_at_a_time(database_url):
    _table(database_url, 5_000, gap=1_000)  # ids 1000, 2000, … 5,000,000
    engine = _engine(database_url)
    with engine.connect() as conn:
        result = batch.update_in_batches("items", "amount = 1", connection=conn, batch_rows=500, progress=False)
    engine.dispose()
    assert result.rows == 5_000
    assert 9 <= result.batches <= 12, result.batches


def test_a_where_condition_limits_the_rows_and_a_text_key_is_refused(database_url):
    _table(database_url, 1_000)
    query(database_url, "CREATE TABLE named (code text PRIMARY KEY, v int)")
    query(database_url, "INSERT INTO named VALUES ('a', 1)")
    engine = _engine(database_url)
    with engine.connect() as conn:
        result = batch.update_in_batches("items", "amount = 0", where="id % 2 = 0", connection=conn, progress=False)
        assert result.rows == 500
        with pytest.raises(InvalidInput, match="integer key"):
            batch.update_in_batches("named", "v = 2", key="code", connection=conn, progress=False)
        with pytest.raises(InvalidInput, match="batch_rows"):
            batch.update_in_batches("items", "amount = 0", batch_rows=0, connection=conn, progress=False)
    engine.dispose()
    assert query(database_url, "SELECT v FROM named")[0][0] == 1


def test_a_locked_range_times_out_retries_then_fails_and_a_new_call_resumes_after_the_committed_ranges(
    database_url,
):
    _table(database_url, 4_000)
    holder = _engine(database_url).connect()
    holder.execute(sa.text("SELECT * FROM items WHERE id = 2500 FOR UPDATE"))  # a row of the third range
    engine = _engine(database_url)
    with engine.connect() as conn:
        with pytest.raises(batch.BatchFailed, match=r"keys > 2000 and <= 3000: rows could not be locked .* 3 tries"):
            batch.update_in_batches("items", "amount = 7", name="seven", connection=conn, batch_rows=1_000,
                                    lock_timeout_s=0.1, retries=2, progress=False)
        assert batch.progress_of(conn, "seven")["last_key"] == 2000
        # The session's own lock timeout is back as it was.
        assert conn.execute(sa.text("SHOW lock_timeout")).scalar() == "0"
        conn.commit()
        holder.rollback()
        holder.close()
        result = batch.update_in_batches("items", "amount = 7", name="seven", connection=conn, batch_rows=1_000,
                                         progress=False)
    engine.dispose()
    assert result.resumed_after == 2000 and result.rows_before == 2000
    assert result.rows == 2000 and result.batches == 2
    assert query(database_url, "SELECT count(*) FROM items WHERE amount = 7")[0][0] == 4_000


def test_a_lock_released_within_the_retries_lets_the_batch_through(database_url):
    _table(database_url, 2_000)
    holder = _engine(database_url).connect()
    holder.execute(sa.text("SELECT * FROM items WHERE id = 10 FOR UPDATE"))
    threading.Timer(0.3, holder.rollback).start()
    engine = _engine(database_url)
    with engine.connect() as conn:
        result = batch.update_in_batches("items", "amount = 1", connection=conn, batch_rows=1_000,
                                         lock_timeout_s=0.1, retries=5, progress=False)
    engine.dispose()
    holder.close()
    assert result.rows == 2_000 and result.lock_retries >= 1


def test_a_finished_update_run_again_starts_afresh_and_a_changed_statement_does_not_resume(database_url):
    _table(database_url, 1_000)
    engine = _engine(database_url)
    with engine.connect() as conn:
        batch.update_in_batches("items", "amount = 1", name="w", connection=conn, progress=False)
        again = batch.update_in_batches("items", "amount = 1", name="w", connection=conn, progress=False)
        assert again.resumed_after is None and again.rows == 1_000
        # An unfinished run of another statement under the same name is not resumed either.
        conn.execute(sa.text("UPDATE opslib.batch_progress SET finished_at = NULL, last_key = 500 WHERE name = 'w'"))
        conn.commit()
        changed = batch.update_in_batches("items", "amount = 2", name="w", connection=conn, progress=False)
        assert changed.resumed_after is None and changed.rows == 1_000
    engine.dispose()


def test_a_connection_inside_a_transaction_is_refused(database_url):
    _table(database_url, 10)
    engine = _engine(database_url)
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        with pytest.raises(InvalidInput, match="outside a transaction"):
            batch.update_in_batches("items", "amount = 1", connection=conn, progress=False)
    engine.dispose()


REVISION = '''"""fill items.amount in batches"""
from alembic import op

from opslib.batch import update_in_batches

revision = "b001"
down_revision = None


def upgrade():
    op.execute("CREATE TABLE IF NOT EXISTS items (id bigint PRIMARY KEY, price text, amount numeric)")
    print("filling items.amount")  # revisions print, as real ones do
    update_in_batches("items", "amount = CAST(price AS numeric)", name="b001 amount", batch_rows=2_000,
                      pause_s=0.05)
    op.execute("ALTER TABLE items ALTER COLUMN amount SET NOT NULL")


def downgrade():
    pass
'''


def _generic_project(folder: Path) -> Path:
    """``alembic init`` (Alembic's generic env.py: the whole upgrade in one transaction) with one batched revision."""
    alembic = str(Path(sys.executable).parent / "alembic")
    subprocess.run([alembic, "init", "migrations"], cwd=folder, check=True, capture_output=True)
    (folder / "migrations" / "versions" / "b001_fill.py").write_text(REVISION)
    return folder / "alembic.ini"


def test_a_batched_revision_killed_in_the_middle_resumes_without_redoing_finished_batches(database_url, tmp_path):
    ini = _generic_project(tmp_path)
    query(database_url, "CREATE TABLE items (id bigint PRIMARY KEY, price text, amount numeric)")
    query(database_url, "INSERT INTO items SELECT g, (g % 97)::text || '.25', NULL FROM generate_series(1, 100000) g")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(DATABASE_URL=database_url, OPSLIB_ALEMBIC_INI=str(ini))
    proc = subprocess.Popen([OPSLIB, "upgrade", "head"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    done = 0
    while time.monotonic() < deadline and done < 10:
        rows = query(database_url, "SELECT batches_done FROM opslib.batch_progress WHERE name = 'b001 amount'") \
            if query(database_url, "SELECT to_regclass('opslib.batch_progress') IS NOT NULL")[0][0] else []
        done = rows[0][0] if rows else 0
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert 10 <= done < 50, done
    (kept_key, kept_rows), = query(database_url,
                                   "SELECT last_key, rows_done FROM opslib.batch_progress WHERE name = 'b001 amount'")
    assert 0 < kept_key < 100_000 and kept_rows == kept_key
    assert query(database_url, "SELECT version_num FROM alembic_version") == []  # the revision did not finish
    between = query(database_url, "SELECT txid_current() % 4294967296")[0][0]
    again = subprocess.run([OPSLIB, "upgrade", "head"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    assert query(database_url, "SELECT version_num FROM alembic_version") == [("b001",)]
    # Every row is right, and the rows of the batches committed before the kill were not written again:
    # their row versions are older than any transaction of the second run.
    assert query(database_url, "SELECT count(*) FROM items WHERE amount IS DISTINCT FROM CAST(price AS numeric)") \
        == [(0,)]
    redone = query(database_url, "SELECT count(*) FROM items WHERE id <= :k AND xmin::text::bigint > :t",
                   k=kept_key, t=between)[0][0]
    rewritten = query(database_url, "SELECT count(*) FROM items WHERE id > :k AND xmin::text::bigint > :t",
                      k=kept_key, t=between)[0][0]
    assert redone == 0
    assert rewritten == 100_000 - kept_key
    progress = query(database_url, "SELECT rows_done, finished_at IS NOT NULL FROM opslib.batch_progress")
    assert progress == [(100_000, True)]


def test_the_progress_bar_of_a_batched_revision_is_in_the_notebooks_stdout(database_url, tmp_path):
    """In a run's notebook the bar is plain text on stdout (shown as output, not on an error's red background)."""
    ini = _generic_project(tmp_path)
    revision = tmp_path / "migrations" / "versions" / "b001_fill.py"
    revision.write_text(REVISION + "# opslib-accept: adding-not-nullable-field -- every row is filled just before\n")
    query(database_url, "CREATE TABLE items (id bigint PRIMARY KEY, price text, amount numeric)")
    query(database_url, "INSERT INTO items SELECT g, g::text, NULL FROM generate_series(1, 8000) g")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(DATABASE_URL=database_url, OPSLIB_ALEMBIC_INI=str(ini))
    done = subprocess.run([OPSLIB, "run", "deploy", "-p", "backup", "false"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (notebook,) = (tmp_path / "records").glob("*.ipynb")
    streams = [o for c in json.loads(notebook.read_text())["cells"] for o in c.get("outputs", []) if o["output_type"] == "stream"]
    bars = [o["name"] for o in streams if "b001 amount" in "".join(o["text"])]
    assert bars and set(bars) == {"stdout"}, streams
    assert not [o for o in streams if o["name"] == "stderr"], streams
