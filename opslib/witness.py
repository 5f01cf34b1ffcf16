"""The witness: a second, append-only place that keeps the hash of every ledger entry, outside the
records folder, so that a ledger cut short or replaced is caught even for runs that reached no database.

On by default, in a per-user state folder (``$XDG_STATE_HOME/opslib/witness``, else
``~/.local/state/opslib/witness``); ``OPSLIB_LEDGER_WITNESS`` names another folder, ``syslog`` (the local
syslog's ``/dev/log``), ``syslog:/path/to/socket`` or ``syslog:host:port`` (UDP), or ``off``. A backend is
anything with :meth:`append` and :meth:`rows`: :class:`FolderWitness` and :class:`SyslogWitness` here; object
storage with a retention lock can be added beside them. Low in the layers: it imports nothing of opslib's.
"""

from __future__ import annotations

import fcntl
import json
import logging
import logging.handlers
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

WITNESS_FILE = "ledger-witness.jsonl"
OFF = ("off", "none", "0", "false")


def default_folder(environ: dict | None = None) -> Path:
    """The per-user state folder the witness is kept in when nothing else is configured."""
    environ = os.environ if environ is None else environ
    state = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "opslib" / "witness"


SYSLOG = "syslog"


def spec_from(environ: dict) -> str | None:
    """The witness ``OPSLIB_LEDGER_WITNESS`` names (a folder, or ``syslog[:ADDRESS]``): the default folder
    when unset, None when ``off``."""
    value = (environ.get("OPSLIB_LEDGER_WITNESS") or "").strip()
    if value.lower() in OFF and value:
        return None
    return value or str(default_folder(environ))


def _line(ledger_id: str, entry: dict) -> dict:
    """What a witness keeps of a ledger entry: its hash and enough to name the run."""
    return {
        "ledger_id": ledger_id, "run_id": entry.get("run_id"), "entry_hash": entry.get("hash"),
        "prev_hash": entry.get("prev_hash"), "runbook": entry.get("runbook"),
        "outcome": entry.get("outcome") or entry.get("kind"),
        "sealed_at": datetime.now(timezone.utc).isoformat(),
    }  # fmt: skip


class Witness(Protocol):
    """Where entry hashes are appended and, where the backend allows it, read back."""

    def append(self, ledger_id: str, entry: dict) -> None: ...

    def rows(self) -> list[dict] | None: ...


class FolderWitness:
    """``ledger-witness.jsonl`` in a folder, appended under an exclusive lock and fsynced."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def __str__(self) -> str:
        return str(self.folder)

    def append(self, ledger_id: str, entry: dict) -> None:
        """Append the entry's hash; a witness that cannot be written is said on stderr (the run is sealed
        in its ledger either way, and `audit verify` names what the witness lacks)."""
        line = _line(ledger_id, entry)
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(self.folder / WITNESS_FILE, "a", encoding="utf-8") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                f.write(json.dumps(line, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            print(f"opslib: could not write the ledger witness in {self.folder}: {err.strerror or err}", file=sys.stderr)

    def rows(self) -> list[dict]:
        """The hashes kept, oldest first (``sealed_at`` as a datetime); unreadable lines are skipped."""
        try:
            lines = (self.folder / WITNESS_FILE).read_text(encoding="utf-8").splitlines()
        except OSError:  # none yet, or another user's: nothing this command can compare with
            return []
        rows = []
        for text in lines:
            try:
                row = json.loads(text)
                row["sealed_at"] = datetime.fromisoformat(row["sealed_at"])
            except (ValueError, KeyError, TypeError):
                continue
            rows.append(row)
        return rows


class SyslogWitness:
    """Each entry's hash sent to syslog (ident ``opslib-ledger``, facility ``user``, priority ``info``), one JSON
    message per entry: kept by the syslog daemon or the log host it forwards to, out of the records' editors'
    reach. It cannot be read back from here: `audit verify` says so, and the log host is where to compare."""

    IDENT = "opslib-ledger"

    def __init__(self, address: str | tuple[str, int] = "/dev/log"):
        self.address = address

    def __str__(self) -> str:
        where = self.address if isinstance(self.address, str) else f"{self.address[0]}:{self.address[1]}"
        return f"syslog ({where})"

    def append(self, ledger_id: str, entry: dict) -> None:
        """Send the entry's hash; a syslog that cannot be reached is said on stderr, as for a folder."""
        try:
            handler = logging.handlers.SysLogHandler(
                address=self.address,
                facility=logging.handlers.SysLogHandler.LOG_USER,
                socktype=socket.SOCK_DGRAM,
            )
        except OSError as err:
            print(f"opslib: could not reach the ledger witness {self}: {err.strerror or err}", file=sys.stderr)
            return
        handler.ident = f"{self.IDENT}: "
        # logging would print a traceback for a message it could not send: one line, as for a folder.
        handler.handleError = lambda _record: print(  # type: ignore[method-assign]
            f"opslib: could not send the ledger witness to {self}: {sys.exc_info()[1]}", file=sys.stderr
        )
        try:
            message = json.dumps(_line(ledger_id, entry), sort_keys=True)
            handler.emit(logging.LogRecord(self.IDENT, logging.INFO, __file__, 0, message, None, None))
        finally:
            handler.close()

    def rows(self) -> None:
        """None: a syslog witness is not read back here."""
        return None


def _syslog_address(spec: str) -> str | tuple[str, int]:
    rest = spec[len(SYSLOG) :].lstrip(":")
    if not rest:
        return "/dev/log"
    if rest.startswith("/"):
        return rest
    host, _, port = rest.rpartition(":")
    return (host, int(port)) if host and port.isdigit() else (rest, 514)


def of(spec: str | Path | None) -> Witness | None:
    """The witness backend for a configured spec: a folder, or ``syslog[:ADDRESS]`` (None: no witness)."""
    if spec is None:
        return None
    text = str(spec)
    if text == SYSLOG or text.startswith(SYSLOG + ":"):
        return SyslogWitness(_syslog_address(text))
    return FolderWitness(Path(text))
