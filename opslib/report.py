"""The audit report: a static HTML site, built from the records folder, that an auditor opens from
the file system without a server.

``index.html`` lists every run in the ledger (sortable, outcomes in colour) under the result of the
ledger check; ``runs/<run number>-<record>.html`` shows one run: its facts from the sidecar first, then the
executed notebook rendered by nbconvert with each code cell folded. The styles are two shared files,
``report.css`` and ``notebook.css`` (JupyterLab's theme), so each page holds only its own content. The pages load nothing from
the network and carry a Content-Security-Policy that lets no script run but the index's sorting.

The build is incremental: each run page is rendered once and kept, with its key (the run's ledger entries, what
the check found about it, the sha256 of its files as they are now, and the opslib, nbconvert and template
versions) in ``.opslib-report-state.json`` beside the site. A rebuild renders only the pages whose key changed
(a new run, an edited file, a new opslib) and links the rest into the new site; the index and the summary are
always written afresh.

The report reads only the records, never the database, and the records hold no password; URLs
with a password in any rendered output are still redacted, in case an operator printed one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from opslib import __version__, audit, display, notebooks, runlist, signatures, summary
from opslib.errors import ConfigError, InvalidInput, ReportFailed
from opslib.outcome import Outcome
from opslib.policy import ApprovalPolicy
from opslib.record import RunRecord, revisions_text
from opslib.redact import clean

TEMPLATES = Path(__file__).parent / "templates"
# A report folder carries this file, so that rebuilding may replace it and nothing else.
MARKER = ".opslib-report"
# What each kept run page was rendered from; a page whose key is unchanged is not rendered again.
STATE = ".opslib-report-state.json"
STATE_FORMAT = 2
SCREENSHOT = "index.png"

INDEX_COLUMNS = (
    ("started", "started", "text"), ("run_id", "run id", "text"), ("runbook", "runbook", "text"),
    ("env", "env", "text"), ("operator", "operator, approvers", "text"), ("database", "database", "text"),
    ("revisions", "revisions", "text"), ("outcome", "outcome", "text"), ("seconds", "seconds", "number"),
    ("warnings", "warnings", "text"), ("record", "record", "text"),
)  # fmt: skip

# Debian's chromium, started as the report's tests do; root needs --no-sandbox, and the rest keep a
# one-shot headless run from reaching the network or writing a profile outside its scratch folder.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
)  # fmt: skip


@dataclass
class Report:
    """A report that was written: where, how many run pages, and what the ledger check found."""

    out: Path
    index: Path
    pages: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    screenshot: Path | None = None
    rendered: int = 0  # run pages rendered by this build; the others were kept from the last one

    def line(self) -> str:
        """One line for the terminal."""
        status = (
            "the ledger check passed"
            if not self.problems
            else f"the ledger check found {len(self.problems)} problem(s), shown at the top of the report"
        )
        return (
            f"audit report: {len(self.pages)} run page(s) in {self.out} ({self.rendered} rendered, "
            f"{len(self.pages) - self.rendered} unchanged); {status}; open {self.index}"
        )


class _Pages:
    """The run pages of the last build in ``out``, each with its key and its sha256, to keep those whose key
    is unchanged and whose file is still as it was written (a page edited since is rendered again)."""

    def __init__(self, out: Path, versions: str, full: bool = False):
        self.out, self.versions, self.kept, self.files = out, versions, {}, {}
        self.written: dict[str, dict] = {}  # this build's pages and shared files, for the next one
        if full:
            return
        try:
            state = json.loads((out / STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # no earlier report, or one written before pages were kept: render every page
        if not (isinstance(state, dict) and state.get("format") == STATE_FORMAT and state.get("versions") == versions):
            return
        for kept, name in ((self.kept, "pages"), (self.files, "files")):
            found = state.get(name)
            if isinstance(found, dict):
                kept.update({k: v for k, v in found.items() if isinstance(v, dict)})

    def reuse(self, name: str, key: str, site: Path) -> bool:
        """Put the kept page ``name`` into ``site`` when it was rendered from ``key`` and is unchanged since;
        False when it must be rendered."""
        kept = self.kept.get(name) or {}
        if kept.get("key") != key or not self._intact(self.out / "runs" / name, kept.get("sha256")):
            return False
        try:
            os.link(self.out / "runs" / name, site / "runs" / name)
        except OSError:  # a folder that cannot hold hard links: render it
            return False
        self.written[name] = kept
        return True

    def rendered(self, name: str, key: str, html: str) -> None:
        """Note a page rendered by this build, for the next build to keep."""
        self.written[name] = {"key": key, "sha256": hashlib.sha256(html.encode()).hexdigest()}

    def file(self, name: str, site: Path) -> bool:
        """Put the kept shared file ``name`` (the notebook stylesheet) into ``site`` when it is unchanged since
        it was written; False when it must be written again."""
        digest = (self.files.get(name) or {}).get("sha256")
        if not self.kept or not self._intact(self.out / name, digest):
            return False
        shutil.copyfile(self.out / name, site / name)
        return True

    def state(self, site: Path) -> str:
        """The state to keep beside the site: every page's key and sha256, and each shared file's sha256."""
        files = {name: {"sha256": audit.file_sha256(site / name)} for name in ("notebook.css",)}
        return json.dumps({"format": STATE_FORMAT, "versions": self.versions, "pages": self.written, "files": files}, indent=0)

    @staticmethod
    def _intact(path: Path, digest) -> bool:
        """Whether ``path`` is a regular file (no link to elsewhere) whose sha256 is ``digest``."""
        try:
            if not stat.S_ISREG(path.lstat().st_mode):
                return False
        except OSError:
            return False
        return isinstance(digest, str) and audit.file_sha256(path) == digest


# The modules a run page is rendered with, besides the templates: a change to any renders every page again.
_RENDERED_WITH = ("report", "display", "audit", "redact", "safeguards", "record", "notebooks", "outcome", "signatures",
                  "approval", "runlist")


def _versions() -> str:
    """What every page depends on besides its run: opslib's and nbconvert's versions, the modules that
    render a page and the templates."""
    from importlib.metadata import version

    digest = hashlib.sha256(f"{__version__} {version('nbconvert')}".encode())
    here = Path(__file__).parent
    for path in [*(here / f"{module}.py" for module in _RENDERED_WITH), *sorted(TEMPLATES.iterdir())]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _page_key(records_dir: Path, entries: list[dict], line: int, problems: list[str]) -> str:
    """What a run page shows, as one hash: its ledger entries whole, its line, what the check found, and the
    sha256 of its sidecar and notebook as they are now (an edited file shows its edited facts)."""
    entry = entries[-1]
    files = [audit.file_sha256(records_dir / Path(str(entry.get(k))).name) if entry.get(k) else None
             for k in ("sidecar", "notebook")]  # fmt: skip
    return hashlib.sha256(json.dumps([entries, line, problems, files], sort_keys=True, default=str).encode()).hexdigest()


def _jinja():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _page_name(line: int, entry: dict) -> str:
    # The ledger line keeps names unique even when entries repeat; .name keeps a tampered entry
    # from pointing the page outside the report.
    stem = Path(str(entry.get("sidecar") or entry.get("run_id") or "run")).name.removesuffix(".json")
    return f"{line:04d}-{stem}.html"


def _read_notebook(path: Path):
    """The notebook at ``path`` and None, or None and why it cannot be shown."""
    nbformat = notebooks.nbformat()

    if not path.is_file():
        return None, "the file is missing"
    try:
        return nbformat.read(path, as_version=4), None
    except (OSError, ValueError, nbformat.ValidationError) as err:
        return None, f"it is not a readable notebook ({_first_line(err)})"


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


def _read_record(records_dir: Path, entry: dict):
    """The run's sidecar and None, or None and why it cannot be read (deleted, or edited into non-JSON)."""
    stem = Path(str(entry.get("sidecar") or "")).name.removesuffix(".json")
    try:
        record = audit.read_sidecar(records_dir, stem)
    except (OSError, ValueError) as err:
        return None, f"is not readable ({_first_line(err)})"
    if not isinstance(record, dict):
        return None, "is missing" if record is None else "does not hold a record"
    return record, None


def _run_page(
    exporter, env, records_dir: Path, line: int, entries: list[dict], problems: list[str], common: dict,
    broken: set | frozenset = frozenset(),
) -> str:
    """One run's page: its facts as its ledger entries (``[start, ending]``, or ``[start]`` while it runs)
    say them over its sidecar, what was changed since, then its notebook. ``broken``: the hashes of the ledger
    entries whose signatures do not hold."""
    nbformat = notebooks.nbformat()

    entry, start = entries[-1], (entries[0] if audit.is_start(entries[0]) else None)
    record, record_error = _read_record(records_dir, entry)
    notebook, notebook_error = None, None
    if entry.get("notebook"):
        notebook, notebook_error = _read_notebook(records_dir / Path(entry["notebook"]).name)
    sealed = not audit.is_start(entry)
    edited = bool(
        record and sealed and audit.file_sha256(records_dir / Path(str(entry.get("sidecar"))).name) != entry.get("sidecar_sha256")
    )
    # Shown as the ledger sealed it, read through the one tolerant reader: the file may have been edited.
    shown = RunRecord.tolerant(audit.as_sealed(entry, start, record) if sealed else record) if record else None
    warnings = [str(w) for w in entry["warnings"]] if sealed and isinstance(entry.get("warnings"), list) else None
    ledgers = display.sealed_facts(start is not None, warnings is not None)
    own = [e for e in (start, entry) if e]
    signed = ("ledger signatures", signatures.signature_text(own, not {e.get("hash") for e in own} & broken))
    facts = env.get_template("_facts.html.j2").render(
        entry=entry,
        record=shown,
        edited=edited,
        facts=[(k, v, k in ledgers) for k, v in [*display.run_facts(shown, warnings), signed] if v] if shown else [],
        changes=audit.field_changes(entry, record) if edited else [],
        problems=problems,
        line=line,
        record_error=record_error,
        notebook_error=notebook_error,
        **common,
    )
    resources = {
        "metadata": {"name": f"{entry.get('runbook')} run {entry.get('run_id')}"},
        "opslib": {"facts": facts},
    }
    body, _ = exporter.from_notebook_node(notebook or nbformat.v4.new_notebook(), resources=resources)
    return body


def _notebook_css(exporter) -> str:
    """JupyterLab's light theme as nbconvert ships it, written once for every run page to link."""
    for folder in exporter.template_paths:
        static = Path(folder) / "static"
        if (static / "index.css").is_file() and (static / "theme-light.css").is_file():
            return (static / "index.css").read_text() + "\n" + (static / "theme-light.css").read_text()
    raise ReportFailed("nbconvert's JupyterLab template has no static/index.css: reinstall nbconvert")


def _exporter():
    notebooks.nbformat()  # first, so that nbconvert finds it loaded without the IRI grammar
    from nbconvert import HTMLExporter

    return HTMLExporter(
        template_name="lab",
        extra_template_paths=[str(TEMPLATES)],
        template_file="report_run.html.j2",
        exclude_anchor_links=True,
    )


def _prepare_out(out: Path) -> Path:
    """A fresh scratch folder beside ``out``; refuses an ``out`` that holds anything but a report."""
    if out.exists():
        if not out.is_dir():
            raise InvalidInput(f"--out {out} is a file; give a folder for the report")
        if any(out.iterdir()) and not (out / MARKER).is_file():
            raise InvalidInput(
                f"--out {out} already holds files that are not an opslib report; give a new or empty folder"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    # mkdtemp makes it private; a report is for others to read, as the records are.
    umask = os.umask(0)
    os.umask(umask)
    scratch.chmod(0o777 & ~umask)
    return scratch


def _swap_in(scratch: Path, out: Path) -> None:
    # The old report stays whole until the new one is complete, then is replaced in two renames.
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(scratch, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _outcome_order(value: str) -> int:
    order = [o.value for o in Outcome]
    return order.index(value) if value in order else len(order)


def build_report(
    records_dir: Path,
    out: Path,
    cross_check: Callable[[list[dict]], list[str]] | None = None,
    full: bool = False,
    out_of_reach: Callable | None = None,
    approvals: ApprovalPolicy | None = None,
) -> Report:
    """Write the audit report of ``records_dir`` into ``out`` (replacing an earlier report there).

    ``cross_check(entries)`` returns what the ledger's anchors (its database, a witness) say is missing or
    different; those problems head the index with the ledger's own. With ``full``, every page is rendered
    again, none kept from the last build. ``out_of_reach`` and ``approvals`` (the policy and allowed_signers
    every signature and approval is checked against) are :func:`opslib.audit.check_ledger`'s.

    Every run in the ledger gets a page, including runs whose sidecar or notebook was changed or
    deleted since: their page says so in red at the top, and so does the index. Raises
    :class:`~opslib.errors.InvalidInput` when ``out`` holds other files, and
    :class:`~opslib.errors.PreconditionFailed` when the ledger is not JSON lines.
    """
    records_dir, out = Path(records_dir), Path(out)
    if not records_dir.is_dir():
        raise InvalidInput(
            f"no records folder at {records_dir}: set OPSLIB_RECORDS_DIR to the folder runs write to"
        )
    check = audit.check_ledger(records_dir, out_of_reach, approvals)
    if cross_check is not None:
        check = replace(check, unvouched=check.unvouched + cross_check(check.entries))
    scratch = _prepare_out(out)
    try:
        pages, rendered = _write_site(records_dir, scratch, check, _Pages(out, _versions(), full))
        (scratch / MARKER).write_text("written by `opslib audit report`; rebuilding replaces this folder\n")
        _swap_in(scratch, out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return Report(
        out=out, index=out / "index.html", pages=[out / "runs" / p for p in pages], problems=check.problems,
        rendered=rendered,
    )  # fmt: skip


def _write_site(records_dir: Path, site: Path, check: audit.LedgerCheck, kept: _Pages) -> tuple[list[str], int]:
    """Write the index, the run pages and the two stylesheets into ``site``, rendering only the run pages
    ``kept`` does not hold as they would be rendered now; returns the pages' names and how many were rendered."""
    env = _jinja()
    script = (TEMPLATES / "report_sort.js").read_text()
    common = {"generated_at": audit.iso(audit.now())}
    exporter = None  # nbconvert is loaded only when a page must be rendered
    shutil.copyfile(TEMPLATES / "report.css", site / "report.css")
    (site / "runs").mkdir()
    pages, runs, rendered = [], [], 0
    # One page per run (its ending's, else its start's); a start entry's own problems show on its run's page.
    ended = {e.get("sidecar") for e in check.entries if not audit.is_start(e)}
    starts: dict = {}
    for line, (entry, problems) in enumerate(zip(check.entries, check.by_entry, strict=True), start=1):
        if audit.is_start(entry) and entry.get("sidecar") in ended:
            starts[entry.get("sidecar")] = (entry, problems)
            continue
        start, start_problems = starts.pop(entry.get("sidecar"), (None, []))
        problems = start_problems + problems
        name = _page_name(len(pages) + 1, entry)  # numbered by run; the page names its ledger line
        own = [e for e in (start, entry) if e]
        key = _page_key(records_dir, own, line, problems)
        # A page with problems is always rendered afresh: what it says about them is never taken from a kept file.
        if problems or not kept.reuse(name, key, site):
            exporter = exporter or _exporter()
            html = clean(_run_page(exporter, env, records_dir, line, own, problems, common, check.broken_signatures))
            (site / "runs" / name).write_text(html, encoding="utf-8")
            kept.rendered(name, key, html)
            rendered += 1
        pages.append(name)
        runs.append({**runlist.run_row(entry), "page": f"runs/{name}", "problems": problems})
    if not kept.file("notebook.css", site):
        (site / "notebook.css").write_text(_notebook_css(exporter or _exporter()))
    (site / STATE).write_text(kept.state(site), encoding="utf-8")
    fleets = _fleet_pages(records_dir, site, env, {r["run_id"]: r["page"] for r in runs}, common)
    runs.reverse()  # newest first, as an auditor reads a log
    outcomes = Counter(r["outcome"] for r in runs)
    index = env.get_template("report_index.html.j2").render(
        runs=runs,
        # Every outcome found, in the contract's order; one a newer opslib wrote comes last, as written.
        outcomes=[(o, n) for o, n in sorted(outcomes.items(), key=lambda item: _outcome_order(item[0]))],
        columns=INDEX_COLUMNS,
        problems=check.problems,
        fleets=fleets,
        records_dir=str(records_dir.resolve()),
        version=__version__,
        script=script,
        script_hash="sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode(),
        **common,
    )
    (site / "index.html").write_text(clean(index), encoding="utf-8")
    page = env.get_template("report_summary.html.j2").render(
        summary=summary.audit_summary(records_dir, check),
        pages={r["run_id"]: r["page"] for r in runs},
        records_dir=str(records_dir.resolve()),
        version=__version__,
        **common,
    )
    (site / "summary.html").write_text(clean(page), encoding="utf-8")
    return pages, rendered


def _fleet_pages(records_dir: Path, site: Path, env, pages: dict[str, str], common: dict) -> list[dict]:
    """One page per fleet run of ``records/fleets/``: each target's outcome in colour, linked to its run's
    page, and the targets not started. Returns the fleets for the index, newest first."""
    found = []
    for path in sorted((records_dir / "fleets").glob("*_fleet_*.json")):
        try:
            fleet = json.loads(path.read_text(encoding="utf-8"))
            targets = [
                {
                    **t,
                    "before": "not read" if t.get("revisions_before") is None else revisions_text(t["revisions_before"]),
                    "after": "not read" if t.get("revisions_after") is None else revisions_text(t["revisions_after"]),
                    "seconds": "" if t.get("duration_s") is None else f"{t['duration_s']:.3f}",
                    "page": pages.get(t.get("run_id")),
                }
                for t in fleet["targets"]
            ]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ReportFailed(f"the fleet record {path.name} cannot be read: {_first_line(err)}") from None
        (site / "fleets").mkdir(exist_ok=True)
        name = f"fleets/{path.stem}.html"
        html = env.get_template("report_fleet.html.j2").render(
            fleet=fleet, targets=targets, not_started=[t["target"] for t in targets if t["state"] == "not started"],
            version=__version__, **common,
        )  # fmt: skip
        (site / name).write_text(clean(html), encoding="utf-8")
        found.append({**{k: fleet.get(k) for k in ("fleet_id", "runbook", "outcome")}, "page": name})
    return found[::-1]


def find_chromium() -> str:
    """The Chromium (or Chrome) program on PATH; :class:`~opslib.errors.ConfigError` when there is none."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise ConfigError(
        "the screenshot needs Chromium and none is on PATH: install Debian's package (apt-get install chromium)"
    )


def screenshot(page: Path, png: Path, *, width: int = 1400, height: int = 1000) -> Path:
    """A PNG of ``page`` as headless Chromium renders it at ``width`` x ``height``."""
    browser = find_chromium()
    png = Path(png).resolve()
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="opslib-chromium-") as profile:
        command = [
            browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
            f"--screenshot={png}", Path(page).resolve().as_uri(),
        ]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as err:
            raise ReportFailed(
                f"{browser} took over 120 s to render {page}; no screenshot was written"
            ) from err
    if done.returncode != 0 or not png.is_file():
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise ReportFailed(f"{browser} exited {done.returncode} without a screenshot of {page}: {last}")
    return png
