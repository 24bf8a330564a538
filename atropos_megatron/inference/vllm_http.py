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
- vLLM 0.33's runtime LoRA routes (``entrypoints/serve/lora/{api_router,protocol}.py``, replies and
  checks from ``entrypoints/openai/models/serving.py``), mounted only when ``serve`` started with
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` "1"/"true" (``envs.py``; 404 without), under ``/v1`` so
  ``--api-key`` guards them: ``POST /v1/load_lora_adapter {lora_name, lora_path, load_inplace?,
  is_3d_lora_weight?}`` loads a PEFT directory through ``LoraService`` (``load_inplace``: replaces an
  adapter of that name), ``POST /v1/unload_lora_adapter {lora_name, lora_int_id?}`` drops one at once.
  Success is 200 with vLLM's plain-text sentence (no Content-Type, as its ``Response(content=str)``);
  refusals are vLLM's ``ErrorResponse`` with its status, type and text, paths masked as vLLM's
  ``sanitize_message`` masks them: an empty name or path, the served model's name, a loaded name
  without ``load_inplace`` (400 ``InvalidUserInput``), an unknown name to unload (404 ``NotFoundError``),
  no ``adapter_config.json`` at the path (404, ``LoRAAdapterNotFoundError``'s text), a server without
  ``--enable-lora`` or an adapter that does not load (500 ``InternalServerError``, "Call to add_lora
  method failed: ..."; the reason after the colon is ours). A request selects an adapter by
  ``model: "<lora_name>"`` (``/inference/v1/generate``; ``/v1/completions`` and
  ``/v1/chat/completions`` too, which answer in SGLang's shape here). Not mirrored: Hugging Face hub
  downloads of a ``lora_path`` that is no local directory, LoRA resolver plugins, ``is_3d_lora_weight``
  (MoE adapter layouts: accepted, no effect), SageMaker's adapter routes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel

from atropos_megatron.inference import vllm_api
from atropos_megatron.inference.engine import Engine
from atropos_megatron.inference.lora_api import LoraService
from atropos_megatron.inference.native_api import RequestError
from atropos_megatron.inference.vllm_weights import VllmWeightTransfer

logger = logging.getLogger(__name__)
PAUSE_MODES = {"abort": "abort", "keep": "in_place"}  # vLLM mode -> engine mode ("wait": see pause)
VLLM_VERSION = "0.33.0"  # the vLLM release whose routes this server mirrors (GET /version)
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
LORA_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
ADD_LORA_FAILED = "Call to add_lora method failed: "  # how vLLM's engine core words a failed add_lora
LORA_NOT_ENABLED = "LoRA is not enabled. Use --enable-lora to enable LoRA."  # its model runner's reason


def runtime_lora_updating(environ: Mapping[str, str]) -> bool:
    """vLLM's reading of ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``: on for "1" or "true", any case, spaces
    around ignored; anything else (unset included) is off."""
    return environ.get(RUNTIME_LORA_ENV, "0").strip().lower() in ("1", "true")


def register(app: FastAPI, engine: Engine, route: Callable, json_response: Callable, run_samples: Callable,
             transfer: VllmWeightTransfer, *, lora: LoraService, scale_out: bool = False,
             runtime_lora: bool = False) -> None:  # fmt: skip
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
    if runtime_lora:
        register_lora(route, json_response, lora, engine.options.served_model_name)

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
        served = engine.options.served_model_name
        try:
            parsed = vllm_api.parse_generate(await json_body(request), engine, known_model)
            adapter_name = parsed.model if parsed.model and parsed.model != served else None
            generate = parsed.request
            if adapter_name is not None:
                held = lora.hold(adapter_name, 1)  # vLLM has no implicit reload of an unloaded name
                if held is None:  # unloaded since the check
                    raise vllm_api.model_not_found(adapter_name, served)
                generate = dataclasses.replace(generate, adapter=held[0])
        except vllm_api.ScaleOutError as exc:
            return json_response(exc.body, exc.status)
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


async def json_body(request: Request) -> Any:
    """A JSON route's body as vLLM reads it (``validate_json_request``: Content-Type application/json,
    then valid JSON); :class:`vllm_api.ScaleOutError` with vLLM's 400 otherwise."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise vllm_api.content_type_error()
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise vllm_api.json_error(exc) from None


# ----- runtime LoRA (VLLM_ALLOW_RUNTIME_LORA_UPDATING)
class LoadLoraAdapterRequest(BaseModel):  # the fields of vLLM's LoadLoRAAdapterRequest; others dropped
    lora_name: str
    lora_path: str
    load_inplace: bool = False
    is_3d_lora_weight: bool = False  # a MoE adapter's weight layout: accepted, no effect here


class UnloadLoraAdapterRequest(BaseModel):  # vLLM's UnloadLoRAAdapterRequest; the id is unused there too
    lora_name: str
    lora_int_id: int | None = None


_SYSTEM_ROOTS = ("home", "usr", "opt", "var", "tmp", "root", "lib", "mnt", "srv")
_MASKS = (  # what vLLM's error bodies hide (exception_handling/utils.py), in its order
    (re.compile(r" at 0x[0-9a-fA-F]+>"), ">"),  # object addresses
    (re.compile(r"/(?:" + "|".join(_SYSTEM_ROOTS) + r")(?:/[\w.-]+)+"), "<path>"),  # paths under these
    (re.compile(r"(?:/[\w-]+)+/[\w-]+\.\w+"), "<path>"),  # any other path to a file with an extension
)


def masked(message: str) -> str:
    """An error message with file paths and object addresses masked, as vLLM masks its error bodies'."""
    for pattern, replacement in _MASKS:
        message = pattern.sub(replacement, message)
    return message.strip()


def _no_adapter_config(path: str) -> bool:
    """vLLM's "No adapter found": opening ``<path>/adapter_config.json`` finds no file (a missing
    directory, or one without the config); other unreadable paths fail later, as a 500."""
    try:
        with (Path(path) / "adapter_config.json").open("rb"):
            return False
    except FileNotFoundError:
        return True
    except OSError:
        return False


def register_lora(route: Callable, json_response: Callable, lora: LoraService, served: str) -> None:
    """``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, checked and answered as vLLM 0.33's
    ``OpenAIServingModels`` answers; each check and its change run under the service's update lock."""

    def error(message: str, status: int, err_type: str) -> Response:
        return json_response(vllm_api.error_json(masked(message), status, err_type), status)

    def invalid(message: str) -> Response:
        return error(message, 400, "InvalidUserInput")

    @route(LORA_ROUTES[0])
    async def load_lora_adapter(request: Request) -> Response:
        try:
            body = vllm_api.validated(LoadLoraAdapterRequest, await json_body(request))
        except vllm_api.ScaleOutError as exc:
            return json_response(exc.body, exc.status)
        name, path = body.lora_name, body.lora_path
        async with lora.update_lock:
            if not name or not path:
                return invalid("Both 'lora_name' and 'lora_path' must be provided.")
            if name == served:
                return invalid(f"The lora adapter '{name}' conflicts with a served base model.")
            if not body.load_inplace and lora.registry.is_loaded(name):
                return invalid(
                    f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
                    "place, set 'load_inplace' to True."
                )
            if not lora.enabled:  # vLLM's engine refuses the add_lora call itself
                return error(ADD_LORA_FAILED + LORA_NOT_ENABLED, 500, "InternalServerError")
            if _no_adapter_config(path):
                return error(f"Loading lora {name} failed: No adapter found for {path}", 404, "NotFoundError")
            try:
                await lora.add_from_path(name, path, replace=body.load_inplace)
            except Exception as exc:  # a bad config, rank or target, missing tensors: the engine's error
                logger.warning("LoRA adapter %s not loaded: %s: %s", name, type(exc).__name__, exc)
                return error(f"{ADD_LORA_FAILED}{exc}", 500, "InternalServerError")
        return Response(f"Success: LoRA adapter '{name}' added successfully.", status_code=200)

    @route(LORA_ROUTES[1])
    async def unload_lora_adapter(request: Request) -> Response:
        try:
            body = vllm_api.validated(UnloadLoraAdapterRequest, await json_body(request))
        except vllm_api.ScaleOutError as exc:
            return json_response(exc.body, exc.status)
        name = body.lora_name
        async with lora.update_lock:
            if not name:
                return invalid("'lora_name' needs to be provided to unload a LoRA adapter.")
            if not lora.registry.is_loaded(name):
                return error(f"The lora adapter '{name}' cannot be found.", 404, "NotFoundError")
            lora.forget(name)  # requests holding it finish on it; vLLM does not wait for them either
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", status_code=200)
