"""The lint's reading of rendered SQL (statements, revisions, tables the plan creates), with the real squawk; no server."""

from __future__ import annotations

from opslib import lint

SQL = """BEGIN;

CREATE TABLE alembic_version (
    version_num VARCHAR(32) NOT NULL
);

-- Running upgrade  -> a1
CREATE TABLE orders (id SERIAL NOT NULL, note TEXT DEFAULT 'a;b', PRIMARY KEY (id));

CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN NEW.note := 'x;y'; RETURN NEW; END $body$;

-- Running upgrade a1 -> b2
ALTER TABLE orders ADD COLUMN region TEXT NOT NULL;

CREATE INDEX ix_orders_region ON orders (region);

ALTER TABLE "Customers" ADD COLUMN vip BOOLEAN NOT NULL;

CREATE INDEX ix_vip ON "Customers" (vip);

-- Running upgrade b2 -> c3
ALTER TABLE orders RENAME TO purchases;

DROP INDEX ix_orders_region;

ALTER TABLE public.purchases ALTER COLUMN region TYPE VARCHAR(20);

COMMIT;
"""


def test_statements_split_on_semicolons_outside_quotes_and_carry_their_revision():
    found = lint.statements(SQL)
    texts = [s.text.split()[0:3] for s in found]
    assert texts[0] == ["BEGIN"]
    assert [s.revision for s in found] == [
        "(version table)", "(version table)", "a1", "a1", "b2", "b2", "b2", "b2", "c3", "c3", "c3", "c3",
    ]  # fmt: skip
    function = found[3]
    assert function.text.startswith("CREATE FUNCTION") and "'x;y'; RETURN NEW; END $body$" in function.text
    assert found[2].first_line == 7  # 0-based, as squawk counts


def test_the_walk_knows_which_tables_the_plan_created_before_each_statement():
    stmts = lint.statements(SQL)
    walk = lint._Walk(stmts)

    def at(start: str) -> int:
        return next(k for k, s in enumerate(stmts) if s.text.startswith(start))

    add = at("ALTER TABLE orders ADD COLUMN region")
    assert walk.table_of[add] == "public.orders" and "public.orders" in walk.created_at[add]
    index = at("CREATE INDEX ix_orders_region")
    assert walk.table_of[index] == "public.orders"
    quoted = at('ALTER TABLE "Customers"')
    assert walk.table_of[quoted] == "public.Customers" and "public.Customers" not in walk.created_at[quoted]
    drop = at("DROP INDEX ix_orders_region")
    assert walk.table_of[drop] == "public.orders"  # the index the plan built, on the table it built
    retyped = at("ALTER TABLE public.purchases")
    assert walk.table_of[retyped] == "public.purchases" and "public.purchases" in walk.created_at[retyped]


def test_squawk_findings_land_on_their_statement():
    raw = lint.run_squawk(SQL)
    stmts = lint.statements(SQL)
    starts = [s.first_line for s in stmts]
    rules = {(stmts[lint._statement_at(starts, int(i["line"]))].revision, i["rule_name"]) for i in raw}
    assert ("b2", "adding-required-field") in rules
    assert ("b2", "require-concurrent-index-creation") in rules
    assert ("c3", "renaming-table") in rules


def test_create_table_if_not_exists_creates_nothing_over_an_existing_table():
    from opslib.db import TableFacts

    sql = (
        "-- Running upgrade  -> a1\nCREATE TABLE IF NOT EXISTS orders (id BIGINT PRIMARY KEY);\n\n"
        "ALTER TABLE orders ADD COLUMN region TEXT NOT NULL;\n"
    )
    walk = lint._Walk(lint.statements(sql))
    assert walk.if_absent == {"public.orders"}
    assert walk.created_by_plan(1, {}) == {"public.orders"}
    assert walk.created_by_plan(1, {"public.orders": TableFacts("orders", exists=False)}) == {"public.orders"}
    there = {"public.orders": TableFacts("orders", exists=True, rows=3, row_estimate=None, total_bytes=8192)}
    assert walk.created_by_plan(1, there) == set()  # the ALTER then concerns a table holding rows


def test_a_misread_quote_never_carries_statements_into_the_next_revision():
    sql = (
        "-- Running upgrade  -> r1\n/* don't */\nINSERT INTO t VALUES (1, E'it\\'s');\n\n"
        "-- Running upgrade r1 -> r2\nALTER TABLE big ADD COLUMN y int NOT NULL;\n\n"
        "-- Running upgrade r2, r3 -> m4\nALTER TABLE big ADD COLUMN z int;\n"
    )
    found = lint.statements(sql)
    assert [(s.revision, s.text.split()[0]) for s in found] == [
        ("r1", "INSERT"),
        ("r2", "ALTER"),
        ("m4", "ALTER"),
    ]
    assert found[1].first_line == 5  # 0-based


def test_names_are_resolved_as_postgresql_does():
    sql = (
        "-- Running upgrade  -> a1\nCREATE TABLE other.users (id BIGINT);\n\n"
        'ALTER TABLE users ADD COLUMN x INT NOT NULL;\n\nALTER TABLE "UserAccount" ADD COLUMN y INT;\n\n'
        "ALTER TABLE orders RENAME TO purchases;\n\nALTER TABLE purchases ADD COLUMN z INT NOT NULL;\n"
    )
    walk = lint._Walk(lint.statements(sql))
    assert walk.table_of[1] == "public.users" and "public.users" not in walk.created_at[1]  # not other.users
    assert (
        walk.table_of[2] == "public.UserAccount"
        and lint._quoted(walk.table_of[2]) == '"public"."UserAccount"'
    )
    assert walk.target_table(walk.table_of[4]) == "public.orders"  # renamed from a table the target has
