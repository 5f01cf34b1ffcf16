"""opslib backup / verify / clone against bare pg_dump and pg_restore, in one run; printed as ratios.

On a generated table of ROWS rows (default 2,000,000; `python benchmarks/bench_backup.py 500000` for a
quicker run), each measurement a separate process as users run it, medians of REPEATS:

  opslib backup (our default compression)   vs  pg_dump -Fc (pg_dump's default compression)   goal <= 1.0
  opslib verify-backup --restore-test       vs  createdb + pg_restore into it                 goal <= 1.2
  opslib clone                              vs  createdb + pg_restore into it
and a sweep of OPSLIB_BACKUP_COMPRESSION (time and size) behind the default's choice.
The server is DATABASE_URL's (a scratch database is created and dropped on it), else the embedded one.
"""

from __future__ import annotations

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

from opslib import db, pgtools  # noqa: E402
from opslib.config import load_settings  # noqa: E402

OPSLIB = str(Path(sys.executable).parent / "opslib")
REPEATS = 5


def _run(cmd: list[str], env: dict, cur=None) -> float:
    if cur is not None:
        # Untimed: start each measurement with no dirty buffers left by the one before, so that
        # neither side pays for the other's writes.
        cur.execute("CHECKPOINT")
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> int:
    """Generate the table, run every comparison, print medians and ratios."""
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 2_000_000
    server = db.target_url(load_settings()).set(database="postgres")
    admin = psycopg2.connect(server.set(drivername="postgresql").render_as_string(hide_password=False))
    admin.autocommit = True
    source = f"opslib_bench_{uuid.uuid4().hex[:8]}"
    made = [source]
    cur = admin.cursor()
    cur.execute(f'CREATE DATABASE "{source}"')
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
    pg_dump, pg_restore = pgtools.pg_dump_for(major), pgtools.pg_restore_for(major)
    env = {**os.environ, "DATABASE_URL": source_url.render_as_string(hide_password=False)}
    libpq = pgtools.libpq_env(source_url)
    out = Path(tempfile.mkdtemp(prefix="opslib-bench-"))
    t: dict[str, list[float]] = {k: [] for k in ("pg_dump", "backup", "pg_restore", "verify", "clone")}
    sizes: dict[str, int] = {}
    try:
        for i in range(REPEATS):
            bare = out / f"bare{i}.dump"
            t["pg_dump"].append(_run([pg_dump.path, "-Fc", f"--file={bare}", source], libpq, cur))
            sizes["pg_dump -Fc"] = bare.stat().st_size
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
        sweep = {}
        for level in ("0", "1", "3", "6"):
            folder = out / f"z{level}"
            seconds = _run(
                [OPSLIB, "backup", "--out", str(folder)], {**env, "OPSLIB_BACKUP_COMPRESSION": level}
            )
            sweep[level] = (seconds, next(folder.glob("*.dump")).stat().st_size)
    finally:
        for name in made:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
        subprocess.run(["rm", "-rf", str(out)], check=False)
    m = {k: statistics.median(v) for k, v in t.items()}
    print(f"{rows} rows, PostgreSQL {major}, pg_dump/pg_restore {pg_dump.version}, medians of {REPEATS}")
    print(f"{'comparison':52} {'bare s':>8} {'opslib s':>9} {'ratio':>6}")
    for label, bare_key, ours_key in (
        ("opslib backup vs pg_dump -Fc", "pg_dump", "backup"),
        ("verify-backup --restore-test vs createdb+pg_restore", "pg_restore", "verify"),
        ("opslib clone vs createdb+pg_restore", "pg_restore", "clone"),
    ):
        print(f"{label:52} {m[bare_key]:8.2f} {m[ours_key]:9.2f} {m[ours_key] / m[bare_key]:6.2f}")
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
