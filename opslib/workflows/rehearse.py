"""The rehearse runbook: upgrade, downgrade and upgrade again a copy of the target, compared; the copy is dropped."""

from __future__ import annotations

from opslib import audit, lazy, params
from opslib.config import Settings
from opslib.display import Section, show_now
from opslib.errors import (
    ChecksFailed,
    MigrationFailed,
    OpsError,
    PreconditionFailed,
)
from opslib.naming import first_line
from opslib.outcome import Outcome
from opslib.params import Param
from opslib.record import Differences, Rehearsal, RehearsalCopy, RehearsalDifferences, revisions_text
from opslib.steps import step
from opslib.workflows.workflow import Workflow

# Loaded at first use: the registry is read by processes that never run a step (see opslib.lazy).
db = lazy.module("opslib.db")
migrate = lazy.module("opslib.migrate")
rehearse = lazy.module("opslib.rehearse")


class Rehearse(Workflow):
    """The guide's "test migrations on a copy of production data": upgrade, downgrade and upgrade again a
    scratch copy of the target, timed and compared; the target is only read, and the copy is dropped."""

    runbook = "rehearse"
    listed = 5
    about = "upgrade, downgrade and upgrade again a copy of the target, timed and compared; the copy is dropped"
    parameters = (
        params.URL_ENV,
        Param("target_revision", str, "head", "revision the copy is upgraded to, then downgraded from", revision=True),
        Param(
            "from_revision",
            str,
            "",
            "empty: start where the target is; else first downgrade the copy to this revision (to rehearse "
            "revisions the target already has, on its data)",
            revision=True,
        ),
    )
    steps = ("preflight", "make_copy", "upgrade", "downgrade", "upgrade_again", "compare", "drop_copy")
    changes_database = False  # only a copy of the target is changed, and dropped

    copy: RehearsalCopy | None = None
    on_copy: Settings | None = None
    start: tuple[str, ...] = ()
    pending: list = []
    taken_back: migrate.MigrationResult | None = None  # from_revision: the copy's preparatory downgrade

    def _findings(self) -> Rehearsal:
        if self.record.rehearsal is None:
            self.record.rehearsal = Rehearsal()
        return self.record.rehearsal

    @step()
    def preflight(self) -> Section:
        """Identify the target (without its run lock: it is only read) and list the revisions to rehearse."""
        facts = self._identify(lock=False)
        facts.append(("target revision", self.params["target_revision"]))
        back_to = self.params["from_revision"]
        if back_to and back_to != "base" and (back_to,) == tuple(self.record.revisions_before or ()):
            back_to = ""  # the target is there already: the usual rehearsal, from where it stands
        if back_to:
            if back_to != "base":
                migrate.show(self.target, back_to)  # an unknown one is refused here
            facts.append(("from revision", f"{self.params['from_revision']} (the copy is downgraded to it first)"))
            self.pending = [None]  # known once the copy is there
            return Section("Preflight", "the copy is taken back to from_revision, then rehearsed", facts)
        current, steps = migrate.plan(self.target, "upgrade", self.params["target_revision"])
        self._plan(tuple(current), steps)
        if not self.pending:
            return Section("Preflight", "nothing to rehearse: the database is at the target already", facts)
        rows = [{"revision": r.revision, "message": first_line(r.message)} for r in self.pending]
        return Section("Preflight", f"{len(self.pending)} revision(s) to rehearse on a copy", facts, rows)

    def _plan(self, current: tuple[str, ...], steps: list) -> None:
        if len(current) > 1:
            raise PreconditionFailed(
                f"the database is at several heads ({revisions_text(current)}): rehearse from one revision"
            )
        self.start, self.pending = current, list(steps)

    @step("copy")
    def make_copy(self) -> Section:
        """Copy the target into a scratch database: a template clone when idle, else its newest verified backup."""
        if not self.pending:
            return Section.skip("Copy", "nothing to rehearse")
        name = rehearse.scratch_name(self.database, self.record.run_id)
        dropped = self._drop_stale_copies()
        self._findings().copy = RehearsalCopy(name)
        if dropped:
            self._findings().stale_copies_dropped = dropped
        self._save()  # named before it exists: whoever ends this run drops it
        self.copy = rehearse.make_copy(self.settings, name)
        self.on_copy = rehearse.settings_on(self.settings, name)
        self._findings().copy = self.copy
        facts = [("copy", name), ("seconds", self.copy.seconds)]
        if dropped:
            facts.append(("dropped first", ", ".join(dropped) + " (left by rehearsals that were killed)"))
        if self.pending == [None]:  # from_revision: taken back first, the revisions known from there
            taken = self._on_copy(
                f"taking the copy back to {self.params['from_revision']}", migrate.downgrade, self.params["from_revision"]
            )
            self.taken_back = taken
            self._plan(*migrate.plan(self.on_copy, "upgrade", self.params["target_revision"]))
            facts.append(("taken back to", f"{revisions_text(taken.after)} ({len(taken.steps)} revision(s))"))
            if not self.pending:
                raise PreconditionFailed(
                    f"nothing to rehearse from {self.params['from_revision']} to {self.params['target_revision']}"
                )
        self.before = self._snapshot()
        self._save()
        rows = [{"revision": r.revision, "message": first_line(r.message)} for r in self.pending]
        return Section("Copy", f"copied by {self.copy.method}", facts, rows)

    def _drop_stale_copies(self) -> list[str]:
        """Drop the copies left by earlier rehearsals of this database that ended without dropping theirs
        (a kill -9): only those whose run the records show ended; a copy of a run still going is kept."""
        dropped = []
        for run_id, name in rehearse.copies_of(self.settings, self.database).items():
            try:
                ended = audit.find_run(self.settings.records_dir, run_id).get("outcome") != str(Outcome.RUNNING)
            except OpsError:
                continue  # not a run of these records: not ours to judge
            if ended and rehearse.drop_copy(self.settings, name):
                dropped.append(name)
        return dropped

    def _snapshot(self) -> rehearse.Snapshot:
        with db.connect(db.target_url(self.on_copy)) as conn:
            return rehearse.snapshot(conn, migrate.version_table(self.on_copy))

    def _on_copy(self, what: str, verb, *args, **kwargs):
        """A migration of the copy; its failure is the rehearsal's finding, said as one (the target is untouched)."""
        try:
            return verb(self.on_copy, *args, **kwargs)
        except MigrationFailed as err:
            raise ChecksFailed(
                f"{what} failed on the copy: {err.message.split('. ')[0]}; the target is untouched: fix the "
                "revision and rehearse again"
            ) from err

    def _pass(self, title: str, passage: str, action: str, target: str) -> Section:
        recorder = rehearse.PassRecorder(passage)
        verb = migrate.upgrade if action == "upgrade" else migrate.downgrade
        self._on_copy(f"the {passage}", verb, target, on_step=recorder.on_step, on_locks=recorder.on_locks)
        self._findings().revisions += [r.recorded() for r in recorder.revisions]
        self._save()
        rows = [
            {
                "revision": r.revision,
                "seconds": f"{r.seconds:.3f}",
                "locks": "; ".join(str(lock) for lock in r.locks) or "none in its transaction",
                "blocks reads of": ", ".join(r.flagged),
            }
            for r in recorder.revisions
        ]
        flagged = sum(1 for r in recorder.revisions if r.flagged)
        status = f"{len(recorder.revisions)} revision(s) in {sum(r.seconds for r in recorder.revisions):.3f} s"
        if flagged:
            status += f"; {flagged} took ACCESS EXCLUSIVE on a table with rows"
        return Section(title, status, [], rows)

    @step()
    def upgrade(self) -> Section:
        """Upgrade the copy to the target revision, timing each revision and reading its table locks."""
        if not self.pending:
            return Section.skip("Upgrade", "nothing to rehearse")
        try:
            section = self._pass("Upgrade", "upgrade", "upgrade", self.pending[-1].revision)
        except ChecksFailed as err:
            blamed = self._left_by_preparation(err)
            if blamed is None:
                raise
            raise blamed from err
        self.upgraded = self._snapshot()
        return section

    def _left_by_preparation(self, err: ChecksFailed) -> ChecksFailed | None:
        """With from_revision, the first upgrade failing on an object the copy already had after its
        preparatory downgrade: that downgrade left it behind, and the finding says so (as a second
        upgrade's failure names what the rehearsal's downgrade left), naming the revision whose downgrade
        did not remove it. None for any other failure: the revision that failed is the finding."""
        cause = err.__cause__
        if self.taken_back is None or not isinstance(cause, MigrationFailed):
            return None
        left = rehearse.already_there(cause.message, self.before)
        if not left:
            return None  # not there before this pass: the failing revision made it twice itself
        failing = self._stopped_at(cause.revisions)
        undone = {r.revision for r in self.taken_back.steps}
        whose = (
            f" (the downgrade of {failing.revision}, whose upgrade creates it, did not remove it)"
            if failing is not None and failing.revision in undone
            else ""
        )
        found = Differences(left_behind=left)
        self._findings().differences = RehearsalDifferences(preparatory_downgrade=found)
        self._save()
        return ChecksFailed(
            f"the preparatory downgrade to {self.params['from_revision']} left {', '.join(left)} behind{whose}, "
            f"so the upgrade failed on the copy: {cause.message.split('. ')[0]}; the target is untouched: fix "
            "that downgrade and rehearse again"
        )

    def _stopped_at(self, revisions: tuple[str, ...] | None) -> migrate.RevisionInfo | None:
        """The pending revision a failed upgrade of the copy stopped at: the one after where it stands
        (each revision commits on its own), or None when that cannot be told."""
        ids = [r.revision for r in self.pending]
        at = tuple(revisions or ())
        if set(at) == set(self.start):
            return self.pending[0]
        if len(at) == 1 and at[0] in ids[:-1]:
            return self.pending[ids.index(at[0]) + 1]
        return None

    @step()
    def downgrade(self) -> Section:
        """Downgrade the copy back to where the target is."""
        if not self.pending:
            return Section.skip("Downgrade", "nothing to rehearse")
        section = self._pass("Downgrade", "downgrade", "downgrade", self.start[0] if self.start else "base")
        # Compared at once: the second upgrade may fail on what the downgrade left, and this is why.
        self.downgrade_diff = rehearse.compare(self.before, self._snapshot())
        self._findings().differences = RehearsalDifferences(downgrade_vs_before=self.downgrade_diff)
        self._save()
        if not self.downgrade_diff.none:
            section.status += f"; {len(self.downgrade_diff.lines())} difference(s) from the copy as it was"
            section.rows += [{"revision": "", "seconds": "", "locks": d, "blocks reads of": ""}
                             for d in self.downgrade_diff.lines()]
        return section

    @step("upgrade again")
    def upgrade_again(self) -> Section:
        """Upgrade the copy to the target once more: a chain that cannot be run again shows here."""
        if not self.pending:
            return Section.skip("Upgrade again", "nothing to rehearse")
        try:
            return self._pass("Upgrade again", "upgrade again", "upgrade", self.pending[-1].revision)
        except ChecksFailed as err:
            left = "; ".join(self.downgrade_diff.lines()[:4]) or "nothing the comparison sees"
            failed = err.__cause__.message.split(". ")[0] if isinstance(err.__cause__, OpsError) else err.message
            raise ChecksFailed(
                f"the upgrade cannot run again after its downgrade, on the copy: {failed}; after the downgrade: {left}"
            ) from err

    @step(repeatable=True)
    def compare(self) -> Section:
        """Compare the passes: the downgrade against the copy as it was, the second upgrade against the first."""
        if not self.pending:
            return Section.skip("Compare", "nothing to rehearse")
        downgrade_diff = self.downgrade_diff
        upgrade_diff = rehearse.compare(self.upgraded, self._snapshot())
        self._findings().differences.upgrade_again_vs_upgrade = upgrade_diff
        self._save()
        rows = [{"comparison": "after the downgrade, against the copy as it was", "difference": d}
                for d in downgrade_diff.lines()]
        rows += [{"comparison": "after the second upgrade, against the first", "difference": d}
                 for d in upgrade_diff.lines()]
        if rows:
            show_now(Section("Compare", f"{len(rows)} difference(s) between the passes", [], rows))
            raise ChecksFailed(
                f"the rehearsal found {len(rows)} difference(s) between the passes: "
                + "; ".join(r["difference"] for r in rows[:4])
                + (f"; and {len(rows) - 4} more (in the record)" if len(rows) > 4 else "")
            )
        facts = [
            ("schema and data after the downgrade", "as before the upgrade"),
            ("schema and data after the second upgrade", "as after the first"),
        ]
        return Section("Compare", "no difference between the passes", facts)

    @step("drop copy")
    def drop_copy(self) -> Section:
        """Drop the scratch copy (also done when the run ends any other way)."""
        kept = self._findings().copy
        if not (kept and kept.database):
            return Section.skip("Drop copy", "no copy was made")
        dropped = self._drop_copy()
        return Section("Drop copy", "dropped" if dropped else "no copy to drop", [("copy", kept.database)])

    def _drop_copy(self) -> bool:
        kept = self.record.rehearsal.copy if self.record.rehearsal is not None else None
        if not (kept and kept.database):
            return False
        dropped = rehearse.drop_copy(self.settings, kept.database)
        self._findings().copy_dropped = True
        self._save()
        return dropped

    def _finish(self, err: BaseException | None = None) -> None:
        # The copy never outlives the run: dropped here whatever ended it (a failed pass, a refusal).
        try:
            self._drop_copy()
        except Exception as drop_err:  # noqa: BLE001 -- the run's own ending comes first, whatever this was
            self._findings().copy_dropped = f"not dropped: {drop_err}"
        super()._finish(err)
