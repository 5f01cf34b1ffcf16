"""Four eyes, measured: what a plan, a deploy held to it, and signed ledger entries cost, against the bare tools.

The project is a copy of ``tests/fixtures/longlived`` (160 revisions in the shape of a real project's history,
one of which reads data and cannot render offline) with a policy asking one approval in production, and keys made
here with ``ssh-keygen``. Each repeat, on fresh empty databases, each command a separate process, in alternating
order:

  alembic -c INI upgrade R --sql; upgrade X:head --sql  the bare offline render of the chain, around the revision X
                                                        that reads data (R is the one before it)
  opslib plan --env production --out PLAN.json         the plan: the same render, hashed, with the target's identity
  opslib run deploy -p backup false                     a development deploy (no plan, no signature)
  opslib run deploy -p backup false -p plan PLAN.json   the same, held to an approved plan, entries signed

and, in this process, `audit.check_ledger` of a ledger of 200 runs whose entries are signed, with and without
checking their signatures (``ssh-keygen -Y verify`` once per entry).

Goals: ``opslib plan`` <= the bare offline render + 1.5 s (a process with opslib's imports, the target's
identity, the file hashes); the held deploy <= the plain deploy + 0.5 s (the plan compared from the render
the checks already made, its approvals verified, two entries signed); checking a signature <= 20 ms per entry.

  python benchmarks/bench_approvals.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg2
from alembic.config import Config
from alembic.script import ScriptDirectory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_migrate import BIN, _environ, _ini_with_url, _run, _scratch_database  # noqa: E402

from opslib import audit, db, sshsig  # noqa: E402
from opslib.config import load_settings  # noqa: E402
from opslib.policy import load_approval_policy  # noqa: E402
from opslib.record import RunRecord  # noqa: E402

REPEATS = 5
LEDGER_RUNS = 200
FIXTURE = ROOT / "tests" / "fixtures" / "longlived"
GOALS = {"plan": 1.5, "held deploy": 0.5, "signature ms": 20.0}


def _keys(folder: Path, project: Path) -> dict[str, Path]:
    """The operator's and an approver's keys, listed in the project's allowed_signers."""
    keys = {}
    for name in ("op", "alice"):
        keys[name] = folder / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys[name])], check=True)
    lines = [f"{name}@example.com {(folder / f'{name}.pub').read_text().strip()}" for name in keys]
    (project / "allowed_signers").write_text("\n".join(lines) + "\n")
    return keys


def _bare_render(ini: Path, url: str, env: dict, work: Path) -> float:
    """Seconds of Alembic's own offline render of the whole chain: as it cannot render the revision that reads
    data, the range before it and the range after it, two commands (what opslib's render does in one go)."""
    reader = json.loads((ini.parent / "landmarks.json").read_text())["reads_data"]
    before = ScriptDirectory.from_config(Config(str(ini))).get_revision(reader).down_revision
    copy = _ini_with_url(ini, url)
    alembic = [str(BIN / "alembic"), "-c", str(copy), "upgrade"]
    try:
        return sum(_run([*alembic, span, "--sql"], env, work, sql_out=True)[0] for span in (str(before), f"{reader}:head"))
    finally:
        copy.unlink(missing_ok=True)


def _one_repeat(server, admin, ini: Path, keys: dict[str, Path], work: Path, order: tuple[str, ...]) -> dict[str, float]:
    """Seconds of each series on fresh databases, in ``order``."""
    work.mkdir()
    seconds: dict[str, float] = {}
    base = {"OPSLIB_ALEMBIC_INI": str(ini), "OPSLIB_RECORDS_DIR": str(work / "records"), "OPSLIB_OPERATOR": "op",
            "OPSLIB_BACKUPS_DIR": str(work / "backups"), "OPSLIB_STATE_DIR": str(work / "state")}  # fmt: skip
    opslib = str(BIN / "opslib")
    for which in order:
        with _scratch_database(server, admin) as target:
            url = target.set(drivername="postgresql").render_as_string(hide_password=False)
            env = _environ(DATABASE_URL=url, **base)
            if which == "render":
                seconds[which] = _bare_render(ini, url, env, work)
            elif which == "plan":
                seconds[which] = _run([opslib, "plan", "--env", "production", "--out", str(work / "PLAN.json")], env, work)[0]
            elif which == "deploy":
                seconds[which] = _run([opslib, "run", "deploy", "-p", "backup", "false"], env, work)[0]
            else:  # held: planned for this database, approved by alice, run by op with op's key
                plan = work / "HELD.json"
                _run([opslib, "plan", "-p", "backup", "false", "--out", str(plan)], env, work)
                _run([opslib, "approve", str(plan), "--key", str(keys["alice"])], env, work)
                held_env = {**env, "OPSLIB_SIGNING_KEY": str(keys["op"])}
                seconds[which] = _run([opslib, "run", "deploy", "-p", "backup", "false", "-p", "plan", str(plan)], held_env, work)[0]
                ending = audit.read_endings(work / "records")[-1]
                if ending["outcome"] != "succeeded" or not ending.get("signature"):
                    raise RuntimeError(f"the held deploy {ending['outcome']}: {ending.get('error')}")
    return seconds


def _ledger_check(scratch: Path, keys: dict[str, Path], ini: Path) -> tuple[float, float]:
    """Seconds of check_ledger over LEDGER_RUNS signed runs, without and with checking their signatures."""
    records = scratch / "ledger"
    needs = load_approval_policy(ini)
    signer, _ = sshsig.signer(keys["op"], needs.signers_file)
    for i in range(LEDGER_RUNS):
        record = RunRecord(f"{i:08x}", "deploy", "op", "production", audit.iso(audit.now()))
        stem = audit.record_stem("deploy", record.run_id, audit.now())
        audit.append_started(records, stem, record, "off", signer)
        record.end("succeeded", 0, None, audit.iso(audit.now()))
        audit.write_sidecar(records, stem, record)
        audit.append_ledger(records, stem, record, signer)
    timed = []
    for given in (None, needs):
        start = time.perf_counter()
        check = audit.check_ledger(records, approvals=given)
        timed.append(time.perf_counter() - start)
        if check.problems:
            raise RuntimeError(f"the synthetic ledger has problems: {check.problems[:3]}")
    return timed[0], timed[1]


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
    scratch = Path(tempfile.mkdtemp(prefix="opslib_bench_approvals_"))
    series: dict[str, list[float]] = {"render": [], "plan": [], "deploy": [], "held": []}
    try:
        project = scratch / "longlived"
        shutil.copytree(FIXTURE, project, ignore=shutil.ignore_patterns("__pycache__"))
        (project / "opslib.toml").write_text("[approvals]\nproduction = 1\n")
        keys = _keys(scratch, project)
        ini = project / "alembic.ini"
        revisions = json.loads((project / "landmarks.json").read_text())["revisions"]
        for r in range(args.repeats):
            order = tuple(series) if r % 2 == 0 else tuple(reversed(series))
            for name, seconds in _one_repeat(server, admin, ini, keys, scratch / f"run{r}", order).items():
                series[name].append(seconds)
        unsigned_check, signed_check = _ledger_check(scratch, keys, ini)
    finally:
        admin.close()
        shutil.rmtree(scratch, ignore_errors=True)
    m = {k: statistics.median(v) for k, v in series.items()}
    per_entry_ms = (signed_check - unsigned_check) / (2 * LEDGER_RUNS) * 1000
    figures = {"plan": m["plan"] - m["render"], "held deploy": m["held"] - m["deploy"], "signature ms": per_entry_ms}
    print(f"long-lived chain (tests/fixtures/longlived, {revisions} revisions), {args.repeats} repeat(s), medians in seconds, "
          f"server {db.redact_url(server)}")  # fmt: skip
    print(f"  bare `alembic upgrade head --sql`        {m['render']:7.3f}")
    print(f"  `opslib plan`                            {m['plan']:7.3f}   +{figures['plan']:.3f} s, ratio {m['plan'] / m['render']:.2f}")
    print(f"  `opslib run deploy` (no plan)            {m['deploy']:7.3f}")
    print(f"  `opslib run deploy -p plan` (signed)     {m['held']:7.3f}   +{figures['held deploy']:.3f} s, ratio {m['held'] / m['deploy']:.2f}")
    print(f"  check_ledger of {LEDGER_RUNS} signed runs: {unsigned_check:.3f} s without the signatures, {signed_check:.3f} s "
          f"with them: {per_entry_ms:.1f} ms per entry")  # fmt: skip
    met = True
    for name, goal in GOALS.items():
        ok = figures[name] <= goal
        met &= ok
        print(f"  goal {name}: {figures[name]:.3f} <= {goal}: {'met' if ok else 'NOT MET'}")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
