"""The embedded PostgreSQL as a command: `opslib db start|stop|status|url`."""

from __future__ import annotations

from opslib.cli.commands import arg, command
from opslib.cli.common import EXIT_OK


@command("db", arg("action", choices=["start", "stop", "status", "url"]))
def db(settings, args) -> int:
    """the embedded PostgreSQL used when DATABASE_URL is unset"""
    from opslib import embedded

    if args.action == "start":
        st = embedded.start(settings)
        print(f"embedded PostgreSQL running (pid {st.pid}), data in {st.pgdata}\nurl: {st.url}")
    elif args.action == "stop":
        embedded.stop(settings)
        print(f"embedded PostgreSQL stopped, data kept in {embedded.pgdata_dir(settings)}")
    elif args.action == "status":
        st = embedded.status(settings)
        print(f"running (pid {st.pid}), data in {st.pgdata}\nurl: {st.url}" if st.running else f"stopped, data in {st.pgdata}")
    else:
        print(embedded.ensure_running(settings))
    return EXIT_OK
