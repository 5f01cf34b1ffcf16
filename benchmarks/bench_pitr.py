"""opslib's pgBackRest gate and point-in-time recovery against pg_dump -Fc and pg_restore, in one run; printed as ratios.

On the embedded server (PostgreSQL 18, from the wheel), in a fresh state folder of its own (stopped and removed
at the end, whatever DATABASE_URL says), a generated database grown to each of SIZES (default 0.5, 1 and 2 GB as
pg_database_size counts them; `--sizes 0.1,0.2` for a quick run): a table of events with a text payload (one
INSERT … SELECT FROM generate_series, WAL-logged) beside two small ones. It grows with archiving off, so that the
growth's WAL does not wait for the archiver (untimed: VACUUM ANALYZE, CHECKPOINT); then `opslib db start
--archive` restarts it archiving WAL with pgBackRest, and a full pgBackRest backup is taken and timed, for
information. Then, medians of REPEATS (default 3) and of GATES (default 15) at each size:

  1. physical.gate (restore point, WAL switch, archived: its gate_s)   vs  pg_dump -Fc (a separate process)
     goal: gate <= 5 % of pg_dump at every size (medians), and constant: the mean gate at the largest size / at
     the smallest <= 1.5. The mean, not the median: opslib polls pg_stat_archiver after 5, 10, 20, 40, 80, then
     every 100 ms, so a gate lands on one of two steps about 0.09 s apart, and a median jumps between them.
     Beside each gate, in alternating order, the same by hand (bare): pg_create_restore_point, pg_switch_wal,
     pg_stat_archiver read every 5 ms until the segment is archived, which is what the archiver and pgBackRest's
     archive-push cost on the machine at that moment
     (the gate takes no backup here: one exists; its backup_s is printed, and counts_s, the reading of exact row
     counts in the point's snapshot, which grows with the database and is not part of the goal; one gate at
     each size also keeps the tables' checksums, [backup] table_checksums, printed as its own figure)
  2. pitr.recover to the last gate's point (pgBackRest restore, WAL replay, start, until promoted; compared
     with the gate's counts and checksums, untimed)
     vs  createdb + pg_restore of the largest size's dump into a new database on the same server, in
     alternating order; the server's archiving is off by then (restarted, untimed), so that pg_restore does not
     share the two cores with the archiver pushing its WAL: the bare tool at its fastest
     goal: recovery <= pg_restore (at the largest size); the recovered database equal to what the gate read
  3. exact recovery under writes, end to end with the opslib command: a small Alembic project (200,000 items;
     revision 0002 deletes a third of them), a writer inserting one row per transaction throughout
     `opslib run deploy -p backup_method pgbackrest` (policy table_checksums = true), then
     `opslib run recovery -p mode pitr -p apply new_database`; PASS when the recovery said equal (every table's
     rows and checksums as at the gate) and the recovered copy holds every row the revision deleted, a gapless
     prefix of the writer's rows, and every row acknowledged before the gate's time.

Each command that users run as a process is timed as one; a CHECKPOINT (untimed) comes before each measurement,
so that no side pays for the other's dirty buffers. Never a timed test: figures and ratios are printed.

  python benchmarks/bench_pitr.py [--sizes 0.5,1,2] [--repeats 3] [--gates 15] [--skip-exact]
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import psycopg2
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opslib import db, embedded, pgbackrest, pgtools  # noqa: E402
from opslib.backup import physical, pitr  # noqa: E402
from opslib.backup.manifest import row_counts, table_checksums  # noqa: E402
from opslib.config import load_settings  # noqa: E402
from opslib.policy import BackupPolicy  # noqa: E402
from opslib.record import RestorePoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_backup import _run as _timed  # noqa: E402 - one timed process after an untimed CHECKPOINT, as there

OPSLIB = str(Path(sys.executable).parent / "opslib")
GB = 2**30  # as pg_size_pretty counts
REPEATS = 3
GATES = 15
SEED_ITEMS = 200_000
GATE_SHARE = 0.05  # goal: the gate at most 5 % of pg_dump's time
GATE_FLAT = 1.5  # goal: the mean gate at the largest size at most 1.5 times the mean at the smallest
POLICY = BackupPolicy(method="pgbackrest", row_counts=True, table_checksums=False)


def _environ(state: Path, **extra: str) -> dict:
    """The environment of an opslib process on the bench's own embedded server (no DATABASE_URL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(
        OPSLIB_STATE_DIR=str(state),
        OPSLIB_ALEMBIC_INI=str(ROOT / "alembic.ini"),
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    env.update(extra)
    return env


def _opslib(args: list[str], env: dict, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([OPSLIB, *args], env=env, capture_output=True, text=True, cwd=ROOT)
    if check and done.returncode != 0:
        raise RuntimeError(f"opslib {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done


def _libpq(url) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _archived(cur, timeout_s: float = 900) -> float:
    """Switch WAL and wait until every segment written so far is archived (untimed); the seconds waited."""
    start = time.perf_counter()
    # A record first, so that the current segment is never empty: pg_switch_wal would then switch nothing.
    cur.execute("SELECT pg_logical_emit_message(false, 'opslib-bench', 'archived?')")
    cur.execute("SELECT pg_walfile_name(pg_switch_wal())")
    wanted = cur.fetchone()[0]
    while True:
        cur.execute("SELECT last_archived_wal FROM pg_stat_archiver")
        archived = cur.fetchone()[0]
        if archived and archived[:24] >= wanted:
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout_s:
            raise RuntimeError(f"WAL segment {wanted} not archived within {timeout_s:.0f} s")
        time.sleep(0.2)


def _grow(cur, target_bytes: int, next_id: int) -> int:
    """Insert events until the database holds ``target_bytes``; the next free id."""
    cur.execute("SELECT pg_database_size(current_database())")
    size = cur.fetchone()[0]
    per_row = 150.0  # about right for this table and its primary key; measured after each step
    while size < target_bytes * 0.98:
        rows = max(10_000, int((target_bytes - size) / per_row))
        cur.execute(
            "INSERT INTO events (id, account_id, kind_id, created_at, payload) "
            "SELECT g, 1 + g %% 10000, 1 + g %% 10, timestamptz '2026-01-01' + make_interval(secs => g), "
            "md5(g::text) || ' ' || md5((g * 31)::text) || ' ' || (g * 7919) "
            "FROM generate_series(%s::bigint, %s::bigint) g",
            (next_id, next_id + rows - 1),
        )
        next_id += rows
        cur.execute("SELECT pg_database_size(current_database())")
        grown = cur.fetchone()[0]
        per_row, size = (grown - size) / rows, grown
    cur.execute("VACUUM (ANALYZE)")  # untimed: hint bits and the visibility map set, as in a lived-in database
    cur.execute("CHECKPOINT")
    return next_id


def _gate(target, label: str, policy: BackupPolicy, cur, walls: list[float]):
    """One gate (after an untimed CHECKPOINT); the whole call's seconds go to ``walls``."""
    cur.execute("CHECKPOINT")
    started = time.perf_counter()
    point = physical.gate(target, f"bench-{label}-{uuid.uuid4().hex[:6]}", db.DEFAULT_VERSION_TABLE, policy)
    walls.append(time.perf_counter() - started)
    return point


def _bare_point(cur) -> float:
    """The same by hand, as a person would in psql (after an untimed CHECKPOINT): a restore point, a WAL switch,
    and pg_stat_archiver read every 5 ms until its segment is archived; no locks, no snapshot, no reading."""
    cur.execute("CHECKPOINT")
    started = time.perf_counter()
    cur.execute("SELECT pg_walfile_name(pg_create_restore_point(%s))", (f"bare-{uuid.uuid4().hex[:8]}",))
    wanted = cur.fetchone()[0]
    cur.execute("SELECT pg_switch_wal()")
    while True:
        cur.execute("SELECT last_archived_wal FROM pg_stat_archiver")
        archived = cur.fetchone()[0]
        if archived and archived[:24] >= wanted:
            return time.perf_counter() - started
        time.sleep(0.005)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sizes",
        default="0.5,1,2",
        help="database sizes in GB (2^30 bytes, pg_database_size), comma-separated (default 0.5,1,2)",
    )
    p.add_argument(
        "--repeats", type=int, default=REPEATS, help=f"repeats of pg_dump, recovery, pg_restore (default {REPEATS})"
    )
    p.add_argument("--gates", type=int, default=GATES, help=f"gates at each size (default {GATES})")
    p.add_argument("--skip-exact", action="store_true", help="leave out part 3 (exact recovery under writes)")
    args = p.parse_args(argv)
    args.sizes = sorted(float(s) for s in args.sizes.split(","))
    return args


def _archiving(env: dict, on: bool) -> None:
    """Turn WAL archiving on (`opslib db start --archive`, which restarts the server) or off (archive_mode off,
    restarted): the database grows with it off, so that the growth's WAL is not archived (untimed)."""
    if on:
        _opslib(["db", "start", "--archive"], env)
        return
    url = _opslib(["db", "url"], env).stdout.strip()
    conn = psycopg2.connect(url)
    conn.autocommit = True
    conn.cursor().execute("ALTER SYSTEM SET archive_mode = off")
    conn.close()
    _opslib(["db", "stop"], env)
    _opslib(["db", "start"], env)


def size_and_recover(args, state: Path, work: Path, results: dict) -> None:
    """Parts 1 and 2, on one embedded server in ``state``."""
    env = _environ(state)
    _opslib(["db", "start"], env)
    settings = load_settings(env)
    target = db.TargetDatabase(settings)
    dsn = _libpq(target.url)
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("SELECT current_setting('server_version'), current_setting('server_version_num')::int / 10000")
    results["server"], major = cur.fetchone()
    results["pgbackrest"] = subprocess.run(
        [str(pgbackrest.program()), "version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    pg_dump, pg_restore = pgtools.pg_dump_for(major), pgtools.pg_restore_for(major)
    results["pg_dump"] = pg_dump.version
    libpq = pgtools.libpq_env(target.url)
    cur.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, name text NOT NULL);"
        "INSERT INTO accounts SELECT g, 'account ' || g FROM generate_series(1, 10000) g;"
        "CREATE TABLE kinds (id int PRIMARY KEY, name text NOT NULL);"
        "INSERT INTO kinds SELECT g, 'kind ' || g FROM generate_series(1, 10) g;"
        "CREATE TABLE events (id bigint PRIMARY KEY, account_id int NOT NULL, kind_id int NOT NULL, "
        "created_at timestamptz NOT NULL, payload text NOT NULL)"
    )
    conn.close()
    next_id = 1
    per_size = results["sizes"] = {}
    dump = point = None
    stanza = None
    for gb in args.sizes:
        print(f"== {gb:g} GB: generating", flush=True)
        started = time.perf_counter()
        if stanza is not None:
            _archiving(env, on=False)
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        next_id = _grow(conn.cursor(), int(gb * GB), next_id)
        conn.close()
        _archiving(env, on=True)
        stanza = physical.stanza_for(settings, POLICY)
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("SELECT pg_database_size(current_database())")
        size = cur.fetchone()[0]
        print(f"   {size / GB:.2f} GB, {next_id - 1} events, in {time.perf_counter() - started:.0f} s; full backup",
              flush=True)
        _, kind, full_s = physical.ensure_backup(stanza, replace(POLICY, full_max_age_h=0.0))
        assert kind == "full", kind
        _archived(cur)
        m = per_size[gb] = {"bytes": size, "full_s": full_s, "events": next_id - 1}
        print("   pg_dump -Fc and gates", flush=True)
        dumps, gates = [], []
        for i in range(args.repeats):
            dump = work / f"bench_{gb:g}_{i}.dump"
            dumps.append(_timed([pg_dump.path, "-Fc", f"--file={dump}", target.url.database], libpq, cur))
            m["dump_bytes"] = dump.stat().st_size
            if i < args.repeats - 1 or gb != args.sizes[-1]:
                dump.unlink()
        walls: list[float] = []
        bare = []
        for i in range(args.gates):  # in alternating order with the bare one, so that both see the same load
            for measure in ("gate", "bare") if i % 2 == 0 else ("bare", "gate"):
                if measure == "gate":
                    gates.append(_gate(target, f"{gb:g}-{i}", POLICY, cur, walls))
                else:
                    bare.append(_bare_point(cur))
        # The last gate keeps the checksums too; part 2 recovers to it, and compares them.
        checked = _gate(target, f"{gb:g}-checksums", replace(POLICY, table_checksums=True), cur, [])
        m["pg_dump"] = statistics.median(dumps)
        m["gate"] = statistics.median(p.gate_s for p in gates)
        m["gate_mean"] = statistics.mean(p.gate_s for p in gates)
        m["bare"], m["bare_mean"] = statistics.median(bare), statistics.mean(bare)
        m["gate_range"] = (min(p.gate_s for p in gates), max(p.gate_s for p in gates))
        m["gate_call"] = statistics.median(walls)
        m["backup_s"] = statistics.median(p.backup_s for p in gates)
        m["taken"] = sorted({p.backup_taken for p in gates} | {checked.backup_taken})
        m["counts"] = statistics.median(p.counts_s for p in gates)
        m["checksums"] = checked.counts_s
        point = checked
        print(f"   pg_dump {m['pg_dump']:.2f} s, gate {m['gate']:.3f} s, counts {m['counts']:.2f} s", flush=True)
        conn.close()
    # Part 2, at the largest size: recovery to the last gate's point against createdb + pg_restore, in alternating
    # order. Archiving is turned off first (untimed): pg_restore's WAL would keep the archiver busy on one of the
    # two cores during the next measurement, and the recovery needs only the repository.
    print(f"== recovery to {point.name} against createdb + pg_restore, {args.sizes[-1]:g} GB", flush=True)
    _archiving(env, on=False)
    where = pitr.RecoveryTarget("name", point.name, point.backup_label)
    recoveries, restores, parts, compared = [], [], [], []
    createdb = str(Path(pg_restore.path).parent / "createdb")
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    cur = conn.cursor()

    def recover() -> None:
        cur.execute("CHECKPOINT")
        started = time.perf_counter()
        staging = pitr.recover(target, stanza, where, f"bench-{uuid.uuid4().hex[:8]}", major)
        recoveries.append(time.perf_counter() - started)
        parts.append((staging.seconds_restore, staging.seconds_replay))
        try:
            if not compared:  # untimed: the recovered database is what the gate read
                compared.append(pitr.compare(staging, target.url, point))
        finally:
            staging.remove()

    def restore() -> None:
        copy = f"bench_restored_{uuid.uuid4().hex[:6]}"
        try:
            restores.append(
                _timed([createdb, copy], libpq, cur)
                + _timed([pg_restore.path, "--exit-on-error", f"--dbname={copy}", str(dump)], libpq)
            )
        finally:
            cur.execute(f'DROP DATABASE IF EXISTS "{copy}" WITH (FORCE)')  # untimed

    try:
        for i in range(args.repeats):
            for measure in (recover, restore) if i % 2 == 0 else (restore, recover):
                measure()
    finally:
        conn.close()
    results["recovery"] = statistics.median(recoveries)
    results["recovery_parts"] = (statistics.median(p[0] for p in parts), statistics.median(p[1] for p in parts))
    results["pg_restore"] = statistics.median(restores)
    results["recovered_equal"] = not compared[0].differences
    results["recovered_facts"] = compared[0].differences or [f"{k}: {v}" for k, v in compared[0].facts]


ENV_PY = '''"""Alembic's generic env.py: the connection opslib hands in, else an engine from sqlalchemy.url."""
from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Connection

config = context.config


def run(connection):
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif isinstance(config.attributes.get("connection"), Connection):
    run(config.attributes["connection"])
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with engine.connect() as connection:
        run(connection)
    engine.dispose()
'''

REVISION = '''"""{message}"""
from alembic import op

revision = "{revision}"
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade():
{upgrade}


def downgrade():
{downgrade}
'''


def _project(folder: Path) -> Path:
    """A small Alembic project: items (200,000 rows), then a destructive revision; the pgbackrest policy."""
    (folder / "versions").mkdir(parents=True)
    (folder / "alembic.ini").write_text("[alembic]\nscript_location = %(here)s\n")
    (folder / "opslib.toml").write_text('[backup]\nmethod = "pgbackrest"\ntable_checksums = true\n')
    (folder / "env.py").write_text(ENV_PY)
    (folder / "script.py.mako").write_text('"""${message}"""\nrevision = ${repr(up_revision)}\n')
    (folder / "versions" / "0001_items.py").write_text(
        REVISION.format(
            message="items",
            revision="0001",
            down=None,
            upgrade='    op.execute("CREATE TABLE items (id bigserial PRIMARY KEY, payload text, grp int)")\n'
            '    op.execute("INSERT INTO items (payload, grp) SELECT md5(g::text), g % 10 '
            f'FROM generate_series(1, {SEED_ITEMS}) g")',
            downgrade='    op.execute("DROP TABLE items")',
        )
    )
    (folder / "versions" / "0002_prune.py").write_text(
        REVISION.format(
            message="prune a third of the items",
            revision="0002",
            down="0001",
            upgrade='    op.execute("DELETE FROM items WHERE grp % 3 = 0")',
            downgrade="    pass",
        )
    )
    return folder / "alembic.ini"


class Writer(threading.Thread):
    """Inserts one row per transaction (autocommit) until stopped; keeps each id and when it was acknowledged."""

    def __init__(self, dsn: str):
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.written: list[tuple[int, float]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = psycopg2.connect(self.dsn)
            conn.autocommit = True
            cur = conn.cursor()
            n = 0
            while not self.stop.is_set():
                # grp 1, 2, 4, 5: never a multiple of 3, so that the revision deletes none of the writer's rows
                cur.execute("INSERT INTO items (payload, grp) VALUES (%s, %s) RETURNING id", (f"w{n}", (1, 2, 4, 5)[n % 4]))
                self.written.append((cur.fetchone()[0], time.time()))
                n += 1
            conn.close()
        except BaseException as err:  # reported by the caller
            self.error = err


def exact_recovery(state: Path, work: Path, results: dict) -> None:
    """Part 3: deploy under writes with the gate, recover to its point beside, and check the copy."""
    ini = _project(work / "project")
    records = work / "records"
    env = _environ(state, OPSLIB_ALEMBIC_INI=str(ini), OPSLIB_RECORDS_DIR=str(records),
                   OPSLIB_BACKUPS_DIR=str(work / "backups"))
    _opslib(["db", "start", "--archive"], env)
    _opslib(["upgrade", "0001"], env)
    settings = load_settings(env)
    url = db.TargetDatabase(settings).url
    admin = psycopg2.connect(_libpq(url))
    admin.autocommit = True
    cur = admin.cursor()
    cur.execute("SELECT count(*), coalesce(sum(id), 0) FROM items WHERE grp % 3 = 0")
    doomed_count, doomed_sum = cur.fetchone()
    writer = Writer(_libpq(url))
    writer.start()
    try:
        time.sleep(0.5)  # the writer is well under way before the deploy starts
        started = time.perf_counter()
        deploy = _opslib(["run", "deploy", "--json", "-p", "backup_method", "pgbackrest"], env, check=False)
        deploy_s = time.perf_counter() - started
        time.sleep(0.5)
    finally:
        writer.stop.set()
        writer.join()
    if writer.error is not None:
        raise RuntimeError(f"the writer failed: {writer.error}")
    if deploy.returncode != 0:
        raise RuntimeError(f"opslib run deploy exited {deploy.returncode}: {deploy.stdout[-1000:]} {deploy.stderr[-2000:]}")
    record = json.loads(Path(json.loads(deploy.stdout)["record"]).read_text())
    point = RestorePoint.from_dict(record["backup"]["restore_point"])
    cur.execute("SELECT count(*) FROM items WHERE grp % 3 = 0")
    left_after_deploy = cur.fetchone()[0]
    started = time.perf_counter()
    recovery = _opslib(
        ["run", "recovery", "--json", "-p", "mode", "pitr", "-p", "confirm", url.database, "-p", "restore_point",
         point.name, "-p", "apply", "new_database", "-p", "new_database", "items_recovered"],
        env,
        check=False,
    )
    recovery_s = time.perf_counter() - started
    reply = json.loads(recovery.stdout) if recovery.stdout.strip().startswith("{") else {}
    notebook = Path(reply["notebook"]).read_text() if reply.get("notebook") else ""
    said_equal = "compared with the gate: equal" in notebook
    fact = re.search(r"restore: ([0-9.]+ s \(pgBackRest\), replay and start [0-9.]+ s)", notebook)
    copy_url = url.set(database="items_recovered")
    checks: dict[str, bool] = {"recovery run succeeded": recovery.returncode == 0 and reply.get("outcome") == "succeeded"}
    checks["the recovery said equal (counts and checksums)"] = said_equal
    present: list[int] = []
    if checks["recovery run succeeded"]:
        with db.connect(copy_url) as conn:  # the same comparison again, by the benchmark, on the copy
            checks["copy's row counts = the gate's"] = row_counts(conn) == point.row_counts
            checks["copy's checksums = the gate's"] = table_checksums(conn) == point.checksums
            doomed = conn.execute(
                sa.text("SELECT count(*), coalesce(sum(id), 0) FROM items WHERE grp % 3 = 0 AND id <= :n"),
                {"n": SEED_ITEMS},
            ).one()
            present = list(conn.execute(sa.text("SELECT id FROM items WHERE id > :n ORDER BY id"), {"n": SEED_ITEMS}).scalars())
        checks["every row the revision deleted is back"] = tuple(doomed) == (doomed_count, doomed_sum)
    ids = [i for i, _ in writer.written]
    gate_at = datetime.fromisoformat(point.created_at).timestamp()
    acked_before = [i for i, at in writer.written if at < gate_at]
    checks["the revision had deleted them"] = doomed_count > 0 and left_after_deploy == 0
    recovered = checks["recovery run succeeded"]
    checks["writer's rows: a gapless prefix"] = recovered and present == ids[: len(present)]
    checks["every row acknowledged before the gate is there"] = recovered and set(acked_before) <= set(present)
    checks["writer wrote rows after the point too"] = recovered and len(ids) > len(present)
    cur.execute("DROP DATABASE IF EXISTS items_recovered WITH (FORCE)")
    admin.close()
    results["exact"] = {
        "checks": checks,
        "rows_at_gate": (point.row_counts or {}).get("public.items"),
        "deleted": doomed_count,
        "written": len(ids),
        "before_point": len(present),
        "after_point": len(ids) - len(present),
        "acked_before": len(acked_before),
        "deploy_s": deploy_s,
        "recovery_s": recovery_s,
        "gate_s": point.gate_s,
        "backup_s": point.backup_s,
        "backup_taken": point.backup_taken,
        "counts_s": point.counts_s,
        "restore_fact": fact[1] if fact else "not found in its notebook",
        "error": None if recovery.returncode == 0 else (reply.get("error") or recovery.stderr[-1000:]),
    }


def _stop(state: Path) -> None:
    """Stop whatever the bench left running in ``state`` (staging servers, then the server, at once: an
    archiver catching up with a restore's WAL would keep a fast shutdown waiting) and remove it."""
    if state.exists():
        pitr.cleanup_staging(state)
        pgdata = state / "pgdata"
        if (pgdata / "postmaster.pid").exists():
            owner = embedded.data_owner(pgdata)
            who = {"user": owner, "group": pwd.getpwnam(owner).pw_gid, "extra_groups": []} if owner else {}
            subprocess.run(
                [str(embedded.bin_dir() / "pg_ctl"), "-D", str(pgdata), "-m", "immediate", "-w", "stop"],
                capture_output=True, cwd="/", check=False, **who,
            )
    shutil.rmtree(state, ignore_errors=True)


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _report(args, r: dict) -> int:
    """The summary: one row per size, then every figure with its goal; 1 when a goal is not met."""
    sizes = r.get("sizes", {})
    failed = 0
    rows: list[tuple[str, str, str]] = []  # figure, value, goal and verdict
    print()
    print(
        f"embedded PostgreSQL {r.get('server')}, {r.get('pgbackrest')}, pg_dump/pg_restore {r.get('pg_dump')}; "
        f"medians of {args.repeats} (pg_dump, recovery, pg_restore) and of {args.gates} gates at each size"
    )
    if sizes:
        print()
        print(
            f"{'size GB':>7} {'dump MB':>7} {'full backup s':>13} {'pg_dump -Fc s':>13} {'gate s':>7} "
            f"{'gate/dump':>9} {'gate mean s':>11} {'gate min-max s':>14} {'bare s':>6} {'bare mean s':>11} "
            f"{'backup_s':>8} {'counts_s':>8} {'+checksums s':>12} {'gate call s':>11}"
        )
        for m in sizes.values():
            print(
                f"{m['bytes'] / GB:7.2f} {m['dump_bytes'] / 1e6:7.0f} {m['full_s']:13.1f} {m['pg_dump']:13.2f} "
                f"{m['gate']:7.3f} {m['gate'] / m['pg_dump']:9.4f} {m['gate_mean']:11.3f} "
                f"{m['gate_range'][0]:6.3f}-{m['gate_range'][1]:.3f} {m['bare']:6.3f} {m['bare_mean']:11.3f} "
                f"{m['backup_s']:8.3f} {m['counts']:8.2f} {m['checksums']:12.2f} {m['gate_call']:11.2f}"
            )
        worst = max(m["gate"] / m["pg_dump"] for m in sizes.values())
        first, last = sizes[args.sizes[0]], sizes[args.sizes[-1]]
        flat = last["gate_mean"] / first["gate_mean"]
        taken = ", ".join(sorted({t for m in sizes.values() for t in m["taken"]}))
        ok1, ok2 = worst <= GATE_SHARE, flat <= GATE_FLAT
        failed += (not ok1) + (not ok2)
        rows += [
            ("1. gate / pg_dump -Fc, the worst size", f"{worst:.4f}", f"<= {GATE_SHARE:g}: {_verdict(ok1)}"),
            (
                f"1. mean gate at {args.sizes[-1]:g} GB / at {args.sizes[0]:g} GB",
                f"{last['gate_mean']:.3f} / {first['gate_mean']:.3f} s = {flat:.2f}",
                f"<= {GATE_FLAT:g} (constant): {_verdict(ok2)}",
            ),
            (
                f"1. the same by hand (bare), mean at {args.sizes[-1]:g} GB / at {args.sizes[0]:g} GB",
                f"{last['bare_mean']:.3f} / {first['bare_mean']:.3f} s = {last['bare_mean'] / first['bare_mean']:.2f}",
                "",
            ),
            (
                "1. mean gate / mean bare, at each size",
                ", ".join(f"{m['gate_mean'] / m['bare_mean']:.2f}" for m in sizes.values()),
                "",
            ),
            ("1. backups the gates took", taken, "none (a full one existed)"),
        ]
    if "recovery" in r:
        ratio = r["recovery"] / r["pg_restore"]
        restore_s, replay_s = r["recovery_parts"]
        ok = ratio <= 1.0 and r["recovered_equal"]
        failed += not ok
        rows += [
            (
                f"2. recovery to the point, {args.sizes[-1]:g} GB",
                f"{r['recovery']:.1f} s (restore {restore_s:.1f} s, replay and start {replay_s:.1f} s)",
                "",
            ),
            (f"2. createdb + pg_restore, {args.sizes[-1]:g} GB", f"{r['pg_restore']:.1f} s", ""),
            ("2. recovery / pg_restore", f"{ratio:.2f}", f"<= 1.0: {_verdict(ratio <= 1.0)}"),
            (
                "2. the recovered database against the gate",
                "DIFFERENT: " + "; ".join(r["recovered_facts"]) if not r["recovered_equal"]
                else next((f.split(": ", 1)[1] for f in r["recovered_facts"] if f.startswith("compared")), "equal"),
                "equal",
            ),
        ]
    if "exact" in r:
        e = r["exact"]
        ok = all(e["checks"].values())
        failed += not ok
        rows += [
            ("3. exact recovery under writes", "PASS" if ok else "FAIL", "PASS"),
            ("3. items at the gate / deleted by revision 0002", f"{e['rows_at_gate']} / {e['deleted']}", ""),
            (
                "3. writer's rows: before the point / after",
                f"{e['before_point']} / {e['after_point']} of {e['written']} "
                f"({e['acked_before']} acknowledged before the gate's time)",
                "",
            ),
            (
                "3. opslib run deploy (its gate)",
                f"{e['deploy_s']:.1f} s (gate {e['gate_s']:.2f} s, {e['backup_taken']} backup {e['backup_s']:.1f} s, "
                f"counts and checksums {e['counts_s']:.2f} s)",
                "",
            ),
            (
                "3. opslib run recovery -p mode pitr",
                f"{e['recovery_s']:.1f} s (restore {e['restore_fact']})",
                "",
            ),
        ]
        rows += [(f"3.   {name}", "ok" if passed else "FAIL", "") for name, passed in e["checks"].items()]
        if e["error"]:
            rows.append(("3. the recovery's error", str(e["error"]), ""))
    print()
    width = max(len(f) for f, _, _ in rows) if rows else 0
    for figure, value, goal in rows:
        print(f"{figure:{width}}  {value}{'  goal ' + goal if goal else ''}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Parts 1 and 2 on one server, part 3 on another; every figure printed at the end."""
    args = _arguments(argv)
    results: dict = {}
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="opslib-bench-pitr-"))
    work.chmod(0o755)  # the server's OS user reaches its state folder through it
    try:
        state = work / "state"
        try:
            size_and_recover(args, state, work, results)
        finally:
            _stop(state)
        if not args.skip_exact:
            print("== exact recovery under writes", flush=True)
            state = work / "state-exact"
            try:
                exact_recovery(state, work, results)
            finally:
                _stop(state)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    code = _report(args, results)
    print(f"(the whole benchmark: {time.perf_counter() - started:.0f} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
