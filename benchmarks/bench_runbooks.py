"""The deploy and rollback runbooks against bare Alembic on a long-lived chain; printed as differences and ratios.

The project is a copy of ``tests/fixtures/longlived`` (160 revisions in the shape of a real project's
history: Alembic's generic env.py, one-word messages, printing and logging revisions, a revision that
reads data). Each repeat, on fresh empty databases and each command a separate process, as users run
them, in alternating order:

  alembic -c INI upgrade head          then   alembic -c INI downgrade -1
  opslib run deploy -p backup false    then   opslib run rollback -p backup false

(INI is a copy of the project's alembic.ini with the database's URL; opslib reads DATABASE_URL and the
original.) Each opslib run has a fresh work folder and state folder, as in a CI job on a clean checkout:
nothing is cached from an earlier run.

Goals: the deploy without a backup <= bare ``alembic upgrade head`` + 1.5 s; the rollback of
one revision <= bare ``alembic downgrade -1`` + 1.5 s. The runbooks' step durations come from their
records; "outside the steps" is the rest of the wall time (the command's start, the kernel's start
and its imports, the notebook's saves).

  python benchmarks/bench_runbooks.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_migrate import BIN, _environ, _ini_with_url, _run, _scratch_database  # noqa: E402

from opslib import db  # noqa: E402
from opslib.config import load_settings  # noqa: E402

REPEATS = 7
GOAL_S = 1.5
FIXTURE = ROOT / "tests" / "fixtures" / "longlived"


def _newest_record(records: Path) -> dict:
    sidecars = sorted(records.glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not sidecars:
        raise RuntimeError(f"no run record in {records}")
    return json.loads(sidecars[-1].read_text())


def _bare(server, admin, ini: Path, scratch: Path) -> tuple[float, float]:
    """Seconds of bare ``alembic upgrade head`` from empty, then of ``alembic downgrade -1``."""
    with _scratch_database(server, admin) as target:
        copy = _ini_with_url(ini, target.render_as_string(hide_password=False))
        try:
            alembic = str(BIN / "alembic")
            up = _run([alembic, "-c", str(copy), "upgrade", "head"], _environ(), scratch)[0]
            down = _run([alembic, "-c", str(copy), "downgrade", "-1"], _environ(), scratch)[0]
        finally:
            copy.unlink(missing_ok=True)
    return up, down


def _runbooks(server, admin, ini: Path, work: Path) -> tuple[float, dict, float, dict]:
    """Seconds and record of ``opslib run deploy`` (no backup) from empty, then of the rollback."""
    work.mkdir()
    with _scratch_database(server, admin) as target:
        env = _environ(
            DATABASE_URL=target.set(drivername="postgresql").render_as_string(hide_password=False),
            OPSLIB_ALEMBIC_INI=str(ini),
            OPSLIB_RECORDS_DIR=str(work / "records"),
            OPSLIB_BACKUPS_DIR=str(work / "backups"),
            OPSLIB_STATE_DIR=str(work / "state"),
        )
        opslib = str(BIN / "opslib")
        deploy = _run([opslib, "run", "deploy", "-p", "backup", "false"], env, work)[0]
        deployed = _newest_record(work / "records")
        rollback = _run([opslib, "run", "rollback", "-p", "backup", "false"], env, work)[0]
        rolled = _newest_record(work / "records")
    for record in (deployed, rolled):
        if record["outcome"] != "succeeded":
            raise RuntimeError(f"{record['runbook']} {record['outcome']}: {record.get('error')}")
    return deploy, deployed, rollback, rolled


def _section_seconds(record: dict) -> dict[str, float]:
    """The runbook's sections (not the per-revision steps) and their durations."""
    return {
        s["name"]: float(s["duration_s"])
        for s in record["steps"]
        if " " not in s["name"] and s.get("duration_s") is not None
    }


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the medians, the differences and the goals."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"repeats (default {REPEATS})")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    server = db.target_url(load_settings()).set(database="postgres")
    admin = psycopg2.connect(server.set(drivername="postgresql").render_as_string(hide_password=False))
    admin.autocommit = True
    scratch = Path(tempfile.mkdtemp(prefix="opslib_bench_runbooks_"))
    times: dict[str, list[float]] = {"bare up": [], "deploy": [], "bare down -1": [], "rollback": []}
    sections: dict[str, dict[str, list[float]]] = {"deploy": {}, "rollback": {}}
    try:
        project = scratch / "longlived"
        shutil.copytree(FIXTURE, project, ignore=shutil.ignore_patterns("__pycache__"))
        ini = project / "alembic.ini"
        revisions = json.loads((project / "landmarks.json").read_text())["revisions"]
        for r in range(args.repeats):
            order = ("bare", "opslib") if r % 2 == 0 else ("opslib", "bare")
            for which in order:
                if which == "bare":
                    up, down = _bare(server, admin, ini, scratch)
                    times["bare up"].append(up)
                    times["bare down -1"].append(down)
                    continue
                deploy, deployed, rollback, rolled = _runbooks(server, admin, ini, scratch / f"run{r}")
                times["deploy"].append(deploy)
                times["rollback"].append(rollback)
                for name, record in (("deploy", deployed), ("rollback", rolled)):
                    for section, seconds in _section_seconds(record).items():
                        sections[name].setdefault(section, []).append(seconds)
    finally:
        admin.close()
        shutil.rmtree(scratch, ignore_errors=True)

    m = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"long-lived chain (tests/fixtures/longlived, {revisions} revisions), {args.repeats} repeat(s), "
        f"medians in seconds, server {db.redact_url(server)}"
    )
    print(f"{'command':40} {'median s':>9} {'min s':>7} {'max s':>7}")
    for key, label in (
        ("bare up", "alembic upgrade head (from empty)"),
        ("deploy", "opslib run deploy -p backup false"),
        ("bare down -1", "alembic downgrade -1 (from head)"),
        ("rollback", "opslib run rollback -p backup false"),
    ):
        print(f"{label:40} {m[key]:9.3f} {min(times[key]):7.3f} {max(times[key]):7.3f}")
    for name, wall in (("deploy", m["deploy"]), ("rollback", m["rollback"])):
        medians = {k: statistics.median(v) for k, v in sections[name].items()}
        inside = sum(medians.values())
        shown = ", ".join(f"{k} {v:.3f}" for k, v in medians.items())
        print(f"{name} sections: {shown}; outside the sections {wall - inside:.3f}")
    print()
    for name, bare, label in (("deploy", "bare up", "upgrade head"), ("rollback", "bare down -1", "downgrade -1")):
        extra = m[name] - m[bare]
        verdict = "met" if extra <= GOAL_S else "NOT met"
        print(
            f"{name} - bare alembic {label}: +{extra:.2f} s, ratio {m[name] / m[bare]:.2f} "
            f"(goal <= +{GOAL_S} s: {verdict})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
