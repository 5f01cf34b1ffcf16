"""The sample application's chain: pytest-alembic's built-in tests, and the guide's workflows."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from pytest_alembic import Config as PytestAlembicConfig
from pytest_alembic.tests import (  # noqa: F401  (collected as tests of this module)
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)

from opslib import db, migrate
from opslib.errors import InvalidInput, MigrationFailed

from .conftest import ROOT, query, schema_snapshot


@pytest.fixture
def alembic_config():
    """pytest-alembic: the sample application's alembic.ini."""
    return PytestAlembicConfig(config_options={"file": str(ROOT / "alembic.ini")})


@pytest.fixture
def alembic_engine(database_url):
    """pytest-alembic: this test's own database."""
    engine = sa.create_engine(db.parse_url(database_url), poolclass=sa.pool.NullPool)
    yield engine
    engine.dispose()


def test_chain_has_at_least_six_revisions_with_descriptive_names(settings):
    revisions = migrate.history(settings)
    assert len(revisions) >= 6
    for r in revisions:
        assert len(r.message.split()) >= 3, r
        assert r.path.endswith(".py") and r.revision in r.path


def test_every_downgrade_restores_the_previous_schema(settings):
    """Walking up then down one step at a time returns exactly the schema seen on the way up."""
    seen = [schema_snapshot(settings.database_url)]
    for _ in migrate.history(settings):
        migrate.upgrade(settings, "+1")
        seen.append(schema_snapshot(settings.database_url))
    for expected in reversed(seen[:-1]):
        migrate.downgrade(settings, "-1")
        assert schema_snapshot(settings.database_url)[:2] == expected[:2]
    assert migrate.status(settings).current == ()


def test_dev_data_is_loaded_only_when_asked(settings, make_database):
    migrate.upgrade(settings, "head")
    assert query(settings.database_url, "SELECT count(*) FROM users")[0][0] == 0
    dev = settings.__class__(**{**settings.__dict__, "database_url": make_database()})
    migrate.upgrade(dev, "head", x_args=["dev_data=true"])
    assert query(dev.database_url, "SELECT count(*) FROM users")[0][0] == 2
    assert query(dev.database_url, "SELECT sum(normalized_price) FROM products")[0][0] == 33.5


def test_a_bad_dev_data_value_is_refused_and_changes_nothing(settings):
    with pytest.raises(InvalidInput, match="dev_data must be true or false"):
        migrate.upgrade(settings, "head", x_args=["dev_data=maybe"])
    assert migrate.status(settings).current == ()
    assert schema_snapshot(settings.database_url)[0] == []


def test_email_change_keeps_every_address_both_ways(settings):
    migrate.upgrade(settings, "0004")
    query(
        settings.database_url,
        "INSERT INTO users (email, username, hashed_password) VALUES ('a@x.org', 'a', '!'), ('b@x.org', 'b', '!')",
    )
    migrate.upgrade(settings, "head")
    assert query(settings.database_url, "SELECT email FROM users ORDER BY 1") == [("a@x.org",), ("b@x.org",)]
    migrate.downgrade(settings, "0004")
    assert query(settings.database_url, "SELECT email FROM users ORDER BY 1") == [("a@x.org",), ("b@x.org",)]


def test_unconvertible_price_stops_at_the_revision_before_normalized_price(settings):
    migrate.upgrade(settings, "0003")
    query(
        settings.database_url,
        "INSERT INTO products (marketplace, shop_name, title, price) VALUES ('m', 's', 't', 'N/A')",
    )
    with pytest.raises(MigrationFailed, match="at revision 0004") as err:
        migrate.upgrade(settings, "head")
    assert err.value.revisions == ("0003",)
    assert migrate.status(settings).current == ("0003",)
