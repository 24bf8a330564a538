"""A chat environment written the way a third party writes one: only atroposlib's public ``BaseEnv`` API.

The task. The model gets a short chat (a system prompt and one user message drawn from a small list)
and replies. The score is the share of the reply's characters that are lowercase ASCII letters or
spaces, over a fixed budget of characters, so replies that are too short, shouting or binary noise
score less. A random model's replies score anywhere between 0 and ~0.2, so a group's scores differ
and atroposlib's default ``ensure_scores_are_not_same`` keeps almost every group.

It uses the classic atroposlib path, on purpose: ``server.chat_completion(n=group_size)`` for the
samples, ``tokenize_for_trainer`` for tokens and masks (the chat template renders the prompt, the
reply is unmasked), and a single ``APIServerConfig`` from ``config_init``. Nothing in it knows about
atropos-megatron. Train on it with:

    atropos-megatron run examples/envs/lowercase_chat.py --steps 20

or start it yourself against a running stack (``python examples/envs/lowercase_chat.py serve --help``).
"""

from __future__ import annotations

import logging
import random

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from atroposlib.utils.tokenize_for_trainer import tokenize_for_trainer
from pydantic import Field

logger = logging.getLogger("lowercase_chat")

SYSTEM_PROMPT = "You are a calm assistant. Reply in plain lowercase words."
USER_MESSAGES = (
    "Say hello to a new colleague.",
    "Describe the sea in a few words.",
    "What do you like about mornings?",
    "Give me a gentle reminder to drink water.",
    "Name three things in a kitchen.",
    "How would you describe a quiet library?",
)
SCORED_CHARACTERS = 48
"""The reply's budget: the score is lowercase letters and spaces among its first 48 characters, over 48."""


def score_reply(reply: str) -> float:
    """Share of the first :data:`SCORED_CHARACTERS` positions holding a lowercase letter or a space."""
    good = sum(ch == " " or "a" <= ch <= "z" for ch in reply[:SCORED_CHARACTERS])
    return good / SCORED_CHARACTERS


class LowercaseChatConfig(BaseEnvConfig):
    seed: int = Field(default=0, description="Seed of the prompt stream")
    reply_tokens: int = Field(default=48, description="max_tokens of each reply")
    temperature: float = Field(default=1.0, description="Sampling temperature")


class LowercaseChatEnv(BaseEnv):
    name = "lowercase_chat"
    env_config_cls = LowercaseChatConfig

    def __init__(self, config: LowercaseChatConfig, server_configs, slurm=False, testing=False) -> None:
        super().__init__(config, server_configs, slurm=slurm, testing=testing)
        self.rng = random.Random(config.seed)
        self.groups = 0

    @classmethod
    def config_init(cls) -> tuple[LowercaseChatConfig, APIServerConfig]:
        env = LowercaseChatConfig(
            group_size=4,
            max_token_length=512,
            tokenizer_name="Qwen/Qwen2.5-0.5B-Instruct",  # replaced by the run's tokenizer
            use_wandb=False,
            wandb_name=cls.name,
            steps_per_eval=0,
            total_steps=1000,
        )
        server = APIServerConfig(
            model_name="Qwen/Qwen2.5-0.5B-Instruct",
            base_url="http://localhost:9001/v1",
            api_key="x",
            server_type="openai",
        )
        return env, server

    async def setup(self) -> None:
        logger.info(
            "lowercase_chat: %d user messages, replies of %d tokens",
            len(USER_MESSAGES),
            self.config.reply_tokens,
        )

    async def get_next_item(self) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": self.rng.choice(USER_MESSAGES)},
        ]

    async def collect_trajectories(self, item: list[dict[str, str]]) -> tuple[ScoredDataGroup | None, list]:
        completions = await self.server.chat_completion(
            messages=item,
            n=self.config.group_size,
            max_tokens=self.config.reply_tokens,
            temperature=self.config.temperature,
        )
        group = ScoredDataGroup(tokens=[], masks=[], scores=[])
        for choice in completions.choices:
            reply = choice.message.content or ""
            chat = [*item, {"role": "assistant", "content": reply}]
            tokenized = tokenize_for_trainer(self.tokenizer, chat)
            group["tokens"].append(tokenized["tokens"])
            group["masks"].append(tokenized["masks"])
            group["scores"].append(score_reply(reply))
        self.groups += 1
        if self.groups % 8 == 1:
            logger.info(
                "group %d: %r scored %.3f",
                self.groups,
                completions.choices[0].message.content,
                group["scores"][0],
            )
        return group, []

    async def evaluate(self, *args, **kwargs) -> None:
        return None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    LowercaseChatEnv.cli()
