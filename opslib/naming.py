"""Revision messages: the guide's rule (name what the change does, never ``update_database``), and how
one line of a message is shown."""

from __future__ import annotations

import re

# The guide's "avoid vague names": messages made only of these words say nothing about the change.
_VAGUE = {
    "update", "updates", "fix", "fixes", "change", "changes", "stuff", "misc", "database", "db", "schema",
    "tables", "table", "things", "wip", "temp", "tmp", "test", "migration", "migrations", "new", "more", "some",
    "empty", "message", "text",  # Flask-Migrate's default message is "empty message"
    "add", "column", "columns", "index", "indexes", "field", "fields",  # "Add column": which, where?
}  # fmt: skip


def vague_message(message: str) -> str | None:
    """Why a revision message is too vague to name a migration (the guide's `update_database`, `fix_stuff`), or None."""
    words = [w for w in re.split(r"[^a-z0-9]+", message.lower()) if w]
    if not words:
        return "it is empty"
    if all(w in _VAGUE for w in words):
        return f"{message!r} says nothing about the change: name what it does, e.g. add_user_profile_table"
    if len(words) < 2:
        return f"{message!r} is one word: say what changes and where, e.g. add_indexes_for_search_performance"
    return None


def first_line(message: str | None) -> str:
    """A revision message as a table or a one-line listing shows it: its first line.

    ``alembic revision -m`` with a message of several lines writes them all at the top of the docstring,
    and Alembic's ``Script.doc`` returns them all; one line keeps the tables whole. The whole text stays
    in `opslib show REV` and `opslib history --verbose`.
    """
    lines = (message or "").strip().splitlines()
    return lines[0].strip() if lines else ""
