"""The reference server's FastAPI app: SGLang's routes, status codes and auth rules, plus ``serve()``.

Routes only translate HTTP <-> the engine, the request parsers (``native_api``, ``openai_api``), the
weight updater (``weight_updates``) and the LoRA service (``lora_api``: adapter routes, and the
adapters a request names, held from admission until its samples exist); blocking work runs in
threads, never on the event loop.
Auth follows SGLang: ``--api-key`` guards generation and /v1 (not /health*); ``--admin-api-key``
guards the weight, pause, flush and version routes, and then only that key is accepted there (without
it, those routes fall back to the api key). Streaming is not implemented (``stream: true`` -> 400).
``protocol="vllm"`` serves vLLM 0.33's routes instead (``vllm_http``; docs/vllm.md §3, §9): its RL routes
and, with ``enable_scale_out``, the token route ``/inference/v1/generate`` (``--api-key`` guards it as
it guards ``/v1``: vLLM guards the ``/inference`` prefix too); no ``/generate``. With
``runtime_lora_updating`` (``serve`` reads ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` once, at start-up, as
vLLM does) it mounts vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``; requests select
a loaded adapter by ``model: "<lora_name>"`` (SGLang mode: ``"<served>:<name>"`` or ``lora_path``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from atropos_megatron import sglang_wire
from atropos_megatron.inference import openai_api
from atropos_megatron.inference.engine import PAUSE_MODES, Engine
from atropos_megatron.inference.generation import GenerateRequest
from atropos_megatron.inference.lora_api import LoraService, openai_lora_path, update_output
from atropos_megatron.inference.native_api import RequestError, parse_generate, sample_json
from atropos_megatron.inference.sampling import SamplingParams
from atropos_megatron.inference.weight_loader import WeightUpdateError
from atropos_megatron.inference.weight_updates import UpdateResult, WeightUpdater

logger = logging.getLogger(__name__)
SESSION_VERSION = (0, 5, 21)  # first SGLang release with begin/end_weight_update sessions
HEALTH_TIMEOUT_S = 20.0  # SGLANG_HEALTH_CHECK_TIMEOUT's default


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.5.15.post1"`` -> ``(0, 5, 15)``."""
    parts = []
    for piece in text.split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    if len(parts) < 2:
        raise ValueError(f"not an SGLang version: {text!r}")
    return tuple(parts)


def json_response(content: Any, status_code: int = 200) -> Response:
    """JSON with non-finite floats as null (what SGLang's orjson emits), never invalid JSON."""
    try:
        body = json.dumps(content, allow_nan=False)
    except ValueError:
        body = json.dumps(_finite(content), allow_nan=False)
    return Response(body, status_code=status_code, media_type="application/json")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _error(message: str, status_code: int = 400) -> Response:
    return json_response({"error": {"message": message}}, status_code)


def _openai_error(message: str, status_code: int = 400) -> Response:
    return json_response(openai_api.error_json(message, status_code), status_code)


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    admin_api_key: str | None = None,
    sglang_version: str = "0.5.23",
    protocol: str = "sglang",
    weight_transfer_backend: str | None = None,
    enable_scale_out: bool = False,
    runtime_lora_updating: bool = False,
) -> FastAPI:
    """The app for ``engine``; ``sglang_version`` picks the protocol generation (sessions from 0.5.21).

    ``protocol="vllm"``: vLLM 0.33's routes instead of SGLang's generation, pause and weight routes
    (``vllm_http``): no ``/generate``; ``enable_scale_out`` (``vllm serve --enable-scale-out``) mounts
    its token route ``/inference/v1/generate``, which answers 403 without it; ``runtime_lora_updating``
    (vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) mounts ``/v1/load_lora_adapter`` and
    ``/v1/unload_lora_adapter``, which do not exist (404) without it."""
    version = parse_version(sglang_version)
    vllm = protocol == "vllm"
    if enable_scale_out and not vllm:
        raise ValueError("--enable-scale-out is a vLLM flag: it needs --protocol vllm")
    if runtime_lora_updating and not vllm:
        raise ValueError("VLLM_ALLOW_RUNTIME_LORA_UPDATING is vLLM's: it needs --protocol vllm")
    updater = WeightUpdater(engine, sessions_required=version >= SESSION_VERSION)
    lora = LoraService(engine)
    from atropos_megatron.inference.vllm_weights import VllmWeightTransfer

    transfer = VllmWeightTransfer(engine, weight_transfer_backend)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        updater.close()  # leave no weight-sync group behind
        transfer.close()
        lora.close()  # an unload still waiting for its requests gives up

    app = FastAPI(title="atropos-megatron reference SGLang server", version=sglang_version, lifespan=lifespan)
    app.state.engine, app.state.updater, app.state.lora = engine, updater, lora
    user_keys = {api_key} if api_key else set()
    admin_keys = {admin_api_key} if admin_api_key else user_keys

    def authorized(request: Request, keys: set[str]) -> bool:
        return not keys or request.headers.get("authorization", "") in {f"Bearer {k}" for k in keys}

    def route(path: str, *, methods=("POST",), admin: bool = False, public: bool = False):
        keys = admin_keys if admin else set() if public else user_keys

        def register(handler: Callable[[Request], Awaitable[Response]]):
            async def guarded(request: Request) -> Response:
                if not authorized(request, keys):
                    return json_response({"error": "Unauthorized"}, 401)
                return await handler(request)

            app.add_api_route(path, guarded, methods=list(methods), name=handler.__name__)
            return handler

        return register

    async def body_of(request: Request) -> Any:
        raw = await request.body()
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RequestError(f"the body is not valid JSON: {exc}") from exc

    async def run_samples(requests: list[GenerateRequest]):
        futures = engine.submit_many(requests)
        for request, future in zip(requests, futures, strict=True):
            if request.adapter is not None:  # held since admission; given back once the samples exist
                future.add_done_callback(lambda _done, adapter=request.adapter: lora.release(adapter))
        return await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))

    async def with_adapters(requests: list[GenerateRequest], lora_path: Any) -> list[GenerateRequest]:
        """Each prompt's adapter (SGLang's lora_path rules), held from here until its samples exist."""
        adapters = await lora.resolve(lora_path, len(requests))
        return [dataclasses.replace(r, adapter=a) for r, a in zip(requests, adapters, strict=True)]

    async def with_v1_adapters(requests: list[GenerateRequest], body: Any) -> list[GenerateRequest]:
        """The adapter a /v1 body names: vLLM mode, ``model`` equal to a loaded adapter's name (else the
        base model); SGLang mode, ``"<served>:<name>"`` or ``lora_path``."""
        if not vllm:
            return await with_adapters(requests, openai_lora_path(body, engine.options.served_model_name))
        model = body.get("model") if isinstance(body, dict) else None
        adapters = lora.hold(model, len(requests)) or [None] * len(requests)
        return [dataclasses.replace(r, adapter=a) for r, a in zip(requests, adapters, strict=True)]

    # ----- health and info
    @route("/health", methods=("GET",), public=True)
    async def health(request: Request) -> Response:
        return Response(status_code=200 if engine.ready else 503)

    @route("/health_generate", methods=("GET",), public=True)
    async def health_generate(request: Request) -> Response:
        if engine.paused or not engine.ready:
            return Response(status_code=503)
        probe = GenerateRequest(input_ids=[0], params=SamplingParams(max_new_tokens=1, temperature=0.0))
        try:
            await asyncio.wait_for(run_samples([probe]), HEALTH_TIMEOUT_S)
        except (TimeoutError, Exception):
            return Response(status_code=503)
        return Response(status_code=200)

    def model_info() -> dict[str, Any]:
        config = engine.model.config
        return {
            "model_path": engine.options.model_path,
            "served_model_name": engine.options.served_model_name,
            "tokenizer_path": engine.options.tokenizer_path or engine.options.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": engine.weight_version,
            "load_format": "auto",
            "reasoning_parser": None,
            "tool_call_parser": None,
            "disaggregation_mode": "null",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": getattr(config, "model_type", None),
            "architectures": getattr(config, "architectures", None),
        }

    for path in ("/model_info", "/get_model_info"):  # the second is SGLang's deprecated alias
        route(path, methods=("GET",))(lambda request: _async(json_response(model_info())))

    @route("/server_info", methods=("GET",))
    async def server_info(request: Request) -> Response:
        return json_response(
            {
                "version": sglang_version,
                "tp_size": 1,
                "dp_size": 1,
                "model_path": engine.options.model_path,
                "served_model_name": engine.options.served_model_name,
                "weight_version": engine.weight_version,
                "max_batch": engine.options.max_batch,
                "device": str(engine.device),
                "context_length": engine.context_length,
                "reference_server": True,
            }
        )

    if vllm:
        from atropos_megatron.inference import vllm_http

        vllm_http.register(
            app, engine, route, json_response, run_samples, transfer, lora=lora, scale_out=enable_scale_out,
            runtime_lora=runtime_lora_updating,
        )  # fmt: skip

    # ----- generation
    @route("/generate") if not vllm else (lambda handler: handler)
    async def generate(request: Request) -> Response:
        start = time.monotonic()
        try:
            parsed = parse_generate(await body_of(request), engine)
            requests = await with_adapters(parsed.requests, parsed.lora_path)
        except RequestError as exc:
            return _error(str(exc))
        results = await run_samples(requests)
        latency = time.monotonic() - start
        out = [
            sample_json(sample, req, engine, e2e_latency_s=latency)
            for req, samples in zip(requests, results, strict=True)
            for sample in samples
        ]
        return json_response(out if parsed.batched or len(out) > 1 else out[0])

    @route("/v1/models", methods=("GET",))
    async def models(request: Request) -> Response:
        listing = openai_api.models_json(engine)
        listing["data"] += lora.model_cards(created=listing["data"][0]["created"]) if lora.enabled else []
        return json_response(listing)

    @route("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            body = await body_of(request)
            requests = await with_v1_adapters(openai_api.parse_completion(body, engine), body)
        except RequestError as exc:
            return _openai_error(str(exc))
        results = await run_samples(requests)
        model = body.get("model") or engine.options.served_model_name
        return json_response(openai_api.completion_json(model, requests, results, engine))

    @route("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            body = await body_of(request)
            (chat,) = await with_v1_adapters([openai_api.parse_chat(body, engine)], body)
        except RequestError as exc:
            return _openai_error(str(exc))
        (samples,) = await run_samples([chat])
        model = body.get("model") or engine.options.served_model_name
        return json_response(openai_api.chat_json(model, chat, samples, engine))

    if vllm:  # the routes below are SGLang's only
        return app

    # ----- generation control
    @route("/pause_generation", admin=True)
    async def pause_generation(request: Request) -> Response:
        try:
            body = await body_of(request)
        except RequestError as exc:
            return _error(str(exc))
        mode = body.get("mode", "abort") if isinstance(body, dict) else None
        if mode not in PAUSE_MODES:
            return _error(f"mode must be one of {list(PAUSE_MODES)}, got {mode!r}")
        await asyncio.to_thread(engine.pause, mode)
        return json_response({"message": "Generation paused successfully.", "status": "ok"})

    @route("/continue_generation", admin=True)
    async def continue_generation(request: Request) -> Response:
        engine.resume()
        return json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def flush_cache(request: Request) -> Response:
        if engine.busy:
            return PlainTextResponse(
                "Cache not flushed. Please check for pending requests. (When there are running or waiting "
                "requests, the operation will not be performed.)\n",
                status_code=400,
            )
        return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details.\n")

    route("/flush_cache", methods=("GET", "POST"), admin=True)(flush_cache)

    @route("/update_weight_version", admin=True)
    async def update_weight_version(request: Request) -> Response:
        try:
            body = await body_of(request)
            if not isinstance(body, dict) or not isinstance(body.get("new_version"), str):
                raise RequestError("new_version (a string) is required")
            if set(body) - {"new_version", "abort_all_requests", "rid"}:
                raise RequestError(
                    f"unknown field(s) {sorted(set(body) - {'new_version', 'abort_all_requests'})}"
                )
        except RequestError as exc:
            return json_response({"success": False, "message": str(exc)}, 400)
        if body.get("abort_all_requests", True):
            engine.abort_all()
        engine.set_weight_version(body["new_version"])
        new = body["new_version"]
        return json_response(
            {"success": True, "message": f"Weight version updated to {new}", "new_version": new}
        )

    # ----- weight updates
    def weight_route(path: str, handler: Callable[[Any], UpdateResult]) -> None:
        async def run(request: Request) -> Response:
            try:
                body = await body_of(request)
            except RequestError as exc:
                return json_response({"success": False, "message": str(exc)}, 400)
            ticket = engine.take_ticket()
            result = await asyncio.to_thread(_ordered_call, engine, ticket, handler, body)
            return json_response(
                {"success": result.success, "message": result.message}, 200 if result.success else 400
            )

        run.__name__ = path.strip("/")
        route(path, admin=True)(run)

    weight_route("/update_weights_from_tensor", updater.from_tensor)
    weight_route("/update_weights_from_disk", updater.from_disk)
    weight_route("/init_weights_update_group", updater.init_group)
    weight_route("/destroy_weights_update_group", updater.destroy_group)
    weight_route("/update_weights_from_distributed", updater.from_distributed)
    if updater.sessions_required:
        weight_route("/begin_weight_update", lambda body: updater.begin())
        weight_route("/end_weight_update", lambda body: updater.end())

    # ----- LoRA adapters (SGLang 0.5.23's LoRAUpdateOutput replies)
    def lora_route(path: str, handler: Callable[[Any], Awaitable[tuple[dict[str, Any], int]]]) -> None:
        async def run(request: Request) -> Response:
            try:
                body = await body_of(request)
            except RequestError as exc:
                return json_response(update_output(False, str(exc), None), 400)
            reply, status = await handler(body)
            return json_response(reply, status)

        run.__name__ = path.strip("/")
        route(path, admin=True)(run)

    lora_route("/load_lora_adapter", lora.load_from_path)
    lora_route("/load_lora_adapter_from_tensors", lora.load_from_tensors)
    lora_route("/unload_lora_adapter", lora.unload)
    return app


def _ordered_call(
    engine: Engine, ticket: int, handler: Callable[[Any], UpdateResult], body: Any
) -> UpdateResult:
    """Run an update handler in its turn; bad input becomes ``success=false``, never a crash."""
    with engine.ordered(ticket):
        try:
            return handler(body)
        except (WeightUpdateError, sglang_wire.PayloadError) as exc:
            return UpdateResult(False, str(exc))
        except Exception as exc:  # a failed rendezvous or broadcast, a bad field type: report, keep serving
            logger.warning("weight route failed: %s: %s", type(exc).__name__, exc)
            return UpdateResult(False, f"{type(exc).__name__}: {exc}")


SHUTDOWN_GRACE_S = 5.0
"""How long SIGTERM waits for in-flight requests before cancelling them."""


def serve(args: Any) -> int:
    """Load the model, then serve until interrupted (the ``atropos-megatron serve`` command).

    The port opens only once the model is loaded, so ``/health`` answering means ready.
    """
    import os

    import uvicorn

    from atropos_megatron.inference.engine import EngineOptions, load_engine
    from atropos_megatron.inference.lora_options import LoraOptionsError, lora_options_from_args
    from atropos_megatron.inference.routed_experts import RoutedExpertsError
    from atropos_megatron.inference.vllm_http import runtime_lora_updating

    protocol = getattr(args, "protocol", "sglang")
    scale_out = getattr(args, "enable_scale_out", False)
    # Read once here, at start-up, as vLLM reads it (envs.py); SGLang mode has no such switch.
    runtime_lora = protocol == "vllm" and runtime_lora_updating(os.environ)
    if scale_out and protocol != "vllm":
        logger.error("serve: --enable-scale-out is a vLLM flag (vllm serve's): it needs --protocol vllm")
        return 2
    logprobs_mode = getattr(args, "logprobs_mode", None)
    if logprobs_mode is not None and protocol != "vllm":
        logger.error("serve: --logprobs-mode is a vLLM flag (vllm serve's): it needs --protocol vllm")
        return 2
    logprobs_mode = logprobs_mode or "raw_logprobs"
    try:
        lora = lora_options_from_args(args)
    except LoraOptionsError as exc:
        logger.error("serve: %s", exc)
        return 2
    options = EngineOptions(
        model_path=args.model,
        served_model_name=args.served_model_name or args.model,
        tokenizer_path=args.tokenizer_path,
        weight_version=args.weight_version,
        max_batch=args.max_batch,
        seed=args.seed,
        # Read once here, at the entry point, as SGLang reads it at start-up.
        # vLLM's default logprobs_mode, raw_logprobs, is unscaled: the same switch; processed_logprobs
        # are after temperature, as SGLang's default.
        return_original_logprob=(protocol == "vllm" and logprobs_mode == "raw_logprobs")
        or os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "0").lower() in ("1", "true"),
        vllm_logprobs_mode=logprobs_mode,
        lora=lora,
        enable_return_routed_experts=getattr(args, "enable_return_routed_experts", False),
    )
    try:
        engine = load_engine(args.model, device=args.device, dtype=args.dtype, options=options)
    except (LoraOptionsError, RoutedExpertsError) as exc:  # bad --lora-target-modules; a dense model
        logger.error("serve: %s", exc)
        return 2
    try:
        from atropos_megatron.inference.vllm_weights import parse_weight_transfer_config

        backend = parse_weight_transfer_config(getattr(args, "weight_transfer_config", None))
    except ValueError as exc:
        logger.error("serve: %s", exc)
        return 2
    app = create_app(
        engine, api_key=args.api_key, admin_api_key=args.admin_api_key, sglang_version=args.sglang_version,
        protocol=protocol, weight_transfer_backend=backend, enable_scale_out=scale_out,
        runtime_lora_updating=runtime_lora,
    )  # fmt: skip
    if protocol == "vllm":
        from atropos_megatron.inference.vllm_http import VLLM_VERSION

        logger.info(
            "reference server in vLLM mode (vLLM %s RL routes, /inference/v1/generate %s, %s, weight "
            "transfer %s, runtime LoRA updating %s, not for production) on http://%s:%d", VLLM_VERSION,
            "on" if scale_out else "off (403)", logprobs_mode, backend or "off",
            "on" if runtime_lora else "off", args.host, args.port,
        )  # fmt: skip
    else:
        logger.info(
            "reference SGLang server (protocol %s, not for production) on http://%s:%d", args.sglang_version,
            args.host, args.port,
        )  # fmt: skip
    try:
        # Requests held by a pause never finish by themselves: without a bound, SIGTERM would wait on
        # them forever. After the grace they are cancelled, and engine.close() aborts their jobs.
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_level="warning",
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )
    finally:
        engine.close()
    return 0


async def _async(value: Response) -> Response:
    return value
