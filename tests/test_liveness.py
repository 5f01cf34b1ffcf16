"""Telling a run in progress from one that ended without sealing its record (no PostgreSQL needed).

A run's processes hold a shared lock on its live mark for the run's life; whether its pids exist, or
which host wrote it, decides nothing while the mark is there. These tests hold and drop marks from
real processes, as a kernel, a runner or a container sharing the records folder would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from opslib import audit, liveness, record, runlist, signals
from opslib.errors import Interrupted
from opslib.outcome import Outcome
from opslib.record import RunRecord, revisions_text

from .conftest import OPSLIB, dead_pid

HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_SH)
print("held", flush=True)
sys.stdin.read()
"""




def running_record(folder: Path, stem: str, *, host: str, pids: list[int]) -> RunRecord:
    record = RunRecord(
        run_id=stem.rsplit("_", 1)[1], runbook="deploy", operator="pytest", env="development",
        started_at="2026-11-26T10:00:00.000Z", host=host, pids=pids,
    )  # fmt: skip
    if f"{stem}.json" not in {e.get("sidecar") for e in audit.read_ledger(folder)}:
        audit.append_started(folder, stem, record)  # as every run does before anything else
    audit.write_sidecar(folder, stem, record)
    return record


class Holder:
    """Another process holding a run's live mark (a kernel, or a runner in another container)."""

    def __init__(self, path: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout.readline().strip() == "held"

    def end(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def test_a_held_mark_keeps_a_run_live_whatever_its_host_and_pids(tmp_path):
    stem = "20261126T100000Z_deploy_aaaa1111"
    running_record(tmp_path, stem, host="another-container", pids=[dead_pid()])
    holder = Holder(liveness.live_mark_path(tmp_path, stem))
    try:
        assert audit.abandoned_stems(tmp_path) == []
        assert audit.verify_ledger(tmp_path) == []  # a run in progress is not a problem
    finally:
        holder.end()
    assert audit.abandoned_stems(tmp_path) == [stem]
    assert any("was not sealed" in p for p in audit.verify_ledger(tmp_path))


def test_a_reused_pid_does_not_hide_an_ended_run(tmp_path):
    stem = "20261126T100000Z_deploy_bbbb2222"
    # Its pid now belongs to another live process (this one): the mark, held by nobody, decides.
    running_record(tmp_path, stem, host=socket.gethostname(), pids=[os.getpid()])
    liveness.live_mark_path(tmp_path, stem).touch()
    assert audit.abandoned_stems(tmp_path) == [stem]


def test_without_a_mark_a_run_from_another_host_is_never_taken_for_ended(tmp_path):
    stem = "20261126T100000Z_deploy_cccc3333"
    running_record(tmp_path, stem, host="another-host", pids=[dead_pid()])
    assert audit.abandoned_stems(tmp_path) == []
    running_record(tmp_path, stem, host=socket.gethostname(), pids=[dead_pid()])
    assert audit.abandoned_stems(tmp_path) == [stem]  # on this host its pids can be judged


def test_a_run_is_sealed_into_the_ledger_once(tmp_path):
    stem = "20261126T100000Z_deploy_dddd4444"
    record = running_record(tmp_path, stem, host=socket.gethostname(), pids=[os.getpid()])
    record.end(Outcome.SUCCEEDED, 0, None, "2026-11-26T10:00:01.000Z")
    audit.write_sidecar(tmp_path, stem, record)
    assert audit.append_ledger(tmp_path, stem, record) is not None
    assert audit.append_ledger(tmp_path, stem, record) is None
    assert len(audit.read_endings(tmp_path)) == 1
    assert audit.verify_ledger(tmp_path) == []


def test_a_notebook_written_before_its_sidecar_is_a_run_in_progress(tmp_path):
    stem = "20261126T100000Z_deploy_eeee5555"
    (tmp_path / f"{stem}.ipynb").write_text("{}")
    holder = Holder(liveness.live_mark_path(tmp_path, stem))
    try:
        assert audit.verify_ledger(tmp_path) == []
    finally:
        holder.end()
    assert audit.verify_ledger(tmp_path) == [
        f"{stem}.ipynb is not in the ledger (added outside it, or its ledger line was removed)"
    ]


def test_signals_wait_while_a_record_is_sealed():
    """One signal waits for the seal; a second one breaks a seal stuck on the database, once."""
    before = signal.getsignal(signal.SIGINT)
    with signals.signals_held() as caught:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # a Python handler runs at the next bytecode: it has run by now
        assert caught == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGINT) is before
    # One Ctrl-C arriving twice at once (from the terminal, and passed on by the runner) still waits.
    with signals.signals_held() as caught:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
    assert caught == [signal.SIGINT, signal.SIGINT]
    with pytest.raises(Interrupted):
        with signals.signals_held() as caught:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(signals.ONE_CTRL_C_S + 0.1)  # an operator's second Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    assert caught == [signal.SIGINT, signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is before


def test_a_signal_during_a_deferred_close_inside_a_seal_still_waits_for_the_seal():
    """A connection closed while a record is sealed defers signals too: one arriving there is the seal's
    to judge (it waits), not an interruption of the seal; a second one a second later still breaks it."""
    with signals.signals_held() as caught:
        with signals.signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        time.sleep(0.1)
    assert caught == [signal.SIGTERM]
    with pytest.raises(Interrupted):
        with signals.signals_held() as caught:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(signals.ONE_CTRL_C_S + 0.1)
            with signals.signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)
    assert caught == [signal.SIGINT, signal.SIGINT]
    with pytest.raises(Interrupted):  # outside a seal, a deferred signal is raised once the block ends
        with signals.signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)


def test_a_revision_not_read_is_never_shown_as_base():
    assert revisions_text(None) == "not read"
    assert revisions_text([]) == "base"
    assert revisions_text(["a", "b"], "+") == "a+b"
    row = runlist.run_row({"database": {"name": "d"}, "revisions_before": None, "revisions_after": []})
    assert row["revisions"] == "not read -> base"


def test_audit_commands_read_a_folder_they_cannot_write():
    """An auditor with read-only access: `audit verify` names the unsealed run and seals nothing."""
    folder = Path(tempfile.mkdtemp(prefix="opslib-readonly-"))
    try:
        records = folder / "records"
        records.mkdir()
        stem = "20261126T100000Z_deploy_ffff6666"
        running_record(records, stem, host=socket.gethostname(), pids=[dead_pid()])
        liveness.live_mark_path(records, stem).touch()
        before = sorted(p.name for p in records.iterdir())
        for path in [folder, records, *records.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
        command = [OPSLIB, "audit", "verify"]
        if os.geteuid() == 0:  # root may write anywhere: the auditor is an unprivileged user
            command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *command]
        else:
            records.chmod(0o555)
        done = subprocess.run(command, cwd=folder, env={**env, "HOME": "/tmp"}, capture_output=True, text=True)
        assert done.returncode == 3, done.stderr  # a ledger check that fails is a refusal
        assert "Traceback" not in done.stderr
        assert f"{stem}.json was not sealed" in done.stdout + done.stderr
        assert sorted(p.name for p in records.iterdir()) == before
        assert json.loads((records / f"{stem}.json").read_text())["outcome"] == "running"
    finally:
        records.chmod(0o755)
        shutil.rmtree(folder)


def test_live_mark_is_not_inherited_by_child_processes(tmp_path):
    """pg_dump and pg_restore, started by a run, must not keep its mark held after the run is gone."""
    mark = liveness.hold_live_mark(tmp_path, "stem")
    child = subprocess.Popen(["sleep", "30"])
    try:
        mark.release()
        with liveness.ended_run(tmp_path, "stem", {}) as ended:
            assert ended
    finally:
        child.kill()
        child.wait()


def test_a_checkout_with_uncommitted_changes_is_recorded_as_dirty(tmp_path):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    assert record.git_dirty(tmp_path) is None  # not a checkout
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "runbook.ipynb").write_text("{}")
    subprocess.run([*git, "add", "."], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=tmp_path, check=True)
    assert record.git_dirty(tmp_path) is False
    (tmp_path / "runbook.ipynb").write_text('{"edited": true}')  # a template saved from Lab
    assert record.git_dirty(tmp_path) is True


def _unlistened_socket(path: str, age_s: float) -> socket.socket:
    """A Unix socket bound at ``path`` that does not listen (a kernel between bind and listen, or one
    that died), its file ``age_s`` seconds old."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return sock


def test_kernel_files_of_a_gone_runner_go_and_only_those(monkeypatch):
    from opslib import kernelfiles

    short = Path(tempfile.mkdtemp(prefix="okf", dir="/tmp"))  # a socket's path has room for 107 bytes only
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    try:
        _kernel_files_judged(kernelfiles, short)
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _kernel_files_judged(kernelfiles, tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    orphan = kernelfiles.new_prefix().replace(f"-{os.getpid()}-", f"-{gone.pid}-")
    ours = kernelfiles.new_prefix()
    for prefix in (orphan, ours):
        Path(kernelfiles.connection_file(prefix)).write_text("{}")
    # From an older opslib, with no pid in the name: judged by age and by their socket.
    stale = str(tmp_path / "opslib-kernel-aaaaaaaaaaaa-ipc-1")
    starting = str(tmp_path / "opslib-kernel-bbbbbbbbbbbb-ipc-1")
    listening = str(tmp_path / "opslib-kernel-cccccccccccc-ipc-1")
    old = kernelfiles.LEGACY_STALE_S + 5
    # A runner gone, but its kernel still answers (it outlived its runner, or the runner is in another PID
    # namespace sharing this folder): its files stay until it stops answering.
    outlived = kernelfiles.new_prefix().replace(f"-{os.getpid()}-", f"-{gone.pid}-")
    Path(kernelfiles.connection_file(outlived)).write_text("{}")
    held = [_unlistened_socket(f"{orphan}-1", 0), _unlistened_socket(stale, old), _unlistened_socket(starting, 0)]
    live = _unlistened_socket(listening, old)
    live.listen(1)
    answering = _unlistened_socket(f"{outlived}-1", 0)
    answering.listen(1)
    held.append(answering)
    try:
        removed = kernelfiles.remove_orphans()
        assert sorted(removed) == sorted([kernelfiles.connection_file(orphan), f"{orphan}-1", stale])
        assert os.path.exists(kernelfiles.connection_file(ours))  # this process is alive: its kernel's
        assert os.path.exists(starting)  # refused but fresh: a kernel binding it right now
        assert os.path.exists(listening)  # old but answering: a long run's kernel
        assert os.path.exists(kernelfiles.connection_file(outlived)) and os.path.exists(f"{outlived}-1")
    finally:
        for sock in (*held, live):
            sock.close()


@pytest.mark.parametrize(
    ("mode", "closed", "sealed"),
    [("interactive", True, True), ("interactive", False, False), ("headless", True, False), ("direct", True, False)],
)
def test_a_save_seals_only_an_interactive_run_its_kernel_has_closed(tmp_path, mode, closed, sealed):
    """Between the kernel's first write of the outcome and its last (the database still answering), or for
    a run a runner seals itself, a JupyterLab save or `audit seal` leaves the record alone."""
    from opslib import sealing
    from opslib.config import Settings

    records = tmp_path / "records"
    records.mkdir()
    stem = "20260101T000000Z_deploy_abcd1234"
    record = audit.new_record("deploy", "abcd1234", audit.now(), operator="t", env="development", mode=mode)
    record.end(Outcome.SUCCEEDED, 0, None, record.started_at)
    record.closed_at = record.started_at if closed else None
    audit.write_sidecar(records, stem, record)
    (records / f"{stem}.ipynb").write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    checkpoint = records / ".ipynb_checkpoints" / f"{stem}-checkpoint.ipynb"
    checkpoint.parent.mkdir()
    checkpoint.write_text("{}")
    done = sealing.seal_finished(Settings(records_dir=records), stem, "a test")
    assert (done is not None) is sealed
    entries = audit.read_ledger(records)
    assert len(entries) == int(sealed)
    if sealed:
        assert entries[0]["notebook_sha256"] == audit.file_sha256(records / f"{stem}.ipynb")
        assert not checkpoint.exists()  # Lab's unscrubbed copy goes with the seal
        assert audit.verify_ledger(records) == []


def test_a_deep_temporary_folder_puts_kernel_sockets_in_tmp_where_their_paths_fit(monkeypatch, tmp_path):
    from opslib import kernelfiles

    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    prefix = kernelfiles.new_prefix()
    assert prefix.startswith("/tmp/opslib-kernel-") and len(f"{prefix}-12".encode()) <= 107
    short = tmp_path.parent / "s"
    short.mkdir(exist_ok=True)
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    if len(str(short)) + 48 <= 107:
        assert kernelfiles.new_prefix().startswith(f"{short}/opslib-kernel-{os.getpid()}-")


def test_saves_of_a_sealed_notebook_keep_it_byte_for_byte_or_are_refused(tmp_path):
    """Through jupyter_server's own FileContentsManager with opslib's save hooks: the autosave after the seal
    (only the mark's text and the cell's count differ) writes the sealed bytes back; an edit, or a model of odd
    shapes (which a hook must refuse with an HTTPError, else the server saves anyway), is refused and changes
    nothing."""
    pytest.importorskip("jupyter_server")
    import copy

    from jupyter_server.services.contents.filemanager import FileContentsManager
    from tornado.web import HTTPError

    from opslib import lab, sealing
    from opslib.autoseal import MARK
    from opslib.config import Settings

    records = tmp_path / "records"
    records.mkdir()
    stem, run_id = "20260101T000000Z_deploy_abcd1234", "abcd1234"
    record = audit.new_record("deploy", run_id, audit.now(), operator="t", env="development", mode="interactive")
    record.end(Outcome.SUCCEEDED, 0, None, record.started_at)
    record.closed_at = record.started_at
    audit.write_sidecar(records, stem, record)
    mark = {"output_type": "display_data", "data": {"text/plain": "succeeded; sealing: …"}, "metadata": {MARK: run_id}}
    cell = {"cell_type": "code", "id": "c1", "source": "run.summary()", "metadata": {}, "execution_count": None,
            "outputs": [{"output_type": "stream", "name": "stdout", "text": "Deploy summary\n"}, mark]}  # fmt: skip
    nb = {"cells": [cell], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    manager = FileContentsManager(root_dir=str(records), pre_save_hook=lab.before_save)
    manager.save({"type": "notebook", "format": "json", "content": copy.deepcopy(nb)}, f"{stem}.ipynb")
    assert sealing.seal_finished(Settings(records_dir=records), stem, "a test") is not None
    sealed = audit.file_sha256(records / f"{stem}.ipynb")

    after = copy.deepcopy(nb)
    after["cells"][0]["execution_count"] = 7
    after["cells"][0]["outputs"][1]["data"]["text/plain"] = "succeeded; sealed in the ledger: entry 0123"
    manager.save({"type": "notebook", "format": "json", "content": after}, f"{stem}.ipynb")
    assert audit.file_sha256(records / f"{stem}.ipynb") == sealed and audit.verify_ledger(records) == []

    edited = copy.deepcopy(after)
    edited["cells"][0]["source"] = "run.summary()  # edited"
    odd_source = copy.deepcopy(after)
    odd_source["cells"][0]["source"] = ["run.summary()", 1]
    odd_metadata = copy.deepcopy(after)
    odd_metadata["cells"][0]["outputs"][0]["metadata"] = [1]
    for content in (edited, odd_source, odd_metadata, {"cells": "nope"}, None):
        with pytest.raises(HTTPError) as refused:
            lab.before_save({"type": "notebook", "content": content}, f"{stem}.ipynb", manager)
        assert refused.value.status_code == 409
    assert audit.file_sha256(records / f"{stem}.ipynb") == sealed
    lab.after_save({}, str(records / f"{stem}.ipynb"), manager)  # a notebook of odd shapes is no mark, no error
