"""The guide's environment-specific migrations: ``alembic upgrade head -x dev_data=true``.

Revisions call :func:`requested` to decide whether to load development sample data; schema changes
always apply. Any value other than true/false is refused, so a typo cannot silently skip the data
(the guide's ``.get('dev_data', False)`` would treat the string "false" as true).
"""

from __future__ import annotations

from alembic import context
from alembic.util import CommandError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def requested() -> bool:
    """Whether ``-x dev_data=true`` was given on this Alembic run."""
    value = context.get_x_argument(as_dictionary=True).get("dev_data", "false").strip().lower()
    if value not in _TRUE | _FALSE:
        # CommandError is Alembic's error for bad user input: callers report it as such.
        raise CommandError(f"-x dev_data must be true or false, not {value!r}")
    return value in _TRUE
