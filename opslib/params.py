"""Runbook parameters: one declaration per runbook, and strict validation before any connection.

Each runbook declares its parameters in its module under :mod:`opslib.workflows`; its ``parameters``
cell carries the same names, types, defaults and help (a test compares them through papermill's own
parser). This module holds what they share: the declaration, the checks and the one reading of text. Validation
refuses unknown names, wrong types, malformed revision ids (papermill's ``-p`` turns ``0042`` into
the number 42) and forbidden combinations, each with one line saying what to do, as
:class:`~opslib.errors.InvalidInput` (exit 2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from opslib.errors import InvalidInput, PreconditionFailed
from opslib.redact import redact_urls_in


@dataclass(frozen=True)
class Param:
    """One runbook parameter as declared in the notebook's parameters cell."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple = ()
    revision: bool = False

    def cell_line(self) -> str:
        """The line of the parameters cell that declares this parameter (papermill's grammar)."""
        return f"{self.name}: {self.type.__name__} = {self.default!r}  # {self.help}"


# The parameters several runbooks share (each runbook declares its own list in :mod:`opslib.workflows`).
URL_ENV = Param(
    "database_url_env",
    str,
    "DATABASE_URL",
    "name of the environment variable holding the database URL (never the URL itself)",
)
CONFIRM = Param("confirm", str, "", "the database's name, required in production (staging too for reset)")
DEV_DATA = Param(
    "dev_data", bool, False, "load the development sample data (the -x dev_data flag of Alembic); refused in production"
)
BACKUP = Param("backup", bool, True, "take and verify a backup first (cannot be turned off in production)")
BACKUP_METHOD = Param(
    "backup_method",
    str,
    "",
    "dump: pg_dump -Fc; pgbackrest: a physical backup and a restore point (empty: the policy's [backup] method)",
    ("", "dump", "pgbackrest"),
)

_REVISION = re.compile(r"^[A-Za-z0-9_.@+\-]+$")
# An environment variable's name (what database_url_env and the fleet file's url_env hold).
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names every notebook namespace has; anything else holding plain data was injected as a parameter.
_NAMESPACE = {"In", "Out", "get_ipython", "exit", "quit", "open", "run"}
_PLAIN = (str, int, float, bool, list, dict, tuple, type(None))


def from_namespace(declared: Sequence[Param], namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters found in a notebook's namespace: declared ones, and any other plain value (injected by mistake)."""
    names = {p.name for p in declared}
    found = {name: namespace[name] for name in names if name in namespace}
    for name, value in namespace.items():
        if name in names or name.startswith("_") or name in _NAMESPACE:
            continue
        if isinstance(value, _PLAIN):
            found[name] = value
    return found


def validate(runbook: str, declared: Sequence[Param], values: Mapping[str, Any]) -> dict[str, Any]:
    """Check every value against the runbook's declaration; returns the complete parameter dict.

    The rules every runbook shares are checked here; a runbook's own rules across its parameters are
    its workflow's ``check_values`` (see :mod:`opslib.workflows`)."""
    refuse_secrets(runbook, values)
    known = {p.name: p for p in declared}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InvalidInput(
            f"{runbook}: unknown parameter {', '.join(unknown)}; the parameters are {', '.join(known)}"
        )
    result = {}
    for p in declared:
        result[p.name] = _check(runbook, p, values.get(p.name, p.default))
    _check_url_env(runbook, result)
    return result


def parse_text(p: Param | None, raw: str) -> Any:
    """A value given as text (``opslib run -p NAME VALUE``, a fleet file, a string papermill passed on)
    as the parameter's type, when it reads as one; otherwise the text, for validation to refuse by name.
    The one reading of such text: revisions stay strings (``0042`` is not the number 42)."""
    if p is None or p.type is str:
        return raw
    if p.type is bool:
        return _BOOLEANS.get(raw.strip().lower(), raw)
    if p.type is int:
        return int(raw) if raw.strip().lstrip("-").isdigit() else raw
    return raw


_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


# user:password@host on its own, with no scheme: a password too, though no URL shows it so.
_BARE_USERINFO = re.compile(r"^[^\s/@:]+:[^\s/@]+@[^\s/@]+")


def check_environment(runbook: str, values: Mapping[str, Any], env: str, allowed: bool = True) -> None:
    """The environment's rules for a runbook's parameters: in production, a runbook not ``allowed`` there
    (reset) is refused and no backup may be turned off, whatever the parameters say
    (:class:`PreconditionFailed`, exit 3)."""
    if env != "production":
        return
    if not allowed:
        raise PreconditionFailed(f"{runbook} is refused in production, whatever the parameters")
    if values.get("dev_data"):
        raise PreconditionFailed(f"{runbook}: dev_data=True is refused in production: sample data never goes there")
    if "backup" in values and not values["backup"]:
        raise PreconditionFailed(f"{runbook}: backup=False is not allowed in production")


def holds_secret(value: Any) -> bool:
    """True when ``value`` is text holding a password: a URL with one (in its user part or its
    ``?password=`` query), ``user:password@host``, or a libpq conninfo's ``password=``; or a list,
    tuple or dict (a parameter may be any plain value) holding such text, as a key or a value."""
    if isinstance(value, str):
        # What redaction would mask is a password (one rule for both): `user:pw@` in a URL, ?password=, password=.
        return redact_urls_in(value) != value or bool(_BARE_USERINFO.match(value))
    if isinstance(value, (list, tuple)):
        return any(holds_secret(v) for v in value)
    if isinstance(value, dict):
        return any(holds_secret(k) or holds_secret(v) for k, v in value.items())
    return False


def shown_value(value: Any) -> Any:
    """A parameter's value as a record may keep it: one that holds a password is replaced."""
    return "(not kept: it holds a password)" if holds_secret(value) else value


def refuse_secrets(runbook: str, values: Mapping[str, Any]) -> None:
    """Refuse any parameter value that holds a URL with a password, naming the parameter, never the value.

    Parameters are written into the executed notebook and the record; a URL belongs in the
    environment variable that ``database_url_env`` names.
    """
    for name, value in values.items():
        if holds_secret(value):
            raise InvalidInput(
                f"{runbook}: parameter {name} holds a URL with a password, which would be written into the "
                "notebook and the record: put the URL in an environment variable and name it with database_url_env"
            )


def _check(runbook: str, p: Param, value: Any) -> Any:
    where = f"{runbook}: parameter {p.name}"
    if p.type is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and p.revision:
            raise InvalidInput(
                f"{where} must be a string, got the number {value!r}: papermill's -p turns a revision like "
                f"0042 into a number; pass it with papermill -r {p.name} VALUE, or with opslib run -p"
            )
        if not isinstance(value, str):
            raise InvalidInput(f"{where} must be a string, not {type(value).__name__} {value!r}")
        value = value.strip()
        if p.revision and value and not _REVISION.match(value):
            raise InvalidInput(f"{where}: {value!r} is not a revision id (letters, digits, _ . @ + -)")
    elif p.type is bool:
        if isinstance(value, str):
            value = parse_text(p, value)
        if not isinstance(value, bool):
            raise InvalidInput(f"{where} must be true or false, not {value!r}")
    elif p.type is int:
        if isinstance(value, str):
            value = parse_text(p, value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(f"{where} must be a whole number, not {value!r}")
    if p.choices and value not in p.choices:
        raise InvalidInput(f"{where} must be one of {', '.join(repr(c) if c == '' else c for c in p.choices)}, not {value!r}")
    return value


def _check_url_env(runbook: str, values: dict[str, Any]) -> None:
    env_name = values.get("database_url_env", "DATABASE_URL")
    if "://" in env_name or not ENV_NAME.match(env_name):
        raise InvalidInput(
            f"{runbook}: database_url_env names the environment variable that holds the URL "
            f"(e.g. DATABASE_URL), not {'a URL' if '://' in env_name else repr(env_name)}"
        )


def check_revision_list(runbook: str, name: str, text: str) -> list[str]:
    """Revision ids given as one comma-separated text (``acknowledge_irreversible``), each checked."""
    ids = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in ids if not _REVISION.match(r)]
    if bad:
        raise InvalidInput(f"{runbook}: {name} lists revision ids separated by commas; {bad[0]!r} is not one")
    return ids
