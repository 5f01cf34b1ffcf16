"""Backups and checks as commands: backup, verify-backup, restore, clone, backups, prune-backups,
verify-setup, check."""

from __future__ import annotations

import json
from pathlib import Path

from opslib.cli.commands import arg, command
from opslib.cli.common import EXIT_OK


def _given_folder(raw: str | None) -> Path | None:
    """A folder named by --dir, which must exist: a typo must not read as "no backups" or "nothing to delete"."""
    from opslib.errors import InvalidInput

    if raw is None:
        return None
    folder = Path(raw)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise InvalidInput(f"--dir {folder} {what}: name the backups folder (default: OPSLIB_BACKUPS_DIR)")
    return folder


@command(
    "backup",
    arg("--out", metavar="DIR", help="folder for this backup (default: OPSLIB_BACKUPS_DIR)"),
    arg("--label", metavar="TEXT", help="a note kept in the manifest, e.g. 'before deploy 42'"),
)
def backup(settings, args) -> int:
    """pg_dump the target database into the backups folder, with a manifest"""
    from opslib import backup, db, display

    made = backup.backup(db.TargetDatabase(settings), out_dir=Path(args.out) if args.out else None, label=args.label)
    print(display.backup_text(made))
    return EXIT_OK


@command(
    "verify-backup",
    arg("file", metavar="FILE", nargs="?", help="the dump to check; not with --pgbackrest"),
    arg("--restore-test", action="store_true", help="restore into a scratch database and compare"),
    arg(
        "--pgbackrest",
        action="store_true",
        help="check the pgBackRest repository, and recover to the newest restore point in a scratch data folder",
    ),
    arg("--restore-point", metavar="NAME", help="with --pgbackrest: recover to this one (opslib-<run id>, or the run id)"),
)
def verify_backup(settings, args) -> int:
    """check a backup: manifest, checksum, archive, optionally a test restore (or pgBackRest's, with --pgbackrest)"""
    from opslib import backup, db, display
    from opslib.errors import InvalidInput

    if args.pgbackrest:
        if args.file or args.restore_test:
            raise InvalidInput("verify-backup --pgbackrest takes no FILE and no --restore-test: it always test-restores")
        report = _verify_physical(settings, args.restore_point or "")
    elif not args.file or args.restore_point:
        raise InvalidInput("verify-backup needs a FILE (a dump), or --pgbackrest [--restore-point NAME]")
    else:
        report = backup.verify_backup(db.TargetDatabase(settings), args.file, restore_test=args.restore_test)
    print(display.checks_text(report))
    report.raise_for_failure()
    return EXIT_OK


def _verify_physical(settings, wanted: str):
    from opslib import audit, db, restorepoints
    from opslib.backup import physical, pitr

    target = db.TargetDatabase(settings)
    stanza = physical.stanza_for(settings, physical.backup_policy(settings))
    point = restorepoints.point_to_test(settings.records_dir, target.url.database, wanted)
    with db.connect(target.url) as conn:
        major = db.server_version(conn)[1]
    return pitr.verify_physical(target, stanza, point, f"verify-{audit.new_run_id()}", major)


@command(
    "restore",
    arg("file", metavar="FILE", nargs="?", help="the backup (.dump); not with --cleanup"),
    arg("--into", metavar="NAME", help="database to create (default: <database>_restored_<time>)"),
    arg("--confirm", metavar="NAME", help="the target database's name: restore over it"),
    arg("--terminate-connections", action="store_true", help="end other sessions on the target first"),
    arg("--allow-other-database", action="store_true", help="with --confirm: replace the target with a backup of another database"),
    arg("--cleanup", action="store_true", help="only drop the staging databases killed restores over the target left (no FILE)"),
)
def restore(settings, args) -> int:
    """restore a backup into a new database (or over the target, confirmed)"""
    from opslib import backup, db, display
    from opslib.errors import InvalidInput

    if args.cleanup:
        flags = (("FILE", args.file), ("--into", args.into), ("--confirm", args.confirm))
        given = [flag for flag, value in flags if value]
        if given:
            raise InvalidInput(f"restore --cleanup takes no {', '.join(given)}: run it on its own")
        print(display.cleanup_text(backup.cleanup_restores(db.TargetDatabase(settings))))
        return EXIT_OK
    if not args.file:
        raise InvalidInput(
            "restore needs a FILE (a .dump in the backups folder; `opslib backups` lists them), "
            "or --cleanup to drop what killed restores left"
        )
    done = backup.restore(
        db.TargetDatabase(settings), args.file, into=args.into, confirm=args.confirm, terminate_connections=args.terminate_connections,
        allow_other_database=args.allow_other_database,
    )  # fmt: skip
    print(display.restore_text(done))
    return EXIT_OK


@command("clone", arg("--into", metavar="NAME", required=True))
def clone(settings, args) -> int:
    """copy the target database on its server (CREATE DATABASE ... TEMPLATE)"""
    from opslib import backup, db

    made = backup.clone(db.TargetDatabase(settings), args.into)
    print(f"cloned {made.source!r} into {made.database!r} in {made.duration_s:.2f} s")
    return EXIT_OK


@command(
    "backups",
    arg("--dir", metavar="DIR", help="folder to list (default: OPSLIB_BACKUPS_DIR)"),
    arg("--pgbackrest", action="store_true", help="only pgBackRest's backups and the restore points runs made"),
    arg("--json", action="store_true"),
)
def backups(settings, args) -> int:
    """list the backups (time, database, revision, size, verified), and pgBackRest's with the restore points"""
    from opslib import backup, display
    from opslib.errors import InvalidInput, OpsError

    if args.pgbackrest:
        if args.dir:
            raise InvalidInput("backups --pgbackrest takes no --dir: the stanza says where its repository is")
        stanza, points = _physical_listing(settings)
        if args.json:
            print(json.dumps(_physical_json(stanza, points), indent=2))
        else:
            print(display.physical_text(stanza, points))
        return EXIT_OK
    found = backup.list_backups(settings, _given_folder(args.dir))
    print(json.dumps([b.to_dict() for b in found], indent=2) if args.json else display.backups_text(found))
    if not args.json and not args.dir and _keeps_physical(settings):
        print()
        try:
            print(display.physical_text(*_physical_listing(settings)))
        except OpsError as err:  # the dumps are listed whatever pgBackRest says
            print(f"pgBackRest: {err.message}")
    return EXIT_OK


def _keeps_physical(settings) -> bool:
    from opslib.backup import physical

    return physical.configured(settings)


def _physical_listing(settings):
    from opslib import pgbackrest, restorepoints
    from opslib.backup import physical

    stanza = physical.stanza_for(settings, physical.backup_policy(settings))
    return pgbackrest.info(stanza), restorepoints.restore_points(settings.records_dir)


def _physical_json(stanza, points) -> dict:
    import dataclasses

    return {
        "stanza": stanza.name,
        "status": stanza.status,
        "wal": [stanza.wal_min, stanza.wal_max],
        "backups": [dataclasses.asdict(b) for b in stanza.backups],
        "restore_points": [p.to_dict() for p in points],
    }


@command(
    "prune-backups",
    arg("--keep", type=int, metavar="N", help="how many of the newest to keep (>= 1); with --pgbackrest, full backups"),
    arg("--dir", metavar="DIR", help="folder to prune (default: OPSLIB_BACKUPS_DIR)"),
    arg("--pgbackrest", action="store_true", help="apply the retention with pgBackRest's expire (default: the policy's retention_full)"),
)
def prune_backups(settings, args) -> int:
    """delete old backups, never the newest verified one (pgBackRest's: its expire)"""
    from opslib import backup
    from opslib.errors import InvalidInput

    if args.pgbackrest:
        if args.dir:
            raise InvalidInput("prune-backups --pgbackrest takes no --dir")
        from opslib.backup import physical

        left = physical.expire(settings, args.keep)
        print(f"pgBackRest stanza {left.name}: {len(left.backups)} backup(s) kept, WAL from {left.wal_min}")
        return EXIT_OK
    if args.keep is None:
        raise InvalidInput("prune-backups needs --keep N (or --pgbackrest, which takes the policy's retention)")

    deleted = backup.prune_backups(settings, args.keep, _given_folder(args.dir))
    print("\n".join(f"deleted {p}" for p in deleted) or "nothing to delete")
    return EXIT_OK


@command("verify-setup")
def verify_setup(settings, args) -> int:
    """connectivity, versions, client tools, Alembic config, backups folder"""
    from opslib import checks, display  # checks only here and for `check`: it imports Alembic and the linter (0.1 s)

    report = checks.verify_setup(settings)
    print(display.checks_text(report))
    report.raise_for_failure()
    return EXIT_OK


@command(
    "check",
    arg("--target", default="head", metavar="REV", help="revision the deploy would go to (default head)"),
    arg("--expect-env", metavar="ENV", help="fail unless OPSLIB_ENV is this label"),
    arg(
        "--max-backup-age", type=float, default=24.0, metavar="HOURS",
        help="production: a verified backup younger than this counts (default 24)",
    ),
    arg(
        "--write-baseline", action="store_true",
        help="accept today's blocking lint findings in the project's opslib.toml (needs --reason)",
    ),
    arg("--reason", metavar="TEXT", help="for --write-baseline: why these findings are accepted"),
    arg(
        "--new", action="store_true",
        help="also judge the revisions added on this git branch: a vague message blocks there (naming rule)",
    ),
    arg("--base", metavar="REF", help="for --new: the branch to compare with (default origin/HEAD, main…)"),
    arg("--json", action="store_true"),
)  # fmt: skip
def check(settings, args) -> int:
    """pre-deploy checks: heads, pending revisions, squawk lint, naming, drift, backup"""
    from opslib import checks, display, migrate
    from opslib.errors import InvalidInput

    if args.reason is not None and not args.write_baseline:
        raise InvalidInput("--reason goes with --write-baseline")
    baseline = (args.reason or "") if args.write_baseline else None
    if baseline is not None and not baseline.strip():
        raise InvalidInput('--write-baseline needs a reason: --reason "accepted when adopting opslib"')
    if args.base and not args.new:
        raise InvalidInput("--base goes with --new")
    new = None
    if args.new:
        from opslib import branch

        _, new = branch.new_revisions(settings, args.base)
    report = checks.pre_deploy(
        migrate.Target(settings), args.target, expect_env=args.expect_env, max_backup_age_h=args.max_backup_age,
        baseline_reason=baseline, new_revisions=new,
    )  # fmt: skip
    print(json.dumps(report.to_dict(), indent=2) if args.json else display.checks_text(report))
    report.raise_for_failure()
    return EXIT_OK
