"""The run context a driver (`opslib run`, `opslib open`) hands its kernel: one value, one serialization."""

from __future__ import annotations

import json

import pytest

from opslib.errors import ConfigError
from opslib.runcontext import ENV, RunContext


def test_a_context_reads_back_as_it_was_written():
    made = RunContext("abc123", "20261207T000000Z_deploy_abc123", "headless", 4242, "f" * 64, "2026-12-07T00:00:00.123Z")
    assert RunContext.given(made.environment()) == made
    assert made.started.isoformat() == "2026-12-07T00:00:00.123000+00:00"
    assert RunContext.given({}) is None  # a notebook run without a driver is a run of its own


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        json.dumps({"run_id": "a"}),  # fields missing
        json.dumps({"run_id": 1, "stem": "s", "mode": "headless", "runner_pid": 1, "runbook_sha256": None,
                    "started_at": "2026-12-07T00:00:00Z"}),  # a number where text goes
        json.dumps({"run_id": "a", "stem": "s", "mode": "headless", "runner_pid": "1", "runbook_sha256": None,
                    "started_at": "2026-12-07T00:00:00Z"}),  # text where the pid goes
        json.dumps({"run_id": "a", "stem": "s", "mode": "headless", "runner_pid": 1, "runbook_sha256": None,
                    "started_at": "yesterday"}),  # a time that does not parse
    ],
)
def test_a_context_opslib_did_not_write_is_refused_as_configuration(raw):
    with pytest.raises(ConfigError, match=f"{ENV} does not hold a run context opslib wrote"):
        RunContext.given({ENV: raw})
