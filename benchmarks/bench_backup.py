"""opslib backup / verify / clone against bare pg_dump, pg_restore and CREATE DATABASE, in one run; printed as ratios.

On a generated table of ROWS rows (default 2,000,000; `python benchmarks/bench_backup.py 500000` for a
quicker run, `--repeats 3` for fewer repeats), each measurement a separate process as users run it,
medians of REPEATS (default 5):

  opslib backup (our default compression)   vs  pg_dump -Fc (pg_dump's default compression)   goal <= 1.0
  opslib backup (our default compression)   vs  pg_dump -Fc -Z<the same level>              (what opslib adds)
  opslib verify-backup --restore-test       vs  createdb + pg_restore into it                 goal <= 1.1
  opslib clone                              vs  createdb + pg_restore into it                 goal <= 0.2
and, on an empty database, the fixed cost of `opslib backup` over `pg_dump -Fc -Z<level>`; the two
strategies of CREATE DATABASE … TEMPLATE (WAL_LOG, FILE_COPY; PostgreSQL 15+) on the generated source,
timed as SQL statements, against opslib's choice for a source of that size; and a sweep of
OPSLIB_BACKUP_COMPRESSION (time and size) behind the default's choice.
The server is DATABASE_URL's (a scratch database is created and dropped on it), else the embedded one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opslib import backup, db, pgtools  # noqa: E402
from opslib.config import load_settings  # noqa: E402

OPSLIB = str(Path(sys.executable).parent / "opslib")
REPEATS = 5
STRATEGIES = ("WAL_LOG", "FILE_COPY")


def _run(cmd: list[str], env: dict, cur=None) -> float:
    if cur is not None:
        # Untimed: start each measurement with no dirty buffers left by the one before, so that
        # neither side pays for the other's writes.
        cur.execute("CHECKPOINT")
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def _sql(cur, statement: str) -> float:
    """One statement, timed after an untimed CHECKPOINT (as _run)."""
    cur.execute("CHECKPOINT")
    start = time.perf_counter()
    cur.execute(statement)
    return time.perf_counter() - start


def _arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows", nargs="?", type=int, default=2_000_000, help="rows of the generated table")
    p.add_argument("--repeats", type=int, default=REPEATS, help=f"repeats of each measurement (default {REPEATS})")
    return p.parse_args()


def main() -> int:
    """Generate the table, run every comparison, print medians, ratios and goals."""
    args = _arguments()
    rows, repeats = args.rows, args.repeats
    server = db.target_url(load_settings()).set(database="postgres")
    admin = psycopg2.connect(server.set(drivername="postgresql").render_as_string(hide_password=False))
    admin.autocommit = True
    source = f"opslib_bench_{uuid.uuid4().hex[:8]}"
    empty = f"opslib_bench_e{uuid.uuid4().hex[:8]}"
    made = [source, empty]
    cur = admin.cursor()
    cur.execute(f'CREATE DATABASE "{source}"')
    cur.execute(f'CREATE DATABASE "{empty}"')
    source_url = server.set(database=source)
    conn = psycopg2.connect(source_url.set(drivername="postgresql").render_as_string(hide_password=False))
    with conn:  # commits; the connection is closed below, since clone needs the source idle
        conn.cursor().execute(
            "CREATE TABLE events AS SELECT g AS id, md5(g::text) AS payload, "
            "now() - make_interval(secs => g) AS created_at, (g % 1000) AS shop_id "
            f"FROM generate_series(1, {rows}) g; ALTER TABLE events ADD PRIMARY KEY (id)"
        )
    major = conn.server_version // 10000
    conn.close()
    cur.execute("SELECT pg_database_size(%s)", (source,))
    source_bytes = cur.fetchone()[0]
    pg_dump, pg_restore = pgtools.pg_dump_for(major), pgtools.pg_restore_for(major)
    env = {**os.environ, "DATABASE_URL": source_url.render_as_string(hide_password=False)}
    empty_env = {**os.environ, "DATABASE_URL": server.set(database=empty).render_as_string(hide_password=False)}
    level = str(load_settings(env).backup_compression)
    libpq = pgtools.libpq_env(source_url)
    out = Path(tempfile.mkdtemp(prefix="opslib-bench-"))
    keys = ("pg_dump", "pg_dump_same", "backup", "pg_restore", "verify", "clone", "empty_dump", "empty_backup")
    t: dict[str, list[float]] = {k: [] for k in keys + STRATEGIES}
    sizes: dict[str, int] = {}
    try:
        for i in range(repeats):
            bare = out / f"bare{i}.dump"
            t["pg_dump"].append(_run([pg_dump.path, "-Fc", f"--file={bare}", source], libpq, cur))
            sizes["pg_dump -Fc"] = bare.stat().st_size
            same = out / f"same{i}.dump"
            t["pg_dump_same"].append(_run([pg_dump.path, "-Fc", f"-Z{level}", f"--file={same}", source], libpq, cur))
            folder = out / f"ours{i}"
            t["backup"].append(_run([OPSLIB, "backup", "--out", str(folder)], env, cur))
            ours = next(folder.glob("*.dump"))
            sizes["opslib backup"] = ours.stat().st_size
            target = f"opslib_bench_r{uuid.uuid4().hex[:8]}"
            made.append(target)
            # The bare way into a new database: createdb, then pg_restore (both timed).
            t["pg_restore"].append(
                _run([str(Path(pg_restore.path).parent / "createdb"), target], libpq, cur)
                + _run([pg_restore.path, "--exit-on-error", f"--dbname={target}", str(ours)], libpq)
            )
            cur.execute(f'DROP DATABASE "{target}"')  # untimed; verify-backup drops its scratch copy itself
            t["verify"].append(_run([OPSLIB, "verify-backup", str(ours), "--restore-test"], env, cur))
            clone = f"opslib_bench_c{uuid.uuid4().hex[:8]}"
            made.append(clone)
            t["clone"].append(_run([OPSLIB, "clone", "--into", clone], env, cur))
            cur.execute(f'DROP DATABASE "{clone}"')  # untimed
            if major >= 15:
                # Both strategies as bare SQL, in alternating order, so that neither always goes first.
                for strategy in STRATEGIES if i % 2 == 0 else STRATEGIES[::-1]:
                    copy = f"opslib_bench_s{uuid.uuid4().hex[:8]}"
                    made.append(copy)
                    t[strategy].append(
                        _sql(cur, f'CREATE DATABASE "{copy}" TEMPLATE "{source}" STRATEGY {strategy}')
                    )
                    cur.execute(f'DROP DATABASE "{copy}"')  # untimed
            # The fixed cost: the same two commands on an empty database, where the dump itself is nothing.
            empty_libpq = {**libpq, "PGDATABASE": empty}
            t["empty_dump"].append(
                _run([pg_dump.path, "-Fc", f"-Z{level}", f"--file={out / f'e{i}.dump'}", empty], empty_libpq, cur)
            )
            t["empty_backup"].append(_run([OPSLIB, "backup", "--out", str(out / f"eo{i}")], empty_env, cur))
        sweep = {}
        for z in ("0", "1", "3", "6"):
            folder = out / f"z{z}"
            seconds = _run([OPSLIB, "backup", "--out", str(folder)], {**env, "OPSLIB_BACKUP_COMPRESSION": z})
            sweep[z] = (seconds, next(folder.glob("*.dump")).stat().st_size)
    finally:
        for name in made:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
        subprocess.run(["rm", "-rf", str(out)], check=False)
    m = {k: statistics.median(v) for k, v in t.items() if v}
    print(
        f"{rows} rows ({source_bytes / 1e6:.0f} MB database), PostgreSQL {major}, "
        f"pg_dump/pg_restore {pg_dump.version}, medians of {repeats}"
    )
    print(f"{'comparison':58} {'bare s':>8} {'opslib s':>9} {'ratio':>6}  goal")
    for label, bare_key, ours_key, goal in (
        ("opslib backup vs pg_dump -Fc", "pg_dump", "backup", "<= 1.0"),
        (f"opslib backup vs pg_dump -Fc -Z{level} (same compression)", "pg_dump_same", "backup", ""),
        ("verify-backup --restore-test vs createdb+pg_restore", "pg_restore", "verify", "<= 1.1"),
        ("opslib clone vs createdb+pg_restore", "pg_restore", "clone", "<= 0.2"),
    ):
        ratio = m[ours_key] / m[bare_key]
        verdict = ("met" if ratio <= float(goal.split()[-1]) else "NOT met") if goal else ""
        print(f"{label:58} {m[bare_key]:8.2f} {m[ours_key]:9.2f} {ratio:6.2f}  {goal} {verdict}".rstrip())
    print(
        f"fixed cost on an empty database: opslib backup {m['empty_backup']:.2f} s, "
        f"pg_dump -Fc -Z{level} {m['empty_dump']:.2f} s: +{m['empty_backup'] - m['empty_dump']:.2f} s a run; "
        f"on the table: +{m['backup'] - m['pg_dump_same']:.2f} s"
    )
    if major >= 15:
        chosen = backup.clone_strategy(major, source_bytes)
        faster = min(STRATEGIES, key=lambda s: m[s])
        print(
            f"CREATE DATABASE … TEMPLATE of {source_bytes / 1e6:.0f} MB: WAL_LOG {m['WAL_LOG']:.3f} s, "
            f"FILE_COPY {m['FILE_COPY']:.3f} s (FILE_COPY/WAL_LOG {m['FILE_COPY'] / m['WAL_LOG']:.2f}); "
            f"opslib chooses {chosen} at this size (FILE_COPY from "
            f"{backup.FILE_COPY_FROM_BYTES / 2**20:.0f} MiB), {'the faster' if chosen == faster else 'NOT the faster'}"
        )
    print(
        f"sizes: pg_dump -Fc {sizes['pg_dump -Fc'] / 1e6:.1f} MB, opslib backup {sizes['opslib backup'] / 1e6:.1f} MB"
    )
    print(
        "OPSLIB_BACKUP_COMPRESSION sweep (opslib backup): "
        + ", ".join(f"-Z{lvl}: {s:.2f} s {b / 1e6:.1f} MB" for lvl, (s, b) in sweep.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
