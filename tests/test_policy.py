"""The project's lint policy (opslib.toml or [tool.opslib] in pyproject.toml); no server needed."""

from __future__ import annotations

import re

import pytest

from opslib import policy
from opslib.errors import ConfigError, InvalidInput


def _project(tmp_path):
    ini = tmp_path / "alembic.ini"
    ini.write_text("[alembic]\nscript_location = %(here)s\n")
    return ini


def test_no_file_is_an_empty_policy(tmp_path):
    got = policy.load_policy(_project(tmp_path))
    assert got.source is None and got.rules == {} and got.accepted == ()
    assert got.action("ban-drop-column", "block") == "block"


def test_opslib_toml_rules_and_acceptances(tmp_path):
    ini = _project(tmp_path)
    (tmp_path / "opslib.toml").write_text(
        '[lint.rules]\nprefer-robust-stmts = "ignore"\nchanging-column-type = "warn"\n\n'
        '[[lint.accept]]\nrevision = "1f0c2b9e4d7a"\nrule = "ban-drop-column"\nreason = "column unused since 2023"\n'
    )
    got = policy.load_policy(ini)
    assert got.action("prefer-robust-stmts", "warn") == "ignore"
    assert got.action("changing-column-type", "block") == "warn"
    assert got.acceptance("1f0c2b9e4d7a", "ban-drop-column").reason == "column unused since 2023"
    assert got.acceptance("1f0c2b9e4d7a", "renaming-table") is None


def test_pyproject_tool_opslib_is_read_when_there_is_no_opslib_toml(tmp_path):
    ini = _project(tmp_path)
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "shop"\n\n[tool.opslib.lint.rules]\nban-char-field = "warn"\n'
    )
    got = policy.load_policy(ini)
    assert got.action("ban-char-field", "block") == "warn" and got.source.name == "pyproject.toml"


@pytest.mark.parametrize(
    "text, words",
    [
        ("[lint\n", "is not valid TOML"),
        ('[lint.rules]\nban-drop-column = "maybe"\n', "use one of block, warn, ignore"),
        ('[[lint.accept]]\nrevision = "a1"\nrule = "ban-drop-column"\n', "needs reason"),
        ("[lint]\nrulez = 1\n", "unknown key(s) in [lint]: rulez"),
        ('[lint]\nrules = "x"\n', "[lint.rules] must be a table"),
        ("[lint]\naccept = 5\n", "must be an array of tables"),
        ("lint = 3\n", "[lint] must be a table"),
    ],
)
def test_a_malformed_policy_is_a_configuration_error(tmp_path, text, words):
    ini = _project(tmp_path)
    (tmp_path / "opslib.toml").write_text(text)
    with pytest.raises(ConfigError) as err:
        policy.load_policy(ini)
    assert words in err.value.message and "opslib.toml" in err.value.message
    assert err.value.exit_code == 2


def test_write_baseline_keeps_comments_and_adds_each_pair_once(tmp_path):
    ini = _project(tmp_path)
    (tmp_path / "opslib.toml").write_text(
        '# our policy\n[lint.rules]\nban-char-field = "warn"  # legacy tables\n'
    )
    path, added = policy.write_baseline(
        ini, [("a1", "ban-drop-column"), ("a1", "ban-drop-column")], "adopted"
    )
    assert added == 1 and path == tmp_path / "opslib.toml"
    path, added = policy.write_baseline(ini, [("a1", "ban-drop-column"), ("b2", "renaming-table")], "adopted")
    assert added == 1
    text = path.read_text()
    assert text.startswith("# our policy") and "# legacy tables" in text
    got = policy.load_policy(ini)
    assert [(a.revision, a.rule, a.reason) for a in got.accepted] == [
        ("a1", "ban-drop-column", "adopted"),
        ("b2", "renaming-table", "adopted"),
    ]
    with pytest.raises(InvalidInput):
        policy.write_baseline(ini, [("c3", "ban-drop-table")], "  ")


def test_write_baseline_into_pyproject_tool_opslib(tmp_path):
    ini = _project(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "shop"\n\n[tool.opslib]\n')
    path, added = policy.write_baseline(ini, [("a1", "ban-drop-column")], "adopted")
    assert path.name == "pyproject.toml" and added == 1
    assert policy.load_policy(ini).acceptance("a1", "ban-drop-column").reason == "adopted"
    assert not (tmp_path / "opslib.toml").exists()


def test_a_pyproject_whose_tool_opslib_is_not_a_table_is_a_configuration_error(tmp_path):
    ini = _project(tmp_path)
    (tmp_path / "pyproject.toml").write_text("[tool]\nopslib = 3\n")
    with pytest.raises(ConfigError, match="must be a table"):
        policy.load_policy(ini)
    (tmp_path / "pyproject.toml").write_text("tool = 3\n")
    assert policy.load_policy(ini).source is None  # no [tool.opslib]: no policy


@pytest.mark.parametrize(
    "text, words",
    [
        # What users wrote, expecting it to work: each name is checked, and the known names are listed.
        ('[[lint.accept]]\nrevision = "a1"\nrule = "migration-nameing"\nreason = "upstream"\n',
         "unknown rule 'migration-nameing'"),
        ('[lint.rules]\nban-drop-colum = "warn"\n', "unknown squawk rule 'ban-drop-colum'"),
        ('[checks]\nnaming = "warn"\n', "unknown check 'naming'"),
        ('[chekcs]\nmigration-naming = "warn"\n', "unknown table(s) chekcs"),
        ('[checks]\nmigration-naming = "sometimes"\n', "use one of block, warn, ignore"),
    ],
)  # fmt: skip
def test_an_unknown_check_or_rule_name_is_exit_2_naming_the_file_and_the_known_names(tmp_path, text, words):
    ini = _project(tmp_path)
    (tmp_path / "opslib.toml").write_text(text)
    with pytest.raises(ConfigError) as err:
        policy.load_policy(ini)
    assert words in err.value.message and "opslib.toml" in err.value.message and err.value.exit_code == 2
    if "unknown" in words and "rule" in words:  # a rule may be either kind: both lists are named
        assert "migration-naming" in err.value.message and "ban-drop-column" in err.value.message
    elif "unknown check" in words:
        assert "migration-naming, drift, backup" in err.value.message


def test_a_check_a_deploy_needs_cannot_be_relaxed(tmp_path):
    ini = _project(tmp_path)
    (tmp_path / "opslib.toml").write_text('[checks]\nbackup = "ignore"\n')
    with pytest.raises(ConfigError, match="a deploy cannot go on without this check"):
        policy.load_policy(ini)


def test_checks_and_acceptances_by_stable_name(tmp_path):
    ini = _project(tmp_path)
    (tmp_path / "opslib.toml").write_text(
        '[checks]\nmigration-naming = "ignore"\ndowngrades = "block"\n\n'
        '[[lint.accept]]\nrevision = "a1"\nrule = "migration-naming"\nreason = "upstream message"\n'
    )
    got = policy.load_policy(ini)
    assert got.check_action("migration-naming") == "ignore" and got.check_action("downgrades") == "block"
    assert got.check_action("drift") is None
    assert got.acceptance("a1", "migration-naming").reason == "upstream message"
    # Every check's title maps to one stable name of the list.
    assert policy.check_rule("migration naming") == "migration-naming"
    assert policy.check_rule("env.py's database") == "env-py-database" in policy.CHECKS


def test_a_rule_opslib_does_not_list_is_asked_of_squawk(tmp_path):
    from opslib import lint

    ini = _project(tmp_path)
    (tmp_path / "opslib.toml").write_text('[lint.rules]\nprefer-timestamp-tz = "warn"\n')
    with pytest.raises(ConfigError):
        policy.load_policy(ini)  # not in opslib's list, and nobody asked squawk
    assert policy.load_policy(ini, lint.is_squawk_rule).action("prefer-timestamp-tz", "block") == "warn"


def test_every_listed_rule_is_one_the_installed_squawk_knows():
    from opslib import lint

    assert [r for r in policy.LINT_RULES if not lint.is_squawk_rule(r)] == []
    assert not lint.is_squawk_rule("migration-naming")


def test_the_backup_table_says_the_method_and_each_bad_value_is_named(tmp_path):
    ini = _project(tmp_path)
    assert policy.load_policy(ini).backup == policy.BackupPolicy()  # dump, no fallback, by default
    (tmp_path / "opslib.toml").write_text(
        '[backup]\nmethod = "pgbackrest"\nfallback = "dump"\nstanza = "main"\nconfig = "pgbackrest.conf"\n'
        "full_max_age_h = 72\nretention_full = 3\ntable_checksums = true\n"
    )
    got = policy.load_policy(ini).backup
    assert (got.method, got.fallback, got.stanza, got.full_max_age_h, got.retention_full) == (
        "pgbackrest", "dump", "main", 72.0, 3,
    )  # fmt: skip
    assert got.table_checksums and got.row_counts
    assert policy.load_backup_policy(ini) == got  # what the embedded server reads when it starts
    for table, named in (
        ('method = "barman"', "[backup] method = 'barman'; use one of dump, pgbackrest"),
        ('fallback = "pray"', "[backup] fallback = 'pray'; use one of none, dump"),
        ('retention = 2', "unknown key(s) in [backup]: retention"),
        ('retention_full = "two"', "[backup] retention_full = 'two': expected int"),
        ("retention_full = 0", "[backup] retention_full = 0: it must be 1 or more"),
        ("archive_timeout_s = -1", "[backup] archive_timeout_s = -1.0: it must be more than 0"),
        ("row_counts = 1", "[backup] row_counts = 1: expected bool"),
    ):
        (tmp_path / "opslib.toml").write_text(f"[backup]\n{table}\n")
        with pytest.raises(ConfigError, match=re.escape(named)):
            policy.load_policy(ini)
