"""The operated project's own lint policy: which squawk rules block, warn or are ignored, and which
findings were accepted, by revision id, with a reason.

It lives in the project, beside its ``alembic.ini``: ``opslib.toml``, or ``[tool.opslib]`` in the
project's ``pyproject.toml`` (``opslib.toml`` wins when both exist). Accepting a finding here means
nobody edits the history of a project they operate::

    [lint.rules]
    prefer-robust-stmts = "ignore"          # block | warn | ignore
    changing-column-type = "warn"

    [[lint.accept]]
    revision = "1f0c2b9e4d7a"
    rule = "adding-not-nullable-field"
    reason = "orders.region has a server default; the table is rewritten off-peak"

A malformed file is an :class:`~opslib.errors.ConfigError` (exit 2) naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import tomlkit
from tomlkit.exceptions import TOMLKitError

from opslib.errors import ConfigError, InvalidInput

ACTIONS = ("block", "warn", "ignore")
POLICY_FILE = "opslib.toml"


@dataclass(frozen=True)
class Acceptance:
    """One accepted finding: this rule's findings in this revision do not block, for this reason."""

    revision: str
    rule: str
    reason: str


@dataclass(frozen=True)
class Policy:
    """The project's lint rules and accepted findings; empty when the project has no policy."""

    source: Path | None = None
    rules: dict[str, str] = field(default_factory=dict)
    accepted: tuple[Acceptance, ...] = ()

    def action(self, rule: str, default: str) -> str:
        """``block``, ``warn`` or ``ignore`` for ``rule``: the project's word, else ``default``."""
        return self.rules.get(rule, default)

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


def load_policy(alembic_ini: Path) -> Policy:
    """The policy of the project whose Alembic config is ``alembic_ini``."""
    path, in_pyproject = policy_file(alembic_ini)
    if not path.is_file():
        return Policy()
    doc = _read(path)
    where = f"{path} [tool.opslib]" if in_pyproject else str(path)
    section = doc.get("tool", {}).get("opslib", {}) if in_pyproject else doc
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a table")
    lint = section.get("lint", {})
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
    for rule, action in rules.items():
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
        accepted.append(
            Acceptance(values["revision"].strip(), values["rule"].strip(), values["reason"].strip())
        )
    return Policy(source=path, rules={str(k): str(v) for k, v in rules.items()}, accepted=tuple(accepted))


def _read(path: Path) -> dict:
    try:
        return tomlkit.parse(path.read_text()).unwrap()
    except (OSError, TOMLKitError, ValueError) as err:
        raise ConfigError(f"{path} is not valid TOML: {str(err).splitlines()[0]}") from None


def write_baseline(alembic_ini: Path, findings: Iterable[tuple[str, str]], reason: str) -> tuple[Path, int]:
    """Accept each (revision, rule) in the project's policy with ``reason``; returns (file, how many added).

    The file keeps its comments and layout (tomlkit); pairs already accepted are left as they are.
    """
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidInput('--write-baseline needs a reason: --reason "accepted when adopting opslib"')
    path, in_pyproject = policy_file(alembic_ini)
    current = load_policy(alembic_ini)
    doc = tomlkit.parse(path.read_text()) if path.is_file() else tomlkit.document()
    root = doc
    if in_pyproject:
        root = doc["tool"]["opslib"]
    elif not path.is_file():
        doc.add(
            tomlkit.comment("opslib project policy: lint rules and accepted findings (see opslib's README)")
        )
    if "lint" not in root:
        root["lint"] = tomlkit.table()
    lint = root["lint"]
    if "accept" not in lint:
        lint["accept"] = tomlkit.aot()
    added = 0
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
