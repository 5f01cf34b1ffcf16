"""opslib audit report against bare nbconvert on the same executed notebooks, in one run; printed as ratios.

One real deploy run (`opslib run deploy` on a scratch database) is recorded, then its notebook and sidecar
are copied into records with their own run ids and ledger entries (the ledger check passes). Timed, each
a separate process as users run it, medians of REPEATS:

1. A first build of RUNS records:
     jupyter nbconvert --to html --template lab <every notebook>   (one process for all of them)
     opslib audit report --out <a new folder>                    (ledger check, index, one page per run)
   Goal: ratio <= 1.2. opslib renders the same notebooks through the same exporter, and adds the ledger check
   (a sha256 of every file), the facts section and the index; it writes JupyterLab's CSS once.
2. The records grown to LARGE runs and reported once; then, REPEATS times, one new run is added and:
     jupyter nbconvert --to html --template lab <the new notebook>
     opslib audit report --out <the same folder>                 (renders the new page, keeps the others)
   Goal: opslib <= 3 s, whatever the ledger's length: the new run's page is the only one rendered.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
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

from opslib import audit, db  # noqa: E402
from opslib.config import load_settings  # noqa: E402

BIN = Path(sys.executable).parent
RUNS = 40
LARGE = 1000
REPEATS = 5


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    # The copied records are made here, not by runs: no witness holds them (the real run's would not match).
    env["OPSLIB_LEDGER_WITNESS"] = "off"
    env.update(extra)
    return env


def _one_real_run(work: Path, url: str) -> str:
    subprocess.run(
        [str(BIN / "opslib"), "run", "deploy"],
        cwd=work,
        env=_env(DATABASE_URL=url, OPSLIB_ALEMBIC_INI=str(ROOT / "alembic.ini")),
        check=True,
        capture_output=True,
    )
    return audit.read_ledger(work / "records")[0]["sidecar"].removesuffix(".json")


def _copies(records: Path, stem: str, first: int, last: int) -> list[Path]:
    """Records ``first`` to ``last`` made from the real one, each with its own id, files and ledger entries;
    returns their notebooks."""
    record = audit.load_record(records, stem)
    notebook = (records / f"{stem}.ipynb").read_text()
    made = []
    for i in range(first, last + 1):
        run_id = f"{i:08x}"
        copy_stem = f"{stem.rsplit('_', 1)[0]}_{run_id}"
        copy = dataclasses.replace(record, run_id=run_id, notebook=f"{copy_stem}.ipynb")
        audit.append_started(records, copy_stem, copy)  # as every run: its start first, then its ending
        (records / f"{copy_stem}.ipynb").write_text(notebook.replace(record.run_id, run_id))
        audit.write_sidecar(records, copy_stem, copy)
        audit.append_ledger(records, copy_stem, copy)
        made.append(records / f"{copy_stem}.ipynb")
    assert audit.verify_ledger(records) == [], "the copied records should pass the ledger check"
    return made


def _timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=_env(), check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    """Run the comparison and print medians and the ratio."""
    server = db.target_url(load_settings()).set(database="postgres")
    admin = psycopg2.connect(server.set(drivername="postgresql").render_as_string(hide_password=False))
    admin.autocommit = True
    name = f"opslib_bench_{uuid.uuid4().hex[:8]}"
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    work = Path(tempfile.mkdtemp(prefix="opslib-bench-report-"))
    try:
        stem = _one_real_run(work, server.set(database=name).render_as_string(hide_password=False))
        records = work / "records"
        notebooks = [records / f"{stem}.ipynb", *_copies(records, stem, 1, RUNS - 1)]
        bare_cmd = [
            str(BIN / "jupyter-nbconvert"), "--to", "html", "--template", "lab",
            "--output-dir", str(work / "bare"), *map(str, notebooks),
        ]  # fmt: skip
        ours_cmd = [str(BIN / "opslib"), "audit", "report", "--out", str(work / "report")]
        bare, ours = [], []
        for _ in range(REPEATS):
            shutil.rmtree(work / "bare", ignore_errors=True)
            shutil.rmtree(work / "report", ignore_errors=True)  # a first build each time
            bare.append(_timed(bare_cmd, work))
            ours.append(_timed(ours_cmd, work))
        pages = len(list((work / "report" / "runs").glob("*.html")))
        size_bare = sum(p.stat().st_size for p in (work / "bare").glob("*.html"))
        size_ours = sum(p.stat().st_size for p in (work / "report").rglob("*") if p.is_file())

        _copies(records, stem, RUNS, LARGE - 1)
        first_large = _timed(ours_cmd, work)
        one_bare, one_ours = [], []
        for n in range(REPEATS):
            new = _copies(records, stem, LARGE + n, LARGE + n)
            one_bare.append(_timed([*bare_cmd[:7], str(new[0])], work))
            one_ours.append(_timed(ours_cmd, work))
        large_pages = len(list((work / "report" / "runs").glob("*.html")))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"{RUNS} deploy records ({pages} run pages), {REPEATS} repeats, medians")
    print(f"{'tool':34} {'seconds':>8} {'output MB':>10}")
    print(f"{'jupyter nbconvert --to html':34} {b:8.2f} {size_bare / 1e6:10.1f}")
    print(f"{'opslib audit report':34} {o:8.2f} {size_ours / 1e6:10.1f}")
    print(f"ratio opslib / nbconvert: {o / b:.2f} (goal <= 1.2)")
    ob, oo = statistics.median(one_bare), statistics.median(one_ours)
    print()
    print(f"{LARGE} records: first build {first_large:.2f} s; then one new run, {REPEATS} times ({large_pages} pages at the end)")
    print(f"{'jupyter nbconvert --to html (the new one)':42} {ob:8.2f}")
    print(f"{'opslib audit report (incremental)':42} {oo:8.2f}")
    print(f"ratio opslib / nbconvert: {oo / ob:.2f}; opslib {oo:.2f} s (goal <= 3 s)")
    return 0 if oo <= 3 else 1


if __name__ == "__main__":
    sys.exit(main())
