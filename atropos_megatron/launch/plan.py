"""Which role runs on which node, with its command line, ports, GPUs and readiness probes.

Built once per job (``atropos-megatron launch plan``, in the batch step) from the config and the
allocation, written as JSON next to the resolved config, and read by every node's launcher: host
names are resolved once and every node agrees on ports and addresses without talking to the others.
Pure: nothing here starts a process or contacts a server.

Node order in the allocation: the head (Atropos API, bridge, environments) on the first node, then
the training nodes (the head shares the first unless ``launch.head: dedicated``), then the inference
nodes. Per node, roles are listed in start order; a role's ``needs`` are probes (of roles on any node)
that must answer before it starts.
"""

from __future__ import annotations

import json
import logging
import secrets
import shlex
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from atropos_megatron.config import KEPT_ADAPTERS, BridgeConfig, ConfigError, LaunchConfig, TrainConfig
from atropos_megatron.launch.allocation import Allocation, Node
from atropos_megatron.launch.topology import (
    check_topology,
    colocated_gpus,
    servers_per_inference_node,
    trainer_procs_per_node,
)
from atropos_megatron.slurm import job_port

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")

TRAINER = "trainer"
BRIDGE = "bridge"
BRIDGE_AGENT = "bridge-agent"
ATROPOS_API = "atropos-api"


class PlanError(ValueError):
    """The config cannot be laid out on this allocation."""


@dataclass(frozen=True)
class ProbeSpec:
    """A readiness check another node can run: ``http`` (GET answers 200) or ``tcp`` (connects)."""

    kind: str
    target: str
    """A URL for ``http``; ``host:port`` for ``tcp``."""


@dataclass(frozen=True)
class RoleSpec:
    name: str
    """Role name, unique on its node; its log is ``<name>.log``."""
    command: tuple[str, ...]
    kind: str
    """``service`` (API, bridge, agent), ``inference``, ``environment`` or ``trainer``."""
    summary: str
    """One line for the plan table."""
    env: dict[str, str] = field(default_factory=dict)
    ready: ProbeSpec | None = None
    needs: tuple[ProbeSpec, ...] = ()
    gpu_slots: tuple[int, int] | None = None
    """(first, count) into this node's visible GPUs; the launcher sets CUDA_VISIBLE_DEVICES to them."""
    cwd: str | None = None
    """Working directory (None: the launcher's)."""


@dataclass(frozen=True)
class NodePlan:
    index: int
    node: Node
    roles: tuple[RoleSpec, ...]

    @property
    def has_trainer(self) -> bool:
        return any(role.kind == TRAINER for role in self.roles)


@dataclass(frozen=True)
class LaunchPlan:
    session: str
    """``job<id>-<restarts>``: logs and status files of this life of the job live under this name."""
    run_dir: str
    config_file: str
    """The resolved config every role reads (allocation-dependent fields filled in)."""
    nodes: tuple[NodePlan, ...]
    api_url: str
    bridge_address: str
    inference_urls: tuple[str, ...]
    gpus_per_node: int
    trainer_rank0_node: int
    """Index of the node whose trainer holds global rank 0: its exit 0 means the run is done."""
    startup_timeout_s: float
    trainer_stop_grace_s: float
    stop_grace_s: float

    @property
    def session_dir(self) -> Path:
        """``<run_dir>/launch/<session>``: plan, resolved config and the nodes' status files."""
        return Path(self.run_dir) / "launch" / self.session

    def log_dir(self, node: NodePlan) -> Path:
        return Path(self.run_dir) / "logs" / self.session / node.node.name

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> LaunchPlan:
        raw = json.loads(text)
        nodes = []
        for node in raw.pop("nodes"):
            roles = []
            for role in node["roles"]:
                ready = ProbeSpec(**role.pop("ready")) if role.get("ready") else None
                role.pop("ready", None)
                needs = tuple(ProbeSpec(**probe) for probe in role.pop("needs"))
                slots = tuple(role.pop("gpu_slots")) if role.get("gpu_slots") else None
                role.pop("gpu_slots", None)
                roles.append(
                    RoleSpec(
                        **{**role, "command": tuple(role["command"])},
                        ready=ready,
                        needs=needs,
                        gpu_slots=slots,
                    )
                )
            nodes.append(NodePlan(node["index"], Node(**node["node"]), tuple(roles)))
        return cls(**{**raw, "inference_urls": tuple(raw["inference_urls"])}, nodes=tuple(nodes))

    def format(self) -> str:
        """The plan as a table for the job log."""
        lines = [f"launch plan {self.session}: {len(self.nodes)} node(s), run dir {self.run_dir}"]
        for plan in self.nodes:
            lines.append(f"  node {plan.index} {plan.node.name} ({plan.node.address}):")
            lines += [f"    {role.name:<14} {role.summary}" for role in plan.roles] or ["    (nothing)"]
        lines.append(f"  config: {self.config_file}")
        lines.append(f"  logs:   {Path(self.run_dir) / 'logs' / self.session}/<node>/<role>.log")
        return "\n".join(lines)


def build_plan(
    cfg: TrainConfig,
    allocation: Allocation,
    *,
    config_file: str | Path,
    python: str = sys.executable,
) -> tuple[LaunchPlan, TrainConfig]:
    """The plan, and the config with the allocation-dependent fields filled in (save it to
    ``config_file``: every role reads that file).

    Args:
        cfg: the user's resolved config (``launch`` section included).
        allocation: the job's nodes, in Slurm's order.
        config_file: where the resolved config will be written (the roles' ``--config``).
        python: interpreter for our own roles (and SGLang unless ``launch.inference.python``).
    """
    cfg = _engine_for_backend(cfg)
    launch = cfg.launch
    try:
        check_topology(launch)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    if len(allocation.nodes) < launch.num_nodes:
        raise PlanError(
            f"the launch section needs {launch.num_nodes} nodes ({launch.train_nodes} training + "
            f"{launch.inference_nodes} inference{' + 1 head' if launch.head == 'dedicated' else ''}) "
            f"but the allocation has {len(allocation.nodes)}: change #SBATCH --nodes or the launch section"
        )
    nodes = allocation.nodes[: launch.num_nodes]
    if len(allocation.nodes) > launch.num_nodes:
        unused = ", ".join(node.name for node in allocation.nodes[launch.num_nodes :])
        logger.warning("the launch section uses %d nodes; %s stay idle", launch.num_nodes, unused)
    head = nodes[0]
    first_train = 1 if launch.head == "dedicated" else 0
    train_nodes = list(range(first_train, first_train + launch.train_nodes))
    inference_nodes = list(range(train_nodes[-1] + 1, train_nodes[-1] + 1 + launch.inference_nodes))

    servers = _place_servers(launch, train_nodes[0], inference_nodes)
    urls = tuple(f"http://{nodes[index].address}:{port}" for index, port, _ in servers)
    # Environments generate through the bridge's proxies where they must (bridge/inference_proxy.py):
    # vLLM servers (the /generate atroposlib's server_type vllm needs, docs/vllm.md §9) and LoRA
    # adapter sync (the newest adapter named in every request).
    proxy_ports = [launch.proxy_port + k for k in range(len(servers))] if _needs_proxies(cfg) else []
    proxy_urls = tuple(f"http://{head.address}:{port}" for port in proxy_ports)
    environment_urls = proxy_urls or urls

    api_url = launch.api_url or f"http://{head.address}:{launch.api_port}"
    bridge_address = f"{head.address}:{launch.bridge_port}"
    grpc = cfg.weights.transport == "grpc"
    agent_nodes = sorted({index for index, _, _ in servers if index != 0}) if grpc else []
    agents = [f"{nodes[index].address}:{launch.bridge_port}" for index in agent_nodes]
    if agents and proxy_ports and cfg.weights.lora_sync == "adapter":
        # The proxies run in the job's bridge, which drives only the servers on its own node.
        raise PlanError(
            "weights.lora_sync=adapter with weights.transport=grpc and inference servers on other nodes: "
            "their bridge agents run no adapter proxies, so environments there would sample from the "
            "base model; use weights.transport=disk (a shared disk_dir)"
        )
    run_dir = Path(cfg.logging.run_dir).resolve()
    resolved = _resolve_config(
        cfg,
        run_dir=run_dir,
        api_url=api_url,
        bridge_address=bridge_address,
        head_servers=[
            url for url, (index, _, _) in zip(urls, servers, strict=True) if index == 0 or not grpc
        ],
        agents=agents,
        secure=not all(node.address in LOOPBACK for node in nodes),
        proxies=(head.address, proxy_ports),
    )

    cli = (python, "-m", "atropos_megatron.cli")
    config_arg = ("--config", str(config_file))
    base_env = {"OMP_NUM_THREADS": "1"} if launch.gpus_per_node == 0 else {}
    base_env |= {"ATROPOS_MEGATRON_SESSION": allocation.session, "TOKENIZERS_PARALLELISM": "false"}
    # vLLM mounts its RL routes (pause, resume, weight transfer) only in dev mode (docs/vllm.md §3),
    # and its runtime LoRA routes only with VLLM_ALLOW_RUNTIME_LORA_UPDATING (envs.py).
    server_env = base_env | ({"VLLM_SERVER_DEV_MODE": "1"} if launch.inference.backend == "vllm" else {})
    if cfg.weights.inference_engine == "vllm" and cfg.weights.lora_sync == "adapter":
        server_env |= {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    model_path = launch.inference.model_path or cfg.model.hf_path
    bridge_probe = ProbeSpec("tcp", bridge_address)
    server_probes = tuple(ProbeSpec("http", f"{url}/health") for url in urls)
    agent_probes = tuple(ProbeSpec("tcp", address) for address in agents)
    api_probe = ProbeSpec("http", f"{api_url}/")

    roles: dict[int, list[RoleSpec]] = {index: [] for index in range(len(nodes))}
    if launch.api_url is None:
        roles[0].append(
            RoleSpec(
                name=ATROPOS_API,
                # atroposlib's API app, as run-api serves it, minus a log line per request
                command=(python, "-m", "atropos_megatron.launch.atropos_api", "--host", head.address)
                + ("--port", str(launch.api_port)),
                kind="service",
                summary=f"Atropos API {api_url}",
                env=base_env,
                ready=api_probe,
            )
        )
    for number, ((index, port, slots), url) in enumerate(zip(servers, urls, strict=True)):
        roles[index].append(
            RoleSpec(
                name=f"inference-{number}",
                command=_server_command(resolved, model_path, nodes[index].address, port, python),
                kind="inference",
                summary=f"{_server_kind(resolved)} server {url}"
                + (f" on GPUs [{slots[0]}, {slots[0] + slots[1]})" if slots else ""),
                env=server_env,
                ready=ProbeSpec("http", f"{url}/health"),
                gpu_slots=slots,
            )
        )
    roles[0].append(
        RoleSpec(
            name=BRIDGE,
            command=(*cli, "bridge", *config_arg),
            kind="service",
            summary=f"bridge {bridge_address} -> {len(resolved.weights.inference_servers)} local server(s)"
            + (f", {len(agents)} agent(s)" if agents else "")
            + (f", proxies on ports {proxy_ports[0]}-{proxy_ports[-1]}" if proxy_ports else ""),
            env=base_env,
            ready=bridge_probe,
        )
    )
    for index, address in zip(agent_nodes, agents, strict=True):
        local = [url for url, (node, _, _) in zip(urls, servers, strict=True) if node == index]
        roles[index].append(
            RoleSpec(
                name=BRIDGE_AGENT,
                command=(*cli, "bridge", *config_arg, "bridge.mode=agent", f"bridge.address={address}")
                + (f"weights.inference_servers=[{','.join(local)}]",),
                kind="service",
                summary=f"bridge agent {address} -> {len(local)} server(s) on this node",
                env=base_env,
                ready=ProbeSpec("tcp", address),
            )
        )
    environment_env = base_env | {
        "ATROPOS_API_URL": api_url,
        "INFERENCE_URLS": ",".join(environment_urls),
        "MODEL_PATH": model_path or "",
    }
    values = {
        "api_url": api_url,
        "inference_url": environment_urls[0],
        "inference_urls": ",".join(environment_urls),
        "model_path": model_path or "",
        "run_dir": str(run_dir),
        "seed": str(cfg.seed),
        "python": python,
        "env_launcher": f"{shlex.quote(python)} -m atropos_megatron.demo.env_launcher",
        "server_type": environment_server_type(cfg),
    }
    for environment in launch.environments:
        where = f"launch.environments[{environment.name}]"
        own_env = {key: _fill(value, values, f"{where}.env.{key}") for key, value in environment.env.items()}
        roles[0].append(
            RoleSpec(
                name=f"env-{environment.name}",
                command=_environment_command(environment.command, values, environment.name),
                kind="environment",
                summary=f"environment: {environment.command[:70]}",
                env=environment_env | own_env,
                needs=(api_probe, *server_probes, *((bridge_probe,) if proxy_urls else ())),
                cwd=_fill(environment.cwd, values, f"{where}.cwd") if environment.cwd else None,
            )
        )
    trainer_needs = (bridge_probe, *server_probes, *agent_probes)
    master = nodes[train_nodes[0]].address
    master_port = launch.master_port or _master_port(allocation)
    for node_rank, index in enumerate(train_nodes):
        roles[index] += _trainer_roles(
            launch, node_rank, master=f"{master}:{master_port}", command=(*cli, "train", *config_arg),
            env=base_env, needs=trainer_needs,
        )  # fmt: skip
    plan = LaunchPlan(
        session=allocation.session,
        run_dir=str(run_dir),
        config_file=str(config_file),
        nodes=tuple(NodePlan(index, node, tuple(roles[index])) for index, node in enumerate(nodes)),
        api_url=api_url,
        bridge_address=bridge_address,
        inference_urls=urls,
        gpus_per_node=launch.gpus_per_node,
        trainer_rank0_node=train_nodes[0],
        startup_timeout_s=launch.startup_timeout_s,
        trainer_stop_grace_s=launch.trainer_stop_grace_s,
        stop_grace_s=launch.stop_grace_s,
    )
    return plan, resolved


SERVER_TYPES = {
    ("sglang", "sglang"): "sglang",
    ("reference", "sglang"): "sglang",
    # vLLM (stock or the reference server's mirror): through the bridge's proxies, which answer Atropos's
    # /generate on vLLM's token route (docs/vllm.md §9)
    ("reference", "vllm"): "vllm",
    ("vllm", "vllm"): "vllm",
}
"""atroposlib ``server_type`` that works with the servers started, by (backend, inference_engine)."""


def environment_server_type(cfg: TrainConfig) -> str:
    """The ``{server_type}`` placeholder: what an environment's atroposlib server entries should say."""
    return SERVER_TYPES[(cfg.launch.inference.backend, cfg.weights.inference_engine)]


def _needs_proxies(cfg: TrainConfig) -> bool:
    """Whether environments generate through the bridge's proxies (``launch.proxy_port``)."""
    return cfg.weights.inference_engine == "vllm" or cfg.weights.lora_sync == "adapter"


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``--max-lora-rank`` values vLLM 0.33 accepts (``config/lora.py: MaxLoRARanks``)."""


def _adapter_flags(cfg: TrainConfig) -> list[str]:
    """Server flags for ``weights.lora_sync: adapter``: each push arrives as a new LoRA adapter."""
    if cfg.weights.lora_sync != "adapter":
        return []
    lora = cfg.model.lora
    if cfg.launch.inference.backend == "vllm":
        rank = next((r for r in VLLM_LORA_RANKS if r >= lora.rank), None)
        if rank is None:
            raise PlanError(f"model.lora.rank={lora.rank} is above vLLM's largest --max-lora-rank (512)")
        return ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(KEPT_ADAPTERS)]
    # SGLang's flags, which the reference server shares
    return ["--enable-lora", "--max-lora-rank", str(lora.rank), "--lora-target-modules", *lora.target_modules]


def _engine_for_backend(cfg: TrainConfig) -> TrainConfig:
    """``launch.inference.backend`` decides what the servers run, so the bridge must speak it:
    ``vllm`` sets ``weights.inference_engine=vllm`` (the config then refuses by name a transport, pause
    mode or LoRA sync vLLM cannot take: the recipe must say ``transport: distributed`` and ``pause_mode:
    in_place`` or ``abort``); ``sglang`` refuses ``inference_engine=vllm``; ``reference`` serves either
    protocol (``serve --protocol``)."""
    backend = cfg.launch.inference.backend
    weights = cfg.weights
    if backend == "sglang" and weights.inference_engine == "vllm":
        raise PlanError(
            "weights.inference_engine=vllm but launch.inference.backend=sglang starts SGLang servers: set "
            "launch.inference.backend=vllm (INFERENCE_BACKEND=vllm), or reference for the reference server "
            "in vLLM mode"
        )
    if backend != "vllm":
        return cfg
    if weights.admin_api_key:
        raise PlanError(
            "weights.admin_api_key is not supported with launch.inference.backend=vllm: vllm serve has no "
            "admin key (its weight-transfer routes take none; --api-key guards only /v1); unset it and keep "
            "the inference nodes on a private network"
        )
    try:
        return replace(cfg, weights=replace(weights, inference_engine="vllm"))
    except ConfigError as exc:
        raise PlanError(
            f"launch.inference.backend=vllm starts vLLM servers, so weights.inference_engine=vllm: {exc}"
        ) from None


def _server_kind(cfg: TrainConfig) -> str:
    backend = cfg.launch.inference.backend
    if backend == "reference" and cfg.weights.inference_engine == "vllm":
        return "reference (vLLM protocol)"
    return backend


def _place_servers(
    launch: LaunchConfig, first_train_node: int, inference_nodes: list[int]
) -> list[tuple[int, int, tuple[int, int] | None]]:
    """``(node index, port, GPU slots)`` of every inference server, co-located ones first."""
    per_server = launch.inference.gpus_per_server if launch.gpus_per_node else 0
    placed = [(first_train_node, k) for k in range(launch.colocated_servers)]
    placed += [(index, k) for index in inference_nodes for k in range(servers_per_inference_node(launch))]
    return [(index, launch.inference.port + k, _slots(k * per_server, per_server)) for index, k in placed]


def _trainer_roles(
    launch: LaunchConfig,
    node_rank: int,
    *,
    master: str,
    command: tuple[str, ...],
    env: dict[str, str],
    needs: tuple[ProbeSpec, ...],
) -> list[RoleSpec]:
    """One role per trainer rank of training node ``node_rank``, with the variables torchrun would
    set. The launcher starts the ranks itself: torchrun SIGKILLs its workers 30 s after its own
    SIGTERM, too soon for a large model's checkpoint."""
    procs = trainer_procs_per_node(launch)
    world_size = procs * launch.train_nodes
    # After the co-located servers' GPUs (check_topology allows those only with one training node).
    slots = (colocated_gpus(launch), procs) if launch.gpus_per_node else None
    master_addr, _, master_port = master.rpartition(":")
    roles = []
    for local_rank in range(procs):
        rank = node_rank * procs + local_rank
        rank_env = {
            "RANK": str(rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(procs),
            "GROUP_RANK": str(node_rank),
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": master_port,
            "OMP_NUM_THREADS": "1",  # as torchrun: the ranks share the node's cores
        }
        roles.append(
            RoleSpec(
                name=f"{TRAINER}-{rank}",
                command=command,
                kind=TRAINER,
                summary=f"trainer rank {rank}/{world_size} (local {local_rank}), rendezvous {master}",
                env=env | rank_env,
                needs=needs,
                gpu_slots=slots,
            )
        )
    return roles


def _resolve_config(
    cfg: TrainConfig,
    *,
    run_dir: Path,
    api_url: str,
    bridge_address: str,
    head_servers: list[str],
    agents: list[str],
    secure: bool,
    proxies: tuple[str, list[int]],
) -> TrainConfig:
    """What the allocation decides, written over the user's config (like the demo does); ``proxies``:
    the host and ports of the bridge's inference proxies (no ports: none)."""
    bridge = replace(cfg.bridge, address=bridge_address, atropos_url=api_url)
    if bridge.spool_dir == BridgeConfig().spool_dir:
        bridge = replace(bridge, spool_dir=str(run_dir / "spool"))  # the run's own, kept over requeues
    else:
        bridge = replace(bridge, spool_dir=str(Path(bridge.spool_dir).resolve()))
    if secure and bridge.auth_token is None:
        # The bridge listens on a cluster address: without a token anyone on the network could take
        # batches or push weights. The token lives in the resolved config (written mode 0600).
        bridge = replace(bridge, auth_token=secrets.token_urlsafe(32))
    weights = replace(cfg.weights, inference_servers=list(head_servers), bridge_agents=list(agents))
    if proxies[1]:
        weights = replace(weights, lora_proxy_host=proxies[0], lora_proxy_ports=list(proxies[1]))
    # A launched run always resumes from its own latest checkpoint (none yet: it starts fresh), so a
    # requeued job continues where it stopped.
    checkpoint = cfg.checkpoint if cfg.checkpoint.load else replace(cfg.checkpoint, load="latest")
    logging = replace(cfg.logging, run_dir=str(run_dir))
    return replace(cfg, bridge=bridge, weights=weights, checkpoint=checkpoint, logging=logging)


def _server_command(
    cfg: TrainConfig, model_path: str | None, host: str, port: int, python: str
) -> tuple[str, ...]:
    inference = cfg.launch.inference
    if not model_path:
        raise PlanError(
            "the inference servers need a model: set model.hf_path (MODEL_PATH) or launch.inference.model_path"
        )
    if inference.backend == "reference":
        command = [
            python, "-m", "atropos_megatron.cli", "serve", "--model", model_path,
            "--host", host, "--port", str(port),
            "--device", "cuda" if cfg.launch.gpus_per_node else "cpu",
            "--dtype", cfg.model.dtype, "--max-batch", str(cfg.data.batch_size), "--seed", str(cfg.seed),
        ]  # fmt: skip
        if cfg.weights.inference_engine == "vllm":
            # vLLM 0.33's RL routes and token route, as stock vllm serve below; the group backend the
            # trainer will use (WeightTransfer: distributed_backend, else nccl with CUDA, gloo without).
            backend = cfg.weights.distributed_backend or ("nccl" if cfg.launch.gpus_per_node else "gloo")
            command += ["--protocol", "vllm", "--weight-transfer-config", json.dumps({"backend": backend}),
                        "--enable-scale-out", "--logprobs-mode", "processed_logprobs"]  # fmt: skip
        command += _adapter_flags(cfg)
    elif inference.backend == "vllm":
        # Stock `vllm serve` (vLLM 0.33.0: vllm/entrypoints/cli/main.py is the `vllm` script; the flags are
        # in engine/arg_utils.py and entrypoints/common/cli_args.py). VLLM_SERVER_DEV_MODE=1 is in the
        # role's environment. Weights arrive over NCCL through the RL routes (docs/vllm.md §3, §6).
        # `--generation-config vllm`: sampling fields a request leaves out get vLLM's neutral defaults,
        # not the model's generation_config.json (its top_k / top_p / repetition_penalty would change
        # what is sampled from behind the trainer's back: config/model.py, docs/vllm.md §3).
        # `--enable-scale-out` mounts /inference/v1/generate, the token route the bridge's proxies
        # answer atroposlib's /generate with; `--logprobs-mode processed_logprobs` reports log-probs
        # after temperature, as SGLang's are and the trainer's are (the default, raw, ignores it).
        command = [
            inference.python or python, "-m", "vllm.entrypoints.cli.main", "serve", model_path,
            "--host", host, "--port", str(port), "--served-model-name", model_path,
            "--tensor-parallel-size", str(inference.gpus_per_server),
            "--weight-transfer-config", json.dumps({"backend": "nccl"}), "--generation-config", "vllm",
            "--enable-scale-out", "--logprobs-mode", "processed_logprobs", *_adapter_flags(cfg),
        ]  # fmt: skip
        return (*command, *inference.extra_args)
    else:
        command = [
            inference.python or python, "-m", "sglang.launch_server", "--model-path", model_path,
            "--host", host, "--port", str(port), "--tp-size", str(inference.gpus_per_server),
            *_adapter_flags(cfg),
        ]  # fmt: skip
    if cfg.weights.admin_api_key:
        command += ["--admin-api-key", cfg.weights.admin_api_key]
    return (*command, *inference.extra_args)


def _environment_command(template: str, values: dict[str, str], name: str) -> tuple[str, ...]:
    where = f"launch.environments[{name}].command"
    words = tuple(_fill(arg, values, where) for arg in shlex.split(template))
    # {env_launcher} stands for several words; split it where it stands alone.
    launcher = values["env_launcher"]
    return tuple(w for word in words for w in (shlex.split(word) if word == launcher else (word,)))


def _fill(template: str, values: dict[str, str], where: str) -> str:
    try:
        return template.format_map(values)
    except (KeyError, ValueError, IndexError) as exc:
        known = ", ".join("{" + key + "}" for key in values)
        raise PlanError(f"{where}: bad placeholder {exc} (known: {known})") from None


def _slots(first: int, count: int) -> tuple[int, int] | None:
    return (first, count) if count else None


def _master_port(allocation: Allocation) -> int:
    if allocation.job_id is None or not allocation.job_id.isdigit():
        from atropos_megatron.launch.supervisor import free_ports

        return free_ports(1)[0]
    return job_port(int(allocation.job_id))  # as the trainer derives it under plain srun


def node_index(plan: LaunchPlan, *, slurm_node_id: str | None, node_name: str | None) -> int | None:
    """This node's index in the plan: ``SLURM_NODEID`` when set, else its Slurm name, else 0 for a
    one-node plan. None for a node of the allocation that the plan leaves idle."""
    if slurm_node_id is not None and slurm_node_id.isdigit():
        index = int(slurm_node_id)
        return index if index < len(plan.nodes) else None
    if node_name is not None:
        for node in plan.nodes:
            if node.node.name == node_name:
                return node.index
    if len(plan.nodes) == 1:
        return 0
    raise PlanError("cannot tell which node of the plan this is: pass --node")
