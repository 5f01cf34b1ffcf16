"""Runbook parameters: one declaration per runbook, and strict validation before any connection.

The declarations here are the source of truth; each runbook's ``parameters`` cell carries the same
names, types, defaults and help (a test compares them through papermill's own parser). Validation
refuses unknown names, wrong types, malformed revision ids (papermill's ``-p`` turns ``0042`` into
the number 42) and forbidden combinations, each with one line saying what to do, as
:class:`~opslib.errors.InvalidInput` (exit 2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

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


_URL_ENV = Param(
    "database_url_env",
    str,
    "DATABASE_URL",
    "name of the environment variable holding the database URL (never the URL itself)",
)
_CONFIRM = Param("confirm", str, "", "the database's name, required in production (staging too for reset)")
_DEV_DATA = Param(
    "dev_data", bool, False, "load the development sample data (the -x dev_data flag of Alembic); refused in production"
)

RUNBOOKS: dict[str, tuple[Param, ...]] = {
    "deploy": (
        _URL_ENV,
        Param("target_revision", str, "head", "revision to upgrade to", revision=True),
        Param("backup", bool, True, "take and verify a backup first (cannot be turned off in production)"),
        Param("restore_test", bool, False, "verify the backup by restoring it into a scratch database"),
        Param(
            "on_failure",
            str,
            "stop",
            "stop: stay at the last committed revision; restore: restore the backup",
            ("stop", "restore"),
        ),
        _DEV_DATA,
        _CONFIRM,
    ),
    "rollback": (
        _URL_ENV,
        Param("steps", int, 1, "how many revisions to roll back (ignored when target_revision is set)"),
        Param("target_revision", str, "", "revision to roll back to (empty: use steps)", revision=True),
        Param("backup", bool, True, "take and verify a backup first (cannot be turned off in production)"),
        Param(
            "acknowledge_irreversible",
            str,
            "",
            "ids of revisions whose downgrade does nothing, comma-separated: their changes stay in the database",
        ),
        _CONFIRM,
    ),
    "recovery": (
        _URL_ENV,
        Param(
            "mode",
            str,
            "restore",
            "restore: restore a backup and replay; stamp: record a revision after a manual fix",
            ("restore", "stamp"),
        ),
        Param(
            "backup_file", str, "", "backup to restore (empty: the newest verified backup of this database)"
        ),
        Param(
            "target_revision",
            str,
            "head",
            "revision to replay migrations to after the restore (empty: none)",
            revision=True,
        ),
        Param("terminate_connections", bool, False, "end other sessions on the database before replacing it"),
        Param(
            "stamp_revision", str, "", "for mode stamp: the revision the database is now at", revision=True
        ),
        Param("reason", str, "", "for mode stamp: why, for the record (required)"),
        _CONFIRM,
    ),
    "reset": (
        _URL_ENV,
        Param("backup", bool, False, "take and verify a backup first"),
        Param("dev_data", bool, True, "load the development sample data again (the -x dev_data flag of Alembic)"),
        Param(
            "recreate_schema",
            str,
            "on_failure",
            "on_failure: downgrade, recreate schema public only if a downgrade fails; always: skip the "
            "downgrades; never: stop at a failed downgrade",
            ("on_failure", "always", "never"),
        ),
        _CONFIRM,
    ),
    "rehearse": (
        _URL_ENV,
        Param("target_revision", str, "head", "revision the copy is upgraded to, then downgraded from", revision=True),
        Param(
            "from_revision",
            str,
            "",
            "empty: start where the target is; else first downgrade the copy to this revision (to rehearse "
            "revisions the target already has, on its data)",
            revision=True,
        ),
    ),
    "init-prod": (
        _URL_ENV,
        Param("admin_email_env", str, "OPSLIB_ADMIN_EMAIL", "name of the environment variable holding the admin's email"),
        Param(
            "admin_password_env",
            str,
            "OPSLIB_ADMIN_PASSWORD",
            "name of the environment variable holding the admin's password (stored only as a salted hash)",
        ),
    ),
}

_REVISION = re.compile(r"^[A-Za-z0-9_.@+\-]+$")
# An environment variable's name (what database_url_env and the fleet file's url_env hold).
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names every notebook namespace has; anything else holding plain data was injected as a parameter.
_NAMESPACE = {"In", "Out", "get_ipython", "exit", "quit", "open", "run"}
_PLAIN = (str, int, float, bool, list, dict, tuple, type(None))


def spec(runbook: str) -> tuple[Param, ...]:
    """The declared parameters of a runbook."""
    try:
        return RUNBOOKS[runbook]
    except KeyError:
        raise InvalidInput(
            f"no runbook {runbook!r}: the runbooks are {', '.join(sorted(RUNBOOKS))}"
        ) from None


def from_namespace(runbook: str, namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters found in a notebook's namespace: declared ones, and any other plain value (injected by mistake)."""
    declared = {p.name for p in spec(runbook)}
    found = {name: namespace[name] for name in declared if name in namespace}
    for name, value in namespace.items():
        if name in declared or name.startswith("_") or name in _NAMESPACE:
            continue
        if isinstance(value, _PLAIN):
            found[name] = value
    return found


def validate(runbook: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check every value against the runbook's declaration; returns the complete parameter dict."""
    params = spec(runbook)
    refuse_secrets(runbook, values)
    known = {p.name: p for p in params}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InvalidInput(
            f"{runbook}: unknown parameter {', '.join(unknown)}; the parameters are {', '.join(known)}"
        )
    result = {}
    for p in params:
        result[p.name] = _check(runbook, p, values.get(p.name, p.default))
    _check_combinations(runbook, result)
    return result


# user:password@host on its own, with no scheme: a password too, though no URL shows it so.
_BARE_USERINFO = re.compile(r"^[^\s/@:]+:[^\s/@]+@[^\s/@]+")


def check_environment(runbook: str, values: Mapping[str, Any], env: str) -> None:
    """The environment's rules for a runbook's parameters: in production, reset is refused and no
    backup may be turned off, whatever the parameters say (:class:`PreconditionFailed`, exit 3)."""
    if env != "production":
        return
    if runbook == "reset":
        raise PreconditionFailed("reset is refused in production, whatever the parameters")
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
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise InvalidInput(f"{where} must be true or false, not {value!r}")
    elif p.type is int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(f"{where} must be a whole number, not {value!r}")
    if p.choices and value not in p.choices:
        raise InvalidInput(f"{where} must be one of {', '.join(p.choices)}, not {value!r}")
    return value


def _check_combinations(runbook: str, values: dict[str, Any]) -> None:
    env_name = values["database_url_env"]
    if "://" in env_name or not ENV_NAME.match(env_name):
        raise InvalidInput(
            f"{runbook}: database_url_env names the environment variable that holds the URL "
            f"(e.g. DATABASE_URL), not {'a URL' if '://' in env_name else repr(env_name)}"
        )
    for name in ("admin_email_env", "admin_password_env"):
        if name in values and not ENV_NAME.match(values[name]):
            raise InvalidInput(f"{runbook}: {name} names an environment variable (e.g. OPSLIB_ADMIN_EMAIL), not {values[name]!r}")
    if runbook == "deploy" and values["on_failure"] == "restore" and not values["backup"]:
        raise InvalidInput(
            "deploy: on_failure='restore' needs backup=True: there is nothing to restore otherwise"
        )
    if runbook == "rollback" and not values["target_revision"] and values["steps"] < 1:
        raise InvalidInput(f"rollback: steps must be at least 1, not {values['steps']}")
    if runbook == "rollback":
        ids = [r.strip() for r in values["acknowledge_irreversible"].split(",") if r.strip()]
        bad = [r for r in ids if not _REVISION.match(r)]
        if bad:
            raise InvalidInput(
                f"rollback: acknowledge_irreversible lists revision ids separated by commas; {bad[0]!r} is not one"
            )
    if runbook == "recovery" and values["mode"] == "stamp":
        if not values["stamp_revision"]:
            raise InvalidInput(
                "recovery: mode='stamp' needs stamp_revision, the revision the database is now at"
            )
        if not values["reason"].strip():
            raise InvalidInput("recovery: mode='stamp' needs a reason, kept in the record")
