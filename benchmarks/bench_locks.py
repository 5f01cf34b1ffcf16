"""The worst application stall while a migration waits behind a long transaction: opslib against bare Alembic.

pgbench reads the `users` table from 4 clients on loopback; a transaction holds a lock on the table for
BLOCK_S seconds; meanwhile revision 0002 (ALTER TABLE users ADD COLUMN) is applied, once with bare
`alembic upgrade 0002`, once with `opslib upgrade 0002`. Bare Alembic's ALTER queues for the table's
ACCESS EXCLUSIVE lock, and every read queues behind it until the blocker ends. opslib's lock_timeout
(OPSLIB_DDL_LOCK_TIMEOUT, 2 s) bounds each wait and retries until the blocker is gone.
Goal: opslib's worst stall <= the lock timeout + 100 ms, and the migration still applied.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opslib import db, migrate, pgtools  # noqa: E402
from opslib.config import load_settings  # noqa: E402

BIN = Path(sys.executable).parent
BLOCK_S = 10.0
SCRIPT = "\\set id random(1, 10000)\nSELECT email FROM users WHERE id = :id;\n"


def _stall(tool: list[str], server, pgbench: str) -> tuple[float, float, bool]:
    """(worst transaction latency s, migration duration s, applied) for one tool."""
    name = f"opslib_bench_l{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(server.set(drivername="postgresql").render_as_string(hide_password=False))
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    url = server.set(database=name)
    plain = url.set(drivername="postgresql").render_as_string(hide_password=False)
    settings = load_settings()
    settings = settings.__class__(
        **{**settings.__dict__, "database_url": url.render_as_string(hide_password=False)}
    )
    try:
        migrate.upgrade(settings, "0001")
        with psycopg2.connect(plain) as conn:
            conn.cursor().execute(
                "INSERT INTO users (email, username, hashed_password) "
                "SELECT 'u' || g || '@example.com', 'u' || g, '!' FROM generate_series(1, 10000) g"
            )
        logs = Path(tempfile.mkdtemp(prefix="opslib-bench-"))
        (logs / "read.sql").write_text(SCRIPT)
        load = subprocess.Popen(
            [pgbench, "-n", "-c", "4", "-j", "2", "-T", str(int(BLOCK_S + 8)), "-f", str(logs / "read.sql"),
             "-l", f"--log-prefix={logs / 'pgb'}", name],
            env=pgtools.libpq_env(url), cwd=logs, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.0)
        blocker = psycopg2.connect(plain)
        blocker.cursor().execute("BEGIN; SELECT count(*) FROM users")  # holds ACCESS SHARE until commit
        threading.Timer(BLOCK_S, blocker.commit).start()
        time.sleep(0.5)
        env = {
            **os.environ,
            "DATABASE_URL": url.render_as_string(hide_password=False),
            "OPSLIB_ALEMBIC_INI": str(ROOT / "alembic.ini"),
        }
        start = time.perf_counter()
        migration = subprocess.run(tool, cwd=ROOT, env=env, capture_output=True, text=True)
        took = time.perf_counter() - start
        load.wait()
        blocker.close()
        worst_us = 0
        for log in logs.glob("pgb*"):
            for line in log.read_text().splitlines():
                fields = line.split()
                worst_us = max(worst_us, int(fields[2]))
        with psycopg2.connect(plain) as conn:
            cur = conn.cursor()
            cur.execute("SELECT version_num FROM alembic_version")
            applied = cur.fetchone()[0] == "0002"
        subprocess.run(["rm", "-rf", str(logs)], check=False)
        return worst_us / 1e6, took, applied and migration.returncode == 0
    finally:
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def main() -> int:
    """Run both scenarios and print the worst stalls and their ratio."""
    server = db.target_url(load_settings()).set(database="postgres")
    with psycopg2.connect(server.set(drivername="postgresql").render_as_string(hide_password=False)) as conn:
        major = conn.server_version // 10000
    pgbench = str(Path(pgtools.pg_dump_for(major).path).parent / "pgbench")
    timeout = load_settings().ddl_lock_timeout_s
    bare = _stall([str(BIN / "alembic"), "upgrade", "0002"], server, pgbench)
    ours = _stall([str(BIN / "opslib"), "upgrade", "0002"], server, pgbench)
    print(
        f"pgbench 4 clients reading users; a transaction holds users for {BLOCK_S:g} s; revision 0002 alters users"
    )
    print(f"{'tool':22} {'worst stall s':>14} {'migration s':>12} {'applied':>8}")
    print(f"{'alembic upgrade 0002':22} {bare[0]:14.2f} {bare[1]:12.2f} {str(bare[2]):>8}")
    print(f"{'opslib upgrade 0002':22} {ours[0]:14.2f} {ours[1]:12.2f} {str(ours[2]):>8}")
    print(
        f"ratio of worst stalls (opslib / alembic): {ours[0] / bare[0]:.2f}; "
        f"goal: opslib <= lock_timeout {timeout:g} s + 0.1 s: {'met' if ours[0] <= timeout + 0.1 else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
