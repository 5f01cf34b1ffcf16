"""opslib fleet (the local executor, P=2) against a sequential shell loop of `opslib run deploy`; printed as ratios.

A fleet of COUNT small databases (default 40), each the sample application at revision 0003 with a few rows,
made from one template (untimed). The same deploy, `-p backup false`, on a fresh set of copies for each side:

  for each database: DATABASE_URL=… opslib run deploy -p backup false      (a shell loop, one after another)
  opslib fleet deploy --parallel 2 --canary 1 --wave 10 --no-halt -p backup false

Goal: fleet / loop ≤ 0.6. While the fleet runs, the server's sessions are counted every 50 ms
(pg_stat_activity): the peak must stay below max_connections.

The server is DATABASE_URL's (scratch databases are created and dropped on it), else the embedded one.

  python benchmarks/bench_fleet.py [--count N] [--parallel P]
"""

from __future__ import annotations

import argparse
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

from opslib import db, migrate  # noqa: E402
from opslib.config import Settings, load_settings  # noqa: E402

OPSLIB = str(ROOT / ".venv" / "bin" / "opslib")


def _libpq(url) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _environ(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(OPSLIB_ALEMBIC_INI=str(ROOT / "alembic.ini"), **extra)
    return env


def main(argv: list[str] | None = None) -> int:
    """Make the template and its copies, time both sides, print the ratio and the peak of sessions."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40, help="databases in the fleet (default 40)")
    parser.add_argument("--parallel", type=int, default=2, help="the fleet's --parallel (default 2)")
    args = parser.parse_args(argv)
    server = db.target_url(load_settings()).set(database="postgres")
    admin = psycopg2.connect(_libpq(server))
    admin.autocommit = True
    cur = admin.cursor()
    prefix = f"opslib_bench_f{uuid.uuid4().hex[:6]}"
    made: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="opslib-bench-fleet-"))

    def create(name: str, template: str | None = None) -> str:
        cur.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        made.append(name)
        return name

    try:
        template = create(f"{prefix}_t")
        url = server.set(database=template)
        migrate.upgrade(Settings(database_url=_libpq(url), alembic_ini=ROOT / "alembic.ini"), "0003")
        conn = psycopg2.connect(_libpq(url))  # closed at once: a template must have no session
        with conn, conn.cursor() as c:
            c.execute("INSERT INTO products (marketplace, shop_name, title, price) "
                      "SELECT 'm', 's', 't', (g % 100)::text FROM generate_series(1, 200) g")
        conn.close()
        cur.execute("SELECT setting::int FROM pg_settings WHERE name = 'max_connections'")
        max_connections = cur.fetchone()[0]

        loop_dbs = [create(f"{prefix}_l{i}", template) for i in range(args.count)]
        fleet_dbs = [create(f"{prefix}_f{i}", template) for i in range(args.count)]

        # The shell loop, as a user writes it.
        script = "".join(
            f'DATABASE_URL="{_libpq(server.set(database=name))}" "{OPSLIB}" run deploy -p backup false >/dev/null || exit 1\n'
            for name in loop_dbs
        )
        start = time.perf_counter()
        loop = subprocess.run(["sh", "-c", script], cwd=work, env=_environ(),
                              capture_output=True, text=True)
        loop_s = time.perf_counter() - start
        assert loop.returncode == 0, loop.stderr[-2000:]

        variables = {f"BENCH_FLEET_{i}": _libpq(server.set(database=name)) for i, name in enumerate(fleet_dbs)}
        (work / "fleet.toml").write_text("".join(
            f'[[targets]]\nname = "t{i}"\nurl_env = "BENCH_FLEET_{i}"\n\n' for i in range(args.count)
        ))
        peak = [0]
        running = threading.Event()
        running.set()

        def sample() -> None:
            conn = psycopg2.connect(_libpq(server))
            conn.autocommit = True
            with conn.cursor() as c:
                while running.is_set():
                    c.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
                    peak[0] = max(peak[0], c.fetchone()[0])
                    time.sleep(0.05)
            conn.close()

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        done = subprocess.run(
            [OPSLIB, "fleet", "deploy", "--targets", "fleet.toml", "--parallel", str(args.parallel), "--canary", "1",
             "--wave", "10", "--no-halt", "-p", "backup", "false"],
            cwd=work, env=_environ(**variables), capture_output=True, text=True,
        )
        fleet_s = time.perf_counter() - start
        running.clear()
        sampler.join()
        assert done.returncode == 0, done.stderr[-2000:]
        cur.execute("SELECT version()")
        version = cur.fetchone()[0].split(" on ")[0]
    finally:
        for name in made:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

    ratio = fleet_s / loop_s
    print(f"{version}, {os.cpu_count()} cores; {args.count} databases (the sample at 0003, 200 products each), "
          "deploy -p backup false")
    print()
    print("| figure | value | goal |")
    print("|---|---|---|")
    print(f"| shell loop of `opslib run deploy`, one after another | {loop_s:.1f} s ({loop_s / args.count:.2f} s a database) | |")
    print(f"| `opslib fleet deploy --parallel {args.parallel}` | {fleet_s:.1f} s | |")
    print(f"| fleet / loop | **{ratio:.2f}** | ≤ 0.6: {'met' if ratio <= 0.6 else '**not met**'} |")
    print(f"| sessions on the server at peak during the fleet (sampled every 50 ms) | {peak[0]} of max_connections "
          f"{max_connections} | below: {'met' if peak[0] < max_connections else '**not met**'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
