"""The embedded PostgreSQL as a command: `opslib db start|stop|status|url`."""

from __future__ import annotations

from opslib.cli.commands import arg, command
from opslib.cli.common import EXIT_OK


@command(
    "db",
    arg("action", choices=["start", "stop", "status", "url"]),
    arg(
        "--archive",
        action="store_true",
        default=None,
        help="start: archive WAL with pgBackRest (also when the policy says [backup] method = \"pgbackrest\")",
    ),
)
def db(settings, args) -> int:
    """the embedded PostgreSQL used when DATABASE_URL is unset"""
    from opslib import embedded

    if args.action == "start":
        st = embedded.start(settings, archive=args.archive)
        print(f"embedded PostgreSQL running (pid {st.pid}), data in {st.pgdata}\nurl: {st.url}")
        if st.archiving:
            made = embedded.stanza(settings)
            print(f"WAL archived with pgBackRest: stanza {made.name} ({made.config})")
    elif args.action == "stop":
        from opslib.backup import pitr

        embedded.stop(settings)
        print(f"embedded PostgreSQL stopped, data kept in {embedded.pgdata_dir(settings)}")
        for folder in pitr.cleanup_staging(settings.state_dir):  # what killed recoveries left running
            print(f"stopped and removed the staging server of a killed recovery: {folder}")
    elif args.action == "status":
        st = embedded.status(settings)
        print(f"running (pid {st.pid}), data in {st.pgdata}\nurl: {st.url}" if st.running else f"stopped, data in {st.pgdata}")
    else:
        print(embedded.ensure_running(settings))
    return EXIT_OK
