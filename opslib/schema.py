"""A database's schema as objects (kind and name -> definition), and a fingerprint of it: what a rehearsal
compares between passes, and what a recovery to a restore point is checked against."""

from __future__ import annotations

import hashlib
import json

import sqlalchemy as sa
from sqlalchemy.engine import Connection

_SCHEMA_OBJECTS = {
    "table": "SELECT n.nspname || '.' || c.relname, c.relkind::text FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p', 'm', 'v', 'f')",
    "column": "SELECT n.nspname || '.' || c.relname || '.' || a.attname, format_type(a.atttypid, a.atttypmod) "
    "|| CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END || coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '') "
    "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
    "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
    "WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'm', 'v', 'f')",
    "index": "SELECT schemaname || '.' || indexname, indexdef FROM pg_indexes",
    "constraint": "SELECT n.nspname || '.' || c.relname || '.' || k.conname, pg_get_constraintdef(k.oid) "
    "FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace",
    "sequence": "SELECT n.nspname || '.' || c.relname, 'sequence' FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'S'",
    "type": "SELECT n.nspname || '.' || t.typname, t.typtype::text || coalesce(': ' || (SELECT string_agg(e.enumlabel, ', ' "
    "ORDER BY e.enumsortorder) FROM pg_enum e WHERE e.enumtypid = t.oid), '') FROM pg_type t "
    "JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.typtype IN ('e', 'd', 'r', 'm') "
    "OR (t.typtype = 'c' AND (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c')",
    "function": "SELECT n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')', "
    "md5(pg_get_functiondef(p.oid)) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
    "WHERE p.prokind IN ('f', 'p') AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid "
    "AND d.deptype = 'e')",
    "trigger": "SELECT n.nspname || '.' || c.relname || '.' || t.tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t "
    "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace WHERE NOT t.tgisinternal",
    "extension": "SELECT 'extension.' || extname, extversion FROM pg_extension",
}


_NOT_THE_SCHEMA = ("pg_catalog", "information_schema", "opslib")  # the system's, and opslib's own history


def objects(conn: Connection, version_table: tuple[str | None, str]) -> dict[str, str]:
    """The database's schema as ``"<kind> <schema.name>" -> definition``: tables, columns, indexes,
    constraints, sequences, types, functions, triggers and extensions; not the system's, not opslib's own
    history, not the project's version table."""
    objects = {}
    version = f"{version_table[0] or 'public'}.{version_table[1]}"
    for kind, query in _SCHEMA_OBJECTS.items():
        for name, definition in conn.execute(sa.text(query)):
            schema = name.split(".", 1)[0]
            if kind != "extension" and (schema in _NOT_THE_SCHEMA or schema.startswith("pg_")):
                continue
            if name == version or name.startswith(version + "."):
                continue
            objects[f"{kind} {name}"] = definition
    return objects


def fingerprint(conn: Connection, version_table: tuple[str | None, str]) -> str:
    """A sha256 of :func:`objects`: equal for two databases whose schemas are the same."""
    text = json.dumps(sorted(objects(conn, version_table).items()))
    return hashlib.sha256(text.encode()).hexdigest()
