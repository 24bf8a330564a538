"""The reference SGLang-protocol inference server: HF transformers behind SGLang's HTTP routes.

It speaks SGLang's protocol exactly (routes, request fields, response JSON, weight-update payloads) so
that code written against SGLang is tested against it, and the whole system runs on a laptop. It is
not a production server: no paged attention, no prefix cache, no continuous batching, TP=1 only.

Modules, each with one job: ``sampling`` (sampling params, next-token sampling, stop rules),
``engine`` (model + generation worker + pause/update coordination), ``weight_loader`` (apply updates
to the HF model), ``checkpoint_targets`` (checkpoint names -> parameters, or slices of MoE models'
fused experts), ``openai_api`` (the /v1 response shapes), ``http_server`` (routes, auth, serve()),
and SGLang's LoRA adapters: ``lora_options`` (flags), ``lora_adapters`` (PEFT config and tensors ->
factors), ``lora_runtime`` (hooks that add each row's adapter), ``lora_registry`` (names, holders),
``lora_api`` (the routes and ``lora_path`` / ``model`` selection).
"""
