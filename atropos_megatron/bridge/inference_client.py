"""One inference server, whatever engine runs it: the calls weight sync, its health monitor and status make.

``WeightSync`` (pushes, retries, dropping and holding servers, the health monitor, catch-up) and
``GetStatus`` talk to every server through :class:`InferenceClient`; which engine a server runs is
``weights.inference_engine``, and :func:`build_client` picks the implementation by that exact key:

- ``sglang``: ``sglang_client.SGLangClient`` (SGLang, or ``atropos-megatron serve``);
- ``vllm``: ``vllm_client.VLLMClient`` (vLLM >= 0.33's RL routes, or ``serve --protocol vllm``).

An update is the same phases on every engine: ``pause`` -> ``begin_update`` -> the transport's
calls -> the steps of ``finish_update_steps`` -> ``resume``. What each phase sends is the client's;
when and how often it is tried, and what happens to a server that fails, is ``WeightPush``'s.

Deliberately not here: retries (the caller decides), engine detection (the config names the engine;
a server that answers as the other one fails with :class:`EngineMismatch`, which says so), anything
about generation requests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

ENGINES = ("sglang", "vllm")


class InferenceError(RuntimeError):
    """A call to an inference server failed (unreachable, timed out, or refused)."""

    def __init__(self, url: str, route: str, message: str, *, status_code: int | None = None) -> None:
        super().__init__(f"{url}{route}: {message}")
        self.url = url
        self.route = route
        self.status_code = status_code


class EngineMismatch(InferenceError):
    """The server answers as another engine than ``weights.inference_engine`` names."""


@dataclass(frozen=True)
class ServerInfo:
    """What the bridge needs to know about a server before it updates it."""

    version: str  # the engine's own release ("" when the server did not say)
    tp_size: int  # ranks it adds to a `distributed` group (SGLang: tp_size; vLLM: TP * PP * DP)
    weight_version: str
    engine: str = "sglang"

    @property
    def label(self) -> str:
        """Engine and release for status (the proto's ``sglang_version``): SGLang's bare, as always."""
        return self.version if self.engine == "sglang" else f"{self.engine} {self.version}".strip()


@dataclass(frozen=True)
class Step:
    """One call of an update's end, tried by ``WeightPush`` with its retries."""

    name: str  # the route, for logs
    call: Callable[[], None]
    best_effort: bool = False
    """A refusal leaves the update standing: counted (``flushes_skipped``), never retried or dropped."""


@dataclass(frozen=True)
class GroupJoin:
    """How one server joins the ``distributed`` transport's group (the trainer is rank 0)."""

    master_address: str
    master_port: int
    rank_offset: int  # the server's first rank
    world_size: int  # the trainer and every server's ranks
    group_name: str
    backend: str


class InferenceClient(Protocol):
    """Control and weight calls to one server; every call raises :class:`InferenceError` on failure."""

    engine: str
    url: str
    group_before_update: bool
    """Whether the ``distributed`` group is (re)made before ``begin_update`` (vLLM: its transfer engine
    cannot be shut down during an update) rather than after it (SGLang, as it always was)."""

    def server_info(self, *, timeout_s: float | None = None) -> ServerInfo: ...

    def refusal(self, transport: str, *, adapter: bool) -> str | None:
        """Why this engine cannot take a push by ``transport`` (of a LoRA adapter); None: it can."""

    def pause(self, mode: str) -> None:
        """Pause generation; ``mode`` is ``weights.pause_mode`` (abort | retract | in_place)."""

    def resume(self) -> None: ...

    def begin_update(self, info: ServerInfo) -> None:
        """Open the update on a paused server (a no-op where the engine has no such call)."""

    def finish_update_steps(self, info: ServerInfo, version: str, *, flush_attempts: int) -> list[Step]:
        """The calls after the last weights arrived, up to (not including) ``resume``; they tag
        ``version``."""

    def abandon_update(self, info: ServerInfo) -> None:
        """Close an update a broken push left open, so that the next one can begin (server stays paused)."""

    def set_weight_version(self, version: str) -> None: ...

    # -- transports ----------------------------------------------------------------------------

    def reset_weight_group(self, group_name: str) -> None:
        """Drop a previous ``distributed`` group (the caller ignores failures: a fresh server has none)."""

    def init_weight_group(self, join: GroupJoin) -> None:
        """Join the trainer's group; returns once the trainer (rank 0) has joined too."""

    def update_from_group(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]], *, group_name: str
    ) -> None:
        """Receive one bucket that the trainer broadcasts on the group; returns once it is loaded."""

    def update_from_tensor(self, payloads: list[str]) -> None:
        """``grpc``: one serialized flattened bucket per TP rank."""

    def update_from_disk(self, path: str) -> None: ...

    def load_adapter(self, name: str, path: str) -> None: ...

    def load_adapter_from_tensors(self, name: str, config: dict[str, Any], payloads: list[str]) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    def close(self) -> None: ...


def build_client(
    engine: str, url: str, *, admin_api_key: str | None = None, timeout_s: float = 600.0
) -> InferenceClient:
    """The client of ``engine`` (one of :data:`ENGINES`) for the server at ``url``."""
    if engine == "sglang":
        from atropos_megatron.bridge.sglang_client import SGLangClient

        return SGLangClient(url, admin_api_key=admin_api_key, timeout_s=timeout_s)
    if engine == "vllm":
        from atropos_megatron.bridge.vllm_client import VLLMClient

        return VLLMClient(url, admin_api_key=admin_api_key, timeout_s=timeout_s)
    raise ValueError(f"unknown inference engine {engine!r}; supported: {', '.join(ENGINES)}")


class JsonHttp:
    """The HTTP plumbing both clients share: a deadline on every call, errors as ``error_type``."""

    error_type: type[InferenceError] = InferenceError

    def __init__(self, url: str, *, admin_api_key: str | None = None, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {admin_api_key}"} if admin_api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def _request(
        self,
        method: str,
        route: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        expect_json: bool = True,
        timeout_s: float | None = None,
    ) -> Any:
        kwargs: dict[str, Any] = {"json": json} if json is not None else {}
        if params is not None:
            kwargs["params"] = params
        if timeout_s is not None:
            kwargs["timeout"] = timeout_s
        try:
            response = self._http.request(method, route, **kwargs)
        except httpx.HTTPError as exc:
            raise self.error_type(self.url, route, f"{type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            message = self._error_text(response)
            raise self.error_type(self.url, route, message, status_code=response.status_code)
        if not expect_json or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.text

    def _error_text(self, response: httpx.Response) -> str:
        """The server's own message out of an error response."""
        try:
            body = response.json()
        except ValueError:
            return f"HTTP {response.status_code}: {response.text[:300]}"
        return f"HTTP {response.status_code}: {_message(body)}"


def _message(body: Any) -> Any:
    """SGLang's ``message`` / ``error_message`` / FastAPI's ``detail``, vLLM's ``{"error": {"message"}}``
    or ``{"error": str}``; else the whole body."""
    if not isinstance(body, dict):
        return body
    for key in ("message", "error_message", "detail"):
        if body.get(key):
            return body[key]
    error = body.get("error")
    if isinstance(error, dict) and error.get("message"):
        return error["message"]
    return error or body
