"""The fleet's halt rule, in one place for both executors: opslib's own (:mod:`opslib.fleet`) and Airflow's
(:mod:`opslib.airflow`, which imports nothing else of opslib but :mod:`opslib.outcome`: Airflow's environment
has only this package's files, not its dependencies, and neither module needs any)."""

from __future__ import annotations

from typing import NamedTuple, Sequence


class Failure(NamedTuple):
    """A target whose run did not succeed: its name, its run's outcome, and its wave (0 is the canary's)."""

    target: str
    outcome: str
    wave: int


def halt_reason(failures: Sequence[Failure], halt_after: int | None, canary: bool) -> str | None:
    """Why no further target may start, or None: with a halt rule (``halt_after``), a failed canary halts
    the fleet at once, and otherwise ``halt_after`` failures do. Without one, nothing halts it."""
    if halt_after is None:
        return None
    if canary:
        first = next((f for f in failures if f.wave == 0), None)
        if first is not None:
            return f"the canary {first.target} ended {first.outcome}"
    if len(failures) >= halt_after:
        return f"{len(failures)} target(s) failed (halt after {halt_after})"
    return None
