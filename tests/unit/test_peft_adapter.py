"""PEFT adapter directories: what PEFT writes reads back as our LoraConfig and tensors, what we write
loads in ``PeftModel.from_pretrained`` with the same outputs, and anything but plain LoRA is refused."""

from __future__ import annotations

import json

import pytest
import torch

from atropos_megatron.config import LoraConfig
from atropos_megatron.weights.peft_adapter import (
    ADAPTER_CONFIG,
    PeftAdapterError,
    check_same_adapters,
    read_peft_adapter,
    write_peft_adapter,
)
from tests.hf_models import tiny_hf_model

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_adapter_dir(tmp_path, **options):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model = get_peft_model(
        tiny_hf_model("qwen2"), PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **options)
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    path = tmp_path / "peft"
    model.save_pretrained(path)
    return path, model.eval()


def test_a_peft_adapter_reads_back_and_what_we_write_loads_in_peft(tmp_path):
    from peft import PeftModel

    path, peft_model = _peft_adapter_dir(tmp_path, use_rslora=True)
    adapter = read_peft_adapter(path)
    assert adapter.lora == LoraConfig(rank=4, alpha=8.0, use_rslora=True, target_modules=TARGETS)
    assert all(".lora_A.weight" in n or ".lora_B.weight" in n for n in adapter.tensors)
    assert len(adapter.tensors) == 2 * len(TARGETS) * 2  # two layers

    out = tmp_path / "ours"
    write_peft_adapter(out, adapter.lora, adapter.tensors, base_model="tiny-qwen2")
    reloaded = PeftModel.from_pretrained(tiny_hf_model("qwen2"), out).eval()
    tokens = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, peft_model(tokens).logits)
    again = read_peft_adapter(out)
    assert again.lora == adapter.lora and again.base_model == "tiny-qwen2"
    assert all(torch.equal(again.tensors[n], t) for n, t in adapter.tensors.items())


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("use_dora", True, "use_dora=True"),
        ("bias", "all", "bias='all'"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("rank_pattern", {"q_proj": 8}, "rank_pattern"),
        ("target_modules", ["q_proj", "lm_head"], "target_modules"),
        ("target_modules", ".*proj", "target_modules"),
        ("peft_type", "IA3", "only LORA"),
    ],
)
def test_anything_but_plain_lora_on_the_seven_projections_is_refused_by_name(tmp_path, option, value, named):
    path, _ = _peft_adapter_dir(tmp_path)
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    config[option] = value
    (path / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(PeftAdapterError, match=named):
        read_peft_adapter(path)


def test_an_adapter_of_another_shape_than_model_lora_is_refused(tmp_path):
    path, _ = _peft_adapter_dir(tmp_path)
    adapter = read_peft_adapter(path)
    check_same_adapters(adapter.lora, LoraConfig(rank=4, alpha=8.0, target_modules=TARGETS[::-1]), source="x")
    with pytest.raises(PeftAdapterError, match=r"r=4, but model.lora.rank is 8"):
        check_same_adapters(adapter.lora, LoraConfig(rank=8, alpha=8.0, target_modules=TARGETS), source="x")
    with pytest.raises(PeftAdapterError, match="target_modules"):
        check_same_adapters(adapter.lora, LoraConfig(rank=4, alpha=8.0), source="x")
