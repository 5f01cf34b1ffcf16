"""The sample application's Alembic environment: SQLAlchemy models and the migration chain."""
