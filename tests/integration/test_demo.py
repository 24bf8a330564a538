"""The demo end to end (slow), and the process supervisor it runs on (fast, with real child processes).

The end-to-end test runs ``atropos_megatron.demo.run.run_demo`` with every real process (Atropos API,
reference server, bridge, trainer, environment) and checks that the reward rises and that every
process ended cleanly. The supervisor tests use small Python children to check the failure paths a
demo run should never hit: a role dying, a probe never answering, a child ignoring SIGTERM, the
supervisor itself being killed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from atropos_megatron.launch.supervisor import (
    Role,
    RoleFailed,
    Supervisor,
    free_ports,
    http_probe,
    port_probe,
)

PY = sys.executable
SLEEP = [PY, "-c", "import time; time.sleep(600)"]


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait_dead(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------------------------------------
# The demo
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_reward_rises_and_every_process_exits_cleanly(tmp_path, report):
    from atropos_megatron.demo.run import run_demo

    result = run_demo(tmp_path / "demo", steps=40, progress=False, timeout_s=900)
    summary = result.summary
    report(
        f"reward {summary.first_mean:.3f} -> {summary.last_mean:.3f} ({summary.gain:+.3f}) in "
        f"{summary.last_step} steps, {result.wall_s:.0f} s"
    )
    assert summary.last_step == 40
    assert summary.gain >= 0.4, f"reward rose only {summary.gain:+.3f}"
    assert set(result.exits) == {"atropos-api", "inference", "bridge", "trainer", "env"}
    assert result.exits["trainer"].how == "finished"
    assert all(e.clean for e in result.exits.values()), result.exits
    assert result.plot_path.read_bytes().startswith(b"\x89PNG")
    # Logs a person reads: no line per poll, request or push.
    logs = result.run_dir / "logs"
    bridge_log = (logs / "bridge.log").read_text()
    assert "HTTP Request:" not in bridge_log and bridge_log.count("weight push") <= 2
    assert bridge_log.count("prefix cache not flushed") <= 1  # then counted: weights/cache_flushes_skipped
    assert '"GET /batch' not in (logs / "atropos-api.log").read_text()
    assert (logs / "inference.log").read_text().count("weights updated") == 1
    last = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert "weights/cache_flushes_skipped" in last


@pytest.mark.slow
def test_the_demo_learns_against_a_vllm_protocol_server(tmp_path, report):
    """``demo --engine vllm``: the reference server speaks stock vLLM 0.33's RL and token routes, the
    bridge pushes by ``distributed`` (gloo) through vLLM's weight-transfer sequence, and the environment
    samples through atroposlib's ``VLLMServer`` (``server_type: vllm``) at the bridge's proxy, which
    answers its ``/generate`` through vLLM's ``/inference/v1/generate``."""
    from atropos_megatron.config import load_config
    from atropos_megatron.demo.run import run_demo

    result = run_demo(tmp_path / "demo", steps=40, progress=False, timeout_s=900, engine="vllm")
    summary = result.summary
    report(
        f"vLLM protocol: reward {summary.first_mean:.3f} -> {summary.last_mean:.3f} ({summary.gain:+.3f}) "
        f"in {summary.last_step} steps, {result.wall_s:.0f} s"
    )
    assert result.engine == "vllm"
    assert summary.last_step == 40 and result.exits["trainer"].how == "finished"
    assert summary.gain >= 0.4, f"reward rose only {summary.gain:+.3f}"
    assert set(result.exits) == {"atropos-api", "inference", "bridge", "trainer", "env"}
    assert all(e.clean for e in result.exits.values()), result.exits
    weights = load_config(result.run_dir / "config.yaml").weights
    assert (weights.inference_engine, weights.transport, weights.pause_mode) == (
        "vllm",
        "distributed",
        "in_place",
    )
    logs = result.run_dir / "logs"
    inference_log = (logs / "inference.log").read_text()
    assert "reference server in vLLM mode" in inference_log and "weight transfer gloo" in inference_log
    assert "joined the weight transfer group as rank 1 (gloo)" in inference_log
    # The first update at INFO, the rest at DEBUG; the bridge reports every push reaching the server.
    assert inference_log.count("weights updated through vLLM's weight transfer (gloo)") == 1
    bridge_log = (logs / "bridge.log").read_text()
    assert "(distributed) to 1 server(s)" in bridge_log and "1/1 server(s) updated" in bridge_log
    assert "vLLM /generate proxy" in bridge_log
    # The log-probs the environment read through the proxy reached the trainer: on the first step
    # (the weights it samples with) they are the trainer's own.
    first = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rollout/logprob_abs_diff"] < 1e-5, first
    # The environment got atroposlib's vLLM server type (its config is printed at start-up).
    assert "server_type='vllm'" in (logs / "env.log").read_text()


LORA_MIN_GAIN = 0.3
"""The LoRA demo's least reward gain over 40 steps: below the 0.5 plateau's ~+0.4, far above 0."""


@pytest.mark.slow
@pytest.mark.parametrize("lora_sync", ["merged", "adapter"])
def test_the_lora_demo_learns_with_the_base_frozen(tmp_path, report, lora_sync):
    """``demo --lora 8``: adapters of rank 8 alone raise the reward, synced merged into the weights or
    as SGLang adapters through the bridge's proxy; checkpoints hold only the adapters."""
    from megatron.core import dist_checkpointing

    from atropos_megatron.demo.run import run_demo

    overrides = [f"weights.lora_sync={lora_sync}"]
    result = run_demo(
        tmp_path / "demo", steps=40, progress=False, timeout_s=900, lora_rank=8, overrides=overrides
    )
    summary = result.summary
    report(
        f"LoRA rank 8, {lora_sync} sync: reward {summary.first_mean:.3f} -> {summary.last_mean:.3f} "
        f"({summary.gain:+.3f}) in {summary.last_step} steps, {result.wall_s:.0f} s"
    )
    assert summary.last_step == 40 and result.exits["trainer"].how == "finished"
    # Rank-8 adapters sometimes stop at the task's 0.5 plateau in 40 steps (the prompt's alphabet
    # written without reading the prompt: examples/envs/alphabet_match.py): 0.121 -> 0.500 and
    # 0.091 -> 0.500 in 2 of 12 CI runs, where full fine-tuning never has. Reaching it is learning;
    # adapters that do not train stay at the start, ~0.1.
    assert summary.gain >= LORA_MIN_GAIN, f"reward rose only {summary.gain:+.3f}"
    assert all(e.clean for e in result.exits.values()), result.exits
    logs = result.run_dir / "logs"
    assert "LoRA rank 8" in (logs / "trainer.log").read_text()
    inference_log = (logs / "inference.log").read_text()
    if lora_sync == "adapter":  # one line for the first adapter loaded and unloaded, not one per step
        assert inference_log.count("LoRA adapter policy-v") == 2, inference_log
        assert "LoRA adapter proxy" in (logs / "bridge.log").read_text()
    else:
        assert "LoRA adapter" not in inference_log
    latest = result.run_dir / "checkpoints" / (result.run_dir / "checkpoints" / "latest").read_text().strip()
    saved = dist_checkpointing.load_tensors_metadata(str(latest))
    model_keys = [key for key in saved if not key.startswith("optimizer")]
    assert model_keys and all(".lora." in key for key in model_keys)


@pytest.mark.slow
def test_the_moe_demo_learns_with_rollout_routing_replay(tmp_path, report):
    """``demo --moe 4`` with routing replay: a Qwen3-MoE (4 experts, top-2) learns the task while the
    bridge captures the reference server's routed experts through its proxy and the trainer replays them:
    every token of every sequence, and on the first (on-policy) step exactly the experts its own routers
    choose."""
    from atropos_megatron.demo.run import run_demo

    replay = ["weights.capture_routed_experts=true", "grpo.routing_replay=true"]
    result = run_demo(
        tmp_path / "demo", steps=40, progress=False, timeout_s=900, moe_experts=4, overrides=replay
    )
    summary = result.summary
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    report(
        f"MoE 4 experts top-2, routing replay: reward {summary.first_mean:.3f} -> {summary.last_mean:.3f} "
        f"({summary.gain:+.3f}) in {summary.last_step} steps, {result.wall_s:.0f} s; replayed token share "
        f"{min(m['moe/replayed_token_share'] for m in metrics):.2f}-{max(m['moe/replayed_token_share'] for m in metrics):.2f}, "
        f"engine's experts = trainer's on step 1: {metrics[0]['moe/replay_same_experts']:.3f}"
    )
    assert summary.last_step == 40 and result.exits["trainer"].how == "finished"
    assert summary.gain >= 0.4, f"reward rose only {summary.gain:+.3f}"
    assert all(e.clean for e in result.exits.values()), result.exits
    assert "MoE: 4 experts, top-2" in (result.run_dir / "logs" / "trainer.log").read_text()
    assert all(m["moe/replayed_token_share"] == 1.0 for m in metrics)
    assert metrics[0]["moe/replay_same_experts"] == 1.0  # sampled with the weights it trains
    assert 1.0 <= metrics[-1]["moe/load_max_over_mean"] <= 4.0 and "moe/expert_share/3" in metrics[-1]


# ------------------------------------------------------------------------------------------------
# The supervisor
# ------------------------------------------------------------------------------------------------


def test_a_role_that_dies_is_named_with_its_log_and_the_others_are_stopped(tmp_path):
    supervisor = Supervisor(tmp_path, grace_s=5)
    with pytest.raises(RoleFailed) as failure, supervisor:
        supervisor.start(Role("server", SLEEP))
        supervisor.start(Role("worker", [PY, "-c", "print('cannot open the widget'); raise SystemExit(3)"]))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            supervisor.check()
            time.sleep(0.05)
    message = str(failure.value)
    assert failure.value.name == "worker"
    assert "worker exited with status 3" in message and "cannot open the widget" in message
    assert str(tmp_path / "worker.log") in message
    assert supervisor.exits["worker"].how == "failed"
    assert supervisor.exits["server"].how == "stopped"


def test_roles_wait_for_their_probe_and_a_finished_role_is_clean(tmp_path):
    (port,) = free_ports(1)
    http = Role(
        "http",
        [
            PY,
            "-c",
            f"import time, http.server as h; time.sleep(0.5); h.test(h.SimpleHTTPRequestHandler, port={port}, bind='127.0.0.1')",
        ],  # fmt: skip
        ready=http_probe(f"http://127.0.0.1:{port}/"),
        ready_timeout_s=30,
        cwd=tmp_path,
    )
    with Supervisor(tmp_path / "logs", grace_s=5) as supervisor:
        supervisor.start(http)  # returns only once the server answers
        assert port_probe("127.0.0.1", port)()
        supervisor.start(Role("job", [PY, "-c", "print('done')"], exits_when_done=True))
        deadline = time.monotonic() + 20
        while not supervisor.finished("job"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    exits = supervisor.stop_all()  # idempotent
    assert exits["job"].how == "finished" and exits["http"].how == "stopped"
    assert all(e.clean for e in exits.values())
    assert supervisor.tail("job") == "done"


def test_a_probe_that_never_answers_fails_with_the_roles_name(tmp_path):
    (port,) = free_ports(1)
    role = Role("mute", SLEEP, ready=port_probe("127.0.0.1", port), ready_timeout_s=1)
    with pytest.raises(RoleFailed, match="mute did not become ready within 1 s"), Supervisor(tmp_path) as s:
        s.start(role)
    assert s.exits["mute"].how == "stopped"


def test_a_role_ignoring_sigterm_is_killed_with_its_children(tmp_path):
    stubborn = textwrap.dedent(
        """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        print(child.pid, flush=True)
        time.sleep(600)
        """
    )
    with Supervisor(tmp_path, grace_s=1) as supervisor:
        supervisor.start(Role("stubborn", [PY, "-c", stubborn]))
        deadline = time.monotonic() + 20
        while not supervisor.tail("stubborn").strip().isdigit():
            assert time.monotonic() < deadline, supervisor.tail("stubborn")
            time.sleep(0.05)
        grandchild = int(supervisor.tail("stubborn"))
    assert supervisor.exits["stubborn"].how == "killed"
    assert not supervisor.exits["stubborn"].clean
    assert _wait_dead(grandchild), "the role's own child outlived it"


def test_children_stop_when_the_supervisor_is_killed_or_terminated(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        from atropos_megatron.launch.supervisor import Role, Supervisor, sigterm_as_keyboard_interrupt
        with sigterm_as_keyboard_interrupt(), Supervisor({str(tmp_path)!r}, grace_s=5) as s:
            s.start(Role("sleeper", {SLEEP!r}))
            try:  # the pid tells the test to signal: from then on the signal must land in this try
                print(s._running["sleeper"].proc.pid, flush=True)
                time.sleep(600)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
                raise SystemExit(130)
        """
    )
    for how in ("SIGTERM", "SIGKILL"):
        parent = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            sleeper = int(parent.stdout.readline())
            assert _alive(sleeper)
            parent.terminate() if how == "SIGTERM" else parent.kill()
            code = parent.wait(timeout=20)
            assert _wait_dead(sleeper), f"the child outlived its supervisor ({how})"
            if how == "SIGTERM":  # an orderly stop: the finally clauses ran
                assert code == 130 and parent.stdout.read().strip() == "interrupted"
        finally:
            parent.kill()
            parent.wait()
