"""The revisions added on the current git branch, for ``opslib check --new``.

Naming is a rule for new revisions: the messages already in a project's history (an upstream "New fixes")
are history, while a revision added on the branch under review can still be renamed. A revision is new
when its file is added since the branch left its base (``git merge-base HEAD BASE``), or not yet committed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from opslib import migrate
from opslib.config import Settings
from opslib.errors import ConfigError, InvalidInput

# Tried in order when no base is named: the remote's default branch, then the usual local names.
DEFAULT_BASES = ("origin/HEAD", "origin/main", "origin/master", "main", "master")


def _git(folder: Path, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ConfigError("check --new needs git, which is not installed") from None


def new_revisions(settings: Settings, base: str | None = None) -> tuple[str, dict[str, migrate.RevisionInfo]]:
    """(the base compared with, the revisions whose files are new on this branch, by id).

    ``base`` is a branch or commit; by default the first of :data:`DEFAULT_BASES` that exists. Outside
    a git repository, or with no base to compare with, it is :class:`InvalidInput` (exit 2).
    """
    script = migrate.script_directory(settings)
    folder = Path(script.dir).resolve()
    top = _git(folder, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise InvalidInput(f"check --new compares with git, but {folder} is not in a git repository")
    candidates = (base,) if base else DEFAULT_BASES
    found = next((b for b in candidates if _git(folder, "rev-parse", "--verify", "--quiet", f"{b}^{{commit}}").returncode == 0), None)
    if found is None:
        named = repr(base) if base else f"none of {', '.join(DEFAULT_BASES)} exists"
        raise InvalidInput(f"check --new: no base branch to compare with ({named}): name one with --base REF")
    fork = _git(folder, "merge-base", "HEAD", found)
    if fork.returncode != 0:
        raise InvalidInput(f"check --new: this branch has no common history with {found}: name a base with --base REF")
    locations = [str(Path(loc).resolve()) for loc in script._version_locations if Path(loc).is_dir()]
    added = _git(folder, "diff", "--name-only", "--diff-filter=A", "-z", fork.stdout.strip(), "--", *locations)
    untracked = _git(folder, "ls-files", "--others", "--exclude-standard", "-z", "--", *locations)
    root = Path(top.stdout.strip())
    files = {
        (root / name).resolve() for name in added.stdout.split("\0") if name
    } | {(folder / name).resolve() for name in untracked.stdout.split("\0") if name}
    heads = set(script.get_heads())
    new = {
        s.revision: migrate._info(s, heads)
        for s in script.walk_revisions()
        if s.path and Path(s.path).resolve() in files
    }
    return found, new
