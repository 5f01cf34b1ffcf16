"""Interactive runs: `opslib open RUNBOOK` and the JupyterLab hooks that seal them.

`opslib open` makes the run's own notebook in the records folder from the template, with the
parameters injected as papermill injects them, and opens JupyterLab on it. That notebook is the run's
record; the template is never written. The Lab's kernels inherit the run's id, record stem and mode
(``interactive``), as a headless run's kernel does under `opslib run`.

The kernel ends the run at its last step (the summary, or a step that failed or was refused) but does not
seal it: the notebook is not on disk yet. The run's JupyterLab has settings of its own (:func:`lab_folders`:
the user's copied, autosave every few seconds, no news prompt) and no earlier workspace; the kernel shows a
seal mark and waits for the autosave that holds it (:mod:`opslib.autoseal`), which seals the run
(:func:`after_save`, a ``post_save_hook``), hashing the notebook as saved into the ledger. A later save that
changes more than the mark is refused (:func:`before_save`). A session that ends unsaved, or a kernel that
dies, leaves the run to be sealed once nothing holds its live mark: by `opslib open` itself when JupyterLab
exits, or by the next `opslib audit`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from opslib import audit, autoseal, notebooks, runner, sealing, workflows
from opslib.config import Settings, is_runbook_template, load_settings
from opslib.errors import ConfigError, InvalidInput, PreconditionFailed
from opslib.record import RunRecord

MODE = "interactive"
_HANDOVER_POLL_S = 0.5
LAB_STOP_GRACE_S = 15.0  # how long JupyterLab has to stop on SIGTERM before it is killed
# The settings each run's JupyterLab gets over the user's own (which are copied, never written): no news
# prompt and no update check (an operations session asks nothing of the internet), and autosave every
# autoseal.AUTOSAVE_S seconds, so that the notebook is saved, and sealed, without anyone pressing Ctrl+S.
RUN_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": True, "autosaveInterval": autoseal.AUTOSAVE_S},
}


def open_run(
    settings: Settings,
    name: str,
    pairs: Sequence[tuple[str, str]] = (),
    env: str | None = None,
    lab_args: Sequence[str] = (),
) -> RunRecord:
    """Make a run of runbook ``name`` with its own notebook, open JupyterLab on it (``lab_args`` go to
    JupyterLab: ``--no-browser``, ``--port N``), and return the run's record once JupyterLab has exited.

    The record is then sealed (saved after the summary), abandoned (sealed as such here), or still held
    by a kernel that outlived JupyterLab (the next `opslib audit` seals it when that kernel is gone).
    """
    if importlib.util.find_spec("jupyterlab") is None:
        raise ConfigError("`opslib open` needs JupyterLab: pip install 'opslib[lab]' (or `make lab`)")
    # Bad parameters (exit 2) and what the environment forbids (exit 3: reset in production, a backup
    # turned off there) are refused here, by the code the kernel's start cell runs again, before any
    # notebook, record or JupyterLab exists.
    workflows.get(name).checked_parameters(runner.coerce(name, pairs), env or settings.env)
    run = runner.prepare(settings, name, pairs, env, MODE)
    if run.live is None:  # refused before it started (a secret in a parameter): sealed as invalid
        raise InvalidInput(run.first.error or "the parameters were refused")
    try:
        notebooks.papermill().execute_notebook(
            str(run.template),
            str(run.notebook),
            parameters=run.values,
            prepare_only=True,  # injected as papermill does for a headless run, and not executed
            progress_bar=False,
            log_output=False,
        )
        handover = threading.Thread(target=_hand_over_when_a_kernel_starts, args=(run,), daemon=True)
        handover.start()
        _run_lab(run, lab_args)
    finally:
        run.live.release()  # whether or not a kernel took the run: nothing of this process writes it now
    sealed = {record.run_id: record for record in sealing.seal_abandoned(settings, "open")}
    # Sealed as abandoned here, its ending is in the ledger (its files stay as the kernel left them).
    return sealed.get(run.first.run_id) or audit.load_record(run.records, run.stem) or run.first


def _hand_over_when_a_kernel_starts(run: runner.Prepared) -> None:
    """Let go of the live mark once a kernel holds its own (it has written its pid into the sidecar):
    from then on the run lives exactly as long as its kernel, so a kernel killed mid-run is abandoned
    at once, even while JupyterLab stays open."""
    me = os.getpid()
    while run.live is not None and run.live.held:
        try:
            record = audit.read_sidecar(run.records, run.stem) or {}
        except (OSError, ValueError):  # caught mid-write, or unreadable for a moment: looked at again
            record = {}
        if any(pid != me for pid in record.get("pids") or []) and record.get("steps"):
            run.live.release()
            return
        threading.Event().wait(_HANDOVER_POLL_S)


def lab_folders(into: Path) -> tuple[Path, Path]:
    """(user settings, workspaces) of one run's JupyterLab, made in ``into``: the user's own settings copied
    (their theme and keys stay theirs) with :data:`RUN_SETTINGS` over them, and no workspace, so that the
    run's notebook is the only one open. The user's own folders are read, never written."""
    from jupyterlab.commands import (
        get_user_settings_dir,  # JupyterLab's own rule (JUPYTERLAB_SETTINGS_DIR, …)
    )

    settings, workspaces = into / "user-settings", into / "workspaces"
    theirs = Path(get_user_settings_dir())
    if theirs.is_dir():
        try:
            shutil.copytree(theirs, settings, ignore=shutil.ignore_patterns("*.lock"), symlinks=True,
                            ignore_dangling_symlinks=True, dirs_exist_ok=True)  # fmt: skip
        except (OSError, shutil.Error) as err:  # an unreadable file of theirs: what could be read is kept
            print(f"opslib open: some of your JupyterLab settings were not copied for this run: {err}", file=sys.stderr)
    workspaces.mkdir(parents=True)
    for name, values in RUN_SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**_settings_file(path), **values}, indent=2))
    return settings, workspaces


def _settings_file(path: Path) -> dict:
    """A JupyterLab settings file's values (JSON5, comments allowed); {} when absent or unreadable."""
    import json5  # JupyterLab's own reader of settings files

    try:
        found = json5.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _run_lab(run: runner.Prepared, lab_args: Sequence[str]) -> None:
    """JupyterLab on the run's notebook, its root the records folder (the templates are out of its reach),
    with the save hooks, and settings and workspaces of its own (:func:`lab_folders`); waits until it exits.
    Ctrl-C is JupyterLab's to handle (it asks to confirm)."""
    with tempfile.TemporaryDirectory(prefix=f"opslib-lab-{run.first.run_id}-") as own:
        _run_lab_in(run, lab_args, *lab_folders(Path(own)))


def _run_lab_in(run: runner.Prepared, lab_args: Sequence[str], settings: Path, workspaces: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        str(run.notebook),
        f"--ServerApp.root_dir={run.records}",
        # Kernels start in this folder (the project's), as under `opslib run`: an env.py importing the
        # application (Alembic's prepend_sys_path = .) and the record's git commit both depend on it.
        f"--MappingKernelManager.root_dir={os.getcwd()}",
        "--FileContentsManager.pre_save_hook=opslib.lab.before_save",
        "--FileContentsManager.post_save_hook=opslib.lab.after_save",
        # An operations session asks nothing of the internet: no news feed, no update check, no prompt.
        "--LabApp.news_url=None",
        # One run, one Lab: its own settings (the user's copied, with autosave) and no earlier workspace.
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={workspaces}",
        # No terminals: a shell started there would inherit the run's identity without being its notebook.
        "--ServerApp.terminals_enabled=False",
        "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
        *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        *lab_args,
    ]
    print(f"opslib open: run {run.first.run_id}, notebook {run.notebook}", file=sys.stderr)
    print(
        "opslib open: run the cells in order; when the run ends, JupyterLab's autosave seals its record",
        file=sys.stderr,
    )
    lab = subprocess.Popen(command, env={**os.environ, **run.kernel_env})
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal sends it to JupyterLab too

    # jupyter_server can hang in its shutdown when a kernel is being restarted (after one died): it is
    # killed after a grace period. Its kernels then end on their own (they watch their parent's pid).
    kill_later = threading.Timer(LAB_STOP_GRACE_S, lambda: lab.poll() is None and lab.kill())
    kill_later.daemon = True

    def stop_lab(signum, frame) -> None:
        lab.terminate()
        if not kill_later.is_alive():
            kill_later.start()

    signal.signal(signal.SIGTERM, stop_lab)
    try:
        lab.wait()
    finally:
        kill_later.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_files(os_path: str) -> tuple[Path, str] | None:
    """(records folder, stem) when ``os_path`` is a run's notebook: a sidecar of the same name is beside it."""
    path = Path(os_path)
    if path.suffix != ".ipynb" or not audit.sidecar_path(path.parent, path.stem).is_file():
        return None
    return path.parent, path.stem


def before_save(model: dict, path: str, contents_manager, **kwargs) -> None:
    """JupyterLab's ``pre_save_hook``: refuse to write a template, or a run's notebook once it is sealed."""
    from tornado.web import HTTPError

    os_path = Path(contents_manager._get_os_path(path)).resolve()
    if is_runbook_template(os_path):
        raise HTTPError(403, f"{os_path.name} is a runbook template: runs never change it; `opslib open` makes a copy")
    found = _run_files(str(os_path))
    try:
        sealed = found is not None and found[1] in audit.vouched_stems(found[0])
    except (OSError, ValueError) as err:  # jupyter_server saves anyway on any error but an HTTPError
        raise HTTPError(500, f"cannot tell whether run {found[1]} is sealed ({err}): not saved") from None
    if sealed:
        run_id = found[1].rsplit("_", 1)[-1]
        on_disk = _json_of(os_path)
        # only_the_seal_differs never raises: anything but an HTTPError here would let the save go ahead.
        if autoseal.only_the_seal_differs(model.get("content"), on_disk, run_id):
            # The autosave after the seal (the mark now says "sealed", the cell has ended): the sealed
            # notebook is written back as it is, so the file the ledger vouches for does not change.
            model["content"] = on_disk
            return
        raise HTTPError(409, f"run {found[1]} is sealed in the ledger: its notebook no longer changes")


def _json_of(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def after_save(model: dict, os_path: str, contents_manager) -> None:
    """JupyterLab's ``post_save_hook``: a save of a run's notebook after its summary seals the run."""
    found = _run_files(os_path)
    if found is None:
        return
    records, stem = found
    if not autoseal.has_seal_mark(_json_of(Path(os_path)), stem.rsplit("_", 1)[-1]):
        return  # its kernel has not shown the run's last output yet: a later save seals it
    record = sealing.seal_finished(_settings_for(records), stem, "the JupyterLab save of its notebook")
    if record is not None:
        contents_manager.log.info("opslib: run %s sealed (%s), with its notebook", record.run_id, record.outcome)


def _settings_for(records: Path) -> Settings:
    return replace(load_settings(), records_dir=records)


def seal(settings: Settings, run_id: str) -> tuple[RunRecord, bool]:
    """`opslib audit seal RUN_ID`: seal a run its kernel has ended, with its notebook as saved now, or
    one whose processes are all gone as ``abandoned``. Returns the record and whether this call sealed it."""
    records = Path(settings.records_dir)
    if not re.fullmatch(r"[0-9A-Za-z]+", run_id):
        raise InvalidInput(f"{run_id!r} is not a run id: `opslib audit list` shows them")
    stems = sorted(p.stem for p in records.glob(f"*_{run_id}.json"))
    if not stems:
        raise InvalidInput(f"no run {run_id} in {records}: `opslib audit list` shows them")
    stem = stems[0]
    if stem in audit.vouched_stems(records):
        return audit.load_record(records, stem), False
    finished = sealing.seal_finished(settings, stem, "`opslib audit seal`")
    if finished is not None:
        return finished, True
    for record in sealing.seal_abandoned(settings, f"audit seal {run_id}", out_of_reach=run_id):
        if record.run_id == run_id:
            return record, True
    current = audit.load_record(records, stem)
    if current is not None and current.mode != "interactive":
        raise PreconditionFailed(f"run {run_id} is a {current.mode} run still in progress: its runner seals it")
    raise PreconditionFailed(
        f"run {run_id} is still in progress (a process holds it): run its summary cell, then save or seal again"
    )
