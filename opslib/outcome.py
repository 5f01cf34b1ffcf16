"""How a run or command ends (the design's outcomes contract), and the one mapping to exit codes.

This module imports nothing of opslib's: errors, records, the runbooks, the runner and the CLI all
read outcomes and exit codes from here.
"""

from __future__ import annotations

import signal
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
