"""Driving an `opslib open` session as JupyterLab's front end does: through the Jupyter server's REST API
(sessions, contents) and the kernel the server started (jupyter_client, on its connection file).

Nothing is simulated: the server is the JupyterLab that `opslib open` started, with its save hooks, and
the kernel is the one it started for the run's notebook, with the run's environment.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
from jupyter_client import BlockingKernelClient

from opslib.autoseal import AUTOSAVE_S

from .conftest import OPSLIB


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabSession:
    """`opslib open RUNBOOK` running in ``work``, with a token and a port of its own."""

    def __init__(self, work: Path, env: dict, runbook: str = "deploy", *params: str, opslib: str = OPSLIB):
        self.work, self.token, self.port = work, secrets.token_hex(8), free_port()
        self.runtime = work / "jupyter-runtime"
        work.mkdir(parents=True, exist_ok=True)
        full = {k: v for k, v in os.environ.items() if not k.startswith(("OPSLIB_", "DATABASE_URL", "JUPYTER"))}
        full.update(env, JUPYTER_TOKEN=self.token, JUPYTER_RUNTIME_DIR=str(self.runtime))
        args = [opslib, "open", runbook, *params, "--", "--no-browser", f"--port={self.port}"]
        earlier = set((work / "records").glob("*.ipynb"))
        self.log = open(work / "opslib-open.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, cwd=work, env=full, stdout=self.log, stderr=subprocess.STDOUT)
        self.client: BlockingKernelClient | None = None
        self.autosave_errors: list[str] = []  # saves the server refused (Lab shows each as an error dialog)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.api("GET", "/api/status")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"JupyterLab did not start: {self.output()}") from None
                time.sleep(0.2)
        (self.notebook,) = set((work / "records").glob("*.ipynb")) - earlier

    @property
    def url(self) -> str:
        """JupyterLab's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """What `opslib open` and JupyterLab printed so far."""
        if not self.log.closed:
            self.log.flush()
        return (self.work / "opslib-open.log").read_text()

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        """One call of the Jupyter server's REST API, with the session's token."""
        request = urllib.request.Request(
            f"{self.url}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            return json.loads(reply.read() or b"{}")

    def start_kernel(self) -> dict:
        """Open the run's notebook as Lab does: a session, whose kernel the server starts."""
        session = self.api(
            "POST", "/api/sessions", {"path": self.notebook.name, "type": "notebook", "kernel": {"name": "python3"}}
        )
        connection = self.runtime / f"kernel-{session['kernel']['id']}.json"
        deadline = time.monotonic() + 30
        while not connection.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self._connect(connection)
        return session

    def _connect(self, connection: Path) -> None:
        self.client = BlockingKernelClient(connection_file=str(connection))
        self.client.load_connection_file()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def reconnect(self) -> None:
        """New channels to the kernel after the server restarted it, as Lab's page makes. The old client's
        heartbeat channel saw the kernel stop and calls it dead for a while, even once the new process
        answers on the same ports: waiting on it was what made restarts flaky."""
        connection = Path(self.client.connection_file)
        self.client.stop_channels()
        self._connect(connection)

    def run_cells(self, nb, until: str | None = None, after: str | None = None, autosave: bool = True) -> None:
        """Execute the notebook's code cells in order, keeping their outputs in ``nb`` as Lab keeps them in its
        model (a display updated in place by its id, the count set when a cell ends): all of them, or from the
        one after the first whose source holds ``after``, up to the first that holds ``until``. With
        ``autosave``, ``nb`` is saved every AUTOSAVE_S seconds while it changes, as the run's JupyterLab does
        (`opslib open` turns its autosave on); a save the server refuses is kept in ``autosave_errors``."""
        code = [c for c in nb.cells if c.cell_type == "code"]
        if until is not None:
            code = code[: next(i for i, c in enumerate(code) if until in c.source) + 1]
        if after is not None:
            code = code[next(i for i, c in enumerate(code) if after in c.source) + 1 :]
        lock, changed, stop = threading.Lock(), threading.Event(), threading.Event()
        saver = threading.Thread(target=self._autosave, args=(nb, lock, changed, stop), daemon=True)
        if autosave:
            saver.start()
        displays: dict[str, object] = {}
        try:
            for cell in code:
                with lock:
                    cell.outputs, cell.execution_count = [], None
                changed.set()
                msg_id = self.client.execute(cell.source, store_history=True)
                while True:
                    msg = self.client.get_iopub_msg(timeout=300)
                    if msg["parent_header"].get("msg_id") != msg_id:
                        continue
                    kind = msg["msg_type"]
                    if kind == "status" and msg["content"]["execution_state"] == "idle":
                        break
                    with lock:
                        if kind == "update_display_data":
                            shown = displays.get(msg["content"].get("transient", {}).get("display_id"))
                            if shown is not None:
                                shown.data, shown.metadata = msg["content"]["data"], msg["content"]["metadata"]
                        elif kind in ("stream", "display_data", "execute_result", "error"):
                            output = nbformat.v4.output_from_msg(msg)
                            cell.outputs.append(output)
                            if display_id := msg["content"].get("transient", {}).get("display_id"):
                                displays[display_id] = output
                        else:
                            continue
                    changed.set()
                reply = self.client.get_shell_msg(timeout=60)
                with lock:
                    cell.execution_count = reply["content"].get("execution_count")
                changed.set()
        finally:
            stop.set()
            if autosave:
                saver.join()

    def _autosave(self, nb, lock: threading.Lock, changed: threading.Event, stop: threading.Event) -> None:
        while True:
            stopping = stop.wait(AUTOSAVE_S)
            if changed.is_set():
                changed.clear()
                with lock:
                    content = copy.deepcopy(nb)
                try:
                    self.save(content)
                except urllib.error.HTTPError as err:
                    self.autosave_errors.append(f"{err.code}: {err.read().decode(errors='replace')}")
            if stopping:
                return

    def read(self):
        """The run's notebook as it is on disk."""
        return nbformat.read(self.notebook, as_version=4)

    def save(self, nb) -> None:
        """Save as Lab does (PUT /api/contents), which runs the server's save hooks."""
        self.api("PUT", f"/api/contents/{self.notebook.name}", {"type": "notebook", "format": "json", "content": nb})

    def kernel_says(self, code: str) -> str:
        """What ``code`` prints in the run's kernel (its first stream output)."""
        msg_id = self.client.execute(code)
        while True:
            msg = self.client.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
                return msg["content"]["text"].strip()

    def kernel_pid(self) -> int:
        """The kernel's process id."""
        return int(self.kernel_says("import os; print(os.getpid())"))

    def stop(self, timeout: float = 60) -> int:
        """End JupyterLab as an operator does with Ctrl-C twice (here SIGTERM to `opslib open`); its exit code."""
        if self.client is not None:
            self.client.stop_channels()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self.log.close()
        return code
