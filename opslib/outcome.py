"""How a run or command ends (the design's outcomes contract), and the one mapping to exit codes.

This module imports nothing of opslib's: errors, records, the runbooks, the runner and the CLI all
read outcomes and exit codes from here.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from enum import Enum


class Outcome(str, Enum):
    """The outcome of a run (and of its steps). The str values are what records hold."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INVALID = "invalid"
    REFUSED = "refused"
    LOCKED = "locked"
    INTERRUPTED = "interrupted"
    ABANDONED = "abandoned"
    # Not endings: a run or step under way, a step with nothing to do, an attempt that gave up on a lock.
    RUNNING = "running"
    SKIPPED = "skipped"
    LOCK_TIMEOUT = "lock timeout"

    def __str__(self) -> str:
        return self.value

    @property
    def exit_code(self) -> int | None:
        """The contract's exit code; None for an abandoned run (no process was left to exit)."""
        return _EXIT_CODES.get(self)

    @property
    def sealed(self) -> bool:
        """True for the outcomes a record is sealed with (not running, skipped or a lock timeout)."""
        return self in _EXIT_CODES or self is Outcome.ABANDONED


# The endings after which nothing was changed (bad input, a guard said no, a lock was held), as records hold them.
CHANGED_NOTHING = frozenset({"invalid", "refused", "locked"})


_EXIT_CODES = {
    Outcome.SUCCEEDED: 0,
    Outcome.FAILED: 1,
    Outcome.INVALID: 2,
    Outcome.REFUSED: 3,
    Outcome.LOCKED: 4,
    Outcome.INTERRUPTED: 128 + signal.SIGINT,
}


def process_exit_code(outcome: "Outcome | str", recorded: int | None) -> int:
    """The exit code of a command that reports a run: the one its record holds, else 0 for success and
    1 for a run with none (abandoned, or still running when the command ends)."""
    if recorded is None:
        return 0 if outcome is Outcome.SUCCEEDED else 1
    return int(recorded)


def outcome_of_exit(code: int) -> Outcome:
    """The outcome an exit code of `opslib` stands for (a process that left no record says no more):
    130 and 143 are ``interrupted``, an unknown code is ``failed``."""
    if code in (signal_exit_code(signal.SIGINT), signal_exit_code(signal.SIGTERM)):
        return Outcome.INTERRUPTED
    return next((o for o, c in _EXIT_CODES.items() if c == code), Outcome.FAILED)


def outcome_without_result(code: int) -> Outcome:
    """The outcome of an `opslib run --json` that printed no result (refused before any run began): what its
    exit code says, and ``failed`` for 0 (a run that succeeded prints its result)."""
    return Outcome.FAILED if code == Outcome.SUCCEEDED.exit_code else outcome_of_exit(code)


def signal_exit_code(signum: int) -> int:
    """The shell's exit code for a process stopped by ``signum``: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


def outcome_of(err: BaseException | None) -> tuple[Outcome, int]:
    """The outcome and exit code of an ending: None is success, a signal is ``interrupted`` (130 or
    143), an opslib error says its own outcome, anything else is ``failed``."""
    if err is None:
        return Outcome.SUCCEEDED, 0
    if isinstance(err, KeyboardInterrupt):
        return Outcome.INTERRUPTED, signal_exit_code(getattr(err, "signum", signal.SIGINT))
    outcome = getattr(type(err), "outcome", None)
    if isinstance(outcome, Outcome) and outcome.exit_code is not None:
        return outcome, outcome.exit_code
    return Outcome.FAILED, 1


@dataclass(frozen=True)
class RunReply:
    """What an `opslib run --json` process said, read the one way both fleet executors read it (opslib's own
    and Airflow's): its result (None when it printed none: refused before any run began), its last line on
    stderr (the run's one-line outcome), and its exit code."""

    result: dict | None
    line: str
    exit_code: int

    @property
    def outcome(self) -> str:
        """The run's outcome, or what the exit code says of a process that printed no result."""
        return str(self.result["outcome"]) if self.result else str(outcome_without_result(self.exit_code))


def run_reply(stdout: str, stderr: str, exit_code: int) -> RunReply:
    """Read what an `opslib run --json` printed: its result is the last line of stdout, a JSON object naming
    the run, its outcome and its record."""
    lines = stdout.strip().splitlines()
    try:
        found = json.loads(lines[-1]) if lines else None
    except ValueError:
        found = None
    if not (isinstance(found, dict) and {"run_id", "outcome", "record"} <= found.keys()):
        found = None
    said = [line for line in stderr.splitlines() if line.strip()]
    return RunReply(found, said[-1] if said else f"exit {exit_code}", exit_code)
