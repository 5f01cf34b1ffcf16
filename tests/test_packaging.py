"""Packaging: one dependency list for pip and conda, the console script, a light CLI import path."""

from __future__ import annotations

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
