"""Passwords out of everything shown: URLs, free text, conninfo strings and notebooks (no PostgreSQL needed)."""

from __future__ import annotations

import copy
import json

import nbformat
import pytest
import sqlalchemy as sa

from opslib import audit, params, redact, workflows


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
    text = json.dumps(
        [c.source for c in read.cells] + [o.get("text", o.get("evalue")) for o in read.cells[1].outputs]
    )
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


# --- redact_url and redact_urls_in: the query password, raw and percent-encoded, and conninfo ---


def test_a_percent_encoded_query_password_is_masked_whole_in_free_text():
    text = "connect to postgresql+psycopg2://u@h/db?sslmode=require&password=s3cr%40t%2Fx failed"
    clean = redact.redact_urls_in(text)
    assert clean == "connect to postgresql+psycopg2://u@h/db?sslmode=require&password=*** failed"
    assert redact.redact_url("postgresql://u@h/db?password=s3cr%40t&sslpassword=k") == (
        "postgresql://u@h/db?password=***&sslpassword=***"
    )


@pytest.mark.parametrize(
    "text, clean",
    [
        ("host=h password=xyz dbname=d", "host=h password=*** dbname=d"),
        ("host=h password = 'a b\\'c' port=5432", "host=h password = *** port=5432"),
        ("password=xyz", "password=***"),
        ("dsn: 'host=h sslpassword=k'", "dsn: 'host=h sslpassword=***'"),
        ("<pre>password=xyz</pre>", "<pre>password=***</pre>"),  # a report page stays HTML
        (
            "a password is needed; db?password=&sslmode=require",
            "a password is needed; db?password=&sslmode=require",
        ),
    ],
)
def test_a_conninfo_password_is_masked(text, clean):
    assert redact.redact_urls_in(text) == clean


def test_a_password_shown_decoded_in_a_url_is_masked_whole():
    clean = redact.redact_urls_in("cannot migrate postgresql://u:Env-py@Leak/9x@localhost:5432/db (decoded)")
    assert clean == "cannot migrate postgresql://u:***@localhost:5432/db (decoded)"


# --- scrub and scrub_password: one implementation ---


def test_scrub_password_removes_a_query_password_raw_and_encoded():
    url = "postgresql+psycopg2://u@h/db?sslmode=require&password=p%2Fw%40x"
    said = "password p/w@x, quoted p%2Fw%40x, in a query password=p%2Fw%40x; sslmode=require kept"
    clean = redact.scrub_password(said, url)
    assert "p/w@x" not in clean and "p%2Fw%40x" not in clean
    assert clean == "password ***, quoted ***, in a query password=***; sslmode=require kept"
    assert redact.scrub(said, url) == clean  # the same function, whichever name
    assert redact.scrub(said, None) == said


def test_a_password_with_a_slash_is_found_as_sqlalchemy_reads_the_url():
    # urlsplit ends the host at the first "/" and finds no password; the connection (SQLAlchemy) uses "a/b".
    assert redact.scrub_password("bad password a/b", "postgresql://u:a/b@h/d") == "bad password ***"


# --- scrub_json: strings scrubbed, structure never touched ---


def _shape(value):
    """A JSON value's structure: its keys, lengths and non-string leaves, every string replaced by str."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return str if isinstance(value, str) else value


def _notebook_json(url: str) -> dict:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Deploy source 1"),
        nbformat.v4.new_code_cell(f"url = {url!r}", execution_count=1, outputs=[
            nbformat.v4.new_output("stream", name="stdout", text=f"connecting to {url}\n"),
            nbformat.v4.new_output("execute_result", data={"text/plain": f"'{url}'"}, execution_count=1),
            nbformat.v4.new_output("error", ename="OperationalError", evalue=f"bad {url}", traceback=[url]),
        ]),
    ]  # fmt: skip
    nb.cells[1].metadata["tags"] = ["parameters"]
    return json.loads(nbformat.writes(nb))


@pytest.mark.parametrize("password", ["1", "e", "source", "cell_type", "python3"])
def test_scrub_json_keeps_a_notebook_whole_whatever_the_password(password):
    url = f"postgresql://u:{password}@h/d?password={password}"
    notebook = _notebook_json(url)
    given = copy.deepcopy(notebook)
    scrubbed = redact.scrub_json(notebook, url)
    assert _shape(scrubbed) == _shape(notebook)  # same keys, lengths, numbers
    assert scrubbed["cells"][0]["cell_type"] == "markdown" and scrubbed["cells"][1]["cell_type"] == "code"
    outputs = scrubbed["cells"][1]["outputs"]
    assert [o["output_type"] for o in outputs] == ["stream", "execute_result", "error"]
    assert outputs[0]["name"] == "stdout" and scrubbed["metadata"]["kernelspec"]["name"] == "python3"
    assert scrubbed["cells"][1]["metadata"]["tags"] == ["parameters"]
    nbformat.validate(nbformat.from_dict(scrubbed))
    text = json.dumps(
        [scrubbed["cells"][1]["source"], outputs[0]["text"], outputs[1]["data"], outputs[2]["evalue"]]
    )
    assert f"u:{password}@" not in text and f"password={password}" not in text
    assert "u:***@h/d?password=***" in text
    assert notebook == given  # a copy: the value given is left as it was


def test_scrub_json_scrubs_the_literal_password_in_values_only():
    value = {"source": ["said source", 1, None, True], "e": "eee", "postgresql://u:pw@h/d": 2.5}
    scrubbed = redact.scrub_json(value, "postgresql://u:source@h/d", keep=frozenset())
    assert scrubbed == {"source": ["said ***", 1, None, True], "e": "eee", "postgresql://u:***@h/d": 2.5}
    assert redact.scrub_json(value, None, keep=frozenset())["source"] == ["said source", 1, None, True]
    # keep spares the values under those keys from the literal password, not from redact_urls_in
    kept = redact.scrub_json(
        {"name": "source postgresql://u:x@h", "text": "source"}, "postgresql://u:source@h/d"
    )
    assert kept == {"name": "source postgresql://u:***@h", "text": "***"}


def test_scrub_json_without_keep_would_break_a_notebook():
    # Why NOTEBOOK_STRUCTURE is the default: an enumerated value holding the password.
    notebook = _notebook_json("postgresql://u:e@h/d")
    broken = redact.scrub_json(notebook, "postgresql://u:e@h/d", keep=frozenset())
    assert broken["cells"][1]["outputs"][1]["output_type"] != "execute_result"
    with pytest.raises(nbformat.ValidationError):
        nbformat.validate(nbformat.from_dict(broken))


# --- params: a parameter holding a password is refused, naming it, never showing it ---


@pytest.mark.parametrize(
    "value, secret",
    [
        ("postgresql+psycopg2://u@h/db?password=s3cr%40t", True),
        ("postgresql://u@h/db?sslpassword=k", True),
        ("postgresql://u:Env-py@Leak/9x@h/d", True),
        (["head", "postgresql://u@h/db?password=x"], True),
        ({"url": "host=h password=x"}, True),
        ("postgresql://u@h/db?password=", False),
        ("postgresql://u@h:5432/db", False),
        (["head", 42, None], False),
        ("the password=== separator", False),
    ],
)
def test_a_password_in_a_query_or_a_container_is_recognised(value, secret):
    assert params.holds_secret(value) is secret


def test_a_parameter_with_a_query_password_is_refused_without_showing_it():
    from opslib.errors import InvalidInput

    with pytest.raises(InvalidInput) as raised:
        params.validate("deploy", workflows.get("deploy").parameters, {"target_revision": "postgresql://u@h/db?password=s3cr%40t"})
    assert "target_revision" in str(raised.value) and "s3cr" not in str(raised.value)
    params.refuse_secrets("deploy", {"target_revision": "postgresql://u@h/db?sslmode=require"})  # no error
    assert params.shown_value(["postgresql://u@h/db?password=x"]) == "(not kept: it holds a password)"


def test_clean_removes_a_remembered_password_in_every_form_and_a_stream_line_by_line(monkeypatch):
    from urllib.parse import quote

    from opslib import redact

    monkeypatch.setattr(redact, "_KNOWN", set())  # this process's secrets: not left to later tests

    secret = "Zq%2F@:!k3yF0rm"
    redact.remember_secrets(f"postgresql://u:{quote(secret, safe='')}@h/db")
    once = quote(secret, safe="")
    for shown in (secret, "Zq/@:!k3yF0rm", once, quote(once, safe=""), f"password='{secret}'", f"password={once}"):
        assert "k3yF0rm" not in redact.clean(f"before {shown} after"), shown
    digest = "ab" * 32
    assert redact.clean_json({"sha256": digest, "label": secret}, frozenset({"label"})) == {
        "sha256": digest,
        "label": "***",
    }

    import io

    out = io.StringIO()
    stream = redact.CleanStream(out)
    stream.write("first Zq%2F@:")  # a password split across two writes is still found whole
    assert out.getvalue() == ""
    stream.write("!k3yF0rm end\nrest")
    assert out.getvalue() == "first *** end\n"
    stream.flush()
    assert out.getvalue() == "first *** end\nrest"


def test_a_common_word_or_short_password_leaves_a_records_names_ids_and_revisions_as_they_are(monkeypatch):
    """The very common postgres:postgres@…/postgres, and a two-character password inside a revision id:
    names, ids and revisions keep their values (readers match on them); free text loses the password."""
    from opslib import audit, redact

    monkeypatch.setattr(redact, "_KNOWN", set())
    redact.remember_secrets("postgresql://postgres:postgres@db.example/postgres")
    redact.remember_secrets("postgresql://app:a1@db.example/shop")
    record = {
        "operator": "postgres",
        "database": {"name": "postgres", "host": "db.example"},
        "revisions_after": ["3a1f0c2b9d4e"],
        "steps": [{"name": "upgrade 3a1f0c2b9d4e", "outcome": "failed", "error": "role postgres said postgres"}],
        "checks": [{"name": "database reachable", "status": "pass", "detail": "password postgres accepted"}],
        "error": "upgrade failed: the URL was postgresql://app:a1@db.example/shop",
    }
    clean = redact.clean_json(record, audit.RECORD_FREE_TEXT, audit.RECORD_NAMES)
    assert clean["operator"] == "postgres" and clean["database"] == record["database"]
    assert clean["revisions_after"] == ["3a1f0c2b9d4e"] and clean["steps"][0]["name"] == "upgrade 3a1f0c2b9d4e"
    assert clean["steps"][0]["error"] == "role *** said ***"
    assert clean["checks"][0] == {"name": "database reachable", "status": "pass", "detail": "password *** accepted"}
    # Free text loses the common word wherever it is: the price of a password that is one.
    assert clean["error"] == "upgrade failed: the URL was ***ql://app:***@db.example/shop"
    assert redact.clean('{"revisions": ["3a1f0c2b9d4e"], "count": 1}') == '{"revisions": ["3a1f0c2b9d4e"], "count": 1}'
