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
