"""`opslib run`: execute a runbook with papermill, keep the executed notebook, finish the record.

papermill runs in this process (a kernel start is about 0.5 s; papermill's own CLI adds a second).
The kernel is started first and boots while papermill and the modules that seal the record load
(about 0.35 s of a run on a two-core machine); papermill is then handed that kernel.
The kernel inherits this process's environment, which is how it learns the run id and record stem
(so the notebook, the sidecar and the ledger line share one name) and the absolute folders.
papermill writes the output notebook before raising on a failed cell (its
``raise_for_execution_errors``), so the evidence exists whatever happened; the outcome and exit
code come from the sidecar the run wrote, or, when the kernel never got that far, from here.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from opslib import audit, kernelfiles, liveness, notebooks, params, signatures, workflows
from opslib.approval import outside_approvals
from opslib.config import Settings, runbooks_dir
from opslib.errors import ConfigError, Interrupted, InvalidInput, OpsError
from opslib.outcome import Outcome, outcome_of, process_exit_code, signal_exit_code
from opslib.record import RunRecord, revisions_text
from opslib.redact import redact_urls_in
from opslib.runcontext import RunContext
from opslib.signals import signals_held


@dataclass(frozen=True)
class RunOutcome:
    """What `opslib run` reports: the record's files and what it says."""

    record: RunRecord
    sidecar: Path
    notebook: Path

    @property
    def exit_code(self) -> int:
        """The contract's exit code for this run; 1 for a run with none (abandoned by a kernel that died)."""
        return process_exit_code(self.record.outcome, self.record.exit_code)

    def result(self) -> dict:
        """What `opslib run --json` prints, the contract between an `opslib run` and whoever started it
        (the fleet): the run, its outcome and exit code, where its database stands, and its files."""
        r = self.record
        return {
            "run_id": r.run_id,
            "runbook": r.runbook,
            "outcome": str(r.outcome),
            "exit_code": self.exit_code,
            "database": r.database.name if r.database else None,
            "revisions_before": r.revisions_before,
            "revisions_after": r.revisions_after,
            "error": redact_urls_in(r.error) if r.error else None,
            "record": str(self.sidecar),
            "notebook": str(self.notebook) if self.notebook.exists() else None,
        }

    def line(self) -> str:
        """A one-line outcome for the terminal."""
        r = self.record
        text = f"{r.runbook} {r.outcome} (exit {self.exit_code})"
        if r.database:
            if r.revisions_after is None:
                text += f" on {r.database.name} (its revision not read)"
            else:
                text += f" on {r.database.name}, now at {revisions_text(r.revisions_after)}"
        if r.schema_recreated:
            text += f"; schema public was recreated ({r.schema_recreated.reason})"
        if r.error:
            text += f": {redact_urls_in(r.error)}"
        return text


def runbook_path(name: str) -> Path:
    """The notebook of a runbook, by name."""
    workflows.get(name)  # unknown names are refused with the list of runbooks
    path = runbooks_dir() / f"{name}.ipynb"
    if not path.is_file():
        raise InvalidInput(
            f"runbook notebook {path} not found: set OPSLIB_RUNBOOKS_DIR to the runbooks folder"
        )
    return path


def coerce(name: str, pairs: Sequence[tuple[str, str]]) -> dict:
    """Turn ``-p NAME VALUE`` strings into typed values as the runbook declares them (see
    :func:`opslib.params.parse_text`); what does not parse is passed on for validation to refuse."""
    declared = {p.name: p for p in workflows.get(name).parameters}
    return {key: params.parse_text(declared.get(key), raw) for key, raw in pairs}


class _Kernels:
    """The kernels this process started for runs, so that a signal can be passed on and their
    socket files removed when the run ends."""

    managers: list = []

    @classmethod
    def interrupt(cls, signum: int) -> None:
        """Pass ``signum`` (SIGINT or SIGTERM) on to each live kernel: the runbook step under way stops and
        seals the record as interrupted by it (a kernel that has not started the run yet just ends)."""
        cls._send(signum)

    @classmethod
    def kill(cls) -> None:
        """End each live kernel at once (papermill then sees it dead and returns)."""
        cls._send(signal.SIGKILL)

    @classmethod
    def _send(cls, signum: int) -> None:
        for km in cls.managers:
            pid = getattr(getattr(km, "provisioner", None), "pid", None)
            if pid:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

    @classmethod
    def clean_up(cls) -> None:
        """Stop each kernel still running (one papermill never took over because the run failed first, or
        one that died and was not reaped), and remove the Unix socket files the kernels leave
        (jupyter_client does not on an immediate shutdown). Never raises: it runs as a run ends."""
        from jupyter_core.utils import run_sync

        managers, cls.managers = cls.managers, []
        for km in managers:
            try:
                if km.has_kernel:
                    run_sync(km.shutdown_kernel)(now=True)
            except Exception as err:  # noqa: BLE001 - the run's own outcome matters more than this
                logging.getLogger(__name__).warning("could not stop a kernel of this run: %s", err)
            finally:
                for leftover in glob.glob(f"{glob.escape(km.ip)}-*"):
                    Path(leftover).unlink(missing_ok=True)
                connection_file = getattr(km, "connection_file", "")
                if connection_file:
                    Path(connection_file).unlink(missing_ok=True)


def _ipc_kernel_manager() -> type:
    """A kernel manager talking to the kernel over Unix sockets instead of unencrypted local TCP.

    Besides keeping the channel off the network stack, this spares every run ipykernel's warning
    about unencrypted TCP.
    """

    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum, default

    class IPCKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc")

        @default("client_factory")
        def _quickly_ready_client(self) -> type:
            return _quickly_ready_client_class()

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _Kernels.managers.append(self)

        async def _async_wait(self, pollinterval: float = 0.1) -> None:
            # jupyter_client polls a killed kernel every 0.1 s to see it gone; it is gone within a few ms.
            await super()._async_wait(pollinterval=min(pollinterval, 0.005))

        @default("ip")
        def _unique_socket_prefix(self) -> str:
            # jupyter_client's default prefix is "kernel-ipc" in the working folder: two runs started
            # together there would pick the same socket files. This one names the runner's pid.
            return kernelfiles.new_prefix()

        @default("connection_file")
        def _connection_file_beside_the_sockets(self) -> str:
            # Not Jupyter's runtime folder: named for this runner, it is removed once the runner is gone.
            return kernelfiles.connection_file(self.ip)

    return IPCKernelManager


def _quickly_ready_client_class() -> type:
    """jupyter_client's asynchronous kernel client, ready as soon as the kernel answers.

    jupyter_client's ``wait_for_ready`` ends by reading IOPub until it has been silent for 0.2 s, which
    every run waited for in full. Here the messages already there are drained without waiting for more:
    nbclient matches each output to the request that made it, and ipykernel 7 (the floor in
    pyproject.toml) stamps each output with its request when it is written, so a late one from the
    kernel's start-up cannot land in a cell.
    """
    from queue import Empty

    from jupyter_client.asynchronous import AsyncKernelClient

    class QuicklyReadyClient(AsyncKernelClient):
        async def wait_for_ready(self, timeout: float | None = None) -> None:
            deadline = time.time() + (float("inf") if timeout is None else timeout)
            while True:  # as jupyter_client: a kernel_info reply, and IOPub seen connected
                self.kernel_info()
                try:
                    msg = await self.shell_channel.get_msg(timeout=1)
                except Empty:
                    pass
                else:
                    if msg["msg_type"] == "kernel_info_reply":
                        try:
                            await self.iopub_channel.get_msg(timeout=0.2)
                        except Empty:
                            pass
                        else:
                            self._handle_kernel_info_reply(msg)
                            break
                if not await self._async_is_alive():
                    raise RuntimeError("Kernel died before replying to kernel_info")
                if time.time() > deadline:
                    raise RuntimeError(f"Kernel didn't respond in {timeout:g} seconds")
            while True:
                try:
                    await self.iopub_channel.get_msg(timeout=0.005)
                except Empty:
                    break

    return QuicklyReadyClient


def _start_kernel(template: Path) -> type:
    """Start the kernel of a run now, in this process's environment and folder, and return the kernel
    manager class to give papermill: constructing it hands over this kernel, already booting.

    nbclient then finds a kernel running (it does not start another), and owns it as one it started:
    it connects, runs the cells, and shuts it down and closes its channels at the end.
    """
    import json

    from jupyter_core.utils import run_sync

    kernel_name = json.loads(template.read_text(encoding="utf-8")).get("metadata", {}).get("kernelspec", {}).get("name")
    if not kernel_name:
        raise ConfigError(f"runbook notebook {template} names no kernel (its metadata has no kernelspec name)")
    manager_class = _ipc_kernel_manager()
    started = manager_class(kernel_name=kernel_name)
    # What nbclient gives an IPython kernel it starts itself: no history file written.
    extra = ["--HistoryManager.hist_file=:memory:"] if started.ipykernel else []
    run_sync(started.start_kernel)(extra_arguments=extra, cwd=os.getcwd())

    class StartedKernelManager(manager_class):
        def __new__(cls, *args, **kwargs):
            # Not an instance of this class: Python does not run __init__ on it again.
            return started

    return StartedKernelManager


class _Stop:
    """The signal (SIGINT or SIGTERM) that asked this run to stop, if one did; the cell papermill waits
    for the reply of (None between cells), and whether papermill has returned."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.awaiting: int | None = None
        self.returned = threading.Event()


@contextmanager
def _signals_passed_to_the_kernel(stop: _Stop) -> Iterator[None]:
    """While the notebook runs, SIGINT and SIGTERM stop the run cleanly instead of killing this process.

    The kernel is interrupted (the step under way stops, reads where the database stands and seals
    the record as interrupted) and no further cell starts; a second signal changes nothing more.
    Outside the main thread (no signal handlers there) nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame) -> None:
        if stop.signum is None:
            stop.signum = signum
            _Kernels.interrupt(signum)
            threading.Thread(target=_end_a_kernel_whose_reply_was_lost, args=(stop,), daemon=True).start()

    saved = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


_LOST_REPLY_GRACE_S = 6.0  # longer than nbclient's iopub_timeout: a reply that came is seen by then


def _end_a_kernel_whose_reply_was_lost(stop: _Stop) -> None:
    """After a signal: end the kernel if it is done with its cell but papermill still waits for the reply.

    A SIGINT that reaches the kernel while it handles the cell's request, but outside the cell's code
    (as the cell's last statement returns, or as the reply is being sent), is caught by ipykernel, which
    then never sends the reply; papermill, with no cell timeout (a deploy may take hours), would wait
    for it forever. The kernel handles one request at a time, so its answer to a kernel_info request
    sent now comes only once it is done with the cell. If papermill still waits a moment after that,
    the reply was lost: the kernel is ended, and the run is sealed from what its record holds, as any
    run whose kernel stopped. A kernel still sealing its interrupted step is never cut short here.
    """
    from queue import Empty

    manager = _Kernels.managers[-1] if _Kernels.managers else None
    if manager is None or stop.returned.wait(1.0):
        return
    try:
        client = manager.blocking_client()
    except Exception:  # noqa: BLE001 - its connection is gone with the kernel: papermill sees that itself
        return
    try:
        client.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)
        probe = client.kernel_info()
        while not stop.returned.is_set():
            try:
                reply = client.get_shell_msg(timeout=0.5)
            except Empty:
                continue
            if reply.get("parent_header", {}).get("msg_id") == probe:
                cell = stop.awaiting
                # A reply sent before the probe's reaches papermill within moments, and its output by
                # nbclient's iopub_timeout (4 s); one lost never does.
                if cell is not None and not stop.returned.wait(_LOST_REPLY_GRACE_S) and stop.awaiting == cell:
                    _Kernels.kill()
                return
    except Exception:  # noqa: BLE001 - the kernel went away meanwhile: papermill sees that itself
        return
    finally:
        client.stop_channels()


def _no_cell_after_a_signal(stop: _Stop) -> Callable:
    """An nbclient hook run before each cell: once a signal asked the run to stop, no cell starts."""

    def on_cell_start(cell, cell_index) -> None:
        if stop.signum is not None:
            from nbclient.exceptions import CellExecutionError

            name = signal.Signals(stop.signum).name
            raise CellExecutionError(f"not run: the run was stopped by {name}", "Interrupted", name)

    return on_cell_start


def _cell_sent(stop: _Stop) -> Callable:
    """An nbclient hook run as a code cell is sent to the kernel: papermill now waits for its reply."""

    def on_cell_execute(cell, cell_index) -> None:
        stop.awaiting = cell_index

    return on_cell_execute


def _cell_replied(stop: _Stop) -> Callable:
    """An nbclient hook run as each cell's reply arrives: papermill no longer waits for it."""

    def on_cell_executed(cell, cell_index, execute_reply) -> None:
        stop.awaiting = None

    return on_cell_executed


@contextmanager
def _environment(updates: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class Prepared:
    """A run about to start: its names, its first record (written), and the environment its kernel gets."""

    name: str
    values: dict
    records: Path
    stem: str
    notebook: Path
    template: Path
    first: RunRecord
    kernel_env: dict[str, str]
    live: liveness.LiveMark | None  # None: refused before it started (its record is sealed already)


def prepare(settings: Settings, name: str, pairs: Sequence[tuple[str, str]], env: str | None, mode: str) -> Prepared:
    """Name a new run of runbook ``name`` (driven ``mode``: headless or interactive), hold its live mark
    and write its first sidecar; the notebook is the driver's to write.

    Parameters holding a secret are refused here, before anything writes them into a notebook: the run
    is then recorded and sealed at once as invalid (``live`` is None).
    """
    template = runbook_path(name)
    values = coerce(name, pairs)
    records = Path(settings.records_dir).resolve()
    audit.ensure_records_dir(records)
    started = audit.now()
    run_id = audit.new_run_id()
    stem = audit.record_stem(name, run_id, started)
    notebook = records / f"{stem}.ipynb"
    sha = audit.file_sha256(template)  # the template, as run
    first = audit.new_record(
        name, run_id, started, operator=settings.operator, env=env or settings.env, mode=mode, runbook_sha256=sha,
        approvals=outside_approvals(settings.approved_by, settings.approval_ref),
    )
    signer, _ = signatures.ledger_signer(settings)
    declared = workflows.get(name)  # what the records layer reads of the runbook, from its first record on
    first.changes_database, first.backup_gated = declared.changes_database, declared.backup_gated
    context = RunContext(run_id, stem, mode, os.getpid(), sha, first.started_at)
    kernel_env = _kernel_environment(settings, name, context, records, env)
    prepared = Prepared(name, values, records, stem, notebook, template, first, kernel_env, None)
    try:
        # Checked here, before the values are written into the notebook's injected cell.
        params.refuse_secrets(name, values)
    except InvalidInput as err:
        first.parameters = {k: params.shown_value(v) for k, v in values.items()}
        audit.append_started(records, stem, first, settings.ledger_witness, signer)
        first.end(*outcome_of(err), err.message, audit.iso(audit.now()))
        from opslib import sealing  # SQLAlchemy's import is paid only by a run that seals here

        sealing.seal(settings, records, stem, first)
        return prepared
    # The run's live mark and first sidecar exist before the notebook is written: from the first
    # instant, `audit verify` sees a run in progress, and a driver killed now leaves a record to seal.
    first.parameters = values
    try:
        prepared.live = liveness.hold_live_mark(records, stem)
        # In the ledger before anything else: from now on this run's files are the ledger's to vouch for.
        audit.append_started(records, stem, first, settings.ledger_witness, signer)
        audit.write_sidecar(records, stem, first)
    except OSError as err:  # a full or read-only records folder: nothing has run
        if prepared.live is not None:
            prepared.live.release(remove=True)
        first.end(Outcome.INVALID, Outcome.INVALID.exit_code, "not started: its record could not be written", audit.iso(audit.now()))
        raise _records_unwritable(settings, records, notebook, first, err) from None
    return prepared


def _kernel_environment(settings: Settings, name: str, context: RunContext, records: Path, env: str | None) -> dict[str, str]:
    """What the run's kernel gets in its environment: the run's context, and the settings this driver resolved."""
    kernel_env = {
        # Every connection the run opens carries its id: a run that dies can have its sessions ended.
        "PGAPPNAME": audit.application_name(name, context.run_id),
        **context.environment(),
        # The settings this driver resolved, as the configuration contract's own variables.
        "OPSLIB_RECORDS_DIR": str(records),
        "OPSLIB_BACKUPS_DIR": str(Path(settings.backups_dir).resolve()),
        "OPSLIB_ALEMBIC_INI": str(Path(settings.alembic_ini).resolve()),
        "OPSLIB_STATE_DIR": str(Path(settings.state_dir).resolve()),
        "OPSLIB_OPERATOR": settings.operator,
    }
    if env:
        kernel_env["OPSLIB_ENV"] = env
    return kernel_env


def run(
    settings: Settings,
    name: str,
    pairs: Sequence[tuple[str, str]] = (),
    env: str | None = None,
) -> RunOutcome:
    """Execute runbook ``name`` with papermill and return its sealed record.

    A record the kernel could not finish (it died, or a signal stopped the run between cells) is
    ended here, with where the database stands read afresh, and sealed like any other.
    """
    run_ = prepare(settings, name, pairs, env, "headless")
    records, stem, notebook_out = run_.records, run_.stem, run_.notebook
    if run_.live is None:
        return RunOutcome(run_.first, audit.sidecar_path(records, stem), notebook_out)
    stop = _Stop()
    kernelfiles.remove_orphans()
    with _environment(run_.kernel_env), _signals_passed_to_the_kernel(stop):
        try:
            error = _execute(run_, stop)
        finally:
            stop.returned.set()
    # Sealed with SIGINT and SIGTERM held off (a cancelled CI job sends one, then another).
    with signals_held():
        record = _seal_after_the_kernel(settings, run_, stop, error)
    return RunOutcome(record, audit.sidecar_path(records, stem), notebook_out)


def _execute(run_: Prepared, stop: "_Stop") -> BaseException | None:
    """Run the notebook with papermill in a kernel of its own; the error that ended it early, or None."""
    try:
        kernel_manager_class = _start_kernel(run_.template)
        papermill = notebooks.papermill()  # loaded while the kernel boots
        # What seals the record afterwards (SQLAlchemy, 0.15 s) loads while the cells run: this
        # process only waits for the kernel then. Its later import waits for this one to finish.
        threading.Thread(target=importlib.import_module, args=("opslib.sealing",), daemon=True).start()

        # papermill warns of parameters the notebook does not declare; the runbook refuses them itself, in one line.
        logging.getLogger("papermill").setLevel(logging.ERROR)
        papermill.execute_notebook(
            str(run_.template),
            str(run_.notebook),
            parameters=run_.values,
            progress_bar=False,
            log_output=False,
            cwd=os.getcwd(),
            kernel_manager_class=kernel_manager_class,
            # The run has sealed its record and released its connections by the last cell; a
            # graceful shutdown only waits (0.5 s, at times 3 s) for a kernel with nothing left to do.
            shutdown_kernel="immediate",
            on_cell_start=_no_cell_after_a_signal(stop),
            on_cell_execute=_cell_sent(stop),
            on_cell_executed=_cell_replied(stop),
        )
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - a failed cell or a dead kernel
        return err  # a failed cell recorded its own failure in the sidecar, unless it never got to
    finally:
        _Kernels.clean_up()
    return None


def _seal_after_the_kernel(settings: Settings, run_: Prepared, stop: "_Stop", error: BaseException | None) -> RunRecord:
    """End what the kernel left unfinished (where the database stands read afresh), then seal the run."""
    records, stem = run_.records, run_.stem
    record = audit.load_record(records, stem) or run_.first
    record.pids = sorted(set(record.pids) | {os.getpid()})
    from opslib import sealing  # loaded while the cells ran (see above)

    if not (isinstance(record.outcome, Outcome) and record.outcome.sealed):
        try:
            _end_unfinished(settings, record, stop.signum, error)
        except Interrupted:  # signalled twice while the database was slow to answer: sealed without it
            record.database_history = "not written: the run was interrupted again while it was sealed"
    else:
        if record.outcome is Outcome.INTERRUPTED and stop.signum is not None:
            # The kernel may have seen another signal than this process (Ctrl-C in a terminal reaches only this one).
            record.exit_code = signal_exit_code(stop.signum)
        if not record.closed_at and record.database is not None and record.outcome is not Outcome.INVALID:
            # The kernel wrote its outcome, then was stopped before it closed the run (this process's own
            # signal cut the notebook short): the run's row in its database may be missing. Written here
            # (once: a row already there stays), with where the database stands read afresh.
            try:
                sealing.settle(settings, record)
            except Interrupted:
                record.database_history = "not written: the run was interrupted again while it was sealed"

    try:
        sealing.seal(settings, records, stem, record)  # None when another command sealed it meanwhile
    except OSError as err:  # a full or read-only records folder: the run cannot be sealed there
        run_.live.release(remove=True)
        raise _records_unwritable(settings, records, run_.notebook, record, err) from None
    run_.live.release(remove=True)
    return record


def _records_unwritable(
    settings: Settings, records: Path, notebook: Path, record: RunRecord, err: OSError
) -> ConfigError:
    """The error for a run whose record cannot be written (exit 2): why, and where the database stands
    (read now if the run did not). What the failed writes left is removed (an empty notebook); a first
    sidecar that was written stays, for the next command with room to seal as abandoned."""
    with contextlib.suppress(OSError):
        if notebook.exists() and notebook.stat().st_size == 0:
            notebook.unlink()
    if record.revisions_after is None:
        from opslib import migrate  # only for a run that ended without reading it

        record.revisions_after = migrate.revisions_now(settings, record.version_table)
    if record.revisions_after is not None:
        where = f"the database is at {revisions_text(record.revisions_after)}"
    else:
        where = "where the database stands was not read: run `opslib status`"
    return ConfigError(
        f"the run's record cannot be written in {records} ({err.strerror or err}): {where}; "
        f"the run ended {record.outcome}: {record.error or 'see opslib status'}. Free space there, or set "
        "OPSLIB_RECORDS_DIR to a writable folder"
    )


_INTERRUPTS = ("KeyboardInterrupt", "Interrupted")  # a cell stopped by a signal, as papermill names it


def _end_unfinished(settings: Settings, record: RunRecord, signum: int | None, error: BaseException | None) -> None:
    """End a record the kernel left unfinished: stopped by a signal between cells or outside a step, a
    cell that failed outside any opslib step, or a kernel that died (``abandoned``: nothing sealed it)."""
    from nbclient.exceptions import DeadKernelError

    ename = getattr(error, "ename", None)
    if signum is None and ename in _INTERRUPTS:
        signum = signal.SIGINT  # interrupted where this process did not see the signal (the kernel's own)
    if signum is not None:
        outcome, code = outcome_of(Interrupted(signum))
        why = f"interrupted by {signal.Signals(signum).name}"
    elif isinstance(error, DeadKernelError):
        outcome, code = Outcome.ABANDONED, None
        why = f"the kernel died before the run was sealed: {error}"
    elif ename is not None:
        outcome, code = Outcome.FAILED, 1
        why = f"the notebook stopped outside an opslib step: {ename}: {getattr(error, 'evalue', '')}"
    elif isinstance(error, OpsError):  # before the notebook ran: its kernel could not be started
        outcome, code = outcome_of(error)
        why = error.message
    else:
        outcome, code = outcome_of(error or RuntimeError())
        why = f"the notebook stopped outside an opslib step: {error or 'see the notebook'}"
    for entry in record.steps:
        if entry.outcome is Outcome.RUNNING:
            entry.outcome = outcome
    record.end(outcome, code, record.error or why, audit.iso(audit.now()))
    from opslib import sealing

    sealing.settle(settings, record)
