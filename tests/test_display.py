"""How a runbook step reads in JupyterLab (no PostgreSQL needed): text left-aligned and wrapped, outcomes in
colour with their word, SQL monospace with at most one blank line between statements."""

from __future__ import annotations

from opslib.display import Section, tidy_sql


def test_sql_has_at_most_one_blank_line_between_statements():
    sql = "BEGIN;   \n\n\n\nCREATE TABLE a (id int);\n\n\n\nCOMMIT;\n\n"
    assert tidy_sql(sql) == "BEGIN;\n\nCREATE TABLE a (id int);\n\nCOMMIT;"
    section = Section("Preflight", "checks passed", text=sql)
    assert "CREATE TABLE a (id int);\n\nCOMMIT;" in repr(section)
    assert "font-family:var(--jp-code-font-family, monospace)" in section._repr_html_()


def test_results_keep_their_word_and_get_a_colour():
    rows = [
        {"check": "lint", "result": "fail", "detail": "x" * 900},
        {"check": "heads", "result": "pass", "detail": "one head"},
        {"check": "drift", "result": "warn", "detail": "models differ"},
    ]
    page = Section("Preflight", "pre-deploy checks failed", rows=rows)._repr_html_()
    assert "<span style='color:#a40e26; font-weight:600'>fail</span>" in page
    assert "<span style='color:#116329; font-weight:600'>pass</span>" in page
    assert "<span style='color:#7d4e00; font-weight:600'>warn</span>" in page
    # Text cells are left-aligned and wrap: a 900-character finding is a paragraph, not one line.
    assert page.count("text-align:left") == 3 + 3 * 3 and "white-space:pre-wrap" in page
    assert "max-width:80ch" in page
    assert ">one head<" in page  # a value that is not a result is plain text


def _finding(severity, revision="a1", rule="adding-required-field", **kw):
    from opslib.lint import Finding, Severity

    values = dict(message="Adding a `NOT NULL` column makes it required.", line=3, table="accounts", rows="1 row",
                  size="32.0 kB", help="Make the field nullable or add a non-VOLATILE DEFAULT")  # fmt: skip
    values.update(kw)
    return Finding(revision, rule, severity=Severity(severity), **values)


def test_findings_are_a_table_with_what_to_do_and_the_accepted_ones_folded_under_a_count():
    findings = [
        _finding("block"),
        _finding("block"),  # the same finding on a second statement: one row
        _finding("warn", rule="prefer-bigint-over-int", message="Using 32-bit `int`", help=""),
        _finding("info", rule="prefer-robust-stmts"),
        *[_finding("accepted", revision=f"b{n}", reason=f"reason {n} (accepted in opslib.toml)") for n in range(9)],
    ]
    from opslib.display import findings_tables

    acting, accepted = findings_tables(findings)
    assert acting.title == "Findings: 1 blocking, 1 advice" and not acting.folded
    (block, warn) = acting.rows
    assert (block["verdict"], block["revision"], block["rule"], block["table"], block["rows"], block["size"]) == (
        "blocks", "a1", "adding-required-field", "accounts", "1 row", "32.0 kB"
    )
    assert block["what to do"] == (
        "Make the field nullable or add a non-VOLATILE DEFAULT. Or accept it: "
        "`# opslib-accept: adding-required-field -- why it is safe here` in revision a1's file"
    )
    assert warn["verdict"] == "advice" and warn["what to do"] == "advice only: nothing blocks"
    assert accepted.folded and accepted.title.startswith("9 accepted finding(s)") and len(accepted.rows) == 9
    assert accepted.rows[0]["what to do"] == "accepted: reason 0 (accepted in opslib.toml)"

    page = Section("Preflight", "refused: squawk lint failed", tables=[acting, accepted])._repr_html_()
    # squawk's markdown is rendered: code spans, never literal backticks.
    assert "Adding a <code>NOT NULL</code> column" in page and "`" not in page
    assert "<code># opslib-accept: adding-required-field -- why it is safe here</code>" in page
    # The accepted ones fold under their count; the verdicts keep their word and colour.
    assert page.count("<details>") == 1 and "<summary>9 accepted finding(s)" in page
    assert "<span style='color:#a40e26; font-weight:600'>blocks</span>" in page
    text = repr(Section("Preflight", "refused", tables=[acting, accepted]))
    assert "Findings: 1 blocking, 1 advice" in text and "b8" in text  # a terminal folds nothing
    assert findings_tables([_finding("info")]) == []  # information is only counted, in the lint check
