"""The Alembic project opslib works on, and what this process knows of it.

The project is whatever ``Settings.alembic_ini`` points at. Its facts are kept on one
:class:`Project` per alembic.ini, obtained through :func:`project_for`: the revision scripts
(loaded once while the files are unchanged) and where its env.py keeps the revision (learned from
env.py, and kept on disk in the state folder for the next command).
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Sequence

from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy.engine import URL, Connection

from opslib import db
from opslib.config import Settings
from opslib.errors import ConfigError, InvalidInput

# A dialect-only URL for offline SQL: no server is needed, and no password can leak into it.
OFFLINE_URL = "postgresql+psycopg2://"

_PROBES_FILE = "version-tables.json"


def alembic_config(
    settings: Settings,
    *,
    url: URL | str | None = None,
    connection: Connection | None = None,
    x_args: Sequence[str] = (),
    output: io.StringIO | None = None,
    driver: str | None = None,
) -> Config:
    """An Alembic Config for the project at ``settings.alembic_ini``, wired to opslib's target.

    The URL is set in memory only (never written to the ini file); ``%`` is doubled because the
    ini parser interpolates it. Its driver is ``driver`` (a :class:`~opslib.migrate.target.Target`'s, decided
    once), else the one :func:`env_driver` decides.
    """
    ini = Path(settings.alembic_ini)
    if not ini.is_file():
        raise ConfigError(
            f"Alembic config not found at {ini}: set OPSLIB_ALEMBIC_INI to your project's alembic.ini"
        )
    for value in x_args:
        key, sep, _ = value.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"-x takes KEY=VALUE, not {value!r}")
    cfg = Config(str(ini), output_buffer=output, stdout=io.StringIO())
    try:
        cfg.get_main_option("script_location")  # read now: a file that is not an ini file is named
    except CommandError as err:  # no [alembic] section
        raise ConfigError(f"{err}: set OPSLIB_ALEMBIC_INI to your project's alembic.ini") from None
    except (UnicodeDecodeError, configparser.Error) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{ini} is not an ini file Alembic can read ({type(err).__name__}: {first}): set OPSLIB_ALEMBIC_INI "
            "to your project's alembic.ini"
        ) from None
    cfg.cmd_opts = argparse.Namespace(x=list(x_args))
    cfg.attributes["configure_logger"] = False
    if connection is not None:
        cfg.attributes["connection"] = connection
    if url is not None:
        if not isinstance(url, str):
            url = url.set(drivername=driver or env_driver(settings, cfg, url.drivername))
        rendered = url if isinstance(url, str) else url.render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return cfg


def env_driver(settings: Settings, cfg: Config, ours: str) -> str:
    """The driver the project's env.py is handed: the one the target URL names (``DATABASE_URL=postgresql+asyncpg://…``),
    else its own ``sqlalchemy.url``'s (:func:`_project_driver`), else opslib's own (``ours``)."""
    return db.env_driver(settings.database_url) or _project_driver(cfg, ours)


def _project_driver(cfg: Config, ours: str) -> str:
    """The driver the project's own ``sqlalchemy.url`` names (``postgresql+asyncpg`` for an async env.py),
    so the URL opslib hands to env.py is one its engine can use; opslib's own connections stay on psycopg2.
    A driver the target URL itself names (``DATABASE_URL=postgresql+asyncpg://…``) comes first."""
    try:
        raw = cfg.get_main_option("sqlalchemy.url") or ""
    except Exception:  # noqa: BLE001 - an option that does not interpolate: opslib's driver then
        return ours
    scheme = raw.split("://", 1)[0] if "://" in raw else ""
    return scheme if scheme.startswith("postgresql+") else ours


class Project:
    """One Alembic project (one alembic.ini) as this process knows it.

    ``script`` is its ScriptDirectory with the revision map built, valid while its files are as
    ``state`` says; ``version_tables`` is where its env.py keeps the revision, by :meth:`env_key`.
    """

    def __init__(self, ini: str, state: tuple, script: ScriptDirectory, version_tables: dict):
        self.ini = ini  # the resolved path of its alembic.ini
        self.state = state  # what identified its files when loaded (see _files_state)
        self.script = script
        self.folder = Path(script.dir).resolve()  # its scripts folder, where env.py is
        # Where the project keeps its revision, as its env.py configures it online, by env_key: learned from
        # every online run of env.py, and kept on disk (see remember_version_table) so that the next command
        # knows it too. The answer depends on the scripts folder and env.py only, so this dict is shared by
        # every project of the same scripts folder (see _version_tables_of).
        self.version_tables = version_tables

    def env_key(self) -> str:
        """The project's scripts folder and its env.py's content: what the version table's answer depends on."""
        try:
            digest = hashlib.sha256(Path(self.script.env_py_location).read_bytes()).hexdigest()[:16]
        except OSError:
            digest = "no-env.py"
        return f"{Path(self.script.dir).resolve()}#{digest}"

    def note_version_table(self, found: tuple[str | None, str]) -> None:
        """Keep in memory the version table env.py has just configured online."""
        self.version_tables[self.env_key()] = found

    def known_version_table(self, settings: Settings) -> tuple[str | None, str] | None:
        """The version table known in this process, else kept in the state folder (then known in this
        process too); None when neither knows it."""
        key = self.env_key()
        known = self.version_tables.get(key) or self.remembered_version_table(settings, key)
        if known is not None:
            self.version_tables[key] = known
        return known

    def remembered_version_table(self, settings: Settings, key: str) -> tuple[str | None, str] | None:
        """The version table kept on disk for ``key`` (in the state folder), or None."""
        value = _read_probes(_probes_path(settings)).get(key)
        return (value[0], value[1]) if isinstance(value, list) and len(value) == 2 else None

    def remember_version_table(
        self, settings: Settings, key: str, found: tuple[str | None, str]
    ) -> tuple[str | None, str]:
        """Keep ``found`` on disk for ``key`` (in the state folder), and return it."""
        path = _probes_path(settings)
        known = _read_probes(path)
        if known.get(key) != list(found):
            known[key] = list(found)
            try:  # a cache: a folder that cannot be written only costs the next command a probe
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
                tmp.replace(path)
            except OSError:
                pass
        return found


def _probes_path(settings: Settings) -> Path:
    """Where the version tables learned from env.py are kept between commands."""
    return Path(settings.state_dir) / _PROBES_FILE


def _read_probes(path: Path) -> dict:
    """The version tables kept in ``path``; empty when there is none or it cannot be read."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


# Loaded projects by alembic.ini, with the state of their revision files when loaded. Building
# Alembic's revision map imports every revision file (most of a long chain's start-up), so a run
# builds it once and every later step reuses it until a revision file is added, removed or edited.
_PROJECTS: dict[str, Project] = {}


def project_for(settings: Settings) -> Project:
    """The project at ``settings.alembic_ini``, loaded once per process while its files are unchanged.

    A broken project is a :class:`ConfigError`.
    """
    cfg = alembic_config(settings)
    try:
        fresh = ScriptDirectory.from_config(cfg)
    except (CommandError, RevisionError) as err:
        raise ConfigError(f"cannot load the Alembic project of {settings.alembic_ini}: {err}") from err
    key = str(Path(settings.alembic_ini).resolve())
    state = _files_state(fresh, Path(settings.alembic_ini))
    loaded = _PROJECTS.get(key)
    if loaded is not None and loaded.state == state:
        return loaded
    _load_revisions(fresh, settings)
    made = Project(key, state, fresh, _version_tables_of(Path(fresh.dir).resolve()))
    _PROJECTS[key] = made
    return made


def _version_tables_of(folder: Path) -> dict:
    """The version tables known for the scripts folder ``folder``: those of a project already loaded from
    it (the same alembic.ini before its files changed, or another one sharing the folder), else none yet."""
    for loaded in list(_PROJECTS.values()):  # a copy: another thread may load a project meanwhile
        if loaded.folder == folder:
            return loaded.version_tables
    return {}


def script_directory(settings: Settings) -> ScriptDirectory:
    """The project's revision scripts, loaded once per process while its files are unchanged.

    A broken project is a :class:`ConfigError`.
    """
    return project_for(settings).script


def _load_revisions(script: ScriptDirectory, settings: Settings) -> None:
    """Import every revision file and build the graph now, so that a broken file or graph is a
    :class:`ConfigError` (exit 2) naming what to fix, before any command reads or changes anything."""
    try:
        script.revision_map._revision_map  # noqa: B018 - Alembic's memoized map: reading it loads everything
    except SyntaxError as err:
        raise ConfigError(
            f"revision file {err.filename}, line {err.lineno}, is not valid Python: {err.msg}; fix it first"
        ) from None
    except ImportError as err:
        missing = err.name or str(err)
        raise ConfigError(
            f"revision file {_failing_file(err, script) or '(unknown)'}, imports {missing!r}, which cannot be "
            f"imported here: install it, or fix the import"
        ) from None
    except RevisionError as err:
        cycle = re.search(r"\(([^)]*)\)", str(err))
        if type(err).__name__.endswith("CycleDetected") and cycle:
            raise ConfigError(
                f"the revisions' down_revision form a cycle through {cycle.group(1)}: each must point to an "
                "older revision; fix down_revision in one of them"
            ) from None
        raise ConfigError(f"the revisions of {settings.alembic_ini} do not form a history: {err}") from None
    except CommandError as err:
        raise ConfigError(f"cannot load the revisions of {settings.alembic_ini}: {err}") from None
    except Exception as err:  # noqa: BLE001 - a revision's module-level code failed on import
        lines = str(err).strip().splitlines()
        raise ConfigError(
            f"revision file {_failing_file(err, script) or '(unknown)'} fails on import: "
            f"{type(err).__name__}: {lines[0] if lines else ''}"
        ) from None


def _failing_file(err: BaseException, script: ScriptDirectory) -> str | None:
    """The revision file in whose import ``err`` was raised (the innermost frame in a version folder)."""
    import traceback

    folders = [str(Path(location).resolve()) for location in script._version_locations]
    found = None
    for frame in traceback.extract_tb(err.__traceback__):
        if any(str(Path(frame.filename).resolve()).startswith(folder) for folder in folders):
            found = f"{frame.filename}, line {frame.lineno}"
    return found


def _files_state(script: ScriptDirectory, ini: Path) -> tuple:
    """What identifies the revision files as they are now: every file's name, size and mtime."""
    entries = [(str(ini), ini.stat().st_mtime_ns)]
    for location in script._version_locations:
        folder = Path(location)
        if not folder.is_dir():
            continue
        files = folder.rglob("*.py") if script.recursive_version_locations else folder.glob("*.py")
        for path in files:
            try:
                st = path.stat()
            except OSError:
                continue
            entries.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))



def table_name(where: tuple[str | None, str]) -> str:
    """``schema.table`` of a version table, or the bare table when it is found on the search_path."""
    schema, table = where
    return f"{schema}.{table}" if schema else table
