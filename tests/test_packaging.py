"""Packaging: one dependency list for pip and conda, the console script, a light CLI import path."""

from __future__ import annotations

import ast
import subprocess
import sys

import tomllib
import yaml

from .conftest import ROOT


def test_environment_yml_installs_what_pyproject_declares():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = set(project["dependencies"])
    for name, extra in project["optional-dependencies"].items():
        if name != "airflow":  # Airflow's own pins go to an environment of their own (.venv-airflow)
            declared |= set(extra)
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1
    conda_pip = set(pip_lists[0])
    assert "-e ." in conda_pip
    assert conda_pip - {"-e ."} == declared


def test_console_script_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"opslib": "opslib.cli:main"}


def test_cli_does_not_import_notebook_machinery():
    """papermill, pandas and JupyterLab cost seconds; the CLI's migration path must not load them."""
    code = (
        "import sys, opslib.cli, opslib.migrate, opslib.display, opslib.embedded;"
        "print(sorted(m for m in ('papermill', 'pandas', 'jupyterlab', 'nbformat') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# opslib.migrate's modules, each importing only those before it; and what opslib.migrate may import of
# opslib (the modules below it: never checks, lint, display, audit, runbook, cli, ...).
MIGRATE_LAYERS = (
    "results", "project", "revisions", "guards", "runtime", "versiontable", "target", "change", "offline", "planning", "verbs",
)  # fmt: skip
MIGRATE_MAY_IMPORT = {
    "opslib.batch", "opslib.config", "opslib.db", "opslib.errors", "opslib.history", "opslib.naming", "opslib.policy", "opslib.signals",
}  # fmt: skip


def _opslib_imports(path) -> set[str]:
    """The opslib modules a file imports (``from opslib import db`` counts as opslib.db)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "opslib":
            found |= {f"opslib.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("opslib."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("opslib")}
    return found


def test_the_migrate_package_imports_in_one_direction():
    """No import cycle in opslib.migrate: each module imports only the modules listed before it, never the
    package itself, and nothing of opslib above it."""
    folder = ROOT / "opslib" / "migrate"
    assert sorted(p.stem for p in folder.glob("*.py")) == sorted([*MIGRATE_LAYERS, "__init__"])
    for i, name in enumerate(MIGRATE_LAYERS):
        imported = _opslib_imports(folder / f"{name}.py")
        inside = {m for m in imported if m == "opslib.migrate" or m.startswith("opslib.migrate.")}
        assert inside <= {f"opslib.migrate.{lower}" for lower in MIGRATE_LAYERS[:i]}, (name, inside)
        assert imported - inside <= MIGRATE_MAY_IMPORT, (name, imported - inside)


def test_reading_the_runbook_registry_loads_neither_sqlalchemy_nor_alembic():
    """`opslib run` reads the registry before it starts the kernel, and the fleet, `opslib runbooks` and
    `opslib open` read it too: the steps' SQLAlchemy and Alembic are loaded by the kernel, not by them."""
    code = (
        "import sys, opslib.runner, opslib.workflows as w; w.registry(); w.get('deploy').checked_parameters({}, 'x');"
        "print(sorted(m for m in ('sqlalchemy', 'alembic', 'papermill') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
