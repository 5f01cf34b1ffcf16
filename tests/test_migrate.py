"""opslib.migrate against real PostgreSQL: the sample chain, scenario projects, and any Alembic project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import psycopg2
import pytest

from opslib import db, migrate
from opslib.config import Settings
from opslib.errors import InvalidInput, LockHeld, MigrationFailed, PreconditionFailed, UnknownRevision

from .conftest import libpq, query, schema_snapshot, settings_for


def test_status_reports_current_heads_and_pending(settings):
    st = migrate.status(settings)
    assert st.current == () and st.heads == ("0007",) and not st.at_head
    assert [r.revision for r in st.pending] == ["0001", "0002", "0003", "0004", "0005", "0006", "0007"]
    migrate.upgrade(settings, "0003")
    st = migrate.status(settings)
    assert st.current == ("0003",)
    assert [r.revision for r in st.pending] == ["0004", "0005", "0006", "0007"]
    assert st.to_dict()["pending"][0] == {"revision": "0004", "message": "add normalized_price to products"}


def test_upgrade_and_downgrade_report_each_step(settings):
    up = migrate.upgrade(settings, "+2")
    assert (up.before, up.after) == ((), ("0002",))
    assert [s.revision for s in up.steps] == ["0001", "0002"]
    up = migrate.upgrade(settings)
    assert up.after == ("0007",) and [s.revision for s in up.steps] == [
        "0003",
        "0004",
        "0005",
        "0006",
        "0007",
    ]
    again = migrate.upgrade(settings)
    assert not again.changed and again.steps == ()
    down = migrate.downgrade(settings, "-1")
    assert down.after == ("0006",) and [s.revision for s in down.steps] == ["0007"]
    down = migrate.downgrade(settings, "0003")
    assert down.after == ("0003",) and [s.revision for s in down.steps] == ["0006", "0005", "0004"]
    down = migrate.downgrade(settings, "base")
    assert down.after == () and [s.revision for s in down.steps] == ["0003", "0002", "0001"]


def test_failure_at_revision_n_leaves_the_database_at_n_minus_1(settings, project):
    broken = replace(settings, alembic_ini=project("broken_revision"))
    with pytest.raises(MigrationFailed) as err:
        migrate.upgrade(broken, "head")
    assert err.value.exit_code == 1 and err.value.changed
    assert err.value.revisions == ("b002",)
    assert "at revision b003" in err.value.message and "is now at b002" in err.value.message
    assert 'column "no_such_column" does not exist' in err.value.message
    st = migrate.status(broken)
    assert st.current == ("b002",) and [r.revision for r in st.pending] == ["b003"]
    # b003's own first statement was rolled back with it.
    assert query(settings.database_url, "SELECT to_regclass('half_done')")[0][0] is None


def test_two_heads_need_a_merge(settings, project):
    branched = replace(settings, alembic_ini=project("two_heads"))
    assert sorted(h.revision for h in migrate.heads(branched)) == ["abcd1111", "abcd2222"]
    with pytest.raises(PreconditionFailed, match="several heads"):
        migrate.upgrade(branched, "head")
    assert migrate.upgrade(branched, "heads").after == ("abcd1111", "abcd2222")
    with pytest.raises(UnknownRevision, match="ambiguous"):
        migrate.show(branched, "abcd")
    made = migrate.merge(branched, "merge notes branches")
    assert made.is_merge and set(made.down_revisions) == {"abcd1111", "abcd2222"}
    assert [h.revision for h in migrate.heads(branched)] == [made.revision]
    assert migrate.upgrade(branched).after == (made.revision,)
    # -2 across the merge: Alembic finds the walk ambiguous; opslib never turns it into a target that
    # would reverse both branches.
    with pytest.raises(InvalidInput, match="unchanged"):
        migrate.downgrade(branched, "-2")
    assert migrate.status(branched).current == (made.revision,)


def test_merge_with_a_single_head_is_refused(settings):
    with pytest.raises(PreconditionFailed, match="single head"):
        migrate.merge(settings, "nothing to merge")


def test_stamp_records_a_revision_without_running_it(settings):
    result = migrate.stamp(settings, "0003")
    assert result.after == ("0003",)
    assert schema_snapshot(settings.database_url)[0] == []  # no table was created
    with pytest.raises(UnknownRevision):
        migrate.stamp(settings, "nope")
    assert migrate.status(settings).current == ("0003",)


def test_offline_sql_for_a_range_in_both_directions(settings):
    up = migrate.offline_sql(settings, "0002:0004")
    assert (
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_products_marketplace_shop ON products (marketplace, shop_name)"
        in up
    )
    assert "ALTER TABLE products ADD COLUMN IF NOT EXISTS normalized_price NUMERIC(10, 2)" in up
    assert "-- opslib.batch: 0004 products.normalized_price" in up
    assert "ADD COLUMN profile_image" not in up  # 0002 itself is below the range
    down = migrate.offline_sql(settings, "0004:0002")
    assert "DROP INDEX CONCURRENTLY IF EXISTS idx_products_marketplace_shop" in down
    assert "ALTER TABLE products DROP COLUMN normalized_price" in down
    assert "CREATE INDEX" not in down
    # Offline mode never connects: the test database has no version table.
    assert query(settings.database_url, "SELECT to_regclass('alembic_version')")[0][0] is None
    for bad in ("0004", "0002:", "0002:0002", "0002:zzz"):
        with pytest.raises(InvalidInput):
            migrate.offline_sql(settings, bad)


def test_a_second_run_waits_for_the_lock_then_gives_up(settings):
    holder = psycopg2.connect(libpq(settings.database_url))
    try:
        holder.cursor().execute("SELECT pg_advisory_lock(%s)", (db.LOCK_KEY,))
        with pytest.raises(LockHeld, match="another opslib run holds the lock") as err:
            migrate.upgrade(replace(settings, lock_timeout_s=0.3))
        assert err.value.exit_code == 4
    finally:
        holder.close()
    assert migrate.status(settings).current == ()
    assert migrate.upgrade(settings).after == ("0007",)  # free again once the holder left


def test_revision_autogenerate_requires_a_database_at_head(settings, tmp_path):
    copy = _copy_sample_project(tmp_path)
    with pytest.raises(PreconditionFailed, match="not at head"):
        migrate.revision(replace(settings, alembic_ini=copy), "add nothing", autogenerate=True)
    assert list((tmp_path / "sample" / "migrations" / "versions").glob("*add_nothing*")) == []


def test_manual_revision_is_added_on_top_of_the_chain(settings, tmp_path):
    copied = replace(settings, alembic_ini=_copy_sample_project(tmp_path))
    made = migrate.revision(copied, "add_custom_indexes")
    assert made.down_revisions == ("0007",) and made.is_head
    assert Path(made.path).parent == tmp_path / "sample" / "migrations" / "versions"
    assert "add_custom_indexes" in Path(made.path).name
    with pytest.raises(InvalidInput, match="message is required"):
        migrate.revision(copied, "  ")


def test_any_alembic_project_made_by_alembic_init(settings, tmp_path):
    """A project straight from `alembic init` (generic template: sqlalchemy.url, one transaction)."""
    proj = tmp_path / "generic"
    subprocess.run(
        [str(Path(sys.executable).parent / "alembic"), "init", "-t", "generic", str(proj)],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    generic = replace(settings, alembic_ini=tmp_path / "alembic.ini")
    made = migrate.revision(generic, "create widgets")
    text = Path(made.path).read_text()
    text = text.replace(
        '"""Upgrade schema."""\n    pass',
        '"""Upgrade schema."""\n    op.create_table("widgets", sa.Column("id", sa.Integer, primary_key=True))',
    ).replace('"""Downgrade schema."""\n    pass', '"""Downgrade schema."""\n    op.drop_table("widgets")')
    Path(made.path).write_text(text)
    assert migrate.upgrade(generic).after == (made.revision,)
    assert query(settings.database_url, "SELECT to_regclass('widgets')::text")[0][0] == "widgets"
    assert migrate.status(generic).at_head
    assert migrate.downgrade(generic, "base").after == ()


def _copy_sample_project(tmp_path: Path) -> Path:
    """A copy of the sample application's Alembic project, so new revision files land in tmp_path."""
    import shutil

    from .conftest import ROOT

    dest = tmp_path / "sample"
    shutil.copytree(ROOT / "migrations", dest / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "alembic.ini", dest / "alembic.ini")
    return dest / "alembic.ini"


def test_the_revision_map_is_built_once_per_process_while_the_files_are_unchanged(
    settings, project, monkeypatch
):
    from alembic.script import ScriptDirectory

    from opslib import checks

    built = []
    load = ScriptDirectory._load_revisions

    def counted(self):
        built.append(self.dir)
        return load(self)

    monkeypatch.setattr(ScriptDirectory, "_load_revisions", counted)
    settings = replace(
        settings, alembic_ini=project("longlived")
    )  # a copy: one of its files is touched below
    report = checks.pre_deploy(settings)  # status, plan, offline SQL, lint, naming...
    migrate.upgrade(settings, report.plan.last)
    migrate.status(settings)
    assert len(built) == 1
    revision_file = Path(report.plan.pending[0].path)
    os.utime(revision_file, ns=(revision_file.stat().st_atime_ns, revision_file.stat().st_mtime_ns + 10**9))
    migrate.status(settings)  # an edited revision file is read again
    assert len(built) == 2


def test_an_env_py_with_its_own_outer_transaction_names_the_revision_that_failed(database_url, tmp_path):
    """`with engine.begin() as conn:` keeps all or nothing; the failure still names the revision that raised."""
    (tmp_path / "versions").mkdir()
    (tmp_path / "alembic.ini").write_text("[alembic]\nscript_location = %(here)s\npath_separator = os\n")
    (tmp_path / "env.py").write_text(
        "from alembic import context\nfrom sqlalchemy import create_engine, pool\n"
        "engine = create_engine(context.config.get_main_option('sqlalchemy.url'), poolclass=pool.NullPool)\n"
        "with engine.begin() as connection:\n"
        "    context.configure(connection=connection)\n"
        "    with context.begin_transaction():\n"
        "        context.run_migrations()\n"
    )
    for n, body in (
        (1, "op.execute('CREATE TABLE t1 (id int)')"),
        (2, "print('dividing'); op.execute('SELECT 1/0')"),
    ):
        down = f"'r{n - 1}'" if n > 1 else "None"
        (tmp_path / "versions" / f"r{n}.py").write_text(
            f'"""step number {n} of two"""\nfrom alembic import op\nrevision = "r{n}"\ndown_revision = {down}\n\n'
            f"def upgrade():\n    {body}\n\ndef downgrade():\n    pass\n"
        )
    settings = replace(settings_for(database_url, tmp_path), alembic_ini=tmp_path / "alembic.ini")
    with pytest.raises(MigrationFailed) as failed:
        migrate.upgrade(settings)
    assert (
        "failed at revision r2 (step number 2 of two): DivisionByZero: division by zero"
        in failed.value.message
    )
    assert "is now at base" in failed.value.message
    assert "dividing" in failed.value.output  # what the revision printed, kept for the record
    assert migrate.status(settings).current == ()


def test_offline_rendering_resumes_after_an_unrenderable_revision_without_repeating_a_branch(tmp_path):
    """r0 -> (a1 -> a2, which reads data) and (b1) -> m3 -> r4: every other revision rendered exactly once."""
    (tmp_path / "versions").mkdir()
    shutil.copytree(Path(__file__).parent / "fixtures" / "_shared", tmp_path / "fixtures" / "_shared")
    (tmp_path / "alembic.ini").write_text(
        "[alembic]\nscript_location = %(here)s/fixtures/_shared\nversion_locations = %(here)s/versions\n"
        "path_separator = os\n"
    )
    chain = {"r0": None, "a1": "'r0'", "a2": "'a1'", "b1": "'r0'", "m3": "('a2', 'b1')", "r4": "'m3'"}
    for rev, down in chain.items():
        body = (
            "op.get_bind().execute(sa.text('SELECT 1')).fetchall()"
            if rev == "a2"
            else f"op.execute('CREATE TABLE t_{rev} (id int)')"
        )
        (tmp_path / "versions" / f"{rev}.py").write_text(
            f'"""revision {rev} of the branched chain"""\nimport sqlalchemy as sa\nfrom alembic import op\n'
            f'revision = "{rev}"\ndown_revision = {down}\n\ndef upgrade():\n    {body}\n\ndef downgrade():\n    pass\n'
        )
    settings = Settings(alembic_ini=tmp_path / "alembic.ini")
    rendered = migrate.render_pending(settings, (), "r4")
    assert [rev for rev, _ in rendered.unrendered] == ["a2"]
    for rev in ("r0", "a1", "b1", "m3", "r4"):
        assert rendered.sql.count(f"CREATE TABLE t_{rev} ") == 1, rev


def test_a_failed_downgrade_names_the_revision_that_raised_with_a_per_revision_env(database_url, tmp_path):
    """The scenario env.py commits each revision itself; the error names the revision whose downgrade raised."""
    shutil.copytree(Path(__file__).parent / "fixtures" / "_shared", tmp_path / "fixtures" / "_shared")
    (tmp_path / "versions").mkdir()
    (tmp_path / "alembic.ini").write_text(
        "[alembic]\nscript_location = %(here)s/fixtures/_shared\nversion_locations = %(here)s/versions\n"
        "path_separator = os\n"
    )
    bodies = {
        "d1": ("op.execute('CREATE TABLE d1 (id int)')", "op.execute('DROP TABLE d1')"),
        "d2": ("op.execute('CREATE TABLE d2 (id int)')", "op.execute('DROP TABLE no_such_table')"),
        "d3": ("op.execute('CREATE TABLE d3 (id int)')", "op.execute('DROP TABLE d3')"),
    }
    for n, (rev, (up, down)) in enumerate(bodies.items()):
        parent = f"'d{n}'" if n else "None"
        (tmp_path / "versions" / f"{rev}.py").write_text(
            f'"""table {rev} for the downgrade test"""\nfrom alembic import op\nrevision = "{rev}"\n'
            f"down_revision = {parent}\n\ndef upgrade():\n    {up}\n\ndef downgrade():\n    {down}\n"
        )
    settings = replace(settings_for(database_url, tmp_path), alembic_ini=tmp_path / "alembic.ini")
    migrate.upgrade(settings)
    with pytest.raises(MigrationFailed) as failed:
        migrate.downgrade(settings, "base")
    message = failed.value.message
    assert "failed at revision d2 (table d2 for the downgrade test): UndefinedTable: " in message
    assert "is now at d2" in message and migrate.status(settings).current == ("d2",)


def test_what_revisions_print_and_log_stays_off_the_commands_output(run_cli, tmp_path):
    """print, logging and structlog from a revision: kept out of stdout (and stderr), shown with -v."""
    shutil.copytree(Path(__file__).parent / "fixtures" / "_shared", tmp_path / "fixtures" / "_shared")
    (tmp_path / "versions").mkdir()
    (tmp_path / "alembic.ini").write_text(
        "[alembic]\nscript_location = %(here)s/fixtures/_shared\nversion_locations = %(here)s/versions\n"
        "path_separator = os\n"
    )
    (tmp_path / "versions" / "c1.py").write_text(
        '"""chatty table creation"""\nimport logging\nimport structlog\nfrom alembic import op\n'
        'revision = "c1"\ndown_revision = None\n\n'
        "def upgrade():\n    print('PRINTED-LINE')\n    logging.getLogger('app').warning('LOGGED-LINE')\n"
        "    structlog.get_logger().info('STRUCTLOG-LINE')\n    op.execute('CREATE TABLE c1 (id int)')\n\n"
        "def downgrade():\n    op.execute('DROP TABLE c1')\n"
    )
    env = {"OPSLIB_ALEMBIC_INI": str(tmp_path / "alembic.ini")}
    sql = run_cli("sql", "base:c1", env=env)
    assert sql.returncode == 0 and sql.stdout.lstrip().startswith(("BEGIN", "CREATE TABLE alembic_version"))
    assert not any(s in sql.stdout + sql.stderr for s in ("PRINTED-LINE", "LOGGED-LINE", "STRUCTLOG-LINE"))
    quiet = run_cli("upgrade", env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert not any(
        s in quiet.stdout + quiet.stderr for s in ("PRINTED-LINE", "LOGGED-LINE", "STRUCTLOG-LINE")
    )
    run_cli("downgrade", "base", env=env)
    loud = run_cli("-v", "upgrade", env=env)
    assert all(s in loud.stderr for s in ("PRINTED-LINE", "LOGGED-LINE", "STRUCTLOG-LINE"))
    assert "PRINTED-LINE" not in loud.stdout


def test_compare_models_passes_at_head_and_names_what_differs(settings, project, make_database, tmp_path):
    assert migrate.compare_models(settings)[0] == "fail"  # at base: Alembic says it is not up to date
    migrate.upgrade(settings, "head")
    assert migrate.compare_models(settings) == ("pass", "no differences between the models and the database")
    conn = psycopg2.connect(libpq(settings.database_url))
    conn.autocommit = True
    conn.cursor().execute("ALTER TABLE users ADD COLUMN nickname text")
    conn.close()
    status, detail = migrate.compare_models(settings)
    assert status == "fail" and detail.startswith("New upgrade operations detected") and "nickname" in detail
    bare = settings_for(make_database(), tmp_path / "bare", project("longlived"))  # target_metadata = None
    migrate.upgrade(bare, "head")
    assert migrate.compare_models(bare)[0] == "skip"
