"""Sealing a JupyterLab run without anyone pressing Ctrl+S.

An interactive run (`opslib open`) is sealed by a save of its notebook after its last step, so that the
ledger vouches for the notebook the operator saw. `opslib open` turns on JupyterLab's autosave for the run
(every ``AUTOSAVE_S`` seconds, see :mod:`opslib.lab`); this module is the rest of the hand-over:

- the kernel, when the run ends (its summary, or a step that failed or was refused), shows a *seal mark*,
  an output tagged with the run's id, and waits in the same cell until the ledger holds the run's ending,
  then turns the mark into "sealed in the ledger" with the entry's hash (:func:`await_seal`);
- the server's save hook seals only a save that holds the mark (:func:`has_seal_mark`), so an autosave
  caught between the kernel's last record and its last output never seals a notebook cut short;
- a save after the seal that differs from the sealed notebook only from the mark on (the mark's new
  text, the cell's count, the one-line error of a refused step) keeps the sealed file as it is, instead
  of failing on every autosave (:func:`only_the_seal_differs`). Any other change is refused.

The sealed notebook holds the mark as it was when saved ("sealing…"): a file cannot hold the hash of the
ledger entry that hashes it. The ledger entry, `opslib audit show` and the report give it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from opslib import audit
from opslib.display import Section

MARK = "opslib_seal"  # the output metadata key whose value is the run's id
AUTOSAVE_S = 2  # `opslib open` has JupyterLab save a run's notebook this often while it changes
# How long the last cell waits for the autosave that seals the run. JupyterLab stretches its autosave interval
# when saves are slow (a busy machine, a long notebook), so the wait is generous: nobody waits on it but the
# cell, which shows that it is sealing.
SEAL_WAIT_S = 60.0


def _mark_section(text: str) -> Section:
    return Section("Seal", text)


def await_seal(records_dir: Path, stem: str, run_id: str, outcome: str) -> str | None:
    """Show the seal mark, wait (in the cell) until the ledger holds the run's ending, and say so with the
    entry's hash; returns it, or None when nothing saved the notebook in time (the mark then says to save)."""
    from IPython.display import display  # noqa: PLC0415 -- only in a kernel

    metadata = {MARK: run_id}
    handle = display(
        _mark_section(
            f"{outcome}; sealing: JupyterLab saves this notebook within {AUTOSAVE_S} s, and that save seals "
            "it in the ledger"
        ),
        display_id=True,
        metadata=metadata,
    )
    deadline = time.monotonic() + SEAL_WAIT_S
    while time.monotonic() < deadline:
        entry = _ending(records_dir, stem)
        if entry is not None:
            handle.update(
                _mark_section(f"{outcome}; sealed in the ledger: entry {entry['hash']}"), metadata=metadata
            )
            return entry["hash"]
        time.sleep(0.25)
    handle.update(
        _mark_section(
            f"{outcome}; not sealed yet: save this notebook (Ctrl+S) and the save seals it in the ledger"
        ),
        metadata=metadata,
    )
    return None


def _ending(records_dir: Path, stem: str) -> dict | None:
    try:
        entries = audit.read_endings(records_dir)
    except (OSError, ValueError):  # read while a line is being appended: read again
        return None
    return next((e for e in entries if e.get("sidecar") == f"{stem}.json"), None)


def has_seal_mark(notebook: Any, run_id: str) -> bool:
    """Whether a saved notebook (its JSON) holds the seal mark of ``run_id``: the kernel had shown every
    output of the run's last step before it."""
    return _mark_at(notebook, run_id) is not None


def _mark_at(notebook: Any, run_id: str) -> tuple[int, int] | None:
    """(cell, output) of the seal mark of ``run_id``, if the notebook holds it."""
    cells = notebook.get("cells") if isinstance(notebook, dict) else None
    for i, cell in enumerate(cells if isinstance(cells, list) else []):
        outputs = cell.get("outputs") if isinstance(cell, dict) else None
        for k, output in enumerate(outputs if isinstance(outputs, list) else []):
            metadata = output.get("metadata") if isinstance(output, dict) else None
            if isinstance(metadata, dict) and metadata.get(MARK) == run_id:
                return i, k
    return None


def only_the_seal_differs(saved: Any, sealed: Any, run_id: str) -> bool:
    """Whether ``saved`` (a save after the seal) is the ``sealed`` notebook but for what follows the seal
    mark: the mark's own text, the outputs after it in its cell, and that cell's execution count. Anything
    of another shape than a notebook's differs."""
    try:
        return _before_the_mark(saved, run_id) == _before_the_mark(sealed, run_id) is not None
    except (AttributeError, TypeError, ValueError):  # a cell or an output that is not what a notebook holds
        return False


def _before_the_mark(notebook: Any, run_id: str) -> list | None:
    at = _mark_at(notebook, run_id)
    if at is None:
        return None
    shown = []
    for i, cell in enumerate(notebook["cells"]):
        outputs = cell.get("outputs") or []
        if i == at[0]:
            outputs = outputs[: at[1]]
        # Only what a cell is and showed: JupyterLab's bookkeeping (cell metadata, a count set when the
        # cell ended) is not part of the run.
        count = None if i == at[0] else cell.get("execution_count")
        shown.append((cell.get("cell_type"), _text(cell.get("source")), count, [_output(o) for o in outputs]))
    return shown


def _text(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(part, str) for part in value):
        return "".join(value)
    if isinstance(value, str) or value is None:
        return value or ""
    raise TypeError(f"not text: {type(value).__name__}")


def _output(output: Any) -> Any:
    """An output as compared: text split in lines or not is the same text; JSON data stays as it is."""
    if not isinstance(output, dict):
        raise TypeError(f"not an output: {type(output).__name__}")
    return {k: ({m: _joined(v) for m, v in v.items()} if k == "data" and isinstance(v, dict) else
                _joined(v) if k == "text" else v)
            for k, v in output.items() if k != "transient"}  # fmt: skip


def _joined(value: Any) -> Any:
    return "".join(value) if isinstance(value, list) and all(isinstance(p, str) for p in value) else value
