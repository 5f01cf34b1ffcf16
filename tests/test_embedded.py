"""The embedded PostgreSQL used when DATABASE_URL is unset: started on demand, stopped on request."""

from __future__ import annotations

import os
import subprocess

from .conftest import OPSLIB, ROOT


def _opslib(*args: str, state_dir) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("OPSLIB_")}
    env["OPSLIB_STATE_DIR"] = str(state_dir)
    return subprocess.run([OPSLIB, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_without_database_url_opslib_starts_and_uses_the_embedded_server(tmp_path):
    state = tmp_path / "state"
    try:
        assert "stopped" in _opslib("db", "status", state_dir=state).stdout
        status = _opslib("status", state_dir=state)  # starts the server on demand
        assert status.returncode == 0, status.stderr
        assert "postgres@/opslib?host=" in status.stdout and "7 revision(s) pending" in status.stdout
        up = _opslib("upgrade", state_dir=state)
        assert up.returncode == 0 and "after : 0007" in up.stdout
        url = _opslib("db", "url", state_dir=state).stdout.strip()
        assert url.startswith("postgresql://postgres:@/opslib?host=")
        version = subprocess.run(
            [OPSLIB, "status", "--json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "DATABASE_URL": url},
        )
        assert '"at_head": true' in version.stdout  # the printed URL reaches the same database
        running = _opslib("db", "status", state_dir=state).stdout
        assert running.startswith("running (pid ")
    finally:
        stopped = _opslib("db", "stop", state_dir=state)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert "stopped" in _opslib("db", "status", state_dir=state).stdout
    assert (state / "pgdata" / "PG_VERSION").read_text().strip() == "18"
