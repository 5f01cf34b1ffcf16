"""Passwords out of everything shown: URLs, free text, conninfo strings and notebooks (no PostgreSQL needed)."""

from __future__ import annotations

import json

import nbformat
import pytest
import sqlalchemy as sa

from opslib import audit, params, redact


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://u@h/db?password=s3cr%40t", "postgresql://u@h/db?password=***"),
        ("postgresql+psycopg2://u:p%2Fw@h/db?password=xyz&sslmode=require",
         "postgresql+psycopg2://u:***@h/db?password=***&sslmode=require"),
        ("postgresql://u@h/db?sslmode=require", "postgresql://u@h/db?sslmode=require"),
    ],
)  # fmt: skip
def test_a_url_is_shown_without_its_passwords(url, shown):
    assert redact.redact_url(url) == shown


def test_passwords_in_free_text_are_masked():
    text = (
        "cannot connect to postgresql://u@h/db?sslmode=require&password=xyz&x=1; "
        "conninfo host=h password='a b' dbname=d, then PASSWORD=zz and postgresql://u:pw@h/d"
    )
    clean = redact.redact_urls_in(text)
    for secret in ("xyz", "'a b'", "zz", ":pw@"):
        assert secret not in clean
    assert "sslmode=require&password=***&x=1" in clean and "dbname=d" in clean


def test_a_query_password_is_scrubbed_raw_and_percent_encoded():
    url = "postgresql://u@h/db?password=s3cr%40t"
    assert redact.scrub("said s3cr@t, then s3cr%40t", url) == "said ***, then ***"
    as_url = sa.make_url("postgresql://u:p%2Fw@h/db?password=q%2Bq")
    assert redact.scrub("p/w p%2Fw q+q q%2Bq", as_url) == "*** *** *** ***"
    assert redact.scrub_password("s3cr@t", url) == "***"


@pytest.mark.parametrize("password", ["e", "1", "source", "cell_type"])
def test_a_scrubbed_notebook_stays_a_valid_notebook_whatever_the_password(tmp_path, password):
    url = f"postgresql://u:{password}@h/d"
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Deploy"),
        nbformat.v4.new_code_cell(f"url = {url!r}", outputs=[
            nbformat.v4.new_output("stream", name="stdout", text=f"connecting to {url}\n"),
            nbformat.v4.new_output("error", ename="OperationalError", evalue=f"bad {url}", traceback=[url]),
        ]),
    ]  # fmt: skip
    path = tmp_path / "run.ipynb"
    nbformat.write(nb, path)
    audit.scrub_notebook(path, url)
    read = nbformat.read(path, as_version=4)
    nbformat.validate(read)
    assert [c.cell_type for c in read.cells] == ["markdown", "code"]
    assert [o.output_type for o in read.cells[1].outputs] == ["stream", "error"]
    text = json.dumps([c.source for c in read.cells] + [o.get("text", o.get("evalue")) for o in read.cells[1].outputs])
    assert f"u:{password}@" not in text and "u:***@h/d" in text


@pytest.mark.parametrize(
    "value, secret",
    [
        ("postgresql://u@h/db?password=x", True),
        ("postgresql://u@h/db?sslmode=require&password=x", True),
        ("host=h password=x dbname=d", True),
        ("postgresql://u:p@h/d", True),
        ("postgresql://u@h/db?sslmode=require", False),
        ("a password is needed", False),
        ("0042", False),
    ],
)
def test_a_parameter_holding_a_password_is_recognised(value, secret):
    assert params.holds_secret(value) is secret
