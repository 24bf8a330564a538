"""The launch plan: which role runs where, with which ports, GPUs, rank variables and probes."""

from __future__ import annotations

import pytest

from atropos_megatron.config import load_config
from atropos_megatron.launch.allocation import Allocation, Node, parse_node_addresses, slurm_allocation
from atropos_megatron.launch.cli import environment_overrides
from atropos_megatron.launch.plan import LaunchPlan, PlanError, build_plan, node_index
from atropos_megatron.launch.topology import TopologyError, check_topology, trainer_world_size
from atropos_megatron.slurm import expand_hostlist


def _allocation(count: int, *, job_id: str = "4242", restart: int = 0) -> Allocation:
    nodes = tuple(Node(f"gpu{i:02d}", f"10.0.0.{i + 1}") for i in range(count))
    return Allocation(nodes=nodes, job_id=job_id, restart_count=restart)


def _plan(overrides: list[str], nodes: int, tmp_path, **allocation):
    cfg = load_config(None, ["model.hf_path=/models/m", f"logging.run_dir={tmp_path}/run", *overrides])
    return build_plan(cfg, _allocation(nodes, **allocation), config_file=tmp_path / "cfg.yaml", python="py")


def _roles(plan: LaunchPlan) -> dict[int, list[str]]:
    return {node.index: [role.name for role in node.roles] for node in plan.nodes}


def _role(plan: LaunchPlan, node: int, name: str):
    return next(role for role in plan.nodes[node].roles if role.name == name)


def test_multi_node_places_head_trainer_and_inference_nodes(tmp_path):
    plan, resolved = _plan(
        [
            "launch.train_nodes=2",
            "launch.inference_nodes=2",
            "launch.inference.gpus_per_server=4",
            "launch.environments=[{name: gsm8k, command: 'python env.py --api {api_url} --llm {inference_url}'}]",
            "weights.transport=distributed",
        ],
        4,
        tmp_path,
    )
    assert _roles(plan) == {
        0: ["atropos-api", "bridge", "env-gsm8k", *(f"trainer-{r}" for r in range(8))],
        1: [f"trainer-{r}" for r in range(8, 16)],
        2: ["inference-0", "inference-1"],
        3: ["inference-2", "inference-3"],
    }
    assert plan.inference_urls == (
        "http://10.0.0.3:30000",
        "http://10.0.0.3:30001",
        "http://10.0.0.4:30000",
        "http://10.0.0.4:30001",
    )
    # distributed transport: the job's bridge drives every server, no per-node agents
    assert resolved.weights.inference_servers == list(plan.inference_urls)
    assert resolved.weights.bridge_agents == []
    assert resolved.bridge.address == "10.0.0.1:50051"
    assert resolved.bridge.atropos_url == "http://10.0.0.1:8000"
    assert resolved.checkpoint.load == "latest"  # a requeued job resumes
    assert resolved.bridge.spool_dir == f"{tmp_path}/run/spool"
    assert resolved.bridge.auth_token  # cluster addresses: never an open bridge
    server = _role(plan, 3, "inference-3")
    assert server.gpu_slots == (4, 4)
    assert server.command[:3] == ("py", "-m", "sglang.launch_server")
    assert server.command[server.command.index("--tp-size") :][:2] == ("--tp-size", "4")
    assert server.command[server.command.index("--host") :][:2] == ("--host", "10.0.0.4")
    rank9 = _role(plan, 1, "trainer-9")
    assert {
        key: rank9.env[key] for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR")
    } == {
        "RANK": "9",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "16",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
    }
    assert rank9.env["MASTER_PORT"] == str(20000 + 4242 % 10000)
    assert rank9.gpu_slots == (0, 8)
    assert {probe.target for probe in rank9.needs} == {"10.0.0.1:50051"} | {
        f"{u}/health" for u in plan.inference_urls
    }
    env = _role(plan, 0, "env-gsm8k")
    assert env.command == (
        "python",
        "env.py",
        "--api",
        "http://10.0.0.1:8000",
        "--llm",
        "http://10.0.0.3:30000",
    )
    assert env.env["INFERENCE_URLS"] == ",".join(plan.inference_urls)
    assert env.env["ATROPOS_API_URL"] == "http://10.0.0.1:8000"


def test_grpc_transport_runs_a_bridge_agent_on_each_remote_inference_node(tmp_path):
    plan, resolved = _plan(
        ["launch.train_nodes=1", "launch.inference_nodes=2", "weights.transport=grpc"], 3, tmp_path
    )
    assert resolved.weights.bridge_agents == ["10.0.0.2:50051", "10.0.0.3:50051"]
    assert resolved.weights.inference_servers == []  # none shares the job bridge's node
    agent = _role(plan, 2, "bridge-agent")
    assert "bridge.mode=agent" in agent.command
    local = [url for url in plan.inference_urls if "10.0.0.3" in url]
    assert f"weights.inference_servers=[{','.join(local)}]" in agent.command
    trainer_needs = {probe.target for probe in _role(plan, 0, "trainer-0").needs}
    assert {"10.0.0.2:50051", "10.0.0.3:50051"} <= trainer_needs


def test_single_node_splits_gpus_between_sglang_and_the_trainer(tmp_path):
    plan, resolved = _plan(
        ["launch.inference.colocated_servers=2", "launch.inference.gpus_per_server=2"], 1, tmp_path
    )
    assert _role(plan, 0, "inference-0").gpu_slots == (0, 2)
    assert _role(plan, 0, "inference-1").gpu_slots == (2, 2)
    trainers = [role for role in plan.nodes[0].roles if role.kind == "trainer"]
    assert [role.gpu_slots for role in trainers] == [(4, 4)] * 4
    assert trainer_world_size(resolved.launch) == 4
    assert resolved.weights.inference_servers == list(plan.inference_urls)  # grpc: same node as the bridge


def test_dedicated_head_gets_a_node_of_its_own(tmp_path):
    plan, _ = _plan(
        ["launch.head=dedicated", "launch.train_nodes=2", "launch.inference_nodes=1"], 4, tmp_path
    )
    roles = _roles(plan)
    assert roles[0] == ["atropos-api", "bridge"]
    assert roles[1][0] == "trainer-0" and roles[2][0] == "trainer-8"
    assert _role(plan, 2, "trainer-8").env["MASTER_ADDR"] == "10.0.0.2"
    assert plan.trainer_rank0_node == 1


@pytest.mark.parametrize(
    ("backend", "flags"),
    [
        ("sglang", ("--enable-lora", "--max-lora-rank", "12", "--lora-target-modules")),
        ("vllm", ("--enable-lora", "--max-lora-rank", "16", "--max-loras", "2")),  # vLLM's ranks: 16 >= 12
    ],
)
def test_lora_adapter_sync_starts_lora_servers_and_the_bridges_proxies(tmp_path, backend, flags):
    """Each push is a new adapter the servers apply only to requests that name it: environments go
    through the bridge's proxies, which name the newest."""
    engine = ["weights.transport=disk", "weights.disk_dir=/shared/adapters"]
    if backend == "vllm":
        engine.append("weights.pause_mode=in_place")
    plan, resolved = _plan(
        ["model.lora.rank=12", "weights.lora_sync=adapter", f"launch.inference.backend={backend}", *engine,
         "launch.inference_nodes=1", "launch.environments=[{name: e, command: 'python env.py'}]"],
        2,
        tmp_path,
    )  # fmt: skip
    server = _role(plan, 1, "inference-0")
    start = server.command.index("--enable-lora")
    assert server.command[start : start + len(flags)] == flags
    runtime_lora = server.env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    assert runtime_lora == ("True" if backend == "vllm" else None)
    ports = resolved.weights.lora_proxy_ports
    assert len(ports) == len(plan.inference_urls) and resolved.weights.lora_proxy_host == "10.0.0.1"
    assert _role(plan, 0, "env-e").env["INFERENCE_URLS"] == ",".join(f"http://10.0.0.1:{p}" for p in ports)
    # merged LoRA needs no proxies: the servers run plain weights
    _, merged = _plan(["model.lora.rank=8", "launch.inference_nodes=1"], 2, tmp_path)
    assert merged.weights.lora_proxy_ports == []


def test_lora_adapter_sync_over_grpc_agents_is_refused(tmp_path):
    with pytest.raises(PlanError, match="bridge agents run no adapter proxies"):
        _plan(["model.lora.rank=8", "weights.lora_sync=adapter", "launch.inference_nodes=1"], 2, tmp_path)


def test_external_atropos_api_is_not_started(tmp_path):
    plan, resolved = _plan(
        ["launch.api_url=http://atropos.example:8000", "launch.inference_nodes=1"], 2, tmp_path
    )
    assert "atropos-api" not in _roles(plan)[0]
    assert resolved.bridge.atropos_url == "http://atropos.example:8000"


def test_cpu_run_on_loopback_has_no_token_and_one_rank_per_node(tmp_path):
    cfg = load_config(
        None,
        [
            "model.hf_path=/m",
            f"logging.run_dir={tmp_path}",
            "launch.gpus_per_node=0",
            "launch.train_nodes=2",
            "launch.inference.backend=reference",
        ],
    )
    allocation = Allocation(nodes=(Node("node1", "127.0.0.1"), Node("node2", "127.0.0.1")), job_id="7")
    plan, resolved = build_plan(cfg, allocation, config_file=tmp_path / "c.yaml", python="py")
    assert _roles(plan) == {0: ["atropos-api", "inference-0", "bridge", "trainer-0"], 1: ["trainer-1"]}
    assert resolved.bridge.auth_token is None
    server = _role(plan, 0, "inference-0")
    assert server.command[:4] == ("py", "-m", "atropos_megatron.cli", "serve")
    assert server.command[server.command.index("--device") :][:2] == ("--device", "cpu")
    assert server.gpu_slots is None and _role(plan, 1, "trainer-1").gpu_slots is None
    assert plan.session == "job7-0"


@pytest.mark.parametrize(
    ("overrides", "nodes", "message"),
    [
        (["launch.train_nodes=2", "launch.inference_nodes=2"], 3, "needs 4 nodes"),
        (["launch.train_nodes=2"], 2, "colocated_servers"),
        (["launch.inference.colocated_servers=4", "launch.inference.gpus_per_server=2"], 1, "no GPU left"),
        (["launch.environments=[{name: e, command: 'x {nope}'}]"], 1, "bad placeholder"),
    ],
)
def test_impossible_layouts_say_what_to_change(tmp_path, overrides, nodes, message):
    with pytest.raises(PlanError, match=message):
        _plan(overrides, nodes, tmp_path)


def test_topology_refuses_servers_that_do_not_fit_a_node():
    cfg = load_config(None, ["launch.inference_nodes=1", "launch.inference.gpus_per_server=16"])
    with pytest.raises(TopologyError, match="do not fit"):
        check_topology(cfg.launch)


def test_plan_survives_json_and_finds_its_node(tmp_path):
    plan, _ = _plan(["launch.train_nodes=2", "launch.inference_nodes=1"], 4, tmp_path, restart=3)
    again = LaunchPlan.from_json(plan.to_json())
    assert again == plan
    assert again.session == "job4242-3"
    assert "node 2 gpu02 (10.0.0.3)" in again.format()
    assert node_index(again, slurm_node_id="1", node_name=None) == 1
    assert node_index(again, slurm_node_id=None, node_name="gpu02") == 2
    assert node_index(again, slurm_node_id="3", node_name=None) is None  # the allocation's spare node


def test_environment_variables_become_overrides():
    environ = {
        "MODEL_PATH": "/models/q",
        "OUTPUT_DIR": "/scratch/run",
        "NUM_GPUS": "4",
        "BATCH_SIZE": "128",
        "MAX_EPOCHS": "30",
        "INFERENCE_BACKEND": "vllm",
        "ATROPOS_API_URL": "http://h:8000",
        "LORA_RANK": "64",
        "UNRELATED": "x",
        "CONFIG": "",
    }
    overrides = environment_overrides(environ)
    cfg = load_config(None, overrides)
    assert (cfg.model.hf_path, cfg.logging.run_dir, cfg.launch.gpus_per_node) == (
        "/models/q",
        "/scratch/run",
        4,
    )
    assert (cfg.data.batch_size, cfg.steps, cfg.launch.inference.backend) == (128, 30, "vllm")
    assert cfg.launch.api_url == "http://h:8000"
    assert cfg.model.lora.rank == 64 and cfg.model.lora.enabled
    assert environment_overrides({"MODEL_PATH": " "}) == []


def test_hostlist_expansion_matches_scontrol():
    assert expand_hostlist("gpu-[007-009,12],cpu1") == ["gpu-007", "gpu-008", "gpu-009", "gpu-12", "cpu1"]
    assert expand_hostlist("rack[1-2]-n[3-4]") == ["rack1-n3", "rack1-n4", "rack2-n3", "rack2-n4"]
    for bad in ("", "a[3-1]", "a[x]", "a[1"):
        with pytest.raises(ValueError):
            expand_hostlist(bad)


def test_slurm_allocation_reads_nodes_and_their_addresses():
    output = (
        "NodeName=node1 Arch=x86_64 CoresPerSocket=2 NodeAddr=127.0.0.1 NodeHostName=vm Port=17001\n"
        "NodeName=node2 Arch=x86_64 CoresPerSocket=2 NodeAddr=10.1.1.2 NodeHostName=vm Port=17002\n"
    )
    assert parse_node_addresses(output) == {"node1": "127.0.0.1", "node2": "10.1.1.2"}
    environ = {"SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_ID": "12", "SLURM_RESTART_COUNT": "1"}
    allocation = slurm_allocation(environ, scontrol="/nonexistent/scontrol")  # falls back to the names
    assert allocation.nodes == (Node("node1", "node1"), Node("node2", "node2"))
    assert allocation.session == "job12-1"


def test_an_environment_gets_its_own_variables_working_directory_and_the_env_launcher(tmp_path):
    env = (
        "launch.environments=[{name: mine, command: '{env_launcher} my_env.py serve --env.seed {seed}',"
        " env: {MY_DATA: '{run_dir}/data', HF_HOME: /shared/hf}, cwd: '{run_dir}/envs'}]"
    )
    plan, _ = _plan([env, "seed=7"], 2, tmp_path)
    role = _role(plan, 0, "env-mine")
    assert role.command == (
        "py",
        "-m",
        "atropos_megatron.demo.env_launcher",
        "my_env.py",
        "serve",
        "--env.seed",
        "7",
    )
    assert role.env["MY_DATA"] == f"{tmp_path}/run/data" and role.env["HF_HOME"] == "/shared/hf"
    assert role.env["ATROPOS_API_URL"]  # the shared variables stay
    assert role.cwd == f"{tmp_path}/run/envs"
    assert LaunchPlan.from_json(plan.to_json()) == plan
    with pytest.raises(PlanError, match=r"launch.environments\[mine\].env.X: bad placeholder"):
        _plan(["launch.environments=[{name: mine, command: x, env: {X: '{nope}'}}]"], 2, tmp_path)


# ------------------------------------------------------------------------------------------------
# vLLM (issue 21 step 4): stock `vllm serve` with its RL routes; the reference server in vLLM mode
# ------------------------------------------------------------------------------------------------

VLLM = ["launch.inference.backend=vllm", "weights.transport=distributed", "weights.pause_mode=in_place"]


def test_vllm_backend_starts_vllm_serve_with_its_rl_routes(tmp_path):
    plan, resolved = _plan(
        [
            *VLLM,
            "launch.train_nodes=1",
            "launch.inference_nodes=1",
            "launch.inference.gpus_per_server=4",
            "launch.inference.python=/venvs/vllm/bin/python",
            "launch.inference.extra_args=[--gpu-memory-utilization, '0.85']",
            "launch.environments=[{name: e, command: 'python env.py --server-type {server_type}'}]",
        ],
        2,
        tmp_path,
    )
    server = _role(plan, 1, "inference-0")
    assert server.command == (
        "/venvs/vllm/bin/python", "-m", "vllm.entrypoints.cli.main", "serve", "/models/m",
        "--host", "10.0.0.2", "--port", "30000", "--served-model-name", "/models/m",
        "--tensor-parallel-size", "4", "--weight-transfer-config", '{"backend": "nccl"}',
        "--generation-config", "vllm", "--enable-scale-out", "--logprobs-mode", "processed_logprobs",
        "--gpu-memory-utilization", "0.85",
    )  # fmt: skip
    assert server.env["VLLM_SERVER_DEV_MODE"] == "1"
    assert server.ready.kind == "http" and server.ready.target == "http://10.0.0.2:30000/health"
    assert [_role(plan, 1, f"inference-{k}").gpu_slots for k in range(2)] == [(0, 4), (4, 4)]
    assert "vllm server http://10.0.0.2:30000 on GPUs [0, 4)" in plan.format()
    # the backend decides the bridge's engine; distributed: the job's bridge drives every server
    assert resolved.weights.inference_engine == "vllm"
    assert resolved.weights.inference_servers == list(plan.inference_urls)
    assert _roles(plan)[1] == ["inference-0", "inference-1"]  # no bridge agent
    # our own roles do not get vLLM's dev mode; environments learn the server_type that works
    assert "VLLM_SERVER_DEV_MODE" not in _role(plan, 0, "bridge").env
    environment = _role(plan, 0, "env-e")
    assert environment.command[-1] == "vllm"
    # ... and generate through the bridge's proxies on the head node, one per server, once they are up
    proxies = ["http://10.0.0.1:8100", "http://10.0.0.1:8101"]
    assert (resolved.weights.lora_proxy_host, resolved.weights.lora_proxy_ports) == ("10.0.0.1", [8100, 8101])
    assert environment.env["INFERENCE_URLS"] == ",".join(proxies)
    assert ("tcp", resolved.bridge.address) in {(probe.kind, probe.target) for probe in environment.needs}
    assert "proxies on ports 8100-8101" in plan.format()
    assert {probe.target for probe in _role(plan, 0, "trainer-0").needs} >= {
        f"{url}/health" for url in plan.inference_urls
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["launch.inference.backend=vllm"], r"weights\.transport.*grpc is not supported"),
        (["launch.inference.backend=vllm", "weights.transport=disk", "weights.disk_dir=/d"], "disk is not"),
        (["launch.inference.backend=vllm", "weights.transport=distributed"], r"weights\.pause_mode"),
        ([*VLLM, "weights.admin_api_key=k"], r"weights\.admin_api_key is not supported"),
        ([*VLLM[1:], "weights.inference_engine=vllm"], r"launch\.inference\.backend=sglang starts SGLang"),
    ],
)
def test_a_recipe_that_contradicts_the_vllm_backend_is_refused_by_name(tmp_path, overrides, message):
    with pytest.raises(PlanError, match=message):
        _plan([*overrides, "launch.inference_nodes=1"], 2, tmp_path)


def test_vllm_abort_pause_mode_is_kept(tmp_path):
    _, resolved = _plan(
        ["launch.inference.backend=vllm", "weights.transport=distributed", "weights.pause_mode=abort"],
        1,
        tmp_path,
    )
    assert (resolved.weights.inference_engine, resolved.weights.pause_mode) == ("vllm", "abort")


@pytest.mark.parametrize(("gpus", "group"), [(0, "gloo"), (8, "nccl")])
def test_reference_server_speaks_vllm_when_the_engine_is_vllm(tmp_path, gpus, group):
    plan, resolved = _plan(
        [
            "launch.inference.backend=reference",
            "weights.inference_engine=vllm",
            "weights.transport=distributed",
            "weights.pause_mode=in_place",
            f"launch.gpus_per_node={gpus}",
            "launch.environments=[{name: e, command: 'python env.py {server_type}'}]",
        ],
        1,
        tmp_path,
    )
    server = _role(plan, 0, "inference-0")
    assert server.command[:4] == ("py", "-m", "atropos_megatron.cli", "serve")
    tail = server.command[server.command.index("--protocol") :]
    assert tail == ("--protocol", "vllm", "--weight-transfer-config", f'{{"backend": "{group}"}}',
                    "--enable-scale-out", "--logprobs-mode", "processed_logprobs")  # fmt: skip
    assert "VLLM_SERVER_DEV_MODE" not in server.env
    assert "reference (vLLM protocol) server" in plan.format()
    assert _role(plan, 0, "env-e").command[-1] == "vllm"  # through the bridge's proxy, as with vllm serve
    assert resolved.weights.inference_engine == "vllm" and len(resolved.weights.lora_proxy_ports) == 1
    # SGLang protocol by default, and no proxies: environments generate at the servers
    plan, resolved = _plan(["launch.inference.backend=reference"], 1, tmp_path)
    assert "--protocol" not in _role(plan, 0, "inference-0").command
    assert resolved.weights.lora_proxy_ports == []


def test_vllm_recipe_plans_four_colocated_vllm_servers(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.delenv("VLLM_PYTHON", raising=False)
    recipe = Path(__file__).parents[2] / "examples" / "configs" / "qwen2.5-7b_1node_vllm.yaml"
    cfg = load_config(
        recipe, environment_overrides({"INFERENCE_BACKEND": "vllm", "OUTPUT_DIR": str(tmp_path)})
    )
    plan, resolved = build_plan(cfg, _allocation(1), config_file=tmp_path / "c.yaml", python="py")
    servers = [role for role in plan.nodes[0].roles if role.kind == "inference"]
    assert [role.command[:5] for role in servers] == [
        ("py", "-m", "vllm.entrypoints.cli.main", "serve", cfg.model.hf_path)
    ] * 4
    assert [role.gpu_slots for role in servers] == [(k, 1) for k in range(4)]
    assert (resolved.weights.transport, resolved.weights.pause_mode) == ("distributed", "in_place")
    # the SGLang recipe with INFERENCE_BACKEND=vllm is refused, naming the field to change
    sglang = recipe.with_name("qwen2.5-7b_1node.yaml")
    cfg = load_config(
        sglang, environment_overrides({"INFERENCE_BACKEND": "vllm", "OUTPUT_DIR": str(tmp_path)})
    )
    with pytest.raises(PlanError, match=r"weights\.transport"):
        build_plan(cfg, _allocation(1), config_file=tmp_path / "c.yaml", python="py")
