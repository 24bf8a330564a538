"""Run the real Atropos API server (atroposlib's ``run-api``) as a subprocess for tests.

Tests of the bridge talk to the genuine server rather than a mock, because the behaviours that matter
(state lost on restart, HTTP 500 after ``/reset_data``, gzip request bodies) are properties of that
server. ``stop()`` kills it (like a crash: all state is lost) and ``start()`` brings it back on the same
port, which is how tests simulate a restart.

    with AtroposAPI() as api:
        httpx.get(api.url + "/status")
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AtroposAPI:
    """One ``run-api`` process on ``127.0.0.1:port``; a context manager that always kills it on exit."""

    def __init__(self, port: int | None = None, *, startup_timeout_s: float = 30.0) -> None:
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        # The server's stdout+stderr, shown if it dies; removed by close().
        fd, log_path = tempfile.mkstemp(prefix="run-api-", suffix=".log")
        os.close(fd)
        self._log_path = Path(log_path)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> AtroposAPI:
        """Start the server and wait until ``GET /`` answers; raises with the server's output if it dies."""
        if self.running:
            raise RuntimeError(f"Atropos API already running at {self.url}")
        run_api = Path(sys.executable).parent / "run-api"
        if not run_api.exists():
            raise FileNotFoundError(f"{run_api} not found: install atroposlib (pip install -e '.[atropos]')")
        cmd = [str(run_api), "--host", "127.0.0.1", "--port", str(self.port)]
        with self._log_path.open("wb") as log:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()
        return self

    def stop(self) -> None:
        """Kill the server (SIGKILL, like a crash) and wait for it; a no-op when it is not running."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(timeout=10)
        self._proc = None

    def restart(self) -> None:
        """Kill and start again on the same port: every bit of the server's state is lost."""
        self.stop()
        self.start()

    def output(self) -> str:
        """What the server printed since the last ``start()``."""
        return self._log_path.read_bytes().decode(errors="replace") if self._log_path.exists() else ""

    def close(self) -> None:
        self.stop()
        self._log_path.unlink(missing_ok=True)

    def __enter__(self) -> AtroposAPI:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"run-api exited with code {self._proc.returncode} before answering:\n{self.output()}"
                )
            # The log line proves that *this* process bound the port (another server may answer there).
            if "Uvicorn running on" in self.output():
                try:
                    if httpx.get(self.url + "/", timeout=1.0).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(
            f"run-api did not answer at {self.url} within {self.startup_timeout_s} s:\n{self.output()}"
        )
