"""The one error hierarchy of opslib.

Every failure that reaches a user is an :class:`OpsError`. Each subclass fixes its ``outcome`` of the
design contract (whose exit code :mod:`opslib.outcome` maps), and every instance says whether the
database was touched (``changed``) and, where known, the revision(s) it now stands at.
"""

from __future__ import annotations

from opslib.outcome import Outcome


class OpsError(Exception):
    """Base of all opslib errors: a one-line message a person can act on."""

    outcome = Outcome.FAILED

    def __init__(
        self,
        message: str,
        *,
        changed: bool = False,
        revisions: tuple[str, ...] | None = None,
        output: str = "",
    ):
        super().__init__(message)
        self.message = message
        self.changed = changed
        self.revisions = revisions
        self.output = output  # what the project's migrations printed or logged before the failure

    @property
    def exit_code(self) -> int:
        """The contract's exit code of this error's outcome."""
        return self.outcome.exit_code

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a traceback: an operator sees the message, not opslib's internals.
        return [f"{type(self).__name__}: {self.message}"]


class InvalidInput(OpsError):
    """A parameter, argument or piece of configuration is wrong; nothing was changed (exit 2)."""

    outcome = Outcome.INVALID


class ConfigError(InvalidInput):
    """The configuration (environment variables, alembic.ini) is missing or malformed."""


class DatabaseUnreachable(InvalidInput):
    """The configured database cannot be reached; nothing was changed."""


class TargetMismatch(InvalidInput):
    """The project's env.py connects to another database than opslib's target: refused before any change (exit 2)."""


class UnknownRevision(InvalidInput):
    """A revision given by the user is unknown, ambiguous or not a valid target from here."""


class PreconditionFailed(OpsError):
    """A precondition or check refused the operation before any change (exit 3)."""

    outcome = Outcome.REFUSED


class StepOutOfOrder(PreconditionFailed):
    """A runbook step run before the step it follows: refused, nothing changed (exit 3)."""


class LockHeld(OpsError):
    """Another run holds the opslib lock on this database (exit 4)."""

    outcome = Outcome.LOCKED


class MigrationFailed(OpsError):
    """A migration failed after the database was reached; ``revisions`` says where it now stands (exit 1)."""

    outcome = Outcome.FAILED


class ChecksFailed(PreconditionFailed):
    """One or more checks failed (a backup's verification, the setup check); nothing was changed."""


class VerificationFailed(OpsError):
    """A change completed but its verification found the database not as expected (exit 1)."""

    outcome = Outcome.FAILED


class BackupFailed(OpsError):
    """A backup, restore or clone failed part-way; the message says what was left behind (exit 1)."""

    outcome = Outcome.FAILED


class ReportFailed(OpsError):
    """The audit report or its screenshot could not be made; the records are untouched (exit 1)."""

    outcome = Outcome.FAILED


class BackupNotTaken(PreconditionFailed):
    """A backup could not be taken (disk full, pg_dump failed); the database was not touched (exit 3)."""


class BackupMethodUnavailable(BackupNotTaken):
    """The backup method asked for cannot work on this target (no WAL archiving, a role without the
    privilege, pgBackRest missing); the message names the one setting to change. Nothing was changed (exit 3)."""


class NotRecovered(PreconditionFailed):
    """A recovery to a point in time could not be made in its staging folder (pgBackRest's restore, the replay,
    the recovered server): the database was not touched (exit 3)."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal: SIGINT (Ctrl-C, exit 130) or SIGTERM (a cancelled job, exit 143).

    A KeyboardInterrupt, so that code which already stops cleanly on Ctrl-C stops the same way on SIGTERM.
    """

    outcome = Outcome.INTERRUPTED

    def __init__(self, signum: int = 2, message: str = "", revisions: tuple[str, ...] | None = None):
        super().__init__(message or f"interrupted by signal {signum}")
        self.signum = signum
        self.message = message or ("interrupted (SIGTERM)" if signum == 15 else "interrupted (Ctrl-C)")
        self.revisions = revisions  # where the database stands, when the interrupted code read it
