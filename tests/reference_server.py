"""Run the reference SGLang-protocol server (``atropos-megatron serve``) as a subprocess for tests.

Tests of SGLang client code talk to a real server process over HTTP, exactly as they would to SGLang,
so the protocol (routes, JSON, status codes, pickled payloads crossing processes) is what is tested.

    with ReferenceServer(model_dir, tokenizer_path=tok_dir, admin_api_key="k") as server:
        httpx.post(server.url + "/generate", json={...})
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.atropos_api import free_port


class ReferenceServer:
    """One ``serve`` process on ``127.0.0.1:port``; keyword options become ``--flag value`` arguments."""

    def __init__(self, model_dir, *, startup_timeout_s: float = 60.0, **cli_options: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout_s = startup_timeout_s
        self._args = ["--model", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in cli_options.items():
            if value is not None:
                self._args += [f"--{key.replace('_', '-')}", str(value)]
        self._proc: subprocess.Popen[bytes] | None = None
        fd, log_path = tempfile.mkstemp(prefix="reference-server-", suffix=".log")
        os.close(fd)
        self._log_path = Path(log_path)

    def start(self) -> ReferenceServer:
        cmd = [sys.executable, "-m", "atropos_megatron.cli", "serve", *self._args]
        with self._log_path.open("wb") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()
        return self

    def output(self) -> str:
        """What the server printed so far (its log: weight updates, errors)."""
        return self._log_path.read_bytes().decode(errors="replace") if self._log_path.exists() else ""

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None
        self._log_path.unlink(missing_ok=True)

    def __enter__(self) -> ReferenceServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None and self._proc is not None and self._proc.poll() is not None:
            print(f"reference server died (code {self._proc.returncode}):\n{self.output()}", file=sys.stderr)
        self.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"serve exited with code {self._proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.close()
        raise TimeoutError(f"serve did not answer at {self.url} within {self.startup_timeout_s} s")
