"""Fleets: one runbook across many databases, a canary first, then waves, with a halt rule.

A fleet file in the operated project (``fleet.toml`` beside its ``alembic.ini``, or ``[tool.opslib.fleet]`` in its
``pyproject.toml``) lists the targets::

    [[targets]]
    name = "eu-1"
    url_env = "EU1_DATABASE_URL"   # the variable holding its URL: never the URL itself
    env = "production"
    tags = { region = "eu", tier = "gold" }

Each target gets its own ordinary run (``opslib run RUNBOOK -p database_url_env VAR --env ENV``), with its own
lock, record and ledger entry. The local executor runs the canary targets first, then the rest in waves, at most
``parallel`` at once, and stops starting targets after ``halt_after`` failures (and after a failed canary);
with no halt rule every target runs. The fleet's own record (``records/fleets/<stem>.json``) links the runs and says which targets were not
started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence, TextIO

import tomlkit
from tomlkit.exceptions import TOMLKitError

from opslib import audit, db, migrate
from opslib.config import Settings
from opslib.errors import ConfigError, InvalidInput, OpsError, PreconditionFailed
from opslib.halt import Failure, halt_reason
from opslib.outcome import Outcome, run_reply
from opslib.params import ENV_NAME, holds_secret
from opslib.record import revisions_text
from opslib.redact import clean_json

FLEET_FILE = "fleet.toml"
_ENV_LABELS = ("development", "staging", "production")
_TARGET_KEYS = {"name", "url_env", "env", "tags"}


@dataclass(frozen=True)
class Target:
    """One database of the fleet: its name, the variable holding its URL, its environment label, its tags."""

    name: str
    url_env: str
    env: str
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Fleet:
    """A fleet file's targets, in the file's order."""

    path: Path
    targets: tuple[Target, ...]

    def only(self, selections: Sequence[str]) -> "Fleet":
        """The targets whose tags match every ``key=value`` (an unknown tag key is :class:`InvalidInput`)."""
        chosen = list(self.targets)
        known = {k for t in self.targets for k in t.tags}
        for selection in selections:
            key, sep, value = selection.partition("=")
            if not sep or not key.strip():
                raise InvalidInput(f"--only takes TAG=VALUE (e.g. region=eu), not {selection!r}")
            if key.strip() not in known:
                raise InvalidInput(
                    f"--only {selection}: no target has the tag {key.strip()!r}; the tags are {', '.join(sorted(known)) or 'none'}"
                )
            chosen = [t for t in chosen if t.tags.get(key.strip()) == value.strip()]
        if not chosen:
            raise InvalidInput(f"--only {' '.join(selections)} selects no target of {self.path.name}")
        return replace(self, targets=tuple(chosen))


def fleet_file(alembic_ini: Path) -> Path:
    """Where the project's fleet file is: ``fleet.toml`` beside its alembic.ini, else its pyproject.toml."""
    folder = Path(alembic_ini).resolve().parent
    own = folder / FLEET_FILE
    return own if own.exists() or not (folder / "pyproject.toml").exists() else folder / "pyproject.toml"


def load_fleet(path: Path, environ: dict | None = None, urls_required: bool = True) -> Fleet:
    """Read and check a fleet file: a password anywhere, a URL instead of a variable's name, a duplicate name,
    an unset variable (unless not ``urls_required``), an unknown key or environment label is
    :class:`ConfigError` (exit 2), before anything runs."""
    environ = os.environ if environ is None else environ
    path = Path(path)
    try:
        data = tomlkit.parse(path.read_text(encoding="utf-8")).unwrap()
    except OSError as err:
        raise ConfigError(f"cannot read the fleet file {path}: {err.strerror or err}") from None
    except TOMLKitError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    if path.name == "pyproject.toml":
        data = data.get("tool", {}).get("opslib", {}).get("fleet", {})
    if holds_secret(data):
        raise ConfigError(f"{path} holds a password: name the environment variable that holds each URL (url_env)")
    raw = data.get("targets")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path} lists no targets: add [[targets]] tables with name and url_env")
    targets, seen = [], set()
    for i, entry in enumerate(raw, 1):
        where = f"{path.name}, target {i}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} is not a table")
        unknown = sorted(set(entry) - _TARGET_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key {', '.join(unknown)} (the keys are {', '.join(sorted(_TARGET_KEYS))})")
        name, url_env = str(entry.get("name", "")).strip(), str(entry.get("url_env", "")).strip()
        if not name or not url_env:
            raise ConfigError(f"{where} needs a name and a url_env")
        if name in seen:
            raise ConfigError(f"{path.name}: the name {name!r} is given to two targets")
        seen.add(name)
        if "://" in url_env or not ENV_NAME.match(url_env):
            raise ConfigError(f"{where} ({name}): url_env names an environment variable, not {'a URL' if '://' in url_env else repr(url_env)}")
        if not environ.get(url_env) and urls_required:
            raise ConfigError(f"{where} ({name}): the environment variable {url_env} is not set")
        if environ.get(url_env):
            db.parse_url(environ[url_env], source=url_env)
        env = str(entry.get("env", "development"))
        if env not in _ENV_LABELS:
            raise ConfigError(f"{where} ({name}): env must be one of {', '.join(_ENV_LABELS)}, not {env!r}")
        tags = entry.get("tags", {})
        if not isinstance(tags, dict):
            raise ConfigError(f"{where} ({name}): tags is a table, e.g. tags = {{ region = \"eu\" }}")
        targets.append(Target(name, url_env, env, {str(k): str(v) for k, v in tags.items()}))
    return Fleet(path, tuple(targets))


def database_urls(path: Path, environ: dict | None = None) -> list[tuple[str, str]]:
    """(URL, where it came from) of each target of the fleet file at ``path`` whose variable is set here, for
    `opslib audit verify` to cross-check the ledger with; a target whose variable is unset is left out."""
    environ = os.environ if environ is None else environ
    return [
        (environ[t.url_env], f"{t.url_env}, fleet target {t.name}")
        for t in load_fleet(path, environ, urls_required=False).targets
        if environ.get(t.url_env)
    ]


# --- the plan --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The order of a fleet run: the canary wave, then waves of ``wave`` targets, ``parallel`` at once."""

    waves: tuple[tuple[Target, ...], ...]
    parallel: int
    halt_after: int | None  # failures after which no target is started; None: never halt

    @property
    def targets(self) -> list[Target]:
        """Every target, in the order they start."""
        return [t for w in self.waves for t in w]


def plan(fleet: Fleet, *, canary: int = 1, wave: int = 5, parallel: int = 2, halt_after: int | None = 1) -> Plan:
    """Split the fleet into the canary wave and waves of ``wave`` targets (bad sizes are :class:`InvalidInput`)."""
    if canary < 0 or wave < 1 or parallel < 1 or (halt_after is not None and halt_after < 1):
        raise InvalidInput("fleet: --canary must be 0 or more, --wave, --parallel and --halt-after 1 or more")
    targets = list(fleet.targets)
    waves = [tuple(targets[:canary])] if canary else []
    rest = targets[canary:]
    waves += [tuple(rest[i : i + wave]) for i in range(0, len(rest), wave)]
    return Plan(tuple(w for w in waves if w), parallel, halt_after)


def plan_dict(the_plan: Plan, runbook: str, pairs: Sequence[tuple[str, str]], *, canary: int) -> dict:
    """The whole plan as JSON-ready data (what ``opslib fleet --plan-json`` prints for :mod:`opslib.airflow`,
    which only executes it): the waves, each target with the ``opslib`` arguments of its run, and the halt
    rule (see :mod:`opslib.halt`). Production targets must have been confirmed (:func:`require_production_confirmed`):
    their commands carry their own database's name as ``confirm``."""
    return {
        "runbook": runbook,
        "canary": canary,
        "parallel": the_plan.parallel,
        "halt_after": the_plan.halt_after,
        "waves": [[{**asdict(t), "command": target_command(runbook, t, pairs)} for t in wave] for wave in the_plan.waves],
    }


def target_command(runbook: str, target: Target, pairs: Sequence[tuple[str, str]]) -> list[str]:
    """The arguments of ``opslib`` that run ``runbook`` on one target, printing its result as JSON. A production
    target, confirmed for the whole fleet, is given its own database's name as ``confirm`` (unless the
    parameters hold one)."""
    args = ["run", runbook, "--json", "--env", target.env, "-p", "database_url_env", target.url_env]
    if target.env == "production" and "confirm" not in dict(pairs):
        args += ["-p", "confirm", db.parse_url(os.environ[target.url_env], source=target.url_env).database or ""]
    for name, value in pairs:
        args += ["-p", name, value]
    return args


@dataclass(frozen=True)
class Standing:
    """Where a target stands now, read for a dry run."""

    target: str
    current: str
    pending: str
    error: str | None = None


def standings(settings: Settings, targets: Sequence[Target], revision: str = "head", workers: int = 8) -> list[Standing]:
    """Each target's current and pending revisions, read concurrently (a target out of reach says why)."""
    migrate.version_table(settings)  # learned once, before the threads: they only read their databases

    def read(target: Target) -> Standing:
        on = replace(settings, database_url=os.environ[target.url_env], url_source=target.url_env, env=target.env)
        try:
            current, steps = migrate.plan(on, "upgrade", revision)
        except OpsError as err:
            return Standing(target.name, "not read", "", err.message)
        return Standing(target.name, revisions_text(current), " ".join(s.revision for s in steps) or "none")

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(targets)))) as pool:
        return list(pool.map(read, targets))


# --- the run ---------------------------------------------------------------------------------------------


@dataclass
class TargetRun:
    """One target's part in a fleet run."""

    target: str
    wave: int
    state: str = "not started"  # not started, running, succeeded, failed (or the run's own outcome)
    exit_code: int | None = None
    run_id: str | None = None
    record: str | None = None  # the run's sidecar, relative to the records folder
    revisions_before: list[str] | None = None
    revisions_after: list[str] | None = None
    duration_s: float | None = None
    backup: str | None = None
    line: str = ""  # the run's one-line outcome


@dataclass
class FleetRecord:
    """The record of a fleet run: its plan and parameters, and each target's run, linked by run id."""

    fleet_id: str
    runbook: str
    fleet_file: str
    operator: str
    started_at: str
    parameters: list[list[str]]
    canary: int
    wave: int
    parallel: int
    halt_after: int | None
    targets: list[TargetRun]
    halted: str | None = None
    finished_at: str | None = None
    outcome: str = "running"
    exit_code: int | None = None

    def to_dict(self) -> dict:
        """The JSON object kept in ``records/fleets/``."""
        return asdict(self)


def fleet_records_dir(records_dir: Path) -> Path:
    """Where fleet records go: a folder of their own, apart from the runs' sidecars and ledger."""
    return Path(records_dir) / "fleets"


def require_production_confirmed(targets: Sequence[Target], confirmed: int | None) -> None:
    """A fleet with production targets runs only when the operator confirmed how many there are
    (``--confirm-production N``): each of their runs is then given its own database's name as ``confirm``.
    Otherwise :class:`PreconditionFailed` (exit 3), before anything runs."""
    production = [t.name for t in targets if t.env == "production"]
    if production and confirmed != len(production):
        given = "nothing" if confirmed is None else str(confirmed)
        raise PreconditionFailed(
            f"this fleet has {len(production)} production target(s) ({', '.join(production[:5])}"
            f"{', …' if len(production) > 5 else ''}): confirm them with --confirm-production {len(production)} "
            f"(got {given}); nothing was run"
        )


def _run_target(settings: Settings, runbook: str, target: Target, pairs: Sequence[tuple[str, str]], into: TargetRun) -> None:
    """``opslib run RUNBOOK --json`` for one target, as a process of its own; fills ``into`` from its result."""
    args = [sys.executable, "-m", "opslib.cli", *target_command(runbook, target, pairs)]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OPSLIB_ENV": target.env})
    into.duration_s = round(time.perf_counter() - started, 3)
    into.exit_code = done.returncode
    reply = run_reply(done.stdout, done.stderr, done.returncode)
    into.line, into.state = reply.line, reply.outcome
    result = reply.result
    if result is None:  # refused before any run began (bad arguments): no record, the exit code says why
        return
    sidecar = Path(result["record"])
    into.record = sidecar.name
    into.run_id = result["run_id"]
    into.revisions_before = result["revisions_before"]
    into.revisions_after = result["revisions_after"]
    record = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    into.backup = Path(record["backup"]["path"]).name if record.get("backup") else None


def run_fleet(
    settings: Settings,
    runbook: str,
    fleet: Fleet,
    the_plan: Plan,
    pairs: Sequence[tuple[str, str]] = (),
    *,
    canary: int = 1,
    wave: int = 5,
    progress: TextIO | None = None,
    on_change: Callable[[FleetRecord], None] | None = None,
) -> tuple[FleetRecord, Path]:
    """Run ``runbook`` on every target of ``the_plan``: each wave after the one before, ``parallel`` at once;
    after ``halt_after`` failures (or any failure of the canary) no further target starts. Returns the fleet's
    record and where it was written."""
    records = audit.ensure_records_dir(settings.records_dir)
    started = audit.now()
    fleet_id = audit.new_run_id()
    record = FleetRecord(
        fleet_id=fleet_id, runbook=runbook, fleet_file=str(fleet.path), operator=settings.operator,
        started_at=audit.iso(started), parameters=[list(p) for p in pairs], canary=canary, wave=wave,
        parallel=the_plan.parallel, halt_after=the_plan.halt_after,
        targets=[TargetRun(t.name, i) for i, w in enumerate(the_plan.waves) for t in w],
    )  # fmt: skip
    path = _fleet_record_path(records, fleet_id, started)
    run = _FleetRun(settings, runbook, the_plan, pairs, canary, record, path, progress, on_change)
    with run.lock:
        run.save()
    run.run_waves()
    run.finish()
    return record, path


def _fleet_record_path(records: Path, fleet_id: str, started: datetime) -> Path:
    """Where a fleet run's record is written, in the fleets folder (made when missing)."""
    folder = fleet_records_dir(records)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{audit.record_stem('fleet', fleet_id, started)}.json"


class _FleetRun:
    """A fleet run under way: its record, where it is written, and the lock each target's thread holds while
    it changes the record and writes it."""

    def __init__(
        self,
        settings: Settings,
        runbook: str,
        the_plan: Plan,
        pairs: Sequence[tuple[str, str]],
        canary: int,
        record: FleetRecord,
        path: Path,
        progress: TextIO | None,
        on_change: Callable[[FleetRecord], None] | None,
    ):
        self.settings = settings
        self.runbook = runbook
        self.plan = the_plan
        self.pairs = pairs
        self.canary = canary
        self.record = record
        self.path = path
        self.progress = progress
        self.on_change = on_change
        self.lock = threading.Lock()
        self.by_name = {r.target: r for r in record.targets}

    def save(self) -> None:
        """Write the record, then tell the progress stream and ``on_change``; the caller holds the lock."""
        record = self.record
        self.path.write_text(json.dumps(clean_json(record.to_dict(), frozenset({"line", "halted", "parameters"})), indent=2) + "\n")
        if self.progress is not None:
            self.progress.write(_progress_line(record) + "\n")
            self.progress.flush()
        if self.on_change is not None:
            self.on_change(record)

    def failures(self) -> list[Failure]:
        """The targets whose runs have ended other than in success, for the halt rule."""
        return [Failure(r.target, r.state, r.wave) for r in self.record.targets if r.state not in ("not started", "running", "succeeded")]

    def run_one(self, target: Target) -> None:
        """Run ``target`` unless the fleet has halted; after a failure, decide whether it halts now."""
        record = self.record
        entry = self.by_name[target.name]
        with self.lock:
            if record.halted is not None:
                return
            entry.state = "running"
            self.save()
        _run_target(self.settings, self.runbook, target, self.pairs, entry)
        with self.lock:
            if entry.state != "succeeded" and record.halted is None:
                record.halted = halt_reason(self.failures(), self.plan.halt_after, self.canary > 0)
            self.save()

    def run_waves(self) -> None:
        """Each wave after the one before, ``parallel`` targets at once, until the fleet halts."""
        for targets in self.plan.waves:
            with ThreadPoolExecutor(max_workers=self.plan.parallel) as pool:
                list(pool.map(self.run_one, targets))
            if self.record.halted is not None:
                break

    def finish(self) -> None:
        """Set the fleet's outcome, exit code and end, and write the record a last time."""
        record = self.record
        failed = [r for r in record.targets if r.state not in ("not started", "succeeded")]
        # The fleet's outcome is its first failed run's (a halt stops the targets after it; it is no outcome).
        record.outcome = failed[0].state if failed else str(Outcome.SUCCEEDED)
        # A failed run without an exit code (its process gave none) is failed's.
        record.exit_code = (failed[0].exit_code or Outcome.FAILED.exit_code) if failed else Outcome.SUCCEEDED.exit_code
        record.finished_at = audit.iso(audit.now())
        with self.lock:
            self.save()


def _progress_line(record: FleetRecord) -> str:
    counts = {"succeeded": 0, "running": 0, "not started": 0}
    failed = 0
    for r in record.targets:
        if r.state in counts:
            counts[r.state] += 1
        else:
            failed += 1
    text = (f"fleet {record.runbook}: {counts['succeeded']} done, {counts['running']} running, {failed} failed, "
            f"{counts['not started']} not started")
    return text + (f" — halted: {record.halted}" if record.halted else "")


def not_started(record: FleetRecord) -> list[str]:
    """The targets a halted fleet did not start."""
    return [r.target for r in record.targets if r.state == "not started"]
