"""Results of checks, as data: each a :class:`CheckResult`, gathered in a :class:`CheckReport`.

A report is data for the CLI and notebooks to render; ``raise_for_failure`` turns a failed report
into :class:`~opslib.errors.ChecksFailed` (exit 3) for callers that must stop. Checks of backups
and of deploys both report this way, so this module sits low, beside the errors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from opslib.errors import ChecksFailed

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"


@dataclass(frozen=True)
class CheckResult:
    """One check: its name, ``pass``/``warn``/``fail``/``skip``, and what was seen."""

    name: str
    status: str
    detail: str = ""
    # The revisions a check's findings are about (the pre-deploy checks of revisions), which the project's
    # policy can accept one by one; see opslib.policy.
    revisions: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {**asdict(self), "revisions": list(self.revisions)}


@dataclass
class CheckReport:
    """The results of a series of checks about one subject."""

    subject: str
    checks: list[CheckResult] = field(default_factory=list)
    findings: list = field(default_factory=list)
    # The deploy plan a pre-deploy check judged, for the deploy that follows it (not worked out twice).
    plan: object | None = None

    @property
    def ok(self) -> bool:
        """True when no check failed (warnings are advice)."""
        return all(c.status != FAIL for c in self.checks)

    def first_failure(self) -> CheckResult | None:
        """The first failed check, if any."""
        return next((c for c in self.checks if c.status == FAIL), None)

    def add(self, name: str, status: str, detail: str = "") -> CheckResult:
        """Append a result and return it."""
        result = CheckResult(name, status, detail)
        self.checks.append(result)
        return result

    def raise_for_failure(self) -> None:
        """Raise :class:`ChecksFailed` naming the first failed check, if any failed."""
        failed = self.first_failure()
        if failed is not None:
            raise ChecksFailed(f"{self.subject}: {failed.name} failed: {failed.detail}")

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {
            "subject": self.subject,
            "ok": self.ok,
            "checks": [c.to_dict() for c in self.checks],
            "findings": [f.to_dict() for f in self.findings],
        }
