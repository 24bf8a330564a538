"""A server process for tests: started on a free loopback port, its output kept, always killed.

The real peers of the integration tests (the Atropos API, the reference inference server) are
subprocesses with the same life cycle: ``start()`` launches and waits until the server answers,
``stop()`` kills it like a crash (``start()`` brings it back on the same port), ``close()`` also
removes its log. Subclasses say how to launch one (:meth:`command`) and when it is ready (:meth:`ready`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SubprocessServer:
    """One server process on ``127.0.0.1:port``; a context manager that always kills it on exit."""

    name = "server"  # in error messages

    def __init__(
        self, port: int | None = None, *, startup_timeout_s: float, env: Mapping[str, str] | None = None
    ) -> None:
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout_s = startup_timeout_s
        self.env = dict(env) if env else None  # set on top of this process's environment
        self._proc: subprocess.Popen[bytes] | None = None
        # The server's stdout+stderr, shown if it dies; removed by close().
        fd, log_path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
        os.close(fd)
        self._log_path = Path(log_path)

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        """One readiness probe (the process is alive when this is called)."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self):
        """Start the server and wait until it is ready; raises with the server's output if it dies."""
        if self.running:
            raise RuntimeError(f"{self.name} already running at {self.url}")
        with self._log_path.open("wb") as log:  # the child keeps its own descriptor
            env = {**os.environ, **self.env} if self.env else None  # None: inherit it unchanged
            self._proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
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

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None and self._proc is not None and self._proc.poll() is not None:
            print(f"{self.name} died (code {self._proc.returncode}):\n{self.output()}", file=sys.stderr)
        self.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self._proc.returncode} before answering:\n{self.output()}"
                )
            if self.ready():
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(
            f"{self.name} did not answer at {self.url} within {self.startup_timeout_s} s:\n{self.output()}"
        )
