"""`opslib run`: execute a runbook with papermill, keep the executed notebook, finish the record.

papermill runs in this process (a kernel start is about 0.5 s; papermill's own CLI adds a second).
The kernel inherits this process's environment, which is how it learns the run id and record stem
(so the notebook, the sidecar and the ledger line share one name) and the absolute folders.
papermill writes the output notebook before raising on a failed cell (its
``raise_for_execution_errors``), so the evidence exists whatever happened; the outcome and exit
code come from the sidecar the run wrote, or, when the kernel never got that far, from here.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from opslib import audit, params
from opslib.config import Settings
from opslib.errors import InvalidInput


@dataclass(frozen=True)
class RunOutcome:
    """What `opslib run` reports: the record's files and what it says."""

    record: dict
    sidecar: Path
    notebook: Path

    @property
    def exit_code(self) -> int:
        """The contract's exit code for this run."""
        return int(self.record.get("exit_code") or 0)

    def line(self) -> str:
        """A one-line outcome for the terminal."""
        r = self.record
        where = ", ".join(r.get("revisions_after") or []) or "base"
        text = f"{r['runbook']} {r['outcome']} (exit {self.exit_code})"
        if r.get("database"):
            text += f" on {r['database']['name']}, now at {where}"
        if r.get("schema_recreated"):
            text += f"; schema public was recreated ({r['schema_recreated']['reason']})"
        if r.get("error"):
            text += f": {r['error']}"
        return text


def runbooks_dir() -> Path:
    """The folder of the runbook notebooks: OPSLIB_RUNBOOKS_DIR, else ``runbooks/`` beside the opslib package."""
    configured = os.environ.get("OPSLIB_RUNBOOKS_DIR")
    return Path(configured) if configured else Path(__file__).resolve().parents[1] / "runbooks"


def runbook_path(name: str) -> Path:
    """The notebook of a runbook, by name."""
    params.spec(name)  # unknown names are refused with the list of runbooks
    path = runbooks_dir() / f"{name}.ipynb"
    if not path.is_file():
        raise InvalidInput(
            f"runbook notebook {path} not found: set OPSLIB_RUNBOOKS_DIR to the runbooks folder"
        )
    return path


def coerce(name: str, pairs: Sequence[tuple[str, str]]) -> dict:
    """Turn ``-p NAME VALUE`` strings into typed values as the runbook declares them.

    Strings stay strings (so revision ``0042`` is not the number 42); numbers and booleans are
    converted when they parse, and otherwise passed on for the runbook's validation to refuse.
    """
    declared = {p.name: p for p in params.spec(name)}
    values: dict = {}
    for key, raw in pairs:
        p = declared.get(key)
        if p is None or p.type is str:
            values[key] = raw
        elif p.type is bool:
            lowered = raw.strip().lower()
            values[key] = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(
                lowered, raw
            )
        elif p.type is int:
            values[key] = int(raw) if raw.strip().lstrip("-").isdigit() else raw
    return values


def _ipc_kernel_manager() -> type:
    """A kernel manager talking to the kernel over Unix sockets instead of unencrypted local TCP.

    Besides keeping the channel off the network stack, this spares every run ipykernel's warning
    about unencrypted TCP.
    """
    import tempfile
    import uuid

    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum, default

    class IPCKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc")

        @default("ip")
        def _unique_socket_prefix(self) -> str:
            # jupyter_client's default prefix is "kernel-ipc" in the working folder: two runs started
            # together there would pick the same socket files.
            return str(Path(tempfile.gettempdir()) / f"opslib-kernel-{uuid.uuid4().hex[:12]}-ipc")

    return IPCKernelManager


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


def run(
    settings: Settings, name: str, pairs: Sequence[tuple[str, str]] = (), env: str | None = None
) -> RunOutcome:
    """Execute runbook ``name`` with papermill and return its finished record."""
    notebook_in = runbook_path(name)
    values = coerce(name, pairs)
    records = Path(settings.records_dir).resolve()
    records.mkdir(parents=True, exist_ok=True)
    started = audit.now()
    run_id = audit.new_run_id()
    stem = audit.record_stem(name, run_id, started)
    notebook_out = records / f"{stem}.ipynb"
    kernel_env = {
        audit.RUN_ID_ENV: run_id,
        audit.RUN_STEM_ENV: stem,
        "OPSLIB_RECORDS_DIR": str(records),
        "OPSLIB_BACKUPS_DIR": str(Path(settings.backups_dir).resolve()),
        "OPSLIB_ALEMBIC_INI": str(Path(settings.alembic_ini).resolve()),
        "OPSLIB_STATE_DIR": str(Path(settings.state_dir).resolve()),
        "OPSLIB_OPERATOR": settings.operator,
    }
    if env:
        kernel_env["OPSLIB_ENV"] = env
    error: BaseException | None = None
    with _environment(kernel_env):
        import papermill  # late import: about a second, paid only by `opslib run`
        from papermill.exceptions import PapermillExecutionError

        try:
            papermill.execute_notebook(
                str(notebook_in),
                str(notebook_out),
                parameters=values,
                progress_bar=False,
                log_output=False,
                cwd=os.getcwd(),
                kernel_manager_class=_ipc_kernel_manager(),
                # The run has sealed its record and released its connections by the last cell; a
                # graceful shutdown only waits (0.5 s, at times 3 s) for a kernel with nothing left to do.
                shutdown_kernel="immediate",
            )
        except PapermillExecutionError:
            pass  # the run recorded its own failure in the sidecar
        except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - a dead kernel, Ctrl-C: recorded below
            error = err
    record = audit.read_sidecar(records, stem)
    if record is None:
        record = audit.new_record(name, run_id, started, operator=settings.operator, env=env or settings.env)
        record["parameters"] = values
    if record["outcome"] == "running":
        interrupted = isinstance(error, KeyboardInterrupt)
        record["outcome"] = "interrupted" if interrupted else "failed"
        record["exit_code"] = 1
        record["error"] = record.get("error") or (
            "interrupted"
            if interrupted
            else f"the notebook stopped outside an opslib step: {error or 'see the notebook'}"
        )
        record["finished_at"] = audit.iso(audit.now())
    record["notebook"] = notebook_out.name if notebook_out.exists() else None
    sidecar = audit.write_sidecar(records, stem, record)
    audit.append_ledger(records, stem, record)
    return RunOutcome(record, sidecar, notebook_out)
