"""Convert checkpoints between HuggingFace and Megatron-Core: ``atropos-megatron convert``.

Both directions run in one CPU process and hold one copy of the model: HF tensors stream one at a
time into (or out of) a TP=1, PP=1 Megatron model, whose distributed checkpoint then loads at any
TP/PP. Output goes to ``OUT.partial`` and is renamed to ``OUT`` only when complete, so an interrupted
conversion never leaves something that looks finished.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from atropos_megatron.config import DTYPES, ModelConfig, ParallelConfig
from atropos_megatron.trainer.model import TORCH_DTYPES
from atropos_megatron.weights import verify
from atropos_megatron.weights.hf_architectures import (
    architecture_mismatches,
    model_config_from_hf,
    read_hf_config,
)
from atropos_megatron.weights.hf_checkpoint import HF_DTYPE_NAMES

logger = logging.getLogger("atropos_megatron.convert")

_DTYPE_FLAGS = {dtype: flag for flag, dtype in TORCH_DTYPES.items()}
_HF_DTYPES = {HF_DTYPE_NAMES[dtype]: flag for flag, dtype in TORCH_DTYPES.items()}

# Library warnings that say nothing actionable to someone converting a checkpoint.
_IGNORED_WARNINGS = (
    ".*Apex is not installed.*",
    ".*Transformer Engine and Apex are not installed.*",
    ".*full scope is deprecated.*",
    ".*`load_state_dict` is deprecated.*",
    ".*deprecating ShardedTensor.*",
)

_DESCRIPTION = """\
Convert model checkpoints between HuggingFace (safetensors) and Megatron-Core (torch_dist).

  hf-to-mcore  HF directory -> Megatron distributed checkpoint. The checkpoint is layout-free: it
               loads at any TP/PP/EP that divides the model. --tp/--pp/--ep check that the layout you
               plan to train with fits (heads, key/value groups, layers, vocabulary padding, experts)
               before any work starts. The HF config.json and tokenizer files are kept inside the checkpoint.
  mcore-to-hf  Megatron distributed checkpoint (ours, or Megatron-LM's with --hf-config) -> HF
               directory with sharded safetensors, an index, config.json and tokenizer files,
               loadable by transformers' from_pretrained as is.

LoRA (a LoRA run's checkpoint holds only the adapters and names its base by path + fingerprint):
  mcore-to-hf --adapter-only  the adapters as an HF PEFT adapter directory (adapter_config.json +
               adapter_model.safetensors) for PeftModel.from_pretrained, SGLang or vLLM. Reads only
               the adapter tensors (no base, no model): time and memory grow with the adapters.
  mcore-to-hf --merge  a full HF model whose adapted weights are W + scale * B A. The base is the one
               the checkpoint records (an HF or torch_dist directory) or --base DIR; its
               fingerprint must be the recorded one (same weights), else nothing is written.
  hf-to-mcore --adapter DIR  a PEFT LoRA adapter for the base --hf -> an adapter-only checkpoint with
               a LoRA run's keys and sidecar (no optimizer state). Reads the base's config.json and
               fingerprints its files; never loads its weights.

Memory: one copy of the model in the target dtype, plus the largest tensor (hf-to-mcore) or one
output shard (mcore-to-hf, --max-shard-size); --merge adds the adapters and one merged weight.
--verify runs both models one after the other on random token ids and keeps only their logits.
Conversion runs on the CPU even where GPUs exist.
"""

_HF_TO_MCORE_EXAMPLES = """\
  atropos-megatron convert hf-to-mcore --hf ~/models/Qwen2.5-7B --out ckpt/qwen7b --tp 4 --verify
  # a PEFT LoRA adapter -> an adapter-only Megatron checkpoint for its base
  atropos-megatron convert hf-to-mcore --hf ~/models/Qwen2.5-7B --adapter my-peft-adapter \\
      --out ckpt/qwen7b-lora
"""
_MCORE_TO_HF_EXAMPLES = """\
  atropos-megatron convert mcore-to-hf --mcore ckpt/qwen7b --out ~/models/qwen7b-grpo --verify
  atropos-megatron convert mcore-to-hf --mcore megatron_lm_ckpt/iter_0001000 \\
      --hf-config ~/models/Llama-3.1-8B --out llama-8b-hf
  # LoRA: a training checkpoint's adapters as a PEFT adapter, or merged into their base
  atropos-megatron convert mcore-to-hf --mcore runs/lora/checkpoints/step_00000100 \\
      --out qwen7b-lora --adapter-only
  atropos-megatron convert mcore-to-hf --mcore runs/lora/checkpoints/step_00000100 \\
      --out qwen7b-merged --merge --verify
  atropos-megatron convert mcore-to-hf --mcore runs/lora/checkpoints/step_00000100 \\
      --out qwen7b-merged --merge --base /scratch/Qwen2.5-7B     # the same base, moved
"""
_EXIT_STATUS = "exit status: 0 converted (and verified), 1 --verify found the models disagree, 2 bad input.\n"
_EPILOG = f"examples:\n{_HF_TO_MCORE_EXAMPLES}{_MCORE_TO_HF_EXAMPLES}\n{_EXIT_STATUS}"


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion did, for the summary line, tests and benchmarks."""

    out: Path
    parameters: int
    model_bytes: int
    """Weights' bytes in the output dtype."""
    seconds: float
    agreement: verify.LogitAgreement | None = None
    tolerance: float | None = None

    @property
    def verified(self) -> bool | None:
        if self.agreement is None:
            return None
        return self.agreement.passes(self.tolerance)


class ConversionError(ValueError):
    """Bad input, reported before any heavy work starts when possible."""


# ------------------------------------------------------------------------------------------------
# HF -> Megatron
# ------------------------------------------------------------------------------------------------


def hf_to_mcore(
    hf_dir: Path,
    out: Path,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    ep: int = 1,
    dtype: str | None = None,
    make_vocab_size_divisible_by: int = 128,
    verify_logits: bool = False,
    tolerance: float | None = None,
) -> ConversionReport:
    """Convert an HF checkpoint directory into a Megatron distributed checkpoint at ``out``.

    Runs in a one-rank process group (:func:`single_process_group`; reuses the caller's if any).
    """
    from atropos_megatron.trainer.model import build_model, padded_vocab_size
    from atropos_megatron.weights.dist_checkpoint import load_model, save_model
    from atropos_megatron.weights.hf_checkpoint import load_hf_weights, side_files
    from atropos_megatron.weights.safetensors_io import SafetensorsCheckpoint

    started = time.perf_counter()
    hf_config = read_hf_config(hf_dir)
    dtype = dtype or config_dtype(hf_config)
    model = model_for_layout(
        hf_config,
        tp=tp,
        pp=pp,
        vpp=vpp,
        ep=ep,
        dtype=dtype,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )
    source = SafetensorsCheckpoint(hf_dir)
    partial = prepare_output(out)
    padded = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, 1)
    logger.info(
        "%s: %s, %d layers, hidden %d, vocab %d (padded %d), %s -> %s",
        hf_dir, hf_config["model_type"], model.num_layers, model.hidden_size, model.vocab_size, padded,
        _gb(source.total_bytes), dtype,
    )  # fmt: skip

    tolerance = tolerance if tolerance is not None else verify.DEFAULT_TOLERANCES[TORCH_DTYPES[dtype]]
    with single_process_group(), cleanup_on_failure(partial):
        (chunk,) = build_model(model, ParallelConfig(), initialize=False, padded_vocab=padded)
        with bytes_bar(source.total_bytes, "read HF safetensors") as advance:
            load_hf_weights(
                [chunk], source, model, padded_vocab=padded, tp_rank=0, tp_size=1, progress=advance
            )
        with stage("write torch_dist checkpoint"):
            save_model(
                [chunk], partial, model=model, padded_vocab=padded, hf_files=side_files(hf_dir),
                extra={"converted_from": str(hf_dir), "checked_layout": {"tp": tp, "pp": pp, "vpp": vpp, "ep": ep}},
            )  # fmt: skip
        parameters, nbytes = _size(chunk)
        os.replace(partial, out)
        agreement = None
        if verify_logits:
            with stage("verify: reload the written checkpoint"):
                for param in chunk.parameters():
                    param.detach().fill_(float("nan"))  # anything the load misses poisons the logits
                load_model([chunk], out)
            tokens = verify.probe_tokens(model.vocab_size)
            with stage("verify: Megatron forward"):
                mcore_logits = verify.megatron_logits(chunk, tokens, model.vocab_size)
            del chunk
            gc.collect()
            with stage("verify: HF forward"):
                expected = verify.hf_logits(hf_dir, tokens, TORCH_DTYPES[dtype])
            agreement = verify.compare_logits(expected, mcore_logits)
    return ConversionReport(out, parameters, nbytes, time.perf_counter() - started, agreement, tolerance)


def config_dtype(hf_config: dict) -> str:
    """The dtype flag of a config.json's ``dtype`` (or ``torch_dtype``); bf16 when it names none."""
    return _HF_DTYPES.get(hf_config.get("dtype") or hf_config.get("torch_dtype"), "bf16")


def model_for_layout(
    hf_config: dict, *, tp: int, pp: int, vpp: int | None, ep: int = 1, **fields
) -> ModelConfig:
    """The ModelConfig of a config.json, refused (naming the field) when it does not fit TP/PP/VPP/EP."""
    from atropos_megatron.trainer.model import check_model_layout

    layout = ParallelConfig(
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        virtual_pipeline_parallel_size=vpp,
        expert_parallel_size=ep,
        sequence_parallel=tp > 1,  # changes no weight; MoE layers need it at TP > 1
    )
    try:
        model = model_config_from_hf(hf_config, **fields)
        check_model_layout(model, layout)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    return model


def mcore_to_hf(
    mcore_dir: Path,
    out: Path,
    *,
    hf_config_dir: Path | None = None,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
    verify_logits: bool = False,
    tolerance: float | None = None,
    merge: bool = False,
    base_dir: Path | None = None,
) -> ConversionReport:
    """Convert a Megatron distributed checkpoint into an HF checkpoint directory at ``out``.

    ``merge``: ``mcore_dir`` is an adapter-only LoRA checkpoint; write its base (the recorded one, or
    ``base_dir`` with the same fingerprint) with the adapters merged into their layers' weights.

    Runs in a one-rank process group (:func:`single_process_group`; reuses the caller's if any).
    """
    from atropos_megatron.trainer.model import build_model
    from atropos_megatron.weights.hf_checkpoint import save_hf_checkpoint, side_files
    from atropos_megatron.weights.safetensors_io import DEFAULT_MAX_SHARD_BYTES

    started = time.perf_counter()
    if merge:
        from atropos_megatron.weights.convert_lora import merged_source

        source = merged_source(mcore_dir, base_dir=base_dir, hf_config_dir=hf_config_dir)
    else:
        source = _model_source(mcore_dir, hf_config_dir=hf_config_dir)
    out_dtype = TORCH_DTYPES[dtype or source.stored]
    precisions = (TORCH_DTYPES[source.stored], out_dtype)
    tolerance = tolerance if tolerance is not None else max(verify.DEFAULT_TOLERANCES[d] for d in precisions)
    partial = prepare_output(out)
    with single_process_group(), cleanup_on_failure(partial):
        (chunk,) = build_model(
            source.model, ParallelConfig(), initialize=False, padded_vocab=source.padded_vocab
        )
        source.fill(chunk)
        parameters, _ = _size(chunk)
        tokens = verify.probe_tokens(source.model.vocab_size)
        mcore_logits = (
            verify.megatron_logits(chunk, tokens, source.model.vocab_size) if verify_logits else None
        )
        with bytes_bar(parameters * out_dtype.itemsize, "write HF safetensors") as advance:
            save_hf_checkpoint(
                chunk, source.model, partial, hf_config=source.hf_config,
                copy_from=side_files(source.hf_config_dir), dtype=out_dtype,
                max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES, progress=advance,
            )  # fmt: skip
        os.replace(partial, out)
        del chunk
        gc.collect()
    agreement = None
    if verify_logits:
        with stage("verify: HF forward"):
            hf = verify.hf_logits(out, tokens, out_dtype)
        agreement = verify.compare_logits(mcore_logits, hf)
    nbytes = parameters * out_dtype.itemsize
    return ConversionReport(out, parameters, nbytes, time.perf_counter() - started, agreement, tolerance)


@dataclass(frozen=True)
class ModelSource:
    """What mcore-to-hf builds (a TP=1 model) and how it fills it."""

    model: ModelConfig
    padded_vocab: int
    stored: str
    """Dtype flag of the weights as stored (the default output dtype)."""
    hf_config_dir: Path
    hf_config: dict
    fill: Callable[[torch.nn.Module], None]


def _model_source(mcore_dir: Path, *, hf_config_dir: Path | None) -> ModelSource:
    """A full model checkpoint (ours or Megatron-LM's), loaded as is."""
    from atropos_megatron.weights.convert_lora import adapter_info_or_none
    from atropos_megatron.weights.dist_checkpoint import load_model, read_checkpoint_info

    adapters = adapter_info_or_none(mcore_dir)
    if adapters is not None:
        raise ConversionError(
            f"{mcore_dir} holds LoRA adapters only (rank {adapters.lora.rank}, base "
            f"{adapters.base['path']}): "
            "pass --adapter-only for an HF PEFT adapter directory, or --merge for a full model with the "
            "adapters merged into their base"
        )
    info = read_checkpoint_info(mcore_dir)
    hf_config_dir = hf_config_dir or info.hf_config_dir
    if hf_config_dir is None:
        raise ConversionError(
            f"{mcore_dir} carries no HF config (it was not written by atropos-megatron); pass "
            "--hf-config DIR, a directory with the model's config.json and tokenizer files"
        )
    stored = _DTYPE_FLAGS.get(info.dtype)
    if stored is None:
        raise ConversionError(f"{mcore_dir} stores {info.dtype} weights; supported: fp32, bf16, fp16")
    hf_config = read_hf_config(hf_config_dir)
    model = described_model(hf_config, hf_config_dir, mcore_dir, stored=stored, recorded=info.model)
    if info.padded_vocab < model.vocab_size:
        raise ConversionError(
            f"{mcore_dir} has {info.padded_vocab} embedding rows but config.json says "
            f"vocab_size={model.vocab_size}"
        )

    def fill(chunk: torch.nn.Module) -> None:
        with stage(f"read torch_dist checkpoint {mcore_dir}"):
            load_model([chunk], mcore_dir, info=info)

    return ModelSource(model, info.padded_vocab, stored, hf_config_dir, hf_config, fill)


def described_model(
    hf_config: dict, hf_config_dir: Path, mcore_dir: Path, *, stored: str, recorded: ModelConfig | None
) -> ModelConfig:
    """The ModelConfig of ``hf_config``, refused when the checkpoint's own record says otherwise."""
    try:
        model = model_config_from_hf(hf_config, dtype=stored)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    if recorded is not None and (problems := architecture_mismatches(recorded, model)):
        raise ConversionError(
            f"{hf_config_dir}/config.json does not describe the model in {mcore_dir}: {'; '.join(problems)}"
        )
    return model


@contextmanager
def single_process_group() -> Iterator[None]:
    """A one-rank gloo group with Megatron's TP=1, PP=1 state (reused if the caller made one)."""
    import torch.distributed as dist

    from atropos_megatron.trainer import parallel

    owned = not dist.is_initialized()
    env = parallel.DistEnv(
        rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
        master_port=parallel.free_port(), launcher="single",
    )  # fmt: skip
    parallel.init_distributed(ParallelConfig(backend="gloo"), seed=0, env=env)
    try:
        yield
    finally:
        if owned:
            parallel.shutdown()


@contextmanager
def cleanup_on_failure(partial: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
            logger.error("conversion failed; removed %s", partial)
        raise


def prepare_output(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out} already exists; choose a new directory (nothing is overwritten)")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        logger.warning("removing %s left by an interrupted conversion", partial)
        shutil.rmtree(partial)
    if out.exists():
        out.rmdir()  # empty: os.replace needs the name free
    partial.parent.mkdir(parents=True, exist_ok=True)
    return partial


def _size(chunk: torch.nn.Module) -> tuple[int, int]:
    """Elements and bytes of the model's weights (LoRA factors, merged into them on export, not counted)."""
    from atropos_megatron.weights.lora_layout import is_adapter_name

    params = [param for name, param in chunk.named_parameters() if not is_adapter_name(name)]
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _amount(nbytes: int) -> str:
    """GB for models, MB for adapters (which ``_gb`` would show as 0.00 GB)."""
    return _gb(nbytes) if nbytes >= 1e9 else f"{nbytes / 1e6:.2f} MB"


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB"


@contextmanager
def stage(name: str) -> Iterator[None]:
    started = time.perf_counter()
    logger.info("%s ...", name)
    yield
    logger.info(
        "%s: done in %.1f s (peak RSS so far %s)", name, time.perf_counter() - started, _gb(peak_rss_bytes())
    )


@contextmanager
def bytes_bar(total: int, name: str) -> Iterator:
    from tqdm import tqdm

    started = time.perf_counter()
    with tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024, disable=None) as bar:
        yield bar.update
    logger.info(
        "%s: %s in %.1f s (peak RSS so far %s)",
        name,
        _gb(total),
        time.perf_counter() - started,
        _gb(peak_rss_bytes()),
    )


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def build_parser(prog: str = "atropos-megatron convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)

    to_mcore = sub.add_parser(
        "hf-to-mcore", help="HuggingFace -> Megatron distributed checkpoint",
        epilog=f"examples:\n{_HF_TO_MCORE_EXAMPLES}\n{_EXIT_STATUS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    to_mcore.add_argument("--hf", type=Path, required=True, metavar="DIR", help="HF checkpoint directory")
    to_mcore.add_argument("--out", type=Path, required=True, metavar="DIR", help="new checkpoint directory")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check the model against")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to check against")
    to_mcore.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per PP rank")
    to_mcore.add_argument(
        "--ep", type=int, default=1, help="expert-parallel size to check a mixture-of-experts model against"
    )
    to_mcore.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="weight dtype (default: config.json's dtype, else bf16); with --adapter: the adapters' "
        "(default: as stored)",
    )
    to_mcore.add_argument(
        "--make-vocab-size-divisible-by", type=int, default=128, metavar="N",
        help="pad the embedding to a multiple of N (default 128; the TP size must divide it)",
    )  # fmt: skip
    to_mcore.add_argument(
        "--adapter", type=Path, default=None, metavar="DIR",
        help="convert this HF PEFT LoRA adapter for the base --hf (adapter-only checkpoint; the base's "
        "weights are not read)",
    )  # fmt: skip

    to_hf = sub.add_parser(
        "mcore-to-hf", help="Megatron distributed checkpoint -> HuggingFace",
        epilog=f"examples:\n{_MCORE_TO_HF_EXAMPLES}\n{_EXIT_STATUS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    to_hf.add_argument("--mcore", type=Path, required=True, metavar="DIR", help="torch_dist checkpoint")
    to_hf.add_argument("--out", type=Path, required=True, metavar="DIR", help="new HF directory")
    to_hf.add_argument(
        "--hf-config", type=Path, default=None, metavar="DIR",
        help="config.json + tokenizer to use (default: the copy kept in the checkpoint)",
    )  # fmt: skip
    to_hf.add_argument(
        "--dtype", choices=DTYPES, default=None, help="weight dtype on disk (default: the checkpoint's)"
    )
    to_hf.add_argument(
        "--max-shard-size", type=_parse_size, default=None, metavar="SIZE",
        help="largest safetensors file, e.g. 2GB or 500MB (default 5GB)",
    )  # fmt: skip
    lora = to_hf.add_mutually_exclusive_group()
    lora.add_argument(
        "--adapter-only", action="store_true",
        help="LoRA checkpoint -> HF PEFT adapter directory (reads no base)",
    )  # fmt: skip
    lora.add_argument(
        "--merge", action="store_true", help="LoRA checkpoint -> full HF model with the adapters merged"
    )
    to_hf.add_argument(
        "--base", type=Path, default=None, metavar="DIR",
        help="with --merge: the base (HF or torch_dist) if not at its recorded path; same fingerprint",
    )  # fmt: skip

    for command in (to_mcore, to_hf):
        command.add_argument(
            "--verify", action="store_true",
            help="run HF and Megatron on the same tokens; exit 1 past the tolerance",
        )  # fmt: skip
        command.add_argument(
            "--tolerance", type=float, default=None,
            help="largest accepted |logit diff| for --verify (default: 1e-3 fp32, 0.1 fp16, 0.5 bf16)",
        )  # fmt: skip
    return parser


def _run(args: argparse.Namespace) -> ConversionReport:
    """The conversion the parsed command line asks for, after refusing options that do not apply."""
    from atropos_megatron.weights.convert_lora import mcore_to_peft, peft_to_mcore

    _check_options(args)
    if args.direction == "hf-to-mcore" and args.adapter is not None:
        return peft_to_mcore(
            args.hf, args.adapter, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, dtype=args.dtype,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        )  # fmt: skip
    if args.direction == "hf-to-mcore":
        return hf_to_mcore(
            args.hf, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep, dtype=args.dtype,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            verify_logits=args.verify, tolerance=args.tolerance,
        )  # fmt: skip
    if args.adapter_only:
        return mcore_to_peft(args.mcore, args.out, dtype=args.dtype)
    return mcore_to_hf(
        args.mcore, args.out, hf_config_dir=args.hf_config, dtype=args.dtype,
        max_shard_bytes=args.max_shard_size, verify_logits=args.verify, tolerance=args.tolerance,
        merge=args.merge, base_dir=args.base,
    )  # fmt: skip


def _check_options(args: argparse.Namespace) -> None:
    """Refuse options that would be silently ignored, naming them."""
    if args.direction == "mcore-to-hf" and args.base is not None and not args.merge:
        raise ConversionError("--base names the base for --merge; add --merge (or drop --base)")
    adapters = args.adapter is not None if args.direction == "hf-to-mcore" else args.adapter_only
    if not adapters:
        return
    mode = "--adapter" if args.direction == "hf-to-mcore" else "--adapter-only"
    given = {"--verify": args.verify, "--tolerance": args.tolerance is not None}
    if args.direction == "mcore-to-hf":
        given.update(
            {"--hf-config": args.hf_config is not None, "--max-shard-size": args.max_shard_size is not None}
        )
    unused = [option for option, set_ in given.items() if set_]
    if unused:
        raise ConversionError(
            f"{' and '.join(unused)} cannot be used with {mode}, which converts adapters only and builds "
            "no model to verify or shard"
        )


def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            try:
                value = float(upper.removesuffix(unit)) * factor
            except ValueError:
                break
            if value > 0:
                return int(value)
            break
    raise argparse.ArgumentTypeError(f"{text!r} is not a size like 2GB, 500MB or 1GiB")


def main(argv: Sequence[str] | None = None, prog: str = "atropos-megatron convert") -> int:
    args = build_parser(prog).parse_args(argv)
    for noise in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=noise)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    logger.setLevel(logging.INFO)  # our stages; libraries stay at WARNING
    # Conversion is CPU work; keep CUDA out of it (must be set before anything initialises CUDA).
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        report = _run(args)
    except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {report.out}: {report.parameters / 1e6:.3g}M parameters, {_amount(report.model_bytes)} "
        f"in {report.seconds:.1f} s (peak RSS {_gb(peak_rss_bytes())})"
    )
    if report.agreement is not None:
        verdict = "PASS" if report.verified else "FAIL"
        print(f"verify {verdict}: {report.agreement.describe()} (tolerance {report.tolerance:g})")
        if not report.verified:
            return 1
    return 0
