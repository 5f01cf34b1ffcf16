"""The witness: a second, append-only place that keeps the hash of every ledger entry, outside the
records folder, so that a ledger cut short or replaced is caught even for runs that reached no database.

On by default, in a per-user state folder (``$XDG_STATE_HOME/opslib/witness``, else
``~/.local/state/opslib/witness``); ``OPSLIB_LEDGER_WITNESS`` names another folder, or ``off``. A backend is
anything with :meth:`append` and :meth:`rows` (:class:`FolderWitness` here); object storage with a
retention lock can be added beside it. Low in the layers: it imports nothing of opslib's.
"""

from __future__ import annotations

import fcntl
import json
import os
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


def folder_from(environ: dict) -> Path | None:
    """The witness folder ``OPSLIB_LEDGER_WITNESS`` names: the default when unset, None when ``off``."""
    value = (environ.get("OPSLIB_LEDGER_WITNESS") or "").strip()
    if value.lower() in OFF and value:
        return None
    return Path(value) if value else default_folder(environ)


class Witness(Protocol):
    """Where entry hashes are appended and read back."""

    def append(self, ledger_id: str, entry: dict) -> None: ...

    def rows(self) -> list[dict]: ...


class FolderWitness:
    """``ledger-witness.jsonl`` in a folder, appended under an exclusive lock and fsynced."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def __str__(self) -> str:
        return str(self.folder)

    def append(self, ledger_id: str, entry: dict) -> None:
        """Append the entry's hash; a witness that cannot be written is said on stderr (the run is sealed
        in its ledger either way, and `audit verify` names what the witness lacks)."""
        line = {
            "ledger_id": ledger_id, "run_id": entry.get("run_id"), "entry_hash": entry.get("hash"),
            "prev_hash": entry.get("prev_hash"), "runbook": entry.get("runbook"),
            "outcome": entry.get("outcome") or entry.get("kind"),
            "sealed_at": datetime.now(timezone.utc).isoformat(),
        }  # fmt: skip
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


def of(folder: Path | None) -> Witness | None:
    """The witness backend for a configured folder (None: no witness)."""
    return FolderWitness(folder) if folder is not None else None
