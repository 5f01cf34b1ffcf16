"""opslib: operations runbooks for PostgreSQL databases whose schema is managed by Alembic.

All decisions live in this package; the CLI (``opslib``) and the runbooks in ``runbooks/`` are
front ends that call it and render what it returns.
"""

__version__ = "0.1.0"
