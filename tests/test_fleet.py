"""Fleets: one runbook over many databases, a canary first, then waves, with a halt rule."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from opslib import fleet, migrate

from .conftest import OPSLIB, ROOT, database_name, query, settings_for


def _fleet(make_database, tmp_path: Path, count: int, failing: set[int]) -> tuple[Path, dict]:
    """``count`` databases at 0003 (those in ``failing`` with an "N/A" price, which 0004 refuses), and a fleet
    file naming them by variables; returns the file and the variables to set."""
    variables, lines = {}, []
    for i in range(1, count + 1):
        url = make_database()
        migrate.upgrade(settings_for(url, tmp_path), "0003")
        query(url, "INSERT INTO products (marketplace, shop_name, title, price) VALUES ('m', 's', 't', :p)",
              p="N/A" if i in failing else "9.50")
        variables[f"FLEET_DB_{i}"] = url
        region = "eu" if i % 2 else "us"
        lines += ["[[targets]]", f'name = "db{i}"', f'url_env = "FLEET_DB_{i}"', f'tags = {{ region = "{region}" }}', ""]
    path = tmp_path / "fleet.toml"
    path.write_text("\n".join(lines))
    return path, variables


def _opslib(tmp_path: Path, variables: dict, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))}
    env.update(OPSLIB_ALEMBIC_INI=str(ROOT / "alembic.ini"), **variables)
    return subprocess.run([OPSLIB, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _fleet_record(tmp_path: Path) -> dict:
    (path,) = (tmp_path / "records" / "fleets").glob("*_fleet_*.json")
    return json.loads(path.read_text())


def test_a_failing_target_halts_the_fleet_and_the_rest_are_named_not_started(make_database, tmp_path):
    path, variables = _fleet(make_database, tmp_path, 6, failing={3})
    dry = _opslib(tmp_path, variables, "fleet", "deploy", "--targets", str(path), "--wave", "2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[2].split()[:3] == ["canary", "db1", "0003"]
    assert "0004 0005 0006 0007" in dry.stdout and "nothing was run" in dry.stdout
    done = _opslib(tmp_path, variables, "fleet", "deploy", "--targets", str(path), "--wave", "2",
                   "--halt-after", "1", "-p", "backup", "false")
    assert done.returncode == 1, done.stdout + done.stderr
    record = _fleet_record(tmp_path)
    states = {t["target"]: t["state"] for t in record["targets"]}
    # The canary (db1) first, then db2 and db3 together: db3 fails, so db4…db6 never start.
    assert states == {"db1": "succeeded", "db2": "succeeded", "db3": "failed", "db4": "not started",
                      "db5": "not started", "db6": "not started"}
    assert record["halted"] == "1 target(s) failed (halt after 1)" and record["outcome"] == "failed"
    assert "not started: db4, db5, db6" in done.stdout
    runs = [t["run_id"] for t in record["targets"] if t["run_id"]]
    assert len(runs) == 3
    for name in ("db4", "db5", "db6"):
        assert query(variables[f"FLEET_DB_{name[2:]}"], "SELECT version_num FROM alembic_version") == [("0003",)]
    verify = _opslib(tmp_path, variables, "audit", "verify")
    assert verify.returncode == 0 and "3 run(s)" in verify.stdout, verify.stdout + verify.stderr
    # The audit report shows the fleet as one page: outcomes in colour, links to the runs, the ones not started.
    report = _opslib(tmp_path, variables, "audit", "report", "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    index = (tmp_path / "report" / "index.html").read_text()
    (page,) = (tmp_path / "report" / "fleets").glob("*.html")
    assert f'href="fleets/{page.name}"' in index
    html = page.read_text()
    assert "Not started: db4, db5, db6" in html
    assert html.count('class="outcome outcome-succeeded"') == 2 and 'class="outcome outcome-failed">failed' in html
    assert html.count('class="outcome outcome-not-started"') == 3
    for run_id in runs:
        assert f'>{run_id}</a>' in html
    linked = [h.split('"')[0] for h in html.split('href="../runs/')[1:]]
    assert len(linked) == 3 and all((tmp_path / "report" / "runs" / name).is_file() for name in linked)


def test_with_no_halt_every_other_target_reaches_head(make_database, tmp_path):
    path, variables = _fleet(make_database, tmp_path, 6, failing={4})
    done = _opslib(tmp_path, variables, "fleet", "deploy", "--targets", str(path), "--wave", "2", "--parallel", "3",
                   "--no-halt", "-p", "backup", "false")
    assert done.returncode == 1
    record = _fleet_record(tmp_path)
    assert [t["state"] for t in record["targets"]] == ["succeeded"] * 3 + ["failed"] + ["succeeded"] * 2
    assert record["halted"] is None and record["outcome"] == "failed"
    for i in (1, 2, 3, 5, 6):
        assert query(variables[f"FLEET_DB_{i}"], "SELECT version_num FROM alembic_version") == [("0007",)]
    assert query(variables["FLEET_DB_4"], "SELECT version_num FROM alembic_version") == [("0003",)]
    (failed,) = [t for t in record["targets"] if t["state"] == "failed"]
    assert "have no normalized_price" in failed["line"]
    assert _opslib(tmp_path, variables, "audit", "verify").returncode == 0


def test_a_failed_canary_stops_the_fleet_and_only_selects_by_tag(make_database, tmp_path):
    path, variables = _fleet(make_database, tmp_path, 4, failing={2})
    done = _opslib(tmp_path, variables, "fleet", "deploy", "--targets", str(path), "--only", "region=us",
                   "-p", "backup", "false", "--halt-after", "5")
    assert done.returncode == 1
    record = _fleet_record(tmp_path)
    assert [(t["target"], t["state"]) for t in record["targets"]] == [("db2", "failed"), ("db4", "not started")]
    assert record["halted"] == "the canary db2 ended failed"


@pytest.mark.parametrize(
    "body, message",
    [
        ('[[targets]]\nname = "a"\nurl_env = "postgresql://u:secret@h/db"\n', "holds a password"),
        ('[[targets]]\nname = "a"\nurl_env = "postgresql://h/db"\n', "not a URL"),
        ('[[targets]]\nname = "a"\nurl_env = "FLEET_SET"\n[[targets]]\nname = "a"\nurl_env = "FLEET_SET"\n',
         "given to two targets"),
        ('[[targets]]\nname = "a"\nurl_env = "FLEET_UNSET_VARIABLE"\n', "FLEET_UNSET_VARIABLE is not set"),
        ('[[targets]]\nname = "a"\nurl_env = "FLEET_SET"\nurl = "x"\n', "unknown key url"),
        ('[[targets]]\nname = "a"\nurl_env = "FLEET_SET"\nenv = "prod"\n', "env must be one of"),
        ("targets = 3\n", "lists no targets"),
        ("[[targets]\n", "not valid TOML"),
    ],
)
def test_a_bad_fleet_file_is_one_line_and_exit_2(tmp_path, body, message):
    (tmp_path / "fleet.toml").write_text(body)
    done = _opslib(tmp_path, {"FLEET_SET": "postgresql://postgres@127.0.0.1:5432/postgres"}, "fleet", "deploy",
                   "--targets", str(tmp_path / "fleet.toml"), "--dry-run")
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert message in line and "secret" not in line
    assert not (tmp_path / "records").exists()


def test_an_unknown_tag_and_bad_sizes_are_refused(tmp_path):
    (tmp_path / "fleet.toml").write_text('[[targets]]\nname = "a"\nurl_env = "FLEET_SET"\ntags = { region = "eu" }\n')
    variables = {"FLEET_SET": "postgresql://postgres@127.0.0.1:5432/postgres"}
    unknown = _opslib(tmp_path, variables, "fleet", "deploy", "--targets", "fleet.toml", "--only", "zone=x")
    assert unknown.returncode == 2 and "no target has the tag 'zone'" in unknown.stderr
    bad = _opslib(tmp_path, variables, "fleet", "deploy", "--targets", "fleet.toml", "--parallel", "0")
    assert bad.returncode == 2
    loaded = fleet.load_fleet(tmp_path / "fleet.toml", variables)
    assert [w for w in fleet.plan(loaded, canary=0, wave=1).waves] == [loaded.targets]


def test_production_targets_run_only_once_confirmed_and_a_pyproject_fleet_is_read(make_database, tmp_path):
    path, variables = _fleet(make_database, tmp_path, 2, failing=set())
    path.write_text(path.read_text().replace('url_env = "FLEET_DB_2"', 'url_env = "FLEET_DB_2"\nenv = "production"'))
    refused = _opslib(tmp_path, variables, "fleet", "deploy", "--targets", str(path))
    assert refused.returncode == 3 and "--confirm-production 1" in refused.stderr
    assert not (tmp_path / "records").exists()
    done = _opslib(tmp_path, variables, "fleet", "deploy", "--targets", str(path), "--confirm-production", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    record = _fleet_record(tmp_path)
    assert [t["state"] for t in record["targets"]] == ["succeeded", "succeeded"]
    assert record["targets"][1]["backup"]  # production: the deploy's backup was taken, as always
    # The same fleet from [tool.opslib.fleet] in a pyproject.toml.
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text("[tool.opslib.fleet]\n" + path.read_text().replace("[[targets]]", "[[tool.opslib.fleet.targets]]"))
    loaded = fleet.load_fleet(fleet.fleet_file(project / "alembic.ini"), variables)
    assert [(t.name, t.env) for t in loaded.targets] == [("db1", "development"), ("db2", "production")]



def test_the_plan_json_carries_each_targets_command_and_the_halt_rule_and_confirms_production(make_database, tmp_path):
    path, variables = _fleet(make_database, tmp_path, 2, failing=set())
    path.write_text(path.read_text().replace('name = "db2"', 'name = "db2"\nenv = "production"'))
    refused = _opslib(tmp_path, variables, "fleet", "deploy", "--targets", str(path), "--plan-json")
    assert refused.returncode == 3 and "confirm them with --confirm-production 1" in refused.stderr
    assert refused.stdout == ""
    done = _opslib(tmp_path, variables, "fleet", "deploy", "--targets", str(path), "--plan-json",
                   "--confirm-production", "1", "--halt-after", "2", "-p", "backup", "false")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert (plan["runbook"], plan["canary"], plan["halt_after"]) == ("deploy", 1, 2)
    (canary,), (second,) = plan["waves"]
    assert canary["command"] == ["run", "deploy", "--json", "--env", "development", "-p", "database_url_env",
                                 "FLEET_DB_1", "-p", "backup", "false"]
    database = database_name(variables["FLEET_DB_2"])
    assert second["command"][4:] == ["production", "-p", "database_url_env", "FLEET_DB_2", "-p", "confirm", database,
                                     "-p", "backup", "false"]
    # The local executor runs the same command: its run prints its result as JSON, which the fleet reads.
    ran = subprocess.run([OPSLIB, *canary["command"]], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL"))},
                              "OPSLIB_ALEMBIC_INI": str(ROOT / "alembic.ini"), **variables})
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert (result["outcome"], result["exit_code"], result["revisions_after"]) == ("succeeded", 0, ["0007"])
    assert Path(result["record"]).is_file() and ran.stderr.strip().startswith("deploy succeeded (exit 0)")


def test_a_runs_reply_is_its_json_result_and_last_line_or_what_its_exit_code_says():
    from opslib.outcome import run_reply

    said = run_reply('{"run_id": "r1", "outcome": "failed", "record": "/x.json"}\n', "warning\ndeploy failed (exit 1)\n", 1)
    assert (said.outcome, said.line, said.result["run_id"]) == ("failed", "deploy failed (exit 1)", "r1")
    refused = run_reply("", "opslib: no runbook 'x'\n", 2)
    assert (refused.result, refused.outcome, refused.line) == (None, "invalid", "opslib: no runbook 'x'")
    # A success that printed no result, or printed something else, is not taken for a success.
    assert run_reply("[1, 2]\n", "", 0).outcome == "failed" and run_reply("", "", 0).line == "exit 0"
