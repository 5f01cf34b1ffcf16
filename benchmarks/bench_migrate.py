"""opslib upgrade/downgrade against bare Alembic, on the sample chain, in one run; printed as ratios.

Each repeat creates a fresh database, then times, as separate processes the way users run them:
  alembic upgrade head   vs   opslib upgrade head
  alembic downgrade base vs   opslib downgrade base
The target server is the one DATABASE_URL points at (its database is only used to create and drop
scratch databases), else the embedded server. Goal: ratio <= 1.5 (opslib adds a lock, validation and
before/after reads on top of Alembic's own start-up).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opslib import db  # noqa: E402
from opslib.config import load_settings  # noqa: E402

BIN = Path(sys.executable).parent
REPEATS = 5


def _timed(cmd: list[str], url: str) -> float:
    env = {"PATH": str(BIN) + ":/usr/bin:/bin", "DATABASE_URL": url}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    """Run the comparison and print a table of medians and ratios."""
    server = db.target_url(load_settings()).set(database="postgres")
    admin = psycopg2.connect(server.set(drivername="postgresql").render_as_string(hide_password=False))
    admin.autocommit = True
    pairs = {
        "upgrade head": (["alembic", "upgrade", "head"], ["opslib", "upgrade", "head"]),
        "downgrade base": (["alembic", "downgrade", "base"], ["opslib", "downgrade", "base"]),
    }
    times: dict[str, dict[str, list[float]]] = {k: {"bare": [], "opslib": []} for k in pairs}
    for _ in range(REPEATS):
        for tool in ("bare", "opslib"):
            name = f"opslib_bench_{uuid.uuid4().hex[:8]}"
            admin.cursor().execute(f'CREATE DATABASE "{name}"')
            url = server.set(database=name).render_as_string(hide_password=False)
            try:
                for label, (bare, ours) in pairs.items():
                    cmd = bare if tool == "bare" else ours
                    times[label][tool].append(_timed([str(BIN / cmd[0]), *cmd[1:]], url))
            finally:
                admin.cursor().execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.close()
    print(f"sample chain (7 revisions), {REPEATS} repeats, medians, server {db.redact_url(server)}")
    print(f"{'operation':16} {'alembic s':>10} {'opslib s':>10} {'ratio':>7}")
    for label, t in times.items():
        bare, ours = statistics.median(t["bare"]), statistics.median(t["opslib"])
        print(f"{label:16} {bare:10.3f} {ours:10.3f} {ours / bare:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
