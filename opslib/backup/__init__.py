"""Backups an operator can trust: pg_dump archives with manifests, verification, restore and clone.

A backup is ``<database>_<UTC yyyymmddTHHMMSSZ>_<revision>.dump`` (pg_dump custom format) with a
``.json`` manifest beside it (the design's backup contract). Both are written under temporary names
and renamed only once complete and checksummed, so an interrupted backup never leaves a file under a
final name. Per-table row counts and the Alembic revision are read in the very snapshot pg_dump
dumps (``pg_export_snapshot`` + ``pg_dump --snapshot``), so a restore can be checked against them.

A verification's outcome is kept in ``<stem>.verify.json``: the manifest itself is never rewritten.

What a killed run leaves is cleaned up by the next one: a backup removes the partial dumps no live
writer holds (each writer holds an ``flock`` on its partial file, and its pg_dump inherits it), and a
restore over the target drops the staging databases no running restore holds (each holds an advisory
lock named after its staging database). Client programs die with opslib (:func:`pgtools.child_options`).

The package's modules, lowest first; each imports only those before it (and lower opslib modules):
``manifest`` (names, stamps, the manifest, checksums, row counts), ``programs`` (pg_dump and
pg_restore waited for, their failures told), ``partials`` (the partial files and their clean-up),
``dump`` (:func:`backup`), ``verify`` (:func:`verify_backup`), ``staging`` (the staging databases of
restores and their clean-up), ``restoring`` (:func:`restore`), ``cloning`` (:func:`clone`) and
``listing`` (:func:`list_backups`, :func:`prune_backups`). This module only re-exports their API.
"""

from __future__ import annotations

from opslib.backup.cloning import FILE_COPY_FROM_BYTES, CloneResult, clone, clone_strategy
from opslib.backup.dump import BackupResult, backup
from opslib.backup.listing import BackupInfo, list_backups, prune_backups
from opslib.backup.manifest import (
    MANIFEST_FORMAT,
    STAMP,
    manifest_path,
    read_manifest,
    row_counts,
    sha256_of,
    verification_path,
)
from opslib.backup.partials import remove_stale_partials
from opslib.backup.programs import _wait_for_exit as _wait_for_exit  # tests wait on a program with it
from opslib.backup.restoring import RestoreResult, restore
from opslib.backup.staging import (
    CleanupResult,
    StagingDatabase,
    cleanup_restores,
    leftover_restores,
    staging_databases,
    staging_prefix,
)
from opslib.backup.verify import verify_backup

__all__ = [
    "FILE_COPY_FROM_BYTES",
    "MANIFEST_FORMAT",
    "STAMP",
    "BackupInfo",
    "BackupResult",
    "CleanupResult",
    "CloneResult",
    "RestoreResult",
    "StagingDatabase",
    "backup",
    "cleanup_restores",
    "clone",
    "clone_strategy",
    "leftover_restores",
    "list_backups",
    "manifest_path",
    "prune_backups",
    "read_manifest",
    "remove_stale_partials",
    "restore",
    "row_counts",
    "sha256_of",
    "staging_databases",
    "staging_prefix",
    "verification_path",
    "verify_backup",
]
