"""Run the real Atropos API server (atroposlib's ``run-api``) as a subprocess for tests.

Tests of the bridge talk to the genuine server rather than a mock, because the behaviours that matter
(state lost on restart, HTTP 500 after ``/reset_data``, gzip request bodies) are properties of that
server. ``stop()`` kills it (like a crash: all state is lost) and ``start()`` brings it back on the same
port, which is how tests simulate a restart.

    with AtroposAPI() as api:
        httpx.get(api.url + "/status")
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from tests.subprocess_server import SubprocessServer, free_port

__all__ = ["AtroposAPI", "free_port"]


class AtroposAPI(SubprocessServer):
    """One ``run-api`` process on ``127.0.0.1:port``; a context manager that always kills it on exit."""

    name = "run-api"

    def __init__(self, port: int | None = None, *, startup_timeout_s: float = 30.0) -> None:
        super().__init__(port, startup_timeout_s=startup_timeout_s)

    def command(self) -> list[str]:
        run_api = Path(sys.executable).parent / "run-api"
        if not run_api.exists():
            raise FileNotFoundError(f"{run_api} not found: install atroposlib (pip install -e '.[atropos]')")
        return [str(run_api), "--host", "127.0.0.1", "--port", str(self.port)]

    def ready(self) -> bool:
        # The log line proves that *this* process bound the port (another server may answer there).
        if "Uvicorn running on" not in self.output():
            return False
        try:
            return httpx.get(self.url + "/", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False
