"""Patches that let megatron-core 0.16.1 run where its CUDA-only code paths cannot.

Two groups, each applied only where it is needed (both are idempotent):

* :func:`apply_cpu_patches` — only when CUDA is absent (tests and the CPU demo). Megatron assumes a
  GPU in a handful of places: buffers allocated on ``torch.cuda.current_device()``, the model-parallel
  RNG tracker built on CUDA generators, ``device="cuda"`` tensors inside the pipeline schedules and
  the optimizer, ``torch.cuda.synchronize`` after p2p calls, and ``Tensor.type()`` checks that expect
  ``torch.cuda.*Tensor``. Each patch below says what breaks without it. On a CUDA machine this
  function does nothing.
* :func:`apply_torch_norm_patches` — whenever Apex is absent (CPU, GPUs without Apex such as the lent
  H200, and LoRA runs where TE is present: they use the local spec). Megatron's local spec then falls
  back to ``WrappedTorchNorm``, which refuses sequence parallelism although plain torch norms work
  with it. TE's own spec never uses it.

* :func:`apply_distopt_checkpoint_patches` — whenever neither Apex nor Transformer Engine provides
  the fused Adam (CPU, and GPUs without them). Megatron's distributed optimizer then wraps
  ``torch.optim.AdamW``, and its checkpoint code has three bugs on that path (see the function).

* :func:`apply_moe_router_patch` — whenever Transformer Engine is absent. Megatron's router GEMM
  asks ``te_general_gemm is not None`` of a name that only TE's import defines (``NameError`` at the
  first MoE forward); with the name bound to None it takes its plain torch path.

* :func:`shield_checkpoint_writer` — always. Megatron's checkpoint writer reports its results through
  a ``multiprocessing`` manager process that it starts at the first save and keeps. Slurm signals
  every process of a job step at once (scancel, requeue, preemption), so that helper died of the
  same SIGTERM that asked the trainer to checkpoint, and the final save failed with BrokenPipeError.

What this module deliberately does not do: enable anything that needs Transformer Engine (packed
THD sequences, context parallelism, FP8). Those fail with Megatron's own error, and
``trainer/parallel.py`` rejects such layouts up front with a clearer one.

Facts behind each patch (errors, ablations): shared notes `megatron-cpu.md`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
import types

import torch

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")
# What `Tensor.type()` answers on a GPU, which Megatron's optimizers check parameters against.
_CUDA_TENSOR_TYPES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


_FACTORIES = frozenset(
    {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
     "zeros_like", "ones_like", "empty_like", "full_like"}
)  # fmt: skip
"""The torch functions through which Megatron creates tensors on ``device="cuda"``."""

_MODULES_CREATING_CUDA_TENSORS = (
    "megatron.core.pipeline_parallel.schedules",  # every schedule: total_num_tokens, even at PP=1
    "megatron.core.optimizer.optimizer",  # FP32Optimizer._scale, found_inf
    "megatron.core.optimizer.clip_grads",  # norm and overflow buffers
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.exchange_utils",  # fully parallel checkpoint loading
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.transformer.moe.moe_utils",  # the router's loss tracker
    "megatron.core.transformer.utils",  # the default causal mask
    "megatron.core.rerun_state_machine",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",
)
"""Megatron modules (0.16.1) that call a factory with ``device="cuda"`` on paths the trainer takes:
``grep -rn 'device=.cuda' megatron/core`` lists them (the rest are inference, FSDP and model families
the trainer does not build). A module missing here fails loudly: ``Torch not compiled with CUDA``."""


class _HostTorch(types.ModuleType):
    """``torch`` as the modules above see it: factory calls asked for ``device="cuda"`` get the CPU.

    Bound as each module's global ``torch`` at patch time, so only their own calls pass through it;
    every name is looked up once and then cached as a plain attribute. A process-wide
    ``TorchFunctionMode`` did this before and cost a Python call on every torch operation of every
    forward and backward (~11k per GRPO step).
    """

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str):
        value = getattr(torch, name)
        if name in _FACTORIES:
            value = _on_host(value)
        setattr(self, name, value)
        return value


def _on_host(factory):
    @functools.wraps(factory)
    def create(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
            kwargs.pop("pin_memory", None)  # pinning needs CUDA too
        return factory(*args, **kwargs)

    return create


def _cuda_tensor_type(original):
    """``Tensor.type()`` with no arguments answers the CUDA type name: the bf16 optimizer and the
    distributed optimizer accept only ``torch.cuda.{Float,Half,BFloat16}Tensor`` parameters and raise
    ``TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor, ...`` otherwise."""

    @functools.wraps(original)
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = _CUDA_TENSOR_TYPES.get(self.dtype)
            if name is not None:
                return name
        return original(self, dtype, non_blocking, **kwargs)

    return type_


_state = {"cpu": False, "norm": False}


def apply_cpu_patches() -> bool:
    """Make megatron-core usable without CUDA. Returns True if patches were (or already are) active.

    Safe to call more than once and from every rank; a no-op when CUDA is available.
    """
    if torch.cuda.is_available():
        return False
    if _state["cpu"]:
        return True

    # 1. Buffers: GlobalMemoryBuffer (used by attention every forward), TP collective buffers and
    #    DDP/optimizer buffers allocate on `torch.cuda.current_device()`. Without this: `AssertionError:
    #    Torch not compiled with CUDA enabled` at `utils.py GlobalMemoryBuffer.get_tensor`.
    torch.cuda.current_device = lambda: _CPU  # type: ignore[assignment]

    # 2. The model-parallel RNG tracker. Attention forks the `model-parallel-rng` state on every
    #    forward (even with dropout 0), so `model_parallel_cuda_manual_seed` is mandatory, and it
    #    reads/writes CUDA generator state: `Torch not compiled with CUDA enabled` in
    #    `torch.cuda.get_rng_state`. Here the tracked states are CPU generator states.
    _patch_rng_tracker()

    # 3. Pipeline p2p calls `torch.cuda.synchronize()` after `batch_isend_irecv` (and distributed
    #    checkpointing calls it too). Nothing to wait for on CPU: gloo ops are synchronous once waited.
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]

    # 4. `device="cuda"` tensors in schedules, optimizer and checkpoint code: those modules' `torch` is
    #    a _HostTorch. `.cuda()` (tied embeddings, optimizer state, checkpoint exchange) stays on the
    #    host, and `.type()` answers CUDA names for the optimizers' dtype checks.
    host_torch = _HostTorch()
    for name in _MODULES_CREATING_CUDA_TENSORS:
        importlib.import_module(name).torch = host_torch
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    torch.Tensor.type = _cuda_tensor_type(torch.Tensor.type)  # type: ignore[method-assign]

    # 5. The MoE all-to-all token dispatcher copies its split sizes to the host on a side CUDA stream
    #    and waits on an event (`torch.cuda.Stream requires CUDA support` when the layer is built).
    #    On CPU there is one stream and every copy has finished when it returns.
    torch.cuda.Stream = _HostStream  # type: ignore[assignment,misc]
    torch.cuda.current_stream = lambda device=None: _HOST_STREAM  # type: ignore[assignment]
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()  # type: ignore[assignment]
    #    Its host copy is also where the split sizes become the lists `all_to_all_single` takes; a
    #    tensor already on the host stayed a tensor (`incompatible function arguments`).
    _patch_host_split_sizes()

    # 6. With TP > 1 the same dispatcher gathers (and in backward reduce-scatters) uneven token counts
    #    over the TP group. Gloo's all_gather takes equal sizes only (`ProcessGroupGloo::allgather:
    #    invalid tensor size`) and it has no list reduce_scatter: pad to the longest, or reduce and slice.
    _patch_uneven_tp_collectives()

    _state["cpu"] = True
    logger.debug("megatron-core CPU patches applied")
    return True


class _HostStream:
    """The single "stream" of a CPU: everything on it has already happened."""

    def __new__(cls, *args, **kwargs):  # noqa: ARG004 - torch.cuda.Stream's signature
        return _HOST_STREAM

    def wait_stream(self, stream) -> None:  # noqa: ARG002
        return None

    def record_event(self, event=None):  # noqa: ARG002
        return self

    def synchronize(self) -> None:
        return None


_HOST_STREAM = object.__new__(_HostStream)


def _patch_host_split_sizes() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def to_host(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = to_host
    token_dispatcher.maybe_move_tensor_to_cpu = to_host


def _patch_uneven_tp_collectives() -> None:
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    @functools.wraps(gather)
    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        padded = input_.new_zeros(max(output_split_sizes), *input_.shape[1:])
        padded[: input_.shape[0]] = input_
        pieces = [torch.empty_like(padded) for _ in output_split_sizes]
        dist.all_gather(pieces, padded, group=group)
        return torch.cat([piece[:size] for piece, size in zip(pieces, output_split_sizes, strict=True)])

    @functools.wraps(reduce_scatter)
    def reduce_scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        start = sum(input_split_sizes[: group.rank()])
        return total[start : start + input_split_sizes[group.rank()]].clone()

    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = reduce_scatter_uneven


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    def get_state(device="cuda", clone=False, graph_safe=False):  # noqa: ARG001 - Megatron's signature
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):  # noqa: ARG001 - Megatron's signature
        torch.set_rng_state(new_state)

    def add(self, name: str, seed: int) -> None:
        # Same bookkeeping and errors as CudaRNGStatesTracker.add, with a CPU generator's state.
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    mcore_random._get_cuda_rng_state = get_state
    mcore_random._set_cuda_rng_state = set_state
    mcore_random.CudaRNGStatesTracker.add = add
    # `model_parallel_cuda_manual_seed` also seeds the default CUDA generator directly; without
    # CUDA that call is only queued by torch, so the default stream comes from torch.manual_seed.


def apply_torch_norm_patches() -> bool:
    """Let Megatron's torch-norm fallback run with sequence parallelism. Returns True if active.

    Applies when Apex does not provide the norm layers (then Megatron's local spec, which LoRA runs
    use even where Transformer Engine is present, takes ``WrappedTorchNorm``, which asserts ``not
    sequence_parallel``; TE's spec never builds it). With sequence
    parallelism each TP rank normalises its own slice of the sequence, so the norm weights get
    partial gradients; we mark them ``sequence_parallel=True`` so that Megatron's
    ``finalize_model_grads`` all-reduces them over the TP group, as it does for TE's norms.
    """
    if _state["norm"]:
        return True
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer import torch_norm

    if gpt_layer_specs.HAVE_APEX:
        return False

    original_new = torch_norm.WrappedTorchNorm.__new__

    @functools.wraps(original_new)
    def new(
        cls,
        config,
        hidden_size,
        eps=1e-5,
        persist_layer_norm=False,
        zero_centered_gamma=False,
        normalization="LayerNorm",
    ):
        sequence_parallel = config.sequence_parallel
        if sequence_parallel:
            config = _shallow_copy(config, sequence_parallel=False)
        norm = original_new(
            cls, config, hidden_size, eps, persist_layer_norm, zero_centered_gamma, normalization
        )
        for param in norm.parameters():
            param.sequence_parallel = sequence_parallel
        return norm

    torch_norm.WrappedTorchNorm.__new__ = new
    _state["norm"] = True
    return True


def apply_moe_router_patch() -> bool:
    """Bind ``moe_utils.te_general_gemm`` to None where TE did not define it. True if patched."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return False
    moe_utils.te_general_gemm = None
    return True


def apply_distopt_checkpoint_patches() -> bool:
    """Make ``DistributedOptimizer`` checkpoints save and resume exactly with ``torch.optim.AdamW``.

    Returns True if the patches are (or already were) applied; False where Apex or TE is present.
    Without them, in megatron-core 0.16.1 (facts and ablations: shared notes `megatron-cpu.md` §6):

    1. ``state_dict()`` asserts that every parameter's Adam state has one common ``step``; a fresh
       optimizer has no state yet, so saving before the first step, and *every* load (which calls
       ``state_dict()`` first), fails with a bare ``AssertionError``. Fix: give empty Adam states
       the values AdamW itself would create on its first step (step 0, zero moments).
    2. ``load_state_dict()`` hands one ``step`` tensor to every parameter; AdamW increments each
       parameter's step in place, so the shared counter races ahead and the resumed run diverges
       (1e-3 after one step). Fix: give each parameter its own copy.
    3. Loading the ``fully_reshardable`` parameter state copies into keys the checkpoint does not
       hold (``KeyError: 'step'``) and into fp32 main parameters that are leaves requiring grad
       (``RuntimeError`` on an in-place op). Fix: copy only the saved keys, without autograd.
    """
    if _state.get("distopt"):
        return True
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return False
    cls = distrib_optimizer.DistributedOptimizer
    original_state_dict, original_load = cls.state_dict, cls.load_state_dict

    @functools.wraps(original_state_dict)
    def state_dict(self):
        _prime_adam_state(self.optimizer)
        return original_state_dict(self)

    @functools.wraps(original_load)
    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        for param_state in self.optimizer.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].detach().clone()

    def set_main_param_and_optimizer_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        targets = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key, value in tensors.items():
                if key in targets and torch.is_tensor(targets[key]):
                    targets[key].copy_(value)

    original_set = cls._set_main_param_and_optimizer_states

    @functools.wraps(original_set)
    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original_set(self, model_param, tensors)
        return set_main_param_and_optimizer_states(self, model_param, tensors)

    cls.state_dict = state_dict
    cls.load_state_dict = load_state_dict
    cls._set_main_param_and_optimizer_states = set_states
    _state["distopt"] = True
    return True


def _prime_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the state AdamW creates on its first step, for parameters that have none yet."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            if optimizer.state.get(param):
                continue
            optimizer.state[param] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }


def _shallow_copy(config, **changes):
    clone = object.__new__(type(config))
    clone.__dict__.update(config.__dict__)
    clone.__dict__.update(changes)
    return clone


@functools.cache
def te_available() -> bool:
    """Whether Transformer Engine imports here (it raises RuntimeError, not ImportError, without CUDA)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False
    return True


_SHIELDED_MANAGER = None


def shield_checkpoint_writer() -> None:
    """Start the results queue of Megatron's checkpoint writer in a manager process that ignores
    SIGTERM/SIGINT (and dies with its parent), before Megatron starts its own default one. Idempotent."""
    global _SHIELDED_MANAGER
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _SHIELDED_MANAGER is not None or filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))  # Megatron's context
    manager.start(initializer=_outlive_stop_signals)
    _SHIELDED_MANAGER = manager
    filesystem_async._results_queue = manager.Queue()


def _outlive_stop_signals() -> None:
    """In the manager process: ignore the job's stop signals, but die when the trainer does."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
