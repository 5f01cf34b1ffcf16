"""Settings from the environment: defaults, validation, and a repr without secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from opslib import db
from opslib.config import load_settings
from opslib.errors import ConfigError


def test_defaults_follow_the_contract():
    s = load_settings({})
    assert s.database_url is None and s.uses_embedded
    assert (s.env, s.alembic_ini, s.records_dir, s.backups_dir) == (
        "development",
        Path("alembic.ini"),
        Path("records"),
        Path("backups"),
    )
    assert s.operator


def test_values_are_read_and_checked():
    s = load_settings(
        {"OPSLIB_ENV": "production", "OPSLIB_OPERATOR": "ana", "OPSLIB_ALEMBIC_INI": "x/alembic.ini"}
    )
    assert (s.env, s.operator, s.alembic_ini) == ("production", "ana", Path("x/alembic.ini"))
    with pytest.raises(ConfigError, match="OPSLIB_ENV must be one of"):
        load_settings({"OPSLIB_ENV": "prod"})
    with pytest.raises(ConfigError, match="OPSLIB_LOCK_TIMEOUT"):
        load_settings({"OPSLIB_LOCK_TIMEOUT": "-1"})


def test_repr_and_redaction_hide_the_password():
    s = load_settings({"DATABASE_URL": "postgresql://app:hunter2@db.example:5432/shop"})
    assert "hunter2" not in repr(s) and "app:***@db.example:5432/shop" in repr(s)
    assert db.redact_url("postgresql://app:hunter2@h/d") == "postgresql://app:***@h/d"
    assert "hunter2" not in db.scrub("password hunter2 rejected", db.parse_url("postgresql://a:hunter2@h/d"))
    text = (
        "from postgresql+psycopg2://app:hunter2@h:5/d and redis://:hunter2@r/0, not https://docs.example/a@b"
    )
    assert db.redact_urls_in(text) == (
        "from postgresql+psycopg2://app:***@h:5/d and redis://:***@r/0, not https://docs.example/a@b"
    )


def test_parse_url_names_psycopg2():
    assert db.parse_url("postgresql://a@h/d").drivername == "postgresql+psycopg2"
    assert db.parse_url("postgres://a@h/d").drivername == "postgresql+psycopg2"
