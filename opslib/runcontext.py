"""What a run's driver (`opslib run`, `opslib open`) and the kernel that executes its notebook share, as one
typed value with one serialization: :class:`RunContext`.

The driver names the run, writes its first record and starts the kernel; the kernel continues that run, not a
new one. The driver hands the context over in one environment variable (``OPSLIB_RUN_CONTEXT``, JSON), the
one way into a kernel that papermill and JupyterLab both keep: a notebook's parameters are the operator's. A
notebook run without a driver (plain papermill, a template opened in JupyterLab) has no context and is a
run of its own (``mode`` "direct").
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping

from opslib.errors import ConfigError

ENV = "OPSLIB_RUN_CONTEXT"


@dataclass(frozen=True)
class RunContext:
    """One run as its driver named it: its id and record's file stem, how it is driven (``headless`` or
    ``interactive``), the driver's pid (the run's too: it seals the run), the sha256 of the runbook
    template it runs, and when it started (the record's ``started_at``, one clock for both processes)."""

    run_id: str
    stem: str
    mode: str
    runner_pid: int
    runbook_sha256: str | None
    started_at: str

    @property
    def started(self) -> datetime:
        """``started_at`` as a UTC time."""
        return datetime.fromisoformat(self.started_at.replace("Z", "+00:00")).astimezone(timezone.utc)

    def environment(self) -> dict[str, str]:
        """The context as the kernel's environment carries it."""
        return {ENV: json.dumps(dataclasses.asdict(self), sort_keys=True)}

    @classmethod
    def given(cls, environ: Mapping[str, str] | None = None) -> "RunContext | None":
        """The context this process was started with, or None (a notebook run without `opslib run` or
        `opslib open`); one that is not a context opslib wrote is a :class:`ConfigError`."""
        raw = (os.environ if environ is None else environ).get(ENV)
        if not raw:
            return None
        try:
            data = json.loads(raw)
            made = cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
            texts = (made.run_id, made.stem, made.mode, made.started_at)
            if not all(isinstance(t, str) for t in texts) or not isinstance(made.runner_pid, int):
                raise TypeError("a field of the wrong type")
            made.started  # noqa: B018 -- a start time that does not parse is refused here, not later
            return made
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{ENV} does not hold a run context opslib wrote ({err}): start runs with opslib run or opslib open") from None
