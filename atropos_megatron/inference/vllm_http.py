"""The vLLM-protocol routes of ``serve --protocol vllm``; registered by ``http_server.create_app``.

- vLLM 0.33.0's token-in, token-out route ``POST /inference/v1/generate`` (its "scale-out" route,
  ``entrypoints/scale_out/token_in_token_out/api_router.py``; shapes in ``vllm_api``), mounted only
  with ``--enable-scale-out`` as stock ``vllm serve`` mounts it (``entrypoints/scale_out/factories.py``):
  without the flag every scale-out path answers 403 ``PermissionDeniedError``. ``--api-key`` guards
  it like ``/v1`` (vLLM's ``GUARDED_PREFIX`` has ``/inference``). Stock ``vllm serve`` has no
  ``/generate``, and neither has this mode (404): Atropos's ``/generate`` shape is the bridge's
  translation (``bridge/vllm_generate.py``), not the server's.
- vLLM 0.33's RL routes (``entrypoints/rl/online/api_router.py``): pause/resume, weight version, the
  weight-transfer sequence (docs/vllm.md §3).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from atropos_megatron.inference import vllm_api
from atropos_megatron.inference.engine import Engine
from atropos_megatron.inference.lora_api import LoraService
from atropos_megatron.inference.native_api import RequestError
from atropos_megatron.inference.vllm_weights import VllmWeightTransfer

PAUSE_MODES = {"abort": "abort", "keep": "in_place"}  # vLLM mode -> engine mode ("wait": see pause)
VLLM_VERSION = "0.33.0"  # the vLLM release whose routes this server mirrors (GET /version)


def register(app: FastAPI, engine: Engine, route: Callable, json_response: Callable, run_samples: Callable,
             transfer: VllmWeightTransfer, *, lora: LoraService, scale_out: bool = False) -> None:  # fmt: skip
    def bad_request(message: str) -> Response:  # FastAPI validation errors, as vLLM's handler shapes them
        return json_response(vllm_api.error_json(message, 400, "Bad Request"), 400)

    def failed(exc: BaseException) -> Response:
        return json_response(vllm_api.error_json(str(exc), 500), 500)

    async def body_field(request: Request, name: str, required: bool = True) -> Any:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else {}
        except json.JSONDecodeError as exc:
            raise RequestError(f"JSON decode error: {exc}") from exc
        if not isinstance(body, dict) or (required and name not in body):
            raise RequestError(f"1 validation error:\n  {{'type': 'missing', 'loc': ('body', '{name}')}}")
        return body.get(name)

    if scale_out:
        register_generate(engine, route, json_response, run_samples, lora)
    else:  # vLLM registers a stand-in on each scale-out path: 403, after the api-key check
        for number, path in enumerate(vllm_api.SCALE_OUT_PATHS):

            async def disabled(request: Request) -> Response:
                return json_response(vllm_api.disabled_json(), 403)

            disabled.__name__ = f"scale_out_disabled_{number}"
            route(path)(disabled)

    @route("/version", methods=("GET",), public=True)
    async def version(request: Request) -> Response:  # vLLM's instrumentator/basic.py
        return json_response({"version": VLLM_VERSION})

    @route("/pause", admin=True)
    async def pause(request: Request) -> Response:
        mode = request.query_params.get("mode", "abort")
        if mode not in ("abort", "wait", "keep"):
            return bad_request("1 validation error:\n  query.mode: Input should be 'abort', 'wait' or 'keep'")
        if mode == "wait":  # let running requests finish, then freeze
            await asyncio.to_thread(engine.run_quiescent, lambda: engine.pause("in_place"))
        else:
            await asyncio.to_thread(engine.pause, PAUSE_MODES[mode])
        return json_response({"status": "paused"})

    @route("/resume", admin=True)
    async def resume(request: Request) -> Response:
        engine.resume()
        return json_response({"status": "resumed"})

    @route("/is_paused", methods=("GET",), admin=True)
    async def is_paused(request: Request) -> Response:
        return json_response({"is_paused": engine.paused})

    @route("/get_world_size", methods=("GET",), admin=True)
    async def get_world_size(request: Request) -> Response:
        return json_response({"world_size": 1})  # TP * PP (* DP) = 1

    @route("/weight_info", methods=("GET",), admin=True)
    async def weight_info(request: Request) -> Response:
        return json_response({"weight_version": engine.weight_version})

    @route("/update_weight_version", admin=True)
    async def update_weight_version(request: Request) -> Response:
        try:
            version = await body_field(request, "new_version")
            if not isinstance(version, str):
                raise RequestError("1 validation error:\n  body.new_version: Input should be a valid string")
        except RequestError as exc:
            return bad_request(str(exc))
        engine.set_weight_version(version)
        return json_response({"success": True, "new_version": version})

    def transfer_route(path: str, field_name: str | None, call: Callable[[Any], Any], message: str,
                       required: bool = True) -> None:  # fmt: skip
        async def run(request: Request) -> Response:
            try:
                value = await body_field(request, field_name, required) if field_name else None
                if field_name and required and not isinstance(value, dict):
                    raise RequestError(
                        f"1 validation error:\n  body.{field_name}: Input should be a valid dictionary"
                    )
            except RequestError as exc:
                return bad_request(str(exc))
            ticket = engine.take_ticket()

            def ordered() -> None:
                with engine.ordered(ticket):
                    call(value)

            try:
                await asyncio.to_thread(ordered)
            except Exception as exc:  # the worker's error, as vLLM's utility call re-raises it
                return failed(exc)
            return json_response({"message": message})

        run.__name__ = path.strip("/")
        route(path, admin=True)(run)

    def finish(version: Any) -> None:
        transfer.finish()
        if version is not None:
            engine.set_weight_version(str(version))
        transfer.log_finished()

    transfer_route("/init_weight_transfer_engine", "init_info", transfer.init, "Weight transfer initialized")
    transfer_route("/start_weight_update", None, lambda _: transfer.start(), "Weight update started")
    transfer_route("/update_weights", "update_info", transfer.update, "Weights updated")
    transfer_route(
        "/finish_weight_update", "weight_version", finish, "Weight update finished", required=False
    )
    transfer_route("/shutdown_weight_transfer_engine", None, lambda _: transfer.shutdown(),
                   "Weight transfer shut down")  # fmt: skip


def register_generate(engine: Engine, route: Callable, json_response: Callable, run_samples: Callable,
                      lora: LoraService) -> None:  # fmt: skip
    """``POST /inference/v1/generate``: a ``model`` that names a loaded LoRA adapter runs it."""

    def known_model(name: str) -> bool:
        return lora.enabled and lora.registry.is_loaded(name)

    @route(vllm_api.ROUTE)
    async def inference_generate(request: Request) -> Response:
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        try:
            if media != "application/json":
                raise vllm_api.content_type_error()
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise vllm_api.json_error(exc) from None
            parsed = vllm_api.parse_generate(body, engine, known_model)
            adapter_name = (
                parsed.model if parsed.model and parsed.model != engine.options.served_model_name else None
            )
            generate = parsed.request
            if adapter_name is not None:
                (adapter,) = await lora.resolve(adapter_name, 1)
                generate = dataclasses.replace(generate, adapter=adapter)
        except vllm_api.ScaleOutError as exc:
            return json_response(exc.body, exc.status)
        except RequestError as exc:  # the adapter could not be loaded again
            return json_response(vllm_api.error_json(str(exc)), 400)
        created = int(time.time())
        (samples,) = await run_samples([generate])
        header = request.headers.get("x-request-id")  # vLLM's _base_request_id: the header wins
        request_id = header if header is not None else parsed.request_id
        model = adapter_name or engine.options.served_model_name
        reply = await asyncio.to_thread(  # prompt log-probs decode each candidate token: not on the loop
            vllm_api.generate_json,
            parsed,
            samples,
            engine,
            request_id=request_id,
            model=model,
            created=created,
        )
        return json_response(reply)
