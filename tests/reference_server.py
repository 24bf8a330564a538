"""Run the reference SGLang-protocol server (``atropos-megatron serve``) as a subprocess for tests.

Tests of SGLang client code talk to a real server process over HTTP, exactly as they would to SGLang,
so the protocol (routes, JSON, status codes, pickled payloads crossing processes) is what is tested.

    with ReferenceServer(model_dir, tokenizer_path=tok_dir, admin_api_key="k") as server:
        httpx.post(server.url + "/generate", json={...})
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import httpx

from tests.subprocess_server import SubprocessServer


class ReferenceServer(SubprocessServer):
    """One ``serve`` process on ``127.0.0.1:port``; keyword options become ``--flag value`` arguments
    (``True``: a bare ``--flag``; a list: ``--flag v1 v2``); ``env``: variables set for the process."""

    name = "reference-server"

    def __init__(
        self, model_dir, *, startup_timeout_s: float = 60.0, env: dict[str, str] | None = None,
        **cli_options: object,
    ) -> None:  # fmt: skip
        super().__init__(startup_timeout_s=startup_timeout_s, env=env)
        self._args = ["--model", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in cli_options.items():
            flag = f"--{key.replace('_', '-')}"
            if value is True:  # a switch: enable_lora=True -> --enable-lora
                self._args.append(flag)
            elif isinstance(value, list | tuple):  # nargs: lora_target_modules=["q_proj", ...]
                self._args += [flag, *map(str, value)]
            elif value is not None:
                self._args += [flag, str(value)]

    def command(self) -> list[str]:
        return [sys.executable, "-m", "atropos_megatron.cli", "serve", *self._args]

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False


def served_logprobs(url: str, tokens: Sequence[int], lora_path: str | None = None) -> tuple[list[float], str]:
    """The server's log-prob of each token of ``tokens`` after the first (with LoRA adapter ``lora_path``),
    and its ``weight_version``."""
    body = {
        "input_ids": list(tokens),
        "sampling_params": {"max_new_tokens": 1, "temperature": 0},
        "return_logprob": True,
        "logprob_start_len": 0,
        **({"lora_path": lora_path} if lora_path is not None else {}),
    }
    meta = httpx.post(url + "/generate", json=body, timeout=60).json()["meta_info"]
    return [item[0] for item in meta["input_token_logprobs"][1:]], meta["weight_version"]


def served_vllm_logprobs(
    url: str, prompt: Sequence[int], max_tokens: int = 6
) -> tuple[list[int], list[float], str]:
    """A ``serve --protocol vllm --enable-scale-out`` server's greedy completion of ``prompt`` through
    vLLM's token route ``/inference/v1/generate``: its token ids, their (raw) log-probs, and the server's
    ``weight_version`` (``/weight_info``)."""
    body = {"token_ids": list(prompt), "sampling_params": {"n": 1, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "logprobs": 0}}  # fmt: skip
    response = httpx.post(url + "/inference/v1/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    tokens = list(choice["token_ids"])
    logprobs = [float(entry["logprob"]) for entry in choice["logprobs"]["content"]]
    return tokens, logprobs, httpx.get(url + "/weight_info", timeout=60).json()["weight_version"]
