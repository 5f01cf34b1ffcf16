"""Fault injection: a deploy stopped by SIGKILL, SIGTERM or SIGINT at five points, and a server restart.

The scenario project (tests/fixtures/faults) is a billing service with data: 5,000 accounts and
20,000 invoices, a slow backfill (f003), a revision that pauses before its first statement (f004),
and Alembic's generic env.py, which opens its own engine. A deploy from f002 is stopped at each
point, the signal sent to both the runner (`opslib run`) and its kernel, as a cancelled CI job, an
operator's Ctrl-C or the OOM killer would. After each: the database is at a revision that exists
with exactly that revision's schema, no row is lost, no partial backup has a final name, `opslib
audit verify` exits 0 with the run shown as interrupted or abandoned, and a second deploy completes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg2
import pytest

from opslib import audit, embedded, liveness
from opslib.config import Settings

from .conftest import FIXTURES, OPSLIB, database_name, libpq, opslib_cli, outcomes_that_disagree, query

REVISIONS = ["f001", "f002", "f003", "f004", "f005"]
POINTS = ["backup", "before-first-revision", "inside-a-revision", "between-revisions", "record"]
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}


def snapshot(url: str) -> list:
    """The schema of the public tables (columns, indexes, constraints): what a revision decides."""
    columns = query(
        url,
        "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name <> 'alembic_version' ORDER BY 1, 2",
    )
    indexes = query(
        url,
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
        "AND tablename <> 'alembic_version' ORDER BY 1",
    )
    constraints = query(
        url,
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE connamespace = 'public'::regnamespace ORDER BY 1",
    )
    return [columns, indexes, constraints]


def revision_of(url: str) -> list[str]:
    return [r[0] for r in query(url, "SELECT version_num FROM alembic_version")]


def data_digest(url: str) -> tuple:
    """The rows that existed before the run, as counts and checksums."""
    return tuple(
        query(
            url,
            f"SELECT count(*), md5(string_agg({cols}, ',' ORDER BY id)) FROM {table}",
        )[0]
        for table, cols in (
            ("accounts", "id || ':' || email || ':' || balance_cents"),
            ("invoices", "id || ':' || account_id || ':' || amount_cents"),
        )
    )


@pytest.fixture(scope="module")
def reference_schemas(tmp_path_factory, server_url) -> dict[str, list]:
    """The schema after each revision, from a clean upgrade one revision at a time."""
    name = f"opslib_test_faultref_{os.getpid()}"
    admin = psycopg2.connect(libpq(server_url.render_as_string(hide_password=False)))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cur.execute(f'CREATE DATABASE "{name}"')
    url = server_url.set(database=name).render_as_string(hide_password=False)
    work = tmp_path_factory.mktemp("faultref")
    schemas = {}
    try:
        for rev in REVISIONS:
            done = opslib_cli(url, FIXTURES / "faults" / "alembic.ini", work, "upgrade", rev)
            assert done.returncode == 0, done.stderr
            schemas[rev] = snapshot(url)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
    return schemas


def _env(url: str, work: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL", "FAULT_"))}
    env.update(
        DATABASE_URL=url,
        OPSLIB_ALEMBIC_INI=str(FIXTURES / "faults" / "alembic.ini"),
        OPSLIB_RECORDS_DIR=str(work / "records"),
        OPSLIB_BACKUPS_DIR=str(work / "backups"),
        FAULT_MARKS=str(work / "marks"),
        FAULT_PAUSE_S="4",  # long enough to be signalled in; the stop waits for the pause to end
        **extra,
    )
    return env


def _wait_for(condition, what: str, timeout: float = 60.0, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}")
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def _sidecar(work: Path) -> dict | None:
    for path in (work / "records").glob("*.json"):
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None  # being replaced right now
    return None


def _endings(work: Path) -> list[dict] | None:
    """The ledger's endings; None while a line is being written."""
    try:
        return audit.read_endings(work / "records")
    except ValueError:
        return None


def _signal_run(work: Path, runner: subprocess.Popen, signum: int) -> None:
    """Send ``signum`` to every process of the run (the runner and its kernel), as a cancelled job does."""
    for pid in _run_pids(work, runner):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _run_pids(work: Path, runner: subprocess.Popen) -> list[int]:
    record = _sidecar(work) or {}
    return sorted(set(record.get("pids") or []) | {runner.pid})


def _reached(point: str, url: str, work: Path):
    """A function telling when the run is at ``point``."""
    database = database_name(url)
    if point == "backup":
        return lambda: query(
            url,
            "SELECT 1 FROM pg_stat_activity WHERE datname = :d AND wait_event_type = 'Lock' "
            "AND application_name LIKE 'opslib deploy run %'",
            d=database,
        )
    if point == "inside-a-revision":
        return lambda: query(
            url,
            "SELECT 1 FROM pg_stat_activity WHERE datname = :d AND state = 'active' AND query LIKE 'SELECT pg_sleep%'",
            d=database,
        )
    if point == "record":
        # The summary step has begun sealing the record, and the ledger's ending is not written yet.
        return lambda: not _endings(work) and any(
            s["name"] == "summary" for s in (_sidecar(work) or {}).get("steps", [])
        )
    return lambda: (work / "marks" / point).exists()


@pytest.mark.parametrize("signame", list(SIGNALS))
@pytest.mark.parametrize("point", POINTS)
def test_a_deploy_stopped_at_any_point_ends_sealed_and_safe(
    point, signame, database_url, tmp_path, reference_schemas
):
    work = tmp_path / "work"
    (work / "marks").mkdir(parents=True)
    ini = FIXTURES / "faults" / "alembic.ini"
    assert opslib_cli(database_url, ini, work, "upgrade", "f002").returncode == 0
    rows_before = data_digest(database_url)
    pause = {
        "backup": {},
        "before-first-revision": {"FAULT_PAUSE_AT": "before-first-revision"},
        "inside-a-revision": {"FAULT_SLOW_S": "8"},  # long enough to be signalled in; a killed one runs it out
        "between-revisions": {"FAULT_PAUSE_AT": "between-revisions"},
        "record": {},
    }[point]
    holder = None
    if point == "backup":
        # pg_dump waits for this lock (a table no pending revision touches): the run is inside its backup.
        holder = psycopg2.connect(libpq(database_url))
        holder.cursor().execute("LOCK TABLE attachments IN ACCESS EXCLUSIVE MODE")
    runner = subprocess.Popen(
        [OPSLIB, "run", "deploy"],
        cwd=work,
        env=_env(database_url, work, **pause),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(_reached(point, database_url, work), point, proc=runner)
        _signal_run(work, runner, SIGNALS[signame])
        if holder is not None:
            holder.rollback()
        out, err = runner.communicate(timeout=120)
    finally:
        if holder is not None:
            holder.close()
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    code = runner.returncode
    late = point == "record" and code == 0  # the run sealed itself before the signal landed

    # The database is at a revision that exists, with exactly that revision's schema, and no row was lost.
    (now,) = revision_of(database_url)
    assert now in REVISIONS[1:]
    assert snapshot(database_url) == reference_schemas[now]
    assert data_digest(database_url) == rows_before
    # No partial backup under a final name: every dump has its manifest and matches its checksum.
    for dump in (work / "backups").glob("*.dump"):
        manifest = json.loads(dump.with_suffix(".json").read_text())
        assert manifest["sha256"] == audit.file_sha256(dump), dump

    # The records: sealed, and shown as what happened, never as tampering.
    verify = subprocess.run(
        [OPSLIB, "audit", "verify"], cwd=work, env=_env(database_url, work), capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    (entry,) = audit.read_endings(work / "records")
    assert outcomes_that_disagree(work / "records", database_url) == []  # one outcome, whoever sealed it
    if signame == "SIGKILL":
        assert code == -signal.SIGKILL
        assert entry["outcome"] == "abandoned" or (point == "record" and entry["outcome"] == "succeeded")
        if entry["outcome"] == "abandoned":
            assert "sealed run" in verify.stderr
    elif not late:
        assert code == 128 + SIGNALS[signame], out + err
        assert entry["outcome"] == "interrupted" and entry["exit_code"] == code
        assert err.strip().splitlines()[-1].startswith("deploy interrupted"), err
        assert "Traceback" not in err
    if entry["outcome"] != "succeeded":
        # The recorded revision is the true one (or "not read", never a guess).
        assert entry["revisions_after"] in ([now], None)
    # The lock was released: a second deploy completes.
    again = subprocess.run(
        [OPSLIB, "run", "deploy"], cwd=work, env=_env(database_url, work), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert revision_of(database_url) == ["f005"]
    assert data_digest(database_url)[0] == rows_before[0]


def test_a_server_restart_mid_deploy_names_the_revision_and_a_rerun_completes(tmp_path):
    state = Settings(state_dir=tmp_path / "state")
    url = embedded.ensure_running(state)
    try:
        work = tmp_path / "work"
        (work / "marks").mkdir(parents=True)
        ini = FIXTURES / "faults" / "alembic.ini"
        assert opslib_cli(url, ini, work, "upgrade", "f002").returncode == 0
        runner = subprocess.Popen(
            [OPSLIB, "upgrade"],
            cwd=work,
            env=_env(url, work, FAULT_SLOW_S="30"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_for(
            lambda: query(url, "SELECT 1 FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"),
            "the slow revision",
            proc=runner,
        )
        embedded.stop(state)
        embedded.start(state)
        out, err = runner.communicate(timeout=120)
        assert runner.returncode == 1, out + err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err
        assert "failed at revision f003" in lines[0] and "is now at f002" in lines[0], lines[0]
        assert revision_of(url) == ["f002"]
        again = opslib_cli(url, ini, work, "upgrade")
        assert again.returncode == 0, again.stderr
        assert revision_of(url) == ["f005"]
    finally:
        embedded.stop(state)


def _sample_env(url: str, work: Path, **extra: str) -> dict:
    """The environment of a command on the sample project, its records and backups in ``work``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(
        DATABASE_URL=url,
        OPSLIB_ALEMBIC_INI=str(FIXTURES.parent.parent / "alembic.ini"),
        OPSLIB_RECORDS_DIR=str(work / "records"),
        OPSLIB_BACKUPS_DIR=str(work / "backups"),
        **extra,
    )
    return env


def _signal_after_the_last_commit(url: str, work: Path, args: list[str], signame: str, delay_s: float):
    """Run ``opslib ARGS`` from 0006 to 0007 and signal it (runner and kernel) ``delay_s`` after 0007 commits."""
    env = _sample_env(url, work)
    watch = psycopg2.connect(libpq(url))
    watch.autocommit = True
    runner = subprocess.Popen([OPSLIB, *args], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with watch.cursor() as cur:
            while runner.poll() is None:  # polled as fast as the server answers: the commit is seen within ~1 ms
                cur.execute("SELECT version_num FROM alembic_version")
                if cur.fetchone()[0] == "0007":
                    break
        time.sleep(delay_s)
        _signal_run(work, runner, SIGNALS[signame])
        out, err = runner.communicate(timeout=120)
    finally:
        watch.close()
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    return runner.returncode, out, err, env


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", ["upgrade", "run deploy"])
def test_a_signal_in_the_instant_after_the_last_commit_still_ends_sealed_and_says_where_it_stands(
    command, signame, database_url, tmp_path
):
    """Swept 0-50 ms after the last revision commits: between the commit and the seal, and during it."""
    ini = Path(FIXTURES.parent.parent / "alembic.ini")
    for delay_ms in (0, 20, 50):
        work = tmp_path / f"at-{delay_ms}"
        work.mkdir()
        assert opslib_cli(database_url, ini, work, "upgrade", "0006").returncode == 0 or (
            opslib_cli(database_url, ini, work, "downgrade", "0006").returncode == 0
        )
        code, out, err, env = _signal_after_the_last_commit(
            database_url, work, command.split(), signame, delay_ms / 1000
        )
        seen = f"at {delay_ms} ms: exit {code}\n{out}{err}"
        assert revision_of(database_url) == ["0007"], seen
        assert "unexpected error" not in err and "Traceback" not in err, seen
        if code == 0:  # the command had printed its outcome before the signal came: it stands
            assert "0007" in out, seen
        else:
            assert code == 128 + SIGNALS[signame], seen
            last = err.strip().splitlines()[-1]
            assert "now at 0007" in last, seen
        if command == "run deploy":
            (entry,) = audit.read_endings(work / "records")
            assert entry["exit_code"] == code and entry["revisions_after"] == ["0007"], seen
            assert entry["outcome"] == ("succeeded" if code == 0 else "interrupted"), seen
            verify = subprocess.run([OPSLIB, "audit", "verify"], cwd=work, env=env, capture_output=True, text=True)
            assert verify.returncode == 0, seen + verify.stdout + verify.stderr


def test_a_runner_killed_with_sigkill_leaves_no_kernel_files_after_the_next_command(database_url, tmp_path, request):
    """The kernel's connection file (its signing key) and its sockets, named for the runner, are removed by
    the next opslib command once the runner is gone, whatever their age."""
    work = tmp_path / "work"
    (work / "marks").mkdir(parents=True)
    temp = Path(tempfile.mkdtemp(prefix="okf", dir="/tmp"))  # short: a socket's path has room for 107 bytes
    request.addfinalizer(lambda: shutil.rmtree(temp, ignore_errors=True))
    ini = FIXTURES / "faults" / "alembic.ini"
    assert opslib_cli(database_url, ini, work, "upgrade", "f002").returncode == 0
    env = _env(database_url, work, FAULT_PAUSE_AT="before-first-revision", TMPDIR=str(temp))
    runner = subprocess.Popen([OPSLIB, "run", "deploy"], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(_reached("before-first-revision", database_url, work), "the pause", proc=runner)
        pids = _run_pids(work, runner)
        mine = sorted(p.name for p in temp.glob(f"opslib-kernel-{runner.pid}-*"))
        runner.kill()
        runner.wait()
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert any(name.endswith("-connection.json") for name in mine), mine
    assert any(name.endswith("-ipc-1") for name in mine), mine
    # The orphaned kernel ends itself once it sees its runner gone (within a second or so); while it still
    # answers on its sockets, its files stay. Its end is not left to chance here.
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _wait_for(lambda: not any(liveness._alive(pid) for pid in pids if pid != runner.pid), "the kernel's end")
    status = subprocess.run([OPSLIB, "status"], cwd=work, env=env, capture_output=True, text=True)
    assert status.returncode == 0, status.stdout + status.stderr
    assert not list(temp.glob(f"opslib-kernel-{runner.pid}-*"))


# An IPython start-up file for the run's kernel: as it sends the reply to the deploy's upgrade cell, it
# pauses (leaving a mark), so that a signal lands in ipykernel's own code, after the cell ran and before
# the reply is sent. ipykernel catches that KeyboardInterrupt and never sends the reply.
_REPLY_PAUSE = '''
import os, pathlib, time

_kernel = get_ipython().kernel
_send = _kernel.session.send


def _send_after_a_pause(stream, msg_or_type, content=None, parent=None, *args, **kwargs):
    code = ((parent or {}).get("content") or {}).get("code", "")
    if msg_or_type == "execute_reply" and "run.upgrade()" in code:
        pathlib.Path(os.environ["REPLY_PAUSE_MARK"]).touch()
        time.sleep(30)
    return _send(stream, msg_or_type, content, parent, *args, **kwargs)


_kernel.session.send = _send_after_a_pause
'''


def test_a_signal_that_costs_the_kernel_its_reply_still_ends_the_run_sealed_at_once(database_url, tmp_path):
    """Ctrl-C in the runner's terminal, passed on to the kernel between the upgrade cell's end and its
    reply: the kernel swallows it and the reply never comes. The run still ends within seconds, sealed
    interrupted at the revision the upgrade reached. (A second SIGINT sent to the kernel as well, as a
    cancelled job's, may instead kill it: papermill sees that by itself.)"""
    ini = Path(FIXTURES.parent.parent / "alembic.ini")
    work = tmp_path / "work"
    work.mkdir()
    assert opslib_cli(database_url, ini, work, "upgrade", "0006").returncode == 0
    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-reply-pause.py").write_text(_REPLY_PAUSE)
    mark = tmp_path / "paused"
    env = _sample_env(database_url, work, IPYTHONDIR=str(tmp_path / "ipython"), REPLY_PAUSE_MARK=str(mark))
    runner = subprocess.Popen([OPSLIB, "run", "deploy"], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(mark.exists, "the kernel pausing before its reply", timeout=120, proc=runner)
        signalled = time.monotonic()
        runner.send_signal(signal.SIGINT)
        out, err = runner.communicate(timeout=60)
        took = time.monotonic() - signalled
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    seen = f"exit {runner.returncode} after {took:.1f} s\n{out}{err}"
    assert "KeyboardInterrupt caught in kernel" in err, seen  # the reply was indeed lost
    assert took < 25, seen  # within seconds (6 s of them the grace a reply under way is given), not forever
    assert runner.returncode == 128 + signal.SIGINT, seen
    assert "Traceback" not in err and "unexpected error" not in err, seen
    assert "now at 0007" in err.strip().splitlines()[-1], seen
    assert revision_of(database_url) == ["0007"]
    (entry,) = audit.read_endings(work / "records")
    assert entry["outcome"] == "interrupted" and entry["revisions_after"] == ["0007"], entry
    verify = subprocess.run([OPSLIB, "audit", "verify"], cwd=work, env=env, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
