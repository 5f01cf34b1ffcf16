"""The operated project's own policy: what each pre-deploy check and each squawk rule does (block,
warn or ignore), and which findings were accepted, by revision id, with a reason.

It lives in the project, beside its ``alembic.ini``: ``opslib.toml``, or ``[tool.opslib]`` in the
project's ``pyproject.toml`` (``opslib.toml`` wins when both exist). Accepting a finding here means
nobody edits the history of a project they operate::

    [checks]                                # the pre-deploy checks, by their stable names (CHECKS)
    migration-naming = "ignore"             # block | warn | ignore
    downgrades = "block"

    [lint.rules]                            # squawk's rules, by squawk's names
    prefer-robust-stmts = "ignore"
    changing-column-type = "warn"

    [[lint.accept]]                         # rule: a squawk rule, or a check about revisions
    revision = "1f0c2b9e4d7a"
    rule = "adding-not-nullable-field"
    reason = "orders.region has a server default; the table is rewritten off-peak"

    [backup]                                # how a run's backup gate is taken (see BackupPolicy)
    method = "pgbackrest"                   # dump (pg_dump -Fc, the default) | pgbackrest
    fallback = "dump"                       # none (the default: refuse) | dump, when pgBackRest cannot be used

    [approvals]                             # four eyes (see ApprovalPolicy)
    production = 1                          # approvals a deploy in production needs (its plan's signatures)
    self_approval = false                   # whether the operator may approve their own plan (default: no)
    allowed_signers = "allowed_signers"     # who may sign, as OpenSSH's allowed_signers (beside this file)

A malformed file, an unknown check or rule name, or a check that cannot be relaxed set to warn or
ignore, is an :class:`~opslib.errors.ConfigError` (exit 2) naming the file and the known names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable

import tomlkit
from tomlkit.exceptions import TOMLKitError

from opslib.config import ENVIRONMENTS
from opslib.errors import ConfigError, InvalidInput

ACTIONS = ("block", "warn", "ignore")
POLICY_FILE = "opslib.toml"

# The pre-deploy checks' stable names: each check's title as a slug (check_rule), in the order they run.
CHECKS = (
    "database-reachable", "sessions-that-would-block-ddl", "invalid-indexes", "leftover-restores",
    "environment-label", "alembic-project", "single-head", "database-revision-known", "target-revision", "pending-revisions",
    "env-py-database", "downgrades", "sql-renders-offline", "squawk-lint", "migration-naming", "drift", "backup",
)  # fmt: skip
# Checks a deploy cannot go on without (no target, no plan, another database, no backup in production):
# the policy cannot relax them.
FIXED_CHECKS = frozenset(
    {"database-reachable", "alembic-project", "single-head", "database-revision-known", "target-revision", "pending-revisions",
     "env-py-database", "backup"}
)  # fmt: skip
# Checks whose findings are about revisions: they can be accepted per revision, as lint findings are.
REVISION_CHECKS = frozenset({"downgrades", "sql-renders-offline", "migration-naming"})
# squawk's rule names (squawk-cli 2.x, each accepted by its --exclude); a name outside this list is asked
# of the installed squawk (see load_policy's ``is_lint_rule``).
LINT_RULES = (
    "adding-field-with-default", "adding-foreign-key-constraint", "adding-not-nullable-field",
    "adding-required-field", "adding-serial-primary-key-field", "ban-alter-domain-with-add-constraint",
    "ban-char-field", "ban-concurrent-index-creation-in-transaction", "ban-create-domain-with-constraint",
    "ban-drop-column", "ban-drop-database", "ban-drop-not-null", "ban-drop-table", "ban-truncate-cascade",
    "ban-uncommitted-transaction", "changing-column-type", "constraint-missing-not-valid",
    "disallowed-unique-constraint", "prefer-bigint-over-int", "prefer-bigint-over-smallint", "prefer-identity",
    "prefer-robust-stmts", "prefer-text-field", "prefer-timestamptz", "renaming-column", "renaming-table",
    "require-concurrent-index-creation", "require-concurrent-index-deletion", "require-timeout-settings",
    "require-lock-timeout", "require-statement-timeout", "require-table-schema", "require-enum-value-ordering",
    "ban-alter-extension", "transaction-nesting",
)  # fmt: skip


def check_rule(title: str) -> str:
    """A check's stable name, as the policy names it: its title as a slug (``migration naming`` ->
    ``migration-naming``, ``env.py's database`` -> ``env-py-database``)."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower().replace("'s ", " ")).strip("-")


@dataclass(frozen=True)
class Acceptance:
    """One accepted finding: this rule's findings in this revision do not block, for this reason."""

    revision: str
    rule: str
    reason: str


BACKUP_METHODS = ("dump", "pgbackrest")
BACKUP_FALLBACKS = ("none", "dump")


@dataclass(frozen=True)
class BackupPolicy:
    """How a run's backup gate is taken: the ``[backup]`` table of the project's policy.

    ``method`` is ``dump`` (pg_dump -Fc, verified) or ``pgbackrest`` (a physical backup kept by
    pgBackRest, and a named restore point at the gate). ``fallback`` says what a pgbackrest gate does
    where pgBackRest cannot work (no archiving, no privilege): ``none`` refuses, ``dump`` takes a dump
    instead. ``stanza`` and ``config`` name the team's pgBackRest stanza and its configuration file
    (empty: the one opslib writes for the embedded server). A new full backup is taken when the newest
    is older than ``full_max_age_h``, an incremental one when the newest backup of any type is older
    than ``incremental_max_age_h``. ``retention_full`` is how many full backups ``prune-backups`` keeps
    (pgBackRest's expire). ``row_counts``: count every table's rows at the restore point, to check a
    recovery against (exact, and read after the writers are let go, but it reads every table); ``table_checksums``: a checksum of
    every table's rows there too (a full read of each table), which a recovery is then compared with.
    """

    method: str = "dump"
    fallback: str = "none"
    stanza: str = ""
    config: str = ""
    full_max_age_h: float = 168.0
    incremental_max_age_h: float = 24.0
    retention_full: int = 2
    archive_timeout_s: float = 60.0
    row_counts: bool = True
    table_checksums: bool = False


_BACKUP_KEYS = {f.name: f.type for f in fields(BackupPolicy)}


@dataclass(frozen=True)
class ApprovalPolicy:
    """The ``[approvals]`` table: how many approvals (signatures of the run's plan) a change needs in each
    environment, whether the operator's own counts, and where the keys that may sign are listed."""

    development: int = 0
    staging: int = 0
    production: int = 0
    self_approval: bool = False
    allowed_signers: str = "allowed_signers"  # OpenSSH's format; relative to the policy file's folder
    folder: Path | None = None  # the policy file's folder, which a relative allowed_signers is in

    def needed(self, env: str) -> int:
        """How many approvals a change needs in the environment ``env``."""
        return int(getattr(self, env, 0) or 0) if env in ENVIRONMENTS else 0

    @property
    def signers_file(self) -> Path:
        """The allowed_signers file (it may not exist: then nobody can approve or sign)."""
        path = Path(self.allowed_signers).expanduser()
        return path if path.is_absolute() or self.folder is None else self.folder / path


_APPROVAL_KEYS = {f.name: f.type for f in fields(ApprovalPolicy) if f.name != "folder"}


@dataclass(frozen=True)
class Policy:
    """The project's lint rules and accepted findings; empty when the project has no policy."""

    source: Path | None = None
    rules: dict[str, str] = field(default_factory=dict)
    accepted: tuple[Acceptance, ...] = ()
    checks: dict[str, str] = field(default_factory=dict)
    backup: BackupPolicy = field(default_factory=BackupPolicy)
    approvals: ApprovalPolicy = field(default_factory=ApprovalPolicy)

    def action(self, rule: str, default: str) -> str:
        """``block``, ``warn`` or ``ignore`` for the squawk rule ``rule``: the project's word, else ``default``."""
        return self.rules.get(rule, default)

    def check_action(self, check: str) -> str | None:
        """``block``, ``warn`` or ``ignore`` for the check named ``check``, or None when the project says nothing."""
        return self.checks.get(check)

    @property
    def where(self) -> str:
        """The policy file's name, for a person reading a check's detail."""
        return self.source.name if self.source else "the project's policy"

    def acceptance(self, revision: str, rule: str) -> Acceptance | None:
        """The acceptance of ``rule`` in ``revision``, if the project recorded one."""
        return next((a for a in self.accepted if a.revision == revision and a.rule == rule), None)


def policy_file(alembic_ini: Path) -> tuple[Path, bool]:
    """Where the project's policy is or would be: (path, whether it is a pyproject.toml)."""
    folder = Path(alembic_ini).resolve().parent
    own = folder / POLICY_FILE
    if own.is_file():
        return own, False
    pyproject = folder / "pyproject.toml"
    tool = _read(pyproject).get("tool") if pyproject.is_file() else None
    if isinstance(tool, dict) and "opslib" in tool:
        return pyproject, True
    return own, False


NO_POLICY = Policy()  # a project without opslib.toml: every rule and check at its default


def load_policy(alembic_ini: Path, is_lint_rule: Callable[[str], bool] | None = None) -> Policy:
    """The policy of the project whose Alembic config is ``alembic_ini``.

    Every name is checked: a check's against :data:`CHECKS`, a rule's against :data:`LINT_RULES`, then
    ``is_lint_rule`` (the installed squawk's word) when given. An unknown one is a :class:`ConfigError`.
    """
    path, in_pyproject = policy_file(alembic_ini)
    if not path.is_file():
        return Policy()
    doc = _read(path)
    where = f"{path} [tool.opslib]" if in_pyproject else str(path)
    section = doc.get("tool", {}).get("opslib", {}) if in_pyproject else doc
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(section) - {"checks", "lint", "fleet", "backup", "approvals"}
    if unknown:  # a misspelt [chekcs] would otherwise be silently without effect
        raise ConfigError(
            f"{where}: unknown table(s) {', '.join(sorted(unknown))}; expected checks, lint, fleet, backup, approvals"
        )
    checks = _checks_section(section.get("checks", {}), where)
    backup = _backup_section(section.get("backup", {}), where)
    approvals = _approvals_section(section.get("approvals", {}), where, path.parent)
    rules, accepted = _lint_section(section.get("lint", {}), where, is_lint_rule)
    return Policy(
        source=path,
        rules={str(k): str(v) for k, v in rules.items()},
        accepted=tuple(accepted),
        checks=checks,
        backup=backup,
        approvals=approvals,
    )


def _lint_section(lint: object, where: str, is_lint_rule: Callable[[str], bool] | None) -> tuple[dict, list[Acceptance]]:
    """The ``[lint]`` table: squawk's rules set to block, warn or ignore, and the accepted findings."""
    if not isinstance(lint, dict):
        raise ConfigError(f"{where}: [lint] must be a table")
    unknown = set(lint) - {"rules", "accept"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) in [lint]: {', '.join(sorted(unknown))}; expected rules, accept"
        )
    if not isinstance(lint.get("rules", {}), dict):
        raise ConfigError(f'{where}: [lint.rules] must be a table of rule = "block" | "warn" | "ignore"')
    if not isinstance(lint.get("accept", []), list):
        raise ConfigError(f"{where}: lint.accept must be an array of tables ([[lint.accept]])")
    rules = dict(lint.get("rules", {}))
    known = _LintNames(is_lint_rule)
    for rule, action in rules.items():
        if not known(rule):
            raise ConfigError(f"{where}: [lint.rules] names an unknown squawk rule {rule!r}; {_known_rules()}")
        if action not in ACTIONS:
            raise ConfigError(f"{where}: [lint.rules] {rule} = {action!r}; use one of {', '.join(ACTIONS)}")
    accepted = []
    for n, item in enumerate(lint.get("accept", []), 1):
        values = {k: item.get(k) if isinstance(item, dict) else None for k in ("revision", "rule", "reason")}
        missing = [k for k, v in values.items() if not isinstance(v, str) or not v.strip()]
        if missing:
            raise ConfigError(
                f"{where}: [[lint.accept]] entry {n} needs {', '.join(missing)} (non-empty text)"
            )
        rule = values["rule"].strip()
        if rule not in REVISION_CHECKS and not known(rule):
            raise ConfigError(
                f"{where}: [[lint.accept]] entry {n} names an unknown rule {rule!r}; a squawk rule or one of the "
                f"checks about revisions ({', '.join(sorted(REVISION_CHECKS))}); {_known_rules()}"
            )
        accepted.append(Acceptance(values["revision"].strip(), rule, values["reason"].strip()))
    return rules, accepted


def load_backup_policy(alembic_ini: Path) -> BackupPolicy:
    """The ``[backup]`` table of the project's policy alone (the embedded server reads it when it starts,
    without squawk's rule names to check)."""
    section, where, path = _own_section(alembic_ini)
    return _backup_section(section.get("backup", {}), where) if path else BackupPolicy()


def load_approval_policy(alembic_ini: Path) -> ApprovalPolicy:
    """The ``[approvals]`` table of the project's policy alone (read by sealing and `audit verify`, which
    need no squawk), its allowed_signers beside the policy file (or beside ``alembic.ini`` without one)."""
    section, where, path = _own_section(alembic_ini)
    folder = path.parent if path else Path(alembic_ini).resolve().parent
    return _approvals_section(section.get("approvals", {}), where, folder)


def _own_section(alembic_ini: Path) -> tuple[dict, str, Path | None]:
    """The project's opslib table, where it is (for messages), and its file (None: the project has none)."""
    path, in_pyproject = policy_file(alembic_ini)
    if not path.is_file():
        return {}, str(path), None
    doc = _read(path)
    section = doc.get("tool", {}).get("opslib", {}) if in_pyproject else doc
    where = f"{path} [tool.opslib]" if in_pyproject else str(path)
    return (section if isinstance(section, dict) else {}), where, path


def _typed(table: object, name: str, keys: dict[str, str], where: str) -> dict:
    """A policy table's values, each key checked against ``keys`` (field name -> type name)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    unknown = set(table) - set(keys)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) in [{name}]: {', '.join(sorted(unknown))}; expected {', '.join(keys)}"
        )
    values = {}
    for key, value in table.items():
        kind = {"str": str, "float": float, "int": int, "bool": bool}[keys[key]]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: [{name}] {key} = {value!r}: expected {kind.__name__}")
        values[key] = value
    return values


def _backup_section(table: object, where: str) -> BackupPolicy:
    """The ``[backup]`` table, each key checked against :class:`BackupPolicy`'s fields and types."""
    made = BackupPolicy(**_typed(table, "backup", _BACKUP_KEYS, where))
    if made.method not in BACKUP_METHODS:
        raise ConfigError(f"{where}: [backup] method = {made.method!r}; use one of {', '.join(BACKUP_METHODS)}")
    if made.fallback not in BACKUP_FALLBACKS:
        raise ConfigError(f"{where}: [backup] fallback = {made.fallback!r}; use one of {', '.join(BACKUP_FALLBACKS)}")
    for key, low in (("retention_full", 1), ("full_max_age_h", 0), ("incremental_max_age_h", 0)):
        if getattr(made, key) < low:
            raise ConfigError(f"{where}: [backup] {key} = {getattr(made, key)!r}: it must be {low} or more")
    if made.archive_timeout_s <= 0:
        raise ConfigError(f"{where}: [backup] archive_timeout_s = {made.archive_timeout_s!r}: it must be more than 0")
    return made


def _approvals_section(table: object, where: str, folder: Path) -> ApprovalPolicy:
    """The ``[approvals]`` table, each key checked against :class:`ApprovalPolicy`'s fields and types."""
    made = ApprovalPolicy(**_typed(table, "approvals", _APPROVAL_KEYS, where), folder=folder)
    for env in ENVIRONMENTS:
        if not 0 <= made.needed(env) <= 10:
            raise ConfigError(f"{where}: [approvals] {env} = {made.needed(env)!r}: it must be from 0 to 10")
    if not made.allowed_signers.strip():
        raise ConfigError(f"{where}: [approvals] allowed_signers is empty: name the allowed_signers file")
    return made


def _checks_section(table: object, where: str) -> dict[str, str]:
    """The ``[checks]`` table: each known check set to block, warn or ignore (a fixed check only to block)."""
    if not isinstance(table, dict):
        raise ConfigError(f'{where}: [checks] must be a table of check = "block" | "warn" | "ignore"')
    for name, action in table.items():
        if name not in CHECKS:
            raise ConfigError(f"{where}: [checks] names an unknown check {name!r}; the checks are {', '.join(CHECKS)}")
        if action not in ACTIONS:
            raise ConfigError(f"{where}: [checks] {name} = {action!r}; use one of {', '.join(ACTIONS)}")
        if name in FIXED_CHECKS and action != "block":
            raise ConfigError(
                f"{where}: [checks] {name} = {action!r}: a deploy cannot go on without this check, so it always "
                f"blocks; the checks a policy can relax are {', '.join(c for c in CHECKS if c not in FIXED_CHECKS)}"
            )
    return {str(k): str(v) for k, v in table.items()}


class _LintNames:
    """Whether a name is one of squawk's rules: opslib's list, else the installed squawk's word (asked once)."""

    def __init__(self, is_lint_rule: Callable[[str], bool] | None):
        self.ask = is_lint_rule
        self.answers: dict[str, bool] = {}

    def __call__(self, name: str) -> bool:
        if name in LINT_RULES:
            return True
        if self.ask is None:
            return False
        if name not in self.answers:
            self.answers[name] = bool(self.ask(name))
        return self.answers[name]


def _known_rules() -> str:
    return f"squawk's rules are {', '.join(LINT_RULES)}; the checks are {', '.join(CHECKS)}"


def _read(path: Path) -> dict:
    try:
        return tomlkit.parse(path.read_text()).unwrap()
    except (OSError, TOMLKitError, ValueError) as err:
        raise ConfigError(f"{path} is not valid TOML: {str(err).splitlines()[0]}") from None


def write_baseline(
    alembic_ini: Path, findings: Iterable[tuple[str, str]], reason: str, warn_checks: Iterable[str] = ()
) -> tuple[Path, int]:
    """Accept each (revision, rule) in the project's policy with ``reason``, and set each check of
    ``warn_checks`` (failing checks that are not about revisions) to ``warn``; returns (file, how many added).

    The file keeps its comments and layout (tomlkit); pairs already accepted are left as they are.
    """
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidInput('--write-baseline needs a reason: --reason "accepted when adopting opslib"')
    path, in_pyproject = policy_file(alembic_ini)
    current = load_policy(alembic_ini)
    doc = tomlkit.parse(path.read_text()) if path.is_file() else tomlkit.document()
    root = doc
    added = 0
    if in_pyproject:
        root = doc["tool"]["opslib"]
    elif not path.is_file():
        doc.add(
            tomlkit.comment("opslib project policy: lint rules and accepted findings (see opslib's README)")
        )
    for check in dict.fromkeys(warn_checks):
        if check in FIXED_CHECKS or current.check_action(check) in ("warn", "ignore"):
            continue
        if "checks" not in root:
            root["checks"] = tomlkit.table()
        root["checks"][check] = "warn"
        root["checks"][check].comment(reason.strip())
        added += 1
    if "lint" not in root:
        root["lint"] = tomlkit.table()
    lint = root["lint"]
    if "accept" not in lint:
        lint["accept"] = tomlkit.aot()
    for revision, rule in dict.fromkeys(findings):
        if current.acceptance(revision, rule) is not None:
            continue
        entry = tomlkit.table()
        entry.update({"revision": revision, "rule": rule, "reason": reason.strip()})
        lint["accept"].append(entry)
        added += 1
    if added:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(tomlkit.dumps(doc))
        tmp.replace(path)
    return path, added
