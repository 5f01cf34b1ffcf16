"""pgBackRest, called as a client as pg_dump is: where it is, the stanza opslib works with, its commands,
and what its ``info`` says.

opslib never archives WAL itself: the server's ``archive_command`` runs ``pgbackrest archive-push``, and
opslib asks pgBackRest for backups, restores, verification and expiry. A stanza is either the team's (a
configuration file and stanza name in the project's policy, ``[backup] config`` and ``stanza``) or the
one opslib writes for the embedded server under ``<state dir>/pgbackrest/``.

Run as root, pgBackRest runs as the OS user that owns the server's data folder (``run_as``): the
archive command runs as that user, and the repository must stay that user's.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from opslib.errors import BackupFailed, BackupMethodUnavailable, ConfigError, OpsError
from opslib.pgtools import as_user, child_options

ENV_PROGRAM = "OPSLIB_PGBACKREST"
EMBEDDED_STANZA = "embedded"
INSTALL_HINT = "run `make pgbackrest` (Debian's package, into .venv/bin), or set OPSLIB_PGBACKREST to its path"


def program() -> Path:
    """The pgBackRest program: ``OPSLIB_PGBACKREST``, else the one beside this Python (``make pgbackrest``
    puts it in the venv), else ``pgbackrest`` on PATH."""
    named = os.environ.get(ENV_PROGRAM)
    if named:
        if not os.access(named, os.X_OK) or not os.path.isfile(named):
            raise ConfigError(f"{ENV_PROGRAM}={named} is not an executable file")
        return Path(named)
    beside = Path(sys.executable).parent / "pgbackrest"
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("pgbackrest")
    if found is None:
        raise BackupMethodUnavailable(f"pgBackRest is not installed: {INSTALL_HINT}")
    return Path(found)


@dataclass(frozen=True)
class Stanza:
    """A pgBackRest stanza: its name, its configuration file, and the OS user its commands run as (None:
    this process's user)."""

    name: str
    config: Path
    run_as: str | None = None

    def argv(self, command: str, *options: str) -> list[str]:
        """The command line of one pgBackRest command on this stanza."""
        return [str(program()), f"--config={self.config}", f"--stanza={self.name}", *options, command]

    def archive_command(self) -> str:
        """The ``archive_command`` that pushes each WAL segment into this stanza's repository."""
        return f"'{program()}' --config='{self.config}' --stanza={self.name} archive-push %p"


def repository_dir(state_dir: Path) -> Path:
    """Where the embedded server's pgBackRest keeps its configuration, repository, logs and locks."""
    return (Path(state_dir) / "pgbackrest").resolve()


def write_embedded_config(state_dir: Path, pgdata: Path, socket_dir: Path, port: int, run_as: str | None) -> Stanza:
    """Write the embedded server's stanza file (``<state dir>/pgbackrest/pgbackrest.conf``): a repository
    beside it, the server reached on its socket. Rewritten each time, so that a moved folder is followed."""
    home = repository_dir(state_dir)
    for sub in ("repo", "log", "lock", "spool"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    config = home / "pgbackrest.conf"
    text = "\n".join(
        [
            "# Written by opslib for the embedded server (opslib db start); rewritten at each start.",
            "[global]",
            f"repo1-path={home / 'repo'}",
            f"log-path={home / 'log'}",
            f"lock-path={home / 'lock'}",
            f"spool-path={home / 'spool'}",
            "start-fast=y",  # a checkpoint at once: a backup does not wait for the next one
            "log-level-console=warn",
            "log-level-stderr=off",
            "",
            f"[{EMBEDDED_STANZA}]",
            f"pg1-path={pgdata}",
            f"pg1-socket-path={socket_dir}",
            f"pg1-port={port}",
            "pg1-user=postgres",
            "",
        ]
    )
    tmp = config.with_name(".pgbackrest.conf.tmp")
    tmp.write_text(text)
    tmp.replace(config)
    if run_as:
        owner = pwd.getpwnam(run_as)
        for path in [home, *home.rglob("*")]:
            os.chown(path, owner.pw_uid, owner.pw_gid)
    return Stanza(EMBEDDED_STANZA, config, run_as)


def run(
    stanza: Stanza,
    command: str,
    *options: str,
    error: type[OpsError] = BackupFailed,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run one pgBackRest command on ``stanza`` and return what it printed; a failure raises ``error`` with
    pgBackRest's own message (its ``ERROR: [code]: …`` line)."""
    kwargs = {**child_options(), **as_user(stanza.run_as)}
    try:
        done = subprocess.run(
            stanza.argv(command, *options),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",  # the user it runs as may not reach this process's folder
            env=env,
            **kwargs,
        )
    except subprocess.TimeoutExpired as err:
        raise error(f"pgbackrest {command} did not finish within {timeout:.0f} s") from err
    except OSError as err:
        raise error(f"pgbackrest {command} could not be started: {err}") from err
    if done.returncode != 0:
        raise error(f"pgbackrest {command} failed: {failure_text(done.stdout + done.stderr, done.returncode)}")
    return done.stdout


def failure_text(output: str, code: int) -> str:
    """pgBackRest's own error (``ERROR: [041]: unable to load info file …``) with the lines that say its cause
    (indented under it: ``FileOpenError: … Permission denied``, ``HINT: …``), or its exit code."""
    lines = output.splitlines()
    at = next((i for i, line in enumerate(lines) if "ERROR:" in line), None)
    if at is None:
        return f"exit code {code}"
    said = [lines[at].split("ERROR:", 1)[1].strip()]
    said += [line.strip() for line in lines[at + 1 :] if line[:1].isspace() and line.strip()]
    text = " ".join(said)
    return text if len(text) <= 600 else text[:600] + "…"


def verify(stanza: Stanza, error: type[OpsError] = BackupFailed) -> str:
    """``pgbackrest verify``: every backup's files and the WAL archive read and checked. Its exit code says
    nothing of what it found; its report does (``status: error`` and the lines under it), read here."""
    out = run(stanza, "verify", "--output=text", error=error)
    lines = out.splitlines()
    if any(line.strip() == "status: error" for line in lines):
        found = [line.strip() for line in lines if line[:1].isspace() and line.strip() and ":" not in line.strip()[:7]]
        raise error(f"pgbackrest verify found errors in stanza {stanza.name}: {'; '.join(found) or out.strip()}")
    return out


@dataclass(frozen=True)
class PhysicalBackup:
    """One backup in a pgBackRest repository, as ``pgbackrest info`` lists it."""

    label: str
    type: str  # full | diff | incr
    started_at: float  # epoch seconds
    stopped_at: float
    size: int  # the database's size at the backup
    repository_size: int  # what the backup added to the repository
    wal_start: str
    wal_stop: str
    lsn_start: str | None = None
    lsn_stop: str | None = None


@dataclass(frozen=True)
class StanzaInfo:
    """What ``pgbackrest info`` says of a stanza: its status, its backups (oldest first) and archived WAL."""

    name: str
    status: str
    backups: tuple[PhysicalBackup, ...]
    wal_min: str | None
    wal_max: str | None

    @property
    def newest(self) -> PhysicalBackup | None:
        """The newest backup of any type."""
        return self.backups[-1] if self.backups else None

    @property
    def newest_full(self) -> PhysicalBackup | None:
        """The newest full backup."""
        return next((b for b in reversed(self.backups) if b.type == "full"), None)


def info(stanza: Stanza, error: type[OpsError] = BackupFailed) -> StanzaInfo:
    """The stanza's backups and archive, read from ``pgbackrest info --output=json``."""
    out = run(stanza, "info", "--output=json", error=error, timeout=120)
    try:
        data = json.loads(out)
        found = next(s for s in data if s.get("name") == stanza.name)
    except (ValueError, StopIteration, AttributeError, TypeError) as err:
        raise error(f"pgbackrest info said nothing readable of stanza {stanza.name!r}") from err
    status = found.get("status") or {}
    if status.get("code") not in (0, 2):  # 2: no backup yet, which the gate takes; anything else is a fault
        said = [r.get("status", {}).get("message") for r in found.get("repo") or [] if r.get("status", {}).get("code")]
        raise error(f"pgBackRest stanza {stanza.name}: {'; '.join(filter(None, said)) or status.get('message')}")
    backups = tuple(
        PhysicalBackup(
            label=b["label"],
            type=b["type"],
            started_at=float(b["timestamp"]["start"]),
            stopped_at=float(b["timestamp"]["stop"]),
            size=int(b.get("info", {}).get("size", 0)),
            repository_size=int(b.get("info", {}).get("repository", {}).get("delta", 0)),
            wal_start=str(b.get("archive", {}).get("start")),
            wal_stop=str(b.get("archive", {}).get("stop")),
            lsn_start=(b.get("lsn") or {}).get("start"),
            lsn_stop=(b.get("lsn") or {}).get("stop"),
        )
        for b in found.get("backup", [])
    )
    archives = found.get("archive") or []
    return StanzaInfo(
        name=stanza.name,
        status=str(found.get("status", {}).get("message", "")),
        backups=backups,
        wal_min=archives[-1].get("min") if archives else None,
        wal_max=archives[-1].get("max") if archives else None,
    )
