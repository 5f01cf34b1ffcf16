"""The backups in the backups folder: listed with their verification, and pruned."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from opslib.backup.manifest import manifest_path, read_manifest, verification_path
from opslib.config import Settings
from opslib.errors import InvalidInput, OpsError


@dataclass(frozen=True)
class BackupInfo:
    """One backup in the backups folder, as `opslib backups` lists it."""

    path: Path
    database: str
    started_at: str
    revisions: tuple[str, ...]
    size_bytes: int
    label: str | None
    verified: bool | None
    verified_at: str | None
    restore_tested: bool

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {**self.__dict__, "path": str(self.path), "revisions": list(self.revisions)}


def list_backups(settings: Settings, folder: Path | None = None) -> list[BackupInfo]:
    """The backups in the folder (those with a manifest), newest first."""
    folder = Path(folder or settings.backups_dir)
    found = []
    for dump in folder.glob("*.dump") if folder.is_dir() else ():
        try:
            manifest = read_manifest(dump)
        except OpsError:
            continue
        verified = verified_at = None
        tested = False
        if verification_path(dump).is_file():
            try:
                outcome = json.loads(verification_path(dump).read_text())
                verified, verified_at, tested = (
                    bool(outcome.get("ok")),
                    outcome.get("verified_at"),
                    bool(outcome.get("restore_test")),
                )
            except ValueError:
                pass
        found.append(
            BackupInfo(
                path=dump,
                database=manifest["database"]["name"],
                started_at=manifest["started_at"],
                revisions=tuple(manifest["revisions"]),
                size_bytes=manifest["size_bytes"],
                label=manifest.get("label"),
                verified=verified,
                verified_at=verified_at,
                restore_tested=tested,
            )
        )
    return sorted(found, key=lambda b: (b.started_at, b.path.name), reverse=True)


def prune_backups(settings: Settings, keep: int, folder: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` backups, never the newest verified one; returns what was deleted."""
    if not isinstance(keep, int) or keep < 1:
        raise InvalidInput(f"--keep must be a whole number of at least 1, not {keep!r}")
    backups = list_backups(settings, folder)
    newest_verified = next((b for b in backups if b.verified), None)
    deleted = []
    for info in backups[keep:]:
        if info is newest_verified:
            continue
        for path in (info.path, manifest_path(info.path), verification_path(info.path)):
            path.unlink(missing_ok=True)
        deleted.append(info.path)
    return deleted
