"""opslib upgrade/downgrade against bare Alembic, on the sample chain and on generated long chains; printed as ratios.

Part 1, the sample chain (7 revisions). Each repeat creates a fresh database, then times, as separate
processes the way users run them:
  alembic upgrade head   vs   opslib upgrade head
  alembic downgrade base vs   opslib downgrade base
Goal: ratio <= 1.5 (opslib adds a lock, validation and before/after reads on top of Alembic's own start-up).

Part 2, generated chains of N revisions (``--sizes``, default 10,50,200): the long-lived project of
``tests/fixtures/longlived_project.py`` without its faults (Alembic's generic env.py, whose
``sqlalchemy.url`` is a placeholder opslib replaces in memory). For each N, REPEATS times, each on a
fresh empty database and as a separate process:
  alembic -c INI upgrade head                   (INI: a copy with the real URL, beside the original)
  alembic -c INI upgrade base:head --sql        (output discarded: what a preflight renders)
  opslib upgrade head                           (DATABASE_URL, OPSLIB_ALEMBIC_INI = the original ini)
  opslib run deploy                             (same, records and backups in a scratch folder)
and the deploy's step durations (preflight, backup, upgrade, verify) from its record. From least-squares
lines over N: the per-revision cost of each (goal: deploy's upgrade step <= 1.2 x bare), the runbook's fixed
overhead over bare (intercept of deploy wall - bare wall; goal <= 1.5 s), and the preflight at the largest N
against bare --sql there (goal <= 1.2).

The target server is the one DATABASE_URL points at (its database is only used to create and drop
scratch databases), else the embedded server.

  python benchmarks/bench_migrate.py [--chain-only] [--sizes 10,50,200] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psycopg2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opslib import db  # noqa: E402
from opslib.config import load_settings  # noqa: E402
from tests.fixtures.longlived_project import write_project  # noqa: E402

BIN = Path(sys.executable).parent
REPEATS = 5  # the sample chain
CHAIN_REPEATS = 3  # each generated chain
DEPLOY_STEPS = ("preflight", "backup", "upgrade", "verify")


def _timed(cmd: list[str], url: str) -> float:
    env = {"PATH": str(BIN) + ":/usr/bin:/bin", "DATABASE_URL": url}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def sample_chain(server, admin, repeats: int) -> None:
    """Part 1: the sample chain, alembic against opslib, upgrade head and downgrade base."""
    pairs = {
        "upgrade head": (["alembic", "upgrade", "head"], ["opslib", "upgrade", "head"]),
        "downgrade base": (["alembic", "downgrade", "base"], ["opslib", "downgrade", "base"]),
    }
    times: dict[str, dict[str, list[float]]] = {k: {"bare": [], "opslib": []} for k in pairs}
    for _ in range(repeats):
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
    print(f"sample chain (7 revisions), {repeats} repeats, medians, server {db.redact_url(server)}")
    print(f"{'operation':16} {'alembic s':>10} {'opslib s':>10} {'ratio':>7}")
    for label, t in times.items():
        bare, ours = statistics.median(t["bare"]), statistics.median(t["opslib"])
        print(f"{label:16} {bare:10.3f} {ours:10.3f} {ours / bare:7.2f}")


# --- part 2: generated chains ---------------------------------------------------------------------


@contextmanager
def _scratch_database(server, admin) -> Iterator:
    """A fresh empty database on the server; dropped afterwards."""
    name = f"opslib_bench_{uuid.uuid4().hex[:8]}"
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name)
    finally:
        admin.cursor().execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def _environ(**extra: str) -> dict:
    """This process's environment without opslib's settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSLIB_") and k != "DATABASE_URL"}
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "/usr/bin:/bin")
    env.update(extra)
    return env


def _run(
    cmd: list[str], env: dict, cwd: Path, *, check: bool = True, sql_out: bool = False
) -> tuple[float, int]:
    """Wall time and exit code of one command, run as a separate process."""
    start = time.perf_counter()
    if sql_out:
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    else:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True)
    seconds = time.perf_counter() - start
    if check and done.returncode != 0:
        tail = (done.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {' | '.join(tail)}")
    return seconds, done.returncode


def _ini_with_url(ini: Path, url: str) -> Path:
    """A copy of ``ini`` beside it (script_location is %(here)s) whose sqlalchemy.url is ``url``."""
    lines = ini.read_text().splitlines()
    # configparser interpolates %: a password with % in it must be doubled.
    lines = [
        f"sqlalchemy.url = {url.replace('%', '%%')}" if ln.startswith("sqlalchemy.url") else ln
        for ln in lines
    ]
    copy = ini.with_name(f"alembic.bench-{uuid.uuid4().hex[:8]}.ini")
    copy.write_text("\n".join(lines) + "\n")
    return copy


def _deploy_record(records: Path) -> dict:
    """The newest run record (sidecar JSON) in ``records``."""
    sidecars = sorted(records.glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not sidecars:
        return {"outcome": "no record", "exit_code": None, "error": "the run wrote no record", "steps": []}
    return json.loads(sidecars[-1].read_text())


def _measure_chain(server, admin, n: int, repeats: int, scratch: Path) -> dict:
    """Part 2 for one chain length: lists of seconds per series, and the deploys' failures."""
    project = scratch / f"chain{n}"
    write_project(project, n, faults=False)
    ini = project / "alembic.ini"
    series: dict[str, list[float]] = {k: [] for k in ("bare", "bare_sql", "opslib", "deploy", *DEPLOY_STEPS)}
    revs_applied: list[int] = []
    failures: list[str] = []
    for r in range(repeats):
        # bare alembic upgrade head, then the offline rendering with the same ini (it never connects)
        with _scratch_database(server, admin) as target:
            copy = _ini_with_url(ini, target.render_as_string(hide_password=False))
            try:
                env = _environ()
                series["bare"].append(
                    _run([str(BIN / "alembic"), "-c", str(copy), "upgrade", "head"], env, scratch)[0]
                )
                series["bare_sql"].append(
                    _run(
                        [str(BIN / "alembic"), "-c", str(copy), "upgrade", "base:head", "--sql"],
                        env,
                        scratch,
                        sql_out=True,
                    )[0]
                )
            finally:
                copy.unlink(missing_ok=True)
        # opslib upgrade head
        with _scratch_database(server, admin) as target:
            url = target.set(drivername="postgresql").render_as_string(hide_password=False)
            env = _environ(DATABASE_URL=url, OPSLIB_ALEMBIC_INI=str(ini))
            series["opslib"].append(_run([str(BIN / "opslib"), "upgrade", "head"], env, scratch)[0])
        # opslib run deploy
        with _scratch_database(server, admin) as target:
            url = target.set(drivername="postgresql").render_as_string(hide_password=False)
            work = scratch / f"deploy{n}_{r}"
            work.mkdir()
            env = _environ(
                DATABASE_URL=url,
                OPSLIB_ALEMBIC_INI=str(ini),
                OPSLIB_RECORDS_DIR=str(work / "records"),
                OPSLIB_BACKUPS_DIR=str(work / "backups"),
            )
            seconds, code = _run([str(BIN / "opslib"), "run", "deploy"], env, work, check=False)
            record = _deploy_record(work / "records")
            if code != 0 or record.get("exit_code"):
                failures.append(
                    f"N={n} repeat {r + 1}: deploy {record.get('outcome')} (exit {code}): {record.get('error')}"
                )
                continue
            series["deploy"].append(seconds)
            steps = {s["name"]: s.get("duration_s") for s in record.get("steps", [])}
            for name in DEPLOY_STEPS:
                if steps.get(name) is not None:
                    series[name].append(float(steps[name]))
            revs_applied.append(sum(1 for s in record.get("steps", []) if s["name"].startswith("upgrade ")))
    return {"n": n, "series": series, "revs": revs_applied, "failures": failures}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _line(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Slope and intercept of the least-squares line through (N, seconds), or None below two sizes."""
    if len({n for n, _ in points}) < 2:
        return None
    fit = statistics.linear_regression([float(n) for n, _ in points], [s for _, s in points])
    return fit.slope, fit.intercept


def _fmt(value: float | None, width: int, digits: int = 3) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def generated_chains(server, admin, sizes: list[int], repeats: int) -> None:
    """Part 2: the table of medians per N, the deploys that failed, and the derived figures."""
    scratch = Path(tempfile.mkdtemp(prefix="opslib_bench_chains_"))
    try:
        results = [_measure_chain(server, admin, n, repeats, scratch) for n in sizes]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(
        f"generated chains (tests/fixtures/longlived_project.py, faults off), {repeats} repeat(s), "
        f"medians in seconds, server {db.redact_url(server)}"
    )
    head = (
        f"{'N':>5} {'bare up':>8} {'bare sql':>8} {'opslib up':>9} {'deploy':>8} "
        f"{'preflight':>9} {'backup':>8} {'upgrade':>8} {'verify':>8} {'revs':>5} {'deploys ok':>10}"
    )
    print(head)
    medians: dict[int, dict[str, float | None]] = {}
    for res in results:
        n, s = res["n"], res["series"]
        m = {k: _median(v) for k, v in s.items()}
        medians[n] = m
        revs = ",".join(sorted({str(x) for x in res["revs"]})) or "-"
        ok = f"{len(s['deploy'])}/{repeats}"
        print(
            f"{n:5d} {_fmt(m['bare'], 8)} {_fmt(m['bare_sql'], 8)} {_fmt(m['opslib'], 9)} {_fmt(m['deploy'], 8)} "
            f"{_fmt(m['preflight'], 9)} {_fmt(m['backup'], 8)} {_fmt(m['upgrade'], 8)} {_fmt(m['verify'], 8)} "
            f"{revs:>5} {ok:>10}"
        )
    for res in results:
        for line in res["failures"]:
            print(f"  not counted: {line}")

    def points(key: str) -> list[tuple[int, float]]:
        return [(n, m[key]) for n, m in medians.items() if m[key] is not None]

    def per_revision(key: str) -> float | None:
        fit = _line(points(key))
        return fit[0] * 1000 if fit else None

    bare, ours, step = per_revision("bare"), per_revision("opslib"), per_revision("upgrade")

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a is not None and b else "n/a"

    print()
    print("per-revision cost (slope of a least-squares line over N), ms/revision:")
    print(f"  bare alembic upgrade head      {_fmt(bare, 7, 2)}")
    print(f"  opslib upgrade head            {_fmt(ours, 7, 2)}   ratio to bare {ratio(ours, bare)}")
    print(
        f"  deploy's upgrade step          {_fmt(step, 7, 2)}   ratio to bare {ratio(step, bare)} (goal <= 1.2)"
    )
    gaps = [(n, m["deploy"] - m["bare"]) for n, m in medians.items() if m["deploy"] is not None and m["bare"]]
    fit = _line(gaps)
    if fit:
        print(
            f"runbook fixed overhead over bare (intercept of deploy wall - bare wall): {fit[1]:.2f} s "
            f"(goal <= 1.5 s; slope {fit[0] * 1000:.2f} ms/revision)"
        )
    else:
        print("runbook fixed overhead over bare: n/a (needs successful deploys at two sizes or more)")
    top = max(medians)
    pre, sql = medians[top]["preflight"], medians[top]["bare_sql"]
    if pre is not None and sql:
        print(
            f"preflight at N={top} vs bare --sql at N={top}: {pre:.3f} s / {sql:.3f} s = {pre / sql:.2f} (goal <= 1.2)"
        )
    else:
        print(f"preflight at N={top} vs bare --sql: n/a (no successful deploy at N={top})")


def main(argv: list[str] | None = None) -> int:
    """Run the comparisons and print tables of medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chain-only", action="store_true", help="skip the sample chain (part 1)")
    parser.add_argument(
        "--sizes", default="10,50,200", help="lengths of the generated chains (default 10,50,200)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"repeats of each measurement (default {REPEATS} on the sample chain, {CHAIN_REPEATS} per generated chain)",
    )
    args = parser.parse_args(argv)
    try:
        sizes = sorted({int(x) for x in args.sizes.split(",") if x.strip()})
    except ValueError:
        parser.error(f"--sizes takes numbers separated by commas, not {args.sizes!r}")
    if not sizes or min(sizes) < 2:
        parser.error("--sizes: each chain needs at least 2 revisions")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    server = db.target_url(load_settings()).set(database="postgres")
    admin = psycopg2.connect(server.set(drivername="postgresql").render_as_string(hide_password=False))
    admin.autocommit = True
    try:
        if not args.chain_only:
            sample_chain(server, admin, args.repeats or REPEATS)
        generated_chains(server, admin, sizes, args.repeats or CHAIN_REPEATS)
    finally:
        admin.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
