"""Documentation coverage: the README documents every make target and configuration variable."""

from __future__ import annotations

import re

from opslib import config

from .conftest import ROOT

README = (ROOT / "README.md").read_text()


def _make_targets() -> list[str]:
    text = (ROOT / "Makefile").read_text()
    return [t for t in re.findall(r"^([a-z][a-z0-9-]*):", text, re.M)]


def test_readme_starts_with_the_two_commands():
    first_block = README.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block


def test_every_runbook_is_in_the_readme():
    for notebook in (ROOT / "runbooks").glob("*.ipynb"):
        assert f"| `{notebook.stem}` |" in README


def test_every_make_target_is_in_the_readme():
    targets = _make_targets()
    assert {"install", "demo", "test", "lab", "migrate-up", "migrate-down-to"} <= set(targets)
    missing = [t for t in targets if f"make {t}" not in README]
    assert missing == []


def test_every_configuration_variable_is_in_the_readme():
    source = "".join(p.read_text() for p in (ROOT / "opslib").rglob("*.py"))
    names = set(re.findall(r'"((?:OPSLIB_|DATABASE_)[A-Z_]+)"', source))
    # Set by `opslib run` for its kernel, not by users.
    names -= {"OPSLIB_RUN_CONTEXT"}
    assert {"DATABASE_URL", "OPSLIB_ENV", "OPSLIB_ALEMBIC_INI"} <= names
    assert [n for n in sorted(names) if f"`{n}`" not in README] == []
    assert config.ENVIRONMENTS == ("development", "staging", "production")


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
