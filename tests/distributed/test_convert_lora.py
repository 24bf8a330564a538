"""LoRA through the converter, with HF PEFT as the peer: adapter-only, merged, and PEFT adapters in.

The real trainer makes a LoRA checkpoint at TP=2 (a tiny Qwen2 base, every projection, two GRPO
steps; the checkpoint holds the adapters only) and records its logits. Then, fp32:

- ``mcore-to-hf --adapter-only`` (no base read): ``PeftModel.from_pretrained`` on the base gives the
  trainer's logits;
- ``mcore-to-hf --merge --verify``: the weights equal PEFT's ``merge_and_unload()`` of that adapter,
  also on a moved copy of the base (``--base``, same fingerprint) and on the base as torch_dist;
- ``hf-to-mcore --adapter`` of that PEFT adapter gives back the training checkpoint's model keys,
  shapes and tensors exactly; a random PEFT adapter (Llama, rsLoRA, three projections) goes
  PEFT -> Megatron -> PEFT bit for bit;
- the refusals (exit status 2, nothing written), each naming its problem.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.harness import run_ranks

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
LOGIT_RELATIVE_TOLERANCE = 2e-6
"""Of the largest |logit| (measured 7.5e-7: the base alone differs from HF by ~2e-6 absolute at TP=2)."""
WEIGHT_TOLERANCE = 1e-6
TOKENS = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
CHECKPOINT = "run/checkpoints/step_00000002"


def _train_body(rank, world_size, hf_dir, root):
    """Two GRPO steps at TP=2 with LoRA, a checkpoint, and the trained model's logits on ``TOKENS``."""
    from megatron.core import tensor_parallel

    from atropos_megatron.config import load_config
    from atropos_megatron.trainer.loop import Trainer
    from atropos_megatron.trainer.step import forward_backward
    from tests.rollouts import synthetic_batch

    cfg = load_config(
        "examples/configs/debug_tiny.yaml",
        [
            f"model.hf_path={hf_dir}",
            f"logging.run_dir={root}/run",
            "parallel.tensor_parallel_size=2",
            "model.lora.rank=4",
            "model.lora.alpha=8",
            "optimizer.lr=5e-2",  # B starts at zero: a large step moves the logits measurably
            "data.micro_batch_tokens=256",
        ],
    )
    trainer = Trainer(cfg)
    trainer.setup()
    for step in range(2):
        trainer.train_on(synthetic_batch(step))
    trainer.save_checkpoint()
    kept = []

    def keep(batch, output):
        kept.append(tensor_parallel.gather_from_tensor_model_parallel_region(output.detach()))
        return output.sum() * 0.0, {}

    batch = {"tokens": TOKENS, "position_ids": torch.arange(TOKENS.shape[1]).expand_as(TOKENS)}
    forward_backward(trainer.state.chunks, [batch], loss_fn=keep, forward_only=True)
    return kept[0][..., : trainer.model.vocab_size].clone()


def _convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *map(str, args)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip


def _main(*args) -> tuple[int, str]:
    """The command line in this (spawned) process: exit status and stderr."""
    from atropos_megatron.weights.convert import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's own refusals
            status = exc.code
    return status, stderr.getvalue()


def _random_peft_adapter(hf_dir: Path, out: Path, **options) -> None:
    """A PEFT adapter for ``hf_dir`` with random non-zero A and B (seeded)."""
    from transformers import AutoModelForCausalLM

    from tests.hf_models import random_peft_model

    random_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir), seed=5, **options).save_pretrained(out)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {name: t for file in sorted(path.glob("*.safetensors")) for name, t in load_file(file).items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(root, base HF dir, the trainer's logits, the --adapter-only output)."""
    from tests.hf_models import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("lora")
    save_tiny_checkpoint("qwen2", root / "hf")
    logits = run_ranks(_train_body, 2, str(root / "hf"), str(root), timeout_s=300)[0]
    done = _convert("mcore-to-hf", "--mcore", root / CHECKPOINT, "--out", root / "peft", "--adapter-only")
    assert done.returncode == 0, done.stderr
    return root, root / "hf", logits, root / "peft"


def test_adapter_only_loads_in_peft_with_the_trainers_logits(trained, report):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, hf_dir, trainer_logits, peft_dir = trained
    assert sorted(p.name for p in peft_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf_dir)
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8.0, False)

    base = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        base_logits = base(TOKENS).logits
        logits = PeftModel.from_pretrained(base, peft_dir).eval()(TOKENS).logits
    scale = trainer_logits.abs().max().item()
    diff = (logits - trainer_logits).abs().max().item()
    logprob_diff = (logits.log_softmax(-1) - trainer_logits.log_softmax(-1)).abs().max().item()
    effect = (trainer_logits - base_logits).abs().max().item()
    report(
        f"LoRA --adapter-only in PEFT vs the trainer (TP=2): |logits| {diff:.1e} (max |logit| {scale:.1f}, "
        f"relative {diff / scale:.1e}), |log-probs| {logprob_diff:.1e}; "
        f"training moved the logits by {effect:.1e}"
    )
    assert effect > 1e3 * LOGIT_RELATIVE_TOLERANCE * scale, "the adapters barely changed the model: test void"
    assert diff <= LOGIT_RELATIVE_TOLERANCE * scale


def _peft_merged(hf_dir: Path, peft_dir: Path) -> tuple[dict, dict]:
    """The base's state dict and PEFT's ``merge_and_unload()`` of ``peft_dir`` on it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_dir)
    base_state = {name: t.clone() for name, t in base.state_dict().items()}
    return base_state, PeftModel.from_pretrained(base, peft_dir).merge_and_unload().state_dict()


def _max_diff(got: dict, expected: dict) -> float:
    return max((got[n] - expected[n]).abs().max().item() for n in expected)


def test_merge_equals_peft_merge_and_unload(trained, report):
    from transformers import AutoModelForCausalLM

    root, hf_dir, _, peft_dir = trained
    done = _convert(
        "mcore-to-hf", "--mcore", root / CHECKPOINT, "--out", root / "merged", "--merge", "--verify"
    )
    assert done.returncode == 0, done.stderr
    assert "verify PASS" in done.stdout, done.stdout
    merged = AutoModelForCausalLM.from_pretrained(root / "merged").state_dict()
    base_state, expected = _peft_merged(hf_dir, peft_dir)
    assert merged.keys() == expected.keys()
    worst = _max_diff(merged, expected)
    adapted = [n for n in expected if not torch.equal(expected[n], base_state[n])]
    report(
        f"LoRA --merge vs PEFT merge_and_unload: max |weight diff| {worst:.1e} "
        f"over {len(adapted)} merged tensors"
    )
    assert len(adapted) == 2 * 7, adapted  # two layers, seven projections
    assert worst <= WEIGHT_TOLERANCE
    for name in expected.keys() - set(adapted):
        assert torch.equal(merged[name], base_state[name]), f"{name} has no adapter and must stay the base's"
    assert (root / "merged" / "tokenizer.json").is_file()


def _peft_in_body(rank, world_size, root, hf_dir, llama_dir, trained_peft, random_peft):
    """hf-to-mcore --adapter of the trained adapter (against the training checkpoint's keys) and of a
    random one (back to PEFT with --adapter-only); --merge of the former on other copies of its base."""
    from megatron.core import dist_checkpointing

    from atropos_megatron.weights.convert import single_process_group
    from atropos_megatron.weights.lora_checkpoint import read_adapter_checkpoint

    root = Path(root)
    statuses = {
        "trained in": _main(
            "hf-to-mcore", "--hf", hf_dir, "--adapter", trained_peft, "--out", root / "again"
        ),
        "random in": _main("hf-to-mcore", "--hf", llama_dir, "--adapter", random_peft, "--out", root / "rnd"),
        "random out": _main(
            "mcore-to-hf", "--mcore", root / "rnd", "--out", root / "rnd-peft", "--adapter-only"
        ),
    }
    statuses.update(_merge_on_other_bases(root, Path(hf_dir)))
    formats = {}
    for name, path in (("trainer", root / CHECKPOINT), ("converted", root / "again")):
        metadata = dist_checkpointing.load_tensors_metadata(str(path))
        formats[name] = {
            key: (tuple(meta.global_shape), meta.dtype)
            for key, meta in metadata.items()
            if not key.startswith("optimizer.")
        }
    with single_process_group():
        tensors = {
            name: read_adapter_checkpoint(path).tensors
            for name, path in (("trainer", root / CHECKPOINT), ("converted", root / "again"))
        }
    return statuses, formats, tensors


def _merge_on_other_bases(root: Path, hf_dir: Path) -> dict[str, tuple[int, str]]:
    """--merge of the converted adapters onto the same base moved elsewhere (``--base``), and onto the
    base as a torch_dist checkpoint (as a LoRA run on ``model.dist_checkpoint`` records it; the HF
    config then comes from the base's ``hf_config/``)."""
    from atropos_megatron.weights.convert import hf_to_mcore
    from atropos_megatron.weights.fingerprint import fingerprint_directory

    moved = root / "moved-base"
    shutil.copytree(hf_dir, moved)
    statuses = {"moved base": _main("mcore-to-hf", "--mcore", root / "again", "--merge", "--base", moved,
                                    "--out", root / "merged-moved")}  # fmt: skip
    hf_to_mcore(hf_dir, root / "dist-base")
    on_dist = root / "again-on-dist"
    shutil.copytree(root / "again", on_dist)
    shutil.rmtree(on_dist / "hf_config")
    sidecar = json.loads((on_dist / "atropos_megatron.json").read_text())
    base = str(root / "dist-base")
    sidecar["base"] = {"path": base, "fingerprint": fingerprint_directory(base)}
    (on_dist / "atropos_megatron.json").write_text(json.dumps(sidecar))
    statuses["dist base"] = _main("mcore-to-hf", "--mcore", on_dist, "--merge", "--out", root / "merged-dist")
    return statuses


def test_peft_adapters_convert_in_with_a_lora_runs_keys_and_back_bit_exact(trained, tmp_path, report):
    from tests.hf_models import save_tiny_checkpoint

    root, hf_dir, _, trained_peft = trained
    llama_dir, random_peft = tmp_path / "llama", tmp_path / "random-peft"
    save_tiny_checkpoint("llama", llama_dir)
    targets = ["q_proj", "v_proj", "down_proj"]
    _random_peft_adapter(llama_dir, random_peft, r=8, lora_alpha=4, use_rslora=True, target_modules=targets)
    statuses, formats, tensors = run_ranks(
        _peft_in_body, 1, str(root), str(hf_dir), str(llama_dir), str(trained_peft), str(random_peft)
    )[0]
    for what, (status, stderr) in statuses.items():
        assert status == 0, f"{what}: {stderr}"

    # The trained adapter, converted back in: the training checkpoint's model part exactly.
    assert formats["trainer"] and formats["converted"] == formats["trainer"]
    assert tensors["converted"].keys() == tensors["trainer"].keys()
    assert all(torch.equal(tensors["converted"][n], t) for n, t in tensors["trainer"].items())
    sidecar = json.loads((root / "again" / "atropos_megatron.json").read_text())
    assert sidecar["base"]["path"] == str(hf_dir) and sidecar["lora"]["rank"] == 4
    assert (root / "again" / "hf_config" / "config.json").is_file()

    # A random PEFT adapter: PEFT -> Megatron -> PEFT is bit-exact, config fields included.
    source, back = _tensors(random_peft), _tensors(root / "rnd-peft")
    assert back.keys() == source.keys() and len(source) == 2 * 3 * 2
    assert all(back[n].dtype == t.dtype and torch.equal(back[n], t) for n, t in source.items())
    before = json.loads((random_peft / "adapter_config.json").read_text())
    after = json.loads((root / "rnd-peft" / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "use_rslora"):
        assert after[field] == before[field], field
    assert sorted(after["target_modules"]) == sorted(before["target_modules"]) == sorted(targets)
    assert after["base_model_name_or_path"] == str(llama_dir)

    # --merge of the converted checkpoint on the same weights elsewhere (by fingerprint) and as torch_dist.
    from transformers import AutoModelForCausalLM

    expected = _peft_merged(hf_dir, trained_peft)[1]
    for merged in ("merged-moved", "merged-dist"):
        state = AutoModelForCausalLM.from_pretrained(root / merged).state_dict()
        assert state.keys() == expected.keys() and _max_diff(state, expected) <= WEIGHT_TOLERANCE, merged
    report(
        f"PEFT -> Megatron -> PEFT bit-exact ({len(source)} tensors); "
        "trained adapter -> Megatron = its checkpoint"
    )


def _refusals_body(rank, world_size, root, hf_dir, peft_dir):
    """Every refusal through the command line's main(), in one process: (status, stderr, outputs left)."""
    from atropos_megatron.weights.convert import hf_to_mcore
    from tests.hf_models import save_tiny_checkpoint

    root, lora = Path(root), Path(root) / CHECKPOINT
    full = root / "full-model"
    hf_to_mcore(Path(hf_dir), full)
    other_base = root / "other-base"
    shutil.copytree(hf_dir, other_base)
    weights = other_base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # same names, shapes and size; other weights
    weights.write_bytes(bytes(data))
    dora, higher_rank = root / "dora", root / "rank8"
    for copy, change in ((dora, {"use_dora": True}), (higher_rank, {"r": 8})):
        shutil.copytree(peft_dir, copy)
        config = json.loads((copy / "adapter_config.json").read_text())
        (copy / "adapter_config.json").write_text(json.dumps({**config, **change}))
    one_layer = root / "one-layer"
    save_tiny_checkpoint("qwen2", one_layer, num_hidden_layers=1)

    out = root / "refused"
    cases = {
        "no flag": ("mcore-to-hf", "--mcore", lora),
        "adapter-only on a full model": ("mcore-to-hf", "--mcore", full, "--adapter-only"),
        "merge on a full model": ("mcore-to-hf", "--mcore", full, "--merge"),
        "both flags": ("mcore-to-hf", "--mcore", lora, "--adapter-only", "--merge"),
        "other base": ("mcore-to-hf", "--mcore", lora, "--merge", "--base", other_base),
        "base without merge": ("mcore-to-hf", "--mcore", lora, "--base", hf_dir),
        "verify adapter-only": ("mcore-to-hf", "--mcore", lora, "--adapter-only", "--verify"),
        "dora": ("hf-to-mcore", "--hf", hf_dir, "--adapter", dora),
        "shapes": ("hf-to-mcore", "--hf", hf_dir, "--adapter", higher_rank),
        "layers": ("hf-to-mcore", "--hf", one_layer, "--adapter", peft_dir),
    }
    results = {}
    for name, args in cases.items():
        status, stderr = _main(*args, "--out", out)
        results[name] = (status, stderr, out.exists() or out.with_name("refused.partial").exists())
    return results


REFUSALS = {
    "no flag": "pass --adapter-only for an HF PEFT adapter directory, or --merge",
    "adapter-only on a full model": "holds a full model, not LoRA adapters",
    "merge on a full model": "--merge needs a LoRA run's checkpoint",
    "both flags": "not allowed with argument",
    "other base": "has other weights than the base the adapters",
    "base without merge": "--base names the base for --merge",
    "verify adapter-only": "--verify cannot be used with --adapter-only",
    "dora": "use_dora=True is not supported",
    "shapes": "has shape [4, 96]; with r=8 the base (hidden_size=64, ffn_hidden_size=96) needs [8, 96]",
    "layers": "layer 1, but the base has num_hidden_layers=1",
}


def test_refusals_name_the_problem_and_write_nothing(trained):
    root, hf_dir, _, peft_dir = trained
    results = run_ranks(_refusals_body, 1, str(root), str(hf_dir), str(peft_dir))[0]
    assert results.keys() == REFUSALS.keys()
    for name, (status, stderr, wrote) in results.items():
        assert status == 2, f"{name}: exit status {status}: {stderr}"
        assert REFUSALS[name] in stderr, f"{name}: {stderr}"
        assert not wrote, f"{name}: left an output directory"
    fingerprints = results["other base"][1]
    assert fingerprints.count("sha256:") == 2, "the fingerprint refusal names both fingerprints"
