"""`opslib audit report`: the static HTML site of the records, read as headless Chromium renders it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from opslib import audit

from .conftest import RECORDS_PASSWORD, ROOT, audit_cli, copy_of_records

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail(
            "the report tests need Debian's chromium: `make browser` installs it (apt-get install chromium)"
        )
    return found


def _rendered(page: Path, tmp_path: Path, fragment: str = "") -> str:
    """The DOM of ``page`` after Chromium loaded it and ran its scripts."""
    done = subprocess.run(
        [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom",
         page.resolve().as_uri() + fragment],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _soup(dom: str):
    from bs4 import BeautifulSoup  # nbconvert's own HTML parser

    return BeautifulSoup(dom, "html.parser")


def _rows(dom: str) -> list[tuple[str, str]]:
    """(run id, outcome) of each row of the runs table, in the order the browser shows them."""
    table = _soup(dom).find("table", id="runs")
    return [(tr["data-run-id"], tr.find(class_="outcome").get_text()) for tr in table.tbody.find_all("tr")]


def _status(dom: str, element_id: str) -> str:
    return _soup(dom).find(id=element_id)["data-status"]


def _report(records_root: Path, *args: str) -> subprocess.CompletedProcess:
    return audit_cli(records_root, "report", *args)


def test_report_index_and_run_pages_in_headless_chromium(recorded_runs, tmp_path):
    work, _ = recorded_runs
    out = tmp_path / "report"
    made = _report(work, "--out", str(out))
    assert made.returncode == 0, made.stderr
    assert "4 run page(s)" in made.stdout and "the ledger check passed" in made.stdout
    listed = json.loads(audit_cli(work, "list", "--json").stdout)

    index = _rendered(out / "index.html", tmp_path)
    assert _status(index, "verify") == "intact" and "4 run(s)" in index
    newest_first = [(r["run_id"], r["outcome"]) for r in reversed(listed)]
    assert _rows(index) == newest_first
    assert _soup(index).find(id="runs")["data-sorted-by"] == "-started"
    # The browser runs the sorting script (the page's Content-Security-Policy allows it by hash).
    by_outcome = _rows(_rendered(out / "index.html", tmp_path, "#sort=outcome"))
    assert [o for _, o in by_outcome] == ["failed", "refused", "succeeded", "succeeded"]
    by_duration = _rendered(out / "index.html", tmp_path, "#sort=-seconds")
    assert _soup(by_duration).find(id="runs")["data-sorted-by"] == "-seconds"
    seconds = [float(td["data-value"]) for td in _soup(by_duration).select("#runs tbody td.num")]
    assert seconds == sorted(seconds, reverse=True) and len(seconds) == 4

    failed = listed[2]
    pages = sorted((out / "runs").glob(f"*_{failed['run_id']}.html"))
    assert len(pages) == 1 and f'href="runs/{pages[0].name}"' in index
    page = _rendered(pages[0], tmp_path)
    assert _soup(page).find(id="outcome").get_text() == "failed" and _status(page, "integrity") == "intact"
    assert "failed (exit 1)" in page and "b003" in page
    # Facts before the notebook, every code cell of the notebook folded behind a <details>.
    soup = _soup(page)
    first_cell = soup.select_one("div.jp-Cell")
    assert first_cell is not None and first_cell in soup.find(id="facts").find_all_next("div")
    notebook = json.loads(next((work / "records").glob(f"*_{failed['run_id']}.ipynb")).read_text())
    code_cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert len(_soup(page).select("details.opslib-code")) == len(code_cells) > 5
    assert "<script" not in pages[0].read_text()
    assert "Content-Security-Policy" in pages[0].read_text()


def test_report_shows_each_changed_record_in_red(recorded_runs, tmp_path):
    copy = copy_of_records(recorded_runs, tmp_path)
    records = copy / "records"
    entries = audit.read_endings(records)
    notebook = records / entries[0]["notebook"]
    notebook.write_text(notebook.read_text().replace("succeeded", "SUCCEEDED", 1))
    (records / entries[2]["sidecar"]).write_text("{ not json")
    (records / entries[3]["sidecar"]).unlink()
    out = copy / "report"
    made = _report(copy, "--out", str(out))
    assert made.returncode == 3, made.stdout + made.stderr
    assert "3 problem(s)" in made.stdout + made.stderr and (out / "index.html").is_file()

    index = _rendered(out / "index.html", tmp_path)
    assert _status(index, "verify") == "failed" and "Ledger check failed: 3 problem(s)" in index
    assert f"notebook {entries[0]['notebook']} was modified" in index
    assert index.count("does not match the ledger</span>") == 3
    first = _rendered(next((out / "runs").glob("0001-*.html")), tmp_path)
    assert _status(first, "integrity") == "failed" and "was modified" in first
    third = _rendered(next((out / "runs").glob("0003-*.html")), tmp_path)
    assert (
        "is not readable (JSONDecodeError" in third
        and "these facts come from the ledger entry alone" in third
    )
    last = _rendered(next((out / "runs").glob("0004-*.html")), tmp_path)
    assert "is missing; these facts come from the ledger entry alone" in last
    assert _soup(last).find(id="outcome").get_text() == "refused"


def test_report_refuses_a_folder_that_is_not_a_report(recorded_runs, tmp_path):
    work, _ = recorded_runs
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    refused = _report(work, "--out", str(out))
    assert refused.returncode == 2 and "not an opslib report" in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no scratch folder left either
    # A report folder is replaced whole: a run page from an earlier report does not linger.
    again = tmp_path / "report"
    assert _report(work, "--out", str(again)).returncode == 0
    (again / "runs" / "0099-stale.html").write_text("old")
    assert _report(work, "--out", str(again)).returncode == 0
    assert len(list((again / "runs").glob("*.html"))) == 4


def test_report_of_an_empty_records_folder(tmp_path):
    (tmp_path / "records").mkdir()
    made = _report(tmp_path)
    assert made.returncode == 0, made.stderr
    dom = _rendered(tmp_path / "records" / "report" / "index.html", tmp_path)
    assert _soup(dom).find(id="no-runs") is not None and _status(dom, "verify") == "intact"
    assert audit.verify_ledger(tmp_path / "records") == []  # the report folder is not a record


def test_no_password_in_the_ledger_sidecars_notebooks_or_report(recorded_runs, tmp_path):
    work, _ = recorded_runs
    out = tmp_path / "report"
    assert _report(work, "--out", str(out)).returncode == 0
    files = [p for p in (work / "records").rglob("*") if p.is_file()] + [
        p for p in out.rglob("*") if p.is_file()
    ]
    assert any(p.name == "ledger.jsonl" for p in files) and any(p.suffix == ".html" for p in files)
    assert [p.name for p in files if RECORDS_PASSWORD.encode() in p.read_bytes()] == []


def test_make_audit_report_writes_the_site_and_a_screenshot(recorded_runs, tmp_path):
    work, _ = recorded_runs
    out = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "MAKE"))}
    env["OPSLIB_RECORDS_DIR"] = str(work / "records")
    done = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "audit-report", f"out={out}"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    png = out / "index.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1400, 1000)
    # A blank page compresses to a few kB; the rendered table, badges and text take far more.
    assert len(data) > 30_000
    assert f"screenshot: {png}" in done.stdout


def test_report_arguments_and_a_broken_ledger_are_refused_clearly(recorded_runs, tmp_path):
    work, _ = recorded_runs
    wrong = audit_cli(work, "list", "--out", str(tmp_path / "x"))
    assert wrong.returncode == 2 and "--out belongs to `opslib audit report`, not `audit list`" in wrong.stderr
    wrong = audit_cli(work, "report", "abc123")
    assert wrong.returncode == 2 and "takes no RUN_ID" in wrong.stderr
    assert not (tmp_path / "x").exists()
    copy = copy_of_records(recorded_runs, tmp_path)
    with open(copy / "records" / audit.LEDGER, "a") as ledger:
        ledger.write("not json\n")
    for action in ("verify", "report"):
        done = audit_cli(copy, action)
        assert done.returncode == 3 and "ledger.jsonl is not valid JSON lines" in done.stderr
    assert not (copy / "records" / "report").exists()


def test_an_edited_sidecar_shows_each_changed_fact_against_the_ledger(recorded_runs, tmp_path):
    """A failed deploy made to look fine, its failed upgrade step included: verify names every edit (exit 3),
    the page shows the run as the ledger sealed it and marks the facts only the file holds, and no audit
    command changes a file of the records folder."""
    copy = copy_of_records(recorded_runs, tmp_path)
    records = copy / "records"
    line, entry = next((i, e) for i, e in enumerate(audit.read_endings(records), 1) if e["outcome"] == "failed")
    path = records / entry["sidecar"]
    record = json.loads(path.read_text())
    (failed,) = [i for i, step in enumerate(record["steps"]) if step["outcome"] == "failed"]
    step_name = record["steps"][failed]["name"]
    record["steps"][failed]["outcome"] = "succeeded"
    record.update(operator="mallory", outcome="succeeded", exit_code=0, host="elsewhere")
    path.write_text(json.dumps(record))
    before = {p.name: audit.file_sha256(p) for p in records.iterdir() if p.is_file()}
    verified = audit_cli(copy, "verify")
    assert verified.returncode == 3
    assert f'operator: ledger says "{entry["operator"]}", file says "mallory"' in verified.stdout
    assert f'outcome: ledger says "{entry["outcome"]}", file says "succeeded"' in verified.stdout
    assert f'step {failed + 1} ({step_name}): ledger says {step_name}: failed, file says {step_name}: succeeded' in verified.stdout
    out = tmp_path / "report"
    assert _report(copy, "--out", str(out)).returncode == 3
    for command in (["list"], ["show", entry["run_id"]], ["summary"], ["verify"]):
        assert audit_cli(copy, *command).returncode in (0, 3)
    assert {p.name: audit.file_sha256(p) for p in records.iterdir() if p.is_file()} == before

    page = _soup(_rendered(next((out / "runs").glob(f"{line:04d}-*.html")), tmp_path))
    rows = [[cell.get_text() for cell in row.find_all(["th", "td"])] for row in page.find(id="changes").find_all("tr")[1:]]
    assert ["operator", f'"{entry["operator"]}"', '"mallory"'] in rows
    assert ["outcome", f'"{entry["outcome"]}"', '"succeeded"'] in rows
    assert [f"step {failed + 1} ({step_name})", f"{step_name}: failed", f"{step_name}: succeeded"] in rows
    assert page.find(id="outcome").get_text() == entry["outcome"]  # the heading is the ledger's
    facts = {row.th.get_text(): row.td.get_text() for row in page.find(id="facts").find_all("tr")}
    assert facts["outcome"].startswith("failed") and "from the edited file" not in facts["outcome"]
    assert "elsewhere" in facts["who"] and facts["who"].endswith("from the edited file")
    steps = [[cell.get_text() for cell in row.find_all("td")][:2] for row in page.find(id="steps").tbody.find_all("tr")]
    assert steps[failed] == [step_name, "failed"]  # the step as the ledger sealed it


def test_the_report_never_scrolls_sideways_on_a_narrow_screen(recorded_runs, tmp_path):
    """At 420 px the index and every run page fit the window: wide tables scroll in their own box."""
    sync_api = pytest.importorskip("playwright.sync_api")
    out = tmp_path / "report"
    assert _report(copy_of_records(recorded_runs, tmp_path), "--out", str(out)).returncode == 0
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 420, "height": 900})
        for html in [out / "index.html", *sorted((out / "runs").glob("*.html"))]:
            page.goto(html.as_uri())
            width = page.evaluate("document.documentElement.scrollWidth")
            wide = page.evaluate(
                "Array.from(document.querySelectorAll('body *')).filter(e => !e.closest('.scroll')"
                " && e.getBoundingClientRect().right > 420).map(e => e.tagName + ' ' + e.className).slice(0, 5)"
            )
            assert width <= 420, f"{html.name} is {width} px wide at 420 px: {wide}"
        # Each run of the index is a card: its outcome, runbook, database and revisions in the window, on top.
        page.goto((out / "index.html").as_uri())
        cards = page.evaluate(_CARDS_JS)
        assert len(cards) == 4
        for card in cards:
            for name in ("outcome", "runbook", "database", "revisions"):
                if name in card["cells"]:
                    left, right, top = card["cells"][name]
                    assert 0 <= left and right <= 420, (card["run"], name, left, right)
                    assert top - card["top"] < 80, (card["run"], name, "not at the top of its card")
            assert card["cells"]["outcome"][2] - card["top"] < 40
        browser.close()


# Each row of the index at the current width: where its outcome, runbook, database and revisions cells are.
_CARDS_JS = """
() => Array.from(document.querySelectorAll('#runs tbody tr')).map(tr => {
  const cells = {};
  for (const name of ['outcome', 'runbook', 'database', 'revisions']) {
    const td = tr.querySelector('td.c-' + name);
    if (td && td.textContent.trim()) { const r = td.getBoundingClientRect(); cells[name] = [r.left, r.right, r.top]; }
  }
  return {run: tr.dataset.runId, top: tr.getBoundingClientRect().top, cells};
})
"""


OUTCOMES = {  # each ending, with the exit code its record holds (an abandoned run has none)
    "succeeded": 0, "failed": 1, "invalid": 2, "refused": 3, "locked": 4, "interrupted": 130, "abandoned": None,
}  # fmt: skip


def test_each_kind_of_ending_is_listed_and_coloured_as_itself(tmp_path):
    """One record per outcome, sealed as a run seals it: `audit list --json` gives each its own outcome and
    exit code, and the report (its DOM as Chromium renders it) gives each its own colour."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from opslib.outcome import Outcome

    records = tmp_path / "records"
    records.mkdir()
    for i, (outcome, code) in enumerate(OUTCOMES.items()):
        stem = f"20261127T00000{i}Z_deploy_run{i:05d}"
        record = audit.new_record("deploy", f"run{i:05d}", audit.now(), operator="t", env="development")
        record.end(Outcome(outcome), code, None if code == 0 else f"ended {outcome}", record.started_at)
        audit.write_sidecar(records, stem, record)
        audit.append_ledger(records, stem, record)
    listed = json.loads(audit_cli(tmp_path, "list", "--json").stdout)
    assert {r["outcome"]: r["exit_code"] for r in listed} == OUTCOMES
    out = tmp_path / "report"
    assert _report(tmp_path, "--out", str(out)).returncode == 0
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto((out / "index.html").as_uri())
        colours = page.evaluate(
            "Object.fromEntries(Array.from(document.querySelectorAll('#runs span.outcome')).map("
            "e => [e.textContent, getComputedStyle(e).backgroundColor + ' ' + getComputedStyle(e).color]))"
        )
        signs = page.evaluate(
            "Object.fromEntries(Array.from(document.querySelectorAll('#runs span.outcome')).map("
            "e => [e.textContent, getComputedStyle(e, '::before').content]))"
        )
        browser.close()
    assert set(colours) == set(OUTCOMES)
    assert len(set(colours.values())) == len(OUTCOMES), colours
    # Failed, refused and invalid are told apart by hue (50 degrees or more), and by a sign besides the word.
    hues = {o: _hue(colours[o].split(") ")[1]) for o in ("failed", "refused", "invalid")}
    for a, b in (("failed", "refused"), ("failed", "invalid"), ("refused", "invalid")):
        apart = abs(hues[a] - hues[b]) % 360
        assert min(apart, 360 - apart) >= 50, (a, b, hues)
    assert len({signs[o] for o in ("failed", "refused", "invalid")}) == 3, signs


def _hue(css: str) -> float:
    """The hue, in degrees, of a computed colour ``rgb(r, g, b)``."""
    import colorsys

    r, g, b = (int(v) / 255 for v in css[css.index("(") + 1 : css.index(")")].split(",")[:3])
    return colorsys.rgb_to_hsv(r, g, b)[0] * 360


# Every text colour inside ``scope`` (the folded code, or the whole page), against its background: (element,
# ratio) below 4.5:1.
_LOW_CONTRAST_JS = """
(scope) => {
  function lum(c){const m=c.match(/[\\d.]+/g).map(Number);const [r,g,b]=m.slice(0,3).map(v=>{v/=255;return v<=0.03928?v/12.92:Math.pow((v+0.055)/1.055,2.4)});return 0.2126*r+0.7152*g+0.0722*b}
  function bg(e){while(e){const c=getComputedStyle(e).backgroundColor; if(c && !c.startsWith('rgba(0, 0, 0, 0)') && c!=='transparent') return c; e=e.parentElement} return 'rgb(255, 255, 255)'}
  document.querySelectorAll('details').forEach(d => d.open = true);
  const out = {};
  for (const e of document.querySelectorAll(scope)) {
    if (!e.childNodes.length || ![...e.childNodes].some(n => n.nodeType===3 && n.textContent.trim())) continue;
    const fg = getComputedStyle(e).color, b = bg(e);
    const l1 = lum(fg), l2 = lum(b); const ratio = (Math.max(l1,l2)+0.05)/(Math.min(l1,l2)+0.05);
    if (ratio < 4.5) { const k = e.tagName+'.'+e.className+' '+fg+' on '+b; out[k] = ratio.toFixed(2); }
  }
  return out;
}
"""


def test_the_folded_code_reads_at_4_5_to_1_or_more(recorded_runs, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    out = tmp_path / "report"
    assert _report(copy_of_records(recorded_runs, tmp_path), "--out", str(out)).returncode == 0
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        for html in sorted((out / "runs").glob("*.html")):
            page.goto(html.as_uri())
            assert page.evaluate(_LOW_CONTRAST_JS, "details.opslib-code *, details.opslib-code") == {}, html.name
        browser.close()


def test_every_colour_of_every_page_reads_at_4_5_to_1_or_more(recorded_runs, tmp_path):
    """The index, the summary and each run page (the failed deploy's papermill exception heading included),
    every text against its background, in Chromium."""
    sync_api = pytest.importorskip("playwright.sync_api")
    out = tmp_path / "report"
    assert _report(copy_of_records(recorded_runs, tmp_path), "--out", str(out)).returncode == 0
    pages = [out / "index.html", out / "summary.html", *sorted((out / "runs").glob("*.html"))]
    assert any("An Exception was encountered" in p.read_text() for p in pages)  # papermill's red heading is here
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        for html in pages:
            page.goto(html.as_uri())
            assert page.evaluate(_LOW_CONTRAST_JS, "body, body *") == {}, html.name
        browser.close()


def _inodes(site: Path) -> dict[str, int]:
    return {p.name: p.lstat().st_ino for p in (site / "runs").glob("*.html")}


def _page_number(site: Path, stem: str) -> str:
    (page,) = (site / "runs").glob(f"*-{stem}.html")
    return page.name.split("-", 1)[0]


def test_a_rebuild_renders_only_the_new_run_and_the_edited_one(recorded_runs, database_url, tmp_path):
    copy = copy_of_records(recorded_runs, tmp_path)
    out, before = tmp_path / "report", tmp_path / "before"

    def build(expected_rendered: int, expected_pages: int, *args: str) -> set[str]:
        """Build, and return the names of the pages this build rendered. The pages of the last build stay
        alive under ``before`` (hard links), so that a kept page is known by its inode: only a page
        rendered again gets a new file."""
        shutil.rmtree(before, ignore_errors=True)
        if out.exists():
            shutil.copytree(out, before, copy_function=os.link, symlinks=True)
        made = _report(copy, "--out", str(out), *args)
        assert made.returncode in (0, 3), made.stderr
        assert f"{expected_pages} run page(s) in {out} ({expected_rendered} rendered" in made.stdout, made.stdout
        now = _inodes(out)
        assert len(now) == expected_pages
        old = _inodes(before) if before.exists() else {}
        fresh = {name for name, ino in now.items() if old.get(name) != ino}
        assert len(fresh) == expected_rendered
        return fresh

    first = build(4, 4)
    assert build(0, 4) == set()  # nothing new: no page rendered, the index written afresh
    from .conftest import _opslib_run

    assert _opslib_run(database_url, copy, "deploy") == 0
    (newest,) = build(1, 5)
    assert newest not in first and "succeeded" in (out / "runs" / newest).read_text()

    # An edited sidecar changes what its page shows: that page alone is rendered again, and says so.
    edited = sorted(p for p in (copy / "records").glob("*.json") if p.name != "ledger.jsonl")[0]
    edited.write_text(edited.read_text().replace('"operator": "', '"operator": "x'))
    page = f"{_page_number(out, edited.stem)}-{edited.stem}.html"
    assert build(1, 5) == {page}
    assert "from the edited file" in (out / "runs" / page).read_text()
    assert "was modified" in (out / "index.html").read_text()
    edited.write_text(edited.read_text().replace('"operator": "x', '"operator": "'))
    build(1, 5)

    # A kept page is reused only as it was written: one edited in the site, or one made a link to a file
    # elsewhere, is rendered again.
    kept = sorted((out / "runs").glob("*.html"))
    kept[0].write_text(kept[0].read_text() + "<p>checked by nobody</p>")
    elsewhere = tmp_path / "elsewhere.html"
    shutil.copyfile(kept[1], elsewhere)
    kept[1].unlink()
    kept[1].symlink_to(elsewhere)
    assert build(2, 5) == {kept[0].name, kept[1].name}
    assert "checked by nobody" not in kept[0].read_text() and not kept[1].is_symlink()
    assert build(5, 5, "--full") == set(_inodes(out))  # --full renders every page

    # A report written by another opslib (its state says so) is rendered whole.
    state = json.loads((out / ".opslib-report-state.json").read_text())
    (out / ".opslib-report-state.json").write_text(json.dumps({**state, "versions": "an older opslib"}))
    build(5, 5)
