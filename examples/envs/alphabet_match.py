"""An Atropos environment a randomly initialised tiny model can learn in minutes: answer in the
prompt's alphabet.

The task. A prompt is 4 symbols drawn from one of two alphabets, the letters ``a-h`` or the digits
``0-7``, followed by ``>`` (``"cahc>"``, ``"0621>"``). The model writes up to 8 characters; the score
is the share of those 8 positions that hold a symbol of the prompt's alphabet (``"cahc>bad1eeg"``
scores 6/8: ``1`` is the wrong alphabet and the 8th position is empty).

Why it is learnable fast, and why it needs the prompt. The demo model has a 99-token character
vocabulary and starts almost uniform, so a first completion hits the right alphabet's 8 symbols
about 8/99 of the time: rewards start near 0.1 but vary inside every group of 8, so GRPO has a
signal from step one. Writing only ``a-h`` and ``0-7`` regardless of the prompt caps the reward at
0.5; beyond that the model must read which alphabet the prompt uses, a single feature present in
every prompt token that two layers of attention pick up quickly. With plain GRPO (8 prompts x 8
completions, AdamW lr 3e-3) the mean reward goes from ~0.1 to ~0.9 in 40 steps
(``benchmarks/hf_grpo_step.py`` measures it without any server).

How it talks to the rest. Generation goes through atroposlib's ``ManagedServer`` against an
SGLang-protocol server (``--openai.server_type sglang``; ``atropos-megatron serve`` on CPU), which
returns the sampled token ids and their log-probs, so every group carries ``tokens``, label-style
``masks`` and ``inference_logprobs``. The server config is a one-element *list*: with a bare
``APIServerConfig`` atroposlib ignores ``--openai.base_url`` and targets localhost:9004-9007.

    python examples/envs/alphabet_match.py serve --slurm false \\
        --env.rollout_server_url http://127.0.0.1:8000 --env.tokenizer_name runs/demo/tokenizer \\
        --openai.base_url http://127.0.0.1:30000/v1

``atropos-megatron demo`` starts it with the right flags; the task itself (prompts, reward) lives in
``atropos_megatron/demo/assets.py`` so that the benchmark trains exactly the same thing.
"""

from __future__ import annotations

import logging
import random

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from pydantic import Field

from atropos_megatron.demo import assets

logger = logging.getLogger("alphabet_match")


class AlphabetMatchConfig(BaseEnvConfig):
    """Atropos' env config with the demo's defaults, plus a seed for the prompt stream."""

    seed: int = Field(default=0, description="Seed of the prompt stream (prompts are random, not a dataset)")
    temperature: float = Field(default=1.0, description="Sampling temperature (the trainer is told it)")
    log_every_groups: int = Field(
        default=8, description="Log one scored completion every N groups (0: never)"
    )


class AlphabetMatchEnv(BaseEnv):
    name = "alphabet_match"
    env_config_cls = AlphabetMatchConfig

    def __init__(self, config: AlphabetMatchConfig, server_configs, slurm=False, testing=False) -> None:
        # One tokenizer for both sides: the server client decodes with the env's unless told otherwise.
        configs = server_configs if isinstance(server_configs, list) else [server_configs]
        for server in configs:
            if server.tokenizer_name in ("", "none"):
                server.tokenizer_name = config.tokenizer_name
        super().__init__(config, server_configs, slurm=slurm, testing=testing)
        self.rng = random.Random(config.seed)
        self.groups_scored = 0

    @classmethod
    def config_init(cls) -> tuple[AlphabetMatchConfig, list[APIServerConfig]]:
        env = AlphabetMatchConfig(
            group_size=8,
            max_token_length=assets.COMPLETION_TOKENS,
            tokenizer_name="runs/demo/tokenizer",  # where `atropos-megatron demo` builds it
            use_wandb=False,
            wandb_name=cls.name,
            # Keep groups whose completions all score the same: they carry zero advantage, but
            # dropping them would stall the run once the model is good (every group 1.0) and bias
            # the reward the trainer reports upward.
            ensure_scores_are_not_same=False,
            # At most one batch waiting in the API queue: fresher samples for a fast-moving policy.
            max_batches_offpolicy=1,
            steps_per_eval=0,  # the training reward is the measure; no separate eval pass
            total_steps=1000,
        )
        server = APIServerConfig(
            server_type="sglang",
            base_url="http://127.0.0.1:30000/v1",
            model_name="default",
            # The openai client refuses an empty key; a server started without --api-key ignores it.
            api_key="EMPTY",
            # atroposlib's health check sends a /v1/completions request every second; the demo's
            # supervisor watches the server instead, and on 2 CPU cores every request counts.
            health_check=False,
            timeout=120,
        )
        return env, [server]

    async def setup(self) -> None:
        logger.info(
            "alphabet_match: alphabets %s, completions of %d tokens",
            assets.ALPHABETS,
            assets.COMPLETION_TOKENS,
        )

    async def get_next_item(self) -> str:
        return assets.sample_prompt(self.rng)

    async def collect_trajectories(self, item: str) -> tuple[ScoredDataGroup | None, list]:
        """Sample ``group_size`` completions of one prompt in one request and score each."""
        async with self.server.managed_server(tokenizer=self.tokenizer) as managed:
            await managed.completion(
                prompt=item,
                n=self.config.group_size,
                max_tokens=assets.COMPLETION_TOKENS,
                temperature=self.config.temperature,
            )
            nodes = managed.get_state()["nodes"]
        if any(node.metadata.get("finish_reason") == "abort" for node in nodes):
            # Cut short by a weight update (weights.pause_mode=abort): a truncated completion would
            # be scored as a wrong one. Prompts are random, so dropping the group loses nothing.
            logger.warning("dropping the group of %r: its generation was aborted", item)
            return None, []
        group = ScoredDataGroup(
            tokens=[],
            masks=[],
            scores=[],
            inference_logprobs=[],
            generation_params={"temperature": self.config.temperature},
        )
        for node in nodes:
            group["tokens"].append(node.tokens)
            group["masks"].append(node.masked_tokens)  # -100 on the prompt, token ids on the completion
            group["inference_logprobs"].append(node.logprobs)  # 1.0 on the prompt, as Atropos marks it
            group["scores"].append(assets.score_completion(item, node.full_text[len(item) :]))
        self._log_example(item, nodes, group["scores"])
        return group, []

    async def evaluate(self, *args, **kwargs) -> None:
        """No separate evaluation (``steps_per_eval=0``): the mean training reward is the metric."""
        return None

    def _log_example(self, prompt: str, nodes, scores: list[float]) -> None:
        self.groups_scored += 1
        every = self.config.log_every_groups
        if every > 0 and nodes and self.groups_scored % every == 0:
            completion = nodes[0].full_text[len(prompt) :]
            mean = sum(scores) / len(scores)
            logger.info(
                "group %d: %r -> %r scored %.3f (group mean %.3f)",
                self.groups_scored,
                prompt,
                completion,
                scores[0],
                mean,
            )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # atroposlib's env loop logs its status ten times a second at INFO: keep its warnings only.
    logging.getLogger("atroposlib.envs.base").setLevel(logging.WARNING)
    AlphabetMatchEnv.cli()
