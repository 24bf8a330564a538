"""The suite's leftover-process check (tests/conftest.py) fails a run that leaves a process behind,
names it and kills it, even when the process escaped into its own session and its parent is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run_pytest(directory: Path, body: str) -> subprocess.CompletedProcess:
    (directory / "conftest.py").write_text(
        "from tests.conftest import *  # noqa: F403 - the hooks under test\n"
    )
    (directory / "test_case.py").write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": str(REPO), "ATROPOS_MEGATRON_LEFTOVER_GRACE_S": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(directory),
               str(directory / "test_case.py")]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=directory)


def test_a_process_left_behind_fails_the_run_and_is_killed(tmp_path):
    pid_file = tmp_path / "pid"
    result = _run_pytest(
        tmp_path,
        f"""
        import subprocess, sys
        def test_leaks():
            # a grandchild in its own session whose parent exits at once: an orphan
            subprocess.run([sys.executable, "-c", "import subprocess, sys; p = subprocess.Popen(['sleep', '617'], "
                            "start_new_session=True); open({str(pid_file)!r}, 'w').write(str(p.pid))"], check=True)
        """,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "leftover processes" in output and "sleep 617" in output, output
    assert not _alive(int(pid_file.read_text())), "the leftover was not killed"  # before pytest exited


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_a_clean_run_passes(tmp_path):
    result = _run_pytest(
        tmp_path,
        """
        import subprocess
        def test_waits_for_its_child():
            subprocess.run(["sleep", "0"], check=True)
        """,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "leftover processes" not in result.stdout
