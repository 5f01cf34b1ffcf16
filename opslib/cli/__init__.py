"""The `opslib` command: one function per command, registered with its arguments (:mod:`.commands`), in
modules named for what they operate: :mod:`.migrations`, :mod:`.backups`, :mod:`.runs`, :mod:`.audit`,
:mod:`.server`. :func:`main` is the console script."""

from opslib.cli.app import main

__all__ = ["main"]
