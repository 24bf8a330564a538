"""Generated from protos/atropos_megatron/bridge/v1/bridge.proto by `make protos`; do not edit."""
