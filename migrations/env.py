"""Alembic environment of the sample application.

- The URL comes from ``DATABASE_URL`` (never from alembic.ini), or a caller such as opslib or
  pytest-alembic hands an open connection (or an engine) in ``config.attributes["connection"]``.
- ``transaction_per_migration=True``: each revision commits on its own, so a failure at revision N
  leaves the database at N-1 instead of rolling every pending revision back to where it started.
- ``-x dev_data=true`` asks revisions to load development sample data (see ``migrations/dev_data.py``).
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Connection, Engine

from migrations import dev_data
from migrations.models import Base

config = context.config

# A caller that configures logging itself (opslib, pytest) sets configure_logger=False.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _database_url() -> str:
    """The URL to migrate: sqlalchemy.url when a caller set it in memory, else DATABASE_URL."""
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL")
    if not url:
        raise RuntimeError("DATABASE_URL is not set: export the URL of the database to migrate")
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; this project installs psycopg2.
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        transaction_per_migration=True,
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade A:B --sql``) without connecting."""
    _configure(url=_database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    dev_data.requested()  # refuse a bad -x value before anything runs
    with context.begin_transaction():
        context.run_migrations()


def _run_online(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate over the connection (or engine) handed in, or one opened from DATABASE_URL."""
    dev_data.requested()  # refuse a bad -x value before anything runs
    handed = config.attributes.get("connection")
    if isinstance(handed, Connection):
        _run_online(handed)
        return
    engine = handed if isinstance(handed, Engine) else create_engine(_database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        _run_online(connection)
    if handed is None:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
