"""Tiny HuggingFace models of each supported architecture, built locally with random weights.

No hub access in tests: configs are written here, weights drawn from a seed. Weights are larger than
HF's default init and every norm weight and bias is random too, so that a wrong mapping (a swapped
norm, a mis-ordered QKV group, a lost bias) moves the logits far beyond the test tolerance.
"""

from __future__ import annotations

import torch

BASE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=250,  # not a multiple of 128: exercises vocabulary padding
    max_position_embeddings=16384,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
)
VARIANTS = {
    # Llama 3.1: llama3 RoPE scaling, untied.
    "llama": dict(
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),  # fmt: skip
    # Qwen2.5-0.5B style: q/k/v bias, tied embeddings.
    "qwen2": dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
    # Qwen3: q/k norm, head_dim (32) != hidden / heads (16).
    "qwen3": dict(head_dim=32, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
    # Mistral v0.3: no sliding window.
    "mistral": dict(sliding_window=None, head_dim=16),
}
MOE_VARIANTS = {
    # Qwen3-MoE: q/k norm, experts narrower than the dense MLP, one dense layer (mlp_only_layers),
    # routing weights not renormalised (norm_topk_prob false: HF's softmax-then-top-k as is).
    "qwen3_moe": dict(
        num_hidden_layers=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        head_dim=32,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
    # Mixtral: every layer MoE, top-2 renormalised, experts intermediate_size wide.
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None, router_jitter_noise=0.0),
}


def tiny_hf_config(model_type: str, **overrides):
    from transformers import AutoConfig

    variant = VARIANTS[model_type] if model_type in VARIANTS else MOE_VARIANTS[model_type]
    return AutoConfig.for_model(model_type, **{**BASE, **variant, **overrides})


def tiny_hf_model(model_type: str, *, seed: int = 0, **overrides):
    """An fp32 ``*ForCausalLM`` in eval mode with random weights (norms and biases included)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(model_type, **overrides), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model.eval()


def fp64_logits(model_type: str, tokens: torch.Tensor, **overrides) -> torch.Tensor:
    """HF's logits for :func:`tiny_hf_model` computed in float64: the reference fp32 layouts are held to.

    MoE experts run HF's eager loop (its default grouped GEMM has no float64 kernel).
    """
    model = tiny_hf_model(model_type, **overrides)
    model.config._experts_implementation = "eager"
    with torch.no_grad():
        return model.double()(tokens).logits


def hf_state(model) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of ``model`` holds (tied ``lm_head`` left out, as safetensors does).

    MoE models: transformers 5 holds experts as 3-D tensors in memory but writes one tensor per
    expert (the names SGLang and real checkpoints use); ``revert_weight_conversion`` is the step of
    ``save_pretrained`` that produces them.
    """
    if getattr(model.config, "num_local_experts", None) or getattr(model.config, "num_experts", None):
        from transformers.core_model_loading import revert_weight_conversion

        return {
            name: tensor.contiguous()
            for name, tensor in revert_weight_conversion(model, model.state_dict()).items()
        }
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def tiny_tokenizer(vocab_size: int = BASE["vocab_size"], *, chat_template: str | None = None):
    """A word-level fast tokenizer over ``w0 .. w{n-1}``, built locally (no hub); optional chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def save_tiny_checkpoint(
    model_type: str,
    directory,
    *,
    dtype: torch.dtype = torch.float32,
    chat_template: str | None = None,
    **overrides,
):
    """An HF checkpoint directory (safetensors, config.json, tokenizer) of :func:`tiny_hf_model`."""
    model = tiny_hf_model(model_type, **overrides).to(dtype)
    model.save_pretrained(directory)
    tiny_tokenizer(model.config.vocab_size, chat_template=chat_template).save_pretrained(directory)
    return model


def random_peft_model(hf_model, *, seed: int, scale: float = 0.1, **lora_options):
    """``hf_model`` wrapped by PEFT (``peft.LoraConfig(**lora_options)``) with random non-zero A and B
    drawn from ``seed`` (PEFT starts B at zero, which would hide any mistake in B), in eval mode."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf_model, LoraConfig(**lora_options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(scale * torch.randn(param.shape, generator=generator))
    return model.eval()
