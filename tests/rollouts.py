"""Synthetic rollouts for trainer tests: random prompts and completions with random scores.

``synthetic_batch`` is what the bridge hands the trainer (an ``EncodedBatch``'s fields, label-aligned);
``atropos_groups`` is what an environment posts to the Atropos API (token-aligned, ``masks`` -100 on
the prompt). The same seed gives the same data.
"""

from __future__ import annotations

import time
import types

import numpy as np

PROMPT_LENS = (3, 8)
COMPLETION_LENS = (2, 12)
"""Default length ranges (low inclusive, high exclusive) of prompts and completions."""


def _sequences(seed: int, groups: int, group_size: int, vocab: int, prompt_lens, completion_lens):
    rng = np.random.default_rng(seed)
    for g in range(groups):
        prompt = rng.integers(0, vocab, rng.integers(*prompt_lens))
        for _ in range(group_size):
            completion = rng.integers(0, vocab, rng.integers(*completion_lens))
            yield g, prompt, completion, float(rng.random())


def atropos_groups(seed: int, *, groups: int = 2, group_size: int = 4, vocab: int = 250) -> list[dict]:
    out: dict[int, dict] = {}
    for g, prompt, completion, score in _sequences(
        seed, groups, group_size, vocab, PROMPT_LENS, COMPLETION_LENS
    ):
        group = out.setdefault(g, {"tokens": [], "masks": [], "scores": []})
        group["tokens"].append([*map(int, prompt), *map(int, completion)])
        group["masks"].append([-100] * len(prompt) + [int(t) for t in completion])
        group["scores"].append(score)
    return list(out.values())


def synthetic_batch(
    seed: int,
    *,
    groups: int = 4,
    group_size: int = 4,
    vocab: int = 250,
    prompt_lens: tuple[int, int] = PROMPT_LENS,
    completion_lens: tuple[int, int] = COMPLETION_LENS,
):
    seq_lens, ids, labels, mask, scores, group_index = [], [], [], [], [], []
    for g, prompt, completion, score in _sequences(
        seed, groups, group_size, vocab, prompt_lens, completion_lens
    ):
        tokens = np.concatenate([prompt, completion])
        trained = np.concatenate([np.zeros(len(prompt), bool), np.ones(len(completion), bool)])
        ids.append(tokens[:-1])
        labels.append(tokens[1:])
        mask.append(trained[1:])
        seq_lens.append(len(tokens) - 1)
        scores.append(score)
        group_index.append(g)
    info = dict(
        env_id=0,
        overrides_json="{}",
        has_advantages=False,
        has_inference_logprobs=False,
        has_ref_logprobs=False,
    )
    return types.SimpleNamespace(
        batch_id=f"batch-{seed}",
        step=seed,
        seq_lens=np.array(seq_lens, np.int32),
        input_ids=np.concatenate(ids).astype(np.int32),
        labels=np.concatenate(labels).astype(np.int32),
        loss_mask=np.concatenate(mask),
        scores=np.array(scores, np.float32),
        group_index=np.array(group_index, np.int32),
        advantages=None,
        inference_logprobs=None,
        ref_logprobs=None,
        groups=tuple(types.SimpleNamespace(**info) for _ in range(groups)),
        fetched_unix_s=time.time(),
    )
